# One device call for kernel experiments (STEPS="tests ncu variants", default variants):
#   tests    pytest $TESTS (default tests/test_fp8_bias.py) on the carried main build
#   ncu      Inductor's generated code, then tools/gpu_check.sh ncu (ours / Triton / Inductor)
#   variants tools/variants.sh over $VARIANTS on the key shapes, all JSON merged into
#            $OUT/variants.json (few files come back from the device)
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
  ARGS="$(printf -- '--shape %s ' $SHAPES) ${FP8_ROWS---fp8} --impls ^(triton|triton_fp8|ours_pdl|ours_fp8|ours_fp8_out)$ --graph-windows 3"
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
