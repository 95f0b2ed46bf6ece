// Conversions between float and the 16-bit float formats, without torch headers.
//
// Both round to nearest even, like c10::Half and c10::BFloat16, so a gradient scaled here has the
// same bits as one scaled by torch. The fp16 routines are the branch-free ones of the FP16 library
// (Maratyszcza/FP16, MIT), which c10 also uses; they vectorise.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastclip::cpu {

inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t bits_from_float(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float bf16_to_float(uint16_t h) { return float_from_bits(uint32_t{h} << 16); }

inline uint16_t float_to_bf16(float f) {
  if (f != f) return UINT16_C(0x7FC0);  // quiet NaN, as c10
  const uint32_t bits = bits_from_float(f);
  return static_cast<uint16_t>((bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t w = uint32_t{h} << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const float normalized = float_from_bits((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
  const float denormalized = float_from_bits((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (UINT32_C(1) << 27) ? bits_from_float(denormalized) : bits_from_float(normalized));
  return float_from_bits(result);
}

inline uint16_t float_to_fp16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_from_float(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
  base = float_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = bits_from_float(base);
  const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x7C00)) + (bits & UINT32_C(0x0FFF));
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT16_C(0x7E00) : nonsign));
}

}  // namespace fastclip::cpu
