// fastclip's CPU adaptive gradient clipping (AGC; Brock et al. 2021), unit-wise as timm defines it:
// one fused pass over every parameter and gradient, writing only the units that clip. Torch-free,
// like clip_kernels.h.
#pragma once

#include <cstdint>

#include "clip_kernels.h"

namespace fastclip::cpu {

// A parameter and its gradient, both `units` x `unit_size` contiguous elements of `dtype`: a unit is
// one index of dimension 0 (all dimensions after it), or the whole tensor for 0-d and 1-d ones.
struct AgcTensor {
  const void* param;
  void* grad;
  int64_t units;
  int64_t unit_size;
  DType dtype;
};

// For every unit, with its parameter norm P and gradient norm G (L2, each as torch's norm of the
// unit, in the dtype): limit = dtype(max(P, eps) * clip_factor); if not G < limit, the gradient is
// multiplied by dtype(limit / max(G, 1e-6)). Each step rounds as timm's adaptive_clip_grad does in
// torch (the Scalars converted to the dtype, or to its arithmetic type for the product); a NaN
// norm makes the unit NaN, as there. Units are spread over the thread pool; a unit's gradient is
// scaled right after its norms are known, while it is still in cache.
void adaptive_clip(const AgcTensor* tensors, int64_t count, double clip_factor, double eps,
                   const ParallelFor& parallel_for);

}  // namespace fastclip::cpu
