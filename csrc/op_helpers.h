// Helpers shared by the torch bindings of the CPU (fastclip_ops.cpp) and CUDA
// (fastclip_cuda_ops.cpp) kernels: translating torch's types into the kernels' and the checks that
// every implementation makes alike.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "common/clip_types.h"

namespace fastclip {

inline DType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastclip: gradients of dtype ", type, " have no fused kernel (float32, float16, bfloat16, float64 only)");
  }
}

inline Norm kernel_norm(double p) {
  if (p == 2.0) return {NormKind::kL2, p};
  if (p == 1.0) return {NormKind::kL1, p};
  if (std::isinf(p) && p > 0) return {NormKind::kInf, p};
  TORCH_CHECK(p > 0 && std::isfinite(p), "fastclip: norm_type ", p, " has no fused kernel (only p > 0 and inf)");
  return {NormKind::kP, p};
}

// torch.stack of the per-tensor norms promotes their dtypes: that is the total norm's dtype.
inline at::ScalarType total_norm_type(at::TensorList tensors) {
  at::ScalarType type = tensors[0].scalar_type();
  for (const at::Tensor& t : tensors) type = at::promote_types(type, t.scalar_type());
  return type;
}

// torch's _foreach_norm refuses the inf norm of an empty tensor; so does fastclip, with its message.
inline void check_inf_norm_of_empty(at::TensorList tensors, Norm norm) {
  if (norm.kind != NormKind::kInf) return;
  for (const at::Tensor& t : tensors)
    TORCH_CHECK(t.numel() > 0,
                "_foreach_norm cannot compute the infinity norm on an empty tensor because the operation does not "
                "have an identity");
}

}  // namespace fastclip
