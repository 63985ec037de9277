"""One call per row-map layout for Nsight Compute: ours and the plain Triton peer on the same
inputs whose permuted buffer is laid out grouped by expert, as a random permutation, or
token-contiguous (bench_finalize.make_row_map), bf16 or FP8 input.
    ncu --section SpeedOfLight --metrics dram__bytes_read.sum,dram__bytes_write.sum \
        -k regex:'finalize|triton_' python tools/map_probe.py 16384,8,4096 fp8:16384,2,4096"""

import sys

import torch

from miss_probe import bf, launch_pair, variant  # tools/ is this script's directory

gen = torch.Generator(device="cuda").manual_seed(0)
for spec in sys.argv[1:] or ["16384,8,4096"]:
    fp8 = spec.startswith("fp8:")
    T, K, H = (int(v) for v in spec.removeprefix("fp8:").split(","))
    inputs = variant(fp8)
    for kind in bf.ROW_MAPS:
        inputs.row_map = kind
        s = inputs.make_set(bf.Shape(bf.CUSTOM, T, K, H), torch.device("cuda"), gen)
        print(f"== {'fp8' if fp8 else 'bf16'} T={T} K={K} H={H} map={kind}", flush=True)
        launch_pair(s, fp8)
        del s
