// AVX2/FMA/F16C inner loops of the CPU PEER layer, straight on record codes. Only this file is
// compiled with -mavx2 -mfma -mf16c; kernels/cpu/peer.cc calls it after checking the CPU.
//
// int8/int4: a group's 32 codes are widened to 4 x 8 fp32 lanes (int4: the low nibbles give
// elements 0..15 and the high nibbles 16..31, so both halves unpack as contiguous vectors),
// multiplied with x and summed in fp32; the group's sum is then scaled by its fp16 scale into
// one of two running accumulators (even and odd groups, to halve the dependency chain). A
// partial last group runs on a zero-padded copy of x (dot) or of y (axpy), so nothing past n
// is read or written; its padding codes are zero and add nothing.
#include "kernels/cpu/peer_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/quant.h"

namespace trove::avx2 {

namespace {

using peer_internal::PeerKernels;

constexpr int kHalf = kQuantGroup / 2;

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

// The 32 codes of one group as four vectors of fp32 (code values, scale not applied).
struct GroupCodes {
  __m256 v[4];
};

inline GroupCodes widen_int8(const uint8_t* codes) {
  GroupCodes g;
  for (int k = 0; k < 4; ++k) {
    const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * k));
    g.v[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
  }
  return g;
}

inline GroupCodes widen_int4(const uint8_t* codes) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i nibble = _mm_set1_epi8(0x0f);
  const __m128i eight = _mm_set1_epi8(8);
  const __m128i low = _mm_sub_epi8(_mm_and_si128(bytes, nibble), eight);
  const __m128i high = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), eight);
  GroupCodes g;
  g.v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(low));
  g.v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8)));
  g.v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(high));
  g.v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8)));
  return g;
}

inline __m256 group_dot(const GroupCodes& c, const float* x) {
  const __m256 p =
      _mm256_fmadd_ps(c.v[1], _mm256_loadu_ps(x + 8), _mm256_mul_ps(c.v[0], _mm256_loadu_ps(x)));
  const __m256 q = _mm256_fmadd_ps(c.v[3], _mm256_loadu_ps(x + 24),
                                   _mm256_mul_ps(c.v[2], _mm256_loadu_ps(x + 16)));
  return _mm256_add_ps(p, q);
}

inline void group_axpy(const GroupCodes& c, __m256 alpha_d, float* y) {
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(y + 8 * k, _mm256_fmadd_ps(c.v[k], alpha_d, _mm256_loadu_ps(y + 8 * k)));
  }
}

// Widen(codes of group g) -> GroupCodes, for int8 (32 bytes a group) or int4 (16).
template <int kBytesPerGroup, GroupCodes (*Widen)(const uint8_t*)>
float quantized_dot(const uint8_t* scales, const uint8_t* codes, int64_t n, const float* x) {
  const int64_t full = n / kQuantGroup;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < full; ++g) {
    const __m256 s = group_dot(Widen(codes + g * kBytesPerGroup), x + g * kQuantGroup);
    acc[g & 1] = _mm256_fmadd_ps(s, _mm256_set1_ps(load_scale(scales, g)), acc[g & 1]);
  }
  if (const int64_t rest = n - full * kQuantGroup; rest > 0) {
    float padded[kQuantGroup] = {};
    std::memcpy(padded, x + full * kQuantGroup, static_cast<size_t>(rest) * sizeof(float));
    const __m256 s = group_dot(Widen(codes + full * kBytesPerGroup), padded);
    acc[full & 1] = _mm256_fmadd_ps(s, _mm256_set1_ps(load_scale(scales, full)), acc[full & 1]);
  }
  return horizontal_sum(_mm256_add_ps(acc[0], acc[1]));
}

