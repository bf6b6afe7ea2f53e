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

// Left-packing of 8 lanes: for each movemask, the lanes whose bit is set, in order, then zeros.
struct PackTable {
  int32_t lanes[256][8];
};
constexpr PackTable make_pack_table() {
  PackTable t{};
  for (int mask = 0; mask < 256; ++mask) {
    int out = 0;
    for (int lane = 0; lane < 8; ++lane) {
      if (mask & (1 << lane)) t.lanes[mask][out++] = lane;
    }
  }
  return t;
}
alignas(32) constexpr PackTable kPackTable = make_pack_table();

// The most scores at or above the bound that top_indices ranks; more (many ties at the bound)
// take the insertion scan.
constexpr int kMaxRanked = 64;

// The scan above waits, per 8 scores, on two dependent loads (the list's last index, then its
// score). Here no pass depends on the one before: the maxima of the 16 lanes (element i in lane
// i % 16) bound the answer from below (tau, the kp-th largest of them: at least kp scores are >=
// tau, so every one of the kp best is). The scores >= tau (about 10 of 512 gaussian ones at kp =
// 8) are packed, in index order, without a branch per score; each takes as its rank the number
// of them that come before it (greater, or equal at a lower index), and the kp of rank < kp are
// the answer: the scan's result, as the avx512 path computes it. Many ties at tau (more than
// kMaxRanked scores >= tau) take the scan's insertion over the scores >= tau; a NaN among the
// first kp scores or a NaN bound, the whole scan (a NaN elsewhere never enters either answer).
void top_indices(const float* s, int64_t n, int64_t kp, int64_t* out) {
  const int64_t full = n / 16 * 16;
  if (kp > 16 || full == 0) return top_indices_scan(s, n, kp, out);
  __m256 lo = _mm256_loadu_ps(s), hi = _mm256_loadu_ps(s + 8);
  // A NaN among the first kp enters the scan's list (it fills unconditionally) and stays: the
  // scan's answer then is not the kp best of the rest, so the scan gives it.
  const unsigned nan_head =
      static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(lo, lo, _CMP_UNORD_Q))) |
      static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(hi, hi, _CMP_UNORD_Q))) << 8;
  if ((nan_head & ((1u << kp) - 1)) != 0) return top_indices_scan(s, n, kp, out);
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
  // The scores >= tau and their indices, packed in index order (room for one more vector).
  alignas(32) float value[kMaxRanked + 8];
  alignas(32) int32_t index[kMaxRanked + 8];
  int count = 0;
  const __m256 bound = _mm256_set1_ps(tau);
  __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < full; i += 8) {
    const __m256 v = _mm256_loadu_ps(s + i);
    const unsigned mask =
        static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, bound, _CMP_GE_OQ)));
    if (count <= kMaxRanked) {
      const __m256i pack =
          _mm256_load_si256(reinterpret_cast<const __m256i*>(kPackTable.lanes[mask]));
      _mm256_storeu_ps(value + count, _mm256_permutevar8x32_ps(v, pack));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(index + count),
                          _mm256_permutevar8x32_epi32(at, pack));
    }
    count += __builtin_popcount(mask);
    at = _mm256_add_epi32(at, _mm256_set1_epi32(8));
  }
  for (int64_t i = full; i < n; ++i) {
    if (s[i] >= tau) {
      if (count < kMaxRanked) {
        value[count] = s[i];
        index[count] = static_cast<int32_t>(i);
      }
      ++count;
    }
  }
  // Fewer than kp only when NaNs hide the bound (tau a NaN, a row of NaNs): the scan.
  if (count < kp) return top_indices_scan(s, n, kp, out);
  if (count <= kMaxRanked) {
    const int vectors = (count + 7) / 8;
    for (int j = count; j < vectors * 8; ++j) value[j] = -std::numeric_limits<float>::infinity();
    // rank[j] counts the candidates i that come before j: v_i > v_j, or v_i == v_j and i < j
    // (a true compare is -1, so it is subtracted). Padding lanes sit past every candidate.
    __m256i rank[kMaxRanked / 8 + 1];
    for (int v = 0; v < vectors; ++v) rank[v] = _mm256_setzero_si256();
    for (int i = 0; i < count; ++i) {
      const __m256 vi = _mm256_set1_ps(value[i]);
      const __m256i ii = _mm256_set1_epi32(i);
      __m256i position = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int v = 0; v < vectors; ++v) {
        const __m256 vj = _mm256_load_ps(value + 8 * v);
        const __m256i greater = _mm256_castps_si256(_mm256_cmp_ps(vi, vj, _CMP_GT_OQ));
        const __m256i equal_before =
            _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(vi, vj, _CMP_EQ_OQ)),
                             _mm256_cmpgt_epi32(position, ii));
        rank[v] = _mm256_sub_epi32(rank[v], _mm256_or_si256(greater, equal_before));
        position = _mm256_add_epi32(position, _mm256_set1_epi32(8));
      }
    }
    // "Comes before" orders the candidates totally (none is a NaN: NaN >= tau is false), so
    // the ranks are 0..count-1, each once.
    alignas(32) int32_t ranks[kMaxRanked + 8];
    for (int v = 0; v < vectors; ++v) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(ranks + 8 * v), rank[v]);
    }
    int at_rank[kMaxRanked + 8];
    for (int j = 0; j < count; ++j) at_rank[ranks[j]] = j;
    for (int64_t r = 0; r < kp; ++r) out[r] = index[at_rank[r]];
    return;
  }
  float kept[16];
  int64_t size = 0;
  const auto insert = [&](int64_t i) { peer_internal::top_insert(s, i, kp, kept, out, &size); };
  for (int64_t i = 0; i < full; i += 8) {
    unsigned mask = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + i), bound, _CMP_GE_OQ)));
    for (; mask != 0; mask &= mask - 1) insert(i + __builtin_ctz(mask));
  }
  for (int64_t i = full; i < n; ++i) {
    if (s[i] >= tau) insert(i);
  }
}

