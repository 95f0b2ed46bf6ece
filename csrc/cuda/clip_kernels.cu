// CUDA kernels of fastclip: see clip_kernels.h for the contract. No torch headers.
//
// Phase 1: every chunk (kChunkElements of one gradient) is reduced by one block to a partial, in
// fp64 whatever the dtype, with a fixed per-thread order and a fixed reduction tree; the partials
// are stored, never atomically added. Finalize (one block): each gradient's partials are
// combined by one warp in a fixed order and rooted, the norm rounded to the gradient's dtype (as torch's
// _foreach_norm returns it); the total is the norm of those, rounded to the total dtype, and the
// clip coefficient follows with torch's roundings. Phase 2 scales every chunk, unless the
// coefficient is 1. The result never depends on the grid size, so it is bitwise reproducible.
#include "clip_kernels.h"
#include "element_types.cuh"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace fastclip::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDevices = 64;

// The call's arguments and the table's arrays, passed to every kernel by value.
struct Params {
  ClipArgs args;
  const GradEntry* grads;
  const ChunkEntry* chunks;
  const int64_t* first_chunk;
};

// max that propagates NaN, like torch's inf norm: once the running value is NaN it stays NaN.
template <class T>
__device__ T max_nan(T running, T x) {
  return (x > running || isnan(x)) ? x : running;
}

template <NormKind K, class Acc>
__device__ Acc accumulate(Acc acc, Acc x, Acc p) {
  if constexpr (K == NormKind::kL2) return acc + x * x;
  if constexpr (K == NormKind::kL1) return acc + fabs(x);
  if constexpr (K == NormKind::kInf) return max_nan(acc, fabs(x));
  if constexpr (K == NormKind::kP) return acc + pow(fabs(x), p);
}

template <NormKind K, class Acc>
__device__ Acc combine(Acc a, Acc b) {
  if constexpr (K == NormKind::kInf) return max_nan(a, b);
  else return a + b;
}

// The root step of the norm (none for L1 and inf).
template <NormKind K, class Acc>
__device__ Acc finish(Acc accumulated, Acc p) {
  if constexpr (K == NormKind::kL2) return sqrt(accumulated);
  if constexpr (K == NormKind::kP) return pow(accumulated, Acc(1) / p);
  return accumulated;
}

// Rounds an arithmetic value to a dtype's precision (and back to double).
__device__ double round_to(DType dtype, double v) {
  switch (dtype) {
    case DType::kFloat64: return v;
    case DType::kFloat32: return static_cast<float>(v);
    case DType::kFloat16: return __half2float(__float2half_rn(static_cast<float>(v)));
    case DType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(static_cast<float>(v)));
  }
  return v;
}

__device__ double load_scalar(const void* data, DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return *static_cast<const double*>(data);
    case DType::kFloat32: return *static_cast<const float*>(data);
    case DType::kFloat16: return __half2float(*static_cast<const __half*>(data));
    case DType::kBFloat16: return __bfloat162float(*static_cast<const __nv_bfloat16*>(data));
  }
  return 0.0;
}

__device__ void store_scalar(void* data, DType dtype, double v) {
  switch (dtype) {
    case DType::kFloat64: *static_cast<double*>(data) = v; break;
    case DType::kFloat32: *static_cast<float*>(data) = static_cast<float>(v); break;
    case DType::kFloat16: *static_cast<__half*>(data) = __float2half_rn(static_cast<float>(v)); break;
    case DType::kBFloat16: *static_cast<__nv_bfloat16*>(data) = __float2bfloat16_rn(static_cast<float>(v)); break;
  }
}

