// SIMD building blocks of fastclip's CPU kernels: fixed-width vector types, per-dtype loads and
// stores of eight elements, and the choice of instruction set. No torch headers.
//
// Vectors are GCC/Clang vector extensions with eight lanes whatever the instruction set: the
// compiler maps an f64x8 onto one AVX-512 register, two AVX2 or four SSE2 ones, and every variant
// does the same operations in the same order, so results are bitwise identical on every machine
// (with -ffp-contract=off, see setup.py). Where GCC's lowering of a conversion is poor, the AVX2 and
// AVX-512 variants use one intrinsic instead; intrinsics are exact conversions, so this changes
// speed, never bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "float_convert.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTCLIP_X86_VARIANTS 1
#include <immintrin.h>
// Marks a function compiled for an x86-64 microarchitecture level (v3: AVX2, FMA, F16C; v4: plus
// AVX-512 F/BW/DQ/VL). `flatten` inlines the whole loop nest, so all of it uses that instruction set.
#define FASTCLIP_TARGET_AVX2 __attribute__((target("arch=x86-64-v3"), flatten))
#define FASTCLIP_TARGET_AVX512 __attribute__((target("arch=x86-64-v4"), flatten))
#else
#define FASTCLIP_X86_VARIANTS 0
#endif
#define FASTCLIP_TARGET_GENERIC __attribute__((flatten))

