// Types shared by fastclip's CPU and CUDA kernels and their torch bindings. No torch headers, no
// CUDA headers: plain C++ that nvcc, g++ and any vendoring build can include.
#pragma once

#include <cstdint>

namespace fastclip {

// Gradient dtypes with fused kernels; every other dtype is served by the "torch" backend.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// kP covers every other finite p > 0; p = 0 and negative p are left to torch.
enum class NormKind : int32_t { kL2, kL1, kInf, kP };

struct Norm {
  NormKind kind;
  double p;  // the exponent; used by kP only
};

}  // namespace fastclip
