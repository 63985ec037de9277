"""One transformers MoE layer at real sizes: stock ``grouped_mm`` vs ``moe_finalize`` (issue 5).

The layer is the architecture's own transformers block (router, experts and, for DeepSeek-V3,
the shared expert), built with random weights straight on the device:

* Qwen3-30B-A3B: H=2048, 128 experts, K=8, expert FFN 768 (``Qwen3MoeSparseMoeBlock``);
* DeepSeek-V3: H=7168, 256 experts, K=8, expert FFN 2048, grouped sigmoid routing, one shared
  expert, routed scaling 2.5 (``DeepseekV3MoE``; 22.5 GB of bf16 expert weights).

The expert count is cut (halved until it fits, recorded as ``experts_used``) only when the
weights would not fit in free device memory; on an 80 GB card neither model is cut.

For each T in {1, 16, 128, 1024, 8192} and each implementation it records:

* ``layer_event_us``: median CUDA-event time of one eager layer call, after warm-up (includes
  the host launch cost, which dominates at small T);
* ``layer_graph_us``: GPU time per call under CUDA-graph replay (None where capture fails);
* ``finalize_event_us`` / ``finalize_graph_us``: the finalize step alone on the same routing:
  for grouped_mm the weight gather, multiply, inverse permutation, un-permute gather, sum over K
  and cast, as transformers writes them; for moe_finalize the inverse permutation, the map and
  the one ``finalize`` call (``transformers_experts.finalize_step``, the code the layer runs);
* ``finalize_share``: finalize time / layer time (graph times where both exist);
* ``speedup``: grouped_mm layer time / moe_finalize layer time, on the moe_finalize record;
* ``rel_diff``: ||out - out_grouped_mm|| / ||out_grouped_mm|| of the layer outputs.

Routing comes from the layer's own router on random activations, so expert load is roughly
uniform (real traffic is more skewed; the finalize step does not depend on the skew). The
finalize step's input is timed L2-resident, as it is in the layer, where the down projection
has just written it.

Writes ``<out-dir>/layer_<card-slug>.json``, ``.md`` (the README table) and ``.png`` (when
matplotlib imports; else ``--replot JSON`` later), then prints a table last.

    python benchmarks/bench_layer.py                                   # full run, < 4 min on an H100
    python benchmarks/bench_layer.py --out-dir "$OUT"
    python benchmarks/bench_layer.py --device cpu --quick --out-dir /tmp/bl   # logic check
    python benchmarks/bench_layer.py --replot benchmarks/results/layer_nvidia-h100-80gb-hbm3.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMPLS = ("grouped_mm", "moe_finalize")
TOKENS = (1, 16, 128, 1024, 8192)
QUICK_TOKENS = (1, 16, 128)
COLORS = {"grouped_mm": "tab:gray", "moe_finalize": "tab:red"}


@dataclass(frozen=True)
class LayerSpec:
    """One architecture's MoE layer: sizes and where its transformers block class lives."""

    name: str
    model_type: str
    block: str  # "module:Class" of the sparse MoE block
    hidden: int
    experts: int
    top_k: int
    ffn: int
    extra: dict[str, Any] = field(default_factory=dict)
    groups: int = 1  # the expert count must stay a multiple of this (grouped routing)

    def config_kwargs(self, experts: int) -> dict[str, Any]:
        if self.model_type == "deepseek_v3":
            counts = dict(n_routed_experts=experts, moe_intermediate_size=self.ffn)
        else:
            counts = dict(num_experts=experts, moe_intermediate_size=self.ffn)
        return dict(hidden_size=self.hidden, num_experts_per_tok=self.top_k, **counts, **self.extra)

    def weight_bytes(self, experts: int, elem: int) -> int:
        """Bytes of gate_up + down expert weights (router and shared expert are small)."""
        return experts * 3 * self.hidden * self.ffn * elem


