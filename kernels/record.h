// One expert = one record: its m down rows (length D) and m up rows (length D_out), quantized,
// with their scales (SPEC §3):
//
//   [fp16 scales of down: m * G(D)][fp16 scales of up: m * G(D_out)]
//   [codes of down: m rows][codes of up: m rows][zero padding to the stride]
//
// G(n) = ceil(n / 32) groups per row; codes per row as kernels/quant.h (rows padded to whole
// groups for int8/int4). Float dtypes have no scales: raw down rows then raw up rows. A table
// is N records at a fixed stride: record_bytes rounded up to a multiple of `stride_align`
// (64 by default, so records start cache-line aligned; 512 or 4096 give O_DIRECT reads with
// no read amplification at the cost of padding).
#pragma once

#include <cstddef>
#include <cstdint>

#include "base/dtype.h"
#include "base/status.h"

namespace trove {

struct RecordLayout {
  DType dtype = DType::kF32;
  int64_t dim = 0;      // D, length of a down row
  int64_t dim_out = 0;  // D_out, length of an up row
  int64_t width = 1;    // m, rows of each kind per expert

  size_t down_scales_offset = 0;
  size_t up_scales_offset = 0;
  size_t down_codes_offset = 0;
  size_t up_codes_offset = 0;
  size_t down_row_code_bytes = 0;  // bytes of codes of one down row
  size_t up_row_code_bytes = 0;
  size_t record_bytes = 0;  // useful bytes
  size_t stride = 0;        // record_bytes rounded up to stride_align

  // Errors (naming the value) for dims or width < 1, or stride_align not a power of two >= 64.
  static Result<RecordLayout> make(DType dtype, int64_t dim, int64_t dim_out, int64_t width = 1,
                                   size_t stride_align = 64);

  // Average bytes an aligned reader fetches per record / record_bytes, over all records of a
  // table whose first record starts `align`-aligned (e.g. 4096 for O_DIRECT). The reader
  // fetches each record's whole stored extent (stride bytes: its checksum covers the padding).
  double read_amplification(uint64_t align) const;
};

}  // namespace trove
