"""Issue 7: FP8 input with row/block scales, per-expert bias, and the FP8-output op, against
reference.py; batch invariance, opcheck, torch.compile, autograd and bad input."""

import pytest
import torch

import moe_finalize_plugin as mf
from moe_finalize_plugin import reference

from cases import TOLERANCES, make_case, poisoned

FP8 = torch.float8_e4m3fn
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FP8_TOL = {**TOLERANCES, torch.float32: (1e-4, 1e-5)}  # fp32 sums of fmas vs separate mul/add
# (T, K, H): H < 128, odd, partial last block, exactly one block, several blocks.
# T=200, 300, 1030 and 4100 take the CUDA launch variants chosen by T (8-byte vectors below
# T=256, rows per batch, load flavour, streaming block order and register bound), at K=2, 3, 4,
# 8 and 40 (more slots than a warp holds).
SHAPES = [(0, 4, 256), (1, 1, 1), (7, 3, 100), (13, 8, 301), (5, 2, 128), (33, 8, 1040),
          (4, 65, 257), (200, 8, 1040), (300, 8, 512), (1030, 8, 272), (4100, 4, 2064), (4100, 2, 1040),
          (4100, 2, 256), (4100, 4, 160), (4099, 8, 512), (4097, 3, 1024), (4097, 40, 64),
          (4100, 4, 264)]


