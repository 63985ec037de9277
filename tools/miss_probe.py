"""One launch of ours and one of the plain Triton peer per benchmark shape, on the benchmark's
expert-grouped map, for Nsight Compute (the evidence behind each missed target in
benchmarks/NOTES.md). A shape is MODEL:T with MODEL one of bench_finalize's models or `sweep`
(K=8, H=4096); an `fp8:` prefix reads e4m3 input with 128-column block scales.
    ncu --clock-control none --csv --metrics gpu__time_duration.sum,... -k regex:finalize \
        python tools/miss_probe.py sweep:512 gpt-oss:16 fp8:sweep:16
Then one row per launch from ncu's CSV (`--page details --log-file ncu.csv`), same shapes:
    python tools/miss_probe.py --table ncu.csv sweep:512 gpt-oss:16 fp8:sweep:16"""

import csv
import io
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_finalize as bf  # noqa: E402
import triton_peer  # noqa: E402

import moe_finalize_plugin as mf  # noqa: E402


def variant(fp8: bool) -> bf.Variant:
    """The benchmark's input: bf16 rows, or e4m3 rows with 128-column block scales."""
    return (bf.Variant("fp8", torch.float8_e4m3fn, torch.bfloat16, fp8=True) if fp8
            else bf.Variant("bf16", torch.bfloat16, torch.bfloat16))


def launch_pair(s: bf.InputSet, fp8: bool) -> None:
    """One launch of ours, then one of the Triton peer, on input set s (both write s.out)."""
    torch.cuda.synchronize()
    if fp8:
        mf.finalize(s.input, s.row_map, s.weights, input_scales=s.scales, out=s.out)
        triton_peer.finalize_fp8(s.input, s.scales, s.row_map, s.weights, out=s.out)
    else:
        mf.finalize(s.input, s.row_map, s.weights, out=s.out)
        triton_peer.finalize(s.input, s.row_map, s.weights, out=s.out)
    torch.cuda.synchronize()


def parse(spec: str) -> tuple[bool, bf.Shape]:
    fp8 = spec.startswith("fp8:")
    model, t = spec.removeprefix("fp8:").rsplit(":", 1)
    k, h = (bf.SWEEP_K, bf.SWEEP_H) if model == bf.SWEEP else bf.MODELS[model]
    return fp8, bf.Shape(model, int(t), k, h)


# ncu details-page metric -> column
TABLE_COLUMNS = {
    "Duration": "µs", "DRAM Throughput": "DRAM %", "Achieved Occupancy": "occupancy %",
    "Registers Per Thread": "registers", "Grid Size": "blocks", "Block Size": "threads",
    "Waves Per SM": "waves", "dram__bytes_read.sum": "DRAM MB read",
    "lts__t_sector_hit_rate.pct": "L2 hit %",
}


def print_table(csv_path: str, specs: list[str]) -> None:
    """Markdown rows, two launches per shape (ours, then the peer), in launch order."""
    with open(csv_path) as f:
        lines = [line for line in f if line.startswith('"')]  # drop ==PROF== lines
    launches: dict[int, dict[str, float]] = {}
    for r in csv.DictReader(io.StringIO("".join(lines))):
        if r["Metric Name"] in TABLE_COLUMNS:
            value = float(r["Metric Value"].replace(",", ""))
            if r["Metric Unit"] in ("nsecond", "ns"):
                value /= 1e3
            elif r["Metric Unit"] == "byte":
                value /= 1e6
            launches.setdefault(int(r["ID"]), {})[TABLE_COLUMNS[r["Metric Name"]]] = value
    rows = [launches[i] for i in sorted(launches)]
    if len(rows) != 2 * len(specs):
        raise SystemExit(f"{len(rows)} launches in {csv_path}, expected {2 * len(specs)}")
    cols = list(TABLE_COLUMNS.values())
    print("| shape | kernel | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for i, row in enumerate(rows):
        cells = [f"{row.get(c, float('nan')):.{0 if c in ('registers', 'blocks', 'threads') else 2}f}"
                 for c in cols]
        print(f"| {specs[i // 2]} | {('ours', 'triton')[i % 2]} | " + " | ".join(cells) + " |")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--table"]:
        print_table(argv[1], argv[2:])
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    for spec in argv or ["sweep:512"]:
        fp8, shape = parse(spec)
        s = variant(fp8).make_set(shape, torch.device("cuda"), gen)
        print(f"== {spec}: ours, then triton", flush=True)
        launch_pair(s, fp8)
        del s


if __name__ == "__main__":
    main(sys.argv[1:])
