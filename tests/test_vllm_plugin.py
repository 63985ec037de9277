"""The vLLM adapter (moe_finalize_plugin.vllm_plugin) against the real, installed vLLM 0.33.

Registration changes process-global vLLM state, so everything that imports vLLM runs in two
child processes (this file run as a script), each a sequence of named checks; the pytest
tests below assert one check each. Tensors are CPU tensors (VLLM_TARGET_DEVICE=cpu).

* ``registration``: version / missing-symbol simulations, ``VLLM_PLUGINS`` allow-list,
  ``MOE_FINALIZE_PLUGIN=0``, entry-point discovery through ``load_general_plugins()``,
  ``register()`` twice, the log lines.
* ``paths``: vLLM's own code paths after ``register()``: the out-of-tree
  ``UnquantizedFusedMoEMethod`` and the ``TritonExperts`` it builds, the post-GEMM2 hook, the
  modular kernel with ``MoEPrepareAndFinalizeNoDPEPModular``, ``TopKWeightAndReduceContiguous``,
  ``moe_sum`` with and without ``topk_ids`` / ``expert_map``, ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_MARKER = "MOE_FINALIZE_VLLM_CHECKS="
SCENARIO_TIMEOUT_S = 900

REGISTRATION_CHECKS = (
    "entry_point_declared",
    "unsupported_version_leaves_vllm_untouched",
    "missing_symbol_leaves_vllm_untouched",
    "vllm_plugins_allowlist_excludes_it",
    "env_switch_off_disables_it",
    "load_general_plugins_discovers_and_calls_register",
    "register_twice_is_harmless",
    "logs_once_what_it_replaced",
)
PATH_CHECKS = (
    "unquantized_method_is_our_subclass",
    "triton_experts_built_through_it_carry_the_hook",
    "summary_logged_once_when_logging_is_up",
    "lora_layer_left_untouched",
    "router_weight_on_input_layer_left_untouched",
    "other_experts_left_untouched",
    "hook_via_triton_experts_run_post_gemm2_hook",
    "modular_kernel_hook_path",
    "modular_kernel_moe_sum_path",
    "modular_kernel_delegate_contiguous_path",
    "topk_weight_and_reduce_contiguous_apply",
    "no_dp_ep_prepare_and_finalize",
    "moe_sum_plain",
    "moe_sum_topk_ids_and_expert_map",
    "moe_sum_unserved_layout_goes_to_vllm",
    "hook_path_compiles_fullgraph",
    "moe_sum_compiles_fullgraph",
)


# ---- pytest side -------------------------------------------------------------------------------


def _run_scenario(name: str) -> dict[str, str | None]:
    env = dict(os.environ)
    env["VLLM_TARGET_DEVICE"] = "cpu"
    for var in ("VLLM_PLUGINS", "MOE_FINALIZE_PLUGIN"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), name],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"scenario {name!r} exited {proc.returncode} without results\n"
            f"--- stdout (tail)\n{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-8000:]}"
        )
    return json.loads(lines[-1][len(RESULT_MARKER):])


@pytest.fixture(scope="module")
def registration_results() -> dict[str, str | None]:
    return _run_scenario("registration")


@pytest.fixture(scope="module")
def path_results() -> dict[str, str | None]:
    return _run_scenario("paths")


@pytest.mark.parametrize("check", REGISTRATION_CHECKS)
def test_registration(registration_results: dict[str, str | None], check: str) -> None:
    assert check in registration_results, f"the registration scenario did not run {check}"
    assert registration_results[check] is None, registration_results[check]


@pytest.mark.parametrize("check", PATH_CHECKS)
def test_vllm_code_path(path_results: dict[str, str | None], check: str) -> None:
    assert check in path_results, f"the paths scenario did not run {check}"
    assert path_results[check] is None, path_results[check]


# ---- child-process side: shared helpers ----------------------------------------------------------


class _Checks:
    """Runs named checks in order and keeps each one's traceback (None = passed)."""

    def __init__(self) -> None:
        self.results: dict[str, str | None] = {}

    def run(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            self.results[name] = None
        except BaseException:  # noqa: BLE001 -- report every failure, keep going
            self.results[name] = traceback.format_exc()


class _Records(logging.Handler):
    """Collects the adapter's log records (its logger is a child of vLLM's)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int | None = None) -> list[str]:
        return [r.getMessage() for r in self.records if level is None or r.levelno == level]


def _capture_plugin_log() -> _Records:
    from moe_finalize_plugin import vllm_plugin

    handler = _Records()
    logger = logging.getLogger(vllm_plugin.LOGGER_NAME)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return handler


def _vllm_targets() -> dict[str, Any]:
    """The three things register() replaces, as they are now."""
    import vllm._custom_ops as custom_ops
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceContiguous,
    )

    return {
        "moe_sum": custom_ops.moe_sum,
        "contiguous_apply": TopKWeightAndReduceContiguous.__dict__["apply"],
        "oot": op_registry_oot.get("UnquantizedFusedMoEMethod"),
    }


# ---- scenario "registration" ------------------------------------------------------------------


def _scenario_registration() -> dict[str, str | None]:
    from importlib.metadata import entry_points

    import vllm
    import vllm._custom_ops as custom_ops
    import vllm.plugins

    from moe_finalize_plugin import vllm_plugin

    log = _capture_plugin_log()
    pristine = _vllm_targets()
    checks = _Checks()

    def untouched() -> None:
        assert _vllm_targets() == pristine, "vLLM was changed"
        assert vllm_plugin.installed() == ()

    def entry_point_declared() -> None:
        ours = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "moe_finalize"]
        assert len(ours) == 1, "the moe_finalize entry point is not installed (pip install -e .)"
        assert ours[0].value == "moe_finalize_plugin.vllm_plugin:register", ours[0].value

    def unsupported_version() -> None:
        real = vllm.__version__
        vllm.__version__ = "0.34.0"
        try:
            vllm_plugin.register()
        finally:
            vllm.__version__ = real
        untouched()
        warnings = log.messages(logging.WARNING)
        assert any("0.34.0 is not supported" in m for m in warnings), warnings

    def missing_symbol() -> None:
        real = custom_ops.moe_sum
        del custom_ops.moe_sum
        try:
            vllm_plugin.register()
        finally:
            custom_ops.moe_sum = real
        untouched()
        warnings = log.messages(logging.WARNING)
        assert any("vllm._custom_ops.moe_sum is missing" in m for m in warnings), warnings

    def load_plugins(**env: str) -> None:
        """vLLM's own loader, as a fresh process would run it with `env`."""
        for var in ("VLLM_PLUGINS", "MOE_FINALIZE_PLUGIN"):
            os.environ.pop(var, None)
        os.environ.update(env)
        vllm.plugins.plugins_loaded = False
        vllm.plugins.load_general_plugins()

    def allowlist_excludes() -> None:
        load_plugins(VLLM_PLUGINS="some_other_plugin")
        untouched()

    def env_switch_off() -> None:
        load_plugins(MOE_FINALIZE_PLUGIN="0")
        untouched()
        infos = log.messages(logging.INFO)
        assert any("disabled by MOE_FINALIZE_PLUGIN=0" in m for m in infos), infos

    def discovers_and_calls() -> None:
        # No VLLM_PLUGINS, no MOE_FINALIZE_PLUGIN: installed means on.
        load_plugins()
        now = _vllm_targets()
        assert now["moe_sum"] is vllm_plugin._moe_sum
        assert now["contiguous_apply"] is vllm_plugin._contiguous_apply
        assert now["oot"] is not None and now["oot"].__name__ == "MoeFinalizeUnquantizedFusedMoEMethod"
        assert len(vllm_plugin.installed()) == 3, vllm_plugin.installed()

    def twice() -> None:
        before, replaced = _vllm_targets(), vllm_plugin.installed()
        vllm_plugin.register()
        vllm_plugin.register()
        assert _vllm_targets() == before
        assert vllm_plugin.installed() == replaced

    def logs_once() -> None:
        summaries = [m for m in log.messages(logging.INFO) if "active for vLLM" in m]
        assert len(summaries) == 1, summaries
        for what in (
            "vllm._custom_ops.moe_sum",
            "TopKWeightAndReduceContiguous.apply",
            "UnquantizedFusedMoEMethod -> MoeFinalizeUnquantizedFusedMoEMethod",
        ):
            assert what in summaries[0], summaries[0]

    checks.run("entry_point_declared", entry_point_declared)
    checks.run("unsupported_version_leaves_vllm_untouched", unsupported_version)
    checks.run("missing_symbol_leaves_vllm_untouched", missing_symbol)
    checks.run("vllm_plugins_allowlist_excludes_it", allowlist_excludes)
    checks.run("env_switch_off_disables_it", env_switch_off)
    checks.run("load_general_plugins_discovers_and_calls_register", discovers_and_calls)
    checks.run("register_twice_is_harmless", twice)
    checks.run("logs_once_what_it_replaced", logs_once)
    return checks.results


# ---- scenario "paths" -------------------------------------------------------------------------

E, E_LOCAL, TOPK, HIDDEN, INTER = 8, 4, 3, 72, 40


def _oracle_row_map(topk_ids: Any, expert_map: Any | None) -> Any:
    """Row t*K+k unless vLLM's pad-aware kernel skips the slot (topk_ids < 0, or
    expert_map[topk_ids] < 0): a plain loop over csrc/moe/moe_align_sum_kernels.cu's rule."""
    import torch

    num_tokens, k = topk_ids.shape
    row_map = torch.empty(num_tokens, k, dtype=torch.int64)
    for t in range(num_tokens):
        for s in range(k):
            expert = int(topk_ids[t, s])
            skip = expert < 0 or (expert_map is not None and int(expert_map[expert]) < 0)
            row_map[t, s] = -1 if skip else t * k + s
    return row_map


def _routing(num_tokens: int, gen: Any, *, num_experts: int = E) -> tuple[Any, Any]:
    """Random distinct top-k experts per token and fp32 weights (like a renormalized router)."""
    import torch

    ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :TOPK]
    weights = torch.rand(num_tokens, TOPK, generator=gen) + 0.1
    return ids.to(torch.int32), weights / weights.sum(dim=1, keepdim=True)


