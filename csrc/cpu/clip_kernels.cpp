// CPU kernels of fastclip: see clip_kernels.h for the contract.
//
// Work is a list of chunks (kChunkElements of one tensor each) covering every tensor of every
// dtype. Pass 1 reduces each chunk to a partial, in parallel; the partials of a tensor are then
// combined in chunk order, so the result is the same for any number of threads. Pass 2 (only when
// the coefficient is not 1) scales the same chunks in place.
#include "clip_kernels.h"

#include <cmath>
#include <vector>

#include "float_convert.h"

// Hot loops are compiled for several instruction sets and the best one is chosen when the library
// loads (GCC/Clang function multi-versioning), as ATen's CPU-capability dispatch does.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTCLIP_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTCLIP_SIMD_CLONES
#endif

namespace fastclip::cpu {
namespace {

// Element types: how a stored element is loaded into its arithmetic type (float, or double for
// fp64, as torch's opmath) and stored back.
struct F32 {
  using Storage = float;
  using Math = float;
  static float load(float x) { return x; }
  static float store(float v) { return v; }
};
struct F64 {
  using Storage = double;
  using Math = double;
  static double load(double x) { return x; }
  static double store(double v) { return v; }
};
struct F16 {
  using Storage = uint16_t;
  using Math = float;
  static float load(uint16_t x) { return fp16_to_float(x); }
  static uint16_t store(float v) { return float_to_fp16(v); }
};
struct BF16 {
  using Storage = uint16_t;
  using Math = float;
  static float load(uint16_t x) { return bf16_to_float(x); }
  static uint16_t store(float v) { return float_to_bf16(v); }
};

// max that propagates NaN, like torch's inf norm: once the running value is NaN it stays NaN.
template <typename T>
inline T max_nan(T running, T x) {
  return (x > running || x != x) ? x : running;
}

template <NormKind K, typename T>
inline T accumulate(T acc, T x, T p) {
  if constexpr (K == NormKind::kL2) return acc + x * x;
  if constexpr (K == NormKind::kL1) return acc + std::abs(x);
  if constexpr (K == NormKind::kInf) return max_nan(acc, std::abs(x));
  if constexpr (K == NormKind::kP) return acc + std::pow(std::abs(x), p);
}

template <NormKind K>
inline double combine(double a, double b) {
  return K == NormKind::kInf ? max_nan(a, b) : a + b;
}

// Reduces n elements to a partial (a sum, or a max for kInf), in double whatever the dtype: torch's
// CPU reductions accumulate fp32 in double too (ATen's CPU acc_type), and a memory-bound pass loses
// nothing to the wider arithmetic. Sixteen independent lanes let the compiler vectorise without
// reassociating; each lane sums blocks of 64 elements, and block sums are added with Neumaier
// compensation, so the rounding error stays that of a 64-term sum however large the tensor.
template <class E, NormKind K>
inline double reduce_span(const typename E::Storage* x, int64_t n, double p) {
  constexpr int kLanes = 16;
  constexpr int64_t kBlock = kLanes * 64;
  double lanes[kLanes] = {};
  double compensation[kLanes] = {};
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    double block[kLanes] = {};
    for (int64_t j = i; j < i + kBlock; j += kLanes)
      for (int l = 0; l < kLanes; ++l) block[l] = accumulate<K>(block[l], static_cast<double>(E::load(x[j + l])), p);
    for (int l = 0; l < kLanes; ++l) {
      if constexpr (K == NormKind::kInf) {
        lanes[l] = max_nan(lanes[l], block[l]);
      } else {  // Neumaier: keep the low-order bits that the addition drops
        const double sum = lanes[l] + block[l];
        compensation[l] += std::abs(lanes[l]) >= std::abs(block[l]) ? (lanes[l] - sum) + block[l] : (block[l] - sum) + lanes[l];
        lanes[l] = sum;
      }
    }
  }
  double result = 0.0;
  for (; i < n; ++i) result = accumulate<K>(result, static_cast<double>(E::load(x[i])), p);
  for (int l = 0; l < kLanes; ++l) result = combine<K>(result, lanes[l] + compensation[l]);
  return result;
}

template <class E>
inline double reduce_by_kind(const void* data, int64_t n, Norm norm) {
  const auto* x = static_cast<const typename E::Storage*>(data);
  switch (norm.kind) {
    case NormKind::kL2: return reduce_span<E, NormKind::kL2>(x, n, norm.p);
    case NormKind::kL1: return reduce_span<E, NormKind::kL1>(x, n, norm.p);
    case NormKind::kInf: return reduce_span<E, NormKind::kInf>(x, n, norm.p);
    case NormKind::kP: return reduce_span<E, NormKind::kP>(x, n, norm.p);
  }
  return 0.0;
}

FASTCLIP_SIMD_CLONES double reduce_f32(const void* x, int64_t n, Norm norm) { return reduce_by_kind<F32>(x, n, norm); }
FASTCLIP_SIMD_CLONES double reduce_f64(const void* x, int64_t n, Norm norm) { return reduce_by_kind<F64>(x, n, norm); }
FASTCLIP_SIMD_CLONES double reduce_f16(const void* x, int64_t n, Norm norm) { return reduce_by_kind<F16>(x, n, norm); }
FASTCLIP_SIMD_CLONES double reduce_bf16(const void* x, int64_t n, Norm norm) { return reduce_by_kind<BF16>(x, n, norm); }

double reduce(DType dtype, const void* x, int64_t n, Norm norm) {
  switch (dtype) {
    case DType::kFloat32: return reduce_f32(x, n, norm);
    case DType::kFloat64: return reduce_f64(x, n, norm);
    case DType::kFloat16: return reduce_f16(x, n, norm);
    case DType::kBFloat16: return reduce_bf16(x, n, norm);
  }
  return 0.0;
}

template <class E, typename Math>
inline void scale_span(void* data, int64_t n, double coefficient) {
  auto* x = static_cast<typename E::Storage*>(data);
  // The coefficient is converted to the arithmetic type first, as torch converts a 0-dim CPU
  // tensor operand to opmath.
  const auto c = static_cast<Math>(coefficient);
  for (int64_t i = 0; i < n; ++i) x[i] = E::store(static_cast<typename E::Math>(static_cast<Math>(E::load(x[i])) * c));
}

FASTCLIP_SIMD_CLONES void scale_f32(void* x, int64_t n, double c) { scale_span<F32, float>(x, n, c); }
FASTCLIP_SIMD_CLONES void scale_f64(void* x, int64_t n, double c) { scale_span<F64, double>(x, n, c); }
FASTCLIP_SIMD_CLONES void scale_f16(void* x, int64_t n, double c) { scale_span<F16, float>(x, n, c); }
FASTCLIP_SIMD_CLONES void scale_bf16(void* x, int64_t n, double c) { scale_span<BF16, float>(x, n, c); }

size_t element_size(DType dtype) {
  return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2;
}

void scale_elements(const TensorView& t, int64_t begin, int64_t n, double c) {
  void* x = static_cast<char*>(t.data) + begin * static_cast<int64_t>(element_size(t.dtype));
  if (t.scale_in_double) {  // 0-dim tensors only: no need for a vectorised version
    switch (t.dtype) {
      case DType::kFloat32: return scale_span<F32, double>(x, n, c);
      case DType::kFloat16: return scale_span<F16, double>(x, n, c);
      case DType::kBFloat16: return scale_span<BF16, double>(x, n, c);
      case DType::kFloat64: break;
    }
  }
  switch (t.dtype) {
    case DType::kFloat32: return scale_f32(x, n, c);
    case DType::kFloat64: return scale_f64(x, n, c);
    case DType::kFloat16: return scale_f16(x, n, c);
    case DType::kBFloat16: return scale_bf16(x, n, c);
  }
}

// Rounds a float to the precision of a 16-bit dtype (identity for fp32).
float round_to(DType dtype, float v) {
  if (dtype == DType::kFloat16) return fp16_to_float(float_to_fp16(v));
  if (dtype == DType::kBFloat16) return bf16_to_float(float_to_bf16(v));
  return v;
}

// The root step of a p-norm, then rounded to the dtype, as torch returns each tensor's norm in its
// own dtype. For dtypes that torch accumulates in float, the sum is first brought into float's
// range: every term is non-negative, so torch's float sum overflows to inf exactly when the whole
// sum exceeds float's range, and fastclip must give torch's inf there (overflow-safe norms are an
// explicit option). The root itself is taken in double: a float exponent 1/p would cost ~ln(sum) ulp.
double finish_norm(double accumulated, Norm norm, DType dtype) {
  if (dtype != DType::kFloat64) accumulated = static_cast<float>(accumulated);
  double root = accumulated;
  if (norm.kind == NormKind::kL2) root = std::sqrt(accumulated);
  if (norm.kind == NormKind::kP) root = std::pow(accumulated, 1.0 / norm.p);
  return dtype == DType::kFloat64 ? root : round_to(dtype, static_cast<float>(root));
}

struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

// Chunks of every tensor, in tensor order; first_chunk[t] .. first_chunk[t + 1] are tensor t's.
std::vector<Chunk> make_chunks(const TensorView* tensors, int64_t count, std::vector<int64_t>& first_chunk) {
  std::vector<Chunk> chunks;
  first_chunk.assign(count + 1, 0);
  for (int64_t t = 0; t < count; ++t) {
    first_chunk[t] = static_cast<int64_t>(chunks.size());
    for (int64_t begin = 0; begin < tensors[t].numel; begin += kChunkElements)
      chunks.push_back({static_cast<int32_t>(t), begin, std::min(begin + kChunkElements, tensors[t].numel)});
  }
  first_chunk[count] = static_cast<int64_t>(chunks.size());
  return chunks;
}

// Chunks per parallel task, so that a task has at least ~256K elements: small problems then run on
// the calling thread, with no pool overhead.
int64_t grain_in_chunks(const std::vector<Chunk>& chunks) {
  int64_t elements = 0;
  for (const Chunk& c : chunks) elements += c.end - c.begin;
  if (elements == 0) return 1;
  return std::max<int64_t>(1, (int64_t{1} << 18) * static_cast<int64_t>(chunks.size()) / elements);
}

char* element_address(const TensorView& t, int64_t index) {
  return static_cast<char*>(t.data) + index * static_cast<int64_t>(element_size(t.dtype));
}

}  // namespace

