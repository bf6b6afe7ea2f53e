// fp16 (IEEE binary16) and bf16 conversions done in software, bit-exact and portable: the
// quantizers' oracles use them, so every backend's scales must equal these bits.
// fp32 -> fp16 and fp32 -> bf16 round to nearest, ties to even; NaN stays NaN (quiet);
// overflow goes to infinity as IEEE requires.
#pragma once

#include <bit>
#include <cstdint>

namespace trove {

uint16_t fp32_to_fp16(float f);
float fp16_to_fp32(uint16_t h);

inline uint16_t fp32_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_fp32(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}

// Largest finite fp16 value.
inline constexpr float kFp16Max = 65504.0f;

}  // namespace trove
