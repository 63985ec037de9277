"""The CUDA backward kernels against the memory floor (issue 3: "a CUDA backward ... at the
same bandwidth standard").

Per shape (bf16, fp32 weights, a random permutation map) it times, on fresh random data
rotated past 3x L2 and under CUDA-graph replay (bench_finalize.graph_time_us):

* ``grad_input``   -- ``torch.ops.moe_finalize.finalize_grad_input`` (one write of every input
  row, ``grad_input[row] = scale * w[t, k] * grad_out[t]``: one scanning kernel at decode,
  else a zero-fill, a count and one writing kernel; finalize_backward_cuda.cu);
* ``grad_weights`` -- ``torch.ops.moe_finalize.finalize_grad_weights`` (one warp per slot:
  ``scale * <grad_out[t], input[row]>``);
* ``composite``    -- the same two gradients from PyTorch ops as the autograd of
  ``reference.finalize`` composes them (gather, multiply, index_add / sum), for scale;
* ``triton_scatter`` -- grad_input from the plain Triton design (triton_peer.py), valid only
  for a permutation map: it moves exactly grad_input's floor bytes and does nothing else;
* ``write_rate``   -- ``fill_`` of a [P, H] tensor, grad_input's writes alone: its
  "% floor" is the write rate against the copy rate (bytes = the tensor once).

The floor counts every tensor once at the device-to-device copy rate measured in the same
run: grad_input reads grad_out [T, H], the map and weights and writes [P, H];
grad_weights reads input [P, H] and grad_out [T, H] and writes [T, K]. Correctness first:
both gradients are compared with fp32 autograd of the reference on the first set.

    python benchmarks/bench_backward.py                       # writes backward_<card>.json
    python benchmarks/bench_backward.py --shape 1024,8,4096
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_finalize as bf  # noqa: E402  (shared timing, floor and rotation helpers)

SHAPES = ["16,8,4096", "128,8,4096", "1024,8,4096", "16384,8,4096", "16384,2,4096", "16384,8,7168"]


@dataclass
class BackwardSet:
    input: Tensor  # [P, H] bf16
    row_map: Tensor  # [T, K] int32
    weights: Tensor  # [T, K] fp32
    grad_out: Tensor  # [T, H] bf16


def make_set(T: int, K: int, H: int, device: torch.device, gen: torch.Generator) -> BackwardSet:
    return BackwardSet(
        input=torch.randn(T * K, H, generator=gen, device=device, dtype=torch.bfloat16),
        row_map=bf.make_row_map("random", bf.Shape(bf.CUSTOM, T, K, H), device, gen),
        weights=bf._router_weights(T, K, device, gen),
        grad_out=torch.randn(T, H, generator=gen, device=device, dtype=torch.bfloat16),
    )


def composite(s: BackwardSet) -> tuple[Tensor, Tensor]:
    """The gradients as PyTorch ops compose them (fp32 math, one output each)."""
    rows = s.row_map.long()
    g = s.grad_out.float()
    grad_input = torch.zeros(s.input.shape, dtype=torch.float32, device=s.input.device)
    grad_input.index_add_(0, rows.reshape(-1),
                          (s.weights.unsqueeze(-1) * g.unsqueeze(1)).reshape(-1, g.shape[1]))
    grad_weights = (s.input.float()[rows] * g.unsqueeze(1)).sum(-1)
    return grad_input.to(s.input.dtype), grad_weights


def check(s: BackwardSet, reference) -> float:
    """Largest relative error of ours against fp32 autograd of the reference."""
    x = s.input.float().requires_grad_()
    w = s.weights.clone().requires_grad_()
    reference.finalize(x, s.row_map, w).backward(s.grad_out.float())
    ops = torch.ops.moe_finalize
    gi = ops.finalize_grad_input(s.grad_out, s.input, s.row_map, s.weights, top_k=None, scale=1.0)
    gw = ops.finalize_grad_weights(s.grad_out, s.input, s.row_map, s.weights, top_k=None,
                                   scale=1.0)
    err = 0.0
    for got, want in ((gi.float(), x.grad), (gw.float(), w.grad)):
        assert not got.isnan().any(), "NaN in a gradient"
        err = max(err, ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item())
    return err


def floor_bytes(T: int, K: int, H: int) -> dict[str, int]:
    slots = T * K
    return {
        "grad_input": T * H * 2 + slots * 8 + slots * H * 2,
        "grad_weights": slots * H * 2 + T * H * 2 + slots * 8 + slots * 4,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", default=None, help="T,K,H (repeatable)")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--graph-windows", type=int, default=3)
    p.add_argument("--impls", default=None, help="regex: time only the implementations it matches")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_backward: needs a CUDA device (the kernels under test are CUDA-only)")
        return 1
    device = torch.device("cuda")
    mf, _ = bf._import_package()  # registers torch.ops.moe_finalize
    assert mf is not None and hasattr(torch.ops.moe_finalize, "finalize_grad_input"), \
        "moe_finalize_plugin with its CUDA kernels is required"
    reference = bf._import_reference()
    meta = bf.run_metadata(device, copy_mb=2048)
    copy_bw = bf.measure_copy_bw(device, 2048 << 20, 20)
    cfg = argparse.Namespace(calls_per_graph=20, graph_ms=20.0, graph_windows=args.graph_windows)
    ops = torch.ops.moe_finalize
    impls = {
        "grad_input": lambda s: ops.finalize_grad_input(s.grad_out, s.input, s.row_map,
                                                        s.weights, top_k=None, scale=1.0),
        "grad_weights": lambda s: ops.finalize_grad_weights(s.grad_out, s.input, s.row_map,
                                                            s.weights, top_k=None, scale=1.0),
        "composite": composite,
    }
    if bf.triton_peer.AVAILABLE:
        impls["triton_scatter"] = lambda s: bf.triton_peer.scatter_grad_input(
            s.grad_out, s.row_map, s.weights, s.input.shape[0])
    impls["write_rate"] = lambda s: s.input.fill_(0.5)  # last: it overwrites the sets' input
    if args.impls:
        impls = {name: call for name, call in impls.items() if re.search(args.impls, name)}
    gen = torch.Generator(device=device).manual_seed(0)
    free = torch.cuda.mem_get_info(device)[0]
    records = []
    for spec in args.shape or SHAPES:
        T, K, H = (int(v) for v in spec.split(","))
        first = make_set(T, K, H, device, gen)
        err = check(first, reference)
        set_bytes = sum(t.numel() * t.element_size() for t in vars(first).values())
        n = bf.rotation_sets(set_bytes, meta["l2_bytes"], 3.0, int(free * 0.2), 4096)
        sets = [first] + [make_set(T, K, H, device, gen) for _ in range(n - 1)]
        floors = floor_bytes(T, K, H)
        if "triton_scatter" in impls and "grad_input" in impls:  # same values as ours on a permutation map
            got = impls["triton_scatter"](first).float()
            want = impls["grad_input"](first).float()
            assert (got - want).abs().max() <= 1e-2 * want.abs().max(), "triton_scatter differs"
        for name, call in impls.items():
            us = bf.graph_time_us(bf.Impl(name, call), sets, device, cfg)
            nbytes = {"composite": floors["grad_input"] + floors["grad_weights"],
                      "triton_scatter": floors["grad_input"],
                      "write_rate": T * K * H * 2}.get(name) or floors[name]
            records.append({**meta, "impl": name, "T": T, "K": K, "H": H, "graph_us": us,
                            "floor_us": nbytes / copy_bw / 1e3, "bytes": nbytes,
                            "copy_bw_GBps": copy_bw, "rel_err": err, "n_sets": n})
        del sets, first
        torch.cuda.empty_cache()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"backward_{meta['card_slug']}.json"
    out.write_text(json.dumps(records, indent=1))
    print(f"{meta['card']}: CUDA-graph us per call; floor at {copy_bw:.0f} GB/s copy "
          f"(read+write); composite = both gradients")
    print(f"{'T':>6} {'K':>2} {'H':>5} {'impl':<13} {'floor us':>9} {'graph us':>9} "
          f"{'% floor':>8} {'rel err':>8}")
    for r in records:
        print(f"{r['T']:>6} {r['K']:>2} {r['H']:>5} {r['impl']:<13} {r['floor_us']:>9.2f} "
              f"{r['graph_us']:>9.2f} {100 * r['floor_us'] / r['graph_us']:>7.0f}% "
              f"{r['rel_err']:>8.1e}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