// merge_top without the heap's data-dependent branches (most of portable_merge_top's time). A sum
// (a, b) is at most each sum (a' <= a, b' <= b), fp32 addition being monotone, so only the sums
// with (a + 1)(b + 1) <= k can be among the k best. Each of those takes the rank of the number of
// them strictly greater; when ranks 0..k-1 are all taken and exactly k of all kp^2 sums are >=
// the k-th, the k best are distinct and no other sum ties them: the answer is the heap's.
// Otherwise (ties among the best, a sum outside the candidates rounding equal to the k-th, a
// sum that is not a number, kp or k above 16) the heap merges.
void merge_top(const float* s0, const float* s1, const int64_t* top0, const int64_t* top1,
               int64_t kp, int64_t n, int64_t k, int64_t* ids, float* scores) {
  if (kp > 16 || k > 16) {
    return peer_internal::portable_merge_top(s0, s1, top0, top1, kp, n, k, ids, scores);
  }
  const float low = -std::numeric_limits<float>::infinity();
  alignas(32) float row[16], col[16];
  for (int64_t a = 0; a < 16; ++a) {
    row[a] = a < kp ? s0[top0[a]] : low;
    col[a] = a < kp ? s1[top1[a]] : low;
  }
  // The candidates, padded to whole vectors with -inf (never greater than a finite sum).
  constexpr int kMaxCandidates = 56;  // sum over a of min(16, 16 / (a + 1)) = 50
  alignas(32) float sum[kMaxCandidates];
  uint8_t pos_a[kMaxCandidates], pos_b[kMaxCandidates];
  int count = 0;
  int64_t cols = std::min(kp, k);
  for (int64_t a = 0; a < std::min(kp, k); ++a) {
    while ((a + 1) * cols > k) --cols;  // cols = min(kp, k / (a + 1)), without a division
    for (int64_t b = 0; b < cols; ++b) {
      sum[count] = row[a] + col[b];
      pos_a[count] = static_cast<uint8_t>(a);
      pos_b[count] = static_cast<uint8_t>(b);
      ++count;
    }
  }
  const int vectors = (count + 7) / 8;
  for (int i = count; i < vectors * 8; ++i) sum[i] = low;
  // rank[i] = the number of candidates strictly greater, 8 candidates at a time (a true compare
  // is -1, so it is subtracted).
  __m256i ranks[kMaxCandidates / 8];
  for (int j = 0; j < vectors; ++j) ranks[j] = _mm256_setzero_si256();
  for (int i = 0; i < count; ++i) {
    const __m256 v = _mm256_set1_ps(sum[i]);
    for (int j = 0; j < vectors; ++j) {
      ranks[j] = _mm256_sub_epi32(
          ranks[j], _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_load_ps(sum + 8 * j), _CMP_GT_OQ)));
    }
  }
  alignas(32) int32_t rank[kMaxCandidates];
  for (int j = 0; j < vectors; ++j) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(rank + 8 * j), ranks[j]);
  }
  int at_rank[kMaxCandidates];
  uint64_t taken = 0;
  for (int i = 0; i < count; ++i) {
    taken |= uint64_t{1} << rank[i];
    at_rank[rank[i]] = i;
  }
  // Ranks 0..k-1 each taken (two equal sums take one rank and leave the next empty; two taking
  // the same rank with all of 0..k-1 taken make k + 1 sums >= the k-th, which the count below
  // catches).
  // A NaN among the candidates (which hold the heap's first k) leaves it to the heap; outside
  // them one never enters.
  unsigned nan = 0;
  for (int j = 0; j < vectors; ++j) {
    const __m256 v = _mm256_load_ps(sum + 8 * j);
    nan |= static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  }
  const uint64_t first_k = (uint64_t{1} << k) - 1;
  bool exact = nan == 0 && (taken & first_k) == first_k;
  if (exact) {
    const __m256 kth = _mm256_set1_ps(sum[at_rank[k - 1]]);
    const __m256 col_lo = _mm256_load_ps(col), col_hi = _mm256_load_ps(col + 8);
    int at_least = 0;
    for (int64_t a = 0; a < kp; ++a) {
      const __m256 r = _mm256_set1_ps(row[a]);
      at_least += __builtin_popcount(static_cast<unsigned>(
          _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(r, col_lo), kth, _CMP_GE_OQ))));
      if (kp > 8) {
        at_least += __builtin_popcount(static_cast<unsigned>(
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(r, col_hi), kth, _CMP_GE_OQ))));
      }
    }
    exact = at_least == k;
  }
  if (!exact) return peer_internal::portable_merge_top(s0, s1, top0, top1, kp, n, k, ids, scores);
  for (int64_t r = 0; r < k; ++r) {
    const int i = at_rank[r];
    ids[r] = top0[pos_a[i]] * n + top1[pos_b[i]];
    scores[r] = sum[i];
  }
}

