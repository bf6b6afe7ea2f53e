// The AVX-VNNI int8 dot of the CPU PEER layer (CPUs with VEX-encoded VNNI, 256-bit); every other
// kernel of this path is the AVX2 one. Only this file is compiled with -mavxvnni; peer.cc calls
// it after checking the CPU. Same bits as every path (kernels/cpu/peer_kernels.h): vpdpbusd sums
// the same four products per lane, exactly, that AVX2's maddubs + madd do.
#include <immintrin.h>

#include <cstring>

#include "kernels/cpu/peer_kernels.h"
#include "kernels/quant.h"

namespace trove::avxvnni {

namespace {

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

inline __m256i int4_nibbles(const uint8_t* codes) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i nibble = _mm_set1_epi8(0x0f);
  const __m128i low = _mm_and_si128(bytes, nibble);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
  return _mm256_set_m128i(high, low);
}

float int8_dot(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n,
               const peer_internal::Int8Activations& x) {
  (void)n;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < x.groups; ++g) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.codes + g * 32));
    __m256i lanes;
    if (t == DType::kI4) {
      // bias + nibble * x_code = q * x_code, lane by lane.
      const __m256i bias =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.int4_bias + g * 8));
      lanes = _mm256_dpbusd_avx_epi32(bias, int4_nibbles(codes + g * (kQuantGroup / 2)), xq);
    } else {
      // |w| * (x_code with w's sign) = w * x_code: vpdpbusd's first operand is unsigned.
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 32));
      lanes = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w),
                                      _mm256_sign_epi8(xq, w));
    }
    const float s = load_scale(scales, g) * x.scales[g];
    acc[g & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(s), acc[g & 1]);
  }
  return horizontal_sum(_mm256_add_ps(acc[0], acc[1]));
}

}  // namespace

const peer_internal::PeerKernels& peer_kernels() {
  static const peer_internal::PeerKernels kKernels = [] {
    peer_internal::PeerKernels k = avx2::peer_kernels();
    k.int8_dot = int8_dot;
    k.int8_dots = peer_internal::int8_dots_one_by_one<int8_dot>;
    return k;
  }();
  return kKernels;
}

}  // namespace trove::avxvnni
