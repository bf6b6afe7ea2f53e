// The oracles. Written for obviousness, not speed: one element at a time, exactly the rules
// of kernels/quant.h. The group scales come from the helpers in kernels/cpu/quant_avx2.h,
// which the AVX2 path shares, so the one scalar expression per format is the definition.
#include "kernels/cpu/ref/quant_ref.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "base/half.h"
#include "kernels/cpu/quant_avx2.h"
#include "kernels/quant.h"

namespace trove {

static_assert(std::endian::native == std::endian::little,
              "records hold little-endian fp16 scales and values; a big-endian port must swap");

namespace {

// The group's 32 inputs with the row's zero padding applied.
void load_group(const float* x, int64_t n, int64_t g, float* group) {
  for (int j = 0; j < kQuantGroup; ++j) {
    const int64_t i = g * kQuantGroup + j;
    group[j] = i < n ? x[i] : 0.0f;
  }
}

// rint(v / scale) clamped to [lo, hi]; the caller guarantees scale != 0.
float round_clamp(float v, float scale, float lo, float hi) {
  return std::min(std::max(std::nearbyint(v / scale), lo), hi);
}

}  // namespace

void quantize_row_int8_ref(const float* x, int64_t n, uint16_t* scales, int8_t* codes) {
  for (int64_t g = 0; g < quant_groups(n); ++g) {
    float group[kQuantGroup];
    load_group(x, n, g, group);
    float absmax = 0.0f;
    for (float v : group) absmax = std::max(absmax, std::fabs(v));
    const uint16_t d = quant_internal::int8_group_scale(absmax);
    const float scale = fp16_to_fp32(d);
    scales[g] = d;
    int8_t* q = codes + g * kQuantGroup;
    for (int j = 0; j < kQuantGroup; ++j) {
      q[j] = scale == 0.0f ? 0 : static_cast<int8_t>(round_clamp(group[j], scale, -127.0f, 127.0f));
    }
  }
}

void dequantize_row_int8_ref(const uint16_t* scales, const int8_t* codes, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = static_cast<float>(codes[i]) * fp16_to_fp32(scales[i / kQuantGroup]);
  }
}

void quantize_row_int4_ref(const float* x, int64_t n, uint16_t* scales, uint8_t* codes) {
  constexpr int kHalf = kQuantGroup / 2;
  for (int64_t g = 0; g < quant_groups(n); ++g) {
    float group[kQuantGroup];
    load_group(x, n, g, group);
    float absmax = 0.0f;
    float m = 0.0f;  // first element of largest magnitude (strict > keeps the first on ties)
    for (float v : group) {
      if (std::fabs(v) > absmax) {
        absmax = std::fabs(v);
        m = v;
      }
    }
    const uint16_t d = quant_internal::int4_group_scale(m);
    const float scale = fp16_to_fp32(d);
    scales[g] = d;
    uint8_t stored[kQuantGroup];  // q + 8, in 0..15
    for (int j = 0; j < kQuantGroup; ++j) {
      stored[j] = scale == 0.0f
                      ? 8
                      : static_cast<uint8_t>(
                            static_cast<int>(round_clamp(group[j], scale, -8.0f, 7.0f)) + 8);
    }
    uint8_t* q = codes + g * kHalf;
    for (int j = 0; j < kHalf; ++j) {
      q[j] = static_cast<uint8_t>(stored[j] | (stored[j + kHalf] << 4));
    }
  }
}

void dequantize_row_int4_ref(const uint16_t* scales, const uint8_t* codes, int64_t n, float* y) {
  constexpr int kHalf = kQuantGroup / 2;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = i / kQuantGroup;
    const int j = static_cast<int>(i % kQuantGroup);
    const uint8_t byte = codes[g * kHalf + j % kHalf];
    const int stored = j < kHalf ? (byte & 0x0f) : (byte >> 4);
    y[i] = static_cast<float>(stored - 8) * fp16_to_fp32(scales[g]);
  }
}

