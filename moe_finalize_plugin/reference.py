"""The pure-PyTorch definition of MoE finalize: tests and benchmarks compare against it.

    out[t, h] = cast(residual[t, h] + scale * sum_{k: row_map[t, k] >= 0} w[t, k] * input[row_map[t, k], h])

The sum runs over k = 0..K-1 in fp32 (one rounding at the end). Slots with a negative
map entry are skipped without reading their row, so garbage (even NaN) in rows that
belong to other ranks never leaks into the result. Deliberately simple: no fusion,
no validation beyond what PyTorch itself does.

Issue 7 extends it: FP8 (e4m3) input rows are dequantised on load with `input_scales`
(one per row, or one per 128-column block); a per-expert `bias[expert_ids[t, k]]` is added
to each valid slot's row before weighting; `finalize_fp8` quantises the result to e4m3 with
one scale per 128-column block, max(amax, amax_floor) / 448.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["finalize", "finalize_fp8", "dequantize", "resolve_layout", "SCALE_BLOCK", "E4M3_MAX"]

SCALE_BLOCK = 128  # columns per FP8 scale block
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


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


def dequantize(input: Tensor, input_scales: Tensor | None) -> Tensor:
    """fp32 rows: `input * input_scales`, scales per row `[P]` or per 128-column block
    `[P, ceil(H/128)]`; float input without scales is just widened."""
    x = input.float()
    if input_scales is None:
        return x
    if input_scales.dim() == 1:
        return x * input_scales.float().unsqueeze(1)
    per_column = input_scales.float().repeat_interleave(SCALE_BLOCK, dim=1)[:, : input.shape[1]]
    return x * per_column


def _finalize_fp32(
    input: Tensor,
    row_map: Tensor | None,
    weights: Tensor | None,
    top_k: int | None,
    residual: Tensor | None,
    scale: float,
    input_scales: Tensor | None,
    bias: Tensor | None,
    expert_ids: Tensor | None,
) -> Tensor:
    """The unrounded fp32 result."""
    num_tokens, k = resolve_layout(input, row_map, weights, top_k)
    hidden = input.shape[1]
    if row_map is None:
        rows = torch.arange(num_tokens * k, device=input.device).view(num_tokens, k)
    else:
        rows = row_map.long()
    valid = rows >= 0
    x = dequantize(input, input_scales)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=input.device)
    for slot in range(k):  # fixed k-order, fp32 accumulation
        slot_rows = rows[:, slot].clamp(min=0)
        if input.shape[0] == 0:
            continue
        gathered = x.index_select(0, slot_rows)
        if bias is not None:  # skipped slots may carry any expert id: clamp, then mask
            experts = expert_ids[:, slot].long().clamp(0, bias.shape[0] - 1)
            gathered = gathered + bias.index_select(0, experts).float()
        if weights is not None:
            gathered = gathered * weights[:, slot].float().unsqueeze(1)
        acc = acc + torch.where(valid[:, slot].unsqueeze(1), gathered, torch.zeros_like(gathered))
    result = acc * scale
    if residual is not None:
        result = residual.float() + result
    return result


def finalize(
    input: Tensor,
    row_map: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    top_k: int | None = None,
    residual: Tensor | None = None,
    scale: float = 1.0,
    input_scales: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    bias: Tensor | None = None,
    expert_ids: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Reference finalize, same signature as `moe_finalize_plugin.finalize`.

    Output dtype: `out`'s when given, else `out_dtype`, else bf16 for FP8 input and the
    input's dtype otherwise."""
    result = _finalize_fp32(input, row_map, weights, top_k, residual, scale, input_scales, bias,
                            expert_ids)
    if out is not None:
        return out.copy_(result)
    if out_dtype is None:
        out_dtype = torch.bfloat16 if input.dtype == torch.float8_e4m3fn else input.dtype
    return result.to(out_dtype)


def finalize_fp8(
    input: Tensor,
    row_map: Tensor | None = None,
    weights: Tensor | None = None,
    *,
    top_k: int | None = None,
    residual: Tensor | None = None,
    scale: float = 1.0,
    input_scales: Tensor | None = None,
    bias: Tensor | None = None,
    expert_ids: Tensor | None = None,
    amax_floor: float = 1e-10,
) -> tuple[Tensor, Tensor]:
    """Finalize quantised to e4m3: (out [T, H] float8_e4m3fn, out_scales [T, ceil(H/128)] fp32)
    with out_scales = max(block amax, amax_floor) / 448 and out = e4m3(value / out_scales)."""
    value = _finalize_fp32(input, row_map, weights, top_k, residual, scale, input_scales, bias,
                           expert_ids)
    num_tokens, hidden = value.shape
    blocks = -(-hidden // SCALE_BLOCK)
    padded = torch.nn.functional.pad(value, (0, blocks * SCALE_BLOCK - hidden))
    padded = padded.view(num_tokens, blocks, SCALE_BLOCK)
    out_scales = padded.abs().amax(dim=2).clamp(min=amax_floor) / E4M3_MAX
    quantized = (padded / out_scales.unsqueeze(2)).clamp(-E4M3_MAX, E4M3_MAX)
    out = quantized.view(num_tokens, blocks * SCALE_BLOCK)[:, :hidden].to(torch.float8_e4m3fn)
    return out, out_scales
