// CPU kernels of fastclip: see clip_kernels.h for the contract.
//
// Work is a list of chunks (kChunkElements of one tensor each) covering every tensor of every
// dtype. Pass 1 reduces each chunk to a partial, in parallel; the partials of a tensor are then
// combined in chunk order, so the result is the same for any number of threads. Pass 2 (only when
// the coefficient is not 1) scales the same chunks in place.
#include "clip_kernels.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "chunks.h"
#include "float_convert.h"
#include "pieces.h"
#include "simd.h"

namespace fastclip::cpu {
namespace {

using simd::abs_value;
using simd::f64x4;
using simd::f64x8;
using simd::Isa;
using simd::kLanes;

// max that propagates NaN, like torch's inf norm: once the running value is NaN it stays NaN.
inline double max_nan(double running, double x) { return x > running || x != x ? x : running; }

template <NormKind K>
inline double accumulate(double acc, double x, double p) {
  if constexpr (K == NormKind::kL2) return acc + x * x;
  if constexpr (K == NormKind::kL1) return acc + std::abs(x);
  if constexpr (K == NormKind::kInf) return max_nan(acc, std::abs(x));
  if constexpr (K == NormKind::kP) return acc + std::pow(std::abs(x), p);
}

template <NormKind K, class V>
inline V accumulate(V acc, V x, double p) {
  if constexpr (K == NormKind::kL2) return acc + x * x;
  if constexpr (K == NormKind::kL1) return acc + abs_value(x);
  if constexpr (K == NormKind::kInf) return simd::max_magnitude(acc, x);
  if constexpr (K == NormKind::kP) {  // no vector pow: lane by lane, in the same order
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(double)); ++l) acc[l] += std::pow(std::abs(x[l]), p);
    return acc;
  }
}

// The vector type the reduction accumulates in: eight double lanes, except on AVX2, where four
// (one native register) work far better (see simd::load8_as_double_halves). Either way each of the
// 32 accumulators sees the same elements in the same order, so the bits do not depend on it.
template <Isa I>
using AccumulatorVector = std::conditional_t<I == Isa::kAvx2 && FASTCLIP_X86_VARIANTS, f64x4, f64x8>;

// Eight elements from p, widened to double, into 8 / width accumulator-sized vectors.
template <Isa I, class E, class V>
inline void load8_into(const typename E::Storage* p, V* out) {
  if constexpr (sizeof(V) == sizeof(f64x8)) {
    out[0] = simd::load8_as_double<I, E>(p);
  } else {
#if FASTCLIP_X86_VARIANTS
    simd::load8_as_double_halves<E>(p, out[0], out[1]);
#endif
  }
}

// The L2 reduction of fp16 and bf16 squares elements in float and adds them in fours,
// (a^2 + b^2) + (c^2 + d^2), before widening: a 16-bit float has at most 11 significant bits, so
// its square (22 bits) is exact in float, and each quad's sum is rounded at most three times, to
// float's 24 bits, far below the error torch's own float accumulation makes. Widening to double is
// what limits the plain loop (two conversions per eight elements, ~5 G elements/s per core on
// Zen 4, below DRAM speed for 16-bit data); quads quarter it (pairs, before, halved it: 16 MiB of
// bf16 in cache, 2 AMD EPYC cores, 81 -> 91 GB/s from pairs to quads; from DRAM no change). Sums
// of squares whose total fits in float's 24 bits above the smallest square's lowest bit are exact
// here, as in torch's float sum (E4): every partial sum is such a multiple, below the total. The
// range is the one caveat, for bf16 only: squares above float's range are inf, as in torch's float
// sum (and finish_norm makes such a norm inf anyway), and squares below it lose bits, which
// reduce_span detects from the result and then redoes the span in double.
template <class E, NormKind K, bool kScaled>
constexpr bool kSquareQuadsInFloat =
    K == NormKind::kL2 && !kScaled && sizeof(typename E::Storage) == 2 && std::is_same_v<typename E::Math, float>;

// (a^2 + b^2) + (c^2 + d^2) in float for the eight elements at p, p + stride, p + 2 stride and
// p + 3 stride, widened to double into 8 / width accumulator-sized vectors.
template <Isa I, class E, class V>
inline void load8_quad_squares_into(const typename E::Storage* p, int64_t stride, V* out) {
  const simd::f32x8 a = E::template load8<I>(p);
  const simd::f32x8 b = E::template load8<I>(p + stride);
  const simd::f32x8 c = E::template load8<I>(p + 2 * stride);
  const simd::f32x8 d = E::template load8<I>(p + 3 * stride);
  const simd::f32x8 quad = (a * a + b * b) + (c * c + d * d);
  if constexpr (sizeof(V) == sizeof(f64x8)) {
    out[0] = simd::widen<I>(quad);
  } else {
#if FASTCLIP_X86_VARIANTS
    simd::widen_halves(quad, out[0], out[1]);
#endif
  }
}

// The quad squares of a whole step's 32 lanes (elements p[j], p[j + stride], p[j + 2 stride],
// p[j + 3 stride] for j < 32) into the accumulator-sized vectors `out`, lane j at out[j / width].
template <Isa I, class E, class V>
inline void load32_quad_squares_into(const typename E::Storage* p, int64_t stride, V* out) {
#if FASTCLIP_X86_VARIANTS
  if constexpr (I == Isa::kAvx512 && std::is_same_v<E, simd::BF16>) {
    static_assert(sizeof(V) == sizeof(f64x8));  // lanes 16 s to 16 s + 15 in out[2 s] and out[2 s + 1]
    for (int sixteen = 0; sixteen < 2; ++sixteen)
      simd::quad_squares16_bf16_avx512(p + 16 * sixteen, stride, out[2 * sixteen], out[2 * sixteen + 1]);
    return;
  }
#endif
  constexpr int kWidth = sizeof(V) / sizeof(double);
  for (int eight = 0; eight < 4; ++eight) load8_quad_squares_into<I, E>(p + eight * kLanes, stride, out + eight * kLanes / kWidth);
}

