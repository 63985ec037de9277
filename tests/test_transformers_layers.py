"""End to end: transformers MoE models under experts_implementation="moe_finalize".

Small random-weight models of real architectures (real K, real routing; tiny hidden sizes and
few layers so the file runs in well under a minute on 2 CPU cores) are run twice on the same
weights, once under transformers' stock ``grouped_mm`` (and its independent per-expert ``eager``
loop) and once under ``moe_finalize``: logits, greedy generations, gradients of a training loss,
and expert-parallel sentinel handling must agree. The same tests run on a GPU unchanged through
conftest's ``device`` fixture, whose "cuda" case skips only where CUDA is absent.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.integrations import moe as transformers_moe

import moe_finalize_plugin
from moe_finalize_plugin import transformers_experts

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,  # random models would stop at random; generate exactly 16 tokens
)

# Real expert counts scaled down, real K and routing features of each architecture.
ARCHS: dict[str, dict] = {
    # K=2 of 8, softmax then renormalise, fp32 routing weights.
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    # K=8 of 16, norm_topk_prob, bf16 routing weights in a bf16 model.
    "qwen3_moe": dict(
        num_experts=16,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        moe_intermediate_size=32,
        intermediate_size=64,
        head_dim=16,
    ),
    # K=4 of 8 plus a sigmoid-gated shared expert.
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        intermediate_size=64,
    ),
    # Grouped sigmoid routing (8 groups, 4 kept), K=8 of 32, shared expert, routed scaling 2.5,
    # a dense first layer, MLA attention.
    "deepseek_v3": dict(
        n_routed_experts=32,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        norm_topk_prob=True,
        moe_intermediate_size=32,
        intermediate_size=64,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # K=4 of 8, transposed interleaved gate_up with per-expert biases, clamped SwiGLU, YaRN.
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=4,
        intermediate_size=32,
        head_dim=16,
        sliding_window=16,
        max_position_embeddings=131072,  # 32 x 4096, the ratio its YaRN defaults expect
    ),
    # K=8 of 16, no renormalisation.
    "olmoe": dict(num_experts=16, num_experts_per_tok=8, intermediate_size=32),
}
ARCH_NAMES = list(ARCHS)


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    transformers_experts.register()


def _build(arch: str, dtype: torch.dtype, device: str, seed: int = 0) -> PreTrainedModel:
    """A random-weight model whose every tensor (biases, norms, router bias) is non-trivial."""
    config = AutoConfig.for_model(arch, **{**COMMON, **ARCHS[arch]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # transformers initialises biases and e_score_correction_bias to zero and norms to one;
        # refill everything so no code path is exercised on zeros.
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if tensor.dim() >= 2:
                tensor.copy_(0.15 * noise)  # ~1/sqrt(fan-in): activations stay O(1)
            elif name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(0.1 * noise)
    return model.to(device=device, dtype=dtype).eval()


def _moe_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(router, experts) of every sparse MoE block, in layer order."""
    blocks = []
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if experts is not None and hasattr(experts, "has_gate"):  # set by @use_experts_implementation
            router = getattr(module, "router", None) or module.gate
            blocks.append((router, experts))
    return blocks


def _input_ids(batch: int, length: int, device: str, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=gen).to(device)


def _logits(model: PreTrainedModel, impl: str, ids: Tensor) -> Tensor:
    model.set_experts_implementation(impl)
    with torch.no_grad():
        return model(ids).logits.float()


