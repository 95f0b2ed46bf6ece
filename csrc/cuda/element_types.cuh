// Element types of fastclip's CUDA kernels: storage, arithmetic (torch's opmath: float, or double
// for fp64), and conversions that round like c10 on CUDA. Shared by every CUDA kernel family. No
// torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastclip::cuda {

struct F32 {
  using Storage = float;
  using Math = float;
  __device__ static float load(float x) { return x; }
  __device__ static float store(float v) { return v; }
};
struct F64 {
  using Storage = double;
  using Math = double;
  __device__ static double load(double x) { return x; }
  __device__ static double store(double v) { return v; }
};
struct F16 {
  using Storage = __half;
  using Math = float;
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
struct BF16 {
  using Storage = __nv_bfloat16;
  using Math = float;
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace fastclip::cuda
