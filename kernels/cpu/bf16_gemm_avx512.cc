// The router's bf16 products on AVX512_BF16 (kernels/cpu/peer_kernels.h: avx512bf16::gemm_nt).
// Only this file is compiled with -mavx512bf16; kernels/cpu/peer.cc calls it after checking the
// CPU. A register block of up to 8 rows x 32 columns (16 zmm accumulators) walks the pairs: per
// pair, two 64-byte loads of B, one broadcast of A per row, one vdpbf16ps per accumulator.
// Column panels are the outer loop, so a panel's pairs (2 x 16 x pairs x 4 bytes, 128 KiB for the
// query projection at D = 2048) stay in L2 across the rows.
// GCC 12's -Wuninitialized false positive on the intrinsics' own _mm512_undefined_*() operands:
// kernels/cpu/peer_avx512.cc says why it is silenced around the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "kernels/cpu/peer_kernels.h"

namespace trove::avx512bf16 {

namespace {

// Not std::min: no inline function of the standard library in an ISA-specific file
// (kernels/CMakeLists.txt says why).
inline int64_t smaller(int64_t a, int64_t b) {
  return a < b ? a : b;
}

constexpr int64_t kRows = 8;    // rows of a register block
constexpr int64_t kPanel = 16;  // columns of a panel (one zmm of fp32)

// kR rows x kP panels of C from A's rows at `a` and the panels at `b` (consecutive panels are
// `pairs * 16` uint32 apart); the last panel's columns beyond `last_mask` are not stored.
template <int kR, int kP>
void block(int64_t pairs, const uint32_t* a, int64_t lda, const uint32_t* b, float* c, int64_t ldc,
           __mmask16 last_mask) {
  __m512 acc[kR][kP];
  for (int r = 0; r < kR; ++r) {
    for (int q = 0; q < kP; ++q) acc[r][q] = _mm512_setzero_ps();
  }
  const int64_t panel_stride = pairs * kPanel;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[kP];
    for (int q = 0; q < kP; ++q) {
      bv[q] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + q * panel_stride + p * kPanel));
    }
    for (int r = 0; r < kR; ++r) {
      const __m512bh av =
          reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * lda + p])));
      for (int q = 0; q < kP; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], av, bv[q]);
    }
  }
  for (int r = 0; r < kR; ++r) {
    for (int q = 0; q < kP; ++q) {
      const __mmask16 mask = q == kP - 1 ? last_mask : static_cast<__mmask16>(0xffff);
      _mm512_mask_storeu_ps(c + r * ldc + q * kPanel, mask, acc[r][q]);
    }
  }
}

template <int kP>
void rows_block(int64_t rows, int64_t pairs, const uint32_t* a, int64_t lda, const uint32_t* b,
                float* c, int64_t ldc, __mmask16 last_mask) {
  switch (rows) {
    case 8:
      return block<8, kP>(pairs, a, lda, b, c, ldc, last_mask);
    case 7:
      return block<7, kP>(pairs, a, lda, b, c, ldc, last_mask);
    case 6:
      return block<6, kP>(pairs, a, lda, b, c, ldc, last_mask);
    case 5:
      return block<5, kP>(pairs, a, lda, b, c, ldc, last_mask);
    case 4:
      return block<4, kP>(pairs, a, lda, b, c, ldc, last_mask);
    case 3:
      return block<3, kP>(pairs, a, lda, b, c, ldc, last_mask);
    case 2:
      return block<2, kP>(pairs, a, lda, b, c, ldc, last_mask);
    default:
      return block<1, kP>(pairs, a, lda, b, c, ldc, last_mask);
  }
}

}  // namespace

void gemm_nt(int64_t m, int64_t n, int64_t pairs, const uint32_t* a, int64_t lda, const uint32_t* b,
             float* c, int64_t ldc) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  for (int64_t p0 = 0; p0 < panels; p0 += 2) {
    const int64_t np = smaller(2, panels - p0);
    const int64_t last_cols = smaller(kPanel, n - (p0 + np - 1) * kPanel);
    const auto last_mask = static_cast<__mmask16>((1u << last_cols) - 1u);
    const uint32_t* bp = b + p0 * pairs * kPanel;
    for (int64_t r0 = 0; r0 < m; r0 += kRows) {
      const int64_t rows = smaller(kRows, m - r0);
      float* cb = c + r0 * ldc + p0 * kPanel;
      if (np == 2) {
        rows_block<2>(rows, pairs, a + r0 * lda, lda, bp, cb, ldc, last_mask);
      } else {
        rows_block<1>(rows, pairs, a + r0 * lda, lda, bp, cb, ldc, last_mask);
      }
    }
  }
}

}  // namespace trove::avx512bf16
