// fastclip's CPU value clipping: every element of every gradient clamped in place to
// [-clip_value, clip_value], in one pass over a table of all gradients (every float dtype together),
// with torch's clip_grad_value_ results. Torch-free, like clip_kernels.h.
#pragma once

#include <cstdint>

#include "clip_kernels.h"

namespace fastclip::cpu {

// Clamps as torch's clip_grad_value_ does: clamp_min(-clip_value), then clamp_max(clip_value), each
// bound converted to the dtype as ATen converts a Scalar (double to float, then to a 16-bit dtype;
// double as it is for fp64), NaN kept. One pass: every vector of elements is read once and written
// back only if one of them lies outside the interval (a NaN does not).
void clamp_values(const TensorView* tensors, int64_t count, double clip_value, const ParallelFor& parallel_for);

}  // namespace fastclip::cpu
