#!/usr/bin/env python
"""vLLM with the moe_finalize plugin on vs off, on one GPU: outputs, logprobs, decode speed.

Needs an NVIDIA GPU, vLLM 0.33.x and moe_finalize_plugin installed (``pip install -e .``, which
registers the ``vllm.general_plugins`` entry point). No network: by default it writes a small
random-weight Qwen3-MoE checkpoint (transformers) into a temporary folder; ``--model DIR`` takes
a local checkpoint instead (with its tokenizer, text prompts are used).

Each step runs in its own process (the plugin is chosen per process by MOE_FINALIZE_PLUGIN):

1. ``selfcheck`` (plugin on, no engine): ``register()`` leaves CUDA uninitialised; our
   ``moe_sum`` matches vLLM's ``_moe_C.moe_sum`` (with ``topk_ids`` / ``expert_map``);
   ``TopKWeightAndReduceContiguous`` matches vLLM's; a ``TritonExperts`` built by vLLM
   through the plugin's ``UnquantizedFusedMoEMethod`` carries the hook and the real modular
   kernel (Triton GEMMs) gives the PyTorch MoE result, with and without an expert map; no host
   syncs (``torch.cuda.set_sync_debug_mode("error")``); CUDA-graph capture/replay and
   ``torch.compile(fullgraph=True)`` of the hook path.
2. ``off`` then ``on``: ``vllm.LLM`` with the plugin off / on. In each engine worker the MoE
   layers are inspected (method class, experts class, hook). Greedy completions are generated,
   every off-run sequence (prompt + completion) is scored teacher-forced by both engines
   (``prompt_logprobs``), and decode throughput is timed per batch size.

The summary compares greedy tokens (agreement, first divergence), per-token logprob
differences on identical sequences, and decode tokens/s; it is printed and written as JSON.
The exit status is non-zero when a check fails or a logprob difference exceeds the limits.
Random-weight models have near-tied logits, so greedy paths may part after a few tokens
without anything being wrong; the teacher-forced logprob differences are the numeric measure.

    python integration/vllm/compare_plugin.py --out compare.json
    python integration/vllm/compare_plugin.py --model /models/Qwen1.5-MoE-A2.7B --batch-sizes 1,64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

TEXT_PROMPTS = (
    "The capital of France is",
    "Mixture-of-experts models route each token to",
    "def fibonacci(n):",
    "In 1969, the first humans to walk on the Moon were",
    "A haiku about GPUs:",
    "The three laws of thermodynamics state that",
    "Translate to German: The weather is nice today.",
    "List five prime numbers:",
)


# ---- model ---------------------------------------------------------------------------------------


def write_tiny_qwen3_moe(folder: Path, seed: int) -> None:
    """A random-weight Qwen3-MoE (64 experts, top-8) saved as a HF checkpoint, no tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=8192, hidden_size=1024, intermediate_size=2048,
        num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512, norm_topk_prob=True,
        max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.05,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)


# ---- child: engine run ---------------------------------------------------------------------------


def inspect_moe_layers(model: Any) -> dict[str, Any]:
    """Runs inside the engine worker (LLM.apply_model): what finalizes each MoE layer."""
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

    from moe_finalize_plugin import vllm_plugin

    methods: dict[int, Any] = {}
    for module in model.modules():
        for attr in ("quant_method", "_quant_method"):
            method = getattr(module, attr, None)
            if isinstance(method, FusedMoEMethodBase):
                methods[id(method)] = method
    layers = []
    for method in methods.values():
        kernel = getattr(method, "moe_kernel", None)
        experts = None if kernel is None else kernel.fused_experts
        hook = None if experts is None else getattr(experts, "post_gemm2_hook", None)
        layers.append({
            "method": type(method).__name__,
            "experts": type(experts).__name__ if experts is not None else None,
            "our_hook": hook is vllm_plugin.post_gemm2_hook,
        })
    return {
        "installed": list(vllm_plugin.installed()),
        "moe_layers": len(layers),
        "methods": sorted({layer["method"] for layer in layers}),
        "experts": sorted({str(layer["experts"]) for layer in layers}),
        "hooked_layers": sum(layer["our_hook"] for layer in layers),
    }


