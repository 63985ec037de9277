"""One call per row-map layout for Nsight Compute: ours and the plain Triton peer on the same
inputs whose permuted buffer is laid out grouped by expert, as a random permutation, or
token-contiguous (bench_finalize.make_row_map), bf16 or FP8 input.
    ncu --section SpeedOfLight --metrics dram__bytes_read.sum,dram__bytes_write.sum \
        -k regex:'finalize|triton_' python tools/map_probe.py 16384,8,4096 fp8:16384,2,4096"""

import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_finalize as bf  # noqa: E402
import triton_peer  # noqa: E402

import moe_finalize_plugin as mf  # noqa: E402

gen = torch.Generator(device="cuda").manual_seed(0)
for spec in sys.argv[1:] or ["16384,8,4096"]:
    fp8 = spec.startswith("fp8:")
    T, K, H = (int(v) for v in spec.removeprefix("fp8:").split(","))
    variant = (bf.Variant("fp8", torch.float8_e4m3fn, torch.bfloat16, fp8=True) if fp8
               else bf.Variant("bf16", torch.bfloat16, torch.bfloat16))
    for kind in bf.ROW_MAPS:
        variant.row_map = kind
        s = variant.make_set(bf.Shape(bf.CUSTOM, T, K, H), torch.device("cuda"), gen)
        torch.cuda.synchronize()
        print(f"== {'fp8' if fp8 else 'bf16'} T={T} K={K} H={H} map={kind}", flush=True)
        if fp8:
            mf.finalize(s.input, s.row_map, s.weights, input_scales=s.scales, out=s.out)
            triton_peer.finalize_fp8(s.input, s.scales, s.row_map, s.weights, out=s.out)
        else:
            mf.finalize(s.input, s.row_map, s.weights, out=s.out)
            triton_peer.finalize(s.input, s.row_map, s.weights, out=s.out)
        torch.cuda.synchronize()
        del s
