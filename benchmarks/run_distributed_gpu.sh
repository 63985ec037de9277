#!/usr/bin/env bash
# Issue 6 on a host with >= 2 GPUs, in one go (< 5 min): the distributed tests (gloo on CPU
# with 2 and 4 ranks, NCCL with 2 GPUs incl. the symmetric-memory fused path), then the
# 2-GPU benchmark. NVLink multicast / NVLS stay off in every process started here.
# Results go to "$OUT/benchmarks/results" when OUT is set, else benchmarks/results; the
# benchmark table is printed last.
#
#   bash benchmarks/run_distributed_gpu.sh            # PYTHON=... to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:+$OUT/benchmarks/results}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"

nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader || true
nvidia-smi topo -m > "$RESULTS/distributed_topology.log" 2>&1 || true

timeout 130 "$PYTHON" -m pytest tests/test_distributed.py -q -p no:cacheprovider -rf \
  > "$RESULTS/distributed_tests.log" 2>&1
tests_rc=$?
tail -n 25 "$RESULTS/distributed_tests.log"

timeout 160 "$PYTHON" benchmarks/bench_distributed.py --out-dir "$RESULTS" \
  > "$RESULTS/distributed_bench.log" 2>&1
bench_rc=$?
if [[ $bench_rc -ne 0 ]]; then grep -v '^done H=' "$RESULTS/distributed_bench.log" | tail -n 40; fi

echo "tests rc=$tests_rc (124 = timed out), bench rc=$bench_rc (1 = a correctness check failed, 124 = timed out)"
# The table, last (also in $RESULTS/distributed_<card>.txt).
table=$(ls -t "$RESULTS"/distributed_*.txt 2>/dev/null | head -n 1)
if [[ -n "$table" ]]; then cat "$table"; else echo "no benchmark table was written"; fi
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
