// AVX2 quantizers, bit-identical to the oracles in kernels/cpu/ref/quant_ref.cc. Only this
// file is compiled with -mavx2 -mfma -mf16c; kernels/cpu/quant.cc calls it after checking the
// CPU. Why the bits agree:
//   - each group's scale comes from the shared scalar helpers (quant_avx2.h) applied to the
//     same absmax / first largest element, which max and compare find exactly in any order,
//     rounded to fp16 by F16C (round to nearest even: fp32_to_fp16's bits, as convert_row_f16);
//   - x / d is _mm256_div_ps by the widened scale (IEEE division, like the scalar `/`; a
//     multiply by 1/d would round differently), _mm256_round_ps with an explicit
//     round-to-nearest-even (what std::nearbyint does in the default mode), then a clamp;
//   - dequantization is one multiply, float(q) * float(d), as in the oracle.
// Whole groups run from the input; a row's partial last group is copied into a zero-padded
// buffer first, which is the oracle's padding rule.
#include "kernels/cpu/quant_avx2.h"

#include <immintrin.h>

#include <cstring>

#include "kernels/quant.h"

namespace trove::avx2 {

namespace {

constexpr int kHalf = kQuantGroup / 2;

// F16C's conversions, in place of the portable fp32_to_fp16 / fp16_to_fp32 calls.
inline uint16_t to_half(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}

inline __m256 abs_ps(__m256 v) {
  return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
}

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// round(x / d) clamped to [lo, hi], as int32 lanes.
inline __m256i round_clamp(__m256 x, __m256 d, __m256 lo, __m256 hi) {
  const __m256 q =
      _mm256_round_ps(_mm256_div_ps(x, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
}

// Four vectors of 8 int32 in [-128, 127] -> 32 int8 in element order.
inline __m256i pack_32_int8(__m256i q0, __m256i q1, __m256i q2, __m256i q3) {
  // packs works within 128-bit lanes; after both packs the dwords hold elements
  // (0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31); the permute restores order.
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

void quantize_group_int8(const float* x, uint16_t* scale, int8_t* codes) {
  const __m256 v0 = _mm256_loadu_ps(x);
  const __m256 v1 = _mm256_loadu_ps(x + 8);
  const __m256 v2 = _mm256_loadu_ps(x + 16);
  const __m256 v3 = _mm256_loadu_ps(x + 24);
  const __m256 a =
      _mm256_max_ps(_mm256_max_ps(abs_ps(v0), abs_ps(v1)), _mm256_max_ps(abs_ps(v2), abs_ps(v3)));
  const uint16_t d = to_half(quant_internal::int8_group_scale_fp32(horizontal_max(a)));
  const float dw = _cvtsh_ss(d);
  *scale = d;
  if (dw == 0.0f) {
    std::memset(codes, 0, kQuantGroup);
    return;
  }
  const __m256 vd = _mm256_set1_ps(dw);
  const __m256 lo = _mm256_set1_ps(-127.0f);
  const __m256 hi = _mm256_set1_ps(127.0f);
  const __m256i q = pack_32_int8(round_clamp(v0, vd, lo, hi), round_clamp(v1, vd, lo, hi),
                                 round_clamp(v2, vd, lo, hi), round_clamp(v3, vd, lo, hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), q);
}

void quantize_group_int4(const float* x, uint16_t* scale, uint8_t* codes) {
  const __m256 v0 = _mm256_loadu_ps(x);
  const __m256 v1 = _mm256_loadu_ps(x + 8);
  const __m256 v2 = _mm256_loadu_ps(x + 16);
  const __m256 v3 = _mm256_loadu_ps(x + 24);
  const __m256 a0 = abs_ps(v0);
  const __m256 a1 = abs_ps(v1);
  const __m256 a2 = abs_ps(v2);
  const __m256 a3 = abs_ps(v3);
  const float absmax = horizontal_max(_mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3)));
  float m = 0.0f;  // the oracle's starting value, kept for an all-zero group
  if (absmax > 0.0f) {
    // The first element whose magnitude equals the maximum: lowest set bit of a 32-bit mask.
    const __m256 vmax = _mm256_set1_ps(absmax);
    const auto mask_of = [&](__m256 av) {
      return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(av, vmax, _CMP_EQ_OQ)));
    };
    const uint32_t mask =
        mask_of(a0) | (mask_of(a1) << 8) | (mask_of(a2) << 16) | (mask_of(a3) << 24);
    m = x[__builtin_ctz(mask)];
  }
  const uint16_t d = to_half(quant_internal::int4_group_scale_fp32(m));
  const float dw = _cvtsh_ss(d);
  *scale = d;
  if (dw == 0.0f) {
    std::memset(codes, 0x88, kHalf);
    return;
  }
  const __m256 vd = _mm256_set1_ps(dw);
  const __m256 lo = _mm256_set1_ps(-8.0f);
  const __m256 hi = _mm256_set1_ps(7.0f);
  // Codes q + 8 in 0..15, one byte per element in order; then element j and j + 16 share a
  // byte. Shifting 16-bit lanes left by 4 cannot carry between bytes since each is < 16.
  const __m256i eight = _mm256_set1_epi32(8);
  const __m256i q = pack_32_int8(_mm256_add_epi32(round_clamp(v0, vd, lo, hi), eight),
                                 _mm256_add_epi32(round_clamp(v1, vd, lo, hi), eight),
                                 _mm256_add_epi32(round_clamp(v2, vd, lo, hi), eight),
                                 _mm256_add_epi32(round_clamp(v3, vd, lo, hi), eight));
  const __m128i low = _mm256_castsi256_si128(q);
  const __m128i high = _mm256_extracti128_si256(q, 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm_or_si128(low, _mm_slli_epi16(high, 4)));
}

void dequantize_group_int8(uint16_t scale, const int8_t* codes, float* y) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(scale));
  for (int k = 0; k < 4; ++k) {
    const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * k));
    _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), d));
  }
}

