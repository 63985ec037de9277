"""vLLM adapter: vLLM 0.33's MoE finalize steps run on the `moe_finalize` ops.

vLLM loads this through its general-plugin entry point (group ``vllm.general_plugins``, name
``moe_finalize``, target :func:`register`) in every process before a model is built. Once
installed, three places of ``vllm.model_executor.layers.fused_moe`` use our op:

* ``vllm._custom_ops.moe_sum`` (the unweighted top-k sum after GEMM2, with optional
  ``topk_ids`` / ``expert_map`` masking) -> ``moe_finalize.finalize_out``; a slot is skipped
  exactly when vLLM's kernel skips it: ``topk_ids < 0``, or ``expert_map[topk_ids] < 0``.
* ``TopKWeightAndReduceContiguous.apply`` (``mul_`` by the router weights, then ``moe_sum``:
  two passes over ``[M, topk, K]``) -> one fused weight-and-reduce pass.
* ``UnquantizedFusedMoEMethod`` -> a subclass (``CustomOp.register_oot``) that hands every
  ``TritonExperts`` it builds our op as ``post_gemm2_hook``: GEMM2 then skips the router-weight
  multiply and the hook weights (fp32), skips remote (-1) slots and reduces in one pass.

What it cannot serve exactly it leaves alone and says so at debug level: LoRA layers and
layers with router weights on the input (``TritonExperts`` refuses the hook for both), experts
other than ``TritonExperts`` (e.g. FlashInfer TRT-LLM, whose finalize runs inside the vendor
kernel or is deferred to a fused consumer), and layouts our op does not take (they go to the
original vLLM function). Numerics: accumulation is fp32 in k order with one rounding, as in
vLLM's ``moe_sum``; the fused paths apply the fp32 router weight before that rounding instead
of after a bf16/fp16 rounding, so results differ from plugin-off runs by about one ulp.

``MOE_FINALIZE_PLUGIN=0`` turns it off. Only vLLM 0.33.x is supported: on any other version,
with an expected vLLM symbol missing, or on a platform our build has no kernels for,
:func:`register` logs a warning and changes nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .ops import finalize

__all__ = [
    "ENV_SWITCH",
    "SUPPORTED_VLLM_SERIES",
    "install_post_gemm2_hook",
    "installed",
    "post_gemm2_hook",
    "register",
]

ENV_SWITCH = "MOE_FINALIZE_PLUGIN"
SUPPORTED_VLLM_SERIES = (0, 33)
# A child of vLLM's "vllm" logger, so vLLM's handler, format and VLLM_LOGGING_LEVEL apply.
LOGGER_NAME = "vllm.moe_finalize_plugin"
_OOT_NAME = "UnquantizedFusedMoEMethod"
_OFF_VALUES = ("0", "false", "off", "no")

_FUSED_MOE = "vllm.model_executor.layers.fused_moe"
# (module, attribute, parameter names of the callable, or None for a non-callable):
# a missing or reshaped symbol means this is not the vLLM the adapter was written against.
_EXPECTED: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("vllm._custom_ops", "moe_sum", ("input", "output", "topk_ids", "expert_map")),
    ("vllm.model_executor.custom_op", "op_registry_oot", None),
    (f"{_FUSED_MOE}.topk_weight_and_reduce", "TopKWeightAndReduceContiguous", None),
    (f"{_FUSED_MOE}.modular_kernel", "FusedMoEExperts", None),
    (f"{_FUSED_MOE}.moe_output", "UnfinalizedMoEOutput", None),
    (f"{_FUSED_MOE}.experts.triton_moe", "TritonExperts", None),
    (f"{_FUSED_MOE}.unquantized_fused_moe_method", "UnquantizedFusedMoEMethod", None),
)
_CONTIGUOUS_APPLY_PARAMS = (
    "self", "output", "fused_expert_output", "topk_weights", "topk_ids",
    "apply_router_weight_on_input",
)
_UNFINALIZED_FIELDS = {"gemm2_permuted", "expert_weights", "expanded_idx_to_permuted_idx"}


class _Unsupported(Exception):
    """This process's vLLM or platform is not one the adapter can serve exactly."""


@dataclasses.dataclass
class _State:
    """What :func:`register` changed in this interpreter (inherited by forked children)."""

    replaced: list[str] = dataclasses.field(default_factory=list)
    # Saved vLLM callables: the fallbacks for layouts our op does not take.
    original_moe_sum: Callable[..., None] | None = None
    original_contiguous_apply: Callable[..., Tensor] | None = None
    triton_experts: type | None = None
    logged_pid: int | None = None


_STATE = _State()


def _logger() -> Any:
    from vllm.logger import init_logger

    return init_logger(LOGGER_NAME)


