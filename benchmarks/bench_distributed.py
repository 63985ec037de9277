"""Finalize + all-reduce on two GPUs of one host (issue 6): timings and a correctness check.

Per shape (K=8, bf16, H in {4096, 7168}, T in {1, 16, 128, 1024, 16384}) every rank
holds TP partial expert outputs ``[T*K, H]`` (a random expert-sorted row map, fp32
router weights, a residual) and these are measured:

* ``finalize``  -- ``moe_finalize_plugin.finalize`` alone (one rank's partial);
* ``nccl_ar``   -- NCCL ``all_reduce`` of a ``[T, H]`` tensor alone;
* ``one_shot``  -- ``torch.ops.symm_mem.one_shot_all_reduce_out`` of ``[T, H]`` alone;
* ``unfused``   -- ``distributed.finalize_all_reduce``: finalize, then NCCL all_reduce;
* ``fused``     -- ``distributed.FusedFinalizeAllReduce``: finalize straight into the
  symmetric buffer, then the one-shot all-reduce reading the peer over NVLink P2P.

``event_us``: CUDA events around ``n`` back-to-back calls after warm-up, input sets
rotated so the sets touched exceed 2x L2; ``graph_us``: the same calls captured in a
CUDA graph and replayed (GPU time without Python launch overhead, as engines run
decode). Each time is the maximum over ranks. ``ratio`` = fused / unfused; issue 6's
target is ratio <= 0.7 at T <= 128.

Correctness first, per shape: fused and unfused must be bitwise equal (two ranks:
both are ``cast(p0 + p1)``), and both within tests/test_distributed.py's tolerance of
the single-process finalize over the fp32 sum of every rank's partials.

NVLink multicast stays off: ``NCCL_NVLS_ENABLE=0`` and
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are set in this process and every rank.
Writes ``<out-dir>/distributed_<card-slug>.json`` (+ ``.png`` when matplotlib imports;
else ``--replot JSON`` later) and ``distributed_<card-slug>.txt`` (the table), then
prints the table last.

    python benchmarks/bench_distributed.py                           # spawns 2 ranks
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py      # same, via torchrun
    python benchmarks/bench_distributed.py --out-dir "$OUT/benchmarks/results"
    python benchmarks/bench_distributed.py --device cpu --quick --out-dir /tmp/bd  # logic check (gloo)
    python benchmarks/bench_distributed.py --replot benchmarks/results/distributed_<slug>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
os.environ.update(NO_MULTICAST_ENV)  # before torch / NCCL read them, in every process

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere; spawned ranks inherit it

import moe_finalize_plugin as mfp  # noqa: E402
from moe_finalize_plugin import distributed as mfd  # noqa: E402

METHODS = ("finalize", "nccl_ar", "one_shot", "unfused", "fused")
TARGET_RATIO = 0.7
TARGET_MAX_TOKENS = 128
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def card_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 16384])
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 7168])
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: gloo + wall clock, a logic check only (no fused path, no graphs)")
    p.add_argument("--quick", action="store_true", help="small shapes (logic check)")
    p.add_argument("--target-ms", type=float, default=25.0, help="timed span per measurement")
    p.add_argument("--max-sets", type=int, default=2048, help="cap on rotated input sets")
    p.add_argument("--graph-calls", type=int, default=256, help="cap on calls captured per graph")
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--replot", type=Path, default=None, help="only redraw the PNG of a JSON result")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden = [1, 16, 40], [256, 512]
    return args


# ----------------------------------------------------------------------------- timing


def _agree_max(value: float, device: torch.device) -> float:
    """The maximum of `value` over ranks (host sync: only between measurements)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