// int8_scores: tiles of R activation rows x 16 keys (two panels). Per quad of k, each row's 4
// codes (+128) are broadcast, multiplied with the 8 keys' 4 codes of each panel by vpmaddubsw
// (|a pair sum| <= 2 * 255 * 64 < 2^15: exact) and summed to 32 bits by vpmaddwd, so every sum
// is the exact integer; then minus the key's offset and scaled as portable_scale_products does.
inline int32_t activation_quad(const uint8_t* row, int64_t q, int64_t k) {
  int32_t quad = 0;  // bytes past k multiply zero codes
  std::memcpy(&quad, row + 4 * q, static_cast<size_t>(std::min<int64_t>(4, k - 4 * q)));
  return quad;
}

template <int R>
void int8_score_rows(int64_t n, int64_t k, const uint8_t* a, int64_t lda,
                     const peer_internal::Int8Panels& b, const float* scale_a, const float* scale_b,
                     float* c, int64_t ldc) {
  const int64_t quads = (k + 3) / 4, whole = k / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t j = 0; j < n; j += 16) {
    const int8_t* panel = b.codes.data() + (j / 8) * quads * 32;
    __m256i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const auto step = [&](int64_t q, const int32_t* quad) {
      const __m256i k0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * 32));
      const __m256i k1 =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (quads + q) * 32));
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_set1_epi32(quad[r]);
        acc[r][0] =
            _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, k0), ones));
        acc[r][1] =
            _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, k1), ones));
      }
    };
    for (int64_t q = 0; q < whole; ++q) {
      int32_t quad[R];
      for (int r = 0; r < R; ++r) std::memcpy(&quad[r], a + r * lda + 4 * q, 4);
      step(q, quad);
    }
    if (whole < quads) {
      int32_t quad[R];
      for (int r = 0; r < R; ++r) quad[r] = activation_quad(a + r * lda, whole, k);
      step(whole, quad);
    }
    for (int half = 0; half < 2; ++half) {
      const int64_t col = j + 8 * half;
      if (col >= n) break;
      const __m256i offset = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(&b.offsets[static_cast<size_t>(col)]));
      for (int r = 0; r < R; ++r) {
        const __m256 scaled = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][half], offset)), _mm256_set1_ps(scale_a[r]));
        float* out = c + r * ldc + col;
        if (col + 8 <= n) {
          _mm256_storeu_ps(out, _mm256_mul_ps(scaled, _mm256_loadu_ps(scale_b + col)));
        } else {  // the last columns: scale_b and c end at n
          alignas(32) float part[8];
          _mm256_store_ps(part, scaled);
          for (int64_t e = 0; e < n - col; ++e) out[e] = part[e] * scale_b[col + e];
        }
      }
    }
  }
}

