#include "kernels/quant.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "base/half.h"
#include "base/strings.h"

namespace trove {

size_t row_code_bytes(DType t, int64_t n) {
  TROVE_CHECK(n >= 0);
  const auto count = static_cast<size_t>(n);
  switch (t) {
    case DType::kF32:
      return count * 4;
    case DType::kF16:
    case DType::kBF16:
      return count * 2;
    case DType::kI8:
      return static_cast<size_t>(quant_groups(n)) * kQuantGroup;
    case DType::kI4:
      return static_cast<size_t>(quant_groups(n)) * (kQuantGroup / 2);
  }
  TROVE_CHECK_MSG(false, "unknown dtype %d", static_cast<int>(t));
}

size_t row_scale_bytes(DType t, int64_t n) {
  TROVE_CHECK(n >= 0);
  return dtype_is_quantized(t) ? static_cast<size_t>(quant_groups(n)) * sizeof(uint16_t) : 0;
}

float quant_max_abs(DType t) {
  switch (t) {
    case DType::kF32:
      return std::numeric_limits<float>::max();
    case DType::kF16:
      return kFp16Max;
    case DType::kBF16:
      return bf16_to_fp32(0x7f7f);  // largest finite bf16, about 3.39e38
    case DType::kI8:
      return kFp16Max * 127.0f;  // 8319008, exact in fp32
    case DType::kI4:
      return kFp16Max * 8.0f;  // 524032
  }
  TROVE_CHECK_MSG(false, "unknown dtype %d", static_cast<int>(t));
}

Status quant_check_range(DType t, const float* x, int64_t n) {
  const float limit = quant_max_abs(t);
  // A branch-free pass the compiler vectorizes; the element-by-element search for the message
  // runs only when something is wrong. NaN fails the comparison too.
  int32_t out_of_range = 0;
  for (int64_t i = 0; i < n; ++i) out_of_range |= !(std::fabs(x[i]) <= limit);
  if (out_of_range == 0) return Status::ok_status();
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    // One comparison on the fast path: NaN fails it as well as an out-of-range value.
    if (std::fabs(v) <= limit) continue;
    if (std::isnan(v)) {
      return Status::out_of_range(str_printf("element %lld is nan", static_cast<long long>(i)));
    }
    if (std::isinf(v)) {
      return Status::out_of_range(
          str_printf("element %lld is %s", static_cast<long long>(i), v > 0 ? "inf" : "-inf"));
    }
    return Status::out_of_range(str_printf(
        "element %lld is %.9g, beyond the %s range (|x| <= %.9g)", static_cast<long long>(i),
        static_cast<double>(v), std::string(dtype_name(t)).c_str(), static_cast<double>(limit)));
  }
  return Status::ok_status();
}

void QuantError::add(const float* x, const float* y, int64_t n) {
  // Four independent partial sums (a fixed summation order, so results do not depend on the
  // machine) that the compiler can keep in vector registers.
  constexpr int kLanes = 4;
  double err_sq[kLanes] = {}, ref_sq[kLanes] = {}, max_err[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double ref = x[i + l];
      const double err = ref - static_cast<double>(y[i + l]);
      err_sq[l] += err * err;
      ref_sq[l] += ref * ref;
      max_err[l] = std::max(max_err[l], std::fabs(err));
    }
  }
  for (; i < n; ++i) {
    const double ref = x[i];
    const double err = ref - static_cast<double>(y[i]);
    err_sq[0] += err * err;
    ref_sq[0] += ref * ref;
    max_err[0] = std::max(max_err[0], std::fabs(err));
  }
  for (int l = 0; l < kLanes; ++l) {
    sum_sq_err += err_sq[l];
    sum_sq_ref += ref_sq[l];
    max_abs = std::max(max_abs, max_err[l]);
  }
  count += n;
}

void QuantError::merge(const QuantError& other) {
  sum_sq_err += other.sum_sq_err;
  sum_sq_ref += other.sum_sq_ref;
  max_abs = std::max(max_abs, other.max_abs);
  count += other.count;
}

double QuantError::rmse() const {
  return count > 0 ? std::sqrt(sum_sq_err / static_cast<double>(count)) : 0.0;
}

double QuantError::rel_fro() const {
  return sum_sq_ref > 0 ? std::sqrt(sum_sq_err / sum_sq_ref) : 0.0;
}

}  // namespace trove
