"""Gradients of finalize with respect to input and weights, composed of PyTorch ops.

    grad_input[row_map[t, k]] += scale * w[t, k] * grad_out[t]      (duplicates accumulate)
    grad_weights[t, k]         = scale * <grad_out[t], input[row_map[t, k]]>

Skipped slots (negative or out-of-range entries) get zero gradient. Computed in fp32.
On CUDA the two gradients are dedicated kernels (deterministic, no float atomics: see
csrc/finalize_backward_cuda.cu); elsewhere they are composed of PyTorch ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import resolve_layout


def finalize_backward(
    grad_out: Tensor,
    input: Tensor,
    row_map: Optional[Tensor],
    weights: Optional[Tensor],
    *,
    top_k: Optional[int],
    scale: float,
    need_input: bool = True,
    need_weights: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Returns (grad_input [P, H] in input's dtype, grad_weights [T, K] in weights' dtype)."""
    if grad_out.is_cuda and hasattr(torch.ops.moe_finalize, "finalize_grad_input"):
        grad_out = grad_out.to(input.dtype)
        if grad_out.dim() == 2 and grad_out.shape[1] > 1 and grad_out.stride(1) != 1:
            grad_out = grad_out.contiguous()
        grad_input = grad_weights = None
        if need_input:
            grad_input = torch.ops.moe_finalize.finalize_grad_input(
                grad_out, input, row_map, weights, top_k=top_k, scale=scale)
        if need_weights and weights is not None:
            grad_weights = torch.ops.moe_finalize.finalize_grad_weights(
                grad_out, input, row_map, weights, top_k=top_k, scale=scale).to(weights.dtype)
        return grad_input, grad_weights
    num_tokens, k = resolve_layout(input, row_map, weights, top_k)
    num_rows, hidden = input.shape
    if row_map is None:
        rows = torch.arange(num_tokens * k, device=input.device).view(num_tokens, k)
    else:
        rows = row_map.long()
    valid = (rows >= 0) & (rows < num_rows)
    safe_rows = torch.where(valid, rows, torch.zeros_like(rows))
    grad = grad_out.float() * scale  # [T, H]
    w = (weights.float() if weights is not None
         else torch.ones(num_tokens, k, device=input.device)) * valid

    grad_input = None
    if need_input:
        contrib = w.unsqueeze(-1) * grad.unsqueeze(1)  # [T, K, H]
        grad_input = torch.zeros(num_rows, hidden, dtype=torch.float32, device=input.device)
        grad_input.index_add_(0, safe_rows.reshape(-1), contrib.reshape(-1, hidden))
        grad_input = grad_input.to(input.dtype)

    grad_weights = None
    if need_weights and weights is not None:
        if num_rows == 0:
            gathered = grad.new_zeros(num_tokens, k, hidden)
        else:
            gathered = input.index_select(0, safe_rows.reshape(-1)).float().view(num_tokens, k, hidden)
        dots = torch.einsum("tkh,th->tk", gathered, grad)
        grad_weights = torch.where(valid, dots, torch.zeros_like(dots)).to(weights.dtype)
    return grad_input, grad_weights
