// CPU value clipping: see value_clip_kernels.h for the contract.
#include "value_clip_kernels.h"

#include <vector>

#include "chunks.h"
#include "float_convert.h"
#include "simd.h"

namespace fastclip::cpu {
namespace {

using simd::Isa;
using simd::kLanes;

// True if any of the n elements lies outside [lo, hi]. Reads only; lane masks are OR-ed and looked
// at once at the end, so the loop has no branch per vector.
template <Isa I, class E>
inline bool any_outside(const typename E::Storage* x, int64_t n, typename E::Math lo, typename E::Math hi) {
  using Vector = typename E::MathX8;
  decltype(Vector{} < Vector{}) outside{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vector v = E::template load8<I>(x + i);
    outside |= (v < lo) | (v > hi);
  }
  bool any = false;
  for (int l = 0; l < kLanes; ++l) any |= outside[l] != 0;
  for (; i < n; ++i) any |= E::load(x[i]) < lo || E::load(x[i]) > hi;
  return any;
}

// x = min(max(x, lo), hi) in torch's order and with its NaN rule (a comparison with NaN is false,
// so NaN stays). Elements inside the interval store back unchanged: a 16-bit value converted to
// float and back is itself (NaNs become the canonical NaN, as torch's vectorised clamp makes them).
template <Isa I, class E>
inline void clamp_span(typename E::Storage* x, int64_t n, typename E::Math lo, typename E::Math hi) {
  using Vector = typename E::MathX8;
  Vector lo8, hi8;  // lane by lane: `Vector{} + lo` would turn a bound of -0.0 into +0.0
  for (int l = 0; l < kLanes; ++l) lo8[l] = lo, hi8[l] = hi;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Vector v = E::template load8<I>(x + i);
    v = v < lo8 ? lo8 : v;
    v = v > hi8 ? hi8 : v;
    E::template store8<I>(x + i, v);
  }
  for (; i < n; ++i) {
    typename E::Math v = E::load(x[i]);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    x[i] = E::store(v);
  }
}

template <Isa I, class E>
inline void clamp_chunk(void* data, int64_t n, typename E::Math lo, typename E::Math hi) {
  auto* x = static_cast<typename E::Storage*>(data);
  if (any_outside<I, E>(x, n, lo, hi)) clamp_span<I, E>(x, n, lo, hi);
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
  parallel_for(0, static_cast<int64_t>(chunks.size()), grain_in_chunks(chunks), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Chunk& c = chunks[i];
      clamp_elements(tensors[c.tensor], c.begin, c.end - c.begin, lo, hi);
    }
  });
}

}  // namespace fastclip::cpu