def installed() -> tuple[str, ...]:
    """What :func:`register` replaced in this process (empty when it changed nothing)."""
    return tuple(_STATE.replaced)


# ---- the three replacements --------------------------------------------------------------------


def _rows_view(x: Tensor, rows: int, hidden: int) -> Tensor | None:
    """``x`` ([T, K, H] or [T*K, H]) as ``[rows, hidden]`` rows of unit last-dim stride, or
    None when that needs a copy (then the caller hands the call back to vLLM)."""
    if x.dim() not in (2, 3) or x.size(-1) != hidden or x.numel() != rows * hidden:
        return None
    if hidden > 1 and x.stride(-1) != 1:
        return None
    if x.dim() == 3 and x.size(0) > 1 and x.size(1) > 1 and x.stride(0) != x.size(1) * x.stride(1):
        return None
    return x.view(rows, hidden)


def _moe_sum(
    input: Tensor,
    output: Tensor,
    topk_ids: Tensor | None = None,
    expert_map: Tensor | None = None,
) -> None:
    """``vllm._custom_ops.moe_sum`` on our op: ``output[t] = sum_k input[t, k]`` in fp32.

    Same masking as vLLM's pad-aware kernel: with ``topk_ids`` a slot is skipped when
    ``topk_ids[t, k] < 0`` or (with ``expert_map``) ``expert_map[topk_ids[t, k]] < 0``;
    ``expert_map`` without ``topk_ids`` is ignored, as there. Skipped rows are never read.
    """
    num_tokens, top_k, hidden = (input.shape if input.dim() == 3 else (-1, -1, -1))
    rows = None
    if (
        num_tokens >= 0
        and output.dtype == input.dtype
        and output.is_contiguous()
        and output.numel() == num_tokens * hidden
        and (topk_ids is None or tuple(topk_ids.shape) == (num_tokens, top_k))
    ):
        rows = _rows_view(input, num_tokens * top_k, hidden)
    if rows is None:
        assert _STATE.original_moe_sum is not None
        _STATE.original_moe_sum(input, output, topk_ids, expert_map)
        return
    row_map = None
    if topk_ids is not None:
        skip = topk_ids < 0
        if expert_map is not None:
            # clamp: the -1 slots must index something; they are skipped either way.
            local = expert_map[topk_ids.clamp(0, expert_map.numel() - 1)]
            skip = skip | (local < 0)
        slots = torch.arange(num_tokens * top_k, dtype=torch.int32, device=input.device)
        row_map = slots.view(num_tokens, top_k).masked_fill(skip, -1)
    finalize(rows, row_map, None, top_k=top_k, out=output.view(num_tokens, hidden))


def _contiguous_apply(
    self: Any,
    output: Tensor | None,
    fused_expert_output: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    apply_router_weight_on_input: bool,
) -> Tensor:
    """``TopKWeightAndReduceContiguous.apply`` in one pass: weight (unless the weights were
    applied on the input) and reduce ``[m, topk, k]`` into ``output`` ``[m, k]``.

    Unlike vLLM's version it leaves ``fused_expert_output`` unscaled (vLLM ``mul_``s it in
    place as a side effect nothing reads).
    """
    m, num_topk = topk_ids.size()
    hidden = fused_expert_output.size(-1)
    rows = _rows_view(fused_expert_output, m * num_topk, hidden)
    if output is not None and (
        tuple(output.shape) != (m, hidden)
        or output.dtype != fused_expert_output.dtype
        or (hidden > 1 and output.stride(-1) != 1)
    ):
        rows = None
    if rows is None:
        assert _STATE.original_contiguous_apply is not None
        return _STATE.original_contiguous_apply(
            self, output, fused_expert_output, topk_weights, topk_ids,
            apply_router_weight_on_input,
        )
    if output is None:
        output = fused_expert_output.new_empty((m, hidden))
    weights = None if apply_router_weight_on_input else topk_weights.view(m, num_topk)
    finalize(rows, None, weights, top_k=num_topk, out=output)
    return output


def post_gemm2_hook(unfinalized: Any, output: Tensor) -> None:
    """vLLM ``FusedMoEExperts.post_gemm2_hook``: finalize the unweighted GEMM2 rows.

    ``output[t] = sum_{k: map[t, k] >= 0} expert_weights[t, k] * gemm2_permuted[map[t, k]]``
    with ``map = expanded_idx_to_permuted_idx`` (-1: expert on another rank), written in place.
    """
    finalize(
        unfinalized.gemm2_permuted,
        unfinalized.expanded_idx_to_permuted_idx,
        unfinalized.expert_weights,
        out=output,
    )


