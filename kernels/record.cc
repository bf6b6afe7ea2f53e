#include "kernels/record.h"

#include <numeric>

#include "base/strings.h"
#include "kernels/quant.h"

namespace trove {

namespace {

// Rows and widths beyond this are nonsense for an expert; with them bounded, one row's bytes
// cannot overflow and the record total is checked below.
constexpr int64_t kMaxExtent = int64_t{1} << 30;

Status check_extent(const char* name, int64_t v) {
  if (v < 1 || v > kMaxExtent) {
    return Status::invalid_argument(str_printf("record %s must be in [1, %lld] (got %lld)", name,
                                               static_cast<long long>(kMaxExtent),
                                               static_cast<long long>(v)));
  }
  return Status::ok_status();
}

}  // namespace

Result<RecordLayout> RecordLayout::make(DType dtype, int64_t dim, int64_t dim_out, int64_t width,
                                        size_t stride_align) {
  TROVE_RETURN_IF_ERROR(check_extent("dim", dim));
  TROVE_RETURN_IF_ERROR(check_extent("dim_out", dim_out));
  TROVE_RETURN_IF_ERROR(check_extent("width", width));
  if (stride_align < 64 || (stride_align & (stride_align - 1)) != 0) {
    return Status::invalid_argument(
        str_printf("record stride_align must be a power of two >= 64 (got %zu)", stride_align));
  }
  const auto m = static_cast<size_t>(width);
  const size_t down_row_scales = row_scale_bytes(dtype, dim);
  const size_t up_row_scales = row_scale_bytes(dtype, dim_out);
  const size_t down_row_codes = row_code_bytes(dtype, dim);
  const size_t up_row_codes = row_code_bytes(dtype, dim_out);
  size_t record_bytes = 0;
  if (__builtin_mul_overflow(m, down_row_scales + up_row_scales + down_row_codes + up_row_codes,
                             &record_bytes) ||
      record_bytes > (size_t{1} << 40)) {
    return Status::invalid_argument(
        str_printf("record of %s, dim %lld, dim_out %lld, width %lld is over the 1 TiB "
                   "limit",
                   std::string(dtype_name(dtype)).c_str(), static_cast<long long>(dim),
                   static_cast<long long>(dim_out), static_cast<long long>(width)));
  }

  RecordLayout l;
  l.dtype = dtype;
  l.dim = dim;
  l.dim_out = dim_out;
  l.width = width;
  l.down_scales_offset = 0;
  l.up_scales_offset = l.down_scales_offset + m * down_row_scales;
  l.down_codes_offset = l.up_scales_offset + m * up_row_scales;
  l.up_codes_offset = l.down_codes_offset + m * down_row_codes;
  l.down_row_code_bytes = down_row_codes;
  l.up_row_code_bytes = up_row_codes;
  l.record_bytes = l.up_codes_offset + m * up_row_codes;
  l.stride = (l.record_bytes + stride_align - 1) & ~(stride_align - 1);
  return l;
}

double RecordLayout::read_amplification(uint64_t align) const {
  TROVE_CHECK(align >= 1 && record_bytes > 0 && stride >= record_bytes);
  // Record i is stored in [i * stride, (i + 1) * stride), and a reader fetches that whole
  // extent (its checksum covers the padding too). Where it falls relative to the
  // alignment depends only on (i * stride) mod align, which repeats every
  // align / gcd(stride, align) records, so the average over one period is the average over
  // an unbounded table. The period is at most align / 64 records for a power-of-two align.
  const uint64_t s = stride;
  const uint64_t period = align / std::gcd(s % align, align);
  uint64_t fetched = 0;
  for (uint64_t i = 0; i < period; ++i) {
    const uint64_t start = (i * s) % align;  // offset within its first aligned block
    const uint64_t end = start + s;
    const uint64_t end_up = (end + align - 1) / align * align;
    fetched += end_up;  // aligned reads cover [0, end_up) relative to rounddown(start)
  }
  return static_cast<double>(fetched) /
         (static_cast<double>(period) * static_cast<double>(record_bytes));
}

}  // namespace trove
