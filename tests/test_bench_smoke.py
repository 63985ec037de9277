"""Smoke test of benchmarks/bench_finalize.py's non-GPU logic (fast, CPU only).

Shape list, floor arithmetic (against issue 3's table), L2 rotation count, verdicts,
the JSON schema of a `--device cpu --quick` run, the plot, and the plain Triton peers
checked against the reference under TRITON_INTERPRET=1. Timings are never asserted.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_finalize as bf  # noqa: E402

REQUIRED_KEYS = {"impl", "T", "K", "H", "dtype", "graph_us", "event_us", "floor_us", "pct_of_floor",
                 "ratio_to_triton", "card", "torch", "copy_bw_GBps", "l2_bytes"}


def test_spec_shapes_cover_spec_md():
    shapes = bf.spec_shapes()
    keys = {(s.T, s.K, s.H) for s in shapes}
    assert len(shapes) == len(keys) == 9 + 4 * 3
    assert {(t, 8, 4096) for t in (1, 16, 128, 256, 512, 1024, 4096, 8192, 16384)} <= keys
    for k, h in ((8, 7168), (2, 4096), (4, 2880), (8, 2048)):
        assert {(t, k, h) for t in (16, 1024, 16384)} <= keys
    quick = bf.quick_shapes()
    assert set(quick) <= set(shapes) and {s.model for s in quick} == {s.model for s in shapes}


@pytest.mark.parametrize("T,floor", [(1, 0.02), (16, 0.40), (128, 3.17), (256, 6.33), (512, 12.67),
                                     (1024, 25.34), (4096, 101.4), (16384, 405.4)])
def test_floor_matches_issue3_table(T, floor):
    # Issue 3's floors: K=8, H=4096, bf16 rows/out, int32 map, fp32 weights, 2.98 TB/s copy.
    nbytes = bf.bytes_moved(T, 8, 4096)
    assert nbytes == T * 8 * 4096 * 2 + T * 8 * 8 + T * 4096 * 2
    assert bf.floor_us(nbytes, 2982.0) == pytest.approx(floor, rel=0.02, abs=0.005)


def test_fp8_bytes_and_variant_nbytes():
    shape = bf.Shape("custom", 3, 4, 300)
    fp8 = bf.Variant("fp8", bf.torch.float8_e4m3fn, bf.torch.bfloat16, fp8=True)
    assert fp8.nbytes(shape) == 3 * 4 * (300 + 4 + 4 + 4 * 3) + 3 * 300 * 2
    bf16 = bf.Variant("bf16", bf.torch.bfloat16, bf.torch.bfloat16)
    assert bf16.nbytes(shape) == bf.bytes_moved(3, 4, 300)
    # FP8 output: e4m3 codes plus one fp32 scale per 128-column block written per token.
    fp8_out = bf.Variant("fp8_out", bf.torch.float8_e4m3fn, bf.torch.float8_e4m3fn, fp8=True,
                         fp8_out=True)
    assert fp8_out.nbytes(shape) == 3 * 4 * (300 + 4 + 4 + 4 * 3) + 3 * (300 + 4 * 3)


def test_fp8_out_rows_are_checked_against_the_reference():
    """The FP8-output rows dequantise (codes, scales) before comparing: ours passes, and a
    result with a wrong scale layout does not."""
    mf = pytest.importorskip("moe_finalize_plugin")
    torch = bf.torch
    variant = bf.Variant("fp8_out", torch.float8_e4m3fn, torch.float8_e4m3fn, fp8=True,
                         fp8_out=True)
    shape, gen = bf.Shape("custom", 5, 4, 300), torch.Generator().manual_seed(0)
    reference = bf._import_reference()
    (ours,) = bf.fp8_out_impls(mf)
    ok, rel, _ = bf.check_correct(ours, variant, shape, reference, torch.device("cpu"), gen, 1e-2)
    assert ok and rel < bf.FP8_OUT_TOL, rel
    flipped = bf.Impl("flipped", lambda s: (ours.call(s)[0], s.out_scales.flip(1)))
    ok, rel, _ = bf.check_correct(flipped, variant, shape, reference, torch.device("cpu"), gen, 1e-2)
    assert not ok, rel


def test_targets():
    assert [bf.target_ratio(t) for t in (1, 16, 128, 256, 512, 1024, 4096, 16384)] == \
        [0.62, 0.62, 0.62, 0.78, 0.83, 0.92, 0.97, 0.97]
    dsv3 = bf.Shape("DeepSeek-V3", 16384, 8, 7168)
    assert bf.abs_target_us("NVIDIA H100 80GB HBM3", dsv3) == 687.7
    assert bf.abs_target_us("NVIDIA H200", dsv3) is None
    assert bf.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_rotation_sets():
    l2 = 50 << 20
    n = bf.rotation_sets(73_792, l2, 3.0, 1 << 40, 100_000)
    assert n * 73_792 > 3 * l2 and (n - 1) * 73_792 <= 3 * l2
    assert bf.rotation_sets(2 << 30, l2, 3.0, 1 << 40, 4096) == 2  # big sets: still rotate two
    assert bf.rotation_sets(2 << 30, l2, 3.0, 3 << 30, 4096) == 1  # memory cap wins
    assert bf.rotation_sets(1000, l2, 3.0, 1 << 40, 64) == 64  # max_sets cap
    assert bf.rotation_sets(1000, 0, 3.0, 1 << 40, 64) == 2  # unknown L2 (CPU)


def test_ratios_and_verdicts():
    meta = {"card": "X"}
    common = dict(kind="kernel", T=256, K=8, H=4096, bytes=1000, floor_us=1.0)
    recs = [bf.new_record(meta, impl="triton", graph_us=10.0, event_us=12.0, **common),
            bf.new_record(meta, impl="ours_pdl", graph_us=7.5, event_us=9.0, correct=True, **common),
            bf.new_record(meta, impl="ours_nopdl", graph_us=8.0, event_us=9.0, correct=True, **common),
            bf.new_record(meta, impl="eager", graph_us=None, event_us=30.0, **common)]
    bf.finish_shape_records(recs, "triton", ("ours_pdl", "ours"), fp8=False)
    by = {r["impl"]: r for r in recs}
    assert by["ours_pdl"]["ratio_to_triton"] == pytest.approx(0.75)
    assert by["ours_pdl"]["status"] == "PASS" and by["ours_pdl"]["target_ratio"] == 0.78
    assert by["ours_nopdl"]["status"] is None  # verdicts judge the default (PDL) config
    assert by["ours_pdl"]["pct_of_floor"] == pytest.approx(100 / 7.5)
    assert by["eager"]["ratio_to_triton"] is None  # event time never compared with graph time
    recs[1]["graph_us"] = 8.0
    bf.finish_shape_records(recs, "triton", ("ours_pdl",), fp8=False)
    assert recs[1]["status"] == "MISS"
    recs[1]["correct"] = False
    bf.finish_shape_records(recs, "triton", ("ours_pdl",), fp8=False)
    assert recs[1]["status"] == "WRONG"


def test_quick_cpu_run_writes_schema(tmp_path, capsys):
    rc = bf.main(["--device", "cpu", "--quick", "--skip-compile", "--no-plot", "--out-dir", str(tmp_path),
                  "--copy-mb", "16", "--host-iters", "20", "--host-repeats", "3", "--max-iters", "5",
                  "--filter", r"T=1$|Mixtral|gpt-oss"])
    assert rc == 0
    records = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert isinstance(records, list) and records
    kern = [r for r in records if r["kind"] == "kernel"]
    assert {r["shape"] for r in kern} == {"K8 H4096 T=1", "Mixtral T=16", "gpt-oss T=16"}
    for r in records:
        assert REQUIRED_KEYS <= r.keys()
        assert r["copy_bw_GBps"] > 0
    for r in kern:
        assert r["error"] is None, r["error"]
        assert r["correct"] is True and r["rel_err"] < 1e-2
        assert r["floor_us"] == pytest.approx(bf.floor_us(bf.bytes_moved(r["T"], r["K"], r["H"]), r["copy_bw_GBps"]))
        assert r["event_us"] > 0 and r["graph_us"] is None  # no CUDA graphs on CPU
        assert r["pct_of_floor"] > 0 and r["time_basis"] == "event"
    assert "eager" in {r["impl"] for r in kern}
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("gpt-oss T=16")  # table last


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    import plot_results

    meta = {"card": "test card", "torch": "x", "copy_bw_GBps": 3000.0}
    recs = []
    for s in bf.spec_shapes():
        nbytes = bf.bytes_moved(s.T, s.K, s.H)
        for impl, eff in (("triton", 0.6), ("ours_pdl", 0.8), ("eager", 0.1)):
            t = bf.floor_us(nbytes, 3000.0) / eff + 2.0
            recs.append(bf.new_record(meta, kind="kernel", impl=impl, model=s.model, shape=s.label, T=s.T,
                                      K=s.K, H=s.H, dtype="bfloat16", bytes=nbytes, graph_us=t, event_us=t))
    json_path = tmp_path / "r.json"
    json_path.write_text(json.dumps(recs))
    assert plot_results.main([str(json_path)]) == 0
    png = tmp_path / "r.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_markdown_tables_from_committed_results():
    """The README tables come from the committed H100 JSON: one row per shape, ours in bold."""
    import plot_results

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/nvidia-h100-80gb-hbm3.json"
    records = json.loads(path.read_text())
    text = plot_results.markdown_tables(records)
    tables = [t for t in text.split("\n\n") if t.startswith("|")]
    assert len(tables) == 3  # bf16, FP8 input, FP8 output
    for table, impl in zip(tables, ("ours_pdl", "ours_fp8", "ours_fp8_out")):
        rows = table.splitlines()[2:]
        mine = [r for r in records if r.get("kind") == "kernel" and r["impl"] == impl]
        assert len(rows) == len(mine) > 0
        one = next(r for r in mine if r["model"] == "sweep" and r["T"] == 1)
        row = next(r for r in rows if r.startswith("| K=8 H=4096 | 1 |"))
        assert f"**{one['graph_us']:.2f}**" in row



def test_markdown_tables_of_an_fp8_only_run():
    """An --only-fp8 run (the committed run's FP8 records alone) gives the two FP8 tables and no
    empty bf16 one."""
    import plot_results

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/nvidia-h100-80gb-hbm3.json"
    records = [r for r in json.loads(path.read_text()) if r.get("dtype") == "float8_e4m3fn"]
    assert records
    text = plot_results.markdown_tables(records)
    tables = [t for t in text.split("\n\n") if t.startswith("|")]
    assert len(tables) == 2
    assert "triton_fp8" in tables[0].splitlines()[0] and "ours_fp8_out" in tables[1].splitlines()[0]
    assert all(len(t.splitlines()) > 2 for t in tables)

PEER_CHECK = textwrap.dedent(r"""
    import sys, torch
    sys.path[:0] = [{bench!r}, {repo!r}]
    import triton_peer as tp
    from bench_finalize import _import_reference, quantize_fp8_blocks, dequantize_fp8_blocks
    ref = _import_reference()
    torch.manual_seed(0)
    T, K, H = 5, 3, 1100                       # two column blocks, the second partial
    P = T * K + 2
    x = torch.randn(P, H + 8, dtype=torch.bfloat16)[:, :H]          # padded rows
    m = torch.randperm(P)[: T * K].int().view(K, T).t()              # k-major (strided) map
    m[1, 2] = -1; m[4, 0] = -1
    x[0] = float("nan"); m[m == 0] = -1                              # a skipped row never leaks
    w = torch.rand(K, T).t()
    want = ref.finalize(x.float(), m, w)
    got = tp.finalize(x, m, w, out=torch.full((T, H), float("nan"), dtype=torch.bfloat16))
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert torch.isfinite(got).all() and rel < 1e-2, rel
    q, s = quantize_fp8_blocks(torch.randn(P, H))
    s_t = s.t().contiguous().t()                                     # transposed scale layout
    want = ref.finalize(dequantize_fp8_blocks(q, s), m, w)
    got = tp.finalize_fp8(q, s_t, m, w)
    rel8 = ((got.float() - want).norm() / want.norm()).item()
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all() and rel8 < 1e-2, rel8
    perm = torch.randperm(T * K).int().view(K, T).t()                # k-major permutation
    g = torch.randn(T, H, dtype=torch.bfloat16)
    x = torch.randn(T * K, H).requires_grad_()
    ref.finalize(x, perm, w).backward(g.float())
    got = tp.scatter_grad_input(g, perm, w, T * K)
    rel_g = ((got.float() - x.grad).norm() / x.grad.norm()).item()
    assert torch.isfinite(got).all() and rel_g < 1e-2, rel_g
    print("ok", rel, rel8, rel_g)
""")


def test_triton_peers_match_reference_in_interpreter():
    pytest.importorskip("triton")
    code = PEER_CHECK.format(bench=str(BENCH_DIR), repo=str(BENCH_DIR.parent))
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")


@pytest.mark.parametrize("kind", bf.ROW_MAPS)
def test_row_maps_are_permutations_of_the_buffer(kind):
    torch = bf.torch
    shape = bf.Shape("Mixtral", 300, 2, 64)
    m = bf.make_row_map(kind, shape, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert m.shape == (300, 2) and m.dtype == torch.int32
    assert torch.equal(m.flatten().sort().values, torch.arange(600, dtype=torch.int32))


def test_grouped_map_is_grouped_by_expert_in_token_order():
    """Read in buffer order, the tokens form one increasing run per expert segment: at most
    E runs (Mixtral: 8 experts), where a random permutation has hundreds."""
    torch = bf.torch
    shape = bf.Shape("Mixtral", 300, 2, 64)

    def runs(m):
        tokens = torch.empty(600, dtype=torch.long)
        tokens[m.flatten().long()] = torch.arange(300).repeat_interleave(2)
        return 1 + int((tokens[1:] < tokens[:-1]).sum())

    gen = torch.Generator().manual_seed(2)
    grouped = bf.make_row_map("grouped", shape, torch.device("cpu"), gen)
    assert runs(grouped) <= bf.MODEL_EXPERTS["Mixtral"]
    assert runs(bf.make_row_map("random", shape, torch.device("cpu"), gen)) > 100
    assert runs(bf.make_row_map("contiguous", shape, torch.device("cpu"), gen)) == 1
    with pytest.raises(ValueError, match="experts"):
        bf.make_row_map("grouped", shape, torch.device("cpu"), gen, experts=1)