SPECS: dict[str, LayerSpec] = {
    "Qwen3-30B-A3B": LayerSpec(
        "Qwen3-30B-A3B",
        "qwen3_moe",
        "transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeSparseMoeBlock",
        hidden=2048,
        experts=128,
        top_k=8,
        ffn=768,
        extra=dict(norm_topk_prob=True),
    ),
    "DeepSeek-V3": LayerSpec(
        "DeepSeek-V3",
        "deepseek_v3",
        "transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3MoE",
        hidden=7168,
        experts=256,
        top_k=8,
        ffn=2048,
        groups=8,
        extra=dict(n_group=8, topk_group=4, routed_scaling_factor=2.5, n_shared_experts=1, norm_topk_prob=True),
    ),
}


def quick_spec(spec: LayerSpec) -> LayerSpec:
    """Same routing structure (K, groups, shared expert) at toy sizes, for --quick."""
    return replace(spec, hidden=256, experts=32 if spec.groups > 1 else 16, ffn=128)


def card_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


@dataclass
class Timer:
    """CUDA events after warm-up and CUDA-graph replay on a GPU; perf_counter on CPU."""

    device: str
    warmup: int
    iters: int
    use_graphs: bool

    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def eager_us(self, fn: Callable[[], object]) -> float:
        """Median time of one call (each call timed on its own)."""
        import torch

        for _ in range(self.warmup):
            fn()
        self._sync()
        samples = []
        for _ in range(self.iters):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)

    def graph_us(self, fn: Callable[[], object]) -> tuple[float | None, str | None]:
        """GPU time per call under CUDA-graph replay, or (None, why not)."""
        import torch

        if self.device != "cuda" or not self.use_graphs:
            return None, "no CUDA graphs on this device" if self.device != "cuda" else "disabled"
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as capture requires
                for _ in range(max(2, self.warmup)):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except Exception as exc:  # capture limits vary by op and torch version: report, go on
            torch.cuda.synchronize()
            return None, f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.iters):
            graph.replay()
        end.record()
        end.synchronize()
        per_call = start.elapsed_time(end) * 1e3 / self.iters
        del graph
        return per_call, None


# ---------------------------------------------------------------------------------------
# The layer and its finalize steps
# ---------------------------------------------------------------------------------------


def build_layer(spec: LayerSpec, experts: int, device: str, dtype: Any) -> Any:
    """The transformers block with random weights (std 1/sqrt(fan-in)), allocated on `device`."""
    import torch
    from transformers import AutoConfig

    module_name, cls_name = spec.block.split(":")
    block_cls = getattr(importlib.import_module(module_name), cls_name)
    config = AutoConfig.for_model(spec.model_type, **spec.config_kwargs(experts))
    with torch.device("meta"):  # no host copy of 22 GB of weights
        block = block_cls(config)
    block = block.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for _, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if tensor.dim() >= 2:
                tensor.normal_(0.0, tensor.shape[-1] ** -0.5, generator=gen)
            else:  # e_score_correction_bias: small, but not zero, as in trained checkpoints
                tensor.normal_(0.0, 0.01, generator=gen)
    return block.eval()


def route(block: Any, hidden: Any) -> tuple[Any, Any]:
    """(top_k_index, top_k_weights) from the block's own router."""
    _, weights, index = block.gate(hidden)
    return index, weights


def stock_finalize_step(proj_out: Any, perm: Any, top_k_weights: Any, num_tokens: int, top_k: int) -> Any:
    """What transformers' grouped_mm does after the down projection (same lines, same order).

    transformers 5.16/5.17 also zero the sentinel rows of the down projection's output first,
    on every call; that pass is left out here, so the stock step is if anything under-counted."""
    import torch

    sample_weights_g = top_k_weights.reshape(-1)[perm]
    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted_out = weighted_out[inv_perm]
    return weighted_out.view(num_tokens, top_k, proj_out.shape[-1]).sum(dim=1).to(proj_out.dtype)


def resolve_experts(
    spec: LayerSpec, device: str, dtype_bytes: int, max_tokens: int, override: int | None
) -> tuple[int, str]:
    """(expert count, why it differs from the spec's or ""): --experts, else cut only to fit."""
    import torch

    if override is not None:
        return override, "--experts" if override != spec.experts else ""
    if device != "cuda":
        return spec.experts, ""
    free, _ = torch.cuda.mem_get_info()
    # Activations of the stock path at the largest T: ~6 [T*K, H] buffers, two of them fp32.
    activations = 8 * max_tokens * spec.top_k * spec.hidden * 4
    experts = spec.experts
    while experts > spec.groups * spec.top_k and spec.weight_bytes(experts, dtype_bytes) + activations > 0.85 * free:
        experts //= 2
    return experts, "cut to fit device memory" if experts != spec.experts else ""


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------