def logprob_of(entry: Any, token: int) -> float:
    """The logprob of `token` in one position's logprobs mapping (vLLM's Logprob objects)."""
    value = entry[token]
    return float(getattr(value, "logprob", value))


def run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    import random

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model"], dtype="bfloat16", skip_tokenizer_init=not spec["has_tokenizer"],
        max_model_len=spec["max_model_len"], gpu_memory_utilization=spec["gpu_memory_utilization"],
        enforce_eager=spec["enforce_eager"], max_num_seqs=max(spec["batch_sizes"]), seed=0,
    )
    result: dict[str, Any] = {"plugin": llm.apply_model(inspect_moe_layers)[0]}

    rng = random.Random(spec["seed"])
    vocab = spec["vocab_size"]
    if spec["has_tokenizer"]:
        tokenizer = llm.get_tokenizer()
        prompts = [tokenizer.encode(text) for text in TEXT_PROMPTS][: spec["num_prompts"]]
    else:
        prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(12, 40))]
                   for _ in range(spec["num_prompts"])]

    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=0,
                            ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    result["prompts"] = prompts
    result["completions"] = [list(o.outputs[0].token_ids) for o in outputs]
    result["completion_logprobs"] = [
        [logprob_of(entry, tok) for entry, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
        for o in outputs
    ]

    # Teacher-forced: every position's logprob of the given next token, same sequences in both runs.
    sequences = spec["score_sequences"] or [p + c for p, c in zip(prompts, result["completions"])]
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    scored = llm.generate([{"prompt_token_ids": s} for s in sequences], score, use_tqdm=False)
    result["scored_sequences"] = sequences
    result["scored_logprobs"] = [
        [logprob_of(entry, tok) for entry, tok in zip(o.prompt_logprobs[1:], seq[1:])]
        for o, seq in zip(scored, sequences)
    ]

    throughput = {}
    for batch in spec["batch_sizes"]:
        batch_prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(32)]}
                         for _ in range(batch)]

        def timed(max_tokens: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                    detokenize=False)
            start = time.perf_counter()
            llm.generate(batch_prompts, params, use_tqdm=False)
            return time.perf_counter() - start

        timed(8)  # warm-up: CUDA graphs for this batch size, allocator
        steps = spec["decode_tokens"]
        prefill = statistics.median(timed(1) for _ in range(3))
        full = statistics.median(timed(steps) for _ in range(3))
        # Subtracting a 1-token run leaves the decode steps alone.
        throughput[str(batch)] = {
            "decode_tokens_per_s": batch * (steps - 1) / max(full - prefill, 1e-9),
            "seconds_full": full, "seconds_prefill_only": prefill,
        }
    result["throughput"] = throughput
    return result


# ---- child: self-check ---------------------------------------------------------------------------


