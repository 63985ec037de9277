"""The pure-PyTorch definition of MoE finalize: tests and benchmarks compare against it.

    out[t, h] = cast(residual[t, h] + scale * sum_{k: row_map[t, k] >= 0} w[t, k] * input[row_map[t, k], h])

The sum runs over k = 0..K-1 in fp32 (one rounding at the end). Slots with a negative
map entry are skipped without reading their row, so garbage (even NaN) in rows that
belong to other ranks never leaks into the result. Deliberately simple: no fusion,
no validation beyond what PyTorch itself does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["finalize", "resolve_layout"]


def resolve_layout(
    input: Tensor, row_map: Tensor | None, weights: Tensor | None, top_k: int | None
) -> tuple[int, int]:
    """(T, K) implied by the arguments; `row_map=None` means `input.view(T, K, H)`."""
    if row_map is not None:
        return row_map.shape[0], row_map.shape[1]
    if weights is not None:
        num_tokens, k = weights.shape[0], weights.shape[1]
    else:
        if top_k is None or top_k < 1:
            raise ValueError("finalize: top_k must be >= 1 when row_map and weights are both None")
        k = top_k
        num_tokens = input.shape[0] // k
    return num_tokens, k


def finalize(
    input: Tensor,
    row_map: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    top_k: int | None = None,
    residual: Tensor | None = None,
    scale: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """Reference finalize, same signature as `moe_finalize_plugin.finalize`."""
    num_tokens, k = resolve_layout(input, row_map, weights, top_k)
    hidden = input.shape[1]
    if row_map is None:
        rows = torch.arange(num_tokens * k, device=input.device).view(num_tokens, k)
    else:
        rows = row_map.long()
    valid = rows >= 0
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=input.device)
    for slot in range(k):  # fixed k-order, fp32 accumulation
        slot_rows = rows[:, slot].clamp(min=0)
        gathered = input.index_select(0, slot_rows).float() if input.shape[0] > 0 else None
        if gathered is None:
            continue
        if weights is not None:
            gathered = gathered * weights[:, slot].float().unsqueeze(1)
        acc = acc + torch.where(valid[:, slot].unsqueeze(1), gathered, torch.zeros_like(gathered))
    result = acc * scale
    if residual is not None:
        result = residual.float() + result
    result = result.to(input.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