def bench_spec(
    spec: LayerSpec,
    experts: int,
    experts_note: str,
    tokens: Sequence[int],
    timer: Timer,
    device: str,
    dtype: Any,
    meta: dict[str, Any],
) -> list[dict[str, Any]]:
    """Records for every (T, impl) of one layer."""
    import torch

    from moe_finalize_plugin import transformers_experts

    block = build_layer(spec, experts, device, dtype)
    config = block.experts.config
    records = []
    for num_tokens in tokens:
        gen = torch.Generator(device=device).manual_seed(num_tokens)
        hidden = torch.randn(1, num_tokens, spec.hidden, device=device, dtype=dtype, generator=gen)
        with torch.no_grad():
            index, weights = route(block, hidden.view(-1, spec.hidden))
            _, perm = torch.sort(index.reshape(-1))
            # Stand-in for the down projection's output: the finalize cost does not depend on values.
            proj_out = torch.randn(perm.numel(), spec.hidden, device=device, dtype=dtype, generator=gen)
            outputs: dict[str, Any] = {}
            per_impl: dict[str, dict[str, Any]] = {}
            for impl in IMPLS:
                config._experts_implementation = impl
                layer = functools.partial(block, hidden)
                if impl == "grouped_mm":
                    step = functools.partial(stock_finalize_step, proj_out, perm, weights, num_tokens, spec.top_k)
                else:
                    step = functools.partial(
                        transformers_experts.finalize_step, proj_out, perm, index, weights, experts
                    )
                outputs[impl] = layer().float()
                layer_event = timer.eager_us(layer)
                layer_graph, layer_graph_note = timer.graph_us(layer)
                step_event = timer.eager_us(step)
                step_graph, _ = timer.graph_us(step)
                use_graph = layer_graph is not None and step_graph is not None
                share = (step_graph / layer_graph) if use_graph else (step_event / layer_event)
                per_impl[impl] = dict(
                    layer_event_us=layer_event,
                    layer_graph_us=layer_graph,
                    graph_note=layer_graph_note,
                    finalize_event_us=step_event,
                    finalize_graph_us=step_graph,
                    finalize_share=share,
                    time_basis="graph" if use_graph else "event",
                )
            ref = outputs["grouped_mm"]
            for impl in IMPLS:
                rec = dict(
                    meta,
                    model=spec.name,
                    T=num_tokens,
                    K=spec.top_k,
                    H=spec.hidden,
                    ffn=spec.ffn,
                    experts_real=SPECS[spec.name].experts,
                    experts_used=experts,
                    experts_note=experts_note,
                    impl=impl,
                    **per_impl[impl],
                    rel_diff=((outputs[impl] - ref).norm() / ref.norm()).item(),
                )
                records.append(rec)
            base, ours = per_impl["grouped_mm"], per_impl["moe_finalize"]
            basis = "layer_graph_us" if base["layer_graph_us"] and ours["layer_graph_us"] else "layer_event_us"
            records[-1]["speedup"] = base[basis] / ours[basis]
            records[-1]["speedup_basis"] = basis
            records[-1]["speedup_event"] = base["layer_event_us"] / ours["layer_event_us"]
        del hidden, proj_out, outputs
    del block
    if device == "cuda":
        torch.cuda.empty_cache()
    return records


