// Launchers for the group-wise dequantization kernels (kernels/quant.h has the format).
// Device pointers in and out; the work is queued on `stream` and not waited for. Each returns
// the launch error, if any; errors during execution surface at the next synchronization.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "base/status.h"

namespace trove::cuda {

// y[r * n + i] = codes[r][i] * scales[r][i / 32] for rows of n elements in the CPU layout:
// quant_groups(n) fp16 scales per row, 32 int8 codes per group. Padding is dropped.
// REQUIRES: rows >= 0, n >= 0, rows * quant_groups(n) * 32 fits in int64_t.
Status launch_dequantize_int8(const uint16_t* scales, const int8_t* codes, int64_t rows, int64_t n,
                              float* y, cudaStream_t stream);

// As above for int4: 16 bytes per group in ggml Q4_0 order (byte j holds element j in its low
// nibble and element j + 16 in its high nibble), each code stored as q + 8.
Status launch_dequantize_int4(const uint16_t* scales, const uint8_t* codes, int64_t rows, int64_t n,
                              float* y, cudaStream_t stream);

}  // namespace trove::cuda