def run_selfcheck(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from moe_finalize_plugin import reference, vllm_plugin

    checks: dict[str, Any] = {}

    def check(name: str, fn: Callable[[], Any]) -> None:
        try:
            checks[name] = {"ok": True, "detail": fn()}
        except BaseException:  # noqa: BLE001 -- report every failure, keep going
            checks[name] = {"ok": False, "detail": traceback.format_exc()}

    def register_no_cuda() -> dict[str, Any]:
        vllm_plugin.register()
        assert len(vllm_plugin.installed()) == 3, vllm_plugin.installed()
        assert not torch.cuda.is_initialized(), "register() initialised CUDA"
        return {"installed": list(vllm_plugin.installed())}

    check("register_is_cuda_free", register_no_cuda)
    if not checks["register_is_cuda_free"]["ok"]:
        return checks

    import vllm._custom_ops as custom_ops
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.moe_output import route_major_moe_output
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceContiguous,
    )
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )
    from vllm.v1.worker.workspace import init_workspace_manager

    device = torch.device("cuda")
    init_workspace_manager(device)
    gen = torch.Generator(device=device).manual_seed(spec["seed"])
    num_experts, local_experts, topk = 64, 16, 8

    def routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.rand(tokens, num_experts, device=device, generator=gen)
        weights, ids = scores.topk(topk, dim=1)
        return ids.to(torch.int32), (weights / weights.sum(1, keepdim=True)).float()

    def expert_map() -> torch.Tensor:
        emap = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
        emap[16:32] = torch.arange(local_experts, dtype=torch.int32, device=device)
        return emap

    def row_map(ids: torch.Tensor, emap: torch.Tensor | None) -> torch.Tensor:
        slots = torch.arange(ids.numel(), device=device).view(ids.shape)
        skip = ids < 0
        if emap is not None:
            skip |= emap[ids.clamp(min=0).long()] < 0
        return slots.masked_fill(skip, -1)

    def moe_sum_matches_vllm() -> dict[str, Any]:
        worst = 0.0
        bitwise = True
        for tokens, hidden in ((1, 4096), (7, 2880), (512, 4096)):
            ids, _ = routing(tokens)
            ids[::3, 2] = -1
            for emap in (None, expert_map()):
                inp = torch.randn(tokens, topk, hidden, device=device, generator=gen).bfloat16()
                ours = torch.empty(tokens, hidden, device=device, dtype=torch.bfloat16)
                theirs = torch.empty_like(ours)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    custom_ops.moe_sum(inp, ours, ids, emap)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                vllm_plugin._STATE.original_moe_sum(inp, theirs, ids, emap)
                torch.testing.assert_close(ours, theirs)
                ref = reference.finalize(inp.view(-1, hidden), row_map(ids, emap), None)
                torch.testing.assert_close(ours, ref)
                bitwise &= torch.equal(ours, theirs)
                worst = max(worst, (ours.float() - theirs.float()).abs().max().item())
        return {"bitwise_equal_to_vllm": bitwise, "max_abs_diff_vs_vllm": worst}

    def contiguous_matches_vllm() -> dict[str, Any]:
        impl = TopKWeightAndReduceContiguous()
        ids, weights = routing(256)
        fused = torch.randn(256, topk, 4096, device=device, generator=gen).bfloat16()
        ours = torch.empty(256, 4096, device=device, dtype=torch.bfloat16)
        torch.cuda.set_sync_debug_mode("error")
        try:
            impl.apply(ours, fused, weights, ids, False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        theirs = torch.empty_like(ours)
        # vLLM's own apply with vLLM's own moe_sum (the plugin's is swapped out meanwhile).
        plugin_moe_sum = custom_ops.moe_sum
        custom_ops.moe_sum = vllm_plugin._STATE.original_moe_sum
        try:
            vllm_plugin._STATE.original_contiguous_apply(
                impl, theirs, fused.clone(), weights, ids, False
            )
        finally:
            custom_ops.moe_sum = plugin_moe_sum
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ours, reference.finalize(fused.view(-1, 4096), None, weights))
        return {"max_abs_diff_vs_vllm": (ours.float() - theirs.float()).abs().max().item()}

    hidden, inter = 2048, 768
    vllm_config = VllmConfig()

    def build_experts(local: int) -> Any:
        config = FusedMoEConfig(
            num_experts=num_experts, experts_per_token=topk, hidden_dim=hidden,
            intermediate_size=inter, num_local_experts=local, num_logical_experts=num_experts,
            activation=MoEActivation.SILU, device=device,
            routing_method=RoutingMethodType.Renormalize,
            moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
            in_dtype=torch.bfloat16, moe_backend="triton",
        )
        with set_current_vllm_config(vllm_config):
            method = UnquantizedFusedMoEMethod(config)
            method._init_moe_kernel(SimpleNamespace(apply_router_weight_on_input=False,
                                                    _expert_routing_tables=lambda: None))
        return method

    def torch_moe(x, w1, w2, ids, weights, emap):
        local = ids.long() if emap is None else emap[ids.long()].long()
        valid = local >= 0
        local = local.clamp(min=0)
        # Rounded where TritonExperts rounds: GEMM1 output and activation are bf16 buffers.
        h = torch.einsum("mh,mkih->mki", x.float(), w1[local].float()).bfloat16().float()
        act = (torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]).bfloat16().float()
        rows = torch.einsum("mki,mkhi->mkh", act, w2[local].float())
        rows = rows * (weights * valid).unsqueeze(-1)
        return rows.sum(1)

    def triton_modular_kernel() -> dict[str, Any]:
        details = {}
        for name, local, emap in (("no_ep", num_experts, None), ("ep", local_experts, expert_map())):
            method = build_experts(local)
            assert type(method).__name__ == "MoeFinalizeUnquantizedFusedMoEMethod", type(method)
            experts = method.moe_kernel.fused_experts
            assert type(experts).__name__ == "TritonExperts", type(experts)
            assert experts.post_gemm2_hook is vllm_plugin.post_gemm2_hook
            w1 = (torch.randn(local, 2 * inter, hidden, device=device, generator=gen)
                  / hidden**0.5).bfloat16()
            w2 = (torch.randn(local, hidden, inter, device=device, generator=gen)
                  / inter**0.5).bfloat16()
            worst_ref, worst_unhooked = 0.0, 0.0
            for tokens in (1, 33, 1024):
                x = torch.randn(tokens, hidden, device=device, generator=gen).bfloat16()
                ids, weights = routing(tokens)
                args = dict(hidden_states=x, w1=w1, w2=w2, topk_weights=weights, topk_ids=ids,
                            activation=MoEActivation.SILU, global_num_experts=num_experts,
                            expert_map=emap, apply_router_weight_on_input=False)
                with set_current_vllm_config(vllm_config):
                    hooked = method.moe_kernel.apply(**args)
                    experts.post_gemm2_hook = None
                    unhooked = method.moe_kernel.apply(**args)
                    experts.post_gemm2_hook = vllm_plugin.post_gemm2_hook
                expected = torch_moe(x, w1, w2, ids, weights, emap)
                torch.testing.assert_close(hooked.float(), expected, rtol=2e-2, atol=2e-2)
                torch.testing.assert_close(hooked, unhooked, rtol=2e-2, atol=2e-2)
                worst_ref = max(worst_ref, (hooked.float() - expected).abs().max().item())
                worst_unhooked = max(worst_unhooked,
                                     (hooked.float() - unhooked.float()).abs().max().item())
            details[name] = {"max_abs_diff_vs_torch": worst_ref,
                             "max_abs_diff_vs_plugin_off_path": worst_unhooked}
        return details

    def hook_no_sync_graph_compile() -> dict[str, Any]:
        experts = build_experts(num_experts).moe_kernel.fused_experts
        tokens, width = 64, 4096
        ids, weights = routing(tokens)
        emap = expert_map()
        rows = torch.randn(tokens, topk, width, device=device, generator=gen).bfloat16()
        out = torch.empty(tokens, width, device=device, dtype=torch.bfloat16)

        def step() -> None:
            experts._run_post_gemm2_hook(route_major_moe_output(rows, weights, ids, emap), out)

        def expected() -> torch.Tensor:
            return reference.finalize(rows.view(-1, width), row_map(ids, emap), weights)

        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(out, expected())

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up on a side stream, as CUDA-graph capture requires
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        new_ids, new_weights = routing(tokens)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        rows.copy_(torch.randn(rows.shape, device=device, generator=gen))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected())

        def layer(rows, weights, ids, emap, out):
            experts._run_post_gemm2_hook(route_major_moe_output(rows, weights, ids, emap), out)
            return out

        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, dynamic=True)
        for count in (16, 48):
            ids_c, weights_c = routing(count)
            rows_c = torch.randn(count, topk, width, device=device, generator=gen).bfloat16()
            out_c = torch.empty(count, width, device=device, dtype=torch.bfloat16)
            compiled(rows_c, weights_c, ids_c, emap, out_c)
            torch.testing.assert_close(
                out_c, reference.finalize(rows_c.view(-1, width), row_map(ids_c, emap), weights_c)
            )
        return {"graph_replay": "ok", "compiled_fullgraph": "ok"}

    check("moe_sum_matches_vllm_moe_sum", moe_sum_matches_vllm)
    check("contiguous_weight_and_reduce_matches_vllm", contiguous_matches_vllm)
    check("triton_experts_modular_kernel", triton_modular_kernel)
    check("hook_no_host_sync_cuda_graph_compile", hook_no_sync_graph_compile)
    return checks


