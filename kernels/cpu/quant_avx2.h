// Internal to the CPU quantizers (kernels/cpu/): the group-scale rules, shared by the oracle
// and the AVX2 path so both compute each scale with the same scalar expression, and the AVX2
// entry points that kernels/cpu/quant.cc dispatches to. Plain C++ with no intrinsics, so any
// translation unit may include it; only quant_avx2.cc is compiled for AVX2.
#pragma once

#include <cstdint>

#include "base/half.h"

namespace trove {

namespace quant_internal {

// int8: d = fp16(absmax / 127). absmax >= 0, so d is +0 for an all-zero group.
inline float int8_group_scale_fp32(float absmax) {
  return absmax / 127.0f;
}
inline uint16_t int8_group_scale(float absmax) {
  return fp32_to_fp16(int8_group_scale_fp32(absmax));
}

// int4: d = fp16(m / -8), m the first element of largest magnitude (+0 for an all-zero group,
// which gives d = -0 exactly as ggml's Q4_0 loop does).
inline float int4_group_scale_fp32(float m) {
  return m / -8.0f;
}
inline uint16_t int4_group_scale(float m) {
  return fp32_to_fp16(int4_group_scale_fp32(m));
}

}  // namespace quant_internal

// REQUIRES: the CPU supports AVX2, FMA and F16C (kernels/cpu/quant.cc checks at run time).
// Same contracts as the _ref functions in kernels/cpu/ref/quant_ref.h.
namespace avx2 {

void quantize_row_int8(const float* x, int64_t n, uint16_t* scales, int8_t* codes);
void dequantize_row_int8(const uint16_t* scales, const int8_t* codes, int64_t n, float* y);
void quantize_row_int4(const float* x, int64_t n, uint16_t* scales, uint8_t* codes);
void dequantize_row_int4(const uint16_t* scales, const uint8_t* codes, int64_t n, float* y);
// fp32 <-> fp16 with F16C; round to nearest even, bit-identical to fp32_to_fp16. `out`/`in`
// need no alignment (fp16 values are written little-endian).
void convert_row_f16(const float* x, int64_t n, uint8_t* out);
void unconvert_row_f16(const uint8_t* in, int64_t n, float* y);

}  // namespace avx2

}  // namespace trove
