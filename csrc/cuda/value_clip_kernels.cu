// CUDA value clipping: see value_clip_kernels.h for the contract. No torch headers.
#include "value_clip_kernels.h"

#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

#include "element_types.cuh"

namespace fastclip::cuda {
namespace {

constexpr int kThreads = 256;

// A bound in the dtype's arithmetic, as the dtype holds it: double for fp64, else through float
// (and, for the 16-bit types, rounded to them, as c10::Half / c10::BFloat16 are built from a float).
// torch's clip_grad_value_ on CUDA calls _foreach_clamp_min_(-clip_value) then
// _foreach_clamp_max_(clip_value) on each dtype's gradients, and the two foreach routes it can take
// round the same but differ in the sign of a zero result when clip_value is 0. fastclip matches the
// route torch takes for each dtype, bit for bit:
// - the fused route (every gradient of the dtype dense): compare in opmath with the bound as a float
//   (double for fp64): keep x if it is NaN or above the lower bound, else the bound; then likewise
//   below the upper bound. With clip_value 0 every non-NaN element becomes +0.0.
// - the per-tensor route (some gradient of the dtype not dense): at::clamp_min_ then at::clamp_max_
//   on each tensor, NaN kept, fmax/fmin otherwise (zeros keep their sign: -3 clamps to -0.0).

// A bound as the per-tensor route holds it: double for fp64, else through float (and, for the 16-bit
// types, rounded to them, as c10::Half / c10::BFloat16 are built from a float).
template <class E>
__device__ typename E::Math bound_in_dtype(double value) {
  if constexpr (sizeof(typename E::Storage) == 8) {
    return value;
  } else {
    return E::load(E::store(static_cast<float>(value)));
  }
}

// Whether two stored elements have the same bits: the write is skipped only then, so a zero whose
// sign the clamp changes is written.
template <class T>
__device__ bool same_bits(T a, T b) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "a float format");
  using Bits = std::conditional_t<sizeof(T) == 2, unsigned short, std::conditional_t<sizeof(T) == 4, unsigned, unsigned long long>>;
  Bits x, y;
  memcpy(&x, &a, sizeof(T));
  memcpy(&y, &b, sizeof(T));
  return x == y;
}

template <class E, bool kFusedRoute>
__device__ void clamp_chunk(void* data, const ChunkEntry& chunk, double clip_value) {
  using Math = typename E::Math;
  auto* x = static_cast<typename E::Storage*>(data);
  const Math lo = kFusedRoute ? static_cast<Math>(-clip_value) : bound_in_dtype<E>(-clip_value);
  const Math hi = kFusedRoute ? static_cast<Math>(clip_value) : bound_in_dtype<E>(clip_value);
  for (int64_t i = chunk.begin + threadIdx.x; i < chunk.end; i += kThreads) {
    const typename E::Storage stored = x[i];
    const Math v = E::load(stored);
    if (v != v) continue;  // NaN stays, on both routes
    Math clamped;
    if constexpr (kFusedRoute) {
      clamped = v > lo ? v : lo;
      clamped = clamped < hi ? clamped : hi;
    } else {
      clamped = fmin(fmax(v, lo), hi);
    }
    const typename E::Storage result = E::store(clamped);
    if (!same_bits(result, stored)) x[i] = result;
  }
}

template <class E>
__device__ void clamp_chunk_on_route(void* data, const ChunkEntry& chunk, double clip_value, bool fused_route) {
  if (fused_route) {
    clamp_chunk<E, true>(data, chunk, clip_value);
  } else {
    clamp_chunk<E, false>(data, chunk, clip_value);
  }
}

__global__ void __launch_bounds__(kThreads) clamp_kernel(const GradEntry* grads, const ChunkEntry* chunks,
                                                         int64_t num_chunks, double clip_value,
                                                         unsigned per_tensor_route_dtypes) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const ChunkEntry chunk = chunks[c];
    const GradEntry grad = grads[chunk.tensor];
    const bool fused_route = !((per_tensor_route_dtypes >> static_cast<int>(grad.dtype)) & 1u);
    switch (grad.dtype) {
      case DType::kFloat32: clamp_chunk_on_route<F32>(grad.data, chunk, clip_value, fused_route); break;
      case DType::kFloat64: clamp_chunk_on_route<F64>(grad.data, chunk, clip_value, fused_route); break;
      case DType::kFloat16: clamp_chunk_on_route<F16>(grad.data, chunk, clip_value, fused_route); break;
      case DType::kBFloat16: clamp_chunk_on_route<BF16>(grad.data, chunk, clip_value, fused_route); break;
    }
  }
}

}  // namespace

cudaError_t launch_clamp(const void* table, const TableLayout& layout, double clip_value,
                         unsigned per_tensor_route_dtypes, cudaStream_t stream) {
  if (layout.num_chunks == 0) return cudaSuccess;
  const auto* base = static_cast<const char*>(table);
  // One block per chunk, up to the grid's limit (the kernel strides over any beyond it).
  const int64_t blocks = layout.num_chunks < 2147483647LL ? layout.num_chunks : 2147483647LL;
  clamp_kernel<<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, stream>>>(
      reinterpret_cast<const GradEntry*>(base), reinterpret_cast<const ChunkEntry*>(base + layout.chunks_offset),
      layout.num_chunks, clip_value, per_tensor_route_dtypes);
  return cudaGetLastError();
}

}  // namespace fastclip::cuda
