#!/usr/bin/env bash
# One device call: GPU tests, compute-sanitizer on hostile maps, the kernel benchmark, Nsight
# Compute of ours vs the peers. Runs from the repo root on the lent GPU machine with the carried
# prebuilt _C.abi3.so.
# Usage: bash tools/gpu_check.sh [tests|sanitize|bench|ncu|all]...   (results under $OUT;
# SANITIZE_TOOLS="memcheck" runs one compute-sanitizer tool)
# The committed H100 run: BENCH_ARGS="--fp8 --compile-budget-s 100 --graph-windows 3" \
#   bash tools/gpu_check.sh bench ncu
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-all}
status=0
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
if has tests; then
  # The vLLM plugin tests need vLLM, which the GPU machine lacks (CI runs them).
  ignore=$(python3 -c "import vllm" 2>/dev/null || echo --ignore=tests/test_vllm_plugin.py)
  python3 -m pytest tests -q -p no:cacheprovider $ignore --junitxml="$OUT/gpu_junit.xml" \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || status=1
fi
if has sanitize; then
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 1 \
      python3 tools/hostile_maps.py > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?; echo "compute-sanitizer $tool rc=$rc: $(tail -2 "$OUT/sanitizer_$tool.log" | tr '\n' ' ')"
    [[ $rc == 0 ]] || status=1
    # FP8 input / bias / FP8 output kernels (issue 7)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 1 \
      python3 tools/hostile_fp8_bias.py > "$OUT/sanitizer_fp8_bias_$tool.log" 2>&1
    rc=$?; echo "compute-sanitizer $tool fp8/bias rc=$rc: $(tail -2 "$OUT/sanitizer_fp8_bias_$tool.log" | tr '\n' ' ')"
    [[ $rc == 0 ]] || status=1
  done
fi
if has bench && [[ -f benchmarks/bench_finalize.py ]]; then
  python3 benchmarks/bench_finalize.py --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -45
fi
if has ncu; then
  # Ours / Triton / Inductor at NCU_SHAPES (tools/peer_probe.py), bf16 at T=1, FP8 at T=1 and 16384.
  sect="--section SpeedOfLight --section Occupancy --section LaunchStats --metrics dram__bytes_read.sum,dram__bytes_write.sum"
  timeout 150 ncu $sect -k regex:'finalize|triton_' python3 tools/peer_probe.py \
    ${NCU_SHAPES:-256,8,4096 16384,8,4096} > "$OUT/ncu_peers.txt" 2>&1 || status=1
  timeout 60 ncu $sect -k regex:finalize python3 tools/ncu_probe.py 1 > "$OUT/ncu_t1_bf16.txt" 2>&1 || status=1
  timeout 60 ncu $sect -k regex:finalize python3 tools/fp8_probe.py 1 16384 > "$OUT/ncu_fp8.txt" 2>&1 || status=1
  for f in ncu_peers ncu_t1_bf16 ncu_fp8; do
    echo "== $f"
    grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Registers Per|Achieved Occupancy" "$OUT/$f.txt" |
      sed -E 's/\(moe_finalize::FinalizeProblem, moe_finalize::RowSplit\)//; s/, Context 1, Stream [0-9]+, Device 0, CC [0-9.]+//' | cut -c1-150
  done
fi
exit $status
