// The AVX-512 kernels of the CPU PEER layer: the int8 dot two groups per 512-bit vector with
// VNNI, and the int8/int4 records' float dot and axpy one group per two 512-bit vectors (half the
// instructions of the AVX2 ones: the expert stage on int4 records is bound by them); the other
// float kernels are the AVX2 ones. Only this file is compiled for AVX-512
// (F/BW/VL/VNNI); peer.cc calls it after checking the CPU. Same bits as every path
// (kernels/cpu/peer_kernels.h): lanes 0..7 of the accumulator take the even groups, 8..15 the
// odd ones, as the AVX2 path's two accumulators do.
// GCC 12 reports the intrinsics' own _mm512_undefined_*() operands as uninitialized once
// inlined at -O3 (https://gcc.gnu.org/bugzilla/show_bug.cgi?id=105593, fixed in GCC 13); the
// locations are the header's, so silencing it there leaves this file's own code checked.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstring>

#include "kernels/cpu/peer_kernels.h"
#include "kernels/cpu/quant.h"
#include "kernels/quant.h"

namespace trove::avx512 {

namespace {

constexpr int64_t kHalf = kQuantGroup / 2;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float load_scale(const uint8_t* scales, int64_t g) {
  uint16_t h;
  std::memcpy(&h, scales + 2 * g, sizeof(h));
  return _cvtsh_ss(h);
}

// Groups g and g + 1 of an int4 row as unsigned nibbles: bytes 0..31 are group g's elements
// 0..31, bytes 32..63 group g + 1's.
inline __m512i int4_nibbles_pair(const uint8_t* codes) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i low = _mm256_and_si256(bytes, nibble);                         // [g lo | g+1 lo]
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);  // [g hi | g+1 hi]
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_permute2x128_si256(low, high, 0x20)),
                            _mm256_permute2x128_si256(low, high, 0x31), 1);
}

// The same for one group, in the low 256 bits.
inline __m256i int4_nibbles(const uint8_t* codes) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i nibble = _mm_set1_epi8(0x0f);
  const __m128i low = _mm_and_si128(bytes, nibble);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
  return _mm256_set_m128i(high, low);
}

// One step of the top-k' scan (kernels/cpu/peer.cc's portable_top_indices): element i enters
// when the list is not full or it beats the list's last strictly.
inline void top_step(const float* s, int64_t i, int64_t kp, int64_t* out, int64_t* size) {
  const float v = s[i];
  if (*size == kp && !(v > s[out[kp - 1]])) return;
  int64_t pos = *size < kp ? (*size)++ : kp - 1;
  while (pos > 0 && s[out[pos - 1]] < v) {
    out[pos] = out[pos - 1];
    --pos;
  }
  out[pos] = i;
}

// The AVX2 path's scan, 16 scores at a time.
void top_indices_scan(const float* s, int64_t n, int64_t kp, int64_t* out) {
  int64_t size = 0, i = 0;
  for (; i < n && size < kp; ++i) top_step(s, i, kp, out, &size);
  for (; i + 16 <= n; i += 16) {
    const __m512 threshold = _mm512_set1_ps(s[out[kp - 1]]);
    unsigned mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), threshold, _CMP_GT_OQ);
    for (; mask != 0; mask &= mask - 1) top_step(s, i + __builtin_ctz(mask), kp, out, &size);
  }
  for (; i < n; ++i) top_step(s, i, kp, out, &size);
}

// ---- the float dot and axpy on int8/int4 codes ------------------------------------------------
// A group's 32 codes as two vectors of 16 fp32 code values (scale not applied): elements 0..15
// and 16..31. int4: the low nibbles are elements 0..15, the high ones 16..31.
struct GroupCodes512 {
  __m512 lo, hi;
};

inline GroupCodes512 widen_int8_512(const uint8_t* codes) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16));
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))};
}

// int4 through a 16-entry table: each byte zero-extended to a 32-bit lane, vpermps picks
// table[lane & 15] (the low nibble), then table[lane >> 4] (the high one). Four instructions where
// masking, shifting, unbiasing, widening and converting took ten; the same exact values.
inline GroupCodes512 widen_int4_512(const uint8_t* codes) {
  const __m512 values = _mm512_setr_ps(-8.0f, -7.0f, -6.0f, -5.0f, -4.0f, -3.0f, -2.0f, -1.0f, 0.0f,
                                       1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f);
  const __m512i bytes =
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  return {_mm512_permutexvar_ps(bytes, values),
          _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), values)};
}