// What a span's lanes and tail are combined in: long double (x87's 64-bit mantissa on x86; double
// where long double is double) for the sums of fp64 elements and for p-norms other than L1 and
// L2, so that no double rounding comes before the norm is rounded to its dtype (the chunks of a
// tensor, the tensors and the root are combined in long double too). For fp64 gradients those
// roundings were the error: the 32 lane sums added in double left fp64 L1 and L2 norms up to 2.4
// ulp off (E5 allows 2), and a p-norm's root multiplies the sum's relative error by 1/p (fp64
// 0.5-norms were 2-6 ulp off in ~4% of random cases). Narrower dtypes keep double (their ulps are
// 2^29 times larger): the x87 additions cost ~20 ns a span, +35% on 10,000 small fp32 gradients.
// The lanes themselves stay double, with their compensated block sums. The max of kInf is exact.
template <class E, NormKind K>
using Partial = std::conditional_t<K != NormKind::kInf && (std::is_same_v<E, simd::F64> || K == NormKind::kP),
                                   long double, double>;

template <NormKind K>
inline double combine(double a, double b) {
  return K == NormKind::kInf ? max_nan(a, b) : a + b;
}

// Sets every vector of `vectors` to 0 with vector stores. `= {}` on these arrays compiles to
// `rep stos`, whose start-up cost (~35 cycles each) was a third of the time of reducing a tensor of
// a few hundred elements.
template <class V, int N>
inline void zero(V (&vectors)[N]) {
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) vectors[i] = V{};
}

// The sum of 32 lanes (each plus its compensation, except a lane that reached inf, whose
// compensation is NaN: inf - inf), added pairwise: lane j + lane j + 16, then j + 8, 4, 2, 1. The
// same additions whatever the vector width, so the bits do not depend on the ISA; five dependent
// vector additions instead of 32 scalar ones in a chain, which were ~50 ns of every small
// tensor's reduction (a third of the time of a 400-element fp32 gradient in cache).
template <class V, int N>
inline double sum_of_lanes(const V (&lanes)[N], const V (&compensation)[N]) {
  constexpr int kWidth = sizeof(V) / sizeof(double);
  alignas(64) double terms[N * kWidth];
  for (int v = 0; v < N; ++v)
    for (int l = 0; l < kWidth; ++l)
      terms[v * kWidth + l] = std::isinf(lanes[v][l]) ? lanes[v][l] : lanes[v][l] + compensation[v][l];
#pragma GCC unroll 8
  for (int half = N * kWidth / 2; half >= 1; half /= 2)
    for (int j = 0; j < half; ++j) terms[j] += terms[j + half];
  return terms[0];
}

// Streaming loops request each cache line twice ahead of its loads: into L2 kPrefetchBytes ahead
// (prefetcht1), and into L1 2 KiB ahead (prefetcht0). Without prefetches a core streams from DRAM
// at ~60% of its bandwidth: the conversions to double leave too few cache lines in flight. 8 KiB
// rather than 4: when the AMD VM read memory fast (a flat fp32 sum at ~75 GB/s), LLaMA-style bf16
// gradients were read at 61 GB/s with 4 KiB and 64 GB/s with 8 (three alternating runs each, 2 AMD
// EPYC cores). Into L2 first because on Intel a prefetch into L1 holds one of the core's few L1 fill
// buffers for a whole DRAM round trip: with prefetcht0 8 KiB ahead alone, 2 Xeon cores (480 MiB L3,
// 256 MiB from DRAM) reduced fp32 at 19 GB/s, below a plain float sum (28); with both requests at
// 28 GB/s, bf16 17 -> 24; scaling fp32 19.5 -> 26, bf16 13 -> 21. Data in cache within 5%. Not yet
// measured on AMD EPYC. Prefetches never fault: lines past a span's end cost nothing.
constexpr int64_t kPrefetchBytes = 8192;
constexpr int64_t kPrefetchIntoL1Bytes = 2048;

inline void prefetch_ahead(const void* line) {
  __builtin_prefetch(static_cast<const char*>(line) + kPrefetchBytes, 0, 2);
  __builtin_prefetch(static_cast<const char*>(line) + kPrefetchIntoL1Bytes, 0, 3);
}

