"""The op contract beyond the numbers: bad input, opcheck, torch.compile, autograd."""

import contextlib

import pytest
import torch

import moe_finalize_plugin as mf
from moe_finalize_plugin import reference

from cases import TOLERANCES, make_case, poisoned

# ---- bad input: a message naming the argument, raised before anything is written -------------


def _bad_cases(device):
    """(description, kwargs for mf.finalize, expected message regex)."""
    x = torch.randn(24, 64, device=device, dtype=torch.bfloat16)
    m = torch.randperm(24, device=device).to(torch.int32).view(8, 3)
    w = torch.rand(8, 3, device=device)
    r = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
    other = "cpu" if device != "cpu" else "meta"
    return [
        ("input rank", dict(input=x.view(24, 8, 8), row_map=m, weights=w), r"input must be 2-D"),
        ("input dtype", dict(input=x.to(torch.float64), row_map=m, weights=w),
         r"input must be bfloat16, float16 or float32, got float64"),
        ("input stride", dict(input=x.t(), row_map=m.view(4, 6)[:, :4], weights=None),
         r"input must have unit stride"),
        ("map rank", dict(input=x, row_map=m.view(-1), weights=None), r"row_map must be 2-D"),
        ("map dtype", dict(input=x, row_map=m.float(), weights=w), r"row_map must be int32 or int64"),
        ("weights shape", dict(input=x, row_map=m, weights=w[:7]), r"weights must be \[T, K\] = \[8, 3\]"),
        ("weights K", dict(input=x, row_map=m, weights=w[:, :2]), r"weights must be \[T, K\]"),
        ("weights dtype", dict(input=x, row_map=m, weights=w.double()),
         r"weights must be float32, bfloat16 or float16"),
        ("weights rank", dict(input=x, row_map=m, weights=w.view(-1)), r"weights must be 2-D"),
        ("residual shape", dict(input=x, row_map=m, weights=w, residual=r[:5]),
         r"residual must be \[8, 64\]"),
        ("residual dtype", dict(input=x, row_map=m, weights=w, residual=r.float()),
         r"residual must have the dtype of input"),
        ("residual stride", dict(input=x, row_map=m, weights=w,
                                 residual=torch.randn(64, 8, device=device, dtype=torch.bfloat16).t()),
         r"residual must have unit stride"),
        ("top_k missing", dict(input=x, row_map=None, weights=None), r"top_k is required"),
        ("top_k < 1", dict(input=x, row_map=None, weights=None, top_k=0), r"top_k must be >= 1"),
        ("top_k mismatch", dict(input=x, row_map=m, weights=w, top_k=4), r"top_k \(4\) does not match"),
        ("rows not multiple of K", dict(input=x, row_map=None, weights=None, top_k=5),
         r"input rows \(24\) must be a multiple of top_k"),
        ("contiguous rows vs weights", dict(input=x, row_map=None, weights=w[:5]),
         r"input must hold T\*K = 15 rows"),
        ("empty input", dict(input=x[:0], row_map=m, weights=w), r"input is empty \(P = 0\) but row_map"),
        ("device mismatch", dict(input=x, row_map=m.to(other), weights=w), r"row_map must be on the same device"),
        ("weights device", dict(input=x, row_map=m, weights=w.to(other)), r"weights must be on the same device"),
    ]


def _out_cases(device):
    x = torch.randn(24, 64, device=device, dtype=torch.bfloat16)
    m = torch.randperm(24, device=device).to(torch.int32).view(8, 3)
    w = torch.rand(8, 3, device=device)
    r = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
    big = torch.randn(40, 64, device=device, dtype=torch.bfloat16)
    return [
        ("out shape", poisoned(7, 64, x), dict(input=x, row_map=m, weights=w), r"out must be \[8, 64\]"),
        ("out dtype", poisoned(8, 64, x).float(), dict(input=x, row_map=m, weights=w),
         r"out must have the dtype of input"),
        ("out stride", poisoned(64, 8, x).t(), dict(input=x, row_map=m, weights=w), r"out must have unit stride"),
        ("out overlaps input", big[16:24], dict(input=big[:24], row_map=m, weights=w), r"out overlaps input"),
        ("out partially overlaps residual", big[1:9],
         dict(input=x, row_map=m, weights=w, residual=big[0:8]), r"out partially overlaps residual"),
        ("out device", poisoned(8, 64, x).to("cpu" if device != "cpu" else "meta"),
         dict(input=x, row_map=m, weights=w, residual=r), r"out must be on the same device"),
    ]


def test_bad_input_raises_naming_argument(device):
    for name, kwargs, pattern in _bad_cases(device):
        if "device" in name and device == "cpu":
            continue  # meta tensors are not a second real device; covered on CUDA
        with pytest.raises(RuntimeError, match=pattern):
            mf.finalize(**kwargs)


