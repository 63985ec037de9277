"""One call per implementation and shape for Nsight Compute: ours, the plain Triton peer and
torch.compile of the reference (Inductor), bf16, fresh random data per shape.
    ncu --section SpeedOfLight --section Occupancy --section LaunchStats \
        -k regex:'finalize|triton_' python tools/peer_probe.py 256,8,4096 16384,8,4096
With TORCH_LOGS=output_code it also prints the Triton code Inductor generated per shape."""

import sys

import torch

sys.path.insert(0, "benchmarks")
import triton_peer  # noqa: E402

import moe_finalize_plugin as mf  # noqa: E402
from moe_finalize_plugin import reference  # noqa: E402

for spec in sys.argv[1:] or ["256,8,4096"]:
    num_tokens, top_k, hidden = (int(v) for v in spec.split(","))
    slots = num_tokens * top_k
    input = torch.randn(slots, hidden, device="cuda").to(torch.bfloat16)
    row_map = torch.randperm(slots, device="cuda").to(torch.int32).view(num_tokens, top_k)
    weights = torch.rand(num_tokens, top_k, device="cuda")
    out = torch.empty(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(reference.finalize, dynamic=False)
    compiled(input, row_map, weights)  # compile outside the profiled calls' order
    torch.cuda.synchronize()
    print(f"== T={num_tokens} K={top_k} H={hidden}", flush=True)
    mf.finalize(input, row_map, weights, out=out)
    triton_peer.finalize(input, row_map, weights, out=out)
    compiled(input, row_map, weights)
    torch.cuda.synchronize()
