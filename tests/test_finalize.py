"""finalize / finalize_out against reference.py on random data, every layout, dtype and option."""

import pytest
import torch

import moe_finalize_plugin as mf
from moe_finalize_plugin import reference

from cases import LAYOUTS, TOLERANCES, make_case, poisoned

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (T, K, H): T in {0, 1, odd, 256}, K in {1, 2, 3, 8, 64, 65, 128}, H in {1, odd, not a
# multiple of 8, 4096, 7168}; chosen so every value appears without a full cross product.
SHAPES = [
    (0, 8, 4096),
    (1, 1, 1),
    (1, 8, 4096),
    (7, 3, 13),
    (5, 2, 100),
    (256, 8, 4096),
    (3, 64, 7168),
    (9, 65, 100),
    (2, 128, 37),
    (33, 8, 7168),
    (17, 4, 2880),
    (1030, 2, 264),  # CUDA: the L1-allocating launch from T=1024
    (4100, 3, 2056),  # CUDA: the streaming launch from T=4096 (1-D grid of 3 or 5 column blocks)
    (2050, 6, 520),  # CUDA: with K > 4 the streaming launch starts at T=2048
]


def expected(case, dtype):
    return reference.finalize(case.input, case.row_map, case.weights, **case.kwargs())


def check(out, ref):
    atol, rtol = TOLERANCES[ref.dtype]
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN output elements"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-K{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, dtype, shape, layout):
    num_tokens, top_k, hidden = shape
    case = make_case(device, dtype, num_tokens, top_k, hidden, layout, extra_rows=5)
    out = mf.finalize(case.input, case.row_map, case.weights, **case.kwargs())
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    check(out, expected(case, dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weights_dtype", [None, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options_out_variant(device, dtype, weights_dtype, layout):
    """Null/low-precision weights, residual, scale, padded input rows and a strided `out`."""
    num_tokens, top_k, hidden = 19, 8, 264
    case = make_case(device, dtype, num_tokens, top_k, hidden, layout, weights_dtype=weights_dtype,
                     residual=True, scale=2.5, padded_rows=24, extra_rows=3)
    buffer = poisoned(num_tokens, hidden + 40, case.input)
    out = buffer[:, 8:8 + hidden]
    result = mf.finalize(case.input, case.row_map, case.weights, **case.kwargs(), out=out)
    assert result is out
    check(out, expected(case, dtype))
    assert buffer[:, :8].isnan().all() and buffer[:, 8 + hidden:].isnan().all(), "wrote outside out"


@pytest.mark.parametrize("map_dtype", [torch.int32, torch.int64], ids=str)
def test_int64_map_and_all_skipped(device, map_dtype):
    case = make_case(device, torch.bfloat16, 11, 6, 520, map_dtype=map_dtype, residual=True)
    case.row_map[3] = -1  # token 3 has no local expert: gets residual only
    case.row_map[4, 2] = -7  # any negative value skips
    out = mf.finalize(case.input, case.row_map, case.weights, **case.kwargs())
    check(out, expected(case, torch.bfloat16))
    assert torch.equal(out[3], case.residual[3])


def test_all_skipped_no_residual_gives_zeros(device):
    case = make_case(device, torch.float16, 4, 3, 77)
    case.row_map.fill_(-1)
    out = mf.finalize(case.input, case.row_map, case.weights)
    assert torch.equal(out, torch.zeros_like(out))


def test_duplicate_rows(device):
    """Several slots may point at one row (replicated experts): each contributes once."""
    case = make_case(device, torch.float32, 6, 4, 96, drop=0.0)
    case.row_map[:, 1] = case.row_map[:, 0]
    out = mf.finalize(case.input, case.row_map, case.weights)
    check(out, expected(case, torch.float32))


def test_in_place_residual(device):
    case = make_case(device, torch.bfloat16, 21, 8, 1032, residual=True, scale=0.5)
    ref = expected(case, torch.bfloat16)
    residual = case.residual
    mf.finalize(case.input, case.row_map, case.weights, residual=residual, scale=0.5, out=residual)
    check(residual, ref)


def test_zero_tokens_returns_empty(device):
    input = torch.randn(0, 64, device=device, dtype=torch.bfloat16)
    row_map = torch.empty(0, 8, dtype=torch.int32, device=device)
    out = mf.finalize(input, row_map, None)
    assert out.shape == (0, 64)
    out = mf.finalize(torch.randn(0, 64, device=device), None, None, top_k=4)
    assert out.shape == (0, 64)


@pytest.mark.parametrize("top_k", [8, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_invariance_bitwise(device, dtype, top_k):
    """A token's row is bitwise identical whatever T, chunking and launch shape (on CUDA the
    load flavour changes at T=1024, block order and rows in flight at T=2048 for K > 4 and at
    T=4096 otherwise, and K <= 2 reads its slots as one batch; the arithmetic must not)."""
    num_tokens, hidden = 4100, 4104  # H % 8 != 0: vector body + scalar tail
    case = make_case(device, dtype, num_tokens, top_k, hidden, residual=True, scale=1.7)
    full = mf.finalize(case.input, case.row_map, case.weights, **case.kwargs())
    for start, stop in [(0, 1), (5, 6), (17, 19), (100, 228), (299, 300), (1099, 1100),
                        (0, 1024), (0, 2047), (2050, 4098), (4099, 4100)]:
        part = mf.finalize(case.input, case.row_map[start:stop], case.weights[start:stop],
                           residual=case.residual[start:stop], scale=1.7)
        assert torch.equal(part, full[start:stop]), f"tokens {start}:{stop} differ"
    # The same rows through the scalar path (misaligned row stride forces 1-element accesses).
    padded = torch.empty(case.input.shape[0], hidden + 1, device=device, dtype=dtype)
    padded[:, :hidden] = case.input
    scalar = mf.finalize(padded[:, :hidden], case.row_map, case.weights, **case.kwargs())
    assert torch.equal(scalar, full), "vector and scalar paths disagree"
    again = mf.finalize(case.input, case.row_map, case.weights, **case.kwargs())
    assert torch.equal(again, full), "run-to-run difference"


def test_map_entry_past_input(device):
    """CPU raises naming the first bad (t, k); CUDA never reads past input and skips the slot."""
    case = make_case(device, torch.bfloat16, 9, 4, 128, drop=0.0)
    rows = case.input.shape[0]
    case.row_map[2, 1] = rows
    case.row_map[5, 3] = 2**30
    out = poisoned(9, 128, case.input)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"row_map\[2, 1\] = %d is out of range" % rows):
            mf.finalize(case.input, case.row_map, case.weights, out=out)
        assert out.isnan().all(), "out was modified before the error"
    else:
        mf.finalize(case.input, case.row_map, case.weights, out=out)
        skipped = case.row_map.clone()
        skipped[2, 1] = -1
        skipped[5, 3] = -1
        check(out, reference.finalize(case.input, skipped, case.weights))
    with pytest.raises(ValueError, match=r"row_map\[2, 1\] = %d is out of range" % rows):
        mf.finalize(case.input, case.row_map, case.weights, validate=True)


def test_offsets_past_2_31_elements(device):
    """Rows beyond element 2**31 are addressed with 64-bit offsets (pages stay untouched)."""
    hidden = 4096
    rows = (2**31) // hidden + 64
    try:
        input = torch.empty(rows, hidden, device=device, dtype=torch.bfloat16)
    except (RuntimeError, MemoryError):
        pytest.skip("not enough memory for a 4 GiB tensor")  # not hit on CI (24 GiB) or an H100
    used = torch.tensor([[rows - 1, 3], [rows - 40, rows - 2]], device=device, dtype=torch.int32)
    for r in used.flatten().tolist():
        input[r] = torch.randn(hidden, device=device).to(torch.bfloat16)
    weights = torch.rand(2, 2, device=device)
    out = mf.finalize(input, used, weights)
    manual = torch.stack([
        (weights[t, 0] * input[used[t, 0]].float() + weights[t, 1] * input[used[t, 1]].float())
        for t in range(2)
    ]).to(torch.bfloat16)
    check(out, manual)