void int8_scores(int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda,
                 const peer_internal::Int8Panels& b, const float* scale_a, const float* scale_b,
                 float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    int8_score_rows<4>(n, k, a + i * lda, lda, b, scale_a + i, scale_b, c + i * ldc, ldc);
  }
  switch (m - i) {
    case 3:
      int8_score_rows<3>(n, k, a + i * lda, lda, b, scale_a + i, scale_b, c + i * ldc, ldc);
      break;
    case 2:
      int8_score_rows<2>(n, k, a + i * lda, lda, b, scale_a + i, scale_b, c + i * ldc, ldc);
      break;
    case 1:
      int8_score_rows<1>(n, k, a + i * lda, lda, b, scale_a + i, scale_b, c + i * ldc, ldc);
      break;
    default:
      break;
  }
}

// gemm_nt_panels (the AVX-512 path's, kernels/cpu/peer_avx512.cc, in 8-wide halves of each
// 16-column panel): tiles of R rows x 16 columns over a block of kKBlock k-steps, per step two
// panel loads, R broadcasts of A and 2R FMAs into accumulators held in registers (R = 4: the 8
// chains that keep Zen 3's two FMA pipes busy at latency 4). Across k-blocks an element's chain
// continues from its value stored in C, so each element is the fma chain over k in order from 0:
// the AVX-512 path's bits.
constexpr int64_t kKBlock = 256;

// acc[r][h] with the loops unrolled: GCC 12 kept separate lo[R] / hi[R] arrays in memory,
// storing them at every step (a third of the FMA rate).
template <int R>
void panel_tile(const float* a, int64_t lda, const float* panel, int64_t k0, int64_t k1, float* c,
                int64_t ldc) {
  __m256 acc[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) {
      acc[r][h] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc + 8 * h);
    }
  }
  for (int64_t kk = k0; kk < k1; ++kk) {
    __m256 b[2];
    for (int h = 0; h < 2; ++h) b[h] = _mm256_loadu_ps(panel + kk * 16 + 8 * h);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_set1_ps(a[r * lda + kk]);
      for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_fmadd_ps(av, b[h], acc[r][h]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(c + r * ldc + 8 * h, acc[r][h]);
  }
}

// R rows of one panel; the last panel's fewer than 16 columns go through a 16-wide buffer (AMD's
// masked stores are microcoded and slow).
template <int R>
void panel_rows(const float* a, int64_t lda, const float* panel, int64_t k0, int64_t k1, float* c,
                int64_t ldc, int64_t cols) {
  if (cols >= 16) return panel_tile<R>(a, lda, panel, k0, k1, c, ldc);
  alignas(32) float part[R * 16] = {};
  if (k0 > 0) {  // the chains so far
    for (int r = 0; r < R; ++r) std::copy(c + r * ldc, c + r * ldc + cols, part + r * 16);
  }
  panel_tile<R>(a, lda, panel, k0, k1, part, 16);
  for (int r = 0; r < R; ++r) std::copy(part + r * 16, part + r * 16 + cols, c + r * ldc);
}

void gemm_nt_panels(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                    const float* b_panels, float* c, int64_t ldc) {
  const int64_t panels = (n + 15) / 16;
  // At least one k-block: with k = 0 the tiles store their zeroed accumulators, C = 0.
  for (int64_t k0 = 0; k0 == 0 || k0 < k; k0 += kKBlock) {
    const int64_t k1 = std::min(k, k0 + kKBlock);
    for (int64_t p = 0; p < panels; ++p) {
      const float* panel = b_panels + p * k * 16;
      const int64_t cols = n - p * 16;
      float* cp = c + p * 16;
      int64_t i = 0;
      for (; i + 4 <= m; i += 4) {
        panel_rows<4>(a + i * lda, lda, panel, k0, k1, cp + i * ldc, ldc, cols);
      }
      switch (m - i) {
        case 3:
          panel_rows<3>(a + i * lda, lda, panel, k0, k1, cp + i * ldc, ldc, cols);
          break;
        case 2:
          panel_rows<2>(a + i * lda, lda, panel, k0, k1, cp + i * ldc, ldc, cols);
          break;
        case 1:
          panel_rows<1>(a + i * lda, lda, panel, k0, k1, cp + i * ldc, ldc, cols);
          break;
        default:
          break;
      }
    }
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
      .merge_top = merge_top,
      .int8_dot = int8_dot,
      .int8_dots = peer_internal::int8_dots_one_by_one<int8_dot>,
      .quantize_activations = peer_internal::portable_quantize_activations,
      .int8_products_few = nullptr,
      .gemm_nt_panels = gemm_nt_panels,
      .int8_scores = int8_scores,
      .scale_products = scale_products,
      .routing_quantize = routing_quantize,
      .up_coefficients = up_coefficients,
      .int_up = int_up,
  };
  return kKernels;
}

}  // namespace trove::avx2