template <int kBytesPerGroup, GroupCodes (*Widen)(const uint8_t*)>
void quantized_axpy(const uint8_t* scales, const uint8_t* codes, int64_t n, float alpha, float* y) {
  const int64_t full = n / kQuantGroup;
  for (int64_t g = 0; g < full; ++g) {
    group_axpy(Widen(codes + g * kBytesPerGroup), _mm256_set1_ps(alpha * load_scale(scales, g)),
               y + g * kQuantGroup);
  }
  if (const int64_t rest = n - full * kQuantGroup; rest > 0) {
    float padded[kQuantGroup] = {};
    float* tail = y + full * kQuantGroup;
    const size_t bytes = static_cast<size_t>(rest) * sizeof(float);
    std::memcpy(padded, tail, bytes);
    group_axpy(Widen(codes + full * kBytesPerGroup),
               _mm256_set1_ps(alpha * load_scale(scales, full)), padded);
    std::memcpy(tail, padded, bytes);
  }
}

// Float codes: Load8(codes, i) gives elements i..i+7, Load1(codes, i) element i.
inline __m256 load8_f32(const uint8_t* c, int64_t i) {
  return _mm256_loadu_ps(reinterpret_cast<const float*>(c) + i);
}
inline float load1_f32(const uint8_t* c, int64_t i) {
  float v;
  std::memcpy(&v, c + 4 * i, sizeof(v));
  return v;
}
inline __m256 load8_f16(const uint8_t* c, int64_t i) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 2 * i)));
}
inline float load1_f16(const uint8_t* c, int64_t i) {
  uint16_t h;
  std::memcpy(&h, c + 2 * i, sizeof(h));
  return _cvtsh_ss(h);
}
inline __m256 load8_bf16(const uint8_t* c, int64_t i) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 2 * i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float load1_bf16(const uint8_t* c, int64_t i) {
  uint16_t h;
  std::memcpy(&h, c + 2 * i, sizeof(h));
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

template <__m256 (*Load8)(const uint8_t*, int64_t), float (*Load1)(const uint8_t*, int64_t)>
float float_dot(const uint8_t* codes, int64_t n, const float* x) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 4; ++k) {
      acc[k] = _mm256_fmadd_ps(Load8(codes, i + 8 * k), _mm256_loadu_ps(x + i + 8 * k), acc[k]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    acc[0] = _mm256_fmadd_ps(Load8(codes, i), _mm256_loadu_ps(x + i), acc[0]);
  }
  float s =
      horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) s = std::fma(Load1(codes, i), x[i], s);
  return s;
}

template <__m256 (*Load8)(const uint8_t*, int64_t), float (*Load1)(const uint8_t*, int64_t)>
void float_axpy(const uint8_t* codes, int64_t n, float alpha, float* y) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(Load8(codes, i), a, _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) y[i] = std::fma(Load1(codes, i), alpha, y[i]);
}

float coded_dot(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n, const float* x) {
  switch (t) {
    case DType::kF32:
      return float_dot<load8_f32, load1_f32>(codes, n, x);
    case DType::kF16:
      return float_dot<load8_f16, load1_f16>(codes, n, x);
    case DType::kBF16:
      return float_dot<load8_bf16, load1_bf16>(codes, n, x);
    case DType::kI8:
      return quantized_dot<kQuantGroup, widen_int8>(scales, codes, n, x);
    case DType::kI4:
      return quantized_dot<kHalf, widen_int4>(scales, codes, n, x);
  }
  return 0.0f;
}

void coded_axpy(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n, float alpha,
                float* y) {
  switch (t) {
    case DType::kF32:
      return float_axpy<load8_f32, load1_f32>(codes, n, alpha, y);
    case DType::kF16:
      return float_axpy<load8_f16, load1_f16>(codes, n, alpha, y);
    case DType::kBF16:
      return float_axpy<load8_bf16, load1_bf16>(codes, n, alpha, y);
    case DType::kI8:
      return quantized_axpy<kQuantGroup, widen_int8>(scales, codes, n, alpha, y);
    case DType::kI4:
      return quantized_axpy<kHalf, widen_int4>(scales, codes, n, alpha, y);
  }
}

