// fastclip's CUDA value clipping: every element of every gradient clamped in place to
// [-clip_value, clip_value] in one launch over the same device table as the norm kernels
// (clip_kernels.h), with torch's clip_grad_value_ results. Torch-free, like clip_kernels.h.
#pragma once

#include <cuda_runtime_api.h>

#include "clip_kernels.h"

namespace fastclip::cuda {

// Launches the clamp on `stream` of the current device: one block per chunk; clamp_min(-clip_value)
// then clamp_max(clip_value), each bound converted to the gradient's dtype through float as c10
// converts a double, NaN kept. An element inside the interval is read, never written.
cudaError_t launch_clamp(const void* table, const TableLayout& layout, double clip_value, cudaStream_t stream);

}  // namespace fastclip::cuda
