// fastclip's CUDA value clipping: every element of every gradient clamped in place to
// [-clip_value, clip_value] in one launch over the same device table as the norm kernels
// (clip_kernels.h), with torch's clip_grad_value_ results. Torch-free, like clip_kernels.h.
#pragma once

#include <cuda_runtime_api.h>

#include "clip_kernels.h"

namespace fastclip::cuda {

// Launches the clamp on `stream` of the current device: one block per chunk; clamp_min(-clip_value)
// then clamp_max(clip_value), NaN kept, with the arithmetic of the route torch's foreach clamp takes
// for each dtype (see value_clip_kernels.cu): bit d of per_tensor_route_dtypes (d a DType's value) is
// set when some gradient of that dtype is not dense, which sends torch down its per-tensor route.
// An element the clamp leaves bit for bit as it was is read, never written.
cudaError_t launch_clamp(const void* table, const TableLayout& layout, double clip_value,
                         unsigned per_tensor_route_dtypes, cudaStream_t stream);

}  // namespace fastclip::cuda