def _assert_close_scaled(actual: Tensor, expected: Tensor, rel: float, what: str) -> None:
    """Max abs difference within `rel` of the largest reference magnitude (logits near 0 included)."""
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros"
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def test_register_dispatches_to_finalize(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert transformers_experts.register() == "moe_finalize"
    assert transformers_moe.ALL_EXPERTS_FUNCTIONS["moe_finalize"] is transformers_experts.moe_finalize_experts_forward

    config = AutoConfig.for_model("qwen3_moe", **{**COMMON, **ARCHS["qwen3_moe"]})
    model = AutoModelForCausalLM.from_config(config, experts_implementation="moe_finalize").to(device)
    assert model.config._experts_implementation == "moe_finalize"

    # Every MoE layer of one forward must go through exactly one finalize call.
    calls: list[tuple[int, ...]] = []
    real_finalize = moe_finalize_plugin.finalize

    def counting_finalize(*args, **kwargs):
        calls.append(tuple(args[1].shape))
        return real_finalize(*args, **kwargs)

    monkeypatch.setattr(moe_finalize_plugin, "finalize", counting_finalize)
    ids = _input_ids(2, 5, device, seed=1)
    with torch.no_grad():
        model(ids)
    assert calls == [(10, 8)] * config.num_hidden_layers

    calls.clear()
    model.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        model(ids)
    assert calls == []


def test_replace_grouped_mm_reaches_default_models(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """register(replace_grouped_mm=True) serves models that request no implementation (transformers
    serve, pipelines); monkeypatch puts the stock grouped_mm back afterwards."""
    mapping = transformers_moe.ExpertsInterface._global_mapping
    monkeypatch.setitem(mapping, "grouped_mm", transformers_moe.grouped_mm_experts_forward)
    transformers_experts.register(replace_grouped_mm=True)
    assert mapping["grouped_mm"] is transformers_experts.moe_finalize_experts_forward

    config = AutoConfig.for_model("olmoe", **{**COMMON, **ARCHS["olmoe"]})
    model = AutoModelForCausalLM.from_config(config).to(device)
    assert model.config._experts_implementation == "grouped_mm"
    calls = []
    real_finalize = moe_finalize_plugin.finalize
    monkeypatch.setattr(moe_finalize_plugin, "finalize", lambda *a, **k: calls.append(1) or real_finalize(*a, **k))
    with torch.no_grad():
        model(_input_ids(1, 4, device, seed=2))
    assert len(calls) == config.num_hidden_layers


@pytest.mark.parametrize("num_tokens", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_experts_layer_matches(arch: str, dtype: torch.dtype, num_tokens: int, device: str) -> None:
    """One experts module on the model's own routing vs grouped_mm and an fp64 eager truth."""
    model = _build(arch, dtype, device)
    router, experts = _moe_blocks(model)[0]
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(num_tokens, model.config.hidden_size, generator=gen).to(device, dtype)
    with torch.no_grad():
        _, weights, index = router(hidden)
        # Same values through a non-contiguous [T, K] view: the op takes any strides.
        strided = torch.empty(weights.shape[1], weights.shape[0], dtype=weights.dtype, device=device).t()
        strided.copy_(weights)
        outs = {}
        for impl in ("grouped_mm", "moe_finalize"):
            experts.config._experts_implementation = impl
            outs[impl] = experts(hidden, index, weights)
        outs["moe_finalize_strided"] = experts(hidden, index, strided)

        truth_module = copy.deepcopy(experts).double()
        truth_module.config._experts_implementation = "eager"
        truth = truth_module(hidden.double(), index, weights.double())

    fused = outs["moe_finalize"]
    assert fused.dtype == dtype and fused.shape == hidden.shape
    torch.testing.assert_close(outs["moe_finalize_strided"], fused, rtol=0, atol=0)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    _assert_close_scaled(fused.float(), outs["grouped_mm"].float(), rel, "vs grouped_mm")
    _assert_close_scaled(fused.double(), truth, 10 * rel, "vs fp64 eager")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_fp32_activations_into_bf16_experts(arch: str, device: str) -> None:
    """Under autocast, fp32 activations (a LayerNorm output) meet bf16 expert weights: grouped_mm
    runs the GEMMs in bf16 and returns fp32, and so must moe_finalize."""
    model = _build(arch, torch.bfloat16, device)
    router, experts = _moe_blocks(model)[0]
    gen = torch.Generator().manual_seed(13)
    hidden = torch.randn(23, model.config.hidden_size, generator=gen).to(device)
    with torch.no_grad():
        _, weights, index = router(hidden.bfloat16())
        outs = {}
        for impl in ("grouped_mm", "moe_finalize"):
            experts.config._experts_implementation = impl
            outs[impl] = experts(hidden, index, weights)
    assert outs["moe_finalize"].dtype == outs["grouped_mm"].dtype == torch.float32
    # The fused sum rounds once to the bf16 GEMM dtype; grouped_mm may keep fp32 (fp32 weights).
    _assert_close_scaled(outs["moe_finalize"], outs["grouped_mm"], 2e-2, "vs grouped_mm")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_model_logits_match(arch: str, device: str) -> None:
    ids = _input_ids(2, 19, device, seed=3)
    fp32 = _build(arch, torch.float32, device)
    fused = _logits(fp32, "moe_finalize", ids)
    # fp32: the weighted sum is the only change, so everything agrees to fp32 rounding, also
    # with transformers' independent per-expert eager loop.
    _assert_close_scaled(fused, _logits(fp32, "grouped_mm", ids), 1e-5, "fp32 vs grouped_mm")
    _assert_close_scaled(fused, _logits(fp32, "eager", ids), 1e-5, "fp32 vs eager")

    bf16 = _build(arch, torch.bfloat16, device)
    fused = _logits(bf16, "moe_finalize", ids)
    for impl in ("grouped_mm", "eager"):
        _assert_bf16_logits_close(fused, _logits(bf16, impl, ids), f"bf16 vs {impl}")


def _assert_bf16_logits_close(actual: Tensor, expected: Tensor, what: str) -> None:
    """bf16 logits of two implementations that round the expert sum differently.

    A one-ulp difference in a MoE output can flip a near-tie in a later layer's top-k for a token
    (grouped_mm and eager disagree that way too), which moves that position's logits by a lot. So:
    the typical position agrees to about one bf16 ulp of the largest logit, and at most a few
    positions may differ more. A wrong weight, row or scale moves every position."""
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros"
    per_position = (actual - expected).abs().amax(dim=-1) / scale
    mean_error = ((actual - expected).abs().mean() / scale).item()
    outliers = (per_position > 3e-2).float().mean().item()
    # Measured on CPU: means 1e-3..2.3e-3, outliers 0 except deepseek_v3 vs eager (2 of 38
    # positions; eager accumulates its K=8 scaled products in bf16).
    assert mean_error <= 5e-3, f"{what}: mean |diff| is {mean_error:.2e} of the largest logit"
    assert outliers <= 0.1, f"{what}: {outliers:.0%} of positions differ by more than 3% of the largest logit"


def _greedy(model: PreTrainedModel, impl: str, prompt: Tensor, new_tokens: int) -> Tensor:
    model.set_experts_implementation(impl)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    assert out.shape == (prompt.shape[0], prompt.shape[1] + new_tokens)
    return out


def _assert_greedy_under(model: PreTrainedModel, impl: str, sequence: Tensor, prompt_len: int, tol: float) -> None:
    """Each generated token of `sequence` is an argmax (within `tol`) of `impl`'s logits."""
    logits = _logits(model, impl, sequence[:, :-1])[:, prompt_len - 1 :]
    chosen = logits.gather(-1, sequence[:, prompt_len:, None]).squeeze(-1)
    gap = logits.max(dim=-1).values - chosen
    assert gap.max().item() <= tol, f"a greedy token sits {gap.max().item():.3g} below {impl}'s best logit"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_greedy_generation_identical(arch: str, device: str) -> None:
    new_tokens = 16
    prompt = _input_ids(2, 7, device, seed=4)
    fp32 = _build(arch, torch.float32, device)
    reference = _greedy(fp32, "grouped_mm", prompt, new_tokens)
    fused = _greedy(fp32, "moe_finalize", prompt, new_tokens)
    assert torch.equal(fused, reference), f"greedy tokens differ:\n{fused[:, 7:]}\n{reference[:, 7:]}"
    assert torch.equal(_greedy(fp32, "eager", prompt, new_tokens), reference)

    # In bf16 a one-ulp difference can legitimately flip a near-tie of a random model (it does
    # between grouped_mm and eager too), so each implementation's tokens must be greedy choices
    # of the other up to bf16 logit noise; a wrong token sits whole logits below the best.
    bf16 = _build(arch, torch.bfloat16, device)
    bf16_fused = _greedy(bf16, "moe_finalize", prompt, new_tokens)
    bf16_reference = _greedy(bf16, "grouped_mm", prompt, new_tokens)
    tol = 3e-2 * _logits(bf16, "grouped_mm", reference).abs().max().item()
    _assert_greedy_under(bf16, "grouped_mm", bf16_fused, prompt.shape[1], tol)
    _assert_greedy_under(bf16, "moe_finalize", bf16_reference, prompt.shape[1], tol)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_training_gradients_match(arch: str, device: str) -> None:
    """A causal-LM loss backpropagated through finalize (into expert output and router weights)."""
    model = _build(arch, torch.float32, device).train()
    ids = _input_ids(2, 13, device, seed=5)
    grads: dict[str, dict[str, Tensor]] = {}
    losses: dict[str, Tensor] = {}
    for impl in ("grouped_mm", "moe_finalize"):
        model.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses[impl] = loss.detach()
        grads[impl] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(losses["moe_finalize"], losses["grouped_mm"], rtol=1e-5, atol=0)
    assert grads["moe_finalize"].keys() == grads["grouped_mm"].keys()
    expert_and_router = [n for n in grads["grouped_mm"] if ".experts." in n or ".gate." in n or ".router." in n]
    assert len(expert_and_router) >= 2 * len(_moe_blocks(model))
    for name, expected in grads["grouped_mm"].items():
        actual = grads["moe_finalize"][name]
        if name in expert_and_router:
            assert expected.abs().max() > 0, f"{name}: reference gradient is zero"
        _assert_close_scaled(actual, expected, 1e-4, f"grad {name}")


def _local_shard(experts: nn.Module, rank: int, ep_size: int) -> nn.Module:
    """The experts module one expert-parallel rank holds (what transformers' MoEParamShard leaves)."""
    local = copy.deepcopy(experts)  # own config too, so its implementation switches alone
    per_rank = experts.num_experts // ep_size
    for name, param in experts.named_parameters(recurse=False):
        shard = param.detach()[rank * per_rank : (rank + 1) * per_rank].clone()
        setattr(local, name, nn.Parameter(shard))
    local.num_experts = per_rank
    local._is_expert_parallel = True  # transformers >= 5.20 masks sentinel rows only with this
    return local


def _ep_route(index: Tensor, weights: Tensor, rank: int, per_rank: int) -> tuple[Tensor, Tensor]:
    """transformers' EpRouterParallel: other ranks' slots get weight 0 and sentinel id `per_rank`."""
    remote = index // per_rank != rank
    return index.remainder(per_rank).masked_fill(remote, per_rank), weights.masked_fill(remote, 0.0)


def _poison_tail(grouped_linear: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap transformers' grouped linear so rows past the last offset (EP sentinel rows) are NaN.

    grouped_mm never writes those rows: on CUDA they hold whatever the allocator left, on CPU
    often zeros. NaN makes any leak of them into outputs or gradients visible on every device."""

    def poisoned(
        input: Tensor, weight: Tensor, offs: Tensor, bias: Tensor | None = None, is_transposed: bool = False
    ) -> Tensor:
        out = grouped_linear(input, weight, offs, bias=bias, is_transposed=is_transposed)
        tail = torch.arange(out.shape[0], device=out.device) >= offs[-1]
        return out.masked_fill(tail.unsqueeze(-1), float("nan"))

    return poisoned


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_expert_parallel_sentinels(arch: str, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sentinel slots become -1 map entries: no contribution, zero router gradient, and the ranks'
    partial outputs add up to the unsharded layer, forward and backward, exactly as grouped_mm."""
    for module in (transformers_moe, transformers_experts):
        monkeypatch.setattr(module, "_grouped_linear", _poison_tail(transformers_moe._grouped_linear))
    ep_size = 2
    model = _build(arch, torch.float32, device)
    router, experts = _moe_blocks(model)[0]
    per_rank = experts.num_experts // ep_size
    gen = torch.Generator().manual_seed(17)
    hidden = torch.randn(29, model.config.hidden_size, generator=gen).to(device)
    probe = torch.randn(hidden.shape, generator=gen).to(device)  # upstream gradient
    with torch.no_grad():
        _, weights, index = router(hidden)

    def run(module: nn.Module, impl: str, idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        module.config._experts_implementation = impl
        module.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_()
        w = w.clone().requires_grad_()
        out = module(h, idx, w)
        (out * probe).sum().backward()
        return out.detach(), h.grad, w.grad, [p.grad for p in module.parameters(recurse=False)]

    full_out, full_dh, full_dw, _ = run(experts, "grouped_mm", index, weights)
    sum_out = torch.zeros_like(full_out)
    sum_dh = torch.zeros_like(full_dh)
    sum_dw = torch.zeros_like(full_dw)
    for rank in range(ep_size):
        local = _local_shard(experts, rank, ep_size)
        local_index, local_weights = _ep_route(index, weights, rank, per_rank)
        sentinel = local_index == per_rank
        assert sentinel.any() and not sentinel.all(), "routing must mix local and remote experts"
        out, dh, dw, dparams = run(local, "moe_finalize", local_index, local_weights)
        ref_out, ref_dh, ref_dw, ref_dparams = run(local, "grouped_mm", local_index, local_weights)

        _assert_close_scaled(out, ref_out, 1e-5, f"rank {rank} output")
        _assert_close_scaled(dh, ref_dh, 1e-5, f"rank {rank} d hidden")
        _assert_close_scaled(dw, ref_dw, 1e-5, f"rank {rank} d weights")
        for got, expected in zip(dparams, ref_dparams, strict=True):
            _assert_close_scaled(got, expected, 1e-5, f"rank {rank} d expert params")
        assert torch.all(dw[sentinel] == 0), "remote slots must get no router gradient"
        assert torch.isfinite(out).all() and torch.isfinite(dh).all()
        sum_out += out
        sum_dh += dh
        sum_dw += dw

    _assert_close_scaled(sum_out, full_out, 1e-5, "sum over ranks vs unsharded output")
    _assert_close_scaled(sum_dh, full_dh, 1e-5, "sum over ranks vs unsharded d hidden")
    _assert_close_scaled(sum_dw, full_dw, 1e-5, "sum over ranks vs unsharded d weights")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_token_dispatch_call(arch: str, device: str) -> None:
    """transformers >= 5.20's default EP plan (EpDispatchExpertsParallel) calls the experts with
    the received tokens, top-1 ids and unit weights, and applies routing weights itself."""
    model = _build(arch, torch.bfloat16, device)
    _, experts = _moe_blocks(model)[0]
    gen = torch.Generator().manual_seed(19)
    tokens = torch.randn(41, model.config.hidden_size, generator=gen).to(device, torch.bfloat16)
    expert_ids = torch.randint(0, experts.num_experts, (41, 1), generator=gen).to(device)
    unit = torch.ones_like(expert_ids, dtype=tokens.dtype)
    with torch.no_grad():
        outs = {}
        for impl in ("grouped_mm", "moe_finalize"):
            experts.config._experts_implementation = impl
            outs[impl] = experts(tokens, expert_ids, unit)
    # K=1 with weight 1: both return the bf16 expert output row itself, bit for bit.
    torch.testing.assert_close(outs["moe_finalize"], outs["grouped_mm"], rtol=0, atol=0)


def test_compiles_fullgraph_dynamic(device: str) -> None:
    """torch.compile(fullgraph=True, dynamic=True) traces the whole forward, our op included,
    once for all token counts."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _build("qwen3_moe", torch.float32, device)
    router, experts = _moe_blocks(model)[0]
    experts.config._experts_implementation = "moe_finalize"
    torch.compiler.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(experts, backend=counter, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(23)
    frames = []
    for num_tokens in (5, 17, 33):
        hidden = torch.randn(num_tokens, model.config.hidden_size, generator=gen).to(device)
        with torch.no_grad():
            _, weights, index = router(hidden)
            _assert_close_scaled(compiled(hidden, index, weights), experts(hidden, index, weights), 1e-5, "compiled")
        frames.append(counter.frame_count)
    # The decorator's *args wrapper compiles to an empty frame of its own; what matters is
    # that no new token count adds frames.
    assert frames[0] >= 1 and frames == [frames[0]] * 3, f"recompiled: frames after each call {frames}"
    targets = [str(node.target) for graph in counter.graphs for node in graph.graph.nodes]
    assert any("moe_finalize" in target for target in targets), "finalize op not in the compiled graph"