def run_meta(device: str, dtype_name: str, quick: bool) -> dict[str, Any]:
    import torch
    import transformers

    import moe_finalize_plugin

    card = torch.cuda.get_device_name() if device == "cuda" else f"cpu {platform.processor() or platform.machine()}"
    from bench_finalize import git_rev  # a sibling script: benchmarks/ is on sys.path

    return dict(
        card=card,
        device=device,
        dtype=dtype_name,
        quick=quick,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        commit=git_rev(),
        binary_rev=moe_finalize_plugin.build_info()["source_rev"],  # what the binary was built from
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def _layer_us(rec: dict[str, Any]) -> float:
    return rec["layer_graph_us"] if rec["time_basis"] == "graph" else rec["layer_event_us"]


def _finalize_us(rec: dict[str, Any]) -> float:
    return rec["finalize_graph_us"] if rec["time_basis"] == "graph" else rec["finalize_event_us"]


def plot(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Per model: layer time vs T for both implementations (left axis, log-log) with the
    finalize step's share annotated; the speed-up as a bar panel underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(
        2, len(models), figsize=(6.5 * len(models), 8), squeeze=False, gridspec_kw={"height_ratios": [2, 1]}
    )
    for col, model in enumerate(models):
        rows = [r for r in records if r["model"] == model]
        ax, ax_speed = axes[0][col], axes[1][col]
        for impl in IMPLS:
            pts = sorted(
                (r["T"], _layer_us(r), _finalize_us(r), r["finalize_share"]) for r in rows if r["impl"] == impl
            )
            ts = [p[0] for p in pts]
            ax.plot(ts, [p[1] for p in pts], marker="o", color=COLORS[impl], label=f"{impl}: layer")
            ax.plot(
                ts, [p[2] for p in pts], marker="x", linestyle="--", color=COLORS[impl], label=f"{impl}: finalize step"
            )
            for t, layer_us, _, share in pts:
                ax.annotate(
                    f"{100 * share:.0f}%",
                    (t, layer_us),
                    textcoords="offset points",
                    xytext=(0, 6 if impl == "grouped_mm" else -12),
                    ha="center",
                    fontsize=7,
                    color=COLORS[impl],
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        basis = "CUDA-graph" if all(r["time_basis"] == "graph" for r in rows) else "event"
        ax.set_ylabel(f"us per call ({basis} time)")
        used, real = rows[0]["experts_used"], rows[0]["experts_real"]
        note = rows[0]["experts_note"]
        experts = f"{used} experts" + (f" (of {real}: {note})" if note else "")
        ax.set_title(
            f"{model}: H={rows[0]['H']}, K={rows[0]['K']}, FFN {rows[0]['ffn']}, {experts}\n"
            "labels: finalize step's share of the layer",
            fontsize=9,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        speed = sorted((r["T"], r["speedup"]) for r in rows if "speedup" in r)
        ax_speed.bar([str(t) for t, _ in speed], [s for _, s in speed], color=COLORS["moe_finalize"])
        ax_speed.axhline(1.0, color="black", linewidth=0.8)
        for i, (_, s) in enumerate(speed):
            ax_speed.annotate(f"{s:.2f}x", (i, s), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        ax_speed.set_xlabel("tokens T")
        ax_speed.set_ylabel("layer speed-up vs grouped_mm")
    meta = records[0]
    fig.suptitle(
        f"one MoE layer, {meta['dtype']}, {meta['card']} (torch {meta['torch']}, transformers {meta['transformers']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """The README table: per model and T, both layers, the finalize step's share, the speed-up."""
    meta = records[0]
    lines = [
        f"{meta['card']}, {meta['dtype']}, torch {meta['torch']}, transformers {meta['transformers']}; "
        "us per layer call (CUDA-graph GPU time where captured, else CUDA-event time of the eager call).",
        "",
        "| model | T | grouped_mm layer us | its finalize step | moe_finalize layer us | its finalize step "
        "| layer speed-up | eager-call speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for base, rec in _pairs(records):
        lines.append(
            f"| {rec['model']} | {rec['T']} | {_layer_us(base):.1f} | {_finalize_us(base):.1f} us "
            f"({100 * base['finalize_share']:.1f}%) | {_layer_us(rec):.1f} | {_finalize_us(rec):.1f} us "
            f"({100 * rec['finalize_share']:.1f}%) | {rec['speedup']:.3f}x | {rec['speedup_event']:.3f}x |"
        )
    cut = {(r["model"], r["experts_used"], r["experts_real"], r["experts_note"]) for r in records if r["experts_note"]}
    lines += [f"\n{m} ran with {u} of its {e} experts ({why})." for m, u, e, why in sorted(cut)]
    return "\n".join(lines) + "\n"


def _pairs(records: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(grouped_mm record, moe_finalize record) for each (model, T), in record order."""
    return [
        (next(r for r in records
              if r["impl"] == "grouped_mm" and r["model"] == rec["model"] and r["T"] == rec["T"]), rec)
        for rec in records if rec["impl"] == "moe_finalize"
    ]


def write_outputs(records: list[dict[str, Any]], out_dir: Path, stem: str, make_plot: bool) -> list[Path]:
    """JSON and the markdown table always; the PNG when asked and matplotlib is importable."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(records))
    paths = [json_path, md_path]
    if make_plot:
        try:
            paths.append(plot(records, out_dir / f"{stem}.png"))
        except ImportError as exc:
            print(f"plot skipped ({exc}); later: python benchmarks/bench_layer.py --replot {json_path}")
    return paths


def table(records: Sequence[dict[str, Any]]) -> str:
    """One line per (model, T): both layer times, both finalize steps and shares, speed-up."""
    head = (
        f"{'model':<14} {'T':>5} {'basis':>5} | {'grouped_mm us':>13} {'finalize us':>11} {'share':>6} | "
        f"{'moe_finalize us':>15} {'finalize us':>11} {'share':>6} | {'speed-up':>8} {'eager x':>7} {'rel diff':>8}"
    )
    lines = [head, "-" * len(head)]
    for base, rec in _pairs(records):
        lines.append(
            f"{rec['model']:<14} {rec['T']:>5} {rec['time_basis']:>5} | {_layer_us(base):>13.1f} "
            f"{_finalize_us(base):>11.1f} {100 * base['finalize_share']:>5.1f}% | {_layer_us(rec):>15.1f} "
            f"{_finalize_us(rec):>11.1f} {100 * rec['finalize_share']:>5.1f}% | {rec['speedup']:>7.3f}x "
            f"{rec['speedup_event']:>6.3f}x {rec['rel_diff']:>8.1e}"
        )
    notes = {r["graph_note"] for r in records if r.get("graph_note")}
    lines += [f"note: CUDA graphs: {n}" for n in sorted(notes)]
    cut = {(r["model"], r["experts_used"], r["experts_real"], r["experts_note"]) for r in records if r["experts_note"]}
    lines += [f"note: {m} ran with {u} of its {e} experts ({why})" for m, u, e, why in sorted(cut)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if present, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--models", default=",".join(SPECS), help=f"comma list of {', '.join(SPECS)}")
    p.add_argument("--tokens", default=None, help=f"comma list of T (default {','.join(map(str, TOKENS))})")
    p.add_argument(
        "--experts", type=int, default=None, help="override the expert count (default: real, cut only to fit)"
    )
    p.add_argument("--quick", action="store_true", help="toy sizes, T in {1,16,128}, few iterations: a logic check")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph timing")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--replot", type=Path, default=None, help="only redraw the PNG of an existing JSON")
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in SPECS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(SPECS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        records = json.loads(args.replot.read_text())
        print(plot(records, args.replot.with_suffix(".png")))
        print(table(records))
        return 0

    import torch

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # run from a source checkout without installing
    from moe_finalize_plugin import transformers_experts

    transformers_experts.register()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(QUICK_TOKENS if args.quick else TOKENS)
    timer = Timer(
        device=device,
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 5),
        iters=args.iters if args.iters is not None else (3 if args.quick else 30),
        use_graphs=not args.no_graph,
    )
    meta = run_meta(device, args.dtype, args.quick)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    for name in args.models.split(","):
        spec = quick_spec(SPECS[name]) if args.quick else SPECS[name]
        if args.quick:
            experts, note = spec.experts, "--quick toy sizes"
        else:
            experts, note = resolve_experts(spec, device, dtype.itemsize, max(tokens), args.experts)
        t0 = time.perf_counter()
        records += bench_spec(spec, experts, note, tokens, timer, device, dtype, meta)
        print(f"{name}: {experts} experts, {time.perf_counter() - t0:.1f} s", flush=True)
    stem = f"layer_{card_slug(meta['card'])}"
    for path in write_outputs(records, args.out_dir, stem, make_plot=not args.no_plot):
        print(f"wrote {path}")
    print(f"total {time.perf_counter() - started:.1f} s on {meta['card']}\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
