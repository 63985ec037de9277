"""Hostile row maps for compute-sanitizer (memcheck / racecheck): values >= P, huge values,
all -1, duplicates, tiny and odd shapes, every path (vector, scalar tail, scalar-only, K > 64),
forward and the CUDA backward kernels.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/hostile_maps.py
Exits non-zero if a result differs from the reference (out-of-range slots count as skipped).
"""

import torch

import moe_finalize_plugin as mf
from moe_finalize_plugin import reference


def run_case(num_rows, num_tokens, top_k, hidden, dtype, fill, row_stride=None):
    stride = row_stride or hidden
    # Exactly-sized allocation so any read past the last row is an out-of-bounds access.
    storage = torch.randn(max(num_rows * stride - (stride - hidden), 0), device="cuda").to(dtype)
    input = storage.as_strided((num_rows, hidden), (stride, 1))
    row_map = fill(num_tokens, top_k, num_rows).to(torch.int32).cuda()
    weights = torch.rand(num_tokens, top_k, device="cuda")
    residual = torch.randn(num_tokens, hidden, device="cuda").to(dtype)
    out = torch.full((num_tokens, hidden), float("nan"), device="cuda", dtype=dtype)
    mf.finalize(input, row_map, weights, residual=residual, scale=1.5, out=out)
    clean = torch.where((row_map >= 0) & (row_map < num_rows), row_map, -1)
    ref = reference.finalize(input, clean, weights, residual=residual, scale=1.5)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=2e-2)
    # The CUDA backward kernels on the same map: never a row outside input, skipped slots get
    # zero weight gradients, rows no valid slot points at get zeros.
    grad_out = torch.randn(num_tokens, hidden, device="cuda").to(dtype)
    ops = torch.ops.moe_finalize
    grad_input = ops.finalize_grad_input(grad_out, input, row_map, weights, scale=1.5)
    grad_weights = ops.finalize_grad_weights(grad_out, input, row_map, weights, scale=1.5)
    x = input.detach().float().requires_grad_()
    w = weights.clone().requires_grad_()
    reference.finalize(x, clean, w, scale=1.5).backward(grad_out.float())
    torch.cuda.synchronize()
    torch.testing.assert_close(grad_input.float(), x.grad, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(grad_weights, w.grad, atol=5e-1, rtol=5e-2)


FILLS = {
    "past_end": lambda t, k, p: torch.randint(p, p + 1000, (t, k)),
    "huge": lambda t, k, p: torch.full((t, k), 2**31 - 1),
    "all_skip": lambda t, k, p: torch.full((t, k), -1),
    "negative_mix": lambda t, k, p: torch.randint(-(2**31), 0, (t, k)),
    "duplicates": lambda t, k, p: torch.full((t, k), p - 1),
    "mixed": lambda t, k, p: torch.randint(-3, p + 3, (t, k)),
}

if __name__ == "__main__":
    for name, fill in FILLS.items():
        for rows, tokens, k, hidden, dtype, stride in [
            (16, 4, 8, 4096, torch.bfloat16, None),   # vector path
            (5, 3, 2, 4100, torch.bfloat16, None),    # vector body + scalar tail
            (7, 2, 3, 13, torch.float16, 15),         # scalar path, padded rows
            (40, 2, 130, 264, torch.float32, None),   # K > 64: several 32-slot warp chunks
            (1, 1, 1, 1, torch.bfloat16, None),
            (64, 1030, 2, 264, torch.bfloat16, None),  # T >= 1024: L1-allocating loads
            (64, 4100, 8, 264, torch.bfloat16, None),  # T >= 4096: streaming (1-D grid)
            (64, 2050, 6, 264, torch.bfloat16, None),  # K > 4: streaming from T >= 2048
        ]:
            run_case(rows, tokens, k, hidden, dtype, fill, stride)
    print("hostile maps: all cases match the reference")