// Sum (or max) over the block of one value per thread, in a fixed tree: warp shuffles, then the
// warp results by the first warp. The result is valid in thread 0.
template <NormKind K, class Acc>
__device__ Acc block_reduce(Acc v) {
  __shared__ Acc warp_results[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) v = combine<K>(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_results[lane] : Acc(0);
    for (int offset = 16; offset > 0; offset /= 2) v = combine<K>(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  __syncthreads();  // warp_results may be reused by the next call
  return v;
}

// This thread's share of the reduction of n elements at x: 16-byte vector loads when x is aligned
// (four in flight per thread), element loads otherwise, in an order fixed by n and the alignment.
template <NormKind K, class E, class Acc>
__device__ Acc reduce_thread_share(const typename E::Storage* x, int64_t n, Acc p) {
  using Storage = typename E::Storage;
  constexpr int kPerVector = 16 / sizeof(Storage);
  Acc acc = 0;
  int64_t scalar_begin = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const uint4* vectors = reinterpret_cast<const uint4*>(x);
    const int64_t num_vectors = n / kPerVector;
    int64_t i = threadIdx.x;
    for (; i + 3 * kThreads < num_vectors; i += 4 * kThreads) {
      uint4 raw[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) raw[u] = vectors[i + u * kThreads];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        Storage values[kPerVector];
        memcpy(values, &raw[u], 16);
#pragma unroll
        for (int j = 0; j < kPerVector; ++j) acc = accumulate<K, Acc>(acc, static_cast<Acc>(E::load(values[j])), p);
      }
    }
    for (; i < num_vectors; i += kThreads) {
      Storage values[kPerVector];
      const uint4 raw = vectors[i];
      memcpy(values, &raw, 16);
#pragma unroll
      for (int j = 0; j < kPerVector; ++j) acc = accumulate<K, Acc>(acc, static_cast<Acc>(E::load(values[j])), p);
    }
    scalar_begin = num_vectors * kPerVector;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < n; i += kThreads)
    acc = accumulate<K, Acc>(acc, static_cast<Acc>(E::load(x[i])), p);
  return acc;
}

// fp64 accumulation for every dtype, as fastclip's CPU kernels: fp32 sums in another order than
// torch's land now and then on the other side of a rounding boundary of the gradient's dtype where
// torch's own does not, which E5 forbids. The pass is memory-bound and the GPUs fastclip targets
// have fp64 throughput to spare (H100: ~3.4 of 34 fp64 TFLOP/s for 2-byte elements at 3.35 TB/s).
template <NormKind K, class E>
__device__ double reduce_chunk(const GradEntry& grad, const ChunkEntry& chunk, double p) {
  const auto* x = static_cast<const typename E::Storage*>(grad.data) + chunk.begin;
  return block_reduce<K, double>(reduce_thread_share<K, E, double>(x, chunk.end - chunk.begin, p));
}

// Phase 1: one partial per chunk, chunks spread over the grid.
template <NormKind K>
__device__ void reduce_chunks(const Params& params) {
  for (int64_t c = blockIdx.x; c < params.args.layout.num_chunks; c += gridDim.x) {
    const ChunkEntry chunk = params.chunks[c];
    const GradEntry grad = params.grads[chunk.tensor];
    double partial = 0.0;
    switch (grad.dtype) {
      case DType::kFloat32: partial = reduce_chunk<K, F32>(grad, chunk, params.args.norm.p); break;
      case DType::kFloat64: partial = reduce_chunk<K, F64>(grad, chunk, params.args.norm.p); break;
      case DType::kFloat16: partial = reduce_chunk<K, F16>(grad, chunk, params.args.norm.p); break;
      case DType::kBFloat16: partial = reduce_chunk<K, BF16>(grad, chunk, params.args.norm.p); break;
    }
    if (threadIdx.x == 0) params.args.scratch.partials[c] = partial;
  }
}

// min(max_norm / (total + 1e-6), 1) with torch's roundings in `dtype`: a Python float divided by a
// tensor runs as reciprocal(total + 1e-6) * max_norm, each step rounded to the tensor's dtype, with
// Python scalars entering in its arithmetic (float, or double for fp64); clamp keeps NaN.
__device__ double clip_coefficient(double total, double max_norm, DType dtype) {
  double c;
  if (dtype == DType::kFloat64) {
    c = (1.0 / (total + 1e-6)) * max_norm;
  } else {
    const float shifted = round_to(dtype, static_cast<float>(total) + static_cast<float>(1e-6));
    const float reciprocal = round_to(dtype, 1.0f / shifted);
    c = round_to(dtype, reciprocal * static_cast<float>(max_norm));
  }
  return c > 1.0 ? 1.0 : c;
}

// The norm of an fp64 sum (or max), rounded to `dtype`. For dtypes torch accumulates in fp32, a sum
// beyond fp32's range is inf, as torch's fp32 sum overflows exactly there (every term is
// non-negative); the root is taken in fp64, as fastclip's CPU kernels take it.
template <NormKind K>
__device__ double finished_norm(double accumulated, double p, DType dtype) {
  if (dtype != DType::kFloat64 && accumulated > 3.4028234663852886e38) accumulated = INFINITY;
  return round_to(dtype, finish<K, double>(accumulated, p));
}

