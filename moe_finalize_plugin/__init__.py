"""moe_finalize_plugin: the MoE finalize step (gather K expert rows per token, weight, sum in fp32)
as PyTorch custom ops with CPU and CUDA kernels. See README.md for the op contract."""

from . import reference
from .ops import build_info, finalize, finalize_fp8, set_pdl, validate_row_map

__all__ = ["finalize", "finalize_fp8", "reference", "validate_row_map", "set_pdl", "build_info"]
__version__ = "0.1.0"
