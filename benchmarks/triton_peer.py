"""Plain Triton finalize kernels: the in-run peers of the benchmark (issue 3, issue 7).

Deliberately the straightforward design, as issue 3 specifies it: one program per
(token, 1024-column block), ``num_warps=4``, ``tl.static_range`` over k, fp32
accumulation, gather through ``row_map`` and multiply by the router weight. Negative
map entries are skipped (their row is never read), as the op contract requires.
No autotuning and no launch-shape tricks: its time is the yardstick that carries
across cards (``ratio_to_triton``).

``finalize_fp8`` is the same kernel dequantising e4m3 rows on load with one fp32
scale per 128-column block (``scales[P, ceil(H/128)]``, any strides), issue 7's layout.

``scatter_grad_input`` is the backward's grad_input in the same plain design (one program per
(token, 1024-column block) reads grad_out[t] once and stores K scaled rows), for a map that
is a permutation: no zeros for rows nothing points at and no sums for shared rows, so it moves
exactly the floor's bytes and bounds what a token-major scatter reaches (bench_backward.py).

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` set before import it also runs on
CPU tensors (slowly; the smoke test uses that to check it against the reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only environments without Triton: the benchmark skips this peer
    triton = None
    tl = None

__all__ = ["AVAILABLE", "BLOCK_H", "NUM_WARPS", "FP8_SCALE_BLOCK", "finalize", "finalize_fp8",
           "scatter_grad_input"]

AVAILABLE = triton is not None
BLOCK_H = 1024  # columns per program (issue 3's peer)
NUM_WARPS = 4
FP8_SCALE_BLOCK = 128  # columns per fp32 scale (DeepSeek-style block scales)


if AVAILABLE:

    @triton.jit
    def _finalize_kernel(
        inp_ptr, map_ptr, w_ptr, out_ptr,
        H,
        stride_in, stride_map_t, stride_map_k, stride_w_t, stride_w_k, stride_out,
        K: tl.constexpr, BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):  # fixed k-order, fp32 accumulation
            row = tl.load(map_ptr + t * stride_map_t + k * stride_map_k).to(tl.int64)
            valid = row >= 0
            w = tl.load(w_ptr + t * stride_w_t + k * stride_w_k).to(tl.float32)
            x = tl.load(inp_ptr + row * stride_in + cols, mask=cmask & valid, other=0.0)
            acc += x.to(tl.float32) * tl.where(valid, w, 0.0)
        tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _finalize_fp8_kernel(
        inp_ptr, scale_ptr, map_ptr, w_ptr, out_ptr,
        H,
        stride_in, stride_s_row, stride_s_blk,
        stride_map_t, stride_map_k, stride_w_t, stride_w_k, stride_out,
        K: tl.constexpr, BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < H
        blk = cols // SCALE_BLOCK
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(map_ptr + t * stride_map_t + k * stride_map_k).to(tl.int64)
            valid = row >= 0
            m = cmask & valid
            w = tl.load(w_ptr + t * stride_w_t + k * stride_w_k).to(tl.float32)
            s = tl.load(scale_ptr + row * stride_s_row + blk * stride_s_blk, mask=m, other=0.0)
            x = tl.load(inp_ptr + row * stride_in + cols, mask=m, other=0.0)
            acc += (x.to(tl.float32) * s) * tl.where(valid, w, 0.0)
        tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


    @triton.jit
    def _scatter_grad_input_kernel(
        grad_ptr, map_ptr, w_ptr, out_ptr,
        H,
        stride_grad, stride_map_t, stride_map_k, stride_w_t, stride_w_k, stride_out,
        K: tl.constexpr, BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < H
        g = tl.load(grad_ptr + t * stride_grad + cols, mask=cmask, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            row = tl.load(map_ptr + t * stride_map_t + k * stride_map_k).to(tl.int64)
            w = tl.load(w_ptr + t * stride_w_t + k * stride_w_k).to(tl.float32)
            tl.store(out_ptr + row * stride_out + cols, (w * g).to(out_ptr.dtype.element_ty),
                     mask=cmask & (row >= 0))


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError("triton_peer: Triton is not installed")


def _launch_per_token(kernel, rows: Tensor, row_map: Tensor, weights: Tensor, out: Tensor,
                      extra: tuple = (), extra_strides: tuple = (), **meta) -> Tensor:
    """One program per (token, BLOCK_H columns) of ``kernel(rows, *extra, map, weights, out, H,
    rows' row stride, *extra_strides, map / weights strides, out's row stride)``."""
    num_tokens, k = row_map.shape
    hidden = rows.shape[1]
    if num_tokens > 0:
        kernel[(num_tokens, triton.cdiv(hidden, BLOCK_H))](
            rows, *extra, row_map, weights, out,
            hidden,
            rows.stride(0), *extra_strides,
            row_map.stride(0), row_map.stride(1), weights.stride(0), weights.stride(1),
            out.stride(0),
            K=k, BLOCK=BLOCK_H, num_warps=NUM_WARPS, **meta,
        )
    return out


def finalize(input: Tensor, row_map: Tensor, weights: Tensor, out: Tensor | None = None) -> Tensor:
    """out[t] = sum_k weights[t, k] * input[row_map[t, k]] (fp32 accumulation, dtype of input).

    ``input`` [P, H] with unit last-dim stride; ``row_map`` [T, K] int32/int64 and
    ``weights`` [T, K] with any strides; ``out`` [T, H] with unit last-dim stride.
    """
    _require()
    if out is None:
        out = torch.empty((row_map.shape[0], input.shape[1]), dtype=input.dtype,
                          device=input.device)
    return _launch_per_token(_finalize_kernel, input, row_map, weights, out)


def finalize_fp8(
    input: Tensor,
    scales: Tensor,
    row_map: Tensor,
    weights: Tensor,
    out: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """FP8 variant: ``input`` [P, H] e4m3, ``scales`` [P, ceil(H/128)] fp32 (any strides).

    out[t, h] = sum_k weights[t, k] * input[row, h] * scales[row, h // 128], row = row_map[t, k].
    """
    _require()
    hidden = input.shape[1]
    if scales.shape != (input.shape[0], triton.cdiv(hidden, FP8_SCALE_BLOCK)):
        raise ValueError(
            f"triton_peer.finalize_fp8: scales must be [P, ceil(H/{FP8_SCALE_BLOCK})] = "
            f"[{input.shape[0]}, {triton.cdiv(hidden, FP8_SCALE_BLOCK)}], got {list(scales.shape)}"
        )
    if out is None:
        out = torch.empty((row_map.shape[0], hidden), dtype=out_dtype, device=input.device)
    return _launch_per_token(_finalize_fp8_kernel, input, row_map, weights, out,
                             extra=(scales,), extra_strides=(scales.stride(0), scales.stride(1)),
                             SCALE_BLOCK=FP8_SCALE_BLOCK)


def scatter_grad_input(grad_out: Tensor, row_map: Tensor, weights: Tensor, num_rows: int,
                       out: Tensor | None = None) -> Tensor:
    """out[row_map[t, k]] = weights[t, k] * grad_out[t] for a permutation ``row_map``
    (rows nothing points at are left as they were; shared rows are not summed)."""
    _require()
    if out is None:
        out = torch.empty((num_rows, grad_out.shape[1]), dtype=grad_out.dtype,
                          device=grad_out.device)
    return _launch_per_token(_scatter_grad_input_kernel, grad_out, row_map, weights, out)