void tensor_norms(const TensorView* tensors, int64_t count, Norm norm, const ParallelFor& parallel_for,
                  double* norms_out) {
  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = make_chunks(tensors, count, first_chunk);
  std::vector<double> partials(chunks.size());
  parallel_for(0, static_cast<int64_t>(chunks.size()), grain_in_chunks(chunks), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Chunk& c = chunks[i];
      const TensorView& t = tensors[c.tensor];
      partials[i] = reduce(t.dtype, element_address(t, c.begin), c.end - c.begin, norm);
    }
  });
  for (int64_t t = 0; t < count; ++t) {
    double accumulated = 0.0;
    for (int64_t i = first_chunk[t]; i < first_chunk[t + 1]; ++i)
      accumulated = norm.kind == NormKind::kInf ? max_nan(accumulated, partials[i]) : accumulated + partials[i];
    norms_out[t] = finish_norm(accumulated, norm, tensors[t].dtype);
  }
}

double total_norm(const double* tensor_norms, int64_t count, Norm norm, DType total_dtype) {
  double accumulated = 0.0;
  for (int64_t t = 0; t < count; ++t) {
    const double v = tensor_norms[t];
    switch (norm.kind) {
      case NormKind::kL2: accumulated += v * v; break;
      case NormKind::kL1: accumulated += std::abs(v); break;
      case NormKind::kInf: accumulated = max_nan(accumulated, std::abs(v)); break;
      case NormKind::kP: accumulated += std::pow(std::abs(v), norm.p); break;
    }
  }
  return finish_norm(accumulated, norm, total_dtype);
}

