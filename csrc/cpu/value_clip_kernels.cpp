// CPU value clipping: see value_clip_kernels.h for the contract.
#include "value_clip_kernels.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "chunks.h"
#include "float_convert.h"
#include "simd.h"

namespace fastclip::cpu {
namespace {

using simd::Isa;
using simd::kLanes;

// True if any lane of a comparison mask is set (one vptest on AVX2).
template <class Mask>
inline bool any_lane(Mask mask) {
  typedef uint64_t u64x4 __attribute__((vector_size(32)));
  u64x4 words[sizeof(Mask) / 32];
  std::memcpy(words, &mask, sizeof mask);
  u64x4 any = words[0];
  for (size_t w = 1; w < sizeof(Mask) / 32; ++w) any |= words[w];
  return (any[0] | any[1] | any[2] | any[3]) != 0;
}

// x = min(max(x, lo), hi) in torch's order and with its NaN rule (a comparison with NaN is false,
// so NaN stays), for fp32 and fp64, in one pass: each vector is read, and written back only if one
// of its elements lies outside.
template <Isa I, class E>
inline void clamp_span(typename E::Storage* x, int64_t n, typename E::Math lo, typename E::Math hi) {
  using Vector = typename E::MathX8;
  Vector lo8, hi8;  // lane by lane: `Vector{} + lo` would turn a bound of -0.0 into +0.0
  for (int l = 0; l < kLanes; ++l) lo8[l] = lo, hi8[l] = hi;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vector v = E::template load8<I>(x + i);
    const auto below = v < lo8, above = v > hi8;
    if (any_lane(below | above)) E::template store8<I>(x + i, below ? lo8 : above ? hi8 : v);
  }
  for (; i < n; ++i) {
    const typename E::Math v = E::load(x[i]);
    if (v < lo) x[i] = E::store(lo);
    else if (v > hi) x[i] = E::store(hi);
  }
}

// 16-bit dtypes work on the bits alone, with no conversion to float: the interval is symmetric
// ([-h, h], h >= 0 exact in the dtype), so x lies outside iff its magnitude bits exceed h's and it
// is not NaN (magnitude above infinity's), and the result is then h with x's sign. That is exactly
// torch's clamp_min(-h) then clamp_max(h) (a NaN is left as it is, which torch's vectorised clamp
// stores as the canonical NaN: NaN either way).
// Sixteen 16-bit lanes: a whole AVX2 register (two SSE ones), as wide as the fp32 path's vectors.
typedef uint16_t u16x16 __attribute__((vector_size(32)));
constexpr int kLanes16 = 16;

template <class E>
struct Bits16 {
  uint16_t h;         // the upper bound's bits
  uint16_t infinity;  // +inf's bits: magnitudes above it are NaN
};

// One pass, as clamp_span.
template <Isa I, class E>
inline void clamp_span_16(uint16_t* x, int64_t n, Bits16<E> b) {
  int64_t i = 0;
  for (; i + kLanes16 <= n; i += kLanes16) {
    const u16x16 bits = simd::load_vector<u16x16>(x + i);
    const u16x16 magnitude = bits & UINT16_C(0x7FFF);
    const u16x16 outside = (magnitude > b.h) & (magnitude <= b.infinity);
    if (any_lane(outside)) simd::store_vector(x + i, outside ? u16x16((bits & UINT16_C(0x8000)) | b.h) : bits);
  }
  for (; i < n; ++i) {
    const uint16_t magnitude = x[i] & 0x7FFF;
    if (magnitude > b.h && magnitude <= b.infinity) x[i] = static_cast<uint16_t>((x[i] & 0x8000) | b.h);
  }
}

template <Isa I, class E>
inline void clamp_chunk(void* data, int64_t n, typename E::Math lo, typename E::Math hi) {
  if constexpr (sizeof(typename E::Storage) == 2) {
    auto* x = static_cast<uint16_t*>(data);
    const Bits16<E> b{E::store(hi), E::store(static_cast<float>(INFINITY))};
    clamp_span_16<I, E>(x, n, b);
  } else {
    clamp_span<I, E>(static_cast<typename E::Storage*>(data), n, lo, hi);
  }
}

// The bounds as ATen's clamp converts a Scalar holding a double: to the dtype's own type, through
// float for the 16-bit ones (c10::Half and c10::BFloat16 are built from a float).
struct Bounds {
  double f64;
  float f32, f16, bf16;
};

Bounds bounds_of(double value) {
  const float f = static_cast<float>(value);
  return {value, f, fp16_to_float(float_to_fp16(f)), bf16_to_float(float_to_bf16(f))};
}

template <Isa I>
inline void clamp_by_dtype(DType dtype, void* x, int64_t n, const Bounds& lo, const Bounds& hi) {
  switch (dtype) {
    case DType::kFloat32: return clamp_chunk<I, simd::F32>(x, n, lo.f32, hi.f32);
    case DType::kFloat64: return clamp_chunk<I, simd::F64>(x, n, lo.f64, hi.f64);
    case DType::kFloat16: return clamp_chunk<I, simd::F16>(x, n, lo.f16, hi.f16);
    case DType::kBFloat16: return clamp_chunk<I, simd::BF16>(x, n, lo.bf16, hi.bf16);
  }
}

// One compiled copy of the loops per instruction set, as in clip_kernels.cpp.
FASTCLIP_TARGET_GENERIC void clamp_generic(DType d, void* x, int64_t n, const Bounds& lo, const Bounds& hi) { clamp_by_dtype<Isa::kGeneric>(d, x, n, lo, hi); }
#if FASTCLIP_X86_VARIANTS
FASTCLIP_TARGET_AVX2 void clamp_avx2(DType d, void* x, int64_t n, const Bounds& lo, const Bounds& hi) { clamp_by_dtype<Isa::kAvx2>(d, x, n, lo, hi); }
FASTCLIP_TARGET_AVX512 void clamp_avx512(DType d, void* x, int64_t n, const Bounds& lo, const Bounds& hi) { clamp_by_dtype<Isa::kAvx512>(d, x, n, lo, hi); }
#endif

void clamp_elements(const TensorView& t, int64_t begin, int64_t n, const Bounds& lo, const Bounds& hi) {
  void* x = element_address(t, begin);
  switch (simd::active_isa()) {
#if FASTCLIP_X86_VARIANTS
    case Isa::kAvx512: return clamp_avx512(t.dtype, x, n, lo, hi);
    case Isa::kAvx2: return clamp_avx2(t.dtype, x, n, lo, hi);
#endif
    default: return clamp_generic(t.dtype, x, n, lo, hi);
  }
}

}  // namespace

void clamp_values(const TensorView* tensors, int64_t count, double clip_value, const ParallelFor& parallel_for) {
  const Bounds lo = bounds_of(-clip_value), hi = bounds_of(clip_value);
  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = make_chunks(tensors, count, first_chunk);
  parallel_over_chunks(tensors, count, chunks, parallel_for, [&](int64_t i) {
    const Chunk& c = chunks[i];
    clamp_elements(tensors[c.tensor], c.begin, c.end - c.begin, lo, hi);
  });
}

}  // namespace fastclip::cpu