namespace fastclip::cpu::simd {

// An instruction set with its own compiled copy of the hot loops.
enum class Isa { kGeneric, kAvx2, kAvx512 };

// The best variant this CPU runs, chosen once. FASTCLIP_CPU_CAPABILITY=generic|avx2|avx512 asks for
// a lesser one (for tests and benchmarks, like ATen's ATEN_CPU_CAPABILITY); a variant the CPU
// cannot run is never chosen.
Isa active_isa();
const char* isa_name(Isa isa);

// Makes `isa` (or the best supported variant, if this CPU cannot run it) the active one, for unit
// tests that compare the variants in one process. Returns the variant now active. Not thread-safe.
Isa set_active_isa_for_testing(Isa isa);

constexpr int kLanes = 8;
typedef double f64x8 __attribute__((vector_size(64)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef uint64_t u64x4 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

template <class V, class T>
inline V load_vector(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

template <class V, class T>
inline void store_vector(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

#if FASTCLIP_X86_VARIANTS
// One vcvtps2pd zmm; GCC 12 splits __builtin_convertvector(f32x8 -> f64x8) into halves and
// shuffles, doubling the instructions per cache line, which costs ~40% of the streaming bandwidth.
__attribute__((target("arch=x86-64-v4"))) inline f64x8 widen_avx512(f32x8 v) {
  // The zero-masked form, because the plain one's _mm512_undefined_pd() trips -Wmaybe-uninitialized.
  return reinterpret_cast<f64x8>(_mm512_maskz_cvtps_pd(0xFF, reinterpret_cast<__m256>(v)));
}
// F16C's vcvtph2ps, exact like the bit-twiddling conversion but one instruction.
__attribute__((target("arch=x86-64-v3"))) inline f32x8 fp16_to_float_f16c(u16x8 h) {
  return reinterpret_cast<f32x8>(_mm256_cvtph_ps(reinterpret_cast<__m128i>(h)));
}
typedef int16_t i16x8 __attribute__((vector_size(16)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

// c10 stores every fp16 NaN as its sign and 0x7E00, where F16C's vcvtps2ph (round to nearest even,
// like c10, otherwise) keeps the payload: NaN lanes of a converted vector are replaced. The test is
// made on the 16-bit results (a NaN stays a NaN, sign included), as narrowing a 32-bit lane mask
// costs shuffles; magnitudes are below 2^15, so the signed compare is the unsigned one.
template <class V, class SignedV>
inline V canonical_fp16_nan(V h) {
  const SignedV magnitude = reinterpret_cast<SignedV>(h & UINT16_C(0x7FFF));
  const V nan = (h & UINT16_C(0x8000)) | UINT16_C(0x7E00);
  return reinterpret_cast<V>(magnitude > INT16_C(0x7C00)) ? nan : h;
}
__attribute__((target("arch=x86-64-v3"))) inline u16x8 float_to_fp16_f16c(f32x8 v) {
  const u16x8 rounded = reinterpret_cast<u16x8>(_mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
  return canonical_fp16_nan<u16x8, i16x8>(rounded);
}
// Sixteen at once: two conversions, one NaN fix-up and one store.
__attribute__((target("arch=x86-64-v3"))) inline u16x16 float_to_fp16_f16c(f32x8 low, f32x8 high) {
  const __m128i a = _mm256_cvtps_ph(reinterpret_cast<__m256>(low), _MM_FROUND_TO_NEAREST_INT);
  const __m128i b = _mm256_cvtps_ph(reinterpret_cast<__m256>(high), _MM_FROUND_TO_NEAREST_INT);
  return canonical_fp16_nan<u16x16, i16x16>(reinterpret_cast<u16x16>(_mm256_set_m128i(b, a)));
}
// c10's round-to-nearest-even float -> bf16 (float_to_bf16_bits) on 32-bit lanes, NaN lanes made
// c10's quiet NaN; the result is in the low half of each lane.
__attribute__((target("arch=x86-64-v3"))) inline __m256i float_to_bf16_lanes_avx2(f32x8 v) {
  const __m256i bits = reinterpret_cast<__m256i>(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256 nan = _mm256_cmp_ps(reinterpret_cast<__m256>(v), reinterpret_cast<__m256>(v), _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), reinterpret_cast<__m256i>(nan));
}
// The lanes then narrowed by one pack: GCC lowers the generic u32x8 -> u16x8 conversion to a long
// shuffle sequence, which made scaling a bf16 gradient several times slower than an fp32 one.
// Every lane is below 2^16, so the saturating pack is exact; it packs within 128-bit halves, and
// the permute puts the 64-bit pieces back in element order.
__attribute__((target("arch=x86-64-v3"))) inline u16x8 float_to_bf16_avx2(f32x8 v) {
  const __m256i lanes = float_to_bf16_lanes_avx2(v);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lanes, lanes), 0x08);
  return reinterpret_cast<u16x8>(_mm256_castsi256_si128(packed));
}
// Sixteen bf16 elements times c, in place. The elements are widened by interleaving with zeros
// (bf16 is the high half of a float), which takes elements 0-3 and 8-11 into one vector and 4-7
// and 12-15 into the other; the in-lane pack at the end undoes exactly that order, so no
// cross-lane shuffle is needed in either direction.
__attribute__((target("arch=x86-64-v3"))) inline void scale16_bf16_avx2(uint16_t* p, float c) {
  const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256 low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), packed));
  const __m256 high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), packed));
  const __m256 coefficient = _mm256_set1_ps(c);
  const __m256i low_bits = float_to_bf16_lanes_avx2(reinterpret_cast<f32x8>(_mm256_mul_ps(low, coefficient)));
  const __m256i high_bits = float_to_bf16_lanes_avx2(reinterpret_cast<f32x8>(_mm256_mul_ps(high, coefficient)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(low_bits, high_bits));
}
// Thirty-two elements at once with AVX-512: the same operations on 512-bit registers, which halves
// the instructions per byte. Scaling 16-bit gradients is bound by them, not by memory: one core
// scaled 512 KiB of bf16 in its L2 at 24 GB/s with the sixteen-wide code, fp32 at 117 GB/s (AMD
// EPYC). unpack and pack work within 128-bit lanes, so the order argument of scale16_bf16_avx2
// holds per lane. The zero-masked forms (all lanes kept) because the plain ones start from
// _mm512_undefined_*(), which trips GCC 12's -Wmaybe-uninitialized (see widen_avx512).
__attribute__((target("arch=x86-64-v4"))) inline __m512i float_to_bf16_lanes_avx512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(0xFFFF, bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_maskz_srli_epi32(0xFFFF, _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
}
__attribute__((target("arch=x86-64-v4"))) inline void scale32_bf16_avx512(uint16_t* p, float c) {
  const __m512i packed = _mm512_loadu_si512(p);
  const __m512 low = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), packed));
  const __m512 high = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), packed));
  const __m512 coefficient = _mm512_set1_ps(c);
  const __m512i low_bits = float_to_bf16_lanes_avx512(_mm512_mul_ps(low, coefficient));
  const __m512i high_bits = float_to_bf16_lanes_avx512(_mm512_mul_ps(high, coefficient));
  _mm512_storeu_si512(p, _mm512_packus_epi32(low_bits, high_bits));
}
__attribute__((target("arch=x86-64-v4"))) inline void scale32_fp16_avx512(uint16_t* p, float c) {
  const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i second = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
  const __m512 coefficient = _mm512_set1_ps(c);
  const __m512 low = _mm512_mul_ps(_mm512_maskz_cvtph_ps(0xFFFF, first), coefficient);
  const __m512 high = _mm512_mul_ps(_mm512_maskz_cvtph_ps(0xFFFF, second), coefficient);
  const __m256i a = _mm512_maskz_cvtps_ph(0xFFFF, low, _MM_FROUND_TO_NEAREST_INT);
  const __m256i b = _mm512_maskz_cvtps_ph(0xFFFF, high, _MM_FROUND_TO_NEAREST_INT);
  store_vector(p, canonical_fp16_nan<u16x16, i16x16>(reinterpret_cast<u16x16>(a)));
  store_vector(p + 16, canonical_fp16_nan<u16x16, i16x16>(reinterpret_cast<u16x16>(b)));
}
// bf16 to float is a 16-bit shift: one zero-extension and one shift on AVX2, where GCC's lowering of
// the generic u16x8 -> u32x8 conversion costs several shuffles per eight elements.
__attribute__((target("arch=x86-64-v3"))) inline f32x8 bf16_to_float_avx2(u16x8 h) {
  return reinterpret_cast<f32x8>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(reinterpret_cast<__m128i>(h)), 16));
}
#endif