// Reduces n elements to a partial (a sum, or a max for kInf), in double whatever the dtype: torch's
// CPU reductions accumulate fp32 in double too (ATen's CPU acc_type), and a memory-bound pass loses
// nothing to the wider arithmetic. 32 lanes (four 8-wide vectors, or eight 4-wide ones on AVX2) accumulate independently, so the loop
// is not bound by the latency of one addition; each lane sums blocks of 32 elements, and block sums
// are added to the lane with Neumaier compensation, so the rounding error stays that of a short
// sum however large the tensor. The last n % 32 elements (n % 128 with kQuads) are summed one by one.
// kScaled: every element is multiplied by `scale` (a power of two, so exactly) before it is
// accumulated; the overflow-safe norm's second sweep over a chunk.
// kQuads (see kSquareQuadsInFloat): a step is 128 elements, lane j adding
// (x[j]^2 + x[j + 32]^2) + (x[j + 64]^2 + x[j + 96]^2).
// A partial is returned in long double (see Partial); kInf's holds a double exactly.
// N spans of n elements each (xs[0..N)) are reduced in lockstep, a step of each in turn, each with
// its own accumulators, into out[0..N): every span's operations and their order are those of N = 1,
// so are its bits. N = 2 reads two DRAM streams at once (see reduce_pair).
template <Isa I, class E, NormKind K, bool kScaled, int N = 1, bool kQuads = kSquareQuadsInFloat<E, K, kScaled>>
inline void reduce_spans(const typename E::Storage* const* xs, int64_t n, double p, double scale, long double* out) {
  using V = AccumulatorVector<I>;
  constexpr int kWidth = sizeof(V) / sizeof(double);
  constexpr int kVectors = 4 * kLanes / kWidth;  // 32 accumulators, element j of a step in (j / width, j % width)
  constexpr int64_t kLaneCount = 4 * kLanes;
  constexpr int64_t kStep = kQuads ? 4 * kLaneCount : kLaneCount;  // elements per step
  // A p-norm's blocks are one step long: each lane then adds every term with compensation. Its
  // terms are pow() rounded to double, and 32 of them added plainly per block left fp64 0.5-norms
  // of two 1,024-element gradients up to 2.2 eps off torch's exact answer in 7% of random cases
  // (E5 allows 2). It costs ~15% on p-norms (16 MiB fp32, p = 3: 18.0 -> 21.3 ms, AMD EPYC), which
  // the scalar pow() of each element makes compute-bound anyway.
  constexpr int64_t kBlock = (K == NormKind::kP ? 1 : 32) * kStep;
  constexpr int64_t kLineElements = 64 / sizeof(**xs);
  V lanes[N][kVectors];
  V compensation[N][kVectors];
  for (int s = 0; s < N; ++s) {
    zero(lanes[s]);
    zero(compensation[s]);
  }
  int64_t i = 0;
  while (i + kStep <= n) {
    const int64_t block_end = i + std::min(kBlock, (n - i) / kStep * kStep);
    V block[N][kVectors];
    for (int s = 0; s < N; ++s) zero(block[s]);
    for (; i < block_end; i += kStep) {
      for (int s = 0; s < N; ++s) {  // the spans' steps in turn: each span's own operations, in its own order
        const typename E::Storage* const x = xs[s];
        for (int64_t line = 0; line < kStep; line += kLineElements) prefetch_ahead(x + i + line);
        V loaded[kVectors];
        if constexpr (kQuads) {
          load32_quad_squares_into<I, E>(x + i, kLaneCount, loaded);
          for (int v = 0; v < kVectors; ++v) block[s][v] += loaded[v];
        } else {
          for (int eight = 0; eight < 4; ++eight) load8_into<I, E>(x + i + eight * kLanes, loaded + eight * kLanes / kWidth);
          for (int v = 0; v < kVectors; ++v) {
            if constexpr (kScaled) loaded[v] *= scale;
            block[s][v] = accumulate<K>(block[s][v], loaded[v], p);
          }
        }
      }
    }
    for (int s = 0; s < N; ++s)
      for (int v = 0; v < kVectors; ++v) {
        if constexpr (K == NormKind::kInf) {
          lanes[s][v] = simd::max_magnitude(lanes[s][v], block[s][v]);
        } else {  // Neumaier: keep the low-order bits that the addition drops
          const V sum = lanes[s][v] + block[s][v];
          compensation[s][v] += abs_value(lanes[s][v]) >= abs_value(block[s][v]) ? (lanes[s][v] - sum) + block[s][v]
                                                                                : (block[s][v] - sum) + lanes[s][v];
          lanes[s][v] = sum;
        }
      }
  }
  for (int s = 0; s < N; ++s) {
    const typename E::Storage* const x = xs[s];
    Partial<E, K> result = 0.0;
    for (int64_t t = i; t < n; ++t) {
      const double element = static_cast<double>(E::load(x[t])) * (kScaled ? scale : 1.0);
      if constexpr (K == NormKind::kInf) result = accumulate<K>(result, element, p);
      else result += accumulate<K>(0.0, element, p);  // the element's term, rounded to double as in the lanes
    }
    // Fewer elements than one step: every lane is still 0, and combining 0 into a partial (never
    // negative, or NaN) changes no bit; small tensors skip that loop over 32 lanes.
    if (n >= kStep) {
      if constexpr (std::is_same_v<Partial<E, K>, double> && K != NormKind::kInf) {
        result += sum_of_lanes(lanes[s], compensation[s]);
      } else {
        // A lane that reached inf has a NaN compensation (inf - inf): its sum is inf, and must stay so.
        for (int v = 0; v < kVectors; ++v)
          for (int l = 0; l < kWidth; ++l) {
            if constexpr (K == NormKind::kInf)
              result = combine<K>(result, lanes[s][v][l]);
            else
              result += std::isinf(lanes[s][v][l]) ? lanes[s][v][l]
                                                   : static_cast<Partial<E, K>>(lanes[s][v][l]) + compensation[s][v][l];
          }
      }
    }
    out[s] = result;
    if constexpr (kQuads && std::is_same_v<E, simd::BF16>) {
      // A bf16 square below float's normal range (|x| < 2^-63) is rounded to a multiple of 2^-149,
      // so the quads' sums are off by at most n * 2^-150 (the additions of such tiny terms, all
      // multiples of 2^-149, are exact): negligible (< 2^-26 relative) unless the sum itself is below
      // n * 2^-124. Such spans are summed again in double, exactly as before.
      if (result < static_cast<double>(n) * 0x1p-124) reduce_spans<I, E, K, kScaled, 1, false>(&xs[s], n, p, scale, &out[s]);
    }
  }
}

template <Isa I, class E, NormKind K, bool kScaled>
inline long double reduce_span(const typename E::Storage* x, int64_t n, double p, double scale) {
  long double result;
  reduce_spans<I, E, K, kScaled>(&x, n, p, scale, &result);
  return result;
}

template <Isa I, class E, bool kScaled>
inline long double reduce_by_kind(const void* data, int64_t n, Norm norm, double scale) {
  const auto* x = static_cast<const typename E::Storage*>(data);
  switch (norm.kind) {
    case NormKind::kL2: return reduce_span<I, E, NormKind::kL2, kScaled>(x, n, norm.p, scale);
    case NormKind::kL1: return reduce_span<I, E, NormKind::kL1, kScaled>(x, n, norm.p, scale);
    case NormKind::kInf: return reduce_span<I, E, NormKind::kInf, false>(x, n, norm.p, scale);
    case NormKind::kP: return reduce_span<I, E, NormKind::kP, kScaled>(x, n, norm.p, scale);
  }
  return 0.0;
}

