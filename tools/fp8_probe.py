"""One call each of the FP8-input kernel (bf16 out), and with --all also the FP8-output and the
bf16-input kernels, on the same random map, for Nsight Compute:
    ncu -k regex:finalize python3 tools/fp8_probe.py [--all] T[,K[,H]]..."""
import sys

import torch

import moe_finalize_plugin as mf

every = "--all" in sys.argv
for spec in (a for a in sys.argv[1:] if a != "--all"):
    T, K, H = ([int(v) for v in spec.split(",")] + [8, 4096][spec.count(","):])[:3]
    P = T * K
    x = torch.randn(P, H, device="cuda")
    x8 = x.to(torch.float8_e4m3fn)
    sc = torch.rand(P, -(-H // 128), device="cuda") + 0.01
    m = torch.randperm(P, device="cuda").int().view(T, K)
    w = torch.rand(T, K, device="cuda")
    out = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    mf.finalize(x8, m, w, input_scales=sc, out=out)
    if every:
        mf.finalize_fp8(x8, m, w, input_scales=sc)
        mf.finalize(x.bfloat16(), m, w, out=out)
    torch.cuda.synchronize()
