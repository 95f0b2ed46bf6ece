// CUDA value clipping: see value_clip_kernels.h for the contract. No torch headers.
#include "value_clip_kernels.h"

#include <cuda_runtime.h>

#include "element_types.cuh"

namespace fastclip::cuda {
namespace {

constexpr int kThreads = 256;

// A bound in the dtype's arithmetic, as the dtype holds it: double for fp64, else through float
// (and, for the 16-bit types, rounded to them, as c10::Half / c10::BFloat16 are built from a float).
template <class E>
__device__ typename E::Math bound_in(double value) {
  if constexpr (sizeof(typename E::Storage) == 8) {
    return value;
  } else {
    return E::load(E::store(static_cast<float>(value)));
  }
}

template <class E>
__device__ void clamp_chunk(void* data, const ChunkEntry& chunk, double clip_value) {
  auto* x = static_cast<typename E::Storage*>(data);
  const typename E::Math lo = bound_in<E>(-clip_value), hi = bound_in<E>(clip_value);
  for (int64_t i = chunk.begin + threadIdx.x; i < chunk.end; i += kThreads) {
    const typename E::Math v = E::load(x[i]);
    typename E::Math clamped = v < lo ? lo : v;  // torch's order: clamp_min, then clamp_max
    clamped = clamped > hi ? hi : clamped;       // (a comparison with NaN is false: NaN stays)
    if (clamped != v && !(clamped != clamped)) x[i] = E::store(clamped);
  }
}

__global__ void __launch_bounds__(kThreads)
    clamp_kernel(const GradEntry* grads, const ChunkEntry* chunks, int64_t num_chunks, double clip_value) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const ChunkEntry chunk = chunks[c];
    const GradEntry grad = grads[chunk.tensor];
    switch (grad.dtype) {
      case DType::kFloat32: clamp_chunk<F32>(grad.data, chunk, clip_value); break;
      case DType::kFloat64: clamp_chunk<F64>(grad.data, chunk, clip_value); break;
      case DType::kFloat16: clamp_chunk<F16>(grad.data, chunk, clip_value); break;
      case DType::kBFloat16: clamp_chunk<BF16>(grad.data, chunk, clip_value); break;
    }
  }
}

}  // namespace

cudaError_t launch_clamp(const void* table, const TableLayout& layout, double clip_value, cudaStream_t stream) {
  if (layout.num_chunks == 0) return cudaSuccess;
  const auto* base = static_cast<const char*>(table);
  // One block per chunk, up to the grid's limit (the kernel strides over any beyond it).
  const int64_t blocks = layout.num_chunks < 2147483647LL ? layout.num_chunks : 2147483647LL;
  clamp_kernel<<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, stream>>>(
      reinterpret_cast<const GradEntry*>(base), reinterpret_cast<const ChunkEntry*>(base + layout.chunks_offset),
      layout.num_chunks, clip_value);
  return cudaGetLastError();
}

}  // namespace fastclip::cuda
