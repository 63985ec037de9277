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
from .reference import SCALE_BLOCK, resolve_layout

__all__ = ["finalize", "finalize_fp8", "validate_row_map", "set_pdl", "build_info"]

_FINALIZE = torch.ops.moe_finalize.finalize.default
_FINALIZE_OUT = torch.ops.moe_finalize.finalize_out.default
_FINALIZE_FP8_OUT = torch.ops.moe_finalize.finalize_fp8_out.default
_LIBRARY = ctypes.CDLL(_C.__file__)
# The dispatcher entry points behind the overloads, without OpOverload.__call__'s Python frame:
# only for the eager no-grad path (torch.compile must see the overloads).
_FINALIZE_RAW = _FINALIZE._op
_FINALIZE_OUT_RAW = _FINALIZE_OUT._op
_FINALIZE_FP8_OUT_RAW = _FINALIZE_FP8_OUT._op


def finalize(
    input: Tensor,
    row_map: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    *,
    top_k: Optional[int] = None,
    residual: Optional[Tensor] = None,
    scale: float = 1.0,
    input_scales: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    bias: Optional[Tensor] = None,
    expert_ids: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    validate: bool = False,
) -> Tensor:
    """One row per token: ``residual[t] + scale * sum_k weights[t, k] * x[t, k]`` with
    ``x[t, k] = dequant(input[row_map[t, k]]) + bias[expert_ids[t, k]]``.

    Args:
        input: ``[P, H]`` permuted expert outputs (bf16 / fp16 / fp32, or float8_e4m3fn with
            ``input_scales``); the row stride may exceed H, the last-dim stride must be 1.
        row_map: ``[T, K]`` int32/int64, any strides: the row of ``input`` holding (token t,
            slot k); negative entries are skipped. ``None``: ``input`` is ``[T*K, H]``
            token-major (``input.view(T, K, H)``).
        weights: ``[T, K]`` fp32 / bf16 / fp16 router weights, any strides; ``None`` = 1.0.
        top_k: K, needed only when ``row_map`` and ``weights`` are both ``None``.
        residual: optional ``[T, H]`` tensor of the output dtype, added after scaling.
        scale: routed scaling factor applied to the weighted sum.
        input_scales: fp32 dequantisation scales of FP8 ``input`` (required for it, refused
            otherwise): ``[P]`` one per row, or ``[P, ceil(H/128)]`` one per 128-column block;
            any strides (FlashInfer's ``[ceil(H/128), P]`` buffer is passed as ``.t()``).
        out_dtype: output dtype of the functional form: bf16 (default), fp16 or fp32 for FP8
            input; for float input only its own dtype (the default). With ``out``, out decides.
        bias: ``[E, H]`` per-expert bias (bf16 / fp16 / fp32, unit last-dim stride), added to
            every valid slot's row before weighting (TensorRT-LLM's definition). Needs
            ``expert_ids``.
        expert_ids: ``[T, K]`` int32/int64, any strides: the expert of (t, k). Read only for
            slots whose ``row_map`` entry is >= 0 (skipped slots may hold -1). An id outside
            [0, E) raises on CPU; on CUDA that slot gets no bias term (never an out-of-bounds
            read).
        out: optional ``[T, H]`` destination (unit last-dim stride); may be ``residual``.
        validate: check ``row_map`` against ``input``'s row count first and raise naming the
            first bad (t, k). On CUDA this reads the map on the host (a sync): a debugging aid,
            off by default. Without it the CPU kernel still raises, and the CUDA kernel skips
            out-of-range entries without reading them.

    Returns:
        ``out`` when given, else a new ``[T, H]`` tensor of the output dtype. The sum is
        accumulated in fp32 over k = 0..K-1, so a token's row is bitwise identical whatever
        the batch size.

    Autograd: input, weights, residual and bias are differentiable for float input. FP8 input
    is inference-only: a gradient request raises.
    """
    if validate and row_map is not None:
        validate_row_map(row_map, input.shape[0])
    if out is not None and out_dtype is not None and out_dtype != out.dtype:
        raise RuntimeError(f"finalize: out_dtype ({out_dtype}) differs from out's dtype "
                           f"({out.dtype}); with out=, out decides")
    if not _is_compiling():  # torch.compile must see the overloads below
        # Eager hot path: straight to the device kernel when nothing needs a gradient (the
        # Python Autograd kernel would only redispatch, at several microseconds per call).
        # Inference mode already excludes the Autograd key, so there no guard is entered.
        if _inference_mode():
            return _call_kernel(out, input, row_map, weights, top_k, residual, scale,
                                input_scales, out_dtype, bias, expert_ids)
        if not _grad_enabled() or not _any_requires_grad(input, weights, residual, bias):
            with _BELOW_AUTOGRAD():
                return _call_kernel(out, input, row_map, weights, top_k, residual, scale,
                                    input_scales, out_dtype, bias, expert_ids)
    extras = dict(input_scales=input_scales, bias=bias, expert_ids=expert_ids)
    if out is None:
        return _FINALIZE(input, row_map, weights, top_k=top_k, residual=residual, scale=scale,
                         out_dtype=out_dtype, **extras)
    _FINALIZE_OUT(out, input, row_map, weights, top_k=top_k, residual=residual, scale=scale,
                  **extras)
    return out


