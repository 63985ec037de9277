export PYTHONPATH=$PWD
timeout 100 python3 -m pytest tests/test_fp8_bias.py -q -p no:cacheprovider -k "codes_are or fp8_out" 2>&1 | tail -2
bash tools/gpu_check.sh sanitize 2>&1 | grep -v "^$" | tail -6