class _Span:
    """Times a span of enqueued work: CUDA events on GPU, wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __enter__(self) -> "_Span":
        if self.cuda:
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def time_eager(fn: Callable[[int], Any], n_sets: int, args: argparse.Namespace,
               device: torch.device) -> float:
    """Microseconds per call: warm-up, then `n` back-to-back calls on rotated sets."""
    for i in range(3):
        fn(i % n_sets)
    _sync(device)
    with _Span(device) as probe:
        for i in range(3):
            fn(i % n_sets)
    per_call = _agree_max(probe.ms / 3, device)
    n = int(min(max(args.target_ms / max(per_call, 1e-4), 5), 4 * args.max_sets))
    _sync(device)
    with _Span(device) as span:
        for i in range(n):
            fn(i % n_sets)
    return _agree_max(span.ms * 1e3 / n, device)


def time_graph(fn: Callable[[int], Any], n_sets: int, args: argparse.Namespace,
               device: torch.device, eager_us: float) -> float:
    """Microseconds per call under CUDA-graph replay: `m` calls per graph, rotated sets."""
    calls = max(1, min(n_sets, args.graph_calls))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on the capture stream (NCCL wants it)
        for i in range(3):
            fn(i % n_sets)
    torch.cuda.current_stream(device).wait_stream(side)
    _sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for i in range(calls):
            fn(i % n_sets)
    graph.replay()
    _sync(device)
    reps = int(min(max(args.target_ms * 1e3 / max(eager_us * calls, 1e-3), 3), 200))
    reps = int(_agree_max(reps, device))
    _sync(device)
    with _Span(device) as span:
        for _ in range(reps):
            graph.replay()
    us = _agree_max(span.ms * 1e3 / (reps * calls), device)
    del graph
    return us


# ----------------------------------------------------------------------------- one shape


def _set_count(set_bytes: int, l2_bytes: int, args: argparse.Namespace, device: torch.device) -> int:
    want = math.ceil(2 * l2_bytes / max(set_bytes, 1))
    budget = 8 << 30
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 4)
    return max(1, min(want, args.max_sets, budget // max(set_bytes, 1)))


def _rank_input(seed: int, rank: int, index: int, rows: int, hidden: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Rank `rank`'s input set `index`: any rank can regenerate any other rank's data."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank * 10_007 + index)
    return torch.randn(rows, hidden, generator=g, device=device, dtype=torch.float32).to(dtype)


def measure_shape(tokens: int, hidden: int, fused: mfd.FusedFinalizeAllReduce,
                  args: argparse.Namespace, device: torch.device, l2_bytes: int) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    k, dtype = args.top_k, DTYPES[args.dtype]
    seed = args.seed + tokens * 131 + hidden
    shared = torch.Generator(device=device).manual_seed(seed)  # same map/weights on every rank
    row_map = torch.randperm(tokens * k, generator=shared, device=device).view(tokens, k).int()
    weights = torch.rand(tokens, k, generator=shared, device=device)
    weights = weights / weights.sum(1, keepdim=True)
    residual = torch.randn(tokens, hidden, generator=shared, device=device).to(dtype)
    set_bytes = tokens * k * hidden * torch.finfo(dtype).bits // 8
    n_sets = _set_count(set_bytes, l2_bytes, args, device)
    inputs = [_rank_input(seed, rank, i, tokens * k, hidden, dtype, device) for i in range(n_sets)]

    row: dict[str, Any] = {"T": tokens, "H": hidden, "K": k, "dtype": args.dtype, "n_sets": n_sets,
                           "set_MB": set_bytes / 2**20}
    row["check"] = _check(inputs[0], row_map, weights, residual, fused, seed, world, device)

    out = torch.empty(tokens, hidden, dtype=dtype, device=device)
    part = torch.empty_like(out)
    ar_buf = torch.zeros_like(out)  # zeros: repeated sums stay finite
    methods: dict[str, Callable[[int], Any]] = {
        "finalize": lambda i: mfp.finalize(inputs[i], row_map, weights, residual=residual, out=part),
        "nccl_ar": lambda i: dist.all_reduce(ar_buf),
        "unfused": lambda i: mfd.finalize_all_reduce(inputs[i], row_map, weights, residual=residual, out=out),
        "fused": lambda i: fused(inputs[i], row_map, weights, residual=residual, out=out),
    }
    if fused.fused and fused.buffer is not None:
        symm = fused.buffer[:tokens]
        methods["one_shot"] = lambda i: torch.ops.symm_mem.one_shot_all_reduce_out(
            symm, "sum", fused.group_name, out)
    row["event_us"], row["graph_us"], row["errors"] = {}, {}, {}
    for name in METHODS:
        if name not in methods:
            continue
        try:
            row["event_us"][name] = time_eager(methods[name], n_sets, args, device)
            if device.type == "cuda" and not args.no_graph:
                row["graph_us"][name] = time_graph(methods[name], n_sets, args, device,
                                                   row["event_us"][name])
        except RuntimeError as exc:  # e.g. capture unsupported: keep the rest of the run
            row["errors"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    for mode in ("event_us", "graph_us"):
        times = row[mode]
        ratio = times["fused"] / times["unfused"] if "fused" in times and "unfused" in times else None
        row[mode.replace("_us", "_ratio")] = ratio
    row["target_applies"] = tokens <= TARGET_MAX_TOKENS
    row["fused_path"] = fused.last_fused
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _check(x: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor,
           fused: mfd.FusedFinalizeAllReduce, seed: int, world: int, device: torch.device) -> dict[str, Any]:
    """Fused vs unfused (bitwise with 2 ranks) and both vs the single-process finalize."""
    unfused = mfd.finalize_all_reduce(x, row_map, weights, residual=residual)
    got = fused(x, row_map, weights, residual=residual)
    peers = [_rank_input(seed, r, 0, x.shape[0], x.shape[1], x.dtype, device) for r in range(world)]
    total = torch.stack([p.float() for p in peers]).sum(0)
    ref = mfp.finalize(total, row_map, weights, residual=residual.float()).to(x.dtype)
    del total
    abs_total = torch.stack([p.float().abs() for p in peers]).sum(0)
    abs_sum = mfp.finalize(abs_total, row_map, weights.abs(), residual=residual.float().abs())
    del abs_total, peers
    k = row_map.shape[1]
    bound = ((world + 1) * UNIT_ROUNDOFF[x.dtype] + (2 * k + world) * 2.0**-24) * abs_sum

    def worst(y: torch.Tensor) -> float:
        return float(((y.float() - ref.float()).abs() / bound).max())

    result = {
        "fused_path": fused.last_fused,
        "bitwise_fused_eq_unfused": bool(torch.equal(unfused, got)),
        "unfused_err_over_tol": worst(unfused),
        "fused_err_over_tol": worst(got),
    }
    result["ok"] = (result["unfused_err_over_tol"] <= 1 and result["fused_err_over_tol"] <= 1
                    and (result["bitwise_fused_eq_unfused"] or world != 2))
    flags = torch.tensor([0.0 if result["ok"] else 1.0], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    result["ok_all_ranks"] = float(flags.item()) == 0.0
    return result


# ----------------------------------------------------------------------------- ranks


def run_rank(rank: int, world: int, args: argparse.Namespace, init_method: str) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world,
                                device_id=device)
        props = torch.cuda.get_device_properties(device)
        card, l2_bytes = props.name, props.L2_cache_size
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        card, l2_bytes = platform.processor() or "cpu", 32 << 20
    meta: dict[str, Any] = {
        "card": card, "world_size": world, "device": args.device,
        "torch": torch.__version__, "python": platform.python_version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None,
        "env": {k: os.environ.get(k) for k in NO_MULTICAST_ENV},
        "K": args.top_k, "dtype": args.dtype, "l2_bytes": l2_bytes,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "binary_rev": mfp.build_info()["source_rev"],  # the commit the binary was built from
    }
    rows, fused_info = [], {}
    for hidden in args.hidden:
        t0 = time.perf_counter()
        fused = mfd.FusedFinalizeAllReduce(hidden, DTYPES[args.dtype], max_tokens=max(args.tokens),
                                           device=device)
        fused_info[str(hidden)] = {"armed": fused.fused, "reason": fused.reason,
                                   "init_ms": (time.perf_counter() - t0) * 1e3}
        if fused.fused and "symm_mem_backend" not in meta:
            import torch.distributed._symmetric_memory as symm_mem

            meta["symm_mem_backend"] = symm_mem.get_backend(device)
        for tokens in args.tokens:
            rows.append(measure_shape(tokens, hidden, fused, args, device, l2_bytes))
            if rank == 0:
                print(f"done H={hidden} T={tokens}", flush=True)
        del fused
    meta["fused"] = fused_info
    if rank == 0:
        slug = card_slug(card) if args.device == "cuda" else "cpu"
        write_results({"meta": meta, "rows": rows}, args.out_dir / f"distributed_{slug}.json")
    dist.barrier()
    dist.destroy_process_group()


def _spawned(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    run_rank(rank, world, args, f"tcp://127.0.0.1:{port}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str = "8.1f") -> str:
    return format(x, spec) if x is not None else " " * (int(spec.split(".")[0]) - 3) + "n/a"


def table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    clock = "CUDA events" if meta["device"] == "cuda" else "wall clock (gloo on CPU: a logic check)"
    lines = [
        f"finalize + all-reduce, {meta['world_size']} x {meta['card']}, {meta['dtype']}, "
        f"K={meta['K']}, torch {meta['torch']}, NCCL {meta['nccl']}; us per call, max over ranks",
        f"event = {clock} around back-to-back eager calls; graph = CUDA-graph replay; "
        f"ratio = fused/unfused (target <= {TARGET_RATIO} at T <= {TARGET_MAX_TOKENS})",
        f"{'H':>5} {'T':>6} | {'finalize':>8} {'nccl_ar':>8} {'one_shot':>8} | {'unfused':>8} "
        f"{'fused':>8} {'ratio':>5} | {'g:unfus':>8} {'g:fused':>8} {'ratio':>5} | target check",
    ]
    for r in result["rows"]:
        ev, gr = r["event_us"], r["graph_us"]
        if not r["target_applies"]:
            target = "  -   "
        elif not r["fused_path"]:
            target = "unarmd"
        else:
            ratios = [x for x in (r["event_ratio"], r["graph_ratio"]) if x is not None]
            target = "met   " if ratios and all(x <= TARGET_RATIO for x in ratios) else (
                "graph " if r["graph_ratio"] is not None and r["graph_ratio"] <= TARGET_RATIO else "MISSED")
        check = "ok" if r["check"]["ok_all_ranks"] else "FAIL"
        lines.append(
            f"{r['H']:>5} {r['T']:>6} | {_fmt(ev.get('finalize'))} {_fmt(ev.get('nccl_ar'))} "
            f"{_fmt(ev.get('one_shot'))} | {_fmt(ev.get('unfused'))} {_fmt(ev.get('fused'))} "
            f"{_fmt(r['event_ratio'], '5.2f')} | {_fmt(gr.get('unfused'))} {_fmt(gr.get('fused'))} "
            f"{_fmt(r['graph_ratio'], '5.2f')} | {target} {check}"
        )
    for hidden, info in meta["fused"].items():
        if not info["armed"]:
            lines.append(f"H={hidden}: fused path not armed ({info['reason']}); 'fused' = fallback")
    errors = [f"H={r['H']} T={r['T']} {m}: {e}" for r in result["rows"] for m, e in r["errors"].items()]
    lines += errors
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Times vs T per hidden size (event solid, graph dashed) and the fused/unfused ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows, meta = result["rows"], result["meta"]
    hiddens = sorted({r["H"] for r in rows})
    colors = {"finalize": "tab:gray", "nccl_ar": "tab:blue", "one_shot": "tab:cyan",
              "unfused": "tab:orange", "fused": "tab:red"}
    fig, axes = plt.subplots(1, len(hiddens) + 1, figsize=(5.2 * (len(hiddens) + 1), 4.6))
    for ax, hidden in zip(axes, hiddens):
        sub = sorted((r for r in rows if r["H"] == hidden), key=lambda r: r["T"])
        for method, color in colors.items():
            for mode, style in (("event_us", "-"), ("graph_us", "--")):
                pts = [(r["T"], r[mode][method]) for r in sub if method in r[mode]]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=color,
                            label=f"{method} ({mode.split('_')[0]})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("us per call (max over ranks)")
        ax.set_title(f"H={hidden}, K={meta['K']}, {meta['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    ax = axes[-1]
    for hidden, marker in zip(hiddens, "os^v"):
        sub = sorted((r for r in rows if r["H"] == hidden), key=lambda r: r["T"])
        for mode, style in (("event_ratio", "-"), ("graph_ratio", "--")):
            pts = [(r["T"], r[mode]) for r in sub if r[mode] is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, label=f"H={hidden} ({mode.split('_')[0]})")
    ax.axhline(TARGET_RATIO, color="black", linestyle=":", label=f"target {TARGET_RATIO}")
    ax.axvline(TARGET_MAX_TOKENS, color="gray", linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("fused / unfused time")
    unarmed = [h for h, info in meta["fused"].items() if not info["armed"]]
    ax.set_title("fused finalize + one-shot vs finalize + NCCL"
                 + (f"\n(fused NOT armed for H={','.join(unarmed)}: fallback)" if unarmed else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"MoE finalize + all-reduce, {meta['world_size']} x {meta['card']} "
                 f"(torch {meta['torch']}, NCCL {meta['nccl']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(result: dict[str, Any], json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    json_path.with_suffix(".txt").write_text(table(result) + "\n")
    png = plot(result, json_path.with_suffix(".png"))
    print(f"wrote {json_path}" + (f", {png}" if png else " (no matplotlib: --replot it later)"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        print(plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
              or "matplotlib is not importable")
        return 0
    slug = None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        run_rank(rank, world, args, "env://")
        if rank != 0:
            return 0
    else:
        world = args.world_size
        if args.device == "cuda" and torch.cuda.device_count() < world:
            print(f"need {world} CUDA devices, found {torch.cuda.device_count()}", file=sys.stderr)
            return 2
        mp.start_processes(_spawned, args=(world, args, _free_port()), nprocs=world,
                           join=True, start_method="spawn")
    if args.device == "cuda":
        slug = card_slug(torch.cuda.get_device_name(0))
    result = json.loads((args.out_dir / f"distributed_{slug or 'cpu'}.json").read_text())
    print(table(result))  # last
    return 0 if all(r["check"]["ok_all_ranks"] for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