void convert_row_ref(DType t, const float* x, int64_t n, uint8_t* out) {
  switch (t) {
    case DType::kF32:
      if (n > 0) std::memcpy(out, x, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kF16:
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = t == DType::kF16 ? fp32_to_fp16(x[i]) : fp32_to_bf16(x[i]);
        std::memcpy(out + 2 * i, &h, sizeof(h));
      }
      return;
    case DType::kI8:
    case DType::kI4:
      break;
  }
  TROVE_CHECK_MSG(false, "convert_row_ref: %s is not a float format",
                  std::string(dtype_name(t)).c_str());
}

void unconvert_row_ref(DType t, const uint8_t* in, int64_t n, float* y) {
  switch (t) {
    case DType::kF32:
      if (n > 0) std::memcpy(y, in, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kF16:
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, in + 2 * i, sizeof(h));
        y[i] = t == DType::kF16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
      }
      return;
    case DType::kI8:
    case DType::kI4:
      break;
  }
  TROVE_CHECK_MSG(false, "unconvert_row_ref: %s is not a float format",
                  std::string(dtype_name(t)).c_str());
}

namespace {

// One row into a record: fp16 scales at `scales_at`, codes (or raw values) at `codes_at`.
// Scales go through a local buffer and memcpy, so the record needs no alignment.
void pack_row_ref(DType t, const float* x, int64_t n, uint8_t* scales_at, uint8_t* codes_at) {
  if (!dtype_is_quantized(t)) {
    convert_row_ref(t, x, n, codes_at);
    return;
  }
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(n)));
  if (t == DType::kI8) {
    quantize_row_int8_ref(x, n, scales.data(), reinterpret_cast<int8_t*>(codes_at));
  } else {
    quantize_row_int4_ref(x, n, scales.data(), codes_at);
  }
  std::memcpy(scales_at, scales.data(), scales.size() * sizeof(uint16_t));
}

void unpack_row_ref(DType t, const uint8_t* scales_at, const uint8_t* codes_at, int64_t n,
                    float* y) {
  if (!dtype_is_quantized(t)) {
    unconvert_row_ref(t, codes_at, n, y);
    return;
  }
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(n)));
  std::memcpy(scales.data(), scales_at, scales.size() * sizeof(uint16_t));
  if (t == DType::kI8) {
    dequantize_row_int8_ref(scales.data(), reinterpret_cast<const int8_t*>(codes_at), n, y);
  } else {
    dequantize_row_int4_ref(scales.data(), codes_at, n, y);
  }
}

}  // namespace

void pack_record_ref(const RecordLayout& layout, const float* down, const float* up,
                     uint8_t* record) {
  const DType t = layout.dtype;
  const size_t down_scale_bytes = row_scale_bytes(t, layout.dim);
  const size_t up_scale_bytes = row_scale_bytes(t, layout.dim_out);
  for (int64_t r = 0; r < layout.width; ++r) {
    const auto ur = static_cast<size_t>(r);
    pack_row_ref(t, down + r * layout.dim, layout.dim,
                 record + layout.down_scales_offset + ur * down_scale_bytes,
                 record + layout.down_codes_offset + ur * layout.down_row_code_bytes);
    pack_row_ref(t, up + r * layout.dim_out, layout.dim_out,
                 record + layout.up_scales_offset + ur * up_scale_bytes,
                 record + layout.up_codes_offset + ur * layout.up_row_code_bytes);
  }
  std::memset(record + layout.record_bytes, 0, layout.stride - layout.record_bytes);
}

void unpack_record_ref(const RecordLayout& layout, const uint8_t* record, float* down, float* up) {
  const DType t = layout.dtype;
  const size_t down_scale_bytes = row_scale_bytes(t, layout.dim);
  const size_t up_scale_bytes = row_scale_bytes(t, layout.dim_out);
  for (int64_t r = 0; r < layout.width; ++r) {
    const auto ur = static_cast<size_t>(r);
    unpack_row_ref(t, record + layout.down_scales_offset + ur * down_scale_bytes,
                   record + layout.down_codes_offset + ur * layout.down_row_code_bytes, layout.dim,
                   down + r * layout.dim);
    unpack_row_ref(t, record + layout.up_scales_offset + ur * up_scale_bytes,
                   record + layout.up_codes_offset + ur * layout.up_row_code_bytes, layout.dim_out,
                   up + r * layout.dim_out);
  }
}

}  // namespace trove
