"""Random finalize problems in every layout SPEC.md names (never zeros; poisoned outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

LAYOUTS = ("token_major", "k_major", "none")
TOLERANCES = {  # (atol, rtol) of one rounding to the output dtype after an fp32 sum
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}


@dataclass
class Case:
    input: Tensor
    row_map: Optional[Tensor]
    weights: Optional[Tensor]
    top_k: Optional[int]
    residual: Optional[Tensor]
    scale: float

    def kwargs(self) -> dict:
        return dict(top_k=self.top_k, residual=self.residual, scale=self.scale)


def make_case(
    device: str,
    dtype: torch.dtype,
    num_tokens: int,
    top_k: int,
    hidden: int,
    layout: str = "token_major",
    *,
    drop: float = 0.15,
    weights_dtype: Optional[torch.dtype] = torch.float32,
    residual: bool = False,
    scale: float = 1.0,
    padded_rows: int = 0,
    extra_rows: int = 0,
    map_dtype: torch.dtype = torch.int32,
) -> Case:
    """A permuted expert-output buffer with `extra_rows` unused (padding) rows, a row map in
    `layout` with a `drop` share of -1 entries, and optional weights/residual."""
    slots = num_tokens * top_k
    rows = slots + (0 if layout == "none" else extra_rows)
    storage = torch.randn(rows, hidden + padded_rows, device=device, dtype=torch.float32)
    input = storage.to(dtype)[:, :hidden]
    row_map = None
    if layout != "none":
        perm = torch.randperm(rows, device=device)[:slots].to(map_dtype)
        perm = torch.where(torch.rand(slots, device=device) < drop, -1, perm).to(map_dtype)
        row_map = perm.view(num_tokens, top_k) if layout == "token_major" else (
            perm.view(top_k, num_tokens).t())
    weights = None
    if weights_dtype is not None:
        weights = torch.rand(num_tokens, top_k, device=device).to(weights_dtype)
    res = torch.randn(num_tokens, hidden, device=device).to(dtype) if residual else None
    return Case(input, row_map, weights, None if weights is not None or row_map is not None else top_k,
                res, scale)


def poisoned(num_tokens: int, hidden: int, like: Tensor) -> Tensor:
    return torch.full((num_tokens, hidden), float("nan"), dtype=like.dtype, device=like.device)
