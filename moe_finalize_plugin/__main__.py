"""`moe-finalize` / `python -m moe_finalize_plugin`: what this build holds, a correctness check
against the reference on every available device, and a small benchmark against eager PyTorch."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from . import build_info, finalize, reference

CHECK_SHAPES = [(1, 8, 4096), (7, 2, 13), (64, 8, 2880), (5, 65, 264)]  # (T, K, H)
BENCH_SHAPES = [(1, 8, 4096), (16, 8, 4096), (256, 8, 4096), (1024, 8, 2048)]


def progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<28}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available() and "cuda" in build_info()["kernels"]:
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found


def random_problem(device: str, num_tokens: int, top_k: int, hidden: int, dtype=torch.bfloat16):
    slots = num_tokens * top_k
    input = torch.randn(slots, hidden, device=device).to(dtype)
    row_map = torch.randperm(slots, device=device).to(torch.int32).view(num_tokens, top_k)
    row_map[torch.rand(num_tokens, top_k, device=device) < 0.1] = -1
    weights = torch.rand(num_tokens, top_k, device=device)
    residual = torch.randn(num_tokens, hidden, device=device).to(dtype)
    return input, row_map, weights, residual


def check(device: str) -> list[str]:
    failures = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for num_tokens, top_k, hidden in CHECK_SHAPES:
            input, row_map, weights, residual = random_problem(device, num_tokens, top_k, hidden, dtype)
            out = torch.full((num_tokens, hidden), float("nan"), device=device, dtype=dtype)
            finalize(input, row_map, weights, residual=residual, scale=2.5, out=out)
            ref = reference.finalize(input, row_map, weights, residual=residual, scale=2.5)
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
            if out.isnan().any() or not torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol):
                failures.append(f"{device} {dtype} T={num_tokens} K={top_k} H={hidden}")
    return failures


def time_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-finalize", description=__doc__)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--no-bench", action="store_true", help="only report and check")
    args = parser.parse_args(argv)

    info = build_info()
    print(f"moe_finalize_plugin: kernels={'+'.join(info['kernels'])}, built from "
          f"{info['source_rev']}, {info['abi']}")
    print(f"torch {torch.__version__}; devices: {', '.join(devices())}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")

    failures = []
    for i, device in enumerate(devices(), 1):
        failures += check(device)
        progress(i, len(devices()), f"checked {device}")
    print("check vs reference:", "OK" if not failures else "FAILED: " + "; ".join(failures))

    if not args.no_bench:
        rows = []
        jobs = [(d, s) for d in devices() for s in BENCH_SHAPES]
        for i, (device, (num_tokens, top_k, hidden)) in enumerate(jobs, 1):
            input, row_map, weights, residual = random_problem(device, num_tokens, top_k, hidden)
            ours = time_ms(lambda: finalize(input, row_map, weights, residual=residual), device,
                           args.repeats)
            eager = time_ms(lambda: reference.finalize(input, row_map, weights, residual=residual),
                            device, max(2, args.repeats // 3))
            rows.append((device, num_tokens, top_k, hidden, ours, eager))
            progress(i, len(jobs), f"bench {device} T={num_tokens}")
        print(f"\n{'device':<8} {'T':>6} {'K':>3} {'H':>6} {'ours ms':>10} {'eager ms':>10} {'speed-up':>9}")
        for device, num_tokens, top_k, hidden, ours, eager in rows:
            print(f"{device:<8} {num_tokens:>6} {top_k:>3} {hidden:>6} {ours:>10.3f} {eager:>10.3f} "
                  f"{eager / ours:>8.1f}x")
        print("(wall-clock medians including launch overhead; benchmarks/bench_finalize.py has the "
              "GPU roofline numbers)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
