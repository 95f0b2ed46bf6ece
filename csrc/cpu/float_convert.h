// Conversions between float and the 16-bit float formats, without torch headers.
//
// Both round to nearest even, like c10::Half and c10::BFloat16, so a gradient scaled here has the
// same bits as one scaled by torch. The fp16 routines are the branch-free ones of the FP16 library
// (Maratyszcza/FP16, MIT), which c10 also uses. Each is a template over its integer and float
// types, so the same code serves one element (uint32_t, float) and a SIMD vector of them (GCC/Clang
// vector extensions, where comparisons give lane masks and `?:` selects per lane).
#pragma once

#include <cstdint>
#include <cstring>

namespace fastclip::cpu {

// Reinterprets the bits of a value of the same size (std::bit_cast is C++20).
template <class To, class From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

// U holds the 16-bit pattern in the low half of each 32-bit lane; F is the matching float type.
template <class F, class U>
inline F bf16_bits_to_float(U h) {
  return bit_cast<F>(U(h << 16));
}

template <class U, class F>
inline U float_to_bf16_bits(F f) {
  const U bits = bit_cast<U>(f);
  const U rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  return f != f ? U{} + UINT32_C(0x7FC0) : rounded;  // every NaN becomes c10's quiet NaN
}

template <class F, class U>
inline F fp16_bits_to_float(U h) {
  const U w = h << 16;
  const U sign = w & UINT32_C(0x80000000);
  const U two_w = w + w;
  const F normalized = bit_cast<F>(U((two_w >> 4) + (UINT32_C(0xE0) << 23))) * 0x1.0p-112f;
  const F denormalized = bit_cast<F>(U((two_w >> 17) | (UINT32_C(126) << 23))) - 0.5f;
  return bit_cast<F>(U(sign | (two_w < (UINT32_C(1) << 27) ? bit_cast<U>(denormalized) : bit_cast<U>(normalized))));
}

template <class U, class F>
inline U float_to_fp16_bits(F f) {
  const U w = bit_cast<U>(f);
  const U shl1_w = w + w;
  const U sign = w & UINT32_C(0x80000000);
  F base = (bit_cast<F>(U(w & UINT32_C(0x7FFFFFFF))) * 0x1.0p+112f) * 0x1.0p-110f;
  U bias = shl1_w & UINT32_C(0xFF000000);
  bias = bias < UINT32_C(0x71000000) ? U{} + UINT32_C(0x71000000) : bias;
  base = bit_cast<F>(U((bias >> 1) + UINT32_C(0x07800000))) + base;
  const U bits = bit_cast<U>(base);
  const U nonsign = ((bits >> 13) & UINT32_C(0x7C00)) + (bits & UINT32_C(0x0FFF));
  return (sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? U{} + UINT32_C(0x7E00) : nonsign);
}

inline float bf16_to_float(uint16_t h) { return bf16_bits_to_float<float>(uint32_t{h}); }
inline uint16_t float_to_bf16(float f) { return static_cast<uint16_t>(float_to_bf16_bits<uint32_t>(f)); }
inline float fp16_to_float(uint16_t h) { return fp16_bits_to_float<float>(uint32_t{h}); }
inline uint16_t float_to_fp16(float f) { return static_cast<uint16_t>(float_to_fp16_bits<uint32_t>(f)); }

}  // namespace fastclip::cpu
