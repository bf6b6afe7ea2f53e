// The CUDA backend as the rest of trove sees it. This header carries no CUDA types and
// includes no CUDA header, so CPU-only code and a CPU-only build (-DTROVE_CUDA=OFF, where
// these functions are not built) can read it; it is plain C++17 because .cu files include it.
//
// Every function here works on the calling thread's current CUDA device (device 0 unless the
// caller chose another) and reports failures as a Status naming the CUDA call and error; none
// throws or aborts, also when the machine has no driver or no GPU.
#pragma once

#include <cstdint>
#include <string>

#include "base/dtype.h"
#include "base/status.h"

namespace trove {

// Number of CUDA devices; 0 when there is no driver, no device, or the runtime fails to start.
int cuda_device_count();

// The device's marketing name ("NVIDIA H200"). Error when `device` is not in
// [0, cuda_device_count()).
Result<std::string> cuda_device_name(int device);

// Dequantizes `rows` rows of `n` elements each, laid out exactly as the CPU oracles expect
// (kernels/quant.h): row r has quant_groups(n) fp16 scales at scales + r * G and its codes at
// codes + r * G * 32 (int8) or codes + r * G * 16 (int4), G = quant_groups(n); out receives
// rows * n floats, row-major, padding dropped. All pointers are host memory: the data is
// copied to the device, dequantized there and copied back. A testing and validation entry
// point for the CUDA dequantization; the serving path uses the fused kernels instead.
//
// Errors: dtype not int8/int4, negative rows or n, null pointers for a non-empty call, sizes
// that overflow, no CUDA device available, or any CUDA failure (with the call that failed).
Status cuda_dequantize_rows(DType dtype, const uint16_t* scales, const uint8_t* codes, int64_t rows,
                            int64_t n, float* out);

}  // namespace trove