template <Isa I>
inline f64x8 widen(f32x8 v) {
#if FASTCLIP_X86_VARIANTS
  if constexpr (I == Isa::kAvx512) return widen_avx512(v);
#endif
  return __builtin_convertvector(v, f64x8);
}

// Element types: how stored elements load into their arithmetic type (float, or double for fp64,
// as torch's opmath) and store back, one at a time and eight at a time.
// fp32 and fp64: stored in their own arithmetic type, no conversion.
template <class T, class VectorT>
struct NativeFloat {
  using Storage = T;
  using Math = T;
  using MathX8 = VectorT;
  static T load(T x) { return x; }
  static T store(T v) { return v; }
  template <Isa I>
  static VectorT load8(const T* p) { return load_vector<VectorT>(p); }
  template <Isa I>
  static void store8(T* p, VectorT v) { store_vector(p, v); }
  // Sixteen elements times c, in place (the 16-bit types have faster ways for sixteen than for eight).
  template <Isa I>
  static void scale16(T* p, T c) {
    store8<I>(p, load8<I>(p) * c);
    store8<I>(p + kLanes, load8<I>(p + kLanes) * c);
  }
};
using F32 = NativeFloat<float, f32x8>;
using F64 = NativeFloat<double, f64x8>;

struct F16 {
  using Storage = uint16_t;
  using Math = float;
  using MathX8 = f32x8;
  static float load(uint16_t x) { return fp16_to_float(x); }
  static uint16_t store(float v) { return float_to_fp16(v); }
  template <Isa I>
  static f32x8 load8(const uint16_t* p) {
#if FASTCLIP_X86_VARIANTS
    if constexpr (I != Isa::kGeneric) return fp16_to_float_f16c(load_vector<u16x8>(p));
#endif
    return fp16_bits_to_float<f32x8>(__builtin_convertvector(load_vector<u16x8>(p), u32x8));
  }
  template <Isa I>
  static void store8(uint16_t* p, f32x8 v) {
#if FASTCLIP_X86_VARIANTS
    if constexpr (I != Isa::kGeneric) return store_vector(p, float_to_fp16_f16c(v));
#endif
    store_vector(p, __builtin_convertvector(float_to_fp16_bits<u32x8>(v), u16x8));
  }
  template <Isa I>
  static void scale16(uint16_t* p, float c) {
    const f32x8 low = load8<I>(p) * c;
    const f32x8 high = load8<I>(p + kLanes) * c;
#if FASTCLIP_X86_VARIANTS
    if constexpr (I != Isa::kGeneric) return store_vector(p, float_to_fp16_f16c(low, high));
#endif
    store8<I>(p, low);
    store8<I>(p + kLanes, high);
  }
};

struct BF16 {
  using Storage = uint16_t;
  using Math = float;
  using MathX8 = f32x8;
  static float load(uint16_t x) { return bf16_to_float(x); }
  static uint16_t store(float v) { return float_to_bf16(v); }
  template <Isa I>
  static f32x8 load8(const uint16_t* p) {
#if FASTCLIP_X86_VARIANTS
    if constexpr (I != Isa::kGeneric) return bf16_to_float_avx2(load_vector<u16x8>(p));
#endif
    return bf16_bits_to_float<f32x8>(__builtin_convertvector(load_vector<u16x8>(p), u32x8));
  }
  template <Isa I>
  static void store8(uint16_t* p, f32x8 v) {
#if FASTCLIP_X86_VARIANTS
    if constexpr (I != Isa::kGeneric) return store_vector(p, float_to_bf16_avx2(v));
#endif
    store_vector(p, __builtin_convertvector(float_to_bf16_bits<u32x8>(v), u16x8));
  }
  template <Isa I>
  static void scale16(uint16_t* p, float c) {
#if FASTCLIP_X86_VARIANTS
    if constexpr (I != Isa::kGeneric) return scale16_bf16_avx2(p, c);
#endif
    store8<I>(p, load8<I>(p) * c);
    store8<I>(p + kLanes, load8<I>(p + kLanes) * c);
  }
};

