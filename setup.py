"""Build of moe_finalize_plugin._C against the LibTorch stable ABI (one abi3 binary for torch 2.11+).

CUDA sources are compiled whenever nvcc and a CUDA build of torch are present; a CPU-only
torch builds the CPU kernels alone. TORCH_CUDA_ARCH_LIST is honoured (default below).
"""

import os
import shutil
import subprocess

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from nvcc's folder; a wrapper script in /usr/local/bin misleads it.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/lib64"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

# torch 2.11 is the oldest torch the binary must load on: the stable ABI freezes at this target.
STABLE_ABI_FLAGS = [
    "-DTORCH_STABLE_ONLY",
    "-DTORCH_TARGET_VERSION=0x020B000000000000",
    "-DPy_LIMITED_API=0x030A0000",
]
DEFAULT_CUDA_ARCHS = "8.0;9.0a;10.0a"


def want_cuda() -> bool:
    if os.environ.get("MOE_FINALIZE_FORCE_CPU", "0") == "1":
        return False
    import torch

    return torch.version.cuda is not None and (
        cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    )


def source_rev_flags() -> list[str]:
    """The commit being built, for build_info(): hex digits and a dirty bit, no string quoting
    through the build files. 0 where git cannot tell."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                                  capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    rev = git("rev-parse", "--short=7", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return [f"-DMOE_FINALIZE_SOURCE_REV=0x{rev if rev else '0'}",
            f"-DMOE_FINALIZE_SOURCE_DIRTY={1 if dirty else 0}"]


def extension():
    # The source revision goes to the C++ files only, so a new commit recompiles no CUDA file.
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off", *STABLE_ABI_FLAGS, *source_rev_flags()]
    sources = ["csrc/torch_bindings.cpp", "csrc/checks.cpp", "csrc/finalize_cpu.cpp"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "moe_finalize_plugin._C", sources, extra_compile_args={"cxx": cxx_flags},
            py_limited_api=True,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "-DUSE_CUDA",
                  *STABLE_ABI_FLAGS]
    return cpp_extension.CUDAExtension(
        "moe_finalize_plugin._C",
        sources + ["csrc/finalize_cuda.cu", "csrc/finalize_ext_cuda.cu",
                   "csrc/finalize_backward_cuda.cu"],
        extra_compile_args={"cxx": cxx_flags + ["-DUSE_CUDA"], "nvcc": nvcc_flags},
        py_limited_api=True,
    )


setup(
    name="moe_finalize_plugin",
    version="0.1.0",
    description="Fast, batch-invariant MoE finalize (gather + weight + sum) ops for PyTorch and vLLM",
    packages=find_packages(include=["moe_finalize_plugin", "moe_finalize_plugin.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"test": ["pytest", "numpy"], "bench": ["matplotlib", "tqdm"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    entry_points={
        "console_scripts": ["moe-finalize=moe_finalize_plugin.__main__:main"],
        "vllm.general_plugins": ["moe_finalize = moe_finalize_plugin.vllm_plugin:register"],
    },
)