// One gradient's norm from its chunk partials, by one warp: lane l combines chunks l, l + 32, ...,
// then the lanes combine in a fixed shuffle tree, so the order depends only on the number of chunks
// (bitwise reproducible). One thread per gradient made a large embedding table's ~600 partials a
// serial chain of loads (~60 us). Rooted and rounded to the gradient's dtype; valid in lane 0.
template <NormKind K>
__device__ double tensor_norm(const Params& params, int64_t t, DType dtype, int lane) {
  double acc = 0;
  for (int64_t c = params.first_chunk[t] + lane; c < params.first_chunk[t + 1]; c += 32)
    acc = combine<K, double>(acc, params.args.scratch.partials[c]);
  for (int offset = 16; offset > 0; offset /= 2) acc = combine<K, double>(acc, __shfl_down_sync(0xffffffffu, acc, offset));
  return finished_norm<K>(acc, params.args.norm.p, dtype);
}

// The total norm of the per-tensor norms, rounded to the total dtype, valid in thread 0.
template <NormKind K>
__device__ double total_of_norms(const Params& params) {
  double acc = 0;
  for (int64_t t = threadIdx.x; t < params.args.layout.num_tensors; t += kThreads)
    acc = accumulate<K, double>(acc, params.args.scratch.tensor_norms[t], params.args.norm.p);
  acc = block_reduce<K, double>(acc);
  return finished_norm<K>(acc, params.args.norm.p, params.args.total_dtype);
}

// Run by one block once every partial is written: per-tensor norms, total, coefficient.
template <NormKind K>
__device__ void finalize(const Params& params) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t t = warp; t < params.args.layout.num_tensors; t += kWarps) {  // the same t in every lane
    const double norm = tensor_norm<K>(params, t, params.grads[t].dtype, lane);
    if (lane == 0) params.args.scratch.tensor_norms[t] = norm;
  }
  __syncthreads();
  const double total = total_of_norms<K>(params);
  if (threadIdx.x == 0) {
    store_scalar(params.args.total_out, params.args.total_dtype, total);
    *params.args.scratch.coefficient = clip_coefficient(total, params.args.max_norm, params.args.total_dtype);
  }
}

// g = T(math(g) * c) over one chunk, vectorised when aligned. c is already in the arithmetic type.
template <class E>
__device__ void scale_span(typename E::Storage* x, int64_t n, typename E::Math c) {
  using Storage = typename E::Storage;
  constexpr int kPerVector = 16 / sizeof(Storage);
  int64_t scalar_begin = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    uint4* vectors = reinterpret_cast<uint4*>(x);
    const int64_t num_vectors = n / kPerVector;
    for (int64_t i = threadIdx.x; i < num_vectors; i += kThreads) {
      uint4 raw = vectors[i];
      Storage values[kPerVector];
      memcpy(values, &raw, 16);
#pragma unroll
      for (int j = 0; j < kPerVector; ++j) values[j] = E::store(E::load(values[j]) * c);
      memcpy(&raw, values, 16);
      vectors[i] = raw;
    }
    scalar_begin = num_vectors * kPerVector;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < n; i += kThreads) x[i] = E::store(E::load(x[i]) * c);
}

template <class E>
__device__ void scale_chunk(const GradEntry& grad, const ChunkEntry& chunk, double coefficient, DType coefficient_dtype) {
  auto* x = static_cast<typename E::Storage*>(grad.data) + chunk.begin;
  const int64_t n = chunk.end - chunk.begin;
  if (grad.scale_mode == ScaleMode::kPromoted) {  // a 0-dim gradient: one element
    if (threadIdx.x == 0) {
      const bool in_double = coefficient_dtype == DType::kFloat64 || grad.dtype == DType::kFloat64;
      const double product = in_double ? static_cast<double>(E::load(x[0])) * coefficient
                                       : static_cast<double>(static_cast<float>(E::load(x[0])) * static_cast<float>(coefficient));
      x[0] = E::store(static_cast<typename E::Math>(product));
    }
    return;
  }
  // The coefficient in the gradient's dtype (through float, as c10 converts double to 16-bit types).
  scale_span<E>(x, n, static_cast<typename E::Math>(round_to(grad.dtype, coefficient)));
}