// Reduces n elements of any dtype; scale == 1 is the plain (unscaled) loop.
template <Isa I>
inline long double reduce_by_dtype(DType dtype, const void* x, int64_t n, Norm norm, double scale) {
  const bool scaled = scale != 1.0;
  switch (dtype) {
    case DType::kFloat32: return scaled ? reduce_by_kind<I, simd::F32, true>(x, n, norm, scale) : reduce_by_kind<I, simd::F32, false>(x, n, norm, scale);
    case DType::kFloat64: return scaled ? reduce_by_kind<I, simd::F64, true>(x, n, norm, scale) : reduce_by_kind<I, simd::F64, false>(x, n, norm, scale);
    case DType::kFloat16: return scaled ? reduce_by_kind<I, simd::F16, true>(x, n, norm, scale) : reduce_by_kind<I, simd::F16, false>(x, n, norm, scale);
    case DType::kBFloat16: return scaled ? reduce_by_kind<I, simd::BF16, true>(x, n, norm, scale) : reduce_by_kind<I, simd::BF16, false>(x, n, norm, scale);
  }
  return 0.0;
}

// Spans scale() scales at once (see scale_spans).
constexpr int kScaleStreams = 4;

// One block of four cache lines of scale_spans, each line requested ahead (see prefetch_ahead).
template <Isa I, class E>
inline void scale_block(typename E::Storage* x, typename E::Math c) {
  constexpr int64_t kLineElements = 64 / sizeof(*x);
  constexpr int64_t kBlockElements = 4 * kLineElements;
  for (int64_t line = 0; line < kBlockElements; line += kLineElements) prefetch_ahead(x + line);
#if FASTCLIP_X86_VARIANTS
  if constexpr (I == Isa::kAvx512 && std::is_same_v<E, simd::BF16>) {
    for (int64_t k = 0; k < kBlockElements; k += 4 * kLanes) simd::scale32_bf16_avx512(x + k, c);
    return;
  }
  if constexpr (I == Isa::kAvx512 && std::is_same_v<E, simd::F16>) {
    for (int64_t k = 0; k < kBlockElements; k += 4 * kLanes) simd::scale32_fp16_avx512(x + k, c);
    return;
  }
#endif
  for (int64_t k = 0; k < kBlockElements; k += 2 * kLanes) E::template scale16<I>(x + k, c);
}

// x = E(math(x) * math(coefficient)) over N spans of n elements each (data[0..N)), a block of each
// in turn: a core reads and writes DRAM faster from several sequential streams than from one (an
// in-place float multiply of 1 GiB on 2 Intel Xeon cores: 36-37.5 GB/s from one stream per core,
// 40-41 from two, 44-46 from four), and scaling keeps no accumulators, so any number of spans fits
// in the registers. Every element gets the same operation whatever N, so the same bits. The
// coefficient is converted to the arithmetic type first, as torch converts a 0-dim CPU tensor
// operand to opmath.
template <Isa I, class E, int N = 1>
inline void scale_spans(void* const* data, int64_t n, double coefficient) {
  static_assert(N >= 1);
  typename E::Storage* xs[N];
  for (int s = 0; s < N; ++s) xs[s] = static_cast<typename E::Storage*>(data[s]);
  const auto c = static_cast<typename E::Math>(coefficient);
  constexpr int64_t kBlockElements = 4 * 64 / sizeof(typename E::Storage);
  int64_t i = 0;
  for (; i + kBlockElements <= n; i += kBlockElements)
    for (int s = 0; s < N; ++s) scale_block<I, E>(xs[s] + i, c);
  for (int s = 0; s < N; ++s) {
    typename E::Storage* x = xs[s];
    int64_t j = i;
    for (; j + 2 * kLanes <= n; j += 2 * kLanes) E::template scale16<I>(x + j, c);
    for (; j + kLanes <= n; j += kLanes) E::template store8<I>(x + j, E::template load8<I>(x + j) * c);
    for (; j < n; ++j) x[j] = E::store(E::load(x[j]) * c);
  }
}

template <Isa I, class E>
inline void scale_span(void* data, int64_t n, double coefficient) {
  scale_spans<I, E>(&data, n, coefficient);
}

template <Isa I>
inline void scale_by_dtype(DType dtype, void* x, int64_t n, double c) {
  switch (dtype) {
    case DType::kFloat32: return scale_span<I, simd::F32>(x, n, c);
    case DType::kFloat64: return scale_span<I, simd::F64>(x, n, c);
    case DType::kFloat16: return scale_span<I, simd::F16>(x, n, c);
    case DType::kBFloat16: return scale_span<I, simd::BF16>(x, n, c);
  }
}

// One compiled copy of the hot loops per instruction set.
FASTCLIP_TARGET_GENERIC long double reduce_generic(DType d, const void* x, int64_t n, Norm norm, double s) { return reduce_by_dtype<Isa::kGeneric>(d, x, n, norm, s); }
FASTCLIP_TARGET_GENERIC void scale_generic(DType d, void* x, int64_t n, double c) { scale_by_dtype<Isa::kGeneric>(d, x, n, c); }
#if FASTCLIP_X86_VARIANTS
FASTCLIP_TARGET_AVX2 long double reduce_avx2(DType d, const void* x, int64_t n, Norm norm, double s) { return reduce_by_dtype<Isa::kAvx2>(d, x, n, norm, s); }
FASTCLIP_TARGET_AVX2 void scale_avx2(DType d, void* x, int64_t n, double c) { scale_by_dtype<Isa::kAvx2>(d, x, n, c); }
FASTCLIP_TARGET_AVX512 long double reduce_avx512(DType d, const void* x, int64_t n, Norm norm, double s) { return reduce_by_dtype<Isa::kAvx512>(d, x, n, norm, s); }
FASTCLIP_TARGET_AVX512 void scale_avx512(DType d, void* x, int64_t n, double c) { scale_by_dtype<Isa::kAvx512>(d, x, n, c); }
#endif

