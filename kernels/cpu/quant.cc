// The one dispatch point for CPU quantization: each row function picks the AVX2 kernel or the
// scalar oracle per call (a relaxed atomic load, negligible beside a row), and the record
// functions spread experts over threads. Every path writes the same bytes as the oracle, so
// neither the path nor the thread count changes a result.
#include "kernels/cpu/quant.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#include "kernels/cpu/quant_avx2.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "kernels/quant.h"

namespace trove {

namespace {

std::atomic<CpuPath> g_requested_path{CpuPath::kAuto};

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

bool cpu_has_avx_vnni() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
  return has;
}

bool cpu_has_avx512() {
  static const bool has =
      cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
}

bool use_avx2() {
  return cpu_path_has_avx2(active_cpu_path());
}

// Calls fn(begin, end) over [0, count) in at most `threads` contiguous chunks (0: one per
// hardware thread), the first on the calling thread. A thread that cannot be started has its
// chunk run inline instead: slower, same result.
template <typename Fn>
void for_each_chunk(int64_t count, int threads, const Fn& fn) {
  if (count <= 0) return;
  int64_t workers =
      threads > 0 ? int64_t{threads} : int64_t{std::max(1u, std::thread::hardware_concurrency())};
  workers = std::min(workers, count);
  const int64_t chunk = (count + workers - 1) / workers;
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers));
  for (int64_t begin = chunk; begin < count; begin += chunk) {
    const int64_t end = std::min(count, begin + chunk);
    try {
      pool.emplace_back([&fn, begin, end] { fn(begin, end); });
    } catch (const std::system_error&) {
      fn(begin, end);
    }
  }
  fn(0, std::min(count, chunk));
  for (std::thread& t : pool) t.join();
}

// Per-thread buffer for one row's scales: records need no alignment, so scales are built here
// and copied in (and out) with memcpy.
class ScaleScratch {
 public:
  explicit ScaleScratch(const RecordLayout& l)
      : scales_(static_cast<size_t>(std::max(quant_groups(l.dim), quant_groups(l.dim_out)))) {}
  uint16_t* data() { return scales_.data(); }

 private:
  std::vector<uint16_t> scales_;
};

void pack_row(DType t, const float* x, int64_t n, uint8_t* scales_at, uint8_t* codes_at,
              ScaleScratch& scratch) {
  switch (t) {
    case DType::kI8:
      quantize_row_int8(x, n, scratch.data(), reinterpret_cast<int8_t*>(codes_at));
      break;
    case DType::kI4:
      quantize_row_int4(x, n, scratch.data(), codes_at);
      break;
    case DType::kF16:
      if (use_avx2()) {
        avx2::convert_row_f16(x, n, codes_at);
      } else {
        convert_row_ref(t, x, n, codes_at);
      }
      return;
    case DType::kF32:
    case DType::kBF16:
      convert_row_ref(t, x, n, codes_at);
      return;
  }
  std::memcpy(scales_at, scratch.data(), row_scale_bytes(t, n));
}

void unpack_row(DType t, const uint8_t* scales_at, const uint8_t* codes_at, int64_t n, float* y,
                ScaleScratch& scratch) {
  if (dtype_is_quantized(t)) std::memcpy(scratch.data(), scales_at, row_scale_bytes(t, n));
  switch (t) {
    case DType::kI8:
      dequantize_row_int8(scratch.data(), reinterpret_cast<const int8_t*>(codes_at), n, y);
      return;
    case DType::kI4:
      dequantize_row_int4(scratch.data(), codes_at, n, y);
      return;
    case DType::kF16:
      if (use_avx2()) {
        avx2::unconvert_row_f16(codes_at, n, y);
      } else {
        unconvert_row_ref(t, codes_at, n, y);
      }
      return;
    case DType::kF32:
    case DType::kBF16:
      unconvert_row_ref(t, codes_at, n, y);
      return;
  }
}

}  // namespace

CpuPath active_cpu_path() {
  const CpuPath p = g_requested_path.load(std::memory_order_relaxed);
  if (p != CpuPath::kAuto) return p;
  if (cpu_has_avx512()) return CpuPath::kAvx512;
  if (cpu_has_avx_vnni()) return CpuPath::kAvxVnni;
  return cpu_has_avx2() ? CpuPath::kAvx2 : CpuPath::kScalar;
}

bool cpu_path_supported(CpuPath path) {
  switch (path) {
    case CpuPath::kAuto:
    case CpuPath::kScalar:
      return true;
    case CpuPath::kAvx2:
      return cpu_has_avx2();
    case CpuPath::kAvxVnni:
      return cpu_has_avx_vnni();
    case CpuPath::kAvx512:
      return cpu_has_avx512();
  }
  return false;
}

void set_cpu_path(CpuPath path) {
  TROVE_CHECK_MSG(cpu_path_supported(path), "set_cpu_path(%s) on a CPU without its instructions",
                  cpu_path_name(path));
  g_requested_path.store(path, std::memory_order_relaxed);
}