def _expert_map() -> Any:
    """EP rank 1 of 2: global experts 4..7 are local 0..3, the rest live elsewhere."""
    import torch

    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[E - E_LOCAL:] = torch.arange(E_LOCAL, dtype=torch.int32)
    return emap


def _gemm_rows(x: Any, w1: Any, w2: Any, topk_ids: Any, expert_map: Any | None,
               weights: Any | None) -> Any:
    """[M, topk, H] GEMM2 output of a SiLU-gated MoE, as TritonExperts' intermediate_cache3
    holds it (scaled by `weights` when GEMM2 applies them). Slots of remote experts are NaN:
    there those rows are never written, so a finalize that reads them fails loudly."""
    import torch

    local = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()].long()
    remote = local < 0
    local = local.clamp(min=0)
    gate_up = torch.einsum("mh,mkih->mki", x.float(), w1[local].float())
    act = (torch.nn.functional.silu(gate_up[..., :INTER]) * gate_up[..., INTER:]).to(x.dtype)
    rows = torch.einsum("mki,mkhi->mkh", act.float(), w2[local].float())
    if weights is not None:
        rows = rows * weights.float().unsqueeze(-1)
    rows = rows.to(x.dtype)
    rows[remote] = float("nan")
    return rows


def _scenario_paths() -> dict[str, str | None]:
    import dataclasses

    import torch
    import vllm._custom_ops as custom_ops
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        FusedMoEQuantConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.experts.fused_batched_moe import (
        BatchedTritonExperts,
    )
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel
    from vllm.model_executor.layers.fused_moe.moe_output import route_major_moe_output
    from vllm.model_executor.layers.fused_moe.prepare_finalize import (
        MoEPrepareAndFinalizeNoDPEPModular,
    )
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceContiguous,
        TopKWeightAndReduceDelegate,
        TopKWeightAndReduceNoOP,
    )
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    from moe_finalize_plugin import reference, vllm_plugin

    # No log handler yet, as in vLLM's front end before it configures logging: the summary
    # has to wait for the first MoE kernel build.
    handlers_at_register = logging.getLogger(vllm_plugin.LOGGER_NAME).hasHandlers()
    vllm_plugin.register()
    assert len(vllm_plugin.installed()) == 3, vllm_plugin.installed()
    log = _capture_plugin_log()
    # CPU has no Triton, so vLLM's oracle would refuse TritonExperts here; everything else
    # below (selection, kernel build, hook) is vLLM's own code.
    TritonExperts._supports_current_device = staticmethod(lambda: True)

    gen = torch.Generator().manual_seed(20261126)
    checks = _Checks()
    vllm_config = VllmConfig()

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def moe_config(dtype: torch.dtype, **overrides: Any) -> FusedMoEConfig:
        fields: dict[str, Any] = dict(
            num_experts=E, experts_per_token=TOPK, hidden_dim=HIDDEN, intermediate_size=INTER,
            num_local_experts=E, num_logical_experts=E, activation=MoEActivation.SILU,
            device="cpu", routing_method=RoutingMethodType.Renormalize,
            moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=dtype,
            moe_backend="triton",
        )
        fields.update(overrides)
        return FusedMoEConfig(**fields)

    def build_kernel(config: FusedMoEConfig, *, router_weight_on_input: bool = False) -> Any:
        """What vLLM does per MoE layer: instantiate the method, then build its kernel."""
        with set_current_vllm_config(vllm_config):
            method = UnquantizedFusedMoEMethod(config)
            layer = SimpleNamespace(
                apply_router_weight_on_input=router_weight_on_input,
                _expert_routing_tables=lambda: None,
            )
            method._init_moe_kernel(layer)
        return method

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        torch.testing.assert_close(actual, expected, equal_nan=False)

    def weights_and_experts(num_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = randn(num_experts, 2 * INTER, HIDDEN, dtype=dtype) / HIDDEN**0.5
        w2 = randn(num_experts, HIDDEN, INTER, dtype=dtype) / INTER**0.5
        return w1, w2

    # -- the out-of-tree method and the experts it builds

    def method_is_subclass() -> None:
        with set_current_vllm_config(vllm_config):
            method = UnquantizedFusedMoEMethod(moe_config(torch.bfloat16))
        assert type(method).__name__ == "MoeFinalizeUnquantizedFusedMoEMethod", type(method)
        assert isinstance(method, UnquantizedFusedMoEMethod)
        # vLLM's op name still governs it in CompilationConfig.custom_ops.
        assert type(method).name == "unquantized_fused_moe"

    def hooked_triton_experts() -> None:
        method = build_kernel(moe_config(torch.bfloat16))
        experts = method.moe_kernel.fused_experts
        assert type(experts) is TritonExperts, type(experts)
        assert experts.post_gemm2_hook is vllm_plugin.post_gemm2_hook
        assert isinstance(method.moe_kernel.prepare_finalize, MoEPrepareAndFinalizeNoDPEPModular)
        assert TritonExperts.post_gemm2_hook is None, "the hook leaked onto the class"

    def summary_logged_at_first_build() -> None:
        assert not handlers_at_register, "a log handler existed before register()"
        summaries = [m for m in log.messages(logging.INFO) if "active for vLLM" in m]
        assert len(summaries) == 1, summaries

    def lora_untouched() -> None:
        method = build_kernel(moe_config(torch.bfloat16, is_lora_enabled=True))
        experts = method.moe_kernel.fused_experts
        assert type(experts) is TritonExperts and experts.post_gemm2_hook is None
        debug = log.messages(logging.DEBUG)
        assert any("TritonExperts left untouched: LoRA" in m for m in debug), debug

    def router_weight_on_input_untouched() -> None:
        method = build_kernel(moe_config(torch.bfloat16), router_weight_on_input=True)
        assert method.moe_kernel.fused_experts.post_gemm2_hook is None
        debug = log.messages(logging.DEBUG)
        assert any("router weights are applied on the input" in m for m in debug), debug

    def other_experts_untouched() -> None:
        experts = BatchedTritonExperts(
            moe_config=moe_config(torch.bfloat16), quant_config=FusedMoEQuantConfig.make(),
            max_num_tokens=16, num_dispatchers=1,
        )
        assert not vllm_plugin.install_post_gemm2_hook(
            experts, lora=False, apply_router_weight_on_input=False
        )
        assert experts.post_gemm2_hook is None
        debug = log.messages(logging.DEBUG)
        assert any("BatchedTritonExperts left untouched" in m for m in debug), debug

    # -- the hook through TritonExperts._run_post_gemm2_hook

    def hook_via_run_post_gemm2_hook() -> None:
        for dtype in (torch.bfloat16, torch.float32):
            experts = build_kernel(moe_config(dtype)).moe_kernel.fused_experts
            for num_tokens, expert_map in ((1, None), (37, None), (29, _expert_map())):
                ids, weights = _routing(num_tokens, gen)
                rows = randn(num_tokens, TOPK, HIDDEN, dtype=dtype)
                row_map = _oracle_row_map(ids, expert_map)
                rows[row_map.view(num_tokens, TOPK) < 0] = float("nan")
                expected = reference.finalize(rows.view(-1, HIDDEN), row_map, weights)
                out = torch.full((num_tokens, HIDDEN), float("nan"), dtype=dtype)
                unfinalized = route_major_moe_output(rows, weights, ids, expert_map)
                assert experts._run_post_gemm2_hook(unfinalized, out) is out
                close(out, expected)
                # Without an output vLLM allocates one and the hook fills it.
                close(experts._run_post_gemm2_hook(unfinalized), expected)

    # -- the modular kernel (prepare -> experts -> finalize), GEMMs in PyTorch

    class TorchGemmTritonExperts(TritonExperts):
        """TritonExperts with its two Triton GEMMs done in PyTorch (no Triton on CPU). The
        tail is TritonExperts.apply's: the hook on unweighted rows, or GEMM2-weighted rows
        through self._finalize_expert_output (vLLM's, which calls ops.moe_sum)."""

        def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                  global_num_experts, expert_map, a1q_scale, a2_scale, workspace13,
                  workspace2, expert_tokens_meta, apply_router_weight_on_input):
            hooked = self._uses_post_gemm2_hook(hidden_states.shape[0])
            rows = _gemm_rows(hidden_states, w1, w2, topk_ids, expert_map,
                              None if hooked else topk_weights)
            if hooked:
                self._run_post_gemm2_hook(
                    route_major_moe_output(rows, topk_weights, topk_ids, expert_map), output
                )
            else:
                self._finalize_expert_output(rows, output, topk_ids, expert_map)

    class TorchGemmDelegateExperts(TorchGemmTritonExperts):
        """Experts that leave weight-and-reduce to the prepare/finalize (like the batched and
        CUTLASS experts): NoDPEP then runs TopKWeightAndReduceContiguous."""

        def finalize_weight_and_reduce_impl(self):
            return TopKWeightAndReduceDelegate()

        def workspace_shapes(self, M, N, K, topk, *args):
            ws13, ws2, _ = super().workspace_shapes(M, N, K, topk, *args)
            return ws13, ws2, (M, topk, K)

        def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                  global_num_experts, expert_map, **_):
            output.copy_(_gemm_rows(hidden_states, w1, w2, topk_ids, expert_map, None))

    def run_modular(experts_cls: type, *, hooked: bool, expert_map: torch.Tensor | None,
                    dtype: torch.dtype) -> None:
        num_local = E if expert_map is None else E_LOCAL
        w1, w2 = weights_and_experts(num_local, dtype)
        with set_current_vllm_config(vllm_config):
            experts = experts_cls(moe_config(dtype), FusedMoEQuantConfig.make())
            hook_calls: list[int] = []
            if hooked:
                def counted_hook(unfinalized: Any, output: torch.Tensor) -> None:
                    hook_calls.append(output.shape[0])
                    vllm_plugin.post_gemm2_hook(unfinalized, output)

                experts.post_gemm2_hook = counted_hook
            kernel = FusedMoEKernel(MoEPrepareAndFinalizeNoDPEPModular(), experts)
            for num_tokens in (1, 19):
                x = randn(num_tokens, HIDDEN, dtype=dtype)
                ids, weights = _routing(num_tokens, gen)
                out = kernel.apply(
                    hidden_states=x, w1=w1, w2=w2, topk_weights=weights, topk_ids=ids,
                    activation=MoEActivation.SILU, global_num_experts=E,
                    expert_map=expert_map, apply_router_weight_on_input=False,
                )
                row_map = _oracle_row_map(ids, expert_map)
                if hooked or experts_cls is TorchGemmDelegateExperts:
                    rows = _gemm_rows(x, w1, w2, ids, expert_map, None)
                    expected = reference.finalize(rows.view(-1, HIDDEN), row_map, weights)
                else:
                    rows = _gemm_rows(x, w1, w2, ids, expert_map, weights)
                    expected = reference.finalize(rows.view(-1, HIDDEN), row_map, None)
                close(out, expected)
            assert hook_calls == ([1, 19] if hooked else []), hook_calls

    def modular_hook() -> None:
        for dtype in (torch.bfloat16, torch.float32):
            for expert_map in (None, _expert_map()):
                run_modular(TorchGemmTritonExperts, hooked=True, expert_map=expert_map, dtype=dtype)

    def modular_moe_sum() -> None:
        for expert_map in (None, _expert_map()):
            run_modular(TorchGemmTritonExperts, hooked=False, expert_map=expert_map,
                        dtype=torch.bfloat16)

    def modular_delegate() -> None:
        for dtype in (torch.bfloat16, torch.float32):
            run_modular(TorchGemmDelegateExperts, hooked=False, expert_map=None, dtype=dtype)

    # -- TopKWeightAndReduceContiguous and NoDPEP prepare/finalize, called directly

    def contiguous_apply() -> None:
        impl = TopKWeightAndReduceContiguous()
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for num_tokens in (1, 23):
                ids, weights = _routing(num_tokens, gen)
                fused = randn(num_tokens, TOPK, HIDDEN, dtype=dtype)
                kept = fused.clone()
                weighted = reference.finalize(fused.view(-1, HIDDEN), None, weights)
                summed = reference.finalize(fused.view(-1, HIDDEN), None, None, top_k=TOPK)
                out = torch.empty(num_tokens, HIDDEN, dtype=dtype)
                assert impl.apply(out, fused, weights, ids, False) is out
                close(out, weighted)
                close(impl.apply(None, fused.view(-1, HIDDEN), weights, ids, False), weighted)
                close(impl.apply(None, fused, weights, ids, True), summed)
                # Strided weights (a column slice) are taken as they are.
                wide = torch.rand(num_tokens, 2 * TOPK, generator=gen)
                close(impl.apply(None, fused, wide[:, ::2], ids, False),
                      reference.finalize(fused.view(-1, HIDDEN), None, wide[:, ::2]))
                assert torch.equal(fused, kept), "the expert output was modified"

    def no_dp_ep() -> None:
        pf = MoEPrepareAndFinalizeNoDPEPModular()
        quant = FusedMoEQuantConfig.make()
        for dtype in (torch.bfloat16, torch.float32):
            num_tokens = 13
            x = randn(num_tokens, HIDDEN, dtype=dtype)
            ids, weights = _routing(num_tokens, gen)
            a1q, a1q_scale, *_ = pf.prepare(x, weights, ids, E, None, False, quant)
            assert a1q_scale is None
            torch.testing.assert_close(a1q, x, rtol=0, atol=0)
            fused = randn(num_tokens, TOPK, HIDDEN, dtype=dtype)
            expected = reference.finalize(fused.view(-1, HIDDEN), None, weights)
            for impl in (TopKWeightAndReduceContiguous(), TopKWeightAndReduceDelegate()):
                out = torch.empty(num_tokens, HIDDEN, dtype=dtype)
                pf.finalize(out, fused, weights, ids, False, impl)
                close(out, expected)
            out = torch.empty(num_tokens, HIDDEN, dtype=dtype)
            pf.finalize(out, expected, weights, ids, False, TopKWeightAndReduceNoOP())
            close(out, expected)
            # top-1 with router weights on the input: prepare scales, finalize only sums.
            ids1, weights1 = ids[:, :1].contiguous(), weights[:, :1].contiguous()
            a1q, *_ = pf.prepare(x, weights1, ids1, E, None, True, quant)
            close(a1q, x * weights1.to(dtype))
            fused1 = randn(num_tokens, 1, HIDDEN, dtype=dtype)
            out = torch.empty(num_tokens, HIDDEN, dtype=dtype)
            pf.finalize(out, fused1, weights1, ids1, True, TopKWeightAndReduceContiguous())
            close(out, fused1.view(num_tokens, HIDDEN))

    # -- moe_sum

    def moe_sum_plain() -> None:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for num_tokens, hidden in ((1, HIDDEN), (31, 67), (8, 4096)):
                inp = randn(num_tokens, TOPK, hidden, dtype=dtype)
                expected = reference.finalize(inp.view(-1, hidden), None, None, top_k=TOPK)
                out = torch.empty(num_tokens, hidden, dtype=dtype)
                custom_ops.moe_sum(inp, out)
                close(out, expected)
                # expert_map without topk_ids is ignored, as in vLLM's kernel.
                out.fill_(float("nan"))
                custom_ops.moe_sum(inp, out, None, _expert_map())
                close(out, expected)

    def moe_sum_masked() -> None:
        experts = build_kernel(moe_config(torch.bfloat16)).moe_kernel.fused_experts
        for dtype in (torch.bfloat16, torch.float32):
            num_tokens = 41
            ids, _ = _routing(num_tokens, gen)
            ids[::5, 1] = -1  # unrouted slots (e.g. padding tokens)
            for expert_map in (None, _expert_map()):
                row_map = _oracle_row_map(ids, expert_map)
                inp = randn(num_tokens, TOPK, HIDDEN, dtype=dtype)
                inp[row_map < 0] = float("nan")
                expected = reference.finalize(inp.view(-1, HIDDEN), row_map, None)
                wide = torch.zeros(num_tokens, 2 * TOPK, dtype=torch.int64)
                wide[:, ::2] = ids
                for topk_ids in (ids, ids.long(), wide[:, ::2]):
                    out = torch.empty(num_tokens, HIDDEN, dtype=dtype)
                    custom_ops.moe_sum(inp, out, topk_ids, expert_map)
                    close(out, expected)
                # TritonExperts' own reduction (its non-hooked finalize) goes the same way.
                if expert_map is not None:
                    out = torch.empty(num_tokens, HIDDEN, dtype=dtype)
                    experts.moe_sum(inp, out, ids, expert_map)
                    close(out, expected)

    def moe_sum_unserved_layout() -> None:
        calls: list[tuple[Any, ...]] = []
        saved = vllm_plugin._STATE.original_moe_sum
        vllm_plugin._STATE.original_moe_sum = lambda *args: calls.append(args)
        try:
            inp = randn(5, TOPK + 1, HIDDEN)[:, :TOPK]  # token stride != topk * row stride
            out = torch.empty(5, HIDDEN)
            custom_ops.moe_sum(inp, out)
            custom_ops.moe_sum(randn(5, TOPK, HIDDEN), torch.empty(5, HIDDEN, dtype=torch.bfloat16))
        finally:
            vllm_plugin._STATE.original_moe_sum = saved
        assert len(calls) == 2, calls
        assert calls[0][0] is inp and calls[0][1] is out

    # -- torch.compile(fullgraph=True): no graph break through vLLM's hook call and our op

    def compile_hook() -> None:
        experts = build_kernel(moe_config(torch.bfloat16)).moe_kernel.fused_experts

        def finalize_layer(rows, weights, ids, expert_map, out):
            experts._run_post_gemm2_hook(
                route_major_moe_output(rows, weights, ids, expert_map), out
            )
            return out

        torch._dynamo.reset()
        compiled = torch.compile(finalize_layer, fullgraph=True, dynamic=True)
        for num_tokens in (6, 17):
            ids, weights = _routing(num_tokens, gen)
            rows = randn(num_tokens, TOPK, HIDDEN, dtype=torch.bfloat16)
            expert_map = _expert_map()
            row_map = _oracle_row_map(ids, expert_map)
            rows[row_map < 0] = float("nan")
            out = torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16)
            compiled(rows, weights, ids, expert_map, out)
            close(out, reference.finalize(rows.view(-1, HIDDEN), row_map, weights))

    def compile_moe_sum() -> None:
        def reduce_(inp, out, ids, expert_map):
            custom_ops.moe_sum(inp, out, ids, expert_map)
            return out

        torch._dynamo.reset()
        compiled = torch.compile(reduce_, fullgraph=True, dynamic=True)
        for num_tokens in (4, 11):
            ids, _ = _routing(num_tokens, gen)
            expert_map = _expert_map()
            row_map = _oracle_row_map(ids, expert_map)
            inp = randn(num_tokens, TOPK, HIDDEN, dtype=torch.bfloat16)
            inp[row_map < 0] = float("nan")
            out = torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16)
            compiled(inp, out, ids, expert_map)
            close(out, reference.finalize(inp.view(-1, HIDDEN), row_map, None))

    checks.run("unquantized_method_is_our_subclass", method_is_subclass)
    checks.run("triton_experts_built_through_it_carry_the_hook", hooked_triton_experts)
    checks.run("summary_logged_once_when_logging_is_up", summary_logged_at_first_build)
    checks.run("lora_layer_left_untouched", lora_untouched)
    checks.run("router_weight_on_input_layer_left_untouched", router_weight_on_input_untouched)
    checks.run("other_experts_left_untouched", other_experts_untouched)
    checks.run("hook_via_triton_experts_run_post_gemm2_hook", hook_via_run_post_gemm2_hook)
    checks.run("modular_kernel_hook_path", modular_hook)
    checks.run("modular_kernel_moe_sum_path", modular_moe_sum)
    checks.run("modular_kernel_delegate_contiguous_path", modular_delegate)
    checks.run("topk_weight_and_reduce_contiguous_apply", contiguous_apply)
    checks.run("no_dp_ep_prepare_and_finalize", no_dp_ep)
    checks.run("moe_sum_plain", moe_sum_plain)
    checks.run("moe_sum_topk_ids_and_expert_map", moe_sum_masked)
    checks.run("moe_sum_unserved_layout_goes_to_vllm", moe_sum_unserved_layout)
    checks.run("hook_path_compiles_fullgraph", compile_hook)
    checks.run("moe_sum_compiles_fullgraph", compile_moe_sum)
    return checks.results


_SCENARIOS: dict[str, Callable[[], dict[str, str | None]]] = {
    "registration": _scenario_registration,
    "paths": _scenario_paths,
}

if __name__ == "__main__":
    print(RESULT_MARKER + json.dumps(_SCENARIOS[sys.argv[1]]()), flush=True)
