// Kernel entry points behind the ops: each takes an already-validated FinalizeProblem.
#pragma once

#include "checks.h"

namespace moe_finalize {

// Raises on a map entry >= P before writing anything, then fills problem.out.
void launch_finalize_cpu(const FinalizeProblem& problem);
// finalize_fp8_out: e4m3 rows into problem.out, one scale per 128 columns into out_scales.
void launch_finalize_fp8_out_cpu(const FinalizeProblem& problem);

#ifdef USE_CUDA
// Enqueues on the current CUDA stream of the input's device; never synchronizes with the host.
// Map entries outside [0, P) are skipped in-kernel.
void launch_finalize_cuda(const FinalizeProblem& problem, int device_index);
// FP8 input and/or per-expert bias (finalize_ext_cuda.cu); expert ids outside [0, E) add no bias.
void launch_finalize_ext_cuda(const FinalizeProblem& problem, int device_index);
void launch_finalize_fp8_out_cuda(const FinalizeProblem& problem, int device_index);

// Backward (problem.residual holds grad_out). grad_input into problem.out; where
// grad_input_counts_slots, `count` (P int32, any contents) is its scratch, else it may be null.
// grad_weights as fp32 [T, K] contiguous.
bool grad_input_counts_slots(const FinalizeProblem& problem);
void launch_grad_input_cuda(const FinalizeProblem& problem, int32_t* count, int device_index);
void launch_grad_weights_cuda(const FinalizeProblem& problem, float* grad_weights,
                              int device_index);
#endif

}  // namespace moe_finalize
