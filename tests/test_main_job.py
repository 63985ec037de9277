"""The `moe-finalize` main job and the small run-time switches of the public API."""

import re
import subprocess
import sys

import moe_finalize_plugin as mf


def test_main_job_checks_every_device_and_benchmarks():
    result = subprocess.run(
        [sys.executable, "-m", "moe_finalize_plugin", "--repeats", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check vs reference: OK" in result.stdout
    assert "kernels=cpu" in result.stdout
    assert "speed-up" in result.stdout  # the benchmark table was printed


def test_build_info_names_the_kernels_and_source():
    info = mf.build_info()
    assert "cpu" in info["kernels"]
    assert "stable ABI" in info["abi"]
    assert re.fullmatch(r"[0-9a-f]{7,}(-dirty)?|unknown", info["source_rev"]), info["source_rev"]


def test_set_pdl_toggles_and_reports_previous():
    if "cuda" not in mf.build_info()["kernels"]:
        assert mf.set_pdl(True) is False  # no CUDA kernels: nothing to switch
        return
    original = mf.set_pdl(False)
    try:
        assert mf.set_pdl(True) is False
        assert mf.set_pdl(True) is True
    finally:
        mf.set_pdl(original)