// Elements of group g that exist, as the masks of its two 16-lane halves.
inline __mmask16 half_mask(int64_t rest) {
  return rest >= 16 ? static_cast<__mmask16>(0xffff)
                    : static_cast<__mmask16>((1u << (rest > 0 ? rest : 0)) - 1u);
}

// Scales of groups [g, g + count) widened to fp32 (times alpha, rounded as alpha * scale is) in
// out[0..count), count <= 16: one conversion for 16 groups, and each group's broadcast a load.
inline void widen_scales(const uint8_t* scales, int64_t g, int64_t count, float alpha, float* out) {
  const __mmask16 m = half_mask(count);
  const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scales + 2 * g));
  _mm512_storeu_ps(out, _mm512_mul_ps(s, _mm512_set1_ps(alpha)));
}

// Per group: the 32 products summed in fp32 (two 16-lane halves added), times the group's scale
// into one of two accumulators (even and odd groups). A partial last group loads x under a mask
// (nothing past n is read; its padding codes are zero). alpha = 1 in widen_scales is exact.
// R rows against the same x, interleaved: each row's operations are those of R = 1 in the same
// order (the same bits); R chains hide the latency of one.
template <int kBytesPerGroup, GroupCodes512 (*Widen)(const uint8_t*), int R>
void quantized_dots(const peer_internal::CodedRow* rows, int64_t n, const float* x, float* out) {
  const int64_t full = n / kQuantGroup, groups = quant_groups(n);
  __m512 acc[R][2];
  float sc[R][16];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < full; ++g) {
    if (g % 16 == 0) {
      for (int r = 0; r < R; ++r) {
        widen_scales(rows[r].scales, g, std::min<int64_t>(16, groups - g), 1.0f, sc[r]);
      }
    }
    const float* xg = x + g * kQuantGroup;
    const __m512 x_lo = _mm512_loadu_ps(xg), x_hi = _mm512_loadu_ps(xg + 16);
    for (int r = 0; r < R; ++r) {
      const GroupCodes512 c = Widen(rows[r].codes + g * kBytesPerGroup);
      const __m512 s = _mm512_fmadd_ps(c.hi, x_hi, _mm512_mul_ps(c.lo, x_lo));
      acc[r][g & 1] = _mm512_fmadd_ps(s, _mm512_set1_ps(sc[r][g % 16]), acc[r][g & 1]);
    }
  }
  if (const int64_t rest = n - full * kQuantGroup; rest > 0) {
    const float* xg = x + full * kQuantGroup;
    const __m512 x_lo = _mm512_maskz_loadu_ps(half_mask(rest), xg);
    const __m512 x_hi = _mm512_maskz_loadu_ps(half_mask(rest - 16), xg + 16);
    for (int r = 0; r < R; ++r) {
      const GroupCodes512 c = Widen(rows[r].codes + full * kBytesPerGroup);
      const __m512 s = _mm512_fmadd_ps(c.hi, x_hi, _mm512_mul_ps(c.lo, x_lo));
      acc[r][full & 1] =
          _mm512_fmadd_ps(s, _mm512_set1_ps(load_scale(rows[r].scales, full)), acc[r][full & 1]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

template <int kBytesPerGroup, GroupCodes512 (*Widen)(const uint8_t*)>
float quantized_dot(const uint8_t* scales, const uint8_t* codes, int64_t n, const float* x) {
  const peer_internal::CodedRow row = {scales, codes};
  float out;
  quantized_dots<kBytesPerGroup, Widen, 1>(&row, n, x, &out);
  return out;
}

// rows[0..count) in blocks of at most kDotRows.
template <int kBytesPerGroup, GroupCodes512 (*Widen)(const uint8_t*)>
void quantized_dots_any(const peer_internal::CodedRow* rows, int count, int64_t n, const float* x,
                        float* out) {
  static_assert(peer_internal::kDotRows == 4);
  switch (count) {
    case 4:
      return quantized_dots<kBytesPerGroup, Widen, 4>(rows, n, x, out);
    case 3:
      return quantized_dots<kBytesPerGroup, Widen, 3>(rows, n, x, out);
    case 2:
      return quantized_dots<kBytesPerGroup, Widen, 2>(rows, n, x, out);
    default:
      return quantized_dots<kBytesPerGroup, Widen, 1>(rows, n, x, out);
  }
}

// y[i] = fma(code_i, alpha * scale_g, y[i]) element by element: the bits of the AVX2 path. A
// partial last group reads and writes y under a mask.
template <int kBytesPerGroup, GroupCodes512 (*Widen)(const uint8_t*)>
void quantized_axpy(const uint8_t* scales, const uint8_t* codes, int64_t n, float alpha, float* y) {
  const int64_t full = n / kQuantGroup, groups = quant_groups(n);
  float sc[16];
  for (int64_t g = 0; g < full; ++g) {
    if (g % 16 == 0) widen_scales(scales, g, std::min<int64_t>(16, groups - g), alpha, sc);
    const GroupCodes512 c = Widen(codes + g * kBytesPerGroup);
    const __m512 a = _mm512_set1_ps(sc[g % 16]);
    float* yg = y + g * kQuantGroup;
    _mm512_storeu_ps(yg, _mm512_fmadd_ps(c.lo, a, _mm512_loadu_ps(yg)));
    _mm512_storeu_ps(yg + 16, _mm512_fmadd_ps(c.hi, a, _mm512_loadu_ps(yg + 16)));
  }
  if (const int64_t rest = n - full * kQuantGroup; rest > 0) {
    const GroupCodes512 c = Widen(codes + full * kBytesPerGroup);
    const __m512 a = _mm512_set1_ps(alpha * load_scale(scales, full));
    float* yg = y + full * kQuantGroup;
    const __mmask16 m0 = half_mask(rest), m1 = half_mask(rest - 16);
    _mm512_mask_storeu_ps(yg, m0, _mm512_fmadd_ps(c.lo, a, _mm512_maskz_loadu_ps(m0, yg)));
    _mm512_mask_storeu_ps(yg + 16, m1,
                          _mm512_fmadd_ps(c.hi, a, _mm512_maskz_loadu_ps(m1, yg + 16)));
  }
}

// Float records go to the AVX2 kernels.
void coded_dots(DType t, const peer_internal::CodedRow* rows, int count, int64_t n, const float* x,
                float* out) {
  if (t == DType::kI4) return quantized_dots_any<kHalf, widen_int4_512>(rows, count, n, x, out);
  if (t == DType::kI8) {
    return quantized_dots_any<kQuantGroup, widen_int8_512>(rows, count, n, x, out);
  }
  avx2::peer_kernels().coded_dots(t, rows, count, n, x, out);
}

float coded_dot(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n, const float* x) {
  if (t == DType::kI4) return quantized_dot<kHalf, widen_int4_512>(scales, codes, n, x);
  if (t == DType::kI8) return quantized_dot<kQuantGroup, widen_int8_512>(scales, codes, n, x);
  return avx2::peer_kernels().coded_dot(t, scales, codes, n, x);
}

void coded_axpy(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n, float alpha,
                float* y) {
  if (t == DType::kI4) return quantized_axpy<kHalf, widen_int4_512>(scales, codes, n, alpha, y);
  if (t == DType::kI8) {
    return quantized_axpy<kQuantGroup, widen_int8_512>(scales, codes, n, alpha, y);
  }
  avx2::peer_kernels().coded_axpy(t, scales, codes, n, alpha, y);
}

// With kp <= 16 and at least one full vector: a lower bound first, then the scan on the scores
// at or above it only. Lane j's maximum over the full vectors is one score per lane, 16
// distinct scores, so the kp-th largest of them, tau, is at most the kp-th largest score: every
// score of the result is >= tau. The scan (top_step, in index order) over that subset therefore
// selects what it would over all n, ties included (the result is the kp best of any superset of
// itself under score descending, index ascending). On random scores few pass tau, where the
// plain scan inserts ~kp * ln(n / kp) times while its threshold climbs.
void top_indices(const float* s, int64_t n, int64_t kp, int64_t* out) {
  const int64_t full = n / 16 * 16;
  if (kp > 16 || full == 0) return top_indices_scan(s, n, kp, out);
  __m512 lane_max = _mm512_loadu_ps(s);
  // A NaN among the first kp enters the scan's list (it fills unconditionally) and stays: the
  // scan's answer then is not the kp best of the rest, so the scan gives it.
  const unsigned nan_head = _mm512_cmp_ps_mask(lane_max, lane_max, _CMP_UNORD_Q);
  if ((nan_head & ((1u << kp) - 1)) != 0) return top_indices_scan(s, n, kp, out);
  for (int64_t i = 16; i < full; i += 16)
    lane_max = _mm512_max_ps(lane_max, _mm512_loadu_ps(s + i));
  // tau: the lane maximum with fewer than kp lanes above it and at least kp at or above it.
  float m[16];
  _mm512_storeu_ps(m, lane_max);
  float tau = m[0];
  for (int j = 0; j < 16; ++j) {
    const __m512 v = _mm512_set1_ps(m[j]);
    const int above = __builtin_popcount(_mm512_cmp_ps_mask(lane_max, v, _CMP_GT_OQ));
    const int at_or_above = __builtin_popcount(_mm512_cmp_ps_mask(lane_max, v, _CMP_GE_OQ));
    if (above < kp && at_or_above >= kp) tau = m[j];
  }
  float kept[16];
  int64_t size = 0;
  const auto insert = [&](int64_t i) { peer_internal::top_insert(s, i, kp, kept, out, &size); };
  const __m512 bound = _mm512_set1_ps(tau);
  for (int64_t i = 0; i < full; i += 16) {
    unsigned mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), bound, _CMP_GE_OQ);
    for (; mask != 0; mask &= mask - 1) insert(i + __builtin_ctz(mask));
  }
  for (int64_t i = full; i < n; ++i) {
    if (s[i] >= tau) insert(i);
  }
  // Fewer than kp only when NaNs hide the bound (tau a NaN, a row of NaNs): the scan.
  if (size < kp) top_indices_scan(s, n, kp, out);
}

// The lane sums of groups g and g + 1 of an int8/int4 row (lanes 0..7: group g's, 8..15: g + 1's).
inline __m512i int8_lanes_pair(DType t, const uint8_t* codes, int64_t g, __m512i xq,
                               const int32_t* int4_bias) {
  if (t == DType::kI4) {
    return _mm512_dpbusd_epi32(_mm512_loadu_si512(int4_bias + g * 8),
                               int4_nibbles_pair(codes + g * kHalf), xq);
  }
  // |w| * (x_code negated where w < 0) = w * x_code.
  const __m512i w = _mm512_loadu_si512(codes + g * 32);
  const __m512i sx = _mm512_mask_sub_epi8(xq, _mm512_movepi8_mask(w), _mm512_setzero_si512(), xq);
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sx);
}