def install_post_gemm2_hook(
    fused_experts: Any, *, lora: bool, apply_router_weight_on_input: bool
) -> bool:
    """Give ``fused_experts`` our :func:`post_gemm2_hook` when vLLM honours it exactly there.

    Returns whether it did; the reason it did not is logged at debug level.
    """
    log = _logger()
    name = type(fused_experts).__name__
    reason = None
    if _STATE.triton_experts is None or type(fused_experts) is not _STATE.triton_experts:
        # TritonExperts subclasses (e.g. TritonWNA16Experts) override apply() without the hook.
        reason = (
            "only TritonExperts hands its GEMM2 rows to post_gemm2_hook here; the finalize of "
            "this backend stays its own (it reaches moe_sum / "
            "TopKWeightAndReduceContiguous, replaced, if it uses them)"
        )
    elif lora:
        reason = "LoRA is enabled, and TritonExperts refuses post_gemm2_hook with LoRA"
    elif apply_router_weight_on_input:
        reason = (
            "router weights are applied on the input, and TritonExperts refuses "
            "post_gemm2_hook then"
        )
    elif fused_experts.post_gemm2_hook is not None:
        reason = "another post_gemm2_hook is already set"
    if reason is not None:
        log.debug_once("moe_finalize_plugin: %s left untouched: %s.", name, reason)
        return False
    # On the instance: a plain function stored on the class would be bound as a method.
    fused_experts.post_gemm2_hook = post_gemm2_hook
    log.debug_once("moe_finalize_plugin: post_gemm2_hook installed on %s.", name)
    return True


def _make_method_class(base: type) -> type:
    """The ``UnquantizedFusedMoEMethod`` subclass registered out-of-tree (vLLM's CustomOp
    ``__new__`` then builds it wherever vLLM builds an ``UnquantizedFusedMoEMethod``)."""

    class MoeFinalizeUnquantizedFusedMoEMethod(base):  # type: ignore[misc, valid-type]
        """``UnquantizedFusedMoEMethod`` whose ``TritonExperts`` finalize through our op."""

        _moe_finalize_plugin = True

        def _init_moe_kernel(self, layer: Any) -> None:
            # Every (re)build of the layer's kernel goes through here; the experts exist now.
            super()._init_moe_kernel(layer)
            _log_summary_once()
            install_post_gemm2_hook(
                self.moe_kernel.fused_experts,
                lora=bool(self.moe.is_lora_enabled),
                apply_router_weight_on_input=bool(
                    getattr(layer, "apply_router_weight_on_input", False)
                ),
            )

    MoeFinalizeUnquantizedFusedMoEMethod.__module__ = __name__
    # Module-level name, so instances pickle by reference like vLLM's own classes.
    globals()[MoeFinalizeUnquantizedFusedMoEMethod.__name__] = MoeFinalizeUnquantizedFusedMoEMethod
    return MoeFinalizeUnquantizedFusedMoEMethod


# ---- checks and installation -------------------------------------------------------------------


def _enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF_VALUES


def _check_version() -> str:
    import vllm

    version = str(getattr(vllm, "__version__", ""))
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) != SUPPORTED_VLLM_SERIES:
        raise _Unsupported(
            f"vLLM {version or '(unknown version)'} is not supported (this plugin serves vLLM "
            f"{SUPPORTED_VLLM_SERIES[0]}.{SUPPORTED_VLLM_SERIES[1]}.x)"
        )
    return version


def _param_names(fn: Callable[..., Any]) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _resolve() -> dict[str, Any]:
    """The vLLM symbols the adapter touches, checked for shape before anything changes."""
    found: dict[str, Any] = {}
    for module_name, attr, params in _EXPECTED:
        try:
            value = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise _Unsupported(f"{module_name}.{attr} is missing ({exc})") from exc
        if params is not None and _param_names(value) != params:
            raise _Unsupported(f"{module_name}.{attr} has an unexpected signature")
        found[attr] = value
    apply = getattr(found["TopKWeightAndReduceContiguous"], "apply", None)
    if apply is None or _param_names(apply) != _CONTIGUOUS_APPLY_PARAMS:
        raise _Unsupported("TopKWeightAndReduceContiguous.apply has an unexpected signature")
    experts = found["FusedMoEExperts"]
    if not hasattr(experts, "post_gemm2_hook") or not hasattr(experts, "_run_post_gemm2_hook"):
        raise _Unsupported("FusedMoEExperts has no post_gemm2_hook")
    fields = {f.name for f in dataclasses.fields(found["UnfinalizedMoEOutput"])}
    if not _UNFINALIZED_FIELDS <= fields:
        raise _Unsupported("UnfinalizedMoEOutput lacks " + ", ".join(_UNFINALIZED_FIELDS - fields))
    method = found["UnquantizedFusedMoEMethod"]
    if not callable(getattr(method, "_init_moe_kernel", None)) or not hasattr(method, "register_oot"):
        raise _Unsupported("UnquantizedFusedMoEMethod has no _init_moe_kernel / register_oot")
    if not isinstance(found["op_registry_oot"], dict):
        raise _Unsupported("vllm.model_executor.custom_op.op_registry_oot is not a dict")
    return found


