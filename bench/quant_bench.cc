// Row quantizers and record packing, timed beside memcpy of the same fp32 bytes: memcpy's GB/s
// is the practical ceiling for a pass that reads every input byte once and writes a smaller
// output. bytes_per_second always counts the fp32 side (input of quantize, output of
// dequantize), so the paths and formats compare directly.
//
//   quant_bench --benchmark_min_time=0.1
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "kernels/quant.h"
#include "kernels/record.h"

namespace trove {
namespace {

constexpr int64_t kRowFloats = int64_t{1} << 20;  // 4 MiB of fp32: beyond L2, near LLC size

// kRef calls the oracle directly; the others go through the dispatching functions.
enum class Path { kRef, kScalar, kAvx2 };

std::vector<float> normal_values(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

// Selects the path for the dispatching functions; false (and the benchmark skipped) when
// the CPU cannot run it.
bool select_path(benchmark::State& state, Path path) {
  set_cpu_path(CpuPath::kAuto);
  if (path == Path::kAvx2) {
    if (!cpu_path_supported(CpuPath::kAvx2)) {
      state.SkipWithError("CPU lacks AVX2/FMA/F16C");
      return false;
    }
    set_cpu_path(CpuPath::kAvx2);
  } else if (path == Path::kScalar) {
    set_cpu_path(CpuPath::kScalar);
  }
  return true;
}

void set_fp32_bytes(benchmark::State& state, int64_t floats) {
  state.SetBytesProcessed(state.iterations() * floats * static_cast<int64_t>(sizeof(float)));
}

void BM_Memcpy(benchmark::State& state) {
  const std::vector<float> src = normal_values(kRowFloats, 1);
  std::vector<float> dst(src.size());
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), src.size() * sizeof(float));
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  set_fp32_bytes(state, kRowFloats);
}
BENCHMARK(BM_Memcpy);

void BM_QuantizeInt8(benchmark::State& state, Path path) {
  if (!select_path(state, path)) return;
  const std::vector<float> x = normal_values(kRowFloats, 2);
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(kRowFloats)));
  std::vector<int8_t> codes(row_code_bytes(DType::kI8, kRowFloats));
  for (auto _ : state) {
    if (path == Path::kRef) {
      quantize_row_int8_ref(x.data(), kRowFloats, scales.data(), codes.data());
    } else {
      quantize_row_int8(x.data(), kRowFloats, scales.data(), codes.data());
    }
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  set_fp32_bytes(state, kRowFloats);
  set_cpu_path(CpuPath::kAuto);
}
BENCHMARK_CAPTURE(BM_QuantizeInt8, ref, Path::kRef);
BENCHMARK_CAPTURE(BM_QuantizeInt8, scalar, Path::kScalar);
BENCHMARK_CAPTURE(BM_QuantizeInt8, avx2, Path::kAvx2);

void BM_DequantizeInt8(benchmark::State& state, Path path) {
  if (!select_path(state, path)) return;
  const std::vector<float> x = normal_values(kRowFloats, 3);
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(kRowFloats)));
  std::vector<int8_t> codes(row_code_bytes(DType::kI8, kRowFloats));
  quantize_row_int8_ref(x.data(), kRowFloats, scales.data(), codes.data());
  std::vector<float> y(x.size());
  for (auto _ : state) {
    if (path == Path::kRef) {
      dequantize_row_int8_ref(scales.data(), codes.data(), kRowFloats, y.data());
    } else {
      dequantize_row_int8(scales.data(), codes.data(), kRowFloats, y.data());
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_fp32_bytes(state, kRowFloats);
  set_cpu_path(CpuPath::kAuto);
}
BENCHMARK_CAPTURE(BM_DequantizeInt8, ref, Path::kRef);
BENCHMARK_CAPTURE(BM_DequantizeInt8, scalar, Path::kScalar);
BENCHMARK_CAPTURE(BM_DequantizeInt8, avx2, Path::kAvx2);

void BM_QuantizeInt4(benchmark::State& state, Path path) {
  if (!select_path(state, path)) return;
  const std::vector<float> x = normal_values(kRowFloats, 4);
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(kRowFloats)));
  std::vector<uint8_t> codes(row_code_bytes(DType::kI4, kRowFloats));
  for (auto _ : state) {
    if (path == Path::kRef) {
      quantize_row_int4_ref(x.data(), kRowFloats, scales.data(), codes.data());
    } else {
      quantize_row_int4(x.data(), kRowFloats, scales.data(), codes.data());
    }
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  set_fp32_bytes(state, kRowFloats);
  set_cpu_path(CpuPath::kAuto);
}
BENCHMARK_CAPTURE(BM_QuantizeInt4, ref, Path::kRef);
BENCHMARK_CAPTURE(BM_QuantizeInt4, scalar, Path::kScalar);
BENCHMARK_CAPTURE(BM_QuantizeInt4, avx2, Path::kAvx2);

