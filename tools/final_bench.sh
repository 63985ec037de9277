# One device call: the full kernel benchmark, then Nsight Compute on ours vs the peers.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 330 python3 benchmarks/bench_finalize.py --out-dir "$OUT" --fp8 --compile-budget-s 100 \
  --graph-windows 3 > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
SECT="--section SpeedOfLight --section Occupancy --section LaunchStats --metrics dram__bytes_read.sum,dram__bytes_write.sum"
timeout 120 ncu $SECT -k regex:'finalize|triton_' python3 tools/peer_probe.py 256,8,4096 16384,8,4096 \
  > "$OUT/ncu_peers_h100.txt" 2>&1; echo "ncu peers rc=$?"
timeout 60 ncu $SECT -k regex:'finalize' python3 tools/ncu_probe.py 1 > "$OUT/ncu_t1_bf16.txt" 2>&1
timeout 60 ncu $SECT -k regex:'finalize' python3 tools/fp8_probe.py 1 16384 > "$OUT/ncu_fp8.txt" 2>&1; echo "ncu t1/fp8 rc=$?"
for f in ncu_peers_h100 ncu_t1_bf16 ncu_fp8; do
  echo "== $f"; grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Registers Per|Achieved Occupancy" "$OUT/$f.txt" | sed -E 's/\(moe_finalize::FinalizeProblem, moe_finalize::RowSplit\)//; s/, Context 1, Stream 7, Device 0, CC 9.0//' | cut -c1-150
done
tail -60 "$OUT/bench.log"