def test_bad_out_raises_and_writes_nothing(device):
    for name, out, kwargs, pattern in _out_cases(device):
        if "device" in name and device == "cpu":
            continue
        before = out.clone()
        with pytest.raises(RuntimeError, match=pattern):
            mf.finalize(**kwargs, out=out)
        assert torch.equal(before.isnan(), out.isnan()) and torch.equal(
            before.nan_to_num(), out.nan_to_num()), f"{name}: out modified"


def test_bad_input_on_meta_matches(device):
    """The fake impls reject the same shapes under FakeTensorMode (torch.compile's view)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(24, 64, dtype=torch.bfloat16)
        m = torch.empty(8, 3, dtype=torch.int32)
        w = torch.empty(7, 3)
        with pytest.raises(Exception, match=r"weights must be \[8, 3\]"):
            torch.ops.moe_finalize.finalize(x, m, w)
        with pytest.raises(Exception, match=r"top_k is required"):
            torch.ops.moe_finalize.finalize(x, None, None)
        out = torch.ops.moe_finalize.finalize(x, m, None)
        assert out.shape == (8, 64) and out.dtype == torch.bfloat16


# ---- opcheck -------------------------------------------------------------------------------


def _opcheck_samples(device):
    samples = []
    for layout in ("token_major", "k_major", "none"):
        for residual in (False, True):
            case = make_case(device, torch.float32, 6, 4, 40, layout, residual=residual, scale=1.5)
            samples.append(case)
    case = make_case(device, torch.bfloat16, 5, 2, 24, "none", weights_dtype=None)
    samples.append(case)
    return samples


def test_opcheck_finalize(device):
    for case in _opcheck_samples(device):
        kwargs = {k: v for k, v in case.kwargs().items() if v is not None}
        torch.library.opcheck(torch.ops.moe_finalize.finalize.default,
                              (case.input, case.row_map, case.weights), kwargs)


def test_opcheck_finalize_out(device):
    for case in _opcheck_samples(device):
        out = poisoned(case.residual.shape[0] if case.residual is not None else
                       (case.row_map.shape[0] if case.row_map is not None else
                        case.input.shape[0] // (case.weights.shape[1] if case.weights is not None
                                                else case.top_k)),
                       case.input.shape[1], case.input)
        kwargs = {k: v for k, v in case.kwargs().items() if v is not None}
        torch.library.opcheck(torch.ops.moe_finalize.finalize_out.default,
                              (out, case.input, case.row_map, case.weights), kwargs)


# ---- torch.compile ---------------------------------------------------------------------------


def test_compile_fullgraph_dynamic(device):
    torch._dynamo.reset()

    def layer(input, row_map, weights, residual, out):
        y = mf.finalize(input, row_map, weights, residual=residual, scale=2.0)
        mf.finalize(input, row_map, weights, residual=y, out=out)  # out-variant in the graph
        return y * 2, out

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for num_tokens in (5, 12, 31):  # dynamic T: no recompilation per size
        case = make_case(device, torch.bfloat16, num_tokens, 8, 256, residual=True)
        out = poisoned(num_tokens, 256, case.input)
        y, _ = compiled(case.input, case.row_map, case.weights, case.residual, out)
        ref_y = reference.finalize(case.input, case.row_map, case.weights, residual=case.residual,
                                   scale=2.0)
        atol, rtol = TOLERANCES[torch.bfloat16]
        torch.testing.assert_close(y.float(), (ref_y * 2).float(), atol=2 * atol, rtol=rtol)
        torch.testing.assert_close(out.float(), reference.finalize(
            case.input, case.row_map, case.weights, residual=ref_y).float(), atol=2 * atol, rtol=rtol)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


# ---- autograd ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["token_major", "k_major", "none"])
def test_autograd_matches_reference(device, layout):
    """Gradients of input, weights and residual, with -1 entries, duplicates and strided maps."""
    case = make_case(device, torch.float32, 10, 4, 48, layout, residual=True, scale=1.3,
                     extra_rows=6)
    if case.row_map is not None:
        case.row_map[:, 2] = case.row_map[:, 0]  # duplicate rows accumulate in grad_input
        case.row_map[1, 0] = -1
    grads = []
    upstream = torch.randn(10, 48, device=device)
    for fn in (mf.finalize, reference.finalize):
        x = case.input.detach().clone().requires_grad_()
        w = case.weights.detach().clone().requires_grad_()
        r = case.residual.detach().clone().requires_grad_()
        y = fn(x, case.row_map, w, residual=r, scale=case.scale)
        (y * upstream).sum().backward()
        grads.append((x.grad, w.grad, r.grad))
    for ours, ref, name in zip(grads[0], grads[1], ("input", "weights", "residual")):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=f"grad of {name}")


def test_autograd_bf16_weights_only(device):
    case = make_case(device, torch.bfloat16, 7, 8, 64, weights_dtype=torch.bfloat16)
    w = case.weights.detach().clone().requires_grad_()
    mf.finalize(case.input, case.row_map, w).float().sum().backward()
    w_ref = case.weights.detach().clone().requires_grad_()
    reference.finalize(case.input, case.row_map, w_ref).float().sum().backward()
    assert w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad.float(), w_ref.grad.float(), atol=0.1, rtol=2e-2)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_eager_dispatch_modes(device, mode):
    """The wrapper's three eager paths (autograd; below the Autograd key; inference mode, where
    the key is already excluded) give the reference result, functional and out=, and only the
    autograd path records a graph."""
    case = make_case(device, torch.float32, 6, 4, 40, residual=True, scale=0.9, extra_rows=3)
    x = case.input.detach().clone().requires_grad_(mode == "grad")
    ref = reference.finalize(case.input, case.row_map, case.weights, residual=case.residual,
                             scale=case.scale)
    context = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad,
               "inference_mode": torch.inference_mode}[mode]
    with context():
        y = mf.finalize(x, case.row_map, case.weights, residual=case.residual, scale=case.scale)
        out = poisoned(6, 40, x)
        returned = mf.finalize(x.detach(), case.row_map, case.weights, residual=case.residual,
                               scale=case.scale, out=out)
    assert returned is out
    assert y.requires_grad == (mode == "grad")
    torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_out_variant_refuses_grad(device):
    case = make_case(device, torch.float32, 4, 2, 16)
    x = case.input.detach().clone().requires_grad_()
    with pytest.raises(RuntimeError, match="does not support autograd"):
        mf.finalize(x, case.row_map, case.weights, out=poisoned(4, 16, x))


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_double_precision_path(device):
    """Finite differences on fp32 (our widest dtype) at loose tolerance: catches wrong formulas."""
    case = make_case(device, torch.float32, 3, 3, 5, extra_rows=2)
    x = case.input.detach().clone().requires_grad_()
    w = case.weights.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: mf.finalize(a, case.row_map, b, scale=0.7), (x, w),
        eps=1e-2, atol=5e-3, rtol=5e-3,
    )


# (T, K, H): 264 slots take grad_input's scanning plan, 2400 its counting plan.
BACKWARD_SHAPES = [(33, 8, 1032), (300, 8, 264)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_backward_kernels(dtype, shape):
    """The CUDA gradient kernels: opcheck, reference values, bitwise run-to-run equality."""
    num_tokens, top_k, hidden = shape
    case = make_case("cuda", dtype, num_tokens, top_k, hidden, "k_major", extra_rows=9, scale=2.5)
    case.row_map[:, 3] = case.row_map[:, 1]  # shared rows take the ordered-scan path
    grad_out = torch.randn(num_tokens, hidden, device="cuda").to(dtype)
    args = (grad_out, case.input, case.row_map, case.weights)
    for op in (torch.ops.moe_finalize.finalize_grad_input, torch.ops.moe_finalize.finalize_grad_weights):
        torch.library.opcheck(op.default, args, {"scale": 2.5})
    from moe_finalize_plugin.backward import finalize_backward

    ours = finalize_backward(*args, top_k=None, scale=2.5)
    again = finalize_backward(*args, top_k=None, scale=2.5)
    assert torch.equal(ours[0], again[0]) and torch.equal(ours[1], again[1])
    x = case.input.detach().float().requires_grad_()
    w = case.weights.detach().clone().requires_grad_()
    reference.finalize(x, case.row_map, w, scale=2.5).backward(grad_out.float())
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(ours[0].float(), x.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(ours[1], w.grad, atol=1e-2 * 32, rtol=1e-2)


@pytest.mark.cuda
def test_cuda_grad_input_plans_bitwise_equal():
    """A row's gradient does not depend on the launch plan: the first 24 tokens of a 300-token
    problem (counting plan), re-indexed onto their own rows, take the scanning plan and must
    give the same bits for every row only they point at (shared rows included)."""
    big = make_case("cuda", torch.bfloat16, 300, 8, 264, "k_major", extra_rows=9)
    big.row_map[:, 3] = big.row_map[:, 1]  # rows shared inside a token
    grad_out = torch.randn(300, 264, device="cuda").to(torch.bfloat16)
    grad_input = torch.ops.moe_finalize.finalize_grad_input
    whole = grad_input(grad_out, big.input, big.row_map, big.weights, scale=1.7)
    head_map = big.row_map[:24]
    rows = head_map[head_map >= 0].long().unique()  # ascending
    others = big.row_map[24:]
    rows = rows[~torch.isin(rows, others[others >= 0].long())]
    small_map = torch.where(torch.isin(head_map.long(), rows),
                            torch.searchsorted(rows, head_map.long()), -1).to(torch.int32)
    part = grad_input(grad_out[:24], big.input[rows], small_map, big.weights[:24], scale=1.7)
    assert rows.numel() > 100  # ~140: 192 slots, 15% skipped, 24 shared pairs
    assert torch.equal(part, whole[rows])