// One step of the top-k' scan (kernels/cpu/peer.cc's scalar_top_indices): element i enters
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

// Once the list is full, 8 scores at a time are compared with its last; only those above it
// take the scalar step, in index order (the threshold only rises, so the result is the scalar
// scan's).
void top_indices_scan(const float* s, int64_t n, int64_t kp, int64_t* out) {
  int64_t size = 0, i = 0;
  for (; i < n && size < kp; ++i) top_step(s, i, kp, out, &size);
  for (; i + 8 <= n; i += 8) {
    const __m256 threshold = _mm256_set1_ps(s[out[kp - 1]]);
    unsigned mask = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + i), threshold, _CMP_GT_OQ)));
    for (; mask != 0; mask &= mask - 1) top_step(s, i + __builtin_ctz(mask), kp, out, &size);
  }
  for (; i < n; ++i) top_step(s, i, kp, out, &size);
}

// The scan above waits, per 8 scores, on two dependent loads (the list's last index, then its
// score). Here no pass depends on the one before: the maxima of the 16 lanes (element i in lane
// i % 16) bound the answer from below (tau, the kp-th largest of them: at least kp scores are >=
// tau, so every one of the kp best is), and only the scores >= tau, in index order, take the
// scan's insertion: the scan's result, as the avx512 path computes it.
void top_indices(const float* s, int64_t n, int64_t kp, int64_t* out) {
  const int64_t full = n / 16 * 16;
  if (kp > 16 || full == 0) return top_indices_scan(s, n, kp, out);
  __m256 lo = _mm256_loadu_ps(s), hi = _mm256_loadu_ps(s + 8);
  for (int64_t i = 16; i < full; i += 16) {
    lo = _mm256_max_ps(lo, _mm256_loadu_ps(s + i));
    hi = _mm256_max_ps(hi, _mm256_loadu_ps(s + i + 8));
  }
  float m[16];
  _mm256_storeu_ps(m, lo);
  _mm256_storeu_ps(m + 8, hi);
  // tau: the lane maximum with fewer than kp lanes above it and at least kp at or above it.
  const auto lanes = [](__m256 gt_lo, __m256 gt_hi) {
    return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(gt_lo))) +
           __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(gt_hi)));
  };
  float tau = m[0];
  for (int j = 0; j < 16; ++j) {
    const __m256 v = _mm256_set1_ps(m[j]);
    const int above = lanes(_mm256_cmp_ps(lo, v, _CMP_GT_OQ), _mm256_cmp_ps(hi, v, _CMP_GT_OQ));
    const int at_or_above =
        lanes(_mm256_cmp_ps(lo, v, _CMP_GE_OQ), _mm256_cmp_ps(hi, v, _CMP_GE_OQ));
    if (above < kp && at_or_above >= kp) tau = m[j];
  }
  float kept[16];
  int64_t size = 0;
  const auto insert = [&](int64_t i) { peer_internal::top_insert(s, i, kp, kept, out, &size); };
  const __m256 bound = _mm256_set1_ps(tau);
  for (int64_t i = 0; i < full; i += 8) {
    unsigned mask = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + i), bound, _CMP_GE_OQ)));
    for (; mask != 0; mask &= mask - 1) insert(i + __builtin_ctz(mask));
  }
  for (int64_t i = full; i < n; ++i) {
    if (s[i] >= tau) insert(i);
  }
}

// RoutingPrecision::kInt8's products from the integer GEMM, 8 columns at a time: each multiply
// rounded as portable_scale_products rounds it.
void scale_products(const int32_t* acc, int64_t m, int64_t n, const float* scale_a,
                    const float* scale_b, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    const int32_t* a = acc + i * n;
    float* out = c + i * ldc;
    const float sa = scale_a[i];
    const __m256 va = _mm256_set1_ps(sa);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 scaled = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + j))), va);
      _mm256_storeu_ps(out + j, _mm256_mul_ps(scaled, _mm256_loadu_ps(scale_b + j)));
    }
    for (; j < n; ++j) out[j] = static_cast<float>(a[j]) * sa * scale_b[j];
  }
}

