// Optimized CPU quantization: AVX2 (+F16C/FMA) when the CPU has it, chosen at run time, and a
// portable scalar path otherwise. Bit-identical to kernels/cpu/ref/quant_ref.h.
#pragma once

#include <cstdint>

#include "kernels/record.h"

namespace trove {

enum class CpuPath { kAuto, kScalar, kAvx2 };

// The path kAuto resolves to on this CPU (kAvx2 or kScalar); override for tests and
// benchmarks with set_cpu_path (kAuto restores detection). kAvx2 on a CPU without it is a
// TROVE_CHECK failure.
CpuPath active_cpu_path();
void set_cpu_path(CpuPath path);
const char* cpu_path_name(CpuPath path);

void quantize_row_int8(const float* x, int64_t n, uint16_t* scales, int8_t* codes);
void dequantize_row_int8(const uint16_t* scales, const int8_t* codes, int64_t n, float* y);
void quantize_row_int4(const float* x, int64_t n, uint16_t* scales, uint8_t* codes);
void dequantize_row_int4(const uint16_t* scales, const uint8_t* codes, int64_t n, float* y);

// Records: `down` is [count][width][dim], `up` is [count][width][dim_out]; `records` holds
// count * layout.stride bytes. unpack_records skips `down` or `up` when it is nullptr (to
// decode one table of a record). Threads: 0 means hardware concurrency; results do not depend
// on the thread count.
void pack_records(const RecordLayout& layout, const float* down, const float* up, int64_t count,
                  uint8_t* records, int threads = 0);
void unpack_records(const RecordLayout& layout, const uint8_t* records, int64_t count, float* down,
                    float* up, int threads = 0);

}  // namespace trove
