"""A transformers experts implementation, ``"moe_finalize"``, that ends in one `finalize` call.

transformers (>= 5.16) dispatches every ``@use_experts_implementation`` experts module through
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``. Its stock ``grouped_mm`` implementation
sorts the (token, slot) pairs by expert, runs two grouped GEMMs, and then makes three passes
over the ``[T*K, H]`` expert output: multiply by the routing weights, un-permute with the
inverse permutation, and sum over the K slots. This implementation runs the very same sort,
grouped GEMMs, biases, gate and post-expert norm (transformers' own helpers), and replaces those
three passes by one fused ``moe_finalize_plugin.finalize`` with

    row_map = inverse permutation viewed [T, K]   (EP sentinel slots -> -1, never read)
    weights = top_k_weights                        ([T, K], the router's dtype)

so ``out[t] = sum_k w[t, k] * proj_out[row_map[t, k]]`` accumulated in fp32 with one rounding.
Autograd flows through the op to the expert output, the routing weights (router training) and,
from there, to the expert weights and the hidden states.

Use it (one line after the import)::

    import moe_finalize_plugin.transformers_experts as mfx
    mfx.register()
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_finalize")
    # or, on a model already built:  model.set_experts_implementation("moe_finalize")
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _grouped_linear

import moe_finalize_plugin

__all__ = ["EXPERTS_IMPLEMENTATION", "finalize_step", "moe_finalize_experts_forward", "register"]

#: The name under which `register()` adds the implementation to transformers' ExpertsInterface.
EXPERTS_IMPLEMENTATION = "moe_finalize"


def moe_finalize_experts_forward(
    self: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
) -> Tensor:
    """Experts forward with the signature transformers' ExpertsInterface expects.

    Args:
        self: an experts module decorated with ``@use_experts_implementation`` (its
            ``num_experts``, ``gate_up_proj``/``up_proj``, ``down_proj``, optional biases,
            ``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate``/``act_fn`` and, on
            transformers >= 5.20, ``has_post_expert_norm`` / ``_is_expert_parallel``).
        hidden_states: ``[T, H]`` token activations.
        top_k_index: ``[T, K]`` expert ids; ids ``>= self.num_experts`` are expert-parallel
            sentinels (the expert lives on another rank) and contribute nothing.
        top_k_weights: ``[T, K]`` routing weights (fp32, bf16 or fp16).

    Returns:
        ``[T, H]`` in ``hidden_states.dtype``: what ``grouped_mm_experts_forward`` returns, up to
        the rounding of the weighted sum (here fp32 throughout, one rounding at the end).
    """
    device = hidden_states.device
    num_top_k = top_k_index.shape[-1]
    num_experts = self.num_experts

    # Sort the (token, slot) pairs by expert, exactly as grouped_mm does: sentinels sort to the
    # tail, and histc(max=num_experts - 1) leaves them out of the offsets, so no GEMM touches them.
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected_hidden_states_g = hidden_states[perm // num_top_k]
    # histc: CPU/MPS only take float input, CUDA only int under deterministic algorithms.
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)

    # transformers 5.20 masks sentinel rows only on modules it split across EP ranks; 5.16/5.17
    # have no such flag and always mask. The masks cost a pass each, so follow the version.
    sentinel_mask = None
    if getattr(self, "_is_expert_parallel", True):
        sentinel_mask = (expert_ids_g >= num_experts).unsqueeze(-1)
    if self.has_bias:
        # In-bounds bias gather for sentinel rows (their results are never read).
        expert_ids_g = expert_ids_g.clamp(max=num_experts - 1)

    if self.has_gate:
        up_weights = self.gate_up_proj
        up_biases = self.gate_up_proj_bias[expert_ids_g] if self.has_bias else None
    else:
        up_weights = self.up_proj
        up_biases = self.up_proj_bias[expert_ids_g] if self.has_bias else None

    # The grouped GEMMs leave sentinel-tail rows uninitialised in the forward output and in the
    # backward d_input; zeroing the gathered input keeps that garbage out of d(hidden_states).
    if sentinel_mask is not None:
        selected_hidden_states_g.masked_fill_(sentinel_mask, 0.0)

    proj_out = _grouped_linear(
        selected_hidden_states_g, up_weights, offsets, bias=up_biases, is_transposed=self.is_transposed
    )
    if sentinel_mask is not None:
        # Finite gate input on sentinel rows, as transformers >= 5.17 does.
        proj_out = proj_out.masked_fill(sentinel_mask, 0.0)
    proj_out = self._apply_gate(proj_out) if self.has_gate else self.act_fn(proj_out)

    down_biases = self.down_proj_bias[expert_ids_g] if self.has_bias else None
    proj_out = _grouped_linear(proj_out, self.down_proj, offsets, bias=down_biases, is_transposed=self.is_transposed)
    # No mask after the down projection: finalize never reads a row whose map entry is -1,
    # so its backward also leaves those rows' gradients at zero.
    if getattr(self, "has_post_expert_norm", False):
        proj_out = self.post_expert_norm(proj_out)

    out = finalize_step(proj_out, perm, top_k_index, top_k_weights, num_experts)
    # grouped_mm returns hidden_states' dtype (differs from proj_out's under autocast).
    return out.to(hidden_states.dtype)


def finalize_step(
    proj_out: Tensor, perm: Tensor, top_k_index: Tensor, top_k_weights: Tensor, num_experts: int
) -> Tensor:
    """Everything after the expert GEMMs: un-permute, weight, sum over K, in one op.

    Args:
        proj_out: ``[T*K, H]`` expert outputs in expert-sorted order.
        perm: ``[T*K]`` the sort permutation (``proj_out[i]`` belongs to flat slot ``perm[i]``).
        top_k_index: ``[T, K]`` expert ids; ids ``>= num_experts`` are EP sentinels.
        top_k_weights: ``[T, K]`` routing weights.
        num_experts: experts held by this module (rank).

    Returns:
        ``[T, H]`` in ``proj_out``'s dtype.
    """
    num_tokens, num_top_k = top_k_index.shape
    # Row of proj_out holding (token t, slot k): the inverse of the sort permutation.
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    # A [T, K] compare is cheap, so sentinels are skipped whatever the EP flag says.
    row_map = inv_perm.view(num_tokens, num_top_k).masked_fill(top_k_index >= num_experts, -1)
    return moe_finalize_plugin.finalize(proj_out, row_map, top_k_weights)


def register(name: str = EXPERTS_IMPLEMENTATION, *, replace_grouped_mm: bool = False) -> str:
    """Add the implementation to transformers' global ExpertsInterface; returns the name.

    Idempotent. After it, ``experts_implementation=name`` works in ``from_pretrained`` /
    ``from_config`` and ``model.set_experts_implementation(name)`` on a built model.

    ``replace_grouped_mm=True`` also installs it under ``"grouped_mm"``, the implementation
    transformers picks when none is requested, for the whole process: the way to reach code that
    loads models itself, such as ``transformers serve`` (call it from a ``sitecustomize.py``).
    """
    ALL_EXPERTS_FUNCTIONS.register(name, moe_finalize_experts_forward)
    if replace_grouped_mm:
        ALL_EXPERTS_FUNCTIONS.register("grouped_mm", moe_finalize_experts_forward)
    return name
