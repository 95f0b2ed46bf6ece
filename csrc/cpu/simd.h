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
// F16C's vcvtps2ph rounds to nearest even like c10 but keeps NaN payloads, where c10 stores every
// NaN as its sign and 0x7E00: NaN lanes are replaced by that.
__attribute__((target("arch=x86-64-v3"))) inline u16x8 float_to_fp16_f16c(f32x8 v) {
  const u16x8 rounded = reinterpret_cast<u16x8>(_mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
  const u16x8 nan = __builtin_convertvector((reinterpret_cast<u32x8>(v) >> 16) & UINT32_C(0x8000), u16x8) | UINT16_C(0x7E00);
  return __builtin_convertvector(v != v, u16x8) ? nan : rounded;
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
  static void store8(uint16_t* p, f32x8 v) { store_vector(p, __builtin_convertvector(float_to_bf16_bits<u32x8>(v), u16x8)); }
};

// Eight elements of E widened to double (exactly).
template <Isa I, class E>
inline f64x8 load8_as_double(const typename E::Storage* p) {
  if constexpr (std::is_same_v<typename E::MathX8, f64x8>) return E::template load8<I>(p);
  else return widen<I>(E::template load8<I>(p));
}

#if FASTCLIP_X86_VARIANTS
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
    const __m256 v = reinterpret_cast<__m256>(E::template load8<Isa::kAvx2>(p));
    low = reinterpret_cast<f64x4>(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    high = reinterpret_cast<f64x4>(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
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