// R rows against the same activations, interleaved as in quantized_dots: each row's bits are
// those of R = 1. Per row one accumulator: lanes 0..7 take the even groups, 8..15 the odd ones.
template <int R>
void int8_dots_n(DType t, const peer_internal::CodedRow* rows,
                 const peer_internal::Int8Activations& x, float* out) {
  __m512 acc[R];
  // s_g = scale_w[g] * scale_x[g] for 16 groups at a time (the same fp32 products as one by
  // one); a pair's vector (s_g in lanes 0..7, s_g+1 in 8..15) is one permute of them.
  __m512 scales16[R];
  for (int r = 0; r < R; ++r) acc[r] = scales16[r] = _mm512_setzero_ps();
  const __m512i pair_index = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  int64_t g = 0;
  for (; g + 2 <= x.groups; g += 2) {
    if (g % 16 == 0) {
      const __mmask16 m = half_mask(x.groups - g);
      const __m512 sx = _mm512_maskz_loadu_ps(m, x.scales + g);
      for (int r = 0; r < R; ++r) {
        scales16[r] =
            _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, rows[r].scales + 2 * g)), sx);
      }
    }
    const __m512i xq = _mm512_loadu_si512(x.codes + g * 32);
    const __m512i index = _mm512_add_epi32(pair_index, _mm512_set1_epi32(static_cast<int>(g % 16)));
    for (int r = 0; r < R; ++r) {
      const __m512i lanes = int8_lanes_pair(t, rows[r].codes, g, xq, x.int4_bias);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), _mm512_permutexvar_ps(index, scales16[r]),
                               acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 even = _mm512_castps512_ps256(acc[r]);
    const __m256 odd = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1));
    if (g < x.groups) {  // a last, even-numbered group: lanes 0..7 only
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.codes + g * 32));
      const uint8_t* codes = rows[r].codes;
      __m256i lanes;
      if (t == DType::kI4) {
        lanes = _mm256_dpbusd_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.int4_bias + g * 8)),
            int4_nibbles(codes + g * kHalf), xq);
      } else {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 32));
        lanes = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w),
                                    _mm256_sign_epi8(xq, w));
      }
      const float s = load_scale(rows[r].scales, g) * x.scales[g];
      even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(s), even);
    }
    out[r] = horizontal_sum(_mm256_add_ps(even, odd));
  }
}