def _check_platform() -> str:
    """vLLM's device must be one our build has kernels for (else a forward would fail)."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        key = "CUDA"
    elif current_platform.is_cpu():
        key = "CPU"
    else:
        raise _Unsupported(f"platform {type(current_platform).__name__} has no moe_finalize kernels")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("moe_finalize::finalize_out", key):
        raise _Unsupported(f"this moe_finalize_plugin build has no {key} kernels")
    return key


def _install(found: dict[str, Any]) -> None:
    """Apply the three replacements (checks are done; each step is a plain assignment)."""
    log = _logger()
    custom_ops = importlib.import_module("vllm._custom_ops")
    contiguous = found["TopKWeightAndReduceContiguous"]
    registry: dict[str, type] = found["op_registry_oot"]
    method = found["UnquantizedFusedMoEMethod"]

    _STATE.original_moe_sum = found["moe_sum"]
    _STATE.original_contiguous_apply = contiguous.apply
    _STATE.triton_experts = found["TritonExperts"]
    custom_ops.moe_sum = _moe_sum
    _STATE.replaced.append("vllm._custom_ops.moe_sum -> moe_finalize.finalize_out")
    contiguous.apply = _contiguous_apply
    _STATE.replaced.append(
        "TopKWeightAndReduceContiguous.apply -> one fused weight+reduce pass"
    )

    existing = registry.get(_OOT_NAME)
    if existing is not None and not getattr(existing, "_moe_finalize_plugin", False):
        log.warning(
            "moe_finalize_plugin: %s is already replaced out of tree by %s.%s; "
            "post_gemm2_hook not installed (moe_sum and TopKWeightAndReduceContiguous are).",
            _OOT_NAME, existing.__module__, existing.__qualname__,
        )
        return
    if existing is None:
        cls = _make_method_class(method)
        method.register_oot(cls)
        # register_oot renames the class to the registry key; keep vLLM's op name so
        # CompilationConfig.custom_ops ("+/-unquantized_fused_moe") still applies to it.
        cls.name = method.name
    _STATE.replaced.append(
        f"{_OOT_NAME} -> MoeFinalizeUnquantizedFusedMoEMethod "
        "(post_gemm2_hook on the TritonExperts it builds)"
    )


def _log_summary_once() -> None:
    """Log what was replaced, once per process, as soon as vLLM's logging is set up (vLLM's
    front end loads plugins before it configures logging; a MoE layer build comes after)."""
    if not _STATE.replaced or _STATE.logged_pid == os.getpid():
        return
    log = _logger()
    if not log.hasHandlers():
        return
    _STATE.logged_pid = os.getpid()
    import vllm

    from . import __version__

    log.info(
        "moe_finalize_plugin %s active for vLLM %s, replaced: %s. Set %s=0 to disable.",
        __version__, vllm.__version__, "; ".join(_STATE.replaced), ENV_SWITCH,
    )


def register() -> None:
    """vLLM general-plugin entry point: install our finalize (see the module docstring).

    Re-entrant and cheap (a few attribute assignments once vLLM's MoE modules are imported);
    it does not touch CUDA. It never raises: anything unexpected is logged as a warning and
    vLLM is left as it was.
    """
    try:
        _register()
    except Exception:  # noqa: BLE001 -- a plugin must never take the engine down
        logging.getLogger(LOGGER_NAME).warning(
            "moe_finalize_plugin: not installed (unexpected error)", exc_info=True
        )


def _register() -> None:
    log = _logger()
    if _STATE.replaced:
        _log_summary_once()
        return
    if not _enabled_by_env():
        log.info_once(
            "moe_finalize_plugin: disabled by %s=%s; vLLM left unchanged.",
            ENV_SWITCH, os.environ.get(ENV_SWITCH),
        )
        return
    try:
        _check_version()
        _check_platform()
        found = _resolve()
    except _Unsupported as exc:
        log.warning("moe_finalize_plugin: %s; vLLM left unchanged.", exc)
        return
    custom_ops = importlib.import_module("vllm._custom_ops")
    contiguous = found["TopKWeightAndReduceContiguous"]
    registry: dict[str, type] = found["op_registry_oot"]
    saved = (custom_ops.moe_sum, contiguous.__dict__.get("apply"), registry.get(_OOT_NAME))
    try:
        _install(found)
    except Exception:
        # Put back whatever was changed, then let register() report it.
        custom_ops.moe_sum = saved[0]
        if saved[1] is not None:
            contiguous.apply = saved[1]
        if saved[2] is None:
            registry.pop(_OOT_NAME, None)
        _STATE.replaced.clear()
        raise
    _log_summary_once()
