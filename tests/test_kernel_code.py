"""The machine code of the built CUDA kernels (no GPU needed): each vector store of a row is one
128-bit instruction.

nvcc 13 once compiled the first of the FP8 kernels' two warp-row stores (FP8 input, 16-bit
output: lanes exchange halves by shuffles, then each store instruction writes 512 contiguous
bytes) as 8 + 4 + 4-byte stores in all 44 such kernels. Each part wrote into every sector of
the warp's span: 1.31x the output's L2 write sectors and 0.7 us at FP8 Mixtral T=16384 on H100
(benchmarks/HISTORY.md "Session 9"). The store is now one st.global.v4 by hand; this test keeps
it, and the bf16 kernel's plain 16-byte stores, whole in every architecture the build holds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import moe_finalize_plugin as mf
from moe_finalize_plugin import _C

# Kernels whose row stores are 16-byte vectors, by mangled-name fragment -> the one narrower
# store each may hold (its scalar tail column).
#   finalize_kernel<bf16 / fp16, VEC=8, ...>: store_output, one 16-byte chunk per lane;
#   finalize_ext_kernel<e4m3, bf16 / fp16, VEC=16, ...>: store_warp_rows, two st.global.v4,
#     and per-lane store_output where a warp is partly past the row;
#   finalize_ext_kernel<e4m3, float, VEC=8, ...> (FP8 decode, fp32 out): the same with 32-byte
#     fp32 lanes.
WHOLE_STORE_KERNELS = {
    r"finalize_kernelI13__nv_bfloat16Li8E": "STG.E.U16",
    r"finalize_kernelI6__halfLi8E": "STG.E.U16",
    r"finalize_ext_kernelI13__nv_fp8_e4m313__nv_bfloat16Li16E": "STG.E.U16",
    r"finalize_ext_kernelI13__nv_fp8_e4m36__halfLi16E": "STG.E.U16",
    r"finalize_ext_kernelI13__nv_fp8_e4m3fLi8E": "STG.E",
}


def cuobjdump() -> str | None:
    """cuobjdump from PATH, else the copy Triton (a torch dependency on Linux) ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def kernel_stores(sass: str) -> dict[tuple[str, str], Counter]:
    """(architecture, mangled kernel name) -> its global store instructions by opcode."""
    stores: dict[tuple[str, str], Counter] = {}
    arch, name = "", None
    for line in sass.splitlines():
        if m := re.search(r"code for (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.search(r"Function : (\S+)", line):
            name = m.group(1)
            stores[(arch, name)] = Counter()
        elif name and (m := re.search(r"\b(STG\.[\w.]+)", line)):
            stores[(arch, name)][m.group(1)] += 1
    return stores


def test_row_stores_are_single_128_bit_instructions():
    if "cuda" not in mf.build_info()["kernels"]:
        pytest.skip("the build holds no CUDA kernels")
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (PATH or Triton's bundled copy)")
    sass = subprocess.run([tool, "-sass", _C.__file__], check=True, capture_output=True,
                          text=True).stdout
    stores = kernel_stores(sass)
    checked, bad = Counter(), []
    for (arch, name), opcodes in stores.items():
        for fragment, tail in WHOLE_STORE_KERNELS.items():
            if fragment not in name:
                continue
            checked[fragment] += 1
            narrow = {op: n for op, n in opcodes.items() if op != "STG.E.128"}
            if opcodes["STG.E.128"] == 0 or narrow != {tail: 1}:
                bad.append(f"{arch} {name}: {dict(opcodes)}")
    assert set(checked) == set(WHOLE_STORE_KERNELS), f"kernels not found: {checked}"
    assert not bad, "row stores split into narrower instructions:\n  " + "\n  ".join(bad)