void int8_dots(DType t, const peer_internal::CodedRow* rows, int count, int64_t n,
               const peer_internal::Int8Activations& x, float* out) {
  (void)n;
  static_assert(peer_internal::kDotRows == 4);
  switch (count) {
    case 4:
      return int8_dots_n<4>(t, rows, x, out);
    case 3:
      return int8_dots_n<3>(t, rows, x, out);
    case 2:
      return int8_dots_n<2>(t, rows, x, out);
    default:
      return int8_dots_n<1>(t, rows, x, out);
  }
}

float int8_dot(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n,
               const peer_internal::Int8Activations& x) {
  const peer_internal::CodedRow row = {scales, codes};
  float out;
  int8_dots(t, &row, 1, n, x, &out);
  return out;
}

// portable_quantize_activations' results (the same bits: the range test is quant_check_range's
// comparison, quantize_row_int8 is shared, the rest is exact) with the range test, the scales'
// widening and the int4 lane sums 16 at a time.
bool quantize_activations(const float* x, int64_t n, int8_t* codes, uint16_t* half_scales,
                          float* scales, int32_t* int4_bias) {
  const __m512 limit = _mm512_set1_ps(quant_max_abs(DType::kI8));
  __mmask16 in_range = 0xffff;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = half_mask(n - i);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i));
    in_range &= _mm512_cmp_ps_mask(a, limit, _CMP_LE_OQ);  // NaN compares false
  }
  if (in_range != 0xffff) return false;
  quantize_row_int8(x, n, half_scales, codes);
  const int64_t groups = quant_groups(n);
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 m = half_mask(groups - g);
    _mm512_mask_storeu_ps(scales + g, m,
                          _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, half_scales + g)));
  }
  // Lane sums of 4 codes: vpdpbusd with unsigned ones against the signed codes. groups * 32
  // codes = groups * 8 lanes, 16 lanes per vector; a last half vector under a mask.
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i minus_eight = _mm512_set1_epi32(-8);
  for (int64_t lane = 0; lane < groups * 8; lane += 16) {
    const __mmask16 m = half_mask(groups * 8 - lane);
    const __m512i q = _mm512_maskz_loadu_epi32(m, codes + 4 * lane);
    const __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, q);
    _mm512_mask_storeu_epi32(int4_bias + lane, m, _mm512_mullo_epi32(sum, minus_eight));
  }
  return true;
}

