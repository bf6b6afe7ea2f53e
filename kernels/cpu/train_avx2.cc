// AVX2 inner loops of the CPU training update. Only this file is compiled with -mavx2, and with
// -ffp-contract=off: no multiply-add may fuse (kernels/train.h defines every rounding);
// kernels/cpu/train.cc calls it after checking the CPU.
//
// The hash runs four 64-bit lanes per vector. AVX2 has no 64 x 64-bit multiply, so each of
// sr_mix's two products is built from three 32 x 32 -> 64 multiplies (lo·lo, hi·lo, lo·hi;
// the hi·hi term falls outside 64 bits). Only h >> 40 is needed, and sr_mix's final
// z ^ (z >> 31) leaves bits 40..63 of z unchanged (z >> 31 has none above bit 32), so that
// last step is skipped. Even counters go to one vector and odd ones to another, so the two
// 64-bit results interleave into eight 32-bit lanes already in element order.
//
// The group step runs 8 elements per vector: the same fp32 multiply, divide and floor as the
// scalar code (IEEE, correctly rounded), the candidate in int32, and the clamp to [-128, 127]
// as the saturating packs int32 -> int16 -> int8 (candidates lie in [-385, 384]).
#include "kernels/cpu/train_avx2.h"

#include <immintrin.h>

#include "kernels/quant.h"
#include "kernels/train.h"

namespace trove::avx2 {

namespace {

using train_internal::TrainKernels;

static_assert(kQuantGroup == 32, "the kernels below hold one group in 4 x 8 lanes");

void sum_square_lanes(const float* g, int64_t groups, double* lane) {
  __m256d acc[8];
  for (int q = 0; q < 8; ++q) acc[q] = _mm256_loadu_pd(lane + 4 * q);
  for (int64_t i = 0; i < groups; ++i, g += kQuantGroup) {
    for (int q = 0; q < 8; ++q) {
      const __m256d x = _mm256_cvtps_pd(_mm_loadu_ps(g + 4 * q));
      acc[q] = _mm256_add_pd(acc[q], _mm256_mul_pd(x, x));
    }
  }
  for (int q = 0; q < 8; ++q) _mm256_storeu_pd(lane + 4 * q, acc[q]);
}

// x · c mod 2^64 per 64-bit lane, c given as its 32-bit halves (in every lane).
inline __m256i mul64(__m256i x, __m256i c_lo, __m256i c_hi) {
  const __m256i lo = _mm256_mul_epu32(x, c_lo);
  const __m256i cross =
      _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(x, 32), c_lo), _mm256_mul_epu32(x, c_hi));
  return _mm256_add_epi64(lo, _mm256_slli_epi64(cross, 32));
}

struct MixConstants {
  __m256i m1_lo = _mm256_set1_epi64x(0xbf58476d1ce4e5b9ll & 0xffffffffll);
  __m256i m1_hi = _mm256_set1_epi64x(static_cast<long long>(0xbf58476d1ce4e5b9ull >> 32));
  __m256i m2_lo = _mm256_set1_epi64x(0x94d049bb133111ebll & 0xffffffffll);
  __m256i m2_hi = _mm256_set1_epi64x(static_cast<long long>(0x94d049bb133111ebull >> 32));
};

// sr_mix(z) >> 40 per 64-bit lane.
inline __m256i mix_top(__m256i z, const MixConstants& k) {
  z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 30));
  z = mul64(z, k.m1_lo, k.m1_hi);
  z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 27));
  z = mul64(z, k.m2_lo, k.m2_hi);
  return _mm256_srli_epi64(z, 40);
}

// top[j] = sr_mix(prefix ^ (base + j)) >> 40 for j < 32: sr_uniform_from_prefix is exactly
// top · 2^-24 in fp32.
void sr_tops(uint64_t prefix, uint64_t base, uint32_t* top) {
  const MixConstants k;
  const __m256i p = _mm256_set1_epi64x(static_cast<long long>(prefix));
  const __m256i eight = _mm256_set1_epi64x(8);
  __m256i even = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(base)),
                                  _mm256_setr_epi64x(0, 2, 4, 6));
  __m256i odd = _mm256_add_epi64(even, _mm256_set1_epi64x(1));
  for (int j = 0; j < kQuantGroup; j += 8) {
    const __m256i te = mix_top(_mm256_xor_si256(p, even), k);
    const __m256i to = mix_top(_mm256_xor_si256(p, odd), k);
    // Both are < 2^24: the odd element into the high half gives 32-bit lanes j .. j + 7.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(top + j),
                        _mm256_or_si256(te, _mm256_slli_epi64(to, 32)));
    even = _mm256_add_epi64(even, eight);
    odd = _mm256_add_epi64(odd, eight);
  }
}

