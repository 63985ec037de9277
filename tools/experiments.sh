# One device call for kernel experiments (STEPS="tests ncu variants", default variants):
#   tests    pytest $TESTS (default tests/test_fp8_bias.py) on the carried main build
#   ncu      Inductor's generated code, then tools/gpu_check.sh ncu (ours / Triton / Inductor)
#   variants tools/variants.sh over $VARIANTS on $SHAPES (T,K,H) for the implementations $IMPLS
#            (a regex), all JSON merged into $OUT/variants.json (few files come back from the
#            device; tools/variant_table.py prints it)
#   backward benchmarks/bench_backward.py for each of $VARIANTS (BW_ARGS: its arguments), then
#            Nsight Compute of the carried build's grad_input kernels at K=8 T=16384 (BW_NCU=0
#            skips it)
#   kernels  the CUDA kernels one eager call launches (torch.profiler), bf16 and FP8 at T=1
# Variants are prebuilt here (e.g. NVCC_APPEND_FLAGS="-D..." or another source state, each
# build's _C.abi3.so copied to .carry/<name>.so) and packed: tar czf carry_variants.tar.gz -C .carry .
# (the tarball is git-ignored but must be carried: carry=["carry_variants.tar.gz",
# "moe_finalize_plugin/_C.abi3.so"]).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p .carry && { [[ ! -f carry_variants.tar.gz ]] || tar xzf carry_variants.tar.gz -C .carry; }
nvidia-smi --query-gpu=name --format=csv,noheader
has() { [[ " ${STEPS:-variants} " == *" $1 "* ]]; }
if has tests; then
  python3 -m pytest ${TESTS:-tests/test_fp8_bias.py} -q -x -p no:cacheprovider 2>&1 | tail -5
fi
if has ncu; then
  TORCH_LOGS=output_code python3 tools/peer_probe.py ${NCU_SHAPES:-256,8,4096 1024,2,4096 16384,8,4096} > $OUT/inductor_code.log 2>&1; echo "inductor dump rc=$?"
  NCU_SHAPES=${NCU_SHAPES:-256,8,4096 1024,2,4096 16384,8,4096} bash tools/gpu_check.sh ncu
fi
if has variants; then
  SHAPES=${SHAPES:-1,8,4096 128,8,4096 256,8,4096 512,8,4096 1024,8,4096 4096,8,4096 16384,8,4096 1024,2,4096 16384,2,4096}
  ARGS="$(printf -- '--shape %s ' $SHAPES) ${FP8_ROWS---fp8} --impls ${IMPLS:-^(triton|triton_fp8|ours_pdl|ours_fp8|ours_fp8_out)$} --graph-windows 3"
  OUT=$OUT/v TAIL=40 timeout ${VTIMEOUT:-300} bash tools/variants.sh "$ARGS" ${VARIANTS:-ref} > $OUT/variants.log 2>&1
  echo "variants rc=$?"
  python3 - <<'PY'
import json, glob, os
out = os.environ["OUT"]
allr = {f.split("/")[-2]: json.load(open(f)) for f in glob.glob(f"{out}/v/variant_*/*.json")}
json.dump(allr, open(f"{out}/variants.json", "w"))
PY
  rm -rf $OUT/v
fi
if has backward; then
  for name in ${VARIANTS:-ref}; do
    dir=/tmp/variant_$name; rm -rf "$dir"; mkdir -p "$dir"
    cp -r moe_finalize_plugin "$dir/"; cp ".carry/$name.so" "$dir/moe_finalize_plugin/_C.abi3.so"
    echo "=== backward variant $name"
    PYTHONPATH=$dir python3 benchmarks/bench_backward.py --out-dir "$OUT/bw_$name" ${BW_ARGS:-} 2>&1 | tail -${BW_TAIL:-40}
  done
  if [[ ${BW_NCU:-1} == 1 ]]; then
    timeout 120 ncu --section SpeedOfLight --section Occupancy --section LaunchStats -k regex:'grad_input|count_row|fill|elementwise' \
      python3 - > "$OUT/ncu_backward.txt" 2>&1 <<'PY'
import torch, moe_finalize_plugin  # noqa: F401  (registers the ops)
T, K, H = 16384, 8, 4096
g = torch.randn(T, H, device="cuda").bfloat16()
x = torch.randn(T * K, H, device="cuda").bfloat16()
m = torch.randperm(T * K, device="cuda").int().view(T, K)
w = torch.rand(T, K, device="cuda")
torch.ops.moe_finalize.finalize_grad_input(g, x, m, w, top_k=None, scale=1.0)
x.fill_(0.5)
torch.cuda.synchronize()
PY
    echo "ncu backward rc=$?"
    grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Registers Per|Achieved Occupancy" "$OUT/ncu_backward.txt" | cut -c1-140
  fi
fi
if has kernels; then
  python3 - <<'PY'
import torch, moe_finalize_plugin as mf
from torch.profiler import profile, ProfilerActivity
T, K, H, P = 1, 8, 4096, 8
m = torch.randperm(P, device="cuda").int().view(T, K)
w = torch.rand(T, K, device="cuda")
out = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
xb = torch.randn(P, H, device="cuda").bfloat16()
x8 = torch.randn(P, H, device="cuda").to(torch.float8_e4m3fn)
sc = torch.rand(P, H // 128, device="cuda") + 0.01
calls = {"bf16": lambda: mf.finalize(xb, m, w, out=out),
         "fp8": lambda: mf.finalize(x8, m, w, input_scales=sc, out=out)}
for name, call in calls.items():
    call(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(name, len(kernels), "kernel events for 5 calls:", sorted({e.name[:90] for e in kernels}))
PY
fi
