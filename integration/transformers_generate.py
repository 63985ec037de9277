"""Whole-model difference: ``generate`` tokens/s of a random-weight MoE model, grouped_mm vs moe_finalize.

Builds a small random-weight causal LM of a real MoE architecture from transformers (default:
Qwen3-MoE with Qwen3-30B-A3B's layer sizes, few layers), then for each experts implementation
times a greedy ``generate`` of a fixed number of new tokens (no EOS, so both produce exactly
the same amount of work) and a prefill forward of the prompt, on whatever device is present.
It also reports how many generated tokens the two implementations agree on: all of them in
fp32; in bf16 a random model's near-ties may flip once rounding differs (see
tests/test_transformers_layers.py).

    python integration/transformers_generate.py                      # GPU if present, else CPU sizes
    python integration/transformers_generate.py --arch deepseek_v3 --layers 2
    python integration/transformers_generate.py --device cpu --dtype fp32 --json /tmp/gen.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a source checkout without installing

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel  # noqa: E402

from moe_finalize_plugin import transformers_experts  # noqa: E402

IMPLS = ("grouped_mm", "moe_finalize")

# Per architecture: its MoE fields at a given (experts, top_k, ffn). Attention and dense sizes are
# derived from --hidden so every architecture builds at any size.
ARCH_FIELDS: dict[str, Callable[[int, int, int], dict[str, Any]]] = {
    "qwen3_moe": lambda e, k, f: dict(
        num_experts=e, num_experts_per_tok=k, moe_intermediate_size=f, norm_topk_prob=True
    ),
    "qwen2_moe": lambda e, k, f: dict(
        num_experts=e, num_experts_per_tok=k, moe_intermediate_size=f, shared_expert_intermediate_size=4 * f
    ),
    "olmoe": lambda e, k, f: dict(num_experts=e, num_experts_per_tok=k, intermediate_size=f),
    "mixtral": lambda e, k, f: dict(num_local_experts=e, num_experts_per_tok=k, intermediate_size=f),
    "gpt_oss": lambda e, k, f: dict(
        num_local_experts=e, num_experts_per_tok=k, intermediate_size=f, max_position_embeddings=131072
    ),
    "deepseek_v3": lambda e, k, f: dict(
        n_routed_experts=e,
        num_experts_per_tok=k,
        moe_intermediate_size=f,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=0,
        q_lora_rank=None,
        kv_lora_rank=128,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        head_dim=32,  # MLA: rotary head dim = qk_rope_head_dim
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}

# (hidden, layers, experts, top_k, ffn, vocab, batch, prompt, new tokens)
GPU_DEFAULTS = dict(
    hidden=2048, layers=4, experts=128, top_k=8, ffn=768, vocab=32000, batch=32, prompt_len=128, new_tokens=64
)
CPU_DEFAULTS = dict(
    hidden=256, layers=2, experts=32, top_k=8, ffn=128, vocab=1024, batch=4, prompt_len=32, new_tokens=16
)


def build_model(args: argparse.Namespace, dtype: torch.dtype) -> PreTrainedModel:
    """Random weights, created directly on the device (no host copy)."""
    heads = max(1, args.hidden // 128)
    fields: dict[str, Any] = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.ffn,  # dense MLPs where the architecture has any
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        # MLA (deepseek_v3) has no grouped KV heads.
        num_key_value_heads=heads if args.arch == "deepseek_v3" else max(1, heads // 4),
        head_dim=args.hidden // heads,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,  # always generate exactly --new-tokens
    )
    fields.update(ARCH_FIELDS[args.arch](args.experts, args.top_k, args.ffn))
    config = AutoConfig.for_model(args.arch, **fields)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, Any]:
    """Median wall time (seconds, device synchronised) of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill and generate timings for both implementations on one model."""
    transformers_experts.register()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = build_model(args, dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(1, args.vocab, (args.batch, args.prompt_len), generator=gen).to(args.device)
    mask = torch.ones_like(prompt)

    def generate(new_tokens: int) -> Tensor:
        return model.generate(
            prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )

    results: dict[str, dict[str, Any]] = {}
    tokens: dict[str, Tensor] = {}
    with torch.no_grad():
        for impl in IMPLS:
            model.set_experts_implementation(impl)
            # Warm-up of both timed shapes: allocator, kernel selection, caches.
            model(prompt, attention_mask=mask)
            generate(min(4, args.new_tokens))
            prefill_s, _ = timed(lambda: model(prompt, attention_mask=mask), args.device, args.repeats)
            gen_s, out = timed(lambda: generate(args.new_tokens), args.device, args.repeats)
            tokens[impl] = out[:, args.prompt_len :]
            results[impl] = dict(
                prefill_ms=prefill_s * 1e3,
                prefill_tokens_per_s=args.batch * args.prompt_len / prefill_s,
                generate_s=gen_s,
                generate_tokens_per_s=args.batch * args.new_tokens / gen_s,
            )
    agree = (tokens["grouped_mm"] == tokens["moe_finalize"]).float().mean().item()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return dict(
        device=device_name,
        arch=args.arch,
        dtype=args.dtype,
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        ffn=args.ffn,
        vocab=args.vocab,
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        token_agreement=agree,
        results=results,
        generate_speedup=results["moe_finalize"]["generate_tokens_per_s"]
        / results["grouped_mm"]["generate_tokens_per_s"],
        prefill_speedup=results["grouped_mm"]["prefill_ms"] / results["moe_finalize"]["prefill_ms"],
    )


def report(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['arch']} H={summary['hidden']} layers={summary['layers']} experts={summary['experts']} "
        f"K={summary['top_k']} FFN={summary['ffn']} {summary['dtype']} on {summary['device']} "
        f"(torch {summary['torch']}, transformers {summary['transformers']})",
        f"batch {summary['batch']}, prompt {summary['prompt_len']}, {summary['new_tokens']} new tokens, "
        f"median of {summary['repeats']}",
        f"{'impl':<14} {'prefill ms':>11} {'prefill tok/s':>14} {'generate s':>11} {'generate tok/s':>15}",
    ]
    for impl, r in summary["results"].items():
        lines.append(
            f"{impl:<14} {r['prefill_ms']:>11.2f} {r['prefill_tokens_per_s']:>14.0f} "
            f"{r['generate_s']:>11.3f} {r['generate_tokens_per_s']:>15.1f}"
        )
    lines.append(
        f"moe_finalize speed-up: generate {summary['generate_speedup']:.3f}x, "
        f"prefill {summary['prefill_speedup']:.3f}x; "
        f"generated tokens identical: {100 * summary['token_agreement']:.1f}%"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if present, else cpu")
    p.add_argument("--arch", choices=sorted(ARCH_FIELDS), default="qwen3_moe")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    for name in GPU_DEFAULTS:
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default {GPU_DEFAULTS[name]} on a GPU, {CPU_DEFAULTS[name]} on CPU",
        )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.arch == "deepseek_v3" and args.experts % 8:
        p.error("--arch deepseek_v3 routes over 8 expert groups: --experts must be a multiple of 8")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