// ---- the int8 dot (kernels/cpu/peer_kernels.h gives the order every path follows) ----------

// The 32 codes of int4 group g as unsigned nibbles 0..15, elements 0..31 in order.
inline __m256i int4_nibbles(const uint8_t* codes) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i nibble = _mm_set1_epi8(0x0f);
  const __m128i low = _mm_and_si128(bytes, nibble);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
  return _mm256_set_m128i(high, low);
}

// Lane j: sum over elements 4j..4j+3 of unsigned a * signed b (every |pair sum| <= 2 * 255 * 127
// fits the int16 of maddubs only when a <= 128: nibbles are <= 15, |int8 codes| <= 127).
inline __m256i lane_dot_u8s8(__m256i a, __m256i b) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}

float int8_dot(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n,
               const peer_internal::Int8Activations& x) {
  (void)n;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < x.groups; ++g) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.codes + g * 32));
    __m256i lanes;
    if (t == DType::kI4) {
      const __m256i bias =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.int4_bias + g * 8));
      lanes = _mm256_add_epi32(lane_dot_u8s8(int4_nibbles(codes + g * kHalf), xq), bias);
    } else {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 32));
      lanes = lane_dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
    }
    const float s = load_scale(scales, g) * x.scales[g];
    acc[g & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(s), acc[g & 1]);
  }
  return horizontal_sum(_mm256_add_ps(acc[0], acc[1]));
}

void axpy(float alpha, const float* x, int64_t n, float* y) {
  float_axpy<load8_f32, load1_f32>(reinterpret_cast<const uint8_t*>(x), n, alpha, y);
}

// ---- RoutingPrecision::kInt8's row quantizer (kernels/peer.h's rule) --------------------------

float routing_quantize(const float* v, int64_t n, int levels, int8_t* codes) {
  // Compiler builtins and plain comparisons, not std::max/rint/isfinite: an inline library
  // function instantiated here would be compiled for AVX2, and a non-inlined (-O0) copy could be
  // the one the linker keeps for the portable path too.
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax8 = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, x));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, amax8);
  float amax = 0.0f;
  for (float l : lanes) amax = l > amax ? l : amax;
  bool finite = _mm256_movemask_ps(unordered) == 0;
  for (; i < n; ++i) {
    const float a = __builtin_fabsf(v[i]);
    finite = finite && __builtin_isfinite(v[i]);
    amax = a > amax ? a : amax;
  }
  std::memset(codes, 0, static_cast<size_t>(n > 0 ? n : 0));
  if (!finite || __builtin_isinf(amax)) return __builtin_nanf("");
  const float lv = static_cast<float>(levels);
  const float inv = lv / amax;
  if (amax == 0.0f || !__builtin_isfinite(inv)) return 0.0f;
  const __m256 inv8 = _mm256_set1_ps(inv), hi = _mm256_set1_ps(lv), lo = _mm256_set1_ps(-lv);
  const auto code8 = [&](const float* p) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p), inv8),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
  };
  i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i w01 = _mm256_packs_epi32(code8(v + i), code8(v + i + 8));
    const __m256i w23 = _mm256_packs_epi32(code8(v + i + 16), code8(v + i + 24));
    const __m256i b = _mm256_packs_epi16(w01, w23);  // 128-bit lanes interleave the quads
    const __m256i ordered =
        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), ordered);
  }
  for (; i < n; ++i) {  // the vector loop's operations on one element
    const __m128 r = _mm_round_ss(_mm_setzero_ps(), _mm_set_ss(v[i] * inv),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const float c = _mm_cvtss_f32(r);
    codes[i] = static_cast<int8_t>(c > lv ? lv : c < -lv ? -lv : c);
  }
  return amax / lv;
}