// Phase 2. The coefficient is the same in every block, so either all blocks return or none does.
__device__ void scale_chunks(const Params& params, double coefficient, DType coefficient_dtype) {
  if (coefficient == 1.0) return;  // x * 1 == x for every x: skip the read and the write
  for (int64_t c = blockIdx.x; c < params.args.layout.num_chunks; c += gridDim.x) {
    const ChunkEntry chunk = params.chunks[c];
    const GradEntry grad = params.grads[chunk.tensor];
    switch (grad.dtype) {
      case DType::kFloat32: scale_chunk<F32>(grad, chunk, coefficient, coefficient_dtype); break;
      case DType::kFloat64: scale_chunk<F64>(grad, chunk, coefficient, coefficient_dtype); break;
      case DType::kFloat16: scale_chunk<F16>(grad, chunk, coefficient, coefficient_dtype); break;
      case DType::kBFloat16: scale_chunk<BF16>(grad, chunk, coefficient, coefficient_dtype); break;
    }
  }
}

__device__ void scale_by_given_or_computed(const Params& params) {
  if (params.args.compute_norm) {
    scale_chunks(params, *params.args.scratch.coefficient, params.args.total_dtype);
  } else {
    const double total = load_scalar(params.args.given_total, params.args.given_total_dtype);
    scale_chunks(params, clip_coefficient(total, params.args.max_norm, params.args.given_total_dtype), params.args.given_total_dtype);
  }
}

// The single-launch kernel: grid = co-resident blocks, so grid.sync() is legal.
template <NormKind K>
__global__ void __launch_bounds__(kThreads) clip_cooperative_kernel(Params params) {
  if (params.args.compute_norm) {
    const cg::grid_group grid = cg::this_grid();
    reduce_chunks<K>(params);
    grid.sync();
    if (blockIdx.x == 0) finalize<K>(params);
    grid.sync();
  }
  if (params.args.scale) scale_by_given_or_computed(params);
}

// Fallback, launch 1: partials, then the last block to finish finalizes. The arrival counter is
// this call's own, zeroed on the stream just before (see launch()).
template <NormKind K>
__global__ void __launch_bounds__(kThreads) norm_kernel(Params params) {
  reduce_chunks<K>(params);
  __shared__ bool is_last_block;
  __threadfence();  // this block's partial is visible before it is counted
  if (threadIdx.x == 0) is_last_block = atomicAdd(params.args.scratch.arrival_counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last_block) return;
  __threadfence();
  finalize<K>(params);
}

// Fallback, launch 2 (and the only launch of scale-by-a-given-norm).
__global__ void __launch_bounds__(kThreads) scale_kernel(Params params) { scale_by_given_or_computed(params); }

using KernelFunction = void (*)(Params);

KernelFunction cooperative_kernel_for(NormKind kind) {
  switch (kind) {
    case NormKind::kL2: return clip_cooperative_kernel<NormKind::kL2>;
    case NormKind::kL1: return clip_cooperative_kernel<NormKind::kL1>;
    case NormKind::kInf: return clip_cooperative_kernel<NormKind::kInf>;
    case NormKind::kP: return clip_cooperative_kernel<NormKind::kP>;
  }
  return nullptr;
}

KernelFunction norm_kernel_for(NormKind kind) {
  switch (kind) {
    case NormKind::kL2: return norm_kernel<NormKind::kL2>;
    case NormKind::kL1: return norm_kernel<NormKind::kL1>;
    case NormKind::kInf: return norm_kernel<NormKind::kInf>;
    case NormKind::kP: return norm_kernel<NormKind::kP>;
  }
  return nullptr;
}

// Per device: SM count, cooperative-launch support and co-resident blocks per norm kind, queried
// once (the queries cost microseconds, and a training step calls this every time).
struct DeviceInfo {
  bool known = false;
  int sms = 0;
  bool cooperative = false;
  int resident_blocks[4] = {};
};

cudaError_t device_info(int device, const DeviceInfo** out) {
  static DeviceInfo infos[kMaxDevices];
  static std::mutex mutex;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(mutex);
  DeviceInfo& info = infos[device];
  if (!info.known) {
    int cooperative = 0;
    cudaError_t error = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device);
    if (error == cudaSuccess) error = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
    const char* env = std::getenv("FASTCLIP_CUDA_COOPERATIVE");
    info.cooperative = cooperative != 0 && !(env != nullptr && std::strcmp(env, "0") == 0);
    for (int kind = 0; kind < 4 && error == cudaSuccess; ++kind) {
      int per_sm = 0;
      error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &per_sm, reinterpret_cast<const void*>(cooperative_kernel_for(static_cast<NormKind>(kind))), kThreads, 0);
      info.resident_blocks[kind] = per_sm * info.sms;
    }
    if (error != cudaSuccess) return error;
    info.known = true;
  }
  *out = &info;
  return cudaSuccess;
}

