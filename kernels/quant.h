// Group-wise quantization of rows (SPEC §3), shared by every backend.
//
//   int8: groups of 32, fp16 scale d = fp16(absmax / 127); q = clamp(rint(x / d), -127, 127).
//   int4: groups of 32, fp16 scale d = fp16(m / -8), m the element of largest magnitude (the
//         first one on ties; ggml's Q4_0 rule); q = clamp(rint(x / d), -8, 7), stored as q + 8.
//         Byte j (0..15) of a group holds element j in its low nibble and element j + 16 in
//         its high nibble (ggml's Q4_0 order).
// Here x / d divides by the fp16 scale widened back to fp32 (the value dequantization uses),
// and rint rounds half to even (the default FP mode; what _mm256_round_ps and CUDA's
// __float2int_rn do), so every backend produces the same bits. A group whose scale is 0
// (all zeros, or too small for fp16) gets code 0 (int4: stored 8). Dequantization is
// y = float(q) * float(d), one rounding.
//
// Rows whose length is not a multiple of 32 are padded with zeros to the next multiple: the
// padding quantizes to code 0 and is dropped on dequantization (storage/FORMAT.md).
//
// Inputs must be finite and |x| <= quant_max_abs(dtype) (so the fp16 scale is finite);
// callers check with quant_check_range() and report the tensor and row.
#pragma once

#include <cstddef>
#include <cstdint>

#include "base/dtype.h"
#include "base/status.h"

namespace trove {

inline constexpr int kQuantGroup = 32;

// Number of 32-element groups for a row of n elements (n padded up to a multiple of 32).
inline int64_t quant_groups(int64_t n) {
  return (n + kQuantGroup - 1) / kQuantGroup;
}

// Bytes of codes for a row of n elements: int8 32 per group, int4 16 per group; float types
// n * element size (no padding, no scales).
size_t row_code_bytes(DType t, int64_t n);
// Bytes of fp16 scales for a row of n elements (0 for float types).
size_t row_scale_bytes(DType t, int64_t n);

// Largest |x| whose group scale is finite in fp16: 65504 * 127 for int8, 65504 * 8 for int4,
// and for float types the largest finite value of that type.
float quant_max_abs(DType t);

// OK when every element is finite and within quant_max_abs(t); otherwise an error naming the
// first bad element's index and value ("element 17 is nan").
Status quant_check_range(DType t, const float* x, int64_t n);

// Error statistics of a reconstruction, accumulated over any number of rows.
struct QuantError {
  double sum_sq_err = 0;  // sum (x - y)^2
  double sum_sq_ref = 0;  // sum x^2
  double max_abs = 0;     // max |x - y|
  int64_t count = 0;

  void add(const float* x, const float* y, int64_t n);
  void merge(const QuantError& other);
  double rmse() const;
  double rel_fro() const;  // ||x - y||_F / ||x||_F (0 when x is all zeros)
};

}  // namespace trove
