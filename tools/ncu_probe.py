"""A few finalize launches for Nsight Compute (K=8, H=4096, bf16, fresh data per shape):
    ncu --section SpeedOfLight --section Occupancy --section LaunchStats \
        -k regex:finalize_kernel python tools/ncu_probe.py 1 16 128 1024"""

import sys

import torch

import moe_finalize_plugin as mf

for num_tokens in [int(a) for a in sys.argv[1:]] or [1, 16, 128]:
    slots = num_tokens * 8
    input = torch.randn(slots, 4096, device="cuda").to(torch.bfloat16)
    row_map = torch.randperm(slots, device="cuda").to(torch.int32).view(num_tokens, 8)
    weights = torch.rand(num_tokens, 8, device="cuda")
    out = torch.empty(num_tokens, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    mf.finalize(input, row_map, weights, out=out)
    torch.cuda.synchronize()
