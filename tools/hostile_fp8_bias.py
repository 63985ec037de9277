"""Hostile maps and expert ids on the FP8-input / bias / FP8-output CUDA kernels (issue 7),
for compute-sanitizer (memcheck / racecheck): map values >= P, expert ids outside [0, E),
exactly sized input, scale and bias allocations (any read past them is out of bounds), every
path (16-byte e4m3 vectors, scalar tail, scalar-only, K > 64, partial scale blocks, with and
without bias, the launch variants chosen by T).

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/hostile_fp8_bias.py
Exits non-zero if a result differs from the reference (out-of-range slots count as skipped,
out-of-range expert ids as no bias term).
"""

import torch

import moe_finalize_plugin as mf
from moe_finalize_plugin import reference

FP8 = torch.float8_e4m3fn


def exact(rows, cols, dtype, stride=None):
    """A [rows, cols] view of an allocation that ends exactly at its last element."""
    stride = stride or cols
    storage = torch.randn(max(rows * stride - (stride - cols), 0), device="cuda").to(dtype)
    return storage.as_strided((rows, cols), (stride, 1))


def run_case(num_rows, num_tokens, top_k, hidden, fill, stride=None, experts=5, with_bias=True):
    blocks = -(-hidden // 128)
    input = exact(num_rows, hidden, FP8, stride)
    scales = exact(blocks, num_rows, torch.float32)
    scales = scales.abs_().add_(0.1).t()  # FlashInfer's transposed [H/128, P] layout
    row_map = fill(num_tokens, top_k, num_rows).to(torch.int32).cuda()
    weights = torch.rand(num_tokens, top_k, device="cuda")
    bias = exact(experts, hidden, torch.bfloat16)
    expert_ids = torch.randint(-2, experts + 2, (num_tokens, top_k), device="cuda").int()
    residual = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    clean = torch.where((row_map >= 0) & (row_map < num_rows), row_map, -1)
    # Reference: an extra zero bias row stands for "no bias term".
    padded = torch.cat([bias, torch.zeros_like(bias[:1])])
    safe_ids = torch.where((expert_ids >= 0) & (expert_ids < experts), expert_ids, experts)
    kwargs = dict(input_scales=scales, bias=bias, expert_ids=expert_ids, scale=1.5)
    ref_kwargs = dict(kwargs, bias=padded, expert_ids=safe_ids)
    if not with_bias:  # the FP8 kernels without a bias term
        kwargs = ref_kwargs = dict(input_scales=scales, scale=1.5)

    out = torch.full((num_tokens, hidden), float("nan"), device="cuda", dtype=torch.bfloat16)
    mf.finalize(input, row_map, weights, residual=residual, out=out, **kwargs)
    ref = reference.finalize(input, clean, weights, residual=residual, **ref_kwargs)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=2e-2)

    q, q_scales = mf.finalize_fp8(input, row_map, weights, residual=residual, **kwargs)
    ref_q, ref_scales = reference.finalize_fp8(input, clean, weights, residual=residual,
                                               **ref_kwargs)
    torch.cuda.synchronize()
    torch.testing.assert_close(q_scales, ref_scales, rtol=1e-5, atol=0)
    full = q_scales.repeat_interleave(128, dim=1)[:, :hidden]
    torch.testing.assert_close(q.float() * full, ref_q.float() * full, rtol=0.13,
                               atol=1e-3 * float(ref.float().abs().max().clamp(min=1)))


FILLS = {
    "past_end": lambda t, k, p: torch.randint(p, p + 1000, (t, k)),
    "huge": lambda t, k, p: torch.full((t, k), 2**31 - 1),
    "all_skip": lambda t, k, p: torch.full((t, k), -1),
    "duplicates": lambda t, k, p: torch.full((t, k), p - 1),
    "mixed": lambda t, k, p: torch.randint(-3, p + 3, (t, k)),
}

if __name__ == "__main__":
    for name, fill in FILLS.items():
        for rows, tokens, k, hidden, stride in [
            (16, 4, 8, 4096, None),    # decode: 8-byte e4m3 vectors
            (5, 3, 2, 4100, None),     # vector body + scalar tail, partial last scale block
            (7, 2, 3, 13, 15),         # scalar path, padded rows, H < 128
            (40, 2, 130, 264, None),   # K > 64: several 32-slot warp chunks
            (1, 1, 1, 1, None),
            (64, 200, 8, 264, None),   # T < 256: 8-byte e4m3 vectors over many blocks, tail
            (64, 300, 8, 256, None),   # T >= 256: FP8 rows in two batches of 4
            (64, 1030, 8, 256, None),  # T >= 1024: L1-allocating loads
            (64, 4100, 4, 264, None),  # T >= 4096: streaming (1-D grid, 56 registers), tail
            (64, 4100, 2, 256, None),  # the same with K=2 (40 registers)
            (64, 4100, 2, 1040, 1056),  # K=2 streaming: padded rows, 16-column scalar tail
        ]:
            for with_bias in (True, False):
                run_case(rows, tokens, k, hidden, fill, stride, with_bias=with_bias)
    print("hostile fp8/bias maps: all cases match the reference")