// The sum of |scale * x|^p (or the max of |x|) over n elements of x, with the active ISA, in long
// double (see Partial).
long double reduce(DType dtype, const void* x, int64_t n, Norm norm, double scale = 1.0) {
  switch (simd::active_isa()) {
#if FASTCLIP_X86_VARIANTS
    case Isa::kAvx512: return reduce_avx512(dtype, x, n, norm, scale);
    case Isa::kAvx2: return reduce_avx2(dtype, x, n, norm, scale);
#endif
    default: return reduce_generic(dtype, x, n, norm, scale);
  }
}

#if FASTCLIP_X86_VARIANTS
// Two spans of n elements reduced in lockstep, each exactly as reduce() reduces it alone (same
// operations in the same order, its own accumulators): a core reads DRAM faster from two sequential
// streams than from one (a plain float sum of 1 GiB on 2 Intel Xeon cores: 21.5-22.3 GB/s from one
// stream per core, 26.4-26.5 from two; prefetching further ahead did not do it). AVX-512 only, where 32 vector registers hold both
// spans' accumulators (AVX2's 16 do not); the L1 and L2 norms and the max, unscaled.
template <class E>
inline void reduce_pair_by_kind(const void* x0, const void* x1, int64_t n, Norm norm, long double* out) {
  const typename E::Storage* const xs[2] = {static_cast<const typename E::Storage*>(x0), static_cast<const typename E::Storage*>(x1)};
  switch (norm.kind) {
    case NormKind::kL2: return reduce_spans<Isa::kAvx512, E, NormKind::kL2, false, 2>(xs, n, norm.p, 1.0, out);
    case NormKind::kL1: return reduce_spans<Isa::kAvx512, E, NormKind::kL1, false, 2>(xs, n, norm.p, 1.0, out);
    case NormKind::kInf: return reduce_spans<Isa::kAvx512, E, NormKind::kInf, false, 2>(xs, n, norm.p, 1.0, out);
    case NormKind::kP: assert(false && "pairable() excludes the p-norm"); return;
  }
}
FASTCLIP_TARGET_AVX512 void reduce_pair_avx512(DType d, const void* x0, const void* x1, int64_t n, Norm norm, long double* out) {
  switch (d) {
    case DType::kFloat32: return reduce_pair_by_kind<simd::F32>(x0, x1, n, norm, out);
    case DType::kFloat64: return reduce_pair_by_kind<simd::F64>(x0, x1, n, norm, out);
    case DType::kFloat16: return reduce_pair_by_kind<simd::F16>(x0, x1, n, norm, out);
    case DType::kBFloat16: return reduce_pair_by_kind<simd::BF16>(x0, x1, n, norm, out);
  }
}
#endif

#if FASTCLIP_X86_VARIANTS
FASTCLIP_TARGET_AVX512 void scale_group_avx512(DType d, void* const* data, int64_t n, double c) {
  switch (d) {
    case DType::kFloat32: return scale_spans<Isa::kAvx512, simd::F32, kScaleStreams>(data, n, c);
    case DType::kFloat64: return scale_spans<Isa::kAvx512, simd::F64, kScaleStreams>(data, n, c);
    case DType::kFloat16: return scale_spans<Isa::kAvx512, simd::F16, kScaleStreams>(data, n, c);
    case DType::kBFloat16: return scale_spans<Isa::kAvx512, simd::BF16, kScaleStreams>(data, n, c);
  }
}
#endif

// Whether scale_group() serves kScaleStreams spans with the active ISA: AVX-512 only, where the
// streams were measured (AVX2 machines here were AMD EPYC guests, not measured with them).
bool groups_scalable() {
#if FASTCLIP_X86_VARIANTS
  return simd::active_isa() == Isa::kAvx512;
#else
  return false;
#endif
}

// scale_elements() of kScaleStreams spans of n elements of one dtype at once, the same bits; none
// scaled in double. Only called where groups_scalable().
void scale_group(DType dtype, void* const* data, int64_t n, double coefficient) {
#if FASTCLIP_X86_VARIANTS
  scale_group_avx512(dtype, data, n, coefficient);
#else
  (void)dtype, (void)data, (void)n, (void)coefficient;
  assert(false && "scale_group without the x86 variants");
#endif
}

// Whether reduce_pair() serves two spans of this norm with the active ISA (any dtype): where groups
// are scaled, for every norm but the p-norm.
bool pairable(Norm norm) { return groups_scalable() && norm.kind != NormKind::kP; }

// out[k] = reduce(dtype, x_k, n, norm) for k = 0, 1, the same bits. Only called where
// pairable(norm), which is never true without the x86 variants.
void reduce_pair(DType dtype, const void* x0, const void* x1, int64_t n, Norm norm, long double* out) {
#if FASTCLIP_X86_VARIANTS
  reduce_pair_avx512(dtype, x0, x1, n, norm, out);
#else
  (void)dtype, (void)x0, (void)x1, (void)n, (void)norm, (void)out;
  assert(false && "reduce_pair without the x86 variants");
#endif
}

// The same in double arithmetic, for the 0-dim tensors that torch scales in double (TensorView).
template <class E>
inline void scale_span_in_double(void* data, int64_t n, double coefficient) {
  auto* x = static_cast<typename E::Storage*>(data);
  for (int64_t i = 0; i < n; ++i) x[i] = E::store(static_cast<typename E::Math>(static_cast<double>(E::load(x[i])) * coefficient));
}

void scale_elements(const TensorView& t, int64_t begin, int64_t n, double c) {
  void* x = element_address(t, begin);
  if (t.scale_in_double) {  // 0-dim tensors only: no need for a vectorised version
    switch (t.dtype) {
      case DType::kFloat32: return scale_span_in_double<simd::F32>(x, n, c);
      case DType::kFloat16: return scale_span_in_double<simd::F16>(x, n, c);
      case DType::kBFloat16: return scale_span_in_double<simd::BF16>(x, n, c);
      case DType::kFloat64: break;
    }
  }
  switch (simd::active_isa()) {
#if FASTCLIP_X86_VARIANTS
    case Isa::kAvx512: return scale_avx512(t.dtype, x, n, c);
    case Isa::kAvx2: return scale_avx2(t.dtype, x, n, c);
#endif
    default: return scale_generic(t.dtype, x, n, c);
  }
}