// int8_products_few for R activation rows: per row of b, R accumulators of 64-byte vpdpbusd
// (the last chunk under a byte mask, zeros adding nothing), each reduced to its sum.
template <int R>
void int8_few_rows(int64_t n, int64_t k, const uint8_t* a, int64_t lda, const int8_t* b,
                   int64_t ldb, const int32_t* b_offsets, int32_t* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* bj = b + j * ldb;
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t kk = 0; kk < k; kk += 64) {
      const __mmask64 m = k - kk >= 64 ? ~__mmask64{0} : (__mmask64{1} << (k - kk)) - 1;
      const __m512i bv = _mm512_maskz_loadu_epi8(m, bj + kk);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_maskz_loadu_epi8(m, a + r * lda + kk), bv);
      }
    }
    for (int r = 0; r < R; ++r) c[r * ldc + j] = _mm512_reduce_add_epi32(acc[r]) - b_offsets[j];
  }
}

void int8_products_few(int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda,
                       const int8_t* b, int64_t ldb, const int32_t* b_offsets, int32_t* c,
                       int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4)
    int8_few_rows<4>(n, k, a + i * lda, lda, b, ldb, b_offsets, c + i * ldc, ldc);
  for (; i < m; ++i) int8_few_rows<1>(n, k, a + i * lda, lda, b, ldb, b_offsets, c + i * ldc, ldc);
}

