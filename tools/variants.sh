#!/usr/bin/env bash
# Benchmarks several prebuilt variants of _C.abi3.so (.carry/<name>.so), each in its own
# process against the same Triton peer: bash tools/variants.sh "<bench args>" name...
set -uo pipefail
args=$1; shift
for name in "$@"; do
  dir=/tmp/variant_$name; rm -rf "$dir"; mkdir -p "$dir"
  cp -r "${PKG:-moe_finalize_plugin}" "$dir/"; cp ".carry/$name.so" "$dir/moe_finalize_plugin/_C.abi3.so"
  echo "=== variant $name"
  PYTHONPATH=$dir python3 benchmarks/bench_finalize.py --skip-compile --skip-host --no-plot \
    --out-dir "${OUT:-/tmp}/variant_$name" $args 2>&1 | tail -${TAIL:-14}
done