void BM_DequantizeInt4(benchmark::State& state, Path path) {
  if (!select_path(state, path)) return;
  const std::vector<float> x = normal_values(kRowFloats, 5);
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(kRowFloats)));
  std::vector<uint8_t> codes(row_code_bytes(DType::kI4, kRowFloats));
  quantize_row_int4_ref(x.data(), kRowFloats, scales.data(), codes.data());
  std::vector<float> y(x.size());
  for (auto _ : state) {
    if (path == Path::kRef) {
      dequantize_row_int4_ref(scales.data(), codes.data(), kRowFloats, y.data());
    } else {
      dequantize_row_int4(scales.data(), codes.data(), kRowFloats, y.data());
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_fp32_bytes(state, kRowFloats);
  set_cpu_path(CpuPath::kAuto);
}
BENCHMARK_CAPTURE(BM_DequantizeInt4, ref, Path::kRef);
BENCHMARK_CAPTURE(BM_DequantizeInt4, scalar, Path::kScalar);
BENCHMARK_CAPTURE(BM_DequantizeInt4, avx2, Path::kAvx2);

// 256 int4 experts of D = D_out = 2048 (4 MiB of fp32 in, 576 KiB of records out) on the
// automatic path; the argument is the thread count (0: one per hardware thread).
// items_per_second is records per second.
constexpr int64_t kPackExperts = 256;
constexpr int64_t kPackDim = 2048;

void BM_PackRecordsInt4D2048(benchmark::State& state) {
  const RecordLayout layout = *RecordLayout::make(DType::kI4, kPackDim, kPackDim);
  const std::vector<float> down = normal_values(kPackExperts * kPackDim, 6);
  const std::vector<float> up = normal_values(kPackExperts * kPackDim, 7);
  std::vector<uint8_t> records(static_cast<size_t>(kPackExperts) * layout.stride);
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
    pack_records(layout, down.data(), up.data(), kPackExperts, records.data(), threads);
    benchmark::DoNotOptimize(records.data());
    benchmark::ClobberMemory();
  }
  set_fp32_bytes(state, 2 * kPackExperts * kPackDim);
  state.SetItemsProcessed(state.iterations() * kPackExperts);
}
BENCHMARK(BM_PackRecordsInt4D2048)->Arg(1)->Arg(0)->UseRealTime();

void BM_UnpackRecordsInt4D2048(benchmark::State& state) {
  const RecordLayout layout = *RecordLayout::make(DType::kI4, kPackDim, kPackDim);
  std::vector<float> down = normal_values(kPackExperts * kPackDim, 8);
  std::vector<float> up = normal_values(kPackExperts * kPackDim, 9);
  std::vector<uint8_t> records(static_cast<size_t>(kPackExperts) * layout.stride);
  pack_records(layout, down.data(), up.data(), kPackExperts, records.data(), 1);
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
    unpack_records(layout, records.data(), kPackExperts, down.data(), up.data(), threads);
    benchmark::DoNotOptimize(down.data());
    benchmark::ClobberMemory();
  }
  set_fp32_bytes(state, 2 * kPackExperts * kPackDim);
  state.SetItemsProcessed(state.iterations() * kPackExperts);
}
BENCHMARK(BM_UnpackRecordsInt4D2048)->Arg(1)->Arg(0)->UseRealTime();

}  // namespace
}  // namespace trove

BENCHMARK_MAIN();