def blocks(hidden: int) -> int:
    return -(-hidden // 128)


def quantize(x: torch.Tensor, per_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block (or row) e4m3 quantisation with random extra scale jitter; values keep their sign."""
    rows, hidden = x.shape
    if per_block:
        scales = torch.rand(rows, blocks(hidden), device=x.device) + 0.25
        full = scales.repeat_interleave(128, dim=1)[:, :hidden]
    else:
        scales = torch.rand(rows, device=x.device) + 0.25
        full = scales.unsqueeze(1)
    return (x * 64 / full).clamp(-448, 448).to(FP8), scales / 64


def scale_layout(scales: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as [P, B] in a contiguous, transposed ([B, P] buffer) or strided view."""
    if layout == "transposed":
        return scales.t().contiguous().t()
    if layout == "strided":
        buf = torch.full((scales.shape[0], 2 * scales.shape[1] + 1), float("nan"),
                         device=scales.device)
        buf[:, 1::2] = scales
        return buf[:, 1::2]
    return scales


def fp8_case(device, num_tokens, top_k, hidden, layout="token_major", per_block=True,
             scales_layout="contiguous", **kw):
    case = make_case(device, torch.float32, num_tokens, top_k, hidden, layout, extra_rows=3, **kw)
    q, scales = quantize(case.input, per_block)
    case.input = q
    return case, (scale_layout(scales, scales_layout) if per_block else scales)


def bits(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as raw bytes: torch.equal has no float8 kernel on every device."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def check(out, ref):
    atol, rtol = FP8_TOL[ref.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN output elements"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def with_bias(case, num_experts=6, dtype=torch.float32, expert_dtype=torch.int32):
    t, k = case.weights.shape if case.weights is not None else case.row_map.shape
    device = case.input.device
    bias = torch.randn(num_experts, case.input.shape[1], device=device).to(dtype)
    experts = torch.randint(0, num_experts, (k, t), device=device).to(expert_dtype).t()
    if case.row_map is not None:
        experts = torch.where(case.row_map < 0, -1, experts)  # skipped slots carry -1
    return bias, experts


# ---- FP8 input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-K{}-H{}".format(*s))
@pytest.mark.parametrize("out_dtype", OUT_DTYPES + [None], ids=str)
def test_fp8_input_matches_reference(device, out_dtype, shape):
    case, scales = fp8_case(device, *shape)
    out = mf.finalize(case.input, case.row_map, case.weights, input_scales=scales,
                      out_dtype=out_dtype)
    assert out.dtype == (out_dtype or torch.bfloat16)
    check(out, reference.finalize(case.input, case.row_map, case.weights, input_scales=scales,
                                  out_dtype=out_dtype))


# T=4100: the streaming launch reads every map and scale layout too.
@pytest.mark.parametrize("num_tokens,hidden", [(19, 520), (4100, 512)])
@pytest.mark.parametrize("scales_layout", ["row", "contiguous", "transposed", "strided"])
@pytest.mark.parametrize("layout", ["token_major", "k_major", "none"])
def test_fp8_scale_and_map_layouts(device, layout, scales_layout, num_tokens, hidden):
    case, scales = fp8_case(device, num_tokens, 4, hidden, layout,
                            per_block=scales_layout != "row", scales_layout=scales_layout,
                            residual=False)
    out = mf.finalize(case.input, case.row_map, case.weights, input_scales=scales)
    check(out, reference.finalize(case.input, case.row_map, case.weights, input_scales=scales))


# T=4100: the streaming launch with residual, scale, padded rows and a strided out. H=1024 and
# 2880 at T=100: warps of 16-byte e4m3 vectors, whose bf16 / fp16 results the lanes exchange
# before storing (store_warp_rows), in place on the residual too. At H=2880 (gpt-oss) the row's
# last warp holds 20 vectors and 12 idle lanes, and its lanes store their own results.
@pytest.mark.parametrize("num_tokens,hidden", [(11, 300), (4100, 304), (100, 1024), (100, 2880)])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_fp8_out_variant_out_decides(device, out_dtype, num_tokens, hidden):
    """Residual in the output dtype, scale, padded input rows, a strided out (maybe residual)."""
    case, scales = fp8_case(device, num_tokens, 8, hidden, scale=2.5, padded_rows=16)
    residual = torch.randn(num_tokens, hidden, device=device).to(out_dtype)
    buffer = poisoned(num_tokens, hidden + 24, residual)
    out = buffer[:, 8:8 + hidden]
    result = mf.finalize(case.input, case.row_map, case.weights, scale=2.5, residual=residual,
                         input_scales=scales, out=out)
    assert result is out
    ref = reference.finalize(case.input, case.row_map, case.weights, scale=2.5, residual=residual,
                             input_scales=scales, out_dtype=out_dtype)
    check(out, ref)
    assert buffer[:, :8].isnan().all() and buffer[:, 8 + hidden:].isnan().all()
    # In place on the residual stream.
    mf.finalize(case.input, case.row_map, case.weights, scale=2.5, residual=residual,
                input_scales=scales, out=residual)
    check(residual, ref)


def test_fp8_all_skipped_and_zero_input(device):
    case, scales = fp8_case(device, 6, 3, 200)
    case.row_map[2] = -1
    case.input.view(torch.uint8)[case.row_map[4].clamp(min=0).long()] = 0  # e4m3 code 0 = +0
    out = mf.finalize(case.input, case.row_map, case.weights, input_scales=scales,
                      out_dtype=torch.float32)
    check(out, reference.finalize(case.input, case.row_map, case.weights, input_scales=scales,
                                  out_dtype=torch.float32))
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def batch_invariance(device, fn, make):
    """Row t of a T=4100 call equals, bitwise, the same token computed in T=1 ... T=1100 calls:
    the CUDA launch differs across T (8-byte FP8 vectors below T=256, rows in flight per batch
    from T=256, the load flavour from T=1024, block order and register bound from T=4096), the
    arithmetic must not."""
    big = make(4100)
    full = fn(big)
    for rows in (slice(100, 101), slice(0, 33), slice(224, 257), slice(1067, 1100),
                 slice(0, 255), slice(0, 256), slice(0, 1100), slice(4067, 4100)):
        part = fn(big.subset(rows))
        results = part if isinstance(part, tuple) else (part,)
        expect = full if isinstance(full, tuple) else (full,)
        for got, want in zip(results, expect):
            assert torch.equal(bits(got), bits(want)[rows])


class Problem:
    """An FP8 + bias problem whose token subsets share the same input rows."""

    def __init__(self, device, num_tokens, hidden=1040, top_k=8, bias=True):
        self.case, self.scales = fp8_case(device, num_tokens, top_k, hidden)
        self.bias, self.experts = with_bias(self.case) if bias else (None, None)

    def subset(self, rows):
        sub = Problem.__new__(Problem)
        c = self.case
        sub.case = type(c)(c.input, c.row_map[rows], c.weights[rows], c.top_k, None, c.scale)
        sub.scales, sub.bias = self.scales, self.bias
        sub.experts = None if self.experts is None else self.experts[rows]
        return sub


# K=2: the 2-rows-in-flight streaming kernel at T=4100.
@pytest.mark.parametrize("hidden,top_k", [(1040, 8), (1024, 2)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_fp8_batch_invariance_bitwise(device, bias, hidden, top_k):
    def run(pr):
        return mf.finalize(pr.case.input, pr.case.row_map, pr.case.weights,
                           input_scales=pr.scales, bias=pr.bias, expert_ids=pr.experts)
    batch_invariance(device, run,
                     lambda t: Problem(device, t, hidden=hidden, top_k=top_k, bias=bias))
    pr = Problem(device, 64, hidden=hidden, top_k=top_k, bias=bias)
    assert torch.equal(run(pr), run(pr)), "not bitwise reproducible run to run"


# ---- per-expert bias ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["token_major", "k_major", "none"])
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
def test_bias_float_input(device, dtype, layout):
    case = make_case(device, dtype, 23, 4, 264, layout, residual=True, scale=2.5, extra_rows=3)
    bias, experts = with_bias(case, dtype=torch.bfloat16, expert_dtype=torch.int64)
    out = mf.finalize(case.input, case.row_map, case.weights, **case.kwargs(), bias=bias,
                      expert_ids=experts)
    check(out, reference.finalize(case.input, case.row_map, case.weights, **case.kwargs(),
                                  bias=bias, expert_ids=experts))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_bias_with_fp8_input_and_unaligned_rows(device, out_dtype):
    case, scales = fp8_case(device, 9, 3, 301, scale=0.5)
    bias, experts = with_bias(case, dtype=out_dtype)
    out = poisoned(9, 302, bias)[:, 1:]  # unaligned out: the scalar path
    mf.finalize(case.input, case.row_map, case.weights, scale=0.5, input_scales=scales,
                bias=bias, expert_ids=experts, out=out)
    check(out, reference.finalize(case.input, case.row_map, case.weights, scale=0.5,
                                  input_scales=scales, bias=bias, expert_ids=experts,
                                  out_dtype=out_dtype))


def test_bias_out_of_range_expert(device):
    case = make_case(device, torch.float32, 6, 3, 130, drop=0.0)
    bias, experts = with_bias(case, num_experts=4)
    experts[2, 1] = 4
    experts[3, 0] = -2
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"expert_ids\[2, 1\] = 4 is out of range for bias "
                                               r"with 4 experts"):
            mf.finalize(case.input, case.row_map, case.weights, bias=bias, expert_ids=experts)
        return
    # CUDA: the slot keeps its row but gets no bias term (never read out of bounds).
    out = mf.finalize(case.input, case.row_map, case.weights, bias=bias, expert_ids=experts)
    padded = torch.cat([bias, torch.zeros_like(bias[:1])])
    safe = torch.where((experts >= 0) & (experts < 4), experts, 4)
    check(out, reference.finalize(case.input, case.row_map, case.weights, bias=padded,
                                  expert_ids=safe))


@pytest.mark.parametrize("layout", ["token_major", "none"])
def test_bias_autograd_matches_reference(device, layout):
    case = make_case(device, torch.float32, 12, 3, 136, layout, residual=True, scale=1.5)
    bias, experts = with_bias(case, num_experts=5)
    leaves = [t.detach().clone().requires_grad_() for t in (case.input, case.weights,
                                                             case.residual, bias)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    grad = torch.randn(12, 136, device=device)
    for fn, (x, w, r, b) in ((mf.finalize, leaves), (reference.finalize, ref_leaves)):
        fn(x, case.row_map, w, residual=r, scale=1.5, bias=b, expert_ids=experts).backward(grad)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


def test_fp8_input_refuses_grad(device):
    case, scales = fp8_case(device, 4, 2, 64)
    w = case.weights.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="FP8 .* input is inference-only"):
        mf.finalize(case.input, case.row_map, w, input_scales=scales)
    with pytest.raises(RuntimeError, match="FP8 .* input is inference-only"):
        mf.finalize(case.input, case.row_map, w, input_scales=scales,
                    out=torch.empty(4, 64, device=device, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="inference-only"):
        mf.finalize_fp8(case.input, case.row_map, w, input_scales=scales)
    with torch.no_grad():
        mf.finalize(case.input, case.row_map, w, input_scales=scales)


# ---- FP8 output --------------------------------------------------------------------------------


def check_fp8(out, out_scales, ref_out, ref_scales):
    # amax comes from fp32 sums that CPU (mul + add) and CUDA (fma) round differently: a few ulp,
    # more where the block's largest value comes out of cancellation.
    torch.testing.assert_close(out_scales, ref_scales, rtol=2e-5, atol=0)
    assert (out_scales > 0).all()
    full = out_scales.repeat_interleave(128, dim=1)[:, :out.shape[1]]
    ref_full = ref_scales.repeat_interleave(128, dim=1)[:, :out.shape[1]]
    got, want = out.float() * full, ref_out.float() * ref_full
    assert not got.isnan().any()
    if want.numel() == 0:
        return
    # At most one e4m3 step (2^-3 of the value): the fp32 sums of CPU (separate mul + add) and
    # CUDA (fma) differ by a few ulp, amplified by cancellation, which can cross a rounding edge.
    torch.testing.assert_close(got, want, rtol=0.13, atol=1e-6 + 1e-3 * want.abs().max().item())
    same = (out.view(torch.uint8) == ref_out.view(torch.uint8)).float().mean().item()
    assert same > 0.99 or out.numel() == 0


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-K{}-H{}".format(*s))
@pytest.mark.parametrize("input_kind", ["fp8", "bfloat16", "float32"])
def test_fp8_out_matches_reference(device, input_kind, shape):
    if input_kind == "fp8":
        case, scales = fp8_case(device, *shape)
    else:
        case = make_case(device, getattr(torch, input_kind), *shape, extra_rows=2)
        scales = None
    out, out_scales = mf.finalize_fp8(case.input, case.row_map, case.weights,
                                      input_scales=scales)
    assert out.dtype == FP8 and out_scales.shape == (shape[0], blocks(shape[2]))
    check_fp8(out, out_scales, *reference.finalize_fp8(case.input, case.row_map, case.weights,
                                                       input_scales=scales))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fp8_out_eager_dispatch_modes(device, mode):
    """finalize_fp8's eager paths (below the Autograd key; inference mode, where the key is
    already excluded) give the same bits as the default grad-mode call, amax_floor included."""
    case, scales = fp8_case(device, 5, 4, 300)
    case.input[:, :128] = 0  # an all-zero block: its scale is amax_floor / 448
    kwargs = dict(input_scales=scales, scale=0.5, amax_floor=1e-3)
    want = mf.finalize_fp8(case.input, case.row_map, case.weights, **kwargs)
    with {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]():
        got = mf.finalize_fp8(case.input, case.row_map, case.weights, **kwargs)
    assert torch.equal(bits(got[0]), bits(want[0])) and torch.equal(got[1], want[1])
    floor_scale = torch.tensor(1e-3) / torch.tensor(448.0)  # in fp32, as the kernels divide
    assert (got[1][:, 0].cpu() == floor_scale).all()


# H=4096: the vector kernel; H=300: the warp-per-block kernel (a partial last block). Magnitudes
# 1e-25 and 1e25 give scales outside [2^-60, 2^60], where the CUDA kernels divide in full.
# scale=-1 gives -0 values (from +0 sums).
@pytest.mark.parametrize("hidden", [4096, 300])
@pytest.mark.parametrize("magnitude", [1.0, 1e-25, 1e25])
@pytest.mark.parametrize("scale", [1.0, -1.0])
def test_fp8_out_codes_are_the_rounded_quotient_bitwise(device, hidden, magnitude, scale):
    """Each code is e4m3(RN_fp32(value / block scale)), bit for bit, on fresh values whose
    quotients fall everywhere between e4m3 codes (K=1, no weights: value = scale * (input + 0))."""
    num_tokens = 2048
    x = (torch.randn(num_tokens, hidden, device=device) * magnitude
         * torch.rand(num_tokens, 1, device=device).add_(0.01)).to(torch.bfloat16)
    x[:, :7] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -2.0]) * magnitude
    out, out_scales = mf.finalize_fp8(x, top_k=1, scale=scale, amax_floor=1e-30)
    value = scale * (x.float() + 0.0)  # the fp32 sum starts at +0: -0 inputs sum to +0
    padded = torch.nn.functional.pad(value.abs(), (0, -hidden % 128))
    amax = padded.view(num_tokens, -1, 128).amax(dim=2)
    # A tensor divisor: torch divides by a CUDA scalar as a multiply by its reciprocal.
    scales = torch.clamp_min(amax, 1e-30) / torch.full_like(amax, 448)
    assert torch.equal(out_scales, scales)
    want = (value / scales.repeat_interleave(128, dim=1)[:, :hidden]).to(FP8)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("hidden", [300, 1040])  # warp-per-block kernel, vector kernel
def test_fp8_out_zero_blocks_residual_bias_transposed_scales(device, hidden):
    num_tokens = 9
    case, scales = fp8_case(device, num_tokens, 4, hidden, scale=2.5)
    case.row_map[1] = -1                  # token 1: all skipped -> zeros, scale > 0
    case.input.view(torch.uint8)[:, 128:256] = 0  # block 1 all zero for every token
    bias, experts = with_bias(case, dtype=torch.bfloat16)
    bias[:, 128:256] = 0
    residual = torch.randn(num_tokens, hidden, device=device, dtype=torch.float16)
    residual[:, 128:256] = 0
    residual[1] = 0
    kwargs = dict(scale=2.5, input_scales=scales, bias=bias, expert_ids=experts,
                  residual=residual, amax_floor=1e-4)
    buf = torch.full((blocks(hidden), num_tokens + 3), float("nan"), device=device)
    out_scales = buf[:, :num_tokens].t()  # FlashInfer-style [B, T] buffer
    out = torch.empty(num_tokens, hidden, device=device, dtype=FP8)
    mf.finalize_fp8(case.input, case.row_map, case.weights, out=out, out_scales=out_scales,
                    **kwargs)
    ref_out, ref_scales = reference.finalize_fp8(case.input, case.row_map, case.weights, **kwargs)
    check_fp8(out, out_scales, ref_out, ref_scales)
    floor_scale = torch.tensor(1e-4, device=device) / 448  # fp32 division, as the kernels do
    assert (out_scales[:, 1] == floor_scale).all() and (out_scales[1] == floor_scale).all()
    assert (out.float()[:, 128:256] == 0).all() and (out.float()[1] == 0).all()
    assert buf[:, num_tokens:].isnan().all(), "wrote outside out_scales"


# H=300: the warp-per-block kernel (no 16-column vectors); H=1040: the vector kernel, whose last
# scale block is partial (16 columns); K=2: its 2-rows-in-flight streaming build at T=4100.
@pytest.mark.parametrize("hidden,top_k", [(300, 8), (1040, 8), (1024, 2)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_fp8_out_batch_invariance_bitwise(device, bias, hidden, top_k):
    def run(pr):
        return mf.finalize_fp8(pr.case.input, pr.case.row_map, pr.case.weights,
                               input_scales=pr.scales, bias=pr.bias, expert_ids=pr.experts)
    batch_invariance(device, run,
                     lambda t: Problem(device, t, hidden=hidden, top_k=top_k, bias=bias))


# ---- contract: opcheck, compile, bad input -----------------------------------------------------


def _opcheck_samples(device):
    case, scales = fp8_case(device, 5, 3, 200)
    bias, experts = with_bias(case, dtype=torch.bfloat16)
    fcase = make_case(device, torch.float32, 5, 3, 136, residual=True)
    fbias, fexperts = with_bias(fcase)
    return case, scales, bias, experts, fcase, fbias, fexperts


# opcheck's test_schema compares tensors with allclose, which has no float8 kernel: for FP8
# tensors the other three checks run, and an explicit bitwise check covers "inputs unchanged".
FP8_OPCHECK = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _opcheck_fp8(op, args, kwargs):
    before = [a.clone() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    torch.library.opcheck(op, args, kwargs, test_utils=FP8_OPCHECK)
    op(*args, **kwargs)
    mutable = {i for i, a in enumerate(op._schema.arguments) if a.is_write}
    after = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    for i, (b, a) in enumerate(zip(before, after)):
        if i not in mutable:
            assert torch.equal(bits(b), bits(a)), f"argument {i} mutated"


def test_opcheck_new_arguments(device):
    case, scales, bias, experts, fcase, fbias, fexperts = _opcheck_samples(device)
    ops = torch.ops.moe_finalize
    _opcheck_fp8(ops.finalize.default, (case.input, case.row_map, case.weights),
                 dict(input_scales=scales, out_dtype=torch.float16))
    _opcheck_fp8(ops.finalize.default, (case.input, case.row_map, case.weights),
                 dict(input_scales=scales.t().contiguous().t(), bias=bias, expert_ids=experts))
    torch.library.opcheck(ops.finalize.default, (fcase.input, fcase.row_map, fcase.weights),
                          dict(residual=fcase.residual, bias=fbias.requires_grad_(),
                               expert_ids=fexperts))
    torch.library.opcheck(ops.finalize_out.default,
                          (torch.empty(5, 136, device=device), fcase.input, fcase.row_map,
                           fcase.weights), dict(bias=fbias.detach(), expert_ids=fexperts))
    out = torch.empty(5, 200, device=device, dtype=torch.float32)
    _opcheck_fp8(ops.finalize_out.default, (out, case.input, case.row_map, case.weights),
                 dict(input_scales=scales, bias=bias, expert_ids=experts))
    q = torch.empty(5, 200, device=device, dtype=FP8)
    s = torch.empty(5, 2, device=device)
    _opcheck_fp8(ops.finalize_fp8_out.default, (q, s, case.input, case.row_map, case.weights),
                 dict(input_scales=scales, bias=bias, expert_ids=experts))


def test_compile_fullgraph_dynamic_fp8_and_bias(device):
    def layer(x, m, w, scales, bias, experts, residual):
        y = mf.finalize(x, m, w, input_scales=scales, bias=bias, expert_ids=experts,
                        residual=residual, out_dtype=torch.float32)
        q, qs = mf.finalize_fp8(x, m, w, input_scales=scales, bias=bias, expert_ids=experts)
        return y + 1, q, qs

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for num_tokens in (3, 17):
        case, scales = fp8_case(device, num_tokens, 4, 200)
        bias, experts = with_bias(case)
        residual = torch.randn(num_tokens, 200, device=device)
        got = compiled(case.input, case.row_map, case.weights, scales, bias, experts, residual)
        want = layer(case.input, case.row_map, case.weights, scales, bias, experts, residual)
        torch.testing.assert_close(got[0], want[0])
        assert torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))
        assert torch.equal(got[2], want[2])


def _bad_cases(device):
    """(description, function, kwargs, expected message regex)."""
    x = torch.randn(24, 200, device=device).to(FP8)
    s = torch.rand(24, 2, device=device)
    m = torch.randperm(24, device=device).to(torch.int32).view(8, 3)
    w = torch.rand(8, 3, device=device)
    xf = torch.randn(24, 200, device=device, dtype=torch.bfloat16)
    b = torch.randn(5, 200, device=device)
    e = torch.randint(0, 5, (8, 3), device=device, dtype=torch.int32)
    q = torch.empty(8, 200, device=device, dtype=FP8)
    fin, fp8 = mf.finalize, mf.finalize_fp8
    base = dict(input=x, row_map=m, weights=w)
    return [
        ("no scales", fin, base, r"float8_e4m3fn input needs input_scales"),
        ("scales on float input", fin, dict(input=xf, row_map=m, weights=w, input_scales=s),
         r"input_scales is only for float8_e4m3fn input"),
        ("scales shape", fin, dict(base, input_scales=s[:, :1]),
         r"input_scales must be \[P\] = \[24\] or \[P, ceil\(H/128\)\] = \[24, 2\]"),
        ("scales rows", fin, dict(base, input_scales=s[:20, 0]), r"input_scales must be \[P\]"),
        ("scales 0-D", fin, dict(base, input_scales=s[0, 0]),
         r"input_scales must be \[P\] = \[24\] .* got 0-D with sizes \[\]"),
        ("scales 3-D", fin, dict(base, input_scales=s.view(24, 2, 1)),
         r"input_scales must be \[P\] = \[24\] .* got 3-D with sizes \[24, 2, 1\]"),
        ("scales dtype", fin, dict(base, input_scales=s.half()), r"input_scales must be float32"),
        ("out_dtype fp8", fin, dict(base, input_scales=s, out_dtype=FP8),
         r"out_dtype must be bfloat16, float16 or float32 for float8_e4m3fn input"),
        ("out_dtype on float", fin, dict(input=xf, row_map=m, weights=w, out_dtype=torch.float32),
         r"out_dtype must be None or the dtype of input"),
        ("residual dtype", fin, dict(base, input_scales=s,
                                     residual=torch.randn(8, 200, device=device)),
         r"residual must have the output dtype"),
        ("out dtype", fin, dict(base, input_scales=s, out=q), r"out must be bfloat16, float16"),
        ("bias alone", fin, dict(base, input_scales=s, bias=b),
         r"bias and expert_ids must be given together"),
        ("ids alone", fin, dict(base, input_scales=s, expert_ids=e),
         r"bias and expert_ids must be given together"),
        ("bias shape", fin, dict(base, input_scales=s, bias=b[:, :100], expert_ids=e),
         r"bias must be 2-D \[E, H\] with H = 200"),
        ("bias dtype", fin, dict(base, input_scales=s, bias=b.double(), expert_ids=e),
         r"bias must be bfloat16, float16 or float32"),
        ("ids shape", fin, dict(base, input_scales=s, bias=b, expert_ids=e[:, :2]),
         r"expert_ids must be \[T, K\] = \[8, 3\]"),
        ("ids dtype", fin, dict(base, input_scales=s, bias=b, expert_ids=e.float()),
         r"expert_ids must be int32 or int64"),
        ("fp8 out scales shape", fp8, dict(base, input_scales=s,
                                           out_scales=torch.empty(8, 1, device=device)),
         r"out_scales must be \[T, ceil\(H/128\)\] = \[8, 2\]"),
        ("fp8 out scales dtype", fp8, dict(base, input_scales=s,
                                           out_scales=torch.empty(8, 2, device=device).half()),
         r"out_scales must be float32"),
        ("fp8 out dtype", fp8, dict(base, input_scales=s, out=q.float()),
         r"out must be float8_e4m3fn"),
        ("amax floor", fp8, dict(base, input_scales=s, amax_floor=0.0),
         r"amax_floor must be > 0"),
    ]


def test_bad_input_raises_naming_argument(device):
    for name, fn, kwargs, pattern in _bad_cases(device):
        with pytest.raises(RuntimeError, match=pattern):
            fn(**kwargs)


def test_bad_input_on_meta_matches(device):
    """The fake impls reject the same arguments (torch.compile's view)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name, fn, kwargs, pattern in _bad_cases(device):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                    for k, v in kwargs.items()}
            with pytest.raises(Exception, match=pattern.split(r"\[")[0].split(" \\(")[0]):
                fn(**fake)


def test_benchmark_fp8_hook_calls_the_api(device):
    """benchmarks/bench_finalize.py's FP8 rows time `ours_fp8` through this API."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_finalize as bf

    shape = bf.Shape(model="test", T=9, K=4, H=300)
    variant = bf.Variant("fp8", FP8, torch.bfloat16, fp8=True)
    s = variant.make_set(shape, torch.device(device), torch.Generator(device).manual_seed(0))
    call = bf.ours_fp8_call(mf)
    assert call is not None, "ours_fp8_call does not find input_scales"
    got = call(s)
    check(got, reference.finalize(s.input, s.row_map, s.weights, input_scales=s.scales))
