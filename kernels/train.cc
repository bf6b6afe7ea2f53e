#include "kernels/train.h"

#include <cmath>
#include <cstring>
#include <string>

#include "base/strings.h"
#include "kernels/quant.h"

namespace trove {

namespace {

std::string describe(const RecordLayout& l) {
  return str_printf("%s dim %lld, dim_out %lld, width %lld",
                    std::string(dtype_name(l.dtype)).c_str(), static_cast<long long>(l.dim),
                    static_cast<long long>(l.dim_out), static_cast<long long>(l.width));
}

// Names the first non-finite gradient of one row, if any. The common case (all finite) is one
// branch-free pass over the exponent bits, which the compiler vectorizes; only a row that has a
// non-finite value is scanned again to name it.
Status check_row(const char* kind, int64_t expert, int64_t row, const float* g, int64_t n,
                 int64_t element_base) {
  uint32_t non_finite = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &g[i], sizeof bits);
    non_finite |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  if (non_finite == 0) return Status::ok_status();
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(g[i])) {
      return Status::invalid_argument(str_printf(
          "expert %lld: gradient of %s row %lld element %lld (record element %lld) is %g",
          static_cast<long long>(expert), kind, static_cast<long long>(row),
          static_cast<long long>(i), static_cast<long long>(element_base + i),
          static_cast<double>(g[i])));
    }
  }
  return Status::ok_status();
}

}  // namespace

Status check_train_layout(const RecordLayout& training) {
  if (training.dtype != DType::kI8) {
    return Status::invalid_argument(
        "a training record must be int8 (the training view of an "
        "int4 table); got " +
        describe(training));
  }
  const int64_t elements = training.width * (training.dim + training.dim_out);
  if (elements >= (int64_t{1} << kSrRoundShift)) {
    return Status::invalid_argument("training record " + describe(training) +
                                    " has 2^48 or more elements");
  }
  return Status::ok_status();
}

Status check_train_layouts(const RecordLayout& serving, const RecordLayout& training) {
  if (serving.dtype != DType::kI4) {
    return Status::invalid_argument("a serving record for the training view must be int4; got " +
                                    describe(serving));
  }
  TROVE_RETURN_IF_ERROR(check_train_layout(training));
  if (serving.dim != training.dim || serving.dim_out != training.dim_out ||
      serving.width != training.width) {
    return Status::invalid_argument("serving layout " + describe(serving) +
                                    " and training layout " + describe(training) +
                                    " differ in shape");
  }
  return Status::ok_status();
}

Status check_train_step(const TrainStep& step) {
  if (!(step.lr > 0.0f) || !std::isfinite(step.lr)) {
    return Status::invalid_argument(
        str_printf("learning rate must be > 0 and finite (got %g)", static_cast<double>(step.lr)));
  }
  if (step.optimizer == TrainOptimizer::kAdagrad &&
      (!(step.eps > 0.0f) || !std::isfinite(step.eps))) {
    return Status::invalid_argument(
        str_printf("Adagrad eps must be > 0 and finite (got %g)", static_cast<double>(step.eps)));
  }
  if (step.saturation_tolerance < 0 || step.saturation_tolerance > 128) {
    return Status::invalid_argument(str_printf("saturation tolerance must be 0..128 codes (got %d)",
                                               step.saturation_tolerance));
  }
  return Status::ok_status();
}

Status check_train_record(const RecordLayout& l, const TrainStep& step, int64_t expert,
                          const float* down_grad, const float* up_grad, const uint8_t* record,
                          const float* accum) {
  if (expert < 0) {
    return Status::invalid_argument(
        str_printf("expert id must be >= 0 (got %lld)", static_cast<long long>(expert)));
  }
  const int64_t m = l.width;
  for (int64_t r = 0; r < m; ++r) {
    TROVE_RETURN_IF_ERROR(check_row("down", expert, r, down_grad + r * l.dim, l.dim, r * l.dim));
  }
  for (int64_t r = 0; r < m; ++r) {
    TROVE_RETURN_IF_ERROR(
        check_row("up", expert, r, up_grad + r * l.dim_out, l.dim_out, m * l.dim + r * l.dim_out));
  }
  const int64_t scales = m * (quant_groups(l.dim) + quant_groups(l.dim_out));
  for (int64_t s = 0; s < scales; ++s) {
    uint16_t h = 0;
    std::memcpy(&h, record + l.down_scales_offset + 2 * static_cast<size_t>(s), sizeof h);
    if ((h & 0x7c00u) == 0x7c00u) {  // exponent all ones: Inf or NaN
      return Status::corruption(str_printf(
          "expert %lld: scale %lld of the record is 0x%04x (not "
          "finite)",
          static_cast<long long>(expert), static_cast<long long>(s), static_cast<unsigned>(h)));
    }
  }
  if (step.optimizer == TrainOptimizer::kAdagrad) {
    if (accum == nullptr) {
      return Status::invalid_argument("Adagrad needs the row accumulators (got none)");
    }
    for (int64_t r = 0; r < 2 * m; ++r) {
      if (!(accum[r] >= 0.0f) || !std::isfinite(accum[r])) {
        return Status::invalid_argument(
            str_printf("expert %lld: Adagrad accumulator of row %lld is %g (must be finite, >= 0)",
                       static_cast<long long>(expert), static_cast<long long>(r),
                       static_cast<double>(accum[r])));
      }
    }
  }
  return Status::ok_status();
}

}  // namespace trove