# ---- parent: orchestration and comparison -------------------------------------------------------


def run_child(role: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    spec_path, result_path = workdir / f"{role}.spec.json", workdir / f"{role}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["MOE_FINALIZE_PLUGIN"] = "0" if role == "off" else "1"
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # LLM.apply_model ships a function
    env.pop("VLLM_PLUGINS", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", role,
           "--spec", str(spec_path), "--result", str(result_path)]
    print(f"[compare_plugin] running {role} ...", flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not result_path.exists():
        raise SystemExit(f"[compare_plugin] the {role} run failed (exit {proc.returncode})")
    return json.loads(result_path.read_text())


def compare(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    agreement, divergence = [], []
    for a, b in zip(off["completions"], on["completions"]):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        divergence.append(first)
        agreement.append((len(a) if first is None else first) / max(len(a), 1))
    diffs = sorted(
        abs(x - y)
        for seq_off, seq_on in zip(off["scored_logprobs"], on["scored_logprobs"])
        for x, y in zip(seq_off, seq_on)
    )
    throughput = {
        batch: {
            "off_tokens_per_s": off["throughput"][batch]["decode_tokens_per_s"],
            "on_tokens_per_s": on["throughput"][batch]["decode_tokens_per_s"],
            "speedup": on["throughput"][batch]["decode_tokens_per_s"]
            / off["throughput"][batch]["decode_tokens_per_s"],
        }
        for batch in off["throughput"]
    }
    return {
        "greedy_identical_sequences": sum(d is None for d in divergence),
        "greedy_sequences": len(divergence),
        "greedy_first_divergence": divergence,
        "greedy_token_agreement": statistics.mean(agreement),
        "teacher_forced_positions": len(diffs),
        "logprob_abs_diff_max": diffs[-1] if diffs else 0.0,
        "logprob_abs_diff_mean": statistics.mean(diffs) if diffs else 0.0,
        "logprob_abs_diff_p99": diffs[int(0.99 * (len(diffs) - 1))] if diffs else 0.0,
        "throughput": throughput,
    }


def verdict(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    problems = []
    for name, entry in report.get("selfcheck", {}).items():
        if not entry["ok"]:
            problems.append(f"selfcheck {name} failed:\n{entry['detail']}")
    off, on = report["off"]["plugin"], report["on"]["plugin"]
    if off["installed"] or off["hooked_layers"]:
        problems.append(f"MOE_FINALIZE_PLUGIN=0 run still has the plugin: {off}")
    if len(on["installed"]) != 3:
        problems.append(f"plugin not installed in the engine worker: {on}")
    if "TritonExperts" in on["experts"] and on["hooked_layers"] != on["moe_layers"]:
        problems.append(f"not every TritonExperts layer carries the hook: {on}")
    cmp = report["comparison"]
    if cmp["logprob_abs_diff_max"] > args.max_logprob_diff:
        problems.append(f"max |logprob diff| {cmp['logprob_abs_diff_max']:.4f} > {args.max_logprob_diff}")
    if cmp["logprob_abs_diff_mean"] > args.mean_logprob_diff:
        problems.append(f"mean |logprob diff| {cmp['logprob_abs_diff_mean']:.5f} > {args.mean_logprob_diff}")
    return problems


def print_summary(report: dict[str, Any]) -> None:
    on, cmp = report["on"]["plugin"], report["comparison"]
    print("\n=== moe_finalize plugin: vLLM on vs off ===")
    print(f"model: {report['model']}  ({on['moe_layers']} MoE layers; experts {on['experts']}; "
          f"method {on['methods']}; hooked {on['hooked_layers']})")
    for name, entry in report.get("selfcheck", {}).items():
        detail = entry["detail"] if entry["ok"] else "FAILED"
        print(f"selfcheck {name}: {'ok' if entry['ok'] else 'FAILED'} {detail if entry['ok'] else ''}")
    print(f"greedy: {cmp['greedy_identical_sequences']}/{cmp['greedy_sequences']} sequences identical, "
          f"token agreement {cmp['greedy_token_agreement']:.3f}, first divergence {cmp['greedy_first_divergence']}")
    print(f"teacher-forced |logprob diff| over {cmp['teacher_forced_positions']} tokens: "
          f"max {cmp['logprob_abs_diff_max']:.5f}  mean {cmp['logprob_abs_diff_mean']:.6f}  "
          f"p99 {cmp['logprob_abs_diff_p99']:.5f}")
    print(f"{'batch':>6} {'off tok/s':>12} {'on tok/s':>12} {'speedup':>8}")
    for batch, row in cmp["throughput"].items():
        print(f"{batch:>6} {row['off_tokens_per_s']:12.1f} {row['on_tokens_per_s']:12.1f} "
              f"{row['speedup']:8.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local HF checkpoint (default: a tiny random Qwen3-MoE)")
    parser.add_argument("--out", default="compare_plugin.json", help="JSON report path")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy completion length")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens per throughput run")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compile")
    parser.add_argument("--skip-selfcheck", action="store_true")
    parser.add_argument("--max-logprob-diff", type=float, default=0.5)
    parser.add_argument("--mean-logprob-diff", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=("selfcheck", "off", "on"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        result = run_selfcheck(spec) if args.child == "selfcheck" else run_engine(spec)
        Path(args.result).write_text(json.dumps(result))
        return 0

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("compare_plugin.py needs an NVIDIA GPU (vLLM on CUDA)")
    with tempfile.TemporaryDirectory(prefix="moe_finalize_vllm_") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            model = str(workdir / "tiny-qwen3-moe")
            write_tiny_qwen3_moe(Path(model), args.seed)
        config = json.loads((Path(model) / "config.json").read_text())
        has_tokenizer = any((Path(model) / f).exists()
                            for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
        spec: dict[str, Any] = {
            "model": model, "has_tokenizer": has_tokenizer,
            "vocab_size": config.get("vocab_size") or config["text_config"]["vocab_size"],
            "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
            "decode_tokens": args.decode_tokens,
            "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
            "max_model_len": args.max_model_len,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "enforce_eager": args.enforce_eager, "seed": args.seed, "score_sequences": None,
        }
        report: dict[str, Any] = {"model": args.model or "tiny random Qwen3-MoE (64 experts, top-8)"}
        if not args.skip_selfcheck:
            report["selfcheck"] = run_child("selfcheck", spec, workdir)
        report["off"] = run_child("off", spec, workdir)
        report["on"] = run_child("on", {**spec, "score_sequences": report["off"]["scored_sequences"]},
                                 workdir)
        report["comparison"] = compare(report["off"], report["on"])
    problems = verdict(report, args)
    report["problems"] = problems
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_summary(report)
    print(f"\nreport: {args.out}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