void dequantize_group_int4(uint16_t scale, const uint8_t* codes, float* y) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(scale));
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i nibble = _mm_set1_epi8(0x0f);
  const __m128i eight = _mm_set1_epi8(8);
  const __m128i low = _mm_sub_epi8(_mm_and_si128(bytes, nibble), eight);  // elements 0..15
  const __m128i high =
      _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), eight);  // 16..31
  const auto store8 = [&](__m128i q, float* out) {
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
  };
  store8(low, y);
  store8(_mm_srli_si128(low, 8), y + 8);
  store8(high, y + 16);
  store8(_mm_srli_si128(high, 8), y + 24);
}

}  // namespace

void quantize_row_int8(const float* x, int64_t n, uint16_t* scales, int8_t* codes) {
  const int64_t full = n / kQuantGroup;
  for (int64_t g = 0; g < full; ++g) {
    quantize_group_int8(x + g * kQuantGroup, scales + g, codes + g * kQuantGroup);
  }
  if (const int64_t rest = n - full * kQuantGroup; rest > 0) {
    float group[kQuantGroup] = {};
    std::memcpy(group, x + full * kQuantGroup, static_cast<size_t>(rest) * sizeof(float));
    quantize_group_int8(group, scales + full, codes + full * kQuantGroup);
  }
}

void dequantize_row_int8(const uint16_t* scales, const int8_t* codes, int64_t n, float* y) {
  const int64_t full = n / kQuantGroup;
  for (int64_t g = 0; g < full; ++g) {
    dequantize_group_int8(scales[g], codes + g * kQuantGroup, y + g * kQuantGroup);
  }
  if (const int64_t rest = n - full * kQuantGroup; rest > 0) {
    float group[kQuantGroup];
    dequantize_group_int8(scales[full], codes + full * kQuantGroup, group);
    std::memcpy(y + full * kQuantGroup, group, static_cast<size_t>(rest) * sizeof(float));
  }
}

void quantize_row_int4(const float* x, int64_t n, uint16_t* scales, uint8_t* codes) {
  const int64_t full = n / kQuantGroup;
  for (int64_t g = 0; g < full; ++g) {
    quantize_group_int4(x + g * kQuantGroup, scales + g, codes + g * kHalf);
  }
  if (const int64_t rest = n - full * kQuantGroup; rest > 0) {
    float group[kQuantGroup] = {};
    std::memcpy(group, x + full * kQuantGroup, static_cast<size_t>(rest) * sizeof(float));
    quantize_group_int4(group, scales + full, codes + full * kHalf);
  }
}

void dequantize_row_int4(const uint16_t* scales, const uint8_t* codes, int64_t n, float* y) {
  const int64_t full = n / kQuantGroup;
  for (int64_t g = 0; g < full; ++g) {
    dequantize_group_int4(scales[g], codes + g * kHalf, y + g * kQuantGroup);
  }
  if (const int64_t rest = n - full * kQuantGroup; rest > 0) {
    float group[kQuantGroup];
    dequantize_group_int4(scales[full], codes + full * kHalf, group);
    std::memcpy(y + full * kQuantGroup, group, static_cast<size_t>(rest) * sizeof(float));
  }
}

void convert_row_f16(const float* x, int64_t n, uint8_t* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), h);
  }
  for (; i < n; ++i) {
    const uint16_t h = fp32_to_fp16(x[i]);
    std::memcpy(out + 2 * i, &h, sizeof(h));
  }
}

void unconvert_row_f16(const uint8_t* in, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i));
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, sizeof(h));
    y[i] = fp16_to_fp32(h);
  }
}

}  // namespace trove::avx2