// Rounds a float to the precision of a 16-bit dtype (identity for fp32).
float round_to(DType dtype, float v) {
  if (dtype == DType::kFloat16) return fp16_to_float(float_to_fp16(v));
  if (dtype == DType::kBFloat16) return bf16_to_float(float_to_bf16(v));
  return v;
}

// Whether a norm's sum is a double (see Partial), and so is finished by finish_double_norm.
inline bool finishes_in_double(DType dtype, Norm norm) { return dtype != DType::kFloat64 && norm.kind != NormKind::kP; }

// The root step of a norm whose sum is a double (fp32, fp16 and bf16 with the L1, L2 and inf norms:
// their partials are doubles, see Partial), then rounded to the dtype, as torch returns each
// tensor's norm in its own dtype. The square root is taken in double, as torch roots its double
// accumulator; in long double it cost ~3 ns more a tensor (x87's square root), and the extra
// rounding could only move the result off the correctly rounded double's.
double finish_double_norm(double sum, Norm norm, DType dtype) {
  if (sum > std::numeric_limits<float>::max()) sum = std::numeric_limits<double>::infinity();  // see finish_norm
  if (norm.kind == NormKind::kL2) sum = std::sqrt(sum);
  return round_to(dtype, static_cast<float>(sum));
}

// The root step of a p-norm, then rounded to the dtype, as torch returns each tensor's norm in its
// own dtype. For dtypes that torch accumulates in float, a sum beyond float's range becomes inf:
// every term is non-negative, so torch's float sum overflows exactly when the whole sum exceeds
// float's range, and fastclip gives torch's inf there (overflow-safe norms are an explicit option).
// Tiny sums are kept: torch's float sum underflows to 0 where the double sum does not, which only
// brings fastclip closer to the truth (E5). The root of fp64 norms and of other p-norms is taken in
// long double (see Partial); the others are finished in double (finish_double_norm).
double finish_norm(long double accumulated, Norm norm, DType dtype) {
  if (dtype != DType::kFloat64 && accumulated > std::numeric_limits<float>::max())
    accumulated = std::numeric_limits<double>::infinity();
  if (finishes_in_double(dtype, norm)) return finish_double_norm(static_cast<double>(accumulated), norm, dtype);
  double root = static_cast<double>(accumulated);
  if (norm.kind == NormKind::kL2) root = static_cast<double>(std::sqrt(accumulated));
  // In long double (x87's 64-bit mantissa on x86): in double, 1/p itself is rounded, which costs
  // ~ln(sum) ulp of an fp64 result, more than E5's 2 ulp on large sums.
  if (norm.kind == NormKind::kP) root = static_cast<double>(std::pow(accumulated, 1.0L / norm.p));
  return dtype == DType::kFloat64 ? root : round_to(dtype, static_cast<float>(root));
}

// A tensor's running total plus one chunk's partial: the max for kInf, else the sum in long double
// (see Partial).
long double add_partial(long double total, long double partial, Norm norm) {
  if (norm.kind == NormKind::kInf) return max_nan(static_cast<double>(total), static_cast<double>(partial));
  return total + partial;
}

// torch's CPU norm of a one-element tensor is |x| for every p, with no power and root (so no
// overflow of x^p: 1e20 has the norm 1e20, where two such elements give inf, as in finish_norm).
double single_element_norm(const TensorView& t) {
  switch (t.dtype) {
    case DType::kFloat32: return std::abs(static_cast<const float*>(t.data)[0]);
    case DType::kFloat64: return std::abs(static_cast<const double*>(t.data)[0]);
    case DType::kFloat16: return std::abs(fp16_to_float(static_cast<const uint16_t*>(t.data)[0]));
    case DType::kBFloat16: return std::abs(bf16_to_float(static_cast<const uint16_t*>(t.data)[0]));
  }
  return 0.0;
}

// A chunk's share of the overflow-safe norm: sum * (2^exponent)^p, where sum adds |x * 2^-exponent|^p
// and 2^exponent is within a factor 2 of the chunk's largest magnitude. Every scaled element is
// below 2 in magnitude, so no power and no sum can overflow, and the elements that matter (those
// not negligible next to the largest) cannot underflow. A non-finite chunk gets an exponent above
// every finite one, so that inf and NaN survive the combination.
struct ScaledPartial {
  long double sum;  // see Partial
  int exponent;
};

constexpr int kMinScaleExponent = -1022;  // 2^-e must stay a normal double at both ends
constexpr int kMaxScaleExponent = 1022;
constexpr int kNonFiniteExponent = 1023;

ScaledPartial scaled_partial(const TensorView& t, const Chunk& c, Norm norm) {
  const void* x = element_address(t, c.begin);
  const int64_t n = c.end - c.begin;
  // First sweep: the largest magnitude. The second sweep finds the chunk in cache (256 KiB at most).
  const double largest = static_cast<double>(reduce(t.dtype, x, n, {NormKind::kInf, INFINITY}));
  if (norm.kind == NormKind::kInf || largest == 0.0) return {largest, kMinScaleExponent};
  if (!std::isfinite(largest)) return {largest, kNonFiniteExponent};  // inf or NaN: so is the norm
  const int exponent = std::clamp(std::ilogb(largest), kMinScaleExponent, kMaxScaleExponent);
  return {reduce(t.dtype, x, n, norm, std::ldexp(1.0, -exponent)), exponent};
}

// (2^shift)^p for shift <= 0: the factor that brings a partial to the common exponent. Exact for
// the L1 and L2 norms; for other p in long double, where its rounding is negligible (a rounded
// weight per chunk would add up to an ulp to the sum, which a root with p < 1 then magnifies).
// Harmlessly 0 for partials far below the largest.
long double exponent_weight(int shift, Norm norm) {
  if (norm.kind == NormKind::kL2) return std::ldexp(1.0L, 2 * shift);
  if (norm.kind == NormKind::kL1) return std::ldexp(1.0L, shift);
  return std::exp2(static_cast<long double>(norm.p) * shift);
}

}  // namespace

