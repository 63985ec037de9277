"""Lower bound of finalize's dependent chain at decode sizes, timed the way the benchmark times.

Whatever its code, a finalize kernel waits for its upstream grid (PDL), reads an index, reads
the row that index names, writes, and then its grid must end before the next kernel's wait
returns. tools/chain_probe.cu holds kernels that do growing prefixes of that chain and nothing
else. This script times them with benchmarks/bench_finalize.py's CUDA-graph harness (graph
replay, input sets rotated past --l2-factor x L2, the bench's own bf16 sets) next to ours and
the plain Triton peer, same shapes and sets, one process. gather1 is the whole chain with one
row per token; where gather1 plus the rows' bytes at the copy rate is above a time target on a
card, no kernel of this form meets that target there.

  empty          wait; one block of 32 threads writes one int
  store          wait; every thread stores 16 constant bytes (no loads)
  copy           wait; each thread copies its 16 bytes of input row t*K (no index read)
  gather1        wait; read map[t, 0], then 16 bytes of that row; store

With --fp8 the sets are the bench's FP8 sets and the probes (after empty) are complete FP8
finalizes with nothing general in them (contiguous tensors, K in {1, 2, 4, 8}, one thread per 8
columns as ours below T=256), checked against the reference, next to ours and the Triton FP8
peer: their time bounds what ours' generality costs at decode.

  fp8_direct     every thread reads the K map entries and weights (the Triton peer's scheme)
  fp8_shuffle    lane k reads slot k, shuffles hand the slots out (ours' scheme)
  *_pf           lanes < K prefetch their slot into L2 before the wait (ours at K >= 4)

Threads per block follow ours (csrc/cuda_common.cuh pick_threads) unless --threads is given.

Build (nvcc 12+, and a driver for that CUDA version: the runtime is linked in statically;
*.so is git-ignored, carry it to the GPU machine):
  nvcc -O3 -std=c++17 -arch=sm_90a -shared -Xcompiler -fPIC -cudart static \\
       -o tools/chain_probe.so tools/chain_probe.cu
Run from the repo root (CHAIN_PROBE_SO overrides the .so path):
  PYTHONPATH=$PWD python3 tools/chain_probe.py --out "$OUT/chain_probe.json"
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # as bench_finalize imports its siblings
bf = importlib.import_module("bench_finalize")

PROBES = (  # (row name, launcher in the .so, pdl)
    ("empty", "probe_empty", True),
    ("store", "probe_store", True),
    ("copy", "probe_copy", True),
    ("gather1", "probe_gather1", True),
)
PROBES_FP8 = (  # --fp8: complete FP8 finalizes of the bench's FP8 sets, nothing general
    ("fp8_direct", "probe_fp8_direct", True),
    ("fp8_direct_pf", "probe_fp8_direct_prefetch", True),
    ("fp8_shuffle", "probe_fp8_shuffle", True),
    ("fp8_shuffle_pf", "probe_fp8_shuffle_prefetch", True),
)
PEERS = ("ours_pdl", "ours_nopdl", "ours", "triton")  # bf.bf16_impls names ("ours": no set_pdl)
PEERS_FP8 = ("ours_fp8", "triton_fp8")  # bf.fp8_impls names
STORE_VALUE = 1.0  # what probe_store writes (bf16 0x3F80)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def project_threads(T: int, H: int, sm_count: int) -> int:
    """Block size ours picks for bf16 rows of H (pick_threads in csrc/cuda_common.cuh)."""
    units = H // 8
    threads = min(max(cdiv(T * units, 2 * sm_count), 32), 128, cdiv(units, 32) * 32)
    blocks = max(1, cdiv(units, cdiv(threads, 32) * 32))
    return max(32, cdiv(cdiv(units, blocks), 32) * 32)


def load_lib(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for _, fn, _ in PROBES:  # (input, map, out, T, K, H, threads, pdl, stream)
        getattr(lib, fn).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
        getattr(lib, fn).restype = ctypes.c_int
    for _, fn, _ in PROBES_FP8:  # (input, scales, map, weights, out, T, K, H, P, threads, pdl, stream)
        getattr(lib, fn).argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6 + [ctypes.c_void_p]
        getattr(lib, fn).restype = ctypes.c_int
    return lib


def probe_impl(lib: ctypes.CDLL, name: str, fn_name: str, pdl: bool, shape: bf.Shape,
               threads: int, scratch: torch.Tensor) -> bf.Impl:
    """A bench Impl launching one probe on the current stream (so graph capture records it)."""
    fn = getattr(lib, fn_name)

    def call(s: bf.InputSet) -> torch.Tensor:
        out = scratch if name == "empty" else s.out
        if name.startswith("fp8_"):
            rc = fn(s.input.data_ptr(), s.scales.data_ptr(), s.row_map.data_ptr(),
                    s.weights.data_ptr(), out.data_ptr(), shape.T, shape.K, shape.H,
                    s.input.shape[0], threads, int(pdl), torch.cuda.current_stream().cuda_stream)
            if rc != 0:
                raise RuntimeError(f"{name}: launch failed, cudaError {rc}")
            return out
        rc = fn(s.input.data_ptr(), s.row_map.data_ptr(), out.data_ptr(),
                shape.T, shape.K, shape.H, threads, int(pdl), torch.cuda.current_stream().cuda_stream)
        if rc != 0:
            raise RuntimeError(f"{name}: launch failed, cudaError {rc}")
        return out
    return bf.Impl(name, call, pdl=pdl)


def check_probe(impl: bf.Impl, s: bf.InputSet, shape: bf.Shape, scratch: torch.Tensor,
                variant: bf.Variant, reference: Any) -> None:
    """Run once into a NaN-poisoned out; raise unless it wrote what its probe must."""
    s.out.fill_(float("nan"))
    scratch.zero_()
    got = impl.call(s)
    bf.sync(s.out.device)
    rows, T, K = s.row_map.long(), shape.T, shape.K
    name = impl.name
    if name.startswith("fp8_"):  # a full finalize: against the fp32 reference
        want = variant.reference(reference, s)
        err = ((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
        if not err < 1e-2:  # also catches NaN (unwritten elements)
            raise SystemExit(f"chain_probe: {name} T={T}: relative error {err:.3e}")
        return
    if name == "empty":
        if got[0].item() != T:
            raise SystemExit(f"chain_probe: empty wrote {got[0].item()}, want {T}")
        return
    want = {"store": torch.full_like(s.out, STORE_VALUE), "copy": s.input[::K],
            "gather1": s.input[rows[:, 0]]}[name]
    if not torch.equal(got, want):
        bad = (got != want).any(dim=1).nonzero().flatten().tolist()
        raise SystemExit(f"chain_probe: {impl.name} T={T}: wrong output rows {bad[:8]}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=lambda v: [int(t) for t in v.split(",")], default="1,4,16,128",
                   help="comma-separated T values")
    p.add_argument("--K", type=int, default=8, help="top-k")
    p.add_argument("--H", type=int, default=4096, help="hidden size, a multiple of 8")
    p.add_argument("--threads", type=int, default=0, help="probe block size (0: as ours picks)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (%(default)s: benchmarks/results/chain_probe_<card-slug>.json)")
    p.add_argument("--graph-windows", type=int, default=5, help="timed replay windows (median)")
    p.add_argument("--calls-per-graph", type=int, default=20)
    p.add_argument("--graph-ms", type=float, default=20.0, help="length of one replay window")
    p.add_argument("--l2-factor", type=float, default=3.0, help="rotate sets totalling this many x L2")
    p.add_argument("--mem-fraction", type=float, default=0.25, help="of free GPU memory for sets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp8", action="store_true",
                   help="FP8 sets (e4m3 rows, 128-column block scales): the FP8 probes, ours "
                        "and the Triton FP8 peer")
    p.add_argument("--ncu", action="store_true",
                   help="launch each probe and peer once per T on one fresh set, no timing (run "
                        "under Nsight Compute: ncu -k regex:'kernel|finalize' python ...)")
    cfg = p.parse_args(argv)
    if cfg.K < 1 or cfg.H < 8 or cfg.H % 8 or cfg.threads % 32 or min(cfg.tokens) < 1:
        p.error("need K >= 1, H a multiple of 8, T >= 1, threads a multiple of 32")
    return cfg


def print_table(records: list[dict[str, Any]], cfg: argparse.Namespace, meta: dict[str, Any]) -> None:
    print(f"\nCUDA-graph GPU us per call, K={cfg.K} H={cfg.H}, {cfg.calls_per_graph} calls per "
          f"graph, on {meta['card']} (torch {meta['torch']}, triton {meta['triton']})")
    head = f"{'probe':<15}" + "".join(f"{'T=' + str(t):>9}" for t in cfg.tokens)
    print(head + "\n" + "-" * len(head))
    times = {(r["probe"], r["T"]): r["graph_us"] for r in records}
    for name in dict.fromkeys(r["probe"] for r in records):
        print(f"{name:<15}" + "".join(f"{times[name, t]:9.2f}" if (name, t) in times else f"{'-':>9}"
                                      for t in cfg.tokens))


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("chain_probe: needs a CUDA device")
    lib = load_lib(Path(os.environ.get("CHAIN_PROBE_SO", REPO / "tools" / "chain_probe.so")))
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    mf, why = bf._import_package()
    reference = bf._import_reference()
    meta = bf.run_metadata(device, copy_mb=0)
    if cfg.fp8:
        peers = [i for i in bf.fp8_impls(mf, device) if i.name in PEERS_FP8]
        variant = bf.Variant("fp8", torch.float8_e4m3fn, torch.bfloat16, fp8=True)
        probe_table = PROBES[:1] + PROBES_FP8  # the bf16 probes read 16-byte bf16 vectors
    else:
        peers = [i for i in bf.bf16_impls(mf, reference, device) if i.name in PEERS]
        variant = bf.Variant("bfloat16", torch.bfloat16, torch.bfloat16)
        probe_table = PROBES
    print(f"card: {meta['card']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"L2 {meta['l2_bytes']} B | ours: {'binary ' + str(meta['binary_rev']) if mf else why}",
          flush=True)
    scratch = torch.zeros(4, dtype=torch.int32, device=device)
    records: list[dict[str, Any]] = []
    for T in cfg.tokens:
        shape = bf.Shape(bf.SWEEP, T, cfg.K, cfg.H)
        sample = variant.make_set(shape, device, gen)  # sets as bench_shape builds them
        threads = cfg.threads or project_threads(T, cfg.H, meta["sm_count"])
        probes = [probe_impl(lib, *p, shape, threads, scratch) for p in probe_table]
        if cfg.ncu:
            for impl in probes + peers:
                with impl.active():
                    impl.call(sample)
            torch.cuda.synchronize(device)
            continue
        budget = int(torch.cuda.mem_get_info(device)[0] * cfg.mem_fraction)
        n_sets = bf.rotation_sets(sample.nbytes(), meta["l2_bytes"], cfg.l2_factor, budget, 4096)
        sets = [sample] + [variant.make_set(shape, device, gen) for _ in range(n_sets - 1)]
        probe_names = {p.name for p in probes}
        for impl in probes:
            check_probe(impl, sets[0], shape, scratch, variant, reference)
        for impl in peers:
            with impl.active():
                ok, rel, _ = bf.check_correct(impl, variant, shape, reference, device, gen, 1e-2)
            if not ok:
                raise SystemExit(f"chain_probe: {impl.name} T={T} wrong, rel_err {rel:.2e}")
        for impl in probes + peers:
            with impl.active():
                us = bf.graph_time_us(impl, sets, device, cfg)
            print(f"  T={T:<5} {impl.name:<14} {us:8.2f} us  ({n_sets} sets)", flush=True)
            records.append({"probe": impl.name, "variant": variant.name, "T": T, "K": cfg.K,
                            "H": cfg.H, "graph_us": us,
                            "pdl": impl.pdl, "sets": n_sets, "card": meta["card"],
                            "torch": meta["torch"], "binary_rev": meta["binary_rev"],
                            "threads": threads if impl.name in probe_names else None})
        del sets, sample
        torch.cuda.empty_cache()
    if cfg.ncu:
        return 0
    stem = "chain_probe_fp8" if cfg.fp8 else "chain_probe"
    out = cfg.out or REPO / "benchmarks" / "results" / f"{stem}_{meta['card_slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print_table(records, cfg, meta)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