// ExpertDot::kInt8's up-row coefficients, 8 groups at a time: the operations of
// portable_up_coefficients (fp16 scales through F16C, exact).
bool up_coefficients(const peer_internal::CodedRow* rows, const float* ga, int count, int64_t n,
                     float* work, int32_t* pairs, int32_t* bias, float* scales) {
  const int64_t groups = quant_groups(n), stride = peer_internal::up_stride(groups);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 largest = _mm256_set1_ps(std::numeric_limits<float>::max());
  float* amax = scales;  // d_g replaces a_g at the end
  for (int64_t g = 0; g < stride; g += 8) _mm256_storeu_ps(amax + g, _mm256_setzero_ps());
  __m256 bad = _mm256_setzero_ps();
  for (int r = 0; r < count; ++r) {
    const __m256 a = _mm256_set1_ps(ga[r]);
    float* c = work + r * stride;
    for (int64_t g = 0; g < stride; g += 8) {
      __m256 v = _mm256_setzero_ps();
      if (g + 8 <= groups) {
        v = _mm256_mul_ps(a, _mm256_cvtph_ps(_mm_loadu_si128(
                                 reinterpret_cast<const __m128i*>(rows[r].scales + 2 * g))));
      } else if (g < groups) {  // the last groups: nothing past the row is read
        uint16_t half[8] = {};
        std::memcpy(half, rows[r].scales + 2 * g, static_cast<size_t>(groups - g) * 2);
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(half)));
        const __m256 mask = _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(groups - g)), lanes));
        v = _mm256_and_ps(_mm256_mul_ps(a, w), mask);
      }
      _mm256_storeu_ps(c + g, v);
      const __m256 av = _mm256_andnot_ps(sign, v);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(av, largest, _CMP_NLE_UQ));
      _mm256_storeu_ps(amax + g, _mm256_max_ps(_mm256_loadu_ps(amax + g), av));
    }
  }
  if (_mm256_movemask_ps(bad) != 0) return false;
  const __m256 levels = _mm256_set1_ps(static_cast<float>(peer_internal::kUpLevels));
  float* inv = work + count * stride;
  for (int64_t g = 0; g < stride; g += 8) {
    const __m256 am = _mm256_loadu_ps(amax + g);
    const __m256 i = _mm256_div_ps(levels, am);
    const __m256 usable = _mm256_and_ps(_mm256_cmp_ps(am, _mm256_setzero_ps(), _CMP_NEQ_OQ),
                                        _mm256_cmp_ps(i, largest, _CMP_LE_OQ));
    _mm256_storeu_ps(inv + g, _mm256_and_ps(i, usable));
    _mm256_storeu_ps(scales + g, _mm256_div_ps(am, levels));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bias + g), _mm256_setzero_si256());
  }
  const __m256i hi_levels = _mm256_set1_epi32(peer_internal::kUpLevels);
  const __m256i lo_levels = _mm256_set1_epi32(-peer_internal::kUpLevels);
  const auto code = [&](int r, int64_t g) {
    const __m256 v =
        _mm256_mul_ps(_mm256_loadu_ps(work + r * stride + g), _mm256_loadu_ps(inv + g));
    return _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(v), lo_levels), hi_levels);
  };
  for (int p = 0; p < (count + 1) / 2; ++p) {
    for (int64_t g = 0; g < stride; g += 8) {
      const __m256i ka = code(2 * p, g);
      const __m256i kb = 2 * p + 1 < count ? code(2 * p + 1, g) : _mm256_setzero_si256();
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs + p * stride + g),
                          _mm256_or_si256(_mm256_and_si256(ka, _mm256_set1_epi32(0xffff)),
                                          _mm256_slli_epi32(kb, 16)));
      __m256i* b = reinterpret_cast<__m256i*>(bias + g);
      _mm256_storeu_si256(b, _mm256_sub_epi32(_mm256_loadu_si256(b),
                                              _mm256_slli_epi32(_mm256_add_epi32(ka, kb), 3)));
    }
  }
  return true;
}