int try_full_group(const float* delta, float d, uint64_t prefix, uint64_t e0, int tolerance,
                   uint32_t* top, int8_t* b) {
  const __m256 dv = _mm256_set1_ps(d);
  const __m256 sixteen = _mm256_set1_ps(16.0f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 k_limit = _mm256_set1_ps(256.0f);
  __m256 v[4], k[4];
  __m256 in_range = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int q = 0; q < 4; ++q) {
    v[q] = _mm256_div_ps(_mm256_mul_ps(sixteen, _mm256_loadu_ps(delta + 8 * q)), dv);
    k[q] = _mm256_floor_ps(v[q]);
    // |k| <= 256, false for NaN: beyond it the overshoot counts as infinite.
    in_range =
        _mm256_and_ps(in_range, _mm256_cmp_ps(_mm256_and_ps(k[q], abs_mask), k_limit, _CMP_LE_OQ));
  }
  // Most retries of a saturating group end here, before any hash is needed.
  if (_mm256_movemask_ps(in_range) != 0xff) return -1;
  if (top[0] == train_internal::kNoTops) sr_tops(prefix, e0, top);

  const __m256 inv_two24 = _mm256_set1_ps(1.0f / 16777216.0f);
  const __m256i c_max = _mm256_set1_epi32(127);
  const __m256i c_min = _mm256_set1_epi32(-128);
  __m256i overshoot = _mm256_set1_epi32(-1024);
  __m256i c[4];
  for (int q = 0; q < 4; ++q) {
    const __m256 u = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(top + 8 * q))),
        inv_two24);
    // All ones (-1) where the element rounds up.
    const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(u, _mm256_sub_ps(v[q], k[q]), _CMP_LT_OQ));
    const __m256i codes =
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * q)));
    c[q] = _mm256_sub_epi32(_mm256_add_epi32(codes, _mm256_cvttps_epi32(k[q])), up);
    overshoot = _mm256_max_epi32(
        overshoot, _mm256_max_epi32(_mm256_sub_epi32(c[q], c_max), _mm256_sub_epi32(c_min, c[q])));
  }
  __m128i o =
      _mm_max_epi32(_mm256_castsi256_si128(overshoot), _mm256_extracti128_si256(overshoot, 1));
  o = _mm_max_epi32(o, _mm_shuffle_epi32(o, _MM_SHUFFLE(1, 0, 3, 2)));
  o = _mm_max_epi32(o, _mm_shuffle_epi32(o, _MM_SHUFFLE(2, 3, 0, 1)));
  const int max_overshoot = _mm_cvtsi128_si32(o);  // the scalar code's max(0, this)
  if (max_overshoot > tolerance) return -1;
  // packs work within 128-bit halves: the bytes come out as dwords
  // c0[0..3] c1[0..3] c2[0..3] c3[0..3] c0[4..7] c1[4..7] c2[4..7] c3[4..7].
  const __m256i bytes =
      _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(
      reinterpret_cast<__m256i*>(b),
      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return max_overshoot > 0 ? 1 : 0;
}

void halve_full_group(uint64_t prefix, uint64_t base, int8_t* b) {
  uint32_t top[kQuantGroup];
  sr_tops(prefix, base, top);
  for (int j = 0; j < kQuantGroup; ++j) {
    // u < 0.5 is top < 2^23.
    const int x = b[j];
    b[j] = static_cast<int8_t>((x >> 1) + ((x & 1) != 0 && top[j] < (1u << 23) ? 1 : 0));
  }
}

}  // namespace

const TrainKernels& train_kernels() {
  static constexpr TrainKernels kKernels = {sum_square_lanes, try_full_group, halve_full_group};
  return kKernels;
}

}  // namespace trove::avx2
