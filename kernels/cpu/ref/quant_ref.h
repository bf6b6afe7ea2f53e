// The oracles: deliberately plain quantizers and dequantizers that every other path (SIMD,
// CUDA) must equal bit for bit on codes and scales. Rules in kernels/quant.h.
#pragma once

#include <cstdint>

#include "kernels/record.h"

namespace trove {

// n elements of x -> quant_groups(n) fp16 scales and codes (int8: 32 bytes per group, int4: 16).
void quantize_row_int8_ref(const float* x, int64_t n, uint16_t* scales, int8_t* codes);
void dequantize_row_int8_ref(const uint16_t* scales, const int8_t* codes, int64_t n, float* y);
void quantize_row_int4_ref(const float* x, int64_t n, uint16_t* scales, uint8_t* codes);
void dequantize_row_int4_ref(const uint16_t* scales, const uint8_t* codes, int64_t n, float* y);

// Float row formats (f32 copies; f16/bf16 round to nearest even).
void convert_row_ref(DType t, const float* x, int64_t n, uint8_t* out);
void unconvert_row_ref(DType t, const uint8_t* in, int64_t n, float* y);

// One expert: `down` is [width][dim], `up` is [width][dim_out], row-major fp32. Writes
// layout.stride bytes (padding zeroed).
void pack_record_ref(const RecordLayout& layout, const float* down, const float* up,
                     uint8_t* record);
void unpack_record_ref(const RecordLayout& layout, const uint8_t* record, float* down, float* up);

}  // namespace trove
