// Optimized CPU quantization: AVX2 (+F16C/FMA) when the CPU has it, chosen at run time, and a
// portable scalar path otherwise. Bit-identical to kernels/cpu/ref/quant_ref.h.
#pragma once

#include <cstdint>

#include "kernels/record.h"

namespace trove {

// The instruction sets the CPU kernels dispatch on. Each level above kScalar includes AVX2 +
// FMA + F16C; kAvxVnni adds AVX-VNNI (VEX int8 dot products, 256-bit), kAvx512 AVX-512
// F/BW/VL/VNNI. Quantization and the training update use AVX2 on every level above kScalar; the
// PEER expert kernels (kernels/cpu/peer.h) use each level's own instructions.
enum class CpuPath { kAuto, kScalar, kAvx2, kAvxVnni, kAvx512 };

// The path kAuto resolves to on this CPU: the highest level it supports (kAvx512 over kAvxVnni:
// CPUs with AVX-512 VNNI but without AVX-VNNI exist, and the 512-bit one is wider); override
// for tests and benchmarks with set_cpu_path (kAuto restores detection). A path the CPU does not
// support is a TROVE_CHECK failure.
CpuPath active_cpu_path();
void set_cpu_path(CpuPath path);
const char* cpu_path_name(CpuPath path);
// Whether this CPU can run `path` (kAuto and kScalar: always).
bool cpu_path_supported(CpuPath path);
// Whether `path` (not kAuto) runs AVX2 code.
inline bool cpu_path_has_avx2(CpuPath path) {
  return path == CpuPath::kAvx2 || path == CpuPath::kAvxVnni || path == CpuPath::kAvx512;
}

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
