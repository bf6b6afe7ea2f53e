// Element types of tensors and records. Names are the ones used in manifests and on the
// command line ("f32", "bf16", "int4", ...); safetensors names ("F32", "BF16") map onto the
// float types.
#pragma once

#include <cstdint>
#include <string_view>

#include "base/status.h"

namespace trove {

enum class DType : uint8_t { kF32, kF16, kBF16, kI8, kI4 };

std::string_view dtype_name(DType t);              // "f32" "f16" "bf16" "int8" "int4"
Result<DType> parse_dtype(std::string_view name);  // also accepts "fp32", "fp16", "i8", "q4"...
// Bits per element of the codes (scales not included): 32, 16, 16, 8, 4.
int dtype_bits(DType t);
bool dtype_is_quantized(DType t);  // int8, int4: group-wise with fp16 scales

}  // namespace trove