// Eight elements of E widened to double (exactly).
template <Isa I, class E>
inline f64x8 load8_as_double(const typename E::Storage* p) {
  if constexpr (std::is_same_v<typename E::MathX8, f64x8>) return E::template load8<I>(p);
  else return widen<I>(E::template load8<I>(p));
}

#if FASTCLIP_X86_VARIANTS
// Eight floats widened to double as two native AVX2 vectors (lanes 0-3 and 4-7).
__attribute__((target("arch=x86-64-v3"))) inline void widen_halves(f32x8 v, f64x4& low, f64x4& high) {
  const __m256 packed = reinterpret_cast<__m256>(v);
  low = reinterpret_cast<f64x4>(_mm256_cvtps_pd(_mm256_castps256_ps128(packed)));
  high = reinterpret_cast<f64x4>(_mm256_cvtps_pd(_mm256_extractf128_ps(packed, 1)));
}

// Eight elements of E widened to double as two native AVX2 vectors (lanes 0-3 and 4-7). AVX2 code
// on f64x8 is poor: GCC keeps such 64-byte vectors on the stack and moves their halves through
// general registers, which made the AVX2 reduction compute-bound at ~6 GB/s per core.
template <class E>
__attribute__((target("arch=x86-64-v3"))) inline void load8_as_double_halves(const typename E::Storage* p, f64x4& low,
                                                                           f64x4& high) {
  if constexpr (std::is_same_v<typename E::MathX8, f64x8>) {
    low = load_vector<f64x4>(p);
    high = load_vector<f64x4>(p + 4);
  } else {
    widen_halves(E::template load8<Isa::kAvx2>(p), low, high);
  }
}
#endif

#if FASTCLIP_X86_VARIANTS
// Sixteen bf16 elements as floats in one AVX-512 register (the 16-bit shift of bf16_to_float_avx2).
__attribute__((target("arch=x86-64-v4"))) inline __m512 load16_bf16_as_float_avx512(const uint16_t* p) {
  const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, packed), 16));
}

// The squares of sixteen bf16 elements at p, p + stride, p + 2 stride and p + 3 stride added in
// fours in float, (a^2 + b^2) + (c^2 + d^2), and widened to double: lanes 0-7 into `low`, 8-15
// into `high`. Each lane gets the operations of the eight-wide code, so the same bits, with half
// the instructions, by which the bf16 L2 reduction was bound on an Intel Xeon (2 cores, 32-64 MiB
// in cache: 40 -> 51 GB/s; one core, 1 MiB in L2: 22 -> 35 GB/s; from DRAM unchanged). fp16 keeps
// the eight-wide code: its sixteen-wide conversion (vcvtph2ps zmm) made the same loop 5% slower
// in cache there, and it gained nothing from DRAM.
__attribute__((target("arch=x86-64-v4"))) inline void quad_squares16_bf16_avx512(const uint16_t* p, int64_t stride,
                                                                               f64x8& low, f64x8& high) {
  const __m512 a = load16_bf16_as_float_avx512(p);
  const __m512 b = load16_bf16_as_float_avx512(p + stride);
  const __m512 c = load16_bf16_as_float_avx512(p + 2 * stride);
  const __m512 d = load16_bf16_as_float_avx512(p + 3 * stride);
  const __m512 quad =
      _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(a, a), _mm512_mul_ps(b, b)), _mm512_add_ps(_mm512_mul_ps(c, c), _mm512_mul_ps(d, d)));
  low = reinterpret_cast<f64x8>(_mm512_maskz_cvtps_pd(0xFF, _mm512_castps512_ps256(quad)));
  high = reinterpret_cast<f64x8>(_mm512_maskz_cvtps_pd(0xFF, _mm512_maskz_extractf32x8_ps(0xFF, quad, 1)));
}
#endif

// The unsigned-integer vector with the lanes of a double vector (for bit operations on it).
template <class V>
using BitsOf = std::conditional_t<sizeof(V) == sizeof(f64x8), u64x8, u64x4>;

template <class V>
inline V abs_value(V x) { return reinterpret_cast<V>(reinterpret_cast<BitsOf<V>>(x) & UINT64_C(0x7FFFFFFFFFFFFFFF)); }

// The larger magnitude of each lane, NaN winning over everything (torch's inf norm propagates NaN).
// |x| as a bit pattern orders like |x| as a number for non-NaN values, and every NaN's pattern is
// above infinity's; the integer max is one instruction, where GCC does not vectorise the
// floating-point compare-and-select with its NaN test.
template <class V>
inline V max_magnitude(V a, V b) {
  const BitsOf<V> x = reinterpret_cast<BitsOf<V>>(abs_value(a));
  const BitsOf<V> y = reinterpret_cast<BitsOf<V>>(abs_value(b));
  return reinterpret_cast<V>(x > y ? x : y);
}

}  // namespace fastclip::cpu::simd