Params make_params(const ClipArgs& args) {
  const auto* base = static_cast<const char*>(args.table);
  return {args, reinterpret_cast<const GradEntry*>(base), reinterpret_cast<const ChunkEntry*>(base + args.layout.chunks_offset),
          reinterpret_cast<const int64_t*>(base + args.layout.first_chunk_offset)};
}

}  // namespace

TableLayout table_layout(const GradEntry* grads, int64_t num_tensors) {
  TableLayout layout;
  layout.num_tensors = num_tensors;
  for (int64_t t = 0; t < num_tensors; ++t) layout.num_chunks += (grads[t].numel + kChunkElements - 1) / kChunkElements;
  layout.chunks_offset = sizeof(GradEntry) * num_tensors;
  layout.first_chunk_offset = layout.chunks_offset + sizeof(ChunkEntry) * layout.num_chunks;
  layout.bytes = layout.first_chunk_offset + sizeof(int64_t) * (num_tensors + 1);
  return layout;
}

void fill_table(const GradEntry* grads, const TableLayout& layout, void* host_buffer) {
  auto* base = static_cast<char*>(host_buffer);
  std::memcpy(base, grads, sizeof(GradEntry) * layout.num_tensors);
  auto* chunks = reinterpret_cast<ChunkEntry*>(base + layout.chunks_offset);
  auto* first_chunk = reinterpret_cast<int64_t*>(base + layout.first_chunk_offset);
  int64_t c = 0;
  for (int64_t t = 0; t < layout.num_tensors; ++t) {
    first_chunk[t] = c;
    for (int64_t begin = 0; begin < grads[t].numel; begin += kChunkElements)
      chunks[c++] = {begin, begin + kChunkElements < grads[t].numel ? begin + kChunkElements : grads[t].numel, t};
  }
  first_chunk[layout.num_tensors] = c;
}

cudaError_t launch(const ClipArgs& args, cudaStream_t stream, bool* cooperative_refused) {
  if (cooperative_refused != nullptr) *cooperative_refused = false;
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  const DeviceInfo* info = nullptr;
  if (error == cudaSuccess) error = device_info(device, &info);
  if (error != cudaSuccess) return error;
  Params params = make_params(args);
  const int kind = static_cast<int>(args.norm.kind);
  // Enough blocks to fill the GPU, never more than there are chunks (at least one: finalize).
  const int64_t wanted = args.layout.num_chunks > 0 ? args.layout.num_chunks : 1;
  const int resident = info->resident_blocks[kind];
  if (args.compute_norm && info->cooperative && resident > 0) {
    const dim3 grid(static_cast<unsigned>(wanted < resident ? wanted : resident));
    void* kernel_args[] = {&params};
    error = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(cooperative_kernel_for(args.norm.kind)), grid,
                                        dim3(kThreads), kernel_args, 0, stream);
    if (error == cudaSuccess) return cudaGetLastError();
    // Refused at launch (MPS or MIG limits, SMs held by another process, too many blocks): the
    // two-launch path below computes the same bits. Any other error is reported as it is.
    if (error != cudaErrorCooperativeLaunchTooLarge && error != cudaErrorNotSupported && error != cudaErrorNotPermitted) {
      return error;
    }
    (void)cudaGetLastError();  // clear the refusal, which is not sticky
    if (cooperative_refused != nullptr) *cooperative_refused = true;
  }
  const int64_t cap = 8LL * info->sms;
  const dim3 grid(static_cast<unsigned>(wanted < cap ? wanted : cap));
  if (args.compute_norm) {
    // The call's own counter, zeroed in stream order (captured as a memset node): two calls in
    // flight on two streams, or a call after an aborted one, never share a count.
    if ((error = cudaMemsetAsync(args.scratch.arrival_counter, 0, sizeof(unsigned int), stream)) != cudaSuccess) {
      return error;
    }
    norm_kernel_for(args.norm.kind)<<<grid, kThreads, 0, stream>>>(params);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
  }
  if (args.scale) {
    scale_kernel<<<grid, kThreads, 0, stream>>>(params);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace fastclip::cuda