// ExpertDot::kInt8's up rows: per group, two slots at a time, their codes interleaved into
// 16-bit pairs (slot 2p's code, slot 2p + 1's) that vpmaddwd multiplies by the pair of
// coefficient codes and sums into 32-bit lanes: exact, so the bits are portable_int_up's.
void int_up(DType t, const peer_internal::CodedRow* rows, int64_t n,
            const peer_internal::UpCoefficients& c, float* y) {
  const int64_t stride = peer_internal::up_stride(c.groups);
  const int pairs = (c.count + 1) / 2;
  const __m256i nibble = _mm256_set1_epi16(0x0f);
  for (int64_t g = 0; g < c.groups; ++g) {
    __m256i acc[4];  // elements 0..7, 8..15, 16..23, 24..31
    for (__m256i& a : acc) a = _mm256_set1_epi32(t == DType::kI4 ? c.bias[g] : 0);
    for (int p = 0; p < pairs; ++p) {
      const uint8_t* a = rows[2 * p].codes;
      const uint8_t* b = 2 * p + 1 < c.count ? rows[2 * p + 1].codes : a;  // its k is 0
      const __m256i k = _mm256_set1_epi32(c.pairs[p * stride + g]);
      if (t == DType::kI4) {
        const __m128i xa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + g * 16));
        const __m128i xb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + g * 16));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(xa, xb));  // bytes 0..7
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(xa, xb));  // bytes 8..15
        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(_mm256_and_si256(lo, nibble), k));
        acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(_mm256_and_si256(hi, nibble), k));
        acc[2] = _mm256_add_epi32(acc[2], _mm256_madd_epi16(_mm256_srli_epi16(lo, 4), k));
        acc[3] = _mm256_add_epi32(acc[3], _mm256_madd_epi16(_mm256_srli_epi16(hi, 4), k));
      } else {
        for (int h = 0; h < 2; ++h) {
          const __m128i xa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + g * 32 + h * 16));
          const __m128i xb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + g * 32 + h * 16));
          const __m256i lo = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(xa, xb));
          const __m256i hi = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(xa, xb));
          acc[2 * h] = _mm256_add_epi32(acc[2 * h], _mm256_madd_epi16(lo, k));
          acc[2 * h + 1] = _mm256_add_epi32(acc[2 * h + 1], _mm256_madd_epi16(hi, k));
        }
      }
    }
    const __m256 d = _mm256_set1_ps(c.scales[g]);
    const int64_t len = std::min<int64_t>(kQuantGroup, n - g * kQuantGroup);
    float out[32];
    for (int q = 0; q < 4; ++q) {
      _mm256_storeu_ps(out + 8 * q, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[q]), d));
    }
    std::memcpy(y + g * kQuantGroup, out, static_cast<size_t>(len) * sizeof(float));
  }
}

}  // namespace

const PeerKernels& peer_kernels() {
  static constexpr PeerKernels kKernels = {
      .coded_dot = coded_dot,
      .coded_dots = peer_internal::dots_one_by_one<coded_dot>,
      .coded_axpy = coded_axpy,
      .axpy = axpy,
      .top_indices = top_indices,
      .int8_dot = int8_dot,
      .int8_dots = peer_internal::int8_dots_one_by_one<int8_dot>,
      .quantize_activations = peer_internal::portable_quantize_activations,
      .int8_products_few = nullptr,
      .gemm_nt_panels = nullptr,
      .scale_products = scale_products,
      .routing_quantize = routing_quantize,
      .up_coefficients = up_coefficients,
      .int_up = int_up,
  };
  return kKernels;
}

}  // namespace trove::avx2
