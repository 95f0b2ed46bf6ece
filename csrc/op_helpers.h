// Helpers shared by the torch bindings of the CPU (fastclip_ops.cpp) and CUDA
// (fastclip_cuda_ops.cpp) kernels: translating torch's types into the kernels' and the checks that
// every implementation makes alike.
#pragma once

#include <ATen/ATen.h>

#include <cfenv>
#include <cmath>
#include <utility>
#include <vector>

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
  for (const at::Tensor& t : tensors) type = c10::promoteTypes(type, t.scalar_type());  // not the op: no dispatch
  return type;
}

// The dtype of an overflow-safe total norm: torch's, widened to at least float32, since the norm of
// fp16 gradients readily exceeds fp16's range (65504) and the point is a finite norm.
inline at::ScalarType overflow_safe_total_type(at::TensorList tensors) {
  return c10::promoteTypes(total_norm_type(tensors), at::kFloat);
}

// torch's _foreach_norm refuses the inf norm of an empty tensor; so does fastclip, with its message.
inline void check_inf_norm_of_empty(at::TensorList tensors, Norm norm) {
  if (norm.kind != NormKind::kInf) return;
  for (const at::Tensor& t : tensors)
    TORCH_CHECK(t.numel() > 0,
                "_foreach_norm cannot compute the infinity norm on an empty tensor because the operation does not "
                "have an identity");
}

// The checks every norm-computing op makes before its kernel runs: at least one tensor, a norm type
// with a kernel, and torch's refusal of the inf norm of an empty tensor. Returns the kernel's norm.
inline Norm checked_norm(at::TensorList tensors, double norm_type, const char* op) {
  TORCH_CHECK(!tensors.empty(), "fastclip: ", op, " needs at least one tensor");
  const Norm norm = kernel_norm(norm_type);
  check_inf_norm_of_empty(tensors, norm);
  return norm;
}

// The calling thread's floating-point environment (rounding mode, and the flush-to-zero and
// denormals-are-zero flags that torch.set_flush_denormal sets), for the pool's threads to work in
// while they run pieces of the caller's kernel: the flags are per thread and torch sets them on the
// calling thread only, so without this the bits of a norm under set_flush_denormal(True) depended
// on which thread reduced which chunk (a denormal fp32 element squares to a double that only DAZ
// makes 0).
class CallerFloatingPoint {
 public:
  CallerFloatingPoint() { fegetenv(&environment_); }

  // For the lifetime of this object, the current thread works in the caller's environment.
  class InThisThread {
   public:
    explicit InThisThread(const CallerFloatingPoint& caller) {
      fegetenv(&saved_);
      fesetenv(&caller.environment_);
    }
    ~InThisThread() { fesetenv(&saved_); }
    InThisThread(const InThisThread&) = delete;
    InThisThread& operator=(const InThisThread&) = delete;

   private:
    fenv_t saved_;
  };

 private:
  fenv_t environment_;
};

namespace cpu {
struct TensorView;
struct KnownNorms;
}

// The CPU operators' functions that fastclip._C's direct entries call (fastclip_ops.cpp).
at::Tensor clip_cpu(at::TensorList grads, double max_norm, double norm_type, bool overflow_safe);
// clip_cpu (overflow_safe false) of gradients already reduced to the kernels' views, which the
// caller has checked: at least one, each dense on CPU in a float dtype, none sharing memory with
// another, none empty for the inf norm; total_type is the promotion of their dtypes. norms has one
// entry per view, the first known.count of them already computed by cpu::span_norm (the rest are
// computed here).
at::Tensor clip_views_cpu(const std::vector<cpu::TensorView>& views, const cpu::KnownNorms& known, double* norms,
                          at::ScalarType total_type, double max_norm, double norm_type);
at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type, bool overflow_safe);
void scale_by_cpu(at::TensorList grads, const at::Tensor& coefficients);

// The CUDA operators' functions, for fastclip._C's direct entries (python_module.cpp), which call
// them without the dispatcher: set by fastclip_cuda_ops.cpp when the extension is built with CUDA,
// null otherwise.
struct CudaFunctions {
  at::Tensor (*clip)(at::TensorList grads, double max_norm, double norm_type, bool overflow_safe) = nullptr;
  at::Tensor (*total_norm)(at::TensorList tensors, double norm_type, bool overflow_safe) = nullptr;
  int64_t (*release_captured_tables)() = nullptr;  // see TableCache::release_captured
};
CudaFunctions& cuda_functions();

// The tensors as the kernels address them: each one flat span. A non-overlapping, dense tensor
// (contiguous, transposed, channels-last) is used in place; any other layout is copied to a
// contiguous buffer, which write_back() copies into the original after scaling.
// The tensors are only pointed to (they outlive the op call): no reference count is touched per
// tensor, which for a list of 10,000 small gradients is a measurable share of the call.
struct DenseTensors {
  std::vector<const at::Tensor*> dense;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;  // (original, contiguous copy)

  // Every tensor must be strided and on `device`.
  DenseTensors(at::TensorList tensors, const at::Device& device) {
    dense.reserve(tensors.size());
    size_t to_copy = 0;
    for (const at::Tensor& t : tensors) {
      TORCH_CHECK(t.device() == device, "fastclip: expected every tensor on ", device, ", got one on ", t.device());
      TORCH_CHECK(t.layout() == at::kStrided, "fastclip: sparse gradients have no fused kernel");
      to_copy += !t.is_non_overlapping_and_dense();
    }
    copies.reserve(to_copy);  // never reallocated below: dense points into it
    for (const at::Tensor& t : tensors) {
      if (t.is_non_overlapping_and_dense()) {
        dense.push_back(&t);
      } else {
        copies.emplace_back(t, t.contiguous());
        dense.push_back(&copies.back().second);
      }
    }
  }

  void write_back() {
    for (auto& [original, copy] : copies) original.copy_(copy);
  }
};

}  // namespace fastclip