double overflow_safe_norm(const TensorView* tensors, int64_t count, Norm norm, const ParallelFor& parallel_for) {
  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = make_chunks(tensors, count, first_chunk);
  std::vector<ScaledPartial> partials(chunks.size());
  parallel_over_chunks(tensors, count, chunks, parallel_for,
                       [&](int64_t i) { partials[i] = scaled_partial(tensors[chunks[i].tensor], chunks[i], norm); });
  if (norm.kind == NormKind::kInf) {
    double largest = 0.0;
    for (const ScaledPartial& partial : partials) largest = max_nan(largest, static_cast<double>(partial.sum));
    return largest;
  }
  int top = kMinScaleExponent;
  for (const ScaledPartial& partial : partials) top = std::max(top, partial.exponent);
  long double sum = 0.0L;  // in chunk order, like every other sum here; rounded once, below
  for (const ScaledPartial& partial : partials) sum += partial.sum * exponent_weight(partial.exponent - top, norm);
  double root = static_cast<double>(sum);
  if (norm.kind == NormKind::kL2) root = static_cast<double>(std::sqrt(sum));
  if (norm.kind == NormKind::kP) root = static_cast<double>(std::pow(sum, 1.0L / norm.p));
  return std::ldexp(root, top);
}

void tensor_norms(const TensorView* tensors, int64_t count, Norm norm, const ParallelFor& parallel_for,
                  double* norms_out) {
  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = make_chunks(tensors, count, first_chunk);
  std::vector<long double> partials(chunks.size());
  const bool pairs = pairable(norm);
  parallel_over_chunk_groups<2>(tensors, count, chunks, parallel_for, [&](const int64_t* group, int size) {
    const int64_t i = group[0], j = size == 2 ? group[1] : -1;
    const Chunk& c = chunks[i];
    const TensorView& t = tensors[c.tensor];
    // A one-element tensor's norm is single_element_norm's (below); the vector loop's setup would
    // cost more than the element itself.
    if (j >= 0 && pairs && c.end - c.begin == kChunkElements && chunks[j].end - chunks[j].begin == kChunkElements &&
        tensors[chunks[j].tensor].dtype == t.dtype) {
      long double both[2];
      reduce_pair(t.dtype, element_address(t, c.begin), element_address(tensors[chunks[j].tensor], chunks[j].begin),
                  kChunkElements, norm, both);
      partials[i] = both[0];
      partials[j] = both[1];
      return;
    }
    for (const int64_t k : {i, j}) {
      if (k < 0) continue;
      const Chunk& chunk = chunks[k];
      const TensorView& tensor = tensors[chunk.tensor];
      if (tensor.numel != 1) partials[k] = reduce(tensor.dtype, element_address(tensor, chunk.begin), chunk.end - chunk.begin, norm);
    }
  });
  for (int64_t t = 0; t < count; ++t) {
    long double accumulated = 0.0L;
    for (int64_t i = first_chunk[t]; i < first_chunk[t + 1]; ++i) accumulated = add_partial(accumulated, partials[i], norm);
    norms_out[t] = tensors[t].numel == 1 ? single_element_norm(tensors[t]) : finish_norm(accumulated, norm, tensors[t].dtype);
  }
}

double span_norm(DType dtype, const void* x, int64_t n, Norm norm) {
  const TensorView span{const_cast<void*>(x), n, dtype};
  if (n == 1) return single_element_norm(span);
  if (n <= kChunkElements) {  // one partial: the sum itself (0 + partial and max(0, partial) change no bit)
    const long double partial = reduce(dtype, x, n, norm);
    // A double exactly where finish_norm would finish it in double: without the long double steps,
    // a tensor of 33 fp32 elements took 15.8 ns rather than 20.7 (AMD EPYC, in cache).
    if (finishes_in_double(dtype, norm)) return finish_double_norm(static_cast<double>(partial), norm, dtype);
    return finish_norm(partial, norm, dtype);
  }
  long double accumulated = 0.0L;
  for (int64_t begin = 0; begin < n; begin += kChunkElements)
    accumulated = add_partial(accumulated, reduce(dtype, element_address(span, begin), std::min(kChunkElements, n - begin), norm), norm);
  return finish_norm(accumulated, norm, dtype);
}

void span_scale(DType dtype, void* x, int64_t n, double coefficient) {
  scale_elements(TensorView{x, n, dtype}, 0, n, coefficient);
}

