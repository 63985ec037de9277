#!/usr/bin/env bash
# Sets up .venv (torch 2.14.0 + CUDA 13.0 wheels, vLLM 0.33.0 for `test`), builds the extension
# in place, then runs the main job (`run`) or the test suite (`test`). Safe to rerun.
#   bash quickstart.sh run     # build report + check vs reference + small benchmark
#   bash quickstart.sh test    # the full pytest suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-run}; shift || true
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
# vLLM 0.33.0 pins torch==2.14.0: build and test against that one torch.
pip install -q --disable-pip-version-check "torch==2.14.0" ninja setuptools wheel numpy pytest
if [[ $mode == test ]]; then
  pip install -q --disable-pip-version-check "vllm==0.33.0" "torch==2.14.0" matplotlib
fi
# Editable install: registers the entry points (moe-finalize, vllm.general_plugins) and builds
# moe_finalize_plugin/_C.abi3.so in place. CUDA kernels compile whenever nvcc is present.
MAX_JOBS=${MAX_JOBS:-2} pip install -q --disable-pip-version-check --no-build-isolation -e .

case $mode in
  run) exec "$VENV/bin/moe-finalize" "$@" ;;
  test) exec "$VENV/bin/python" -m pytest tests -q -rs "$@" ;;
  *) echo "usage: bash quickstart.sh run|test [args]" >&2; exit 2 ;;
esac