double clip_coefficient(double total, double max_norm, DType total_dtype) {
  // torch: clamp(max_norm / (total + 1e-6), max=1), where a Python float divided by a tensor runs
  // as reciprocal(total + 1e-6) * max_norm, each step rounded to the norm's dtype; Python scalars
  // enter in the dtype's arithmetic (float, or double for fp64).
  if (total_dtype == DType::kFloat64) {
    const double c = (1.0 / (total + 1e-6)) * max_norm;
    return c > 1.0 ? 1.0 : c;
  }
  const float shifted = round_to(total_dtype, static_cast<float>(total) + static_cast<float>(1e-6));
  const float reciprocal = round_to(total_dtype, 1.0f / shifted);
  const float c = round_to(total_dtype, reciprocal * static_cast<float>(max_norm));
  return c > 1.0f ? 1.0 : static_cast<double>(c);
}

void scale(const TensorView* tensors, int64_t count, double coefficient, const ParallelFor& parallel_for) {
  if (coefficient == 1.0) return;  // x * 1 == x for every x: skip the read and the write
  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = make_chunks(tensors, count, first_chunk);
  parallel_for(0, static_cast<int64_t>(chunks.size()), grain_in_chunks(chunks), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Chunk& c = chunks[i];
      const TensorView& t = tensors[c.tensor];
      scale_elements(t, c.begin, c.end - c.begin, coefficient);
    }
  });
}

ClipResult clip(const TensorView* tensors, int64_t count, Norm norm, DType total_dtype, double max_norm,
                const ParallelFor& parallel_for, double* norms_out) {
  std::vector<double> norms(count);
  tensor_norms(tensors, count, norm, parallel_for, norms.data());
  if (norms_out != nullptr) std::copy(norms.begin(), norms.end(), norms_out);
  const double total = total_norm(norms.data(), count, norm, total_dtype);
  const double coefficient = clip_coefficient(total, max_norm, total_dtype);
  scale(tensors, count, coefficient, parallel_for);
  return {total, coefficient};
}

}  // namespace fastclip::cpu