double total_norm(const double* tensor_norms, int64_t count, Norm norm, DType total_dtype) {
  if (count == 1) return std::abs(tensor_norms[0]);  // as torch's CPU norm of one element, see above
  if (norm.kind == NormKind::kInf) {
    double largest = 0.0;
    for (int64_t t = 0; t < count; ++t) largest = max_nan(largest, std::abs(tensor_norms[t]));
    return finish_norm(largest, norm, total_dtype);
  }
  long double accumulated = 0.0L;  // see Partial
  for (int64_t t = 0; t < count; ++t) {
    const long double v = std::abs(tensor_norms[t]);
    switch (norm.kind) {
      case NormKind::kL2: accumulated += v * v; break;
      case NormKind::kL1: accumulated += v; break;
      case NormKind::kP: accumulated += std::pow(v, static_cast<long double>(norm.p)); break;
      case NormKind::kInf: break;  // above
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

namespace {

// Scales every chunk of every tensor t by coefficient_of(t) (nothing read or written where it is 1),
// four full chunks of one dtype and one coefficient at a time where groups_scalable() (see
// scale_spans), each other chunk on its own.
template <class CoefficientOf>
void scale_chunks(const TensorView* tensors, int64_t count, const ParallelFor& parallel_for, const CoefficientOf& coefficient_of) {
  std::vector<int64_t> first_chunk;
  const std::vector<Chunk> chunks = make_chunks(tensors, count, first_chunk);
  const bool groups = groups_scalable();
  // Whether chunk i is a full one of `dtype` and `coefficient`, scaled in its own arithmetic:
  // groups take only those.
  const auto groupable = [&](int64_t i, DType dtype, double coefficient) {
    const TensorView& t = tensors[chunks[i].tensor];
    return chunks[i].end - chunks[i].begin == kChunkElements && t.dtype == dtype && !t.scale_in_double &&
           coefficient_of(chunks[i].tensor) == coefficient;
  };
  parallel_over_chunk_groups<kScaleStreams>(tensors, count, chunks, parallel_for, [&](const int64_t* group, int size) {
    const DType dtype = tensors[chunks[group[0]].tensor].dtype;
    const double coefficient = coefficient_of(chunks[group[0]].tensor);
    bool together = groups && size == kScaleStreams && coefficient != 1.0;
    for (int k = 0; k < size && together; ++k) together = groupable(group[k], dtype, coefficient);
    if (together) {
      void* data[kScaleStreams];
      for (int k = 0; k < kScaleStreams; ++k) data[k] = element_address(tensors[chunks[group[k]].tensor], chunks[group[k]].begin);
      return scale_group(dtype, data, kChunkElements, coefficient);
    }
    for (int k = 0; k < size; ++k) {
      const Chunk& c = chunks[group[k]];
      const double chunk_coefficient = coefficient_of(c.tensor);
      if (chunk_coefficient != 1.0) scale_elements(tensors[c.tensor], c.begin, c.end - c.begin, chunk_coefficient);
    }
  });
}

}  // namespace

void scale(const TensorView* tensors, int64_t count, double coefficient, const ParallelFor& parallel_for) {
  if (coefficient == 1.0) return;  // x * 1 == x for every x: skip the read and the write
  scale_chunks(tensors, count, parallel_for, [coefficient](int32_t) { return coefficient; });
}

void scale_each(const TensorView* tensors, int64_t count, const double* coefficients, const ParallelFor& parallel_for) {
  scale_chunks(tensors, count, parallel_for, [coefficients](int32_t t) { return coefficients[t]; });
}

ClipResult clip(const TensorView* tensors, int64_t count, Norm norm, DType total_dtype, double max_norm,
                const ParallelFor& parallel_for, double* norms_out) {
  std::vector<double> norms(count);
  const ClipResult result = clip_with_norms_from(tensors, count, KnownNorms{}, norms.data(), norm, total_dtype, max_norm, parallel_for);
  if (norms_out != nullptr) std::copy(norms.begin(), norms.end(), norms_out);
  return result;
}

namespace {

// scale() of each tensor by the thread that read it (KnownNorms::worker), whole tensors, in
// ascending address order where the list runs mostly downwards (see parallel_over_chunks). A thread
// that is done takes pieces from the back of another's share: the threads that read the tensors did
// not read equal shares (the one that gathered them began late), and on a shared machine they do not
// run at equal speeds either.
void scale_by_worker(const TensorView* tensors, const KnownNorms& known, double coefficient, const ParallelFor& parallel_for) {
  const int workers = known.workers;
  const auto worker_of = [&](int64_t t) { return std::min<int>(known.worker[t], workers - 1); };  // (every tensor has one)
  // The tensors grouped by worker, each group in the order to scale it (a counting sort) ...
  std::vector<int64_t> group_start(workers + 1, 0);
  for (int64_t t = 0; t < known.count; ++t) ++group_start[worker_of(t) + 1];
  for (int w = 0; w < workers; ++w) group_start[w + 1] += group_start[w];
  std::vector<int64_t> order(known.count), next(group_start.begin(), group_start.end() - 1);
  const bool reversed = small_ones_descending(tensors, known.count);
  for (int64_t i = 0; i < known.count; ++i) {
    const int64_t t = reversed ? known.count - 1 - i : i;
    order[next[worker_of(t)]++] = t;
  }
  // ... cut into pieces of about kPieceBytes, which never span two groups: worker w's run of pieces
  // is [run_start[w], run_start[w + 1]), piece p is order[piece_start[p], piece_start[p + 1]).
  constexpr int64_t kPieceBytes = 64 * 1024;
  std::vector<int64_t> piece_start, run_start(workers + 1);
  for (int w = 0; w < workers; ++w) {
    run_start[w] = static_cast<int64_t>(piece_start.size());
    int64_t bytes = kPieceBytes;  // (opens a piece at the group's first tensor)
    for (int64_t i = group_start[w]; i < group_start[w + 1]; ++i) {
      if (bytes >= kPieceBytes) {
        piece_start.push_back(i);
        bytes = 0;
      }
      bytes += tensors[order[i]].numel * static_cast<int64_t>(element_size(tensors[order[i]].dtype));
    }
  }
  run_start[workers] = static_cast<int64_t>(piece_start.size());
  piece_start.push_back(known.count);
  StealingRuns runs(run_start.data(), workers);
  parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w)
      runs.work(static_cast<int>(w), [&](int64_t piece) {
        for (int64_t i = piece_start[piece]; i < piece_start[piece + 1]; ++i)
          scale_elements(tensors[order[i]], 0, tensors[order[i]].numel, coefficient);
      });
  });
}

}  // namespace

ClipResult clip_with_norms_from(const TensorView* tensors, int64_t count, const KnownNorms& known, double* norms, Norm norm,
                                DType total_dtype, double max_norm, const ParallelFor& parallel_for) {
  tensor_norms(tensors + known.count, count - known.count, norm, parallel_for, norms + known.count);
  const double total = total_norm(norms, count, norm, total_dtype);
  const double coefficient = clip_coefficient(total, max_norm, total_dtype);
  if (known.worker == nullptr || known.workers < 1) {
    scale(tensors, count, coefficient, parallel_for);
  } else if (coefficient != 1.0) {  // each part by the threads that read it: the rest over the same chunks as its norms
    scale_by_worker(tensors, known, coefficient, parallel_for);
    scale(tensors + known.count, count - known.count, coefficient, parallel_for);
  }
  return {total, coefficient};
}

}  // namespace fastclip::cpu