// gemm_nt_panels: tiles of R rows x P panels (16 columns each) over a block of kKBlock k-steps;
// per step P panel loads, R broadcasts of A and R * P FMAs into accumulators held in registers.
// Across k-blocks an element's chain continues from its value stored in C (fp32 in, fp32 out:
// no rounding added), so each element is the fma chain over k in order from 0 whatever the tile.
// 4 x 4 tiles over 256 k-steps ran a [64, 2048] x [2048, 512] block at 215 GFLOP/s on 2 threads of
// the dev VM's Zen 4, where oneDNN's sgemm gave 133 (199 for 256-row blocks).
constexpr int64_t kKBlock = 256;

template <int R, int P>
void panel_tile(const float* a, int64_t lda, const float* b, int64_t k, int64_t k0, int64_t k1,
                float* c, int64_t ldc, int64_t cols) {
  __m512 acc[R][P];
  for (int p = 0; p < P; ++p) {
    const __mmask16 m = half_mask(cols - 16 * p);
    for (int r = 0; r < R; ++r) {
      acc[r][p] = k0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, c + r * ldc + 16 * p);
    }
  }
  for (int64_t kk = k0; kk < k1; ++kk) {
    __m512 panel[P];
    for (int p = 0; p < P; ++p) panel[p] = _mm512_loadu_ps(b + (p * k + kk) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + kk]);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(av, panel[p], acc[r][p]);
    }
  }
  for (int p = 0; p < P; ++p) {
    const __mmask16 m = half_mask(cols - 16 * p);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(c + r * ldc + 16 * p, m, acc[r][p]);
  }
}

void gemm_nt_panels(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                    const float* b_panels, float* c, int64_t ldc) {
  constexpr int kRows = 4, kPanels = 4;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  const int64_t panels = (n + 15) / 16;
  for (int64_t k0 = 0; k0 < k; k0 += kKBlock) {
    const int64_t k1 = std::min(k, k0 + kKBlock);
    int64_t p0 = 0;
    for (; p0 < panels; p0 += kPanels) {
      const int count = static_cast<int>(std::min<int64_t>(kPanels, panels - p0));
      const float* b = b_panels + p0 * k * 16;
      const int64_t cols = n - p0 * 16;
      int64_t i = 0;
      for (; i + kRows <= m; i += kRows) {
        if (count == kPanels) {
          panel_tile<kRows, kPanels>(a + i * lda, lda, b, k, k0, k1, c + i * ldc + p0 * 16, ldc,
                                     cols);
        } else {
          for (int p = 0; p < count; ++p) {
            panel_tile<kRows, 1>(a + i * lda, lda, b + p * k * 16, k, k0, k1,
                                 c + i * ldc + (p0 + p) * 16, ldc, cols - 16 * p);
          }
        }
      }
      for (; i < m; ++i) {
        if (count == kPanels) {
          panel_tile<1, kPanels>(a + i * lda, lda, b, k, k0, k1, c + i * ldc + p0 * 16, ldc, cols);
        } else {
          for (int p = 0; p < count; ++p) {
            panel_tile<1, 1>(a + i * lda, lda, b + p * k * 16, k, k0, k1,
                             c + i * ldc + (p0 + p) * 16, ldc, cols - 16 * p);
          }
        }
      }
    }
  }
}

// portable_scale_products 16 columns at a time (the same two roundings per element).
void scale_products(const int32_t* acc, int64_t m, int64_t n, const float* scale_a,
                    const float* scale_b, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    const int32_t* a = acc + i * n;
    float* out = c + i * ldc;
    const __m512 sa = _mm512_set1_ps(scale_a[i]);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = half_mask(n - j);
      const __m512 scaled =
          _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(k, a + j)), sa);
      _mm512_mask_storeu_ps(out + j, k,
                            _mm512_mul_ps(scaled, _mm512_maskz_loadu_ps(k, scale_b + j)));
    }
  }
}

}  // namespace

const peer_internal::PeerKernels& peer_kernels() {
  static const peer_internal::PeerKernels kKernels = [] {
    peer_internal::PeerKernels k = avx2::peer_kernels();
    k.coded_dot = coded_dot;
    k.coded_dots = coded_dots;
    k.coded_axpy = coded_axpy;
    k.top_indices = top_indices;
    k.int8_dot = int8_dot;
    k.int8_dots = int8_dots;
    k.quantize_activations = quantize_activations;
    k.scale_products = scale_products;
    k.gemm_nt_panels = gemm_nt_panels;
    k.int8_products_few = int8_products_few;
    return k;
  }();
  return kKernels;
}

}  // namespace trove::avx512
