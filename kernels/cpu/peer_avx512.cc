// The AVX-512 kernels of the CPU PEER layer: the int8 dot two groups per 512-bit vector with
// VNNI; the float kernels are the AVX2 ones. Only this file is compiled for AVX-512
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

#include <cstring>

#include "kernels/cpu/peer_kernels.h"
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

// The AVX2 path's scan, 16 scores at a time.
void top_indices(const float* s, int64_t n, int64_t kp, int64_t* out) {
  int64_t size = 0, i = 0;
  for (; i < n && size < kp; ++i) top_step(s, i, kp, out, &size);
  for (; i + 16 <= n; i += 16) {
    const __m512 threshold = _mm512_set1_ps(s[out[kp - 1]]);
    unsigned mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), threshold, _CMP_GT_OQ);
    for (; mask != 0; mask &= mask - 1) top_step(s, i + __builtin_ctz(mask), kp, out, &size);
  }
  for (; i < n; ++i) top_step(s, i, kp, out, &size);
}

float int8_dot(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n,
               const peer_internal::Int8Activations& x) {
  (void)n;
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= x.groups; g += 2) {
    const __m512i xq = _mm512_loadu_si512(x.codes + g * 32);
    __m512i lanes;
    if (t == DType::kI4) {
      lanes = _mm512_dpbusd_epi32(_mm512_loadu_si512(x.int4_bias + g * 8),
                                  int4_nibbles_pair(codes + g * kHalf), xq);
    } else {
      // |w| * (x_code negated where w < 0) = w * x_code.
      const __m512i w = _mm512_loadu_si512(codes + g * 32);
      const __m512i sx =
          _mm512_mask_sub_epi8(xq, _mm512_movepi8_mask(w), _mm512_setzero_si512(), xq);
      lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sx);
    }
    const __m512 s =
        _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(load_scale(scales, g) * x.scales[g]),
                             _mm512_set1_ps(load_scale(scales, g + 1) * x.scales[g + 1]));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes), s, acc);
  }
  __m256 even = _mm512_castps512_ps256(acc);
  const __m256 odd = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
  if (g < x.groups) {  // a last, even-numbered group: lanes 0..7 only
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.codes + g * 32));
    __m256i lanes;
    if (t == DType::kI4) {
      lanes = _mm256_dpbusd_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.int4_bias + g * 8)),
          int4_nibbles(codes + g * kHalf), xq);
    } else {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 32));
      lanes =
          _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(xq, w));
    }
    const float s = load_scale(scales, g) * x.scales[g];
    even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(s), even);
  }
  return horizontal_sum(_mm256_add_ps(even, odd));
}

}  // namespace

const peer_internal::PeerKernels& peer_kernels() {
  static const peer_internal::PeerKernels kKernels = [] {
    peer_internal::PeerKernels k = avx2::peer_kernels();
    k.top_indices = top_indices;
    k.int8_dot = int8_dot;
    return k;
  }();
  return kKernels;
}

}  // namespace trove::avx512
