"""CPU finalize benchmark: ours vs the eager reference vs torch.compile of it, against the
memory floor (bytes moved / measured copy bandwidth) on this machine's cores.

    python benchmarks/bench_cpu.py [--tokens 256 1024 4096] [--out benchmarks/results/cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import moe_finalize_plugin as mf
from moe_finalize_plugin import reference


def median_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def problem(num_tokens: int, k: int, h: int):
    """Random expert rows, a random permutation map, router weights and an output buffer."""
    return (torch.randn(num_tokens * k, h).to(torch.bfloat16),
            torch.randperm(num_tokens * k).to(torch.int32).view(num_tokens, k),
            torch.rand(num_tokens, k), torch.empty(num_tokens, h, dtype=torch.bfloat16))


def rotating(sets, fn):
    """A no-argument callable that applies fn to the next set on each call."""
    state = {"i": 0}

    def call():
        state["i"] += 1
        return fn(sets[state["i"] % len(sets)])
    return call


def copy_bandwidth_gbps() -> float:
    src = torch.randn(128 * 2**20 // 4)  # 128 MiB: far past the caches
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 15)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file for the records")
    args = parser.parse_args()

    bw = copy_bandwidth_gbps()
    compiled = None if args.skip_compile else torch.compile(reference.finalize, dynamic=False)
    records = []
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, copy {bw:.1f} GB/s (read+write)")
    print(f"{'T':>6} {'floor ms':>9} {'ours ms':>9} {'eager ms':>9} {'compile ms':>11} "
          f"{'ours/floor':>11} {'eager/ours':>11}")
    for num_tokens in args.tokens:
        k, h = args.top_k, args.hidden
        # Enough input sets to exceed the last-level cache, used in rotation: every call reads
        # its rows from DRAM, as in a real layer.
        set_bytes = num_tokens * k * h * 2
        sets = [problem(num_tokens, k, h) for _ in range(max(2, -(-256 * 2**20 // set_bytes)))]
        moved = set_bytes + num_tokens * k * 8 + num_tokens * h * 2
        floor = moved / (bw * 1e9) * 1e3
        ours = median_ms(rotating(sets, lambda s: mf.finalize(*s[:3], out=s[3])), args.repeats)
        slow = max(3, args.repeats // 5)
        eager = median_ms(rotating(sets, lambda s: reference.finalize(*s[:3])), slow)
        comp = (median_ms(rotating(sets, lambda s: compiled(*s[:3])), slow)
                if compiled else float("nan"))
        records.append(dict(T=num_tokens, K=k, H=h, floor_ms=floor, ours_ms=ours, eager_ms=eager,
                            compile_ms=comp, copy_GBps=bw, threads=torch.get_num_threads(),
                            torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                            cores=os.cpu_count()))
        print(f"{num_tokens:>6} {floor:>9.3f} {ours:>9.3f} {eager:>9.2f} {comp:>11.2f} "
              f"{ours / floor:>10.2f}x {eager / ours:>10.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