def finalize_fp8(
    input: Tensor,
    row_map: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    *,
    top_k: Optional[int] = None,
    residual: Optional[Tensor] = None,
    scale: float = 1.0,
    input_scales: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    expert_ids: Optional[Tensor] = None,
    amax_floor: float = 1e-10,
    out: Optional[Tensor] = None,
    out_scales: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """`finalize`, quantised for an FP8 consumer: returns ``(out, out_scales)``.

    ``out`` is ``[T, H]`` float8_e4m3fn; ``out_scales`` is fp32 ``[T, ceil(H/128)]`` (any
    strides: pass ``buf.t()`` of a ``[ceil(H/128), T]`` buffer for the transposed layout).
    For each token and 128-column block b (the last one may be partial)::

        out_scales[t, b] = max(amax_b, amax_floor) / 448
        out[t, h]        = e4m3(value[t, h] / out_scales[t, b])   (round to nearest even)

    so an all-zero block gives a positive scale and zeros. ``value`` is what `finalize` would
    round; the other arguments are as there (``residual`` may be bf16, fp16 or fp32).
    Inference-only (no autograd). Allocates ``out`` / ``out_scales`` when not given.
    """
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weights, residual, bias)
    ):
        raise RuntimeError("finalize_fp8: FP8 output is inference-only; an argument requires "
                           "grad (use torch.no_grad() or detach)")
    num_tokens, _ = resolve_layout(input, row_map, weights, top_k)
    hidden = input.shape[1] if input.dim() == 2 else 0
    if out is None:
        out = input.new_empty((num_tokens, hidden), dtype=torch.float8_e4m3fn)
    if out_scales is None:
        out_scales = input.new_empty((num_tokens, -(-hidden // SCALE_BLOCK)), dtype=torch.float32)
    if _is_compiling():  # torch.compile must see the overload
        _FINALIZE_FP8_OUT(out, out_scales, input, row_map, weights, top_k=top_k,
                          residual=residual, scale=scale, input_scales=input_scales, bias=bias,
                          expert_ids=expert_ids, amax_floor=amax_floor)
        return out, out_scales
    # Eager: nothing needs a gradient (refused above), so the op runs below the Autograd key,
    # as finalize's hot path does.
    kwargs = _non_default_kwargs(top_k, residual, scale, input_scales, bias, expert_ids)
    kwargs["amax_floor"] = amax_floor
    if _inference_mode():
        _FINALIZE_FP8_OUT_RAW(out, out_scales, input, row_map, weights, **kwargs)
    else:
        with _BELOW_AUTOGRAD():
            _FINALIZE_FP8_OUT_RAW(out, out_scales, input, row_map, weights, **kwargs)
    return out, out_scales


_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_inference_mode = torch.is_inference_mode_enabled


def _any_requires_grad(input: Tensor, weights: Optional[Tensor], residual: Optional[Tensor],
                       bias: Optional[Tensor]) -> bool:
    return (input.requires_grad or (weights is not None and weights.requires_grad)
            or (residual is not None and residual.requires_grad)
            or (bias is not None and bias.requires_grad))


def _call_kernel(out: Optional[Tensor], input: Tensor, row_map: Optional[Tensor],
                 weights: Optional[Tensor], top_k: Optional[int], residual: Optional[Tensor],
                 scale: float, input_scales: Optional[Tensor], out_dtype: Optional[torch.dtype],
                 bias: Optional[Tensor], expert_ids: Optional[Tensor]) -> Tensor:
    """`finalize`'s op through its dispatcher entry point (the caller has taken care of
    autograd)."""
    kwargs = _non_default_kwargs(top_k, residual, scale, input_scales, bias, expert_ids)
    if out is None:
        if out_dtype is not None:
            kwargs["out_dtype"] = out_dtype
        return _FINALIZE_RAW(input, row_map, weights, **kwargs)
    _FINALIZE_OUT_RAW(out, input, row_map, weights, **kwargs)
    return out


def _non_default_kwargs(top_k: Optional[int], residual: Optional[Tensor], scale: float,
                        input_scales: Optional[Tensor], bias: Optional[Tensor],
                        expert_ids: Optional[Tensor]) -> dict:
    """The keyword arguments that differ from the schema's defaults: each one passed costs
    schema parsing on the eager hot path."""
    kwargs = {}
    if top_k is not None:
        kwargs["top_k"] = top_k
    if residual is not None:
        kwargs["residual"] = residual
    if scale != 1.0:
        kwargs["scale"] = scale
    if input_scales is not None:
        kwargs["input_scales"] = input_scales
    if bias is not None or expert_ids is not None:
        kwargs["bias"] = bias
        kwargs["expert_ids"] = expert_ids
    return kwargs


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
    """What this binary holds: its device kernels, the stable-ABI target and the commit it was
    built from (``-dirty`` for uncommitted changes, ``unknown`` without git)."""
    kernels = _LIBRARY.moe_finalize_build_info
    kernels.restype = ctypes.c_char_p
    # Absent from binaries built before fff0720, which tools/variants.sh still runs under this
    # package.
    source_rev = getattr(_LIBRARY, "moe_finalize_source_rev", None)
    if source_rev is not None:
        source_rev.restype = ctypes.c_char_p
    return {"kernels": kernels().decode().split(","),
            "abi": "libtorch stable ABI (torch>=2.11), abi3",
            "source_rev": source_rev().decode() if source_rev is not None else "unknown"}


# ---- fake (meta) implementations: shape/dtype rules of csrc/checks.cpp -------------------------

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP8 = torch.float8_e4m3fn


def _check_rows(t: Tensor, name: str, rows: int, cols: int) -> None:
    torch._check(t.dim() == 2, lambda: f"finalize: {name} must be 2-D [{rows}, {cols}]")
    torch._check(
        t.shape[0] == rows and t.shape[1] == cols,
        lambda: f"finalize: {name} must be [{rows}, {cols}], got {list(t.shape)}",
    )


def _fake_out_dtype(input: Tensor, out: Optional[Tensor], out_dtype: Optional[torch.dtype],
                    fp8_out: bool) -> torch.dtype:
    """csrc/checks.cpp resolve_out_dtype."""
    fp8_input = input.dtype == _FP8
    if fp8_out:
        torch._check(out is None or out.dtype == _FP8,
                     lambda: f"finalize: out must be float8_e4m3fn, got {out.dtype}")
        return _FP8
    if out is not None:
        if fp8_input:
            torch._check(out.dtype in _FLOAT_DTYPES, lambda: "finalize: out must be bfloat16, "
                         f"float16 or float32 for float8_e4m3fn input, got {out.dtype}")
        else:
            torch._check(out.dtype == input.dtype,
                         lambda: "finalize: out must have the dtype of input")
        return out.dtype
    if out_dtype is None:
        return torch.bfloat16 if fp8_input else input.dtype
    if fp8_input:
        torch._check(out_dtype in _FLOAT_DTYPES, lambda: "finalize: out_dtype must be bfloat16, "
                     f"float16 or float32 for float8_e4m3fn input, got {out_dtype}")
    else:
        torch._check(out_dtype == input.dtype, lambda: "finalize: out_dtype must be None or the "
                     f"dtype of input ({input.dtype}) for float input, got {out_dtype}")
    return out_dtype


def _fake_shape(
    input: Tensor, row_map: Optional[Tensor], weights: Optional[Tensor], top_k: Optional[int],
    residual: Optional[Tensor], *, input_scales: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None, bias: Optional[Tensor] = None,
    expert_ids: Optional[Tensor] = None, out: Optional[Tensor] = None, fp8_out: bool = False,
) -> tuple[int, int, torch.dtype]:
    """(T, H, output dtype) after the checks of csrc/checks.cpp."""
    torch._check(input.dim() == 2, lambda: f"finalize: input must be 2-D [P, H], got {input.dim()}-D")
    fp8_input = input.dtype == _FP8
    torch._check(input.dtype in _FLOAT_DTYPES or fp8_input,
                 lambda: f"finalize: input must be bfloat16, float16 or float32, got {input.dtype}"
                 " (float8_e4m3fn is accepted too, with input_scales)")
    torch._check(top_k is None or top_k >= 1, lambda: f"finalize: top_k must be >= 1, got {top_k}")
    result_dtype = _fake_out_dtype(input, out, out_dtype, fp8_out)
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
        if fp8_out:
            torch._check(residual.dtype in _FLOAT_DTYPES,
                         lambda: "finalize: residual must be bfloat16, float16 or float32")
        elif not fp8_input:
            torch._check(residual.dtype == input.dtype,
                         lambda: "finalize: residual must have the dtype of input")
        else:
            torch._check(residual.dtype == result_dtype,
                         lambda: "finalize: residual must have the output dtype")
    blocks = -(-hidden // SCALE_BLOCK)
    if not fp8_input:
        torch._check(input_scales is None,
                     lambda: "finalize: input_scales is only for float8_e4m3fn input")
    else:
        torch._check(input_scales is not None,
                     lambda: "finalize: float8_e4m3fn input needs input_scales")
        torch._check(input_scales.dtype == torch.float32,
                     lambda: "finalize: input_scales must be float32")
        torch._check(
            (input_scales.dim() == 1 and input_scales.shape[0] == rows)
            or (input_scales.dim() == 2 and input_scales.shape[0] == rows
                and input_scales.shape[1] == blocks),
            lambda: f"finalize: input_scales must be [P] = [{rows}] or [P, ceil(H/128)] = "
                    f"[{rows}, {blocks}]")
    torch._check((bias is None) == (expert_ids is None),
                 lambda: "finalize: bias and expert_ids must be given together")
    if bias is not None:
        torch._check(bias.dim() == 2 and bias.shape[1] == hidden,
                     lambda: f"finalize: bias must be 2-D [E, H] with H = {hidden}")
        torch._check(bias.dtype in _FLOAT_DTYPES,
                     lambda: "finalize: bias must be bfloat16, float16 or float32")
        torch._check(expert_ids.dim() == 2 and expert_ids.shape[0] == num_tokens
                     and expert_ids.shape[1] == k,
                     lambda: f"finalize: expert_ids must be [T, K] = [{num_tokens}, {k}]")
        torch._check(expert_ids.dtype in (torch.int32, torch.int64),
                     lambda: "finalize: expert_ids must be int32 or int64")
    if out is not None:
        _check_rows(out, "out", num_tokens, hidden)
    return num_tokens, hidden, result_dtype


@torch.library.register_fake("moe_finalize::finalize")
def _finalize_fake(input, row_map, weights, *, top_k=None, residual=None, scale=1.0,
                   input_scales=None, out_dtype=None, bias=None, expert_ids=None):
    num_tokens, hidden, dtype = _fake_shape(
        input, row_map, weights, top_k, residual, input_scales=input_scales, out_dtype=out_dtype,
        bias=bias, expert_ids=expert_ids)
    return input.new_empty((num_tokens, hidden), dtype=dtype)


@torch.library.register_fake("moe_finalize::finalize_out")
def _finalize_out_fake(out, input, row_map, weights, *, top_k=None, residual=None, scale=1.0,
                       input_scales=None, bias=None, expert_ids=None):
    _fake_shape(input, row_map, weights, top_k, residual, input_scales=input_scales, bias=bias,
                expert_ids=expert_ids, out=out)


@torch.library.register_fake("moe_finalize::finalize_fp8_out")
def _finalize_fp8_out_fake(out, out_scales, input, row_map, weights, *, top_k=None,
                           residual=None, scale=1.0, input_scales=None, bias=None,
                           expert_ids=None, amax_floor=1e-10):
    num_tokens, hidden, _ = _fake_shape(
        input, row_map, weights, top_k, residual, input_scales=input_scales, bias=bias,
        expert_ids=expert_ids, out=out, fp8_out=True)
    blocks = -(-hidden // SCALE_BLOCK)
    torch._check(out_scales.dtype == torch.float32, lambda: "finalize: out_scales must be float32")
    torch._check(out_scales.dim() == 2 and out_scales.shape[0] == num_tokens
                 and out_scales.shape[1] == blocks,
                 lambda: "finalize: out_scales must be [T, ceil(H/128)] = "
                         f"[{num_tokens}, {blocks}]")
    torch._check(amax_floor > 0, lambda: f"finalize: amax_floor must be > 0, got {amax_floor}")


@torch.library.register_fake("moe_finalize::finalize_grad_input")
def _grad_input_fake(grad_out, input, row_map, weights, *, top_k=None, scale=1.0):
    num_tokens, hidden, _ = _fake_shape(input, row_map, weights, top_k, None)
    _check_rows(grad_out, "grad_out", num_tokens, hidden)
    return input.new_empty(input.shape)


@torch.library.register_fake("moe_finalize::finalize_grad_weights")
def _grad_weights_fake(grad_out, input, row_map, weights, *, top_k=None, scale=1.0):
    num_tokens, hidden, _ = _fake_shape(input, row_map, weights, top_k, None)
    _check_rows(grad_out, "grad_out", num_tokens, hidden)
    k = row_map.shape[1] if row_map is not None else (
        weights.shape[1] if weights is not None else top_k)
    return input.new_empty((num_tokens, k), dtype=torch.float32)


# ---- autograd ----------------------------------------------------------------------------------
# torch.library.register_autograd only differentiates positional tensors, and `residual` is
# keyword-only in the schema, so the Autograd kernel is registered directly: one
# autograd.Function that sees input, weights, residual and bias.


def _bias_backward(grad_out: Tensor, row_map: Optional[Tensor], weights: Optional[Tensor],
                   bias: Tensor, expert_ids: Tensor, scale: float, need_bias: bool,
                   need_weights: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The bias term's gradients, composed of PyTorch ops (fp32, index_add over valid slots):

        grad_bias[e]      += scale * w[t, k] * grad_out[t]      (e = expert_ids[t, k])
        grad_weights[t, k] += scale * <grad_out[t], bias[e]>
    """
    num_tokens, k = expert_ids.shape
    valid = (row_map >= 0) if row_map is not None else torch.ones_like(expert_ids, dtype=torch.bool)
    valid = valid & (expert_ids >= 0) & (expert_ids < bias.shape[0])
    experts = torch.where(valid, expert_ids.long(), torch.zeros_like(expert_ids, dtype=torch.long))
    grad = grad_out.float() * scale
    w = weights.float() if weights is not None else grad.new_ones(num_tokens, k)
    grad_bias = grad_weights = None
    if need_bias:
        contrib = (w * valid).unsqueeze(-1) * grad.unsqueeze(1)  # [T, K, H]
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        grad_bias.index_add_(0, experts.reshape(-1), contrib.reshape(-1, bias.shape[1]))
        grad_bias = grad_bias.to(bias.dtype)
    if need_weights and weights is not None:
        dots = torch.einsum("tkh,th->tk", bias.float()[experts], grad)
        grad_weights = torch.where(valid, dots, torch.zeros_like(dots))
    return grad_bias, grad_weights


class _FinalizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keyset, input, row_map, weights, residual, top_k, scale, bias, expert_ids,
                input_scales):
        with torch._C._AutoDispatchBelowAutograd():  # input_scales: only to get its error
            result = _FINALIZE.redispatch(
                keyset & torch._C._after_autograd_keyset, input, row_map, weights,
                top_k=top_k, residual=residual, scale=scale, bias=bias, expert_ids=expert_ids,
                input_scales=input_scales,
            )
        ctx.save_for_backward(input, row_map, weights, bias, expert_ids)
        ctx.top_k, ctx.scale = top_k, scale
        ctx.residual_dtype = None if residual is None else residual.dtype
        return result

    @staticmethod
    def backward(ctx, grad_out):
        input, row_map, weights, bias, expert_ids = ctx.saved_tensors
        _, need_input, _, need_weights, need_residual, _, _, need_bias, _, _ = ctx.needs_input_grad
        grad_input, grad_weights = finalize_backward(
            grad_out, input, row_map, weights, top_k=ctx.top_k, scale=ctx.scale,
            need_input=need_input, need_weights=need_weights,
        )
        grad_bias = None
        if bias is not None and (need_bias or need_weights):
            grad_bias, bias_grad_weights = _bias_backward(
                grad_out, row_map, weights, bias, expert_ids, ctx.scale, need_bias, need_weights)
            if bias_grad_weights is not None:
                grad_weights = (grad_weights.float() + bias_grad_weights).to(weights.dtype)
        grad_residual = grad_out.to(ctx.residual_dtype) if need_residual else None
        return (None, grad_input, None, grad_weights, grad_residual, None, None, grad_bias, None,
                None)


def _wants_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _refuse_fp8_grad(input: Tensor) -> None:
    if input.dtype == _FP8:
        raise RuntimeError(
            "finalize: FP8 (float8_e4m3fn) input is inference-only: no gradients; an argument "
            "requires grad (use torch.no_grad() or detach)")


def _finalize_autograd(keyset, input, row_map, weights, *, top_k=None, residual=None, scale=1.0,
                       input_scales=None, out_dtype=None, bias=None, expert_ids=None):
    if _wants_grad(input, weights, residual, bias):
        _refuse_fp8_grad(input)
        if out_dtype is not None and out_dtype != input.dtype:
            _fake_out_dtype(input, None, out_dtype, False)  # raises the checks.cpp message
        return _FinalizeFunction.apply(keyset, input, row_map, weights, residual, top_k, scale,
                                       bias, expert_ids, input_scales)
    with torch._C._AutoDispatchBelowAutograd():
        return _FINALIZE.redispatch(
            keyset & torch._C._after_autograd_keyset, input, row_map, weights,
            top_k=top_k, residual=residual, scale=scale, input_scales=input_scales,
            out_dtype=out_dtype, bias=bias, expert_ids=expert_ids,
        )


def _finalize_out_autograd(keyset, out, input, row_map, weights, *, top_k=None, residual=None,
                           scale=1.0, input_scales=None, bias=None, expert_ids=None):
    if _wants_grad(out, input, weights, residual, bias):
        _refuse_fp8_grad(input)
        raise RuntimeError(
            "finalize: the out= form does not support autograd (an argument requires grad); "
            "call finalize without out="
        )
    with torch._C._AutoDispatchBelowAutograd():
        _FINALIZE_OUT.redispatch(
            keyset & torch._C._after_autograd_keyset, out, input, row_map, weights,
            top_k=top_k, residual=residual, scale=scale, input_scales=input_scales, bias=bias,
            expert_ids=expert_ids,
        )


def _finalize_fp8_out_autograd(keyset, out, out_scales, input, row_map, weights, *, top_k=None,
                               residual=None, scale=1.0, input_scales=None, bias=None,
                               expert_ids=None, amax_floor=1e-10):
    if _wants_grad(input, weights, residual, bias):
        raise RuntimeError("finalize_fp8: FP8 output is inference-only; an argument requires "
                           "grad (use torch.no_grad() or detach)")
    with torch._C._AutoDispatchBelowAutograd():
        _FINALIZE_FP8_OUT.redispatch(
            keyset & torch._C._after_autograd_keyset, out, out_scales, input, row_map, weights,
            top_k=top_k, residual=residual, scale=scale, input_scales=input_scales, bias=bias,
            expert_ids=expert_ids, amax_floor=amax_floor,
        )


_LIB = torch.library.Library("moe_finalize", "IMPL")
_LIB.impl("finalize", _finalize_autograd, "Autograd", with_keyset=True)
_LIB.impl("finalize_out", _finalize_out_autograd, "Autograd", with_keyset=True)
_LIB.impl("finalize_fp8_out", _finalize_fp8_out_autograd, "Autograd", with_keyset=True)
