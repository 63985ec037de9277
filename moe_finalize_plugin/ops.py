"""Typed wrappers over the `moe_finalize` ops, their fake (meta) implementations and autograd.

The schemas live in csrc/torch_bindings.cpp; these functions mirror them. The argument rules
checked here (for fake tensors) are the ones csrc/checks.cpp enforces on real tensors.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library: registers the ops)
from .backward import finalize_backward

__all__ = ["finalize", "validate_row_map", "set_pdl", "build_info"]

_FINALIZE = torch.ops.moe_finalize.finalize.default
_FINALIZE_OUT = torch.ops.moe_finalize.finalize_out.default
_LIBRARY = ctypes.CDLL(_C.__file__)


def finalize(
    input: Tensor,
    row_map: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    *,
    top_k: Optional[int] = None,
    residual: Optional[Tensor] = None,
    scale: float = 1.0,
    out: Optional[Tensor] = None,
    validate: bool = False,
) -> Tensor:
    """One row per token: ``residual[t] + scale * sum_k weights[t, k] * input[row_map[t, k]]``.

    Args:
        input: ``[P, H]`` permuted expert outputs (bf16 / fp16 / fp32); the row stride may
            exceed H, the last-dim stride must be 1.
        row_map: ``[T, K]`` int32/int64, any strides: the row of ``input`` holding (token t,
            slot k); negative entries are skipped. ``None``: ``input`` is ``[T*K, H]``
            token-major (``input.view(T, K, H)``).
        weights: ``[T, K]`` fp32 / bf16 / fp16 router weights, any strides; ``None`` = 1.0.
        top_k: K, needed only when ``row_map`` and ``weights`` are both ``None``.
        residual: optional ``[T, H]`` tensor (dtype of ``input``) added after scaling.
        scale: routed scaling factor applied to the weighted sum.
        out: optional ``[T, H]`` destination (unit last-dim stride); may be ``residual``.
        validate: check ``row_map`` against ``input``'s row count first and raise naming the
            first bad (t, k). On CUDA this reads the map on the host (a sync): a debugging aid,
            off by default. Without it the CPU kernel still raises, and the CUDA kernel skips
            out-of-range entries without reading them.

    Returns:
        ``out`` when given, else a new ``[T, H]`` tensor of ``input``'s dtype. The sum is
        accumulated in fp32 over k = 0..K-1, so a token's row is bitwise identical whatever
        the batch size.
    """
    if validate and row_map is not None:
        validate_row_map(row_map, input.shape[0])
    if _skip_autograd(input, weights, residual):
        # Nothing needs a gradient: go straight to the device kernel. The Autograd kernel would
        # only redispatch, through Python, at several microseconds per call.
        # Keyword arguments cost about a microsecond of schema parsing: pass only non-defaults.
        kwargs = {}
        if top_k is not None:
            kwargs["top_k"] = top_k
        if residual is not None:
            kwargs["residual"] = residual
        if scale != 1.0:
            kwargs["scale"] = scale
        with _BELOW_AUTOGRAD():
            if out is None:
                return _FINALIZE(input, row_map, weights, **kwargs)
            _FINALIZE_OUT(out, input, row_map, weights, **kwargs)
            return out
    if out is None:
        return _FINALIZE(input, row_map, weights, top_k=top_k, residual=residual, scale=scale)
    _FINALIZE_OUT(out, input, row_map, weights, top_k=top_k, residual=residual, scale=scale)
    return out


_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd
_is_compiling = torch.compiler.is_compiling


def _skip_autograd(input: Tensor, weights: Optional[Tensor], residual: Optional[Tensor]) -> bool:
    if _is_compiling():  # let the compiler see the plain op
        return False
    if not torch.is_grad_enabled():
        return True
    return not (input.requires_grad or (weights is not None and weights.requires_grad)
                or (residual is not None and residual.requires_grad))


def validate_row_map(row_map: Tensor, num_rows: int) -> None:
    """Raise ValueError naming the first (t, k) whose entry is >= ``num_rows`` (negative = skip)."""
    bad = (row_map >= num_rows).nonzero()
    if bad.shape[0] > 0:
        t, k = bad[0].tolist()
        raise ValueError(
            f"finalize: row_map[{t}, {k}] = {int(row_map[t, k])} is out of range for input with "
            f"{num_rows} rows (valid: 0..P-1, or negative to skip)"
        )


def set_pdl(enabled: bool) -> bool:
    """Turn programmatic dependent launch (sm_90+) on or off for later CUDA launches.

    On by default; the environment variable ``MOE_FINALIZE_PDL=0`` starts it off. Returns the
    previous setting. Has no effect on a build without CUDA kernels.
    """
    setter = getattr(_LIBRARY, "moe_finalize_set_pdl", None)
    if setter is None:
        return False
    return bool(setter(1 if enabled else 0))


def build_info() -> dict[str, object]:
    """What this binary holds: its device kernels and the stable-ABI target."""
    info = _LIBRARY.moe_finalize_build_info
    info.restype = ctypes.c_char_p
    return {"kernels": info().decode().split(","), "abi": "libtorch stable ABI (torch>=2.11), abi3"}


# ---- fake (meta) implementations: shape/dtype rules of csrc/checks.cpp -------------------------

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_rows(t: Tensor, name: str, rows: int, cols: int) -> None:
    torch._check(t.dim() == 2, lambda: f"finalize: {name} must be 2-D [{rows}, {cols}]")
    torch._check(
        t.shape[0] == rows and t.shape[1] == cols,
        lambda: f"finalize: {name} must be [{rows}, {cols}], got {list(t.shape)}",
    )


def _fake_shape(
    input: Tensor, row_map: Optional[Tensor], weights: Optional[Tensor], top_k: Optional[int],
    residual: Optional[Tensor],
) -> tuple[int, int]:
    torch._check(input.dim() == 2, lambda: f"finalize: input must be 2-D [P, H], got {input.dim()}-D")
    torch._check(input.dtype in _FLOAT_DTYPES,
                 lambda: f"finalize: input must be bfloat16, float16 or float32, got {input.dtype}")
    torch._check(top_k is None or top_k >= 1, lambda: f"finalize: top_k must be >= 1, got {top_k}")
    rows, hidden = input.shape
    if row_map is not None:
        torch._check(row_map.dim() == 2, lambda: "finalize: row_map must be 2-D [T, K]")
        torch._check(row_map.dtype in (torch.int32, torch.int64),
                     lambda: f"finalize: row_map must be int32 or int64, got {row_map.dtype}")
        num_tokens, k = row_map.shape
    elif weights is not None:
        torch._check(weights.dim() == 2, lambda: "finalize: weights must be 2-D [T, K]")
        num_tokens, k = weights.shape
        torch._check(rows == num_tokens * k,
                     lambda: "finalize: with row_map=None, input must hold T*K rows")
    else:
        torch._check(top_k is not None,
                     lambda: "finalize: top_k is required when row_map and weights are both None")
        k = top_k
        num_tokens = rows // k
    if weights is not None:
        _check_rows(weights, "weights", num_tokens, k)
        torch._check(weights.dtype in _FLOAT_DTYPES,
                     lambda: f"finalize: weights must be float32, bfloat16 or float16, got {weights.dtype}")
    if residual is not None:
        _check_rows(residual, "residual", num_tokens, hidden)
        torch._check(residual.dtype == input.dtype,
                     lambda: "finalize: residual must have the dtype of input")
    return num_tokens, hidden


@torch.library.register_fake("moe_finalize::finalize")
def _finalize_fake(input, row_map, weights, *, top_k=None, residual=None, scale=1.0):
    num_tokens, hidden = _fake_shape(input, row_map, weights, top_k, residual)
    return input.new_empty((num_tokens, hidden))


@torch.library.register_fake("moe_finalize::finalize_out")
def _finalize_out_fake(out, input, row_map, weights, *, top_k=None, residual=None, scale=1.0):
    num_tokens, hidden = _fake_shape(input, row_map, weights, top_k, residual)
    _check_rows(out, "out", num_tokens, hidden)
    torch._check(out.dtype == input.dtype, lambda: "finalize: out must have the dtype of input")


@torch.library.register_fake("moe_finalize::finalize_grad_input")
def _grad_input_fake(grad_out, input, row_map, weights, *, top_k=None, scale=1.0):
    num_tokens, hidden = _fake_shape(input, row_map, weights, top_k, None)
    _check_rows(grad_out, "grad_out", num_tokens, hidden)
    return input.new_empty(input.shape)


@torch.library.register_fake("moe_finalize::finalize_grad_weights")
def _grad_weights_fake(grad_out, input, row_map, weights, *, top_k=None, scale=1.0):
    num_tokens, hidden = _fake_shape(input, row_map, weights, top_k, None)
    _check_rows(grad_out, "grad_out", num_tokens, hidden)
    k = row_map.shape[1] if row_map is not None else (
        weights.shape[1] if weights is not None else top_k)
    return input.new_empty((num_tokens, k), dtype=torch.float32)


# ---- autograd ----------------------------------------------------------------------------------
# torch.library.register_autograd only differentiates positional tensors, and `residual` is
# keyword-only in the schema, so the Autograd kernel is registered directly: one
# autograd.Function that sees input, weights and residual.


class _FinalizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, input, row_map, weights, residual, top_k, scale):
        with torch._C._AutoDispatchBelowAutograd():
            result = _FINALIZE.redispatch(
                keyset & torch._C._after_autograd_keyset, input, row_map, weights,
                top_k=top_k, residual=residual, scale=scale,
            )
        ctx.save_for_backward(input, row_map, weights)
        ctx.top_k, ctx.scale = top_k, scale
        ctx.residual_dtype = None if residual is None else residual.dtype
        return result

    @staticmethod
    def backward(ctx, grad_out):
        input, row_map, weights = ctx.saved_tensors
        _, need_input, _, need_weights, need_residual, _, _ = ctx.needs_input_grad
        grad_input, grad_weights = finalize_backward(
            grad_out, input, row_map, weights, top_k=ctx.top_k, scale=ctx.scale,
            need_input=need_input, need_weights=need_weights,
        )
        grad_residual = grad_out.to(ctx.residual_dtype) if need_residual else None
        return None, grad_input, None, grad_weights, grad_residual, None, None


def _finalize_autograd(keyset, input, row_map, weights, *, top_k=None, residual=None, scale=1.0):
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weights, residual)
    ):
        return _FinalizeFunction.apply(keyset, input, row_map, weights, residual, top_k, scale)
    with torch._C._AutoDispatchBelowAutograd():
        return _FINALIZE.redispatch(
            keyset & torch._C._after_autograd_keyset, input, row_map, weights,
            top_k=top_k, residual=residual, scale=scale,
        )


def _finalize_out_autograd(keyset, out, input, row_map, weights, *, top_k=None, residual=None,
                           scale=1.0):
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (out, input, weights, residual)
    ):
        raise RuntimeError(
            "finalize: the out= form does not support autograd (an argument requires grad); "
            "call finalize without out="
        )
    with torch._C._AutoDispatchBelowAutograd():
        _FINALIZE_OUT.redispatch(
            keyset & torch._C._after_autograd_keyset, out, input, row_map, weights,
            top_k=top_k, residual=residual, scale=scale,
        )


_LIB = torch.library.Library("moe_finalize", "IMPL")
_LIB.impl("finalize", _finalize_autograd, "Autograd", with_keyset=True)
_LIB.impl("finalize_out", _finalize_out_autograd, "Autograd", with_keyset=True)