const char* cpu_path_name(CpuPath path) {
  switch (path) {
    case CpuPath::kAuto:
      return "auto";
    case CpuPath::kScalar:
      return "scalar";
    case CpuPath::kAvx2:
      return "avx2";
    case CpuPath::kAvxVnni:
      return "avxvnni";
    case CpuPath::kAvx512:
      return "avx512";
  }
  return "unknown";
}

void quantize_row_int8(const float* x, int64_t n, uint16_t* scales, int8_t* codes) {
  TROVE_CHECK(n >= 0);
  if (use_avx2()) {
    avx2::quantize_row_int8(x, n, scales, codes);
  } else {
    quantize_row_int8_ref(x, n, scales, codes);
  }
}

void dequantize_row_int8(const uint16_t* scales, const int8_t* codes, int64_t n, float* y) {
  TROVE_CHECK(n >= 0);
  if (use_avx2()) {
    avx2::dequantize_row_int8(scales, codes, n, y);
  } else {
    dequantize_row_int8_ref(scales, codes, n, y);
  }
}

void quantize_row_int4(const float* x, int64_t n, uint16_t* scales, uint8_t* codes) {
  TROVE_CHECK(n >= 0);
  if (use_avx2()) {
    avx2::quantize_row_int4(x, n, scales, codes);
  } else {
    quantize_row_int4_ref(x, n, scales, codes);
  }
}

void dequantize_row_int4(const uint16_t* scales, const uint8_t* codes, int64_t n, float* y) {
  TROVE_CHECK(n >= 0);
  if (use_avx2()) {
    avx2::dequantize_row_int4(scales, codes, n, y);
  } else {
    dequantize_row_int4_ref(scales, codes, n, y);
  }
}

void pack_records(const RecordLayout& layout, const float* down, const float* up, int64_t count,
                  uint8_t* records, int threads) {
  TROVE_CHECK(count >= 0 && layout.stride >= layout.record_bytes);
  const DType t = layout.dtype;
  const size_t down_scale_bytes = row_scale_bytes(t, layout.dim);
  const size_t up_scale_bytes = row_scale_bytes(t, layout.dim_out);
  const int64_t down_floats = layout.width * layout.dim;
  const int64_t up_floats = layout.width * layout.dim_out;
  for_each_chunk(count, threads, [&](int64_t begin, int64_t end) {
    ScaleScratch scratch(layout);
    for (int64_t e = begin; e < end; ++e) {
      uint8_t* record = records + static_cast<size_t>(e) * layout.stride;
      for (int64_t r = 0; r < layout.width; ++r) {
        const auto ur = static_cast<size_t>(r);
        pack_row(t, down + e * down_floats + r * layout.dim, layout.dim,
                 record + layout.down_scales_offset + ur * down_scale_bytes,
                 record + layout.down_codes_offset + ur * layout.down_row_code_bytes, scratch);
        pack_row(t, up + e * up_floats + r * layout.dim_out, layout.dim_out,
                 record + layout.up_scales_offset + ur * up_scale_bytes,
                 record + layout.up_codes_offset + ur * layout.up_row_code_bytes, scratch);
      }
      std::memset(record + layout.record_bytes, 0, layout.stride - layout.record_bytes);
    }
  });
}

void unpack_records(const RecordLayout& layout, const uint8_t* records, int64_t count, float* down,
                    float* up, int threads) {
  TROVE_CHECK(count >= 0 && layout.stride >= layout.record_bytes);
  const DType t = layout.dtype;
  const size_t down_scale_bytes = row_scale_bytes(t, layout.dim);
  const size_t up_scale_bytes = row_scale_bytes(t, layout.dim_out);
  const int64_t down_floats = layout.width * layout.dim;
  const int64_t up_floats = layout.width * layout.dim_out;
  for_each_chunk(count, threads, [&](int64_t begin, int64_t end) {
    ScaleScratch scratch(layout);
    for (int64_t e = begin; e < end; ++e) {
      const uint8_t* record = records + static_cast<size_t>(e) * layout.stride;
      for (int64_t r = 0; r < layout.width; ++r) {
        const auto ur = static_cast<size_t>(r);
        if (down != nullptr) {
          unpack_row(t, record + layout.down_scales_offset + ur * down_scale_bytes,
                     record + layout.down_codes_offset + ur * layout.down_row_code_bytes,
                     layout.dim, down + e * down_floats + r * layout.dim, scratch);
        }
        if (up != nullptr) {
          unpack_row(t, record + layout.up_scales_offset + ur * up_scale_bytes,
                     record + layout.up_codes_offset + ur * layout.up_row_code_bytes,
                     layout.dim_out, up + e * up_floats + r * layout.dim_out, scratch);
        }
      }
    }
  });
}

}  // namespace trove
