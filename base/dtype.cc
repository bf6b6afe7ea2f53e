#include "base/dtype.h"

#include <string>

#include "base/strings.h"

namespace trove {

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
    case DType::kI8:
      return "int8";
    case DType::kI4:
      return "int4";
  }
  return "?";
}

Result<DType> parse_dtype(std::string_view name) {
  std::string n(name);
  for (char& c : n) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  if (n == "f32" || n == "fp32" || n == "float32") return DType::kF32;
  if (n == "f16" || n == "fp16" || n == "float16" || n == "half") return DType::kF16;
  if (n == "bf16" || n == "bfloat16") return DType::kBF16;
  if (n == "int8" || n == "i8" || n == "q8" || n == "q8_0") return DType::kI8;
  if (n == "int4" || n == "i4" || n == "q4" || n == "q4_0") return DType::kI4;
  return Status::invalid_argument(
      str_printf("unknown dtype '%s' (expected one of f32, f16, bf16, int8, int4)",
                 std::string(name).c_str()));
}

int dtype_bits(DType t) {
  switch (t) {
    case DType::kF32:
      return 32;
    case DType::kF16:
    case DType::kBF16:
      return 16;
    case DType::kI8:
      return 8;
    case DType::kI4:
      return 4;
  }
  return 0;
}

bool dtype_is_quantized(DType t) {
  return t == DType::kI8 || t == DType::kI4;
}

}  // namespace trove
