"""Plot bench_finalize.py results: achieved bandwidth per implementation.

Left panel: the K=8, H=4096 batch sweep, achieved GB/s vs T (log x), one line per
implementation. Right panel: the model shapes (DeepSeek-V3, Mixtral, gpt-oss,
Qwen3-30B-A3B at each T), grouped bars per implementation. The measured copy
bandwidth (the floor) is the dashed line in both. Bandwidth = bytes moved / time,
using CUDA-graph time where measured, else event time.

    python benchmarks/plot_results.py benchmarks/results/nvidia-h100-80gb-hbm3.json
    python benchmarks/plot_results.py --markdown benchmarks/results/nvidia-h100-80gb-hbm3.json

``--markdown`` prints the README's result tables instead (bf16, FP8 input, FP8 output).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

SWEEP = "sweep"
# Fixed colours so the same impl looks the same on every card's plot.
COLORS = {
    "ours_pdl": "tab:red", "ours": "tab:red", "ours_nopdl": "tab:orange", "triton": "tab:blue",
    "compile": "tab:green", "eager": "tab:gray", "ours_fp8": "tab:purple", "triton_fp8": "tab:cyan",
    "ours_fp8_out": "tab:brown",
}


def _time(rec: dict[str, Any]) -> float | None:
    return rec.get("graph_us") if rec.get("graph_us") is not None else rec.get("event_us")


def _gbps(rec: dict[str, Any]) -> float | None:
    t = _time(rec)
    return rec["bytes"] / (t * 1e3) if t and rec.get("bytes") else None


def plot(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write the two-panel PNG for ``records`` (bench_finalize.py's JSON) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kern = [r for r in records if r.get("kind") == "kernel" and _gbps(r) is not None]
    meta = records[0] if records else {}
    impls = list(dict.fromkeys(r["impl"] for r in kern))
    basis = "CUDA-graph" if any(r.get("graph_us") is not None for r in kern) else "event"
    fig, (ax_sweep, ax_models) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.4]})

    sweep = [r for r in kern if r.get("model") == SWEEP]
    for impl in impls:
        pts = sorted((r["T"], _gbps(r)) for r in sweep if r["impl"] == impl)
        if pts:
            ax_sweep.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl,
                          color=COLORS.get(impl))
    ax_sweep.set_xscale("log", base=2)
    sweep_t = sorted({r["T"] for r in sweep})
    if sweep_t:
        ax_sweep.set_xticks(sweep_t, [str(t) for t in sweep_t])
        ax_sweep.tick_params(axis="x", labelsize=8, labelrotation=45)
    ax_sweep.set_xlabel("tokens T")
    ax_sweep.set_ylabel(f"achieved GB/s ({basis} time)")
    kh = sorted({(r["K"], r["H"]) for r in sweep})
    ax_sweep.set_title("batch sweep " + ", ".join(f"K={k} H={h}" for k, h in kh))

    models = [r for r in kern if r.get("model") != SWEEP]
    labels = list(dict.fromkeys(r["shape"] for r in models))
    model_impls = [i for i in impls if any(r["impl"] == i for r in models)]
    width = 0.8 / max(len(model_impls), 1)
    for j, impl in enumerate(model_impls):
        by_label = {r["shape"]: _gbps(r) for r in models if r["impl"] == impl}
        xs = [i + (j - (len(model_impls) - 1) / 2) * width for i in range(len(labels))]
        ax_models.bar(xs, [by_label.get(lbl) or 0.0 for lbl in labels], width, label=impl,
                      color=COLORS.get(impl))
    ax_models.set_xticks(range(len(labels)))
    ax_models.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax_models.set_ylabel(f"achieved GB/s ({basis} time)")
    ax_models.set_title("model shapes")

    bw = meta.get("copy_bw_GBps")
    top = 1.2 * max([bw or 0.0] + [_gbps(r) for r in kern])  # headroom for the legends
    for ax in (ax_sweep, ax_models):
        if bw:
            ax.axhline(bw, color="black", linestyle="--", linewidth=1, label=f"copy {bw:.0f} GB/s")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(0, top or None)
    ax_sweep.legend(fontsize=8, loc="upper left", ncol=2)
    if models:
        ax_models.legend(fontsize=8, loc="upper left", ncol=3)
    fig.suptitle(f"MoE finalize on {meta.get('card', '?')} (torch {meta.get('torch', '?')}, "
                 f"dtype {kern[0]['dtype'] if kern else '?'})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(rec: dict[str, Any]) -> str:
    return "K=8 H=4096" if rec["model"] == SWEEP else rec["model"]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_tables(records: Sequence[dict[str, Any]]) -> str:
    """The README tables: one row per shape, CUDA-graph µs per implementation."""
    kernel = [r for r in records if r.get("kind") == "kernel"]
    by_shape: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in kernel:
        by_shape.setdefault((r["dtype"], r["out_dtype"], r["model"] != SWEEP, r["model"], r["T"]),
                            {})[r["impl"]] = r
    lines: list[str] = []

    def table(dtype: str, out_dtype: str, impls: list[str], ours: str, peer: str | None) -> None:
        keys = sorted(k for k in by_shape if k[0] == dtype and k[1] == out_dtype
                      and ours in by_shape[k])
        if not keys:  # e.g. an --only-fp8 run has no bf16 rows
            return
        head = ["shape", "T", "floor µs", *impls, "ours % of floor"]
        if peer:
            head += [f"{peer} % of floor", f"ours / {peer}", "target"]
        lines.extend(["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)])
        for key in keys:
            row = by_shape[key]
            mine = row[ours]
            cells = [_label(mine), str(mine["T"]), _fmt(mine["floor_us"])]
            for impl in impls:
                t = _time(row[impl]) if impl in row else None
                cells.append(f"**{_fmt(t)}**" if impl == ours else _fmt(t))
            cells.append(_fmt(100 * mine["floor_us"] / _time(mine), 0) + "%" if _time(mine) else "-")
            if peer:
                other = row.get(peer)
                cells.append(_fmt(100 * other["floor_us"] / _time(other), 0) + "%"
                             if other and _time(other) else "-")
                cells.append(_fmt(mine.get("ratio_to_triton")))
                cells.append(f"<= {mine['target_ratio']}" if mine.get("target_ratio") else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    table("bfloat16", "bfloat16", ["triton", "ours_pdl", "ours_nopdl", "compile", "eager"],
          "ours_pdl", "triton")
    table("float8_e4m3fn", "bfloat16", ["triton_fp8", "ours_fp8"], "ours_fp8", "triton_fp8")
    table("float8_e4m3fn", "float8_e4m3fn", ["ours_fp8_out"], "ours_fp8_out", None)
    host = [r for r in records if r.get("kind") == "host"]
    if host:
        lines.append("host overhead at T=1 (µs, median): " + ", ".join(
            f"{r['impl']} {_fmt(r['host_us'], 1)}" for r in host))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot bench_finalize.py JSON results.")
    p.add_argument("json", type=Path)
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: beside the JSON)")
    p.add_argument("--markdown", action="store_true", help="print the README tables, no plot")
    args = p.parse_args(argv)
    records = json.loads(args.json.read_text())
    if args.markdown:
        print(markdown_tables(records))
        return 0
    out = plot(records, args.output or args.json.with_suffix(".png"))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
