// Internal to the optimized CPU PEER layer (kernels/cpu/peer.cc): the inner loops it
// dispatches to, one table per CpuPath (kernels/cpu/quant.h): portable scalar versions in
// peer.cc, AVX2 (+FMA/F16C) in peer_avx2.cc, AVX-VNNI in peer_avxvnni.cc and AVX-512 in
// peer_avx512.cc. Plain C++ with no intrinsics, so any translation unit may include it; each
// SIMD file alone is compiled for its instructions, and is called only on a CPU that has them.
//
// A coded row is one down or up row of a record (kernels/record.h): `codes` of n elements of
// dtype t and, for int8/int4, the row's quant_groups(n) fp16 scales at `scales` (no alignment
// needed). Per 32-element group the float kernels sum code * x in fp32 and multiply the group's
// partial by its scale; a row's zero-padded last group never reads x or writes y past n.
//
// The int8 dot (ExpertDot::kInt8) takes x quantized per 32-group to int8 exactly as an int8
// record row is (fp16 scale absmax/127, codes round(x/d); kernels/quant.h), so its oracle is the
// float dot with x's dequantized row. Every path computes the same bits, in this order:
//   per group g, lane j (0..7): the exact integer sum of code * x_code over elements 4j..4j+3
//     (int4: the signed value q = nibble - 8), converted to fp32;
//   lane accumulators L[16], all 0: L[(g % 2) * 8 + j] = fma(lane, s_g, L[...]) in group
//     order, with s_g = scale_w[g] * scale_x[g] rounded to fp32;
//   v[j] = L[j] + L[8 + j]; then ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)).
// (One AVX2/AVX-VNNI ymm of 8 lanes per group with even and odd accumulators; one AVX-512 zmm of
// two groups.)
#pragma once

#include <cstdint>
#include <vector>

#include "base/dtype.h"

namespace trove::peer_internal {

// A row of activations quantized for the int8 dot: `groups` = quant_groups(n) groups.
struct Int8Activations {
  int64_t groups = 0;
  const int8_t* codes = nullptr;       // groups * 32 codes; those past n are 0
  const float* scales = nullptr;       // groups scales (the fp16 scales, widened)
  const int32_t* int4_bias = nullptr;  // groups * 8: -8 * (sum of lane j's 4 codes), so that an
                                       // int4 lane sums nibble * x_code + bias = q * x_code
};

// One coded row: its fp16 group scales (int8/int4) and its codes.
struct CodedRow {
  const uint8_t* scales = nullptr;
  const uint8_t* codes = nullptr;
};

// B [n, k] (row stride ldb) as gemm_nt_panels takes it: panels of 16 rows of B, each k x 16
// floats (element [j][kk] at ((j / 16) * k + kk) * 16 + j % 16), rows past n zero.
std::vector<float> pack_f32_panels(const float* b, int64_t n, int64_t k, int64_t ldb);

// RoutingPrecision::kInt8's key codes b [n, k] (row stride ldb) as int8_scores takes them: panels
// of 8 rows, each quads = ceil(k / 4) blocks of 8 rows x 4 codes (element [j][kk] at
// ((j / 8) * quads + kk / 4) * 32 + (j % 8) * 4 + kk % 4), with zero codes past k and past n
// rounded up to 16 rows; `offsets` [n rounded up to 16]: 128 * the sum of row j's codes.
struct Int8Panels {
  std::vector<int8_t> codes;
  std::vector<int32_t> offsets;
};
Int8Panels pack_int8_panels(const int8_t* b, int64_t n, int64_t k, int64_t ldb);

// The most rows coded_dots and int8_dots take at once.
constexpr int kDotRows = 4;

// ExpertDot::kInt8's up rows (kernels/peer.h gives the rule): the levels of the coefficient codes
// and the most slots one integer sum takes (512 * 32767 * 128 < 2^31).
constexpr int kUpLevels = 32767;
constexpr int kUpMaxSlots = 512;

// A token's up-row coefficients for int_up, `count` slots over `groups` groups, each array with
// row stride up_stride(groups) (entries past groups are 0):
struct UpCoefficients {
  int64_t groups = 0;
  int count = 0;
  const int32_t* pairs = nullptr;  // [(count + 1) / 2][stride]: the codes k of slots 2p (low 16
                                   // bits) and 2p + 1 (high 16 bits; 0 past count) of group g
  const int32_t* bias = nullptr;   // [stride]: -8 * sum_r k_rg, so that int4's nibbles u sum as
                                   // their signed codes u - 8
  const float* scales = nullptr;   // [stride]: d_g
};
constexpr int64_t up_stride(int64_t groups) {
  return (groups + 15) / 16 * 16;
}

// The inner loops of one CPU path.
struct PeerKernels {
  // sum_i row[i] * x[i].
  float (*coded_dot)(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n,
                     const float* x);
  // coded_dot of `count` rows (1 <= count <= kDotRows) against the same x, out[r] for rows[r]:
  // each row's bits are coded_dot's (a path may run the rows interleaved, so that one row's
  // accumulation chain waits while another's works).
  void (*coded_dots)(DType t, const CodedRow* rows, int count, int64_t n, const float* x,
                     float* out);
  // y[i] += alpha * row[i].
  void (*coded_axpy)(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n, float alpha,
                     float* y);
  // y[i] += alpha * x[i].
  void (*axpy)(float alpha, const float* x, int64_t n, float* y);
  // Indices of the kp largest of s[0..n), best first; ties: lower index first (an element
  // enters only when strictly greater than the kp-th kept): top_indices_ref's answer. Every path
  // gives portable_top_indices' indices, NaNs included (a NaN among the first kp stays in the
  // list, one later never enters). REQUIRES: 1 <= kp <= n.
  void (*top_indices)(const float* s, int64_t n, int64_t kp, int64_t* out);
  // The k best of the kp^2 sums s0[top0[a]] + s1[top1[b]] (top0, top1: the halves' top_indices,
  // best first), best first, ties lower id top0[a] * n + top1[b] first: ids[0..k) and
  // scores[0..k), merge_top_ref's answer. Every path gives portable_merge_top's result, NaNs
  // included. REQUIRES: 1 <= k <= kp^2.
  void (*merge_top)(const float* s0, const float* s1, const int64_t* top0, const int64_t* top1,
                    int64_t kp, int64_t n, int64_t k, int64_t* ids, float* scores);
  // sum_i row[i] * x[i] for an int8 or int4 row (t) against x quantized (above).
  // REQUIRES: t is kI8 or kI4; x.groups == quant_groups(n).
  float (*int8_dot)(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n,
                    const Int8Activations& x);
  // int8_dot of `count` rows (1 <= count <= kDotRows), as coded_dots is to coded_dot.
  void (*int8_dots)(DType t, const CodedRow* rows, int count, int64_t n, const Int8Activations& x,
                    float* out);
  // ExpertDot::kInt8's quantizer of a token's xhat (n elements, groups = quant_groups(n)): codes
  // [groups * 32] (0 past n) and half_scales [groups] by quantize_row_int8, scales [groups]
  // widened, int4_bias [groups * 8] as Int8Activations defines it. False, with nothing usable
  // written, when x fails quant_check_range for int8 (non-finite or beyond quant_max_abs).
  bool (*quantize_activations)(const float* x, int64_t n, int8_t* codes, uint16_t* half_scales,
                               float* scales, int32_t* int4_bias);
  // RoutingPrecision::kInt8's integer products for a few activation rows (decoding), where
  // oneDNN's u8s8s32 GEMM costs ~0.15 ms of setup: c[i * ldc + j] = sum_kk (a[i * lda + kk] -
  // 128) * b[j * ldb + kk] for i < m, j < n, given b_offsets[j] = 128 * (sum of b's row j), exact
  // (the bits of blas::gemm_nt_int8). nullptr on paths without it.
  void (*int8_products_few)(int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda,
                            const int8_t* b, int64_t ldb, const int32_t* b_offsets, int32_t* c,
                            int64_t ldc);
  // RoutingPrecision::kF32's router products in a fixed order: C[m, n] (row stride ldc) =
  // A[m, k] (row stride lda) B[n, k]^T with B packed by pack_f32_panels; each element is one
  // fma chain over k = 0, 1, ... from 0, so no bit depends on m, on the row's place in A, on
  // the blocking or on the thread. nullptr on paths without it: they use the BLAS.
  void (*gemm_nt_panels)(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                         const float* b_panels, float* c, int64_t ldc);
  // RoutingPrecision::kInt8's sub-key scores of a block, the integer GEMM and scale_products in
  // one pass: c[i * ldc + j] = (float(acc) * scale_a[i]) * scale_b[j] for i < m, j < n, with
  // acc = sum_kk (a[i * lda + kk] - 128) * b[j][kk] exact and b packed by pack_int8_panels: the
  // bits of blas::gemm_nt_int8 followed by scale_products. nullptr on paths without it.
  // REQUIRES: the codes of b in [-64, 64] (kRoutingWeightLevels).
  void (*int8_scores)(int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda,
                      const Int8Panels& b, const float* scale_a, const float* scale_b, float* c,
                      int64_t ldc);
  // RoutingPrecision::kInt8's products from the integer GEMM: c[i * ldc + j] =
  // (float(acc[i * n + j]) * scale_a[i]) * scale_b[j], each multiply rounded to fp32.
  void (*scale_products)(const int32_t* acc, int64_t m, int64_t n, const float* scale_a,
                         const float* scale_b, float* c, int64_t ldc);
  // RoutingPrecision::kInt8's row quantizer (kernels/peer.h's rule): codes[0..n) and the
  // returned scale. REQUIRES: levels is 127 or 64.
  float (*routing_quantize)(const float* v, int64_t n, int levels, int8_t* codes);
  // ExpertDot::kInt8's coefficients of a token's up rows (rows[count], 1 <= count <=
  // kUpMaxSlots, int8/int4, ga[r] != 0): k, bias and d by the rule in kernels/peer.h, into
  // pairs, bias and scales as UpCoefficients lays them out; work holds (count + 1) * stride
  // floats. False, with nothing usable written, when some c_rg is not finite.
  bool (*up_coefficients)(const CodedRow* rows, const float* ga, int count, int64_t n, float* work,
                          int32_t* pairs, int32_t* bias, float* scales);
  // y[0..n) = the rows summed with coefficients c (kernels/peer.h), y overwritten (nothing past
  // n written): exact integer sums, so every path gives the same bits.
  void (*int_up)(DType t, const CodedRow* rows, int64_t n, const UpCoefficients& c, float* y);
};

// quantize_activations in portable code (kernels/cpu/peer.cc), for the paths without their own.
bool portable_quantize_activations(const float* x, int64_t n, int8_t* codes, uint16_t* half_scales,
                                   float* scales, int32_t* int4_bias);

// up_coefficients and int_up in portable code (kernels/cpu/peer.cc).
bool portable_up_coefficients(const CodedRow* rows, const float* ga, int count, int64_t n,
                              float* work, int32_t* pairs, int32_t* bias, float* scales);
void portable_int_up(DType t, const CodedRow* rows, int64_t n, const UpCoefficients& c, float* y);

// top_indices in portable code (kernels/cpu/peer.cc): the insertion scan, the scalar path's.
void portable_top_indices(const float* s, int64_t n, int64_t kp, int64_t* out);

// merge_top in portable code (kernels/cpu/peer.cc): a heap of the k best, rows and columns
// scanned best first.
void portable_merge_top(const float* s0, const float* s1, const int64_t* top0, const int64_t* top1,
                        int64_t kp, int64_t n, int64_t k, int64_t* ids, float* scores);

// scale_products in portable code (kernels/cpu/peer.cc).
void portable_scale_products(const int32_t* acc, int64_t m, int64_t n, const float* scale_a,
                             const float* scale_b, float* c, int64_t ldc);

// The insertion step of the top-k' scan (portable_top_indices in kernels/cpu/peer.cc) with the
// kept scores held in kept[] beside their indices in out[]: s[i] enters when the list (*size
// entries, kp <= 16) is not full or when it beats the kp-th kept strictly, after every kept score
// not smaller. static: each SIMD file keeps its own copy, compiled for its instructions.
static inline void top_insert(const float* s, int64_t i, int64_t kp, float* kept, int64_t* out,
                              int64_t* size) {
  const float v = s[i];
  if (*size == kp && !(v > kept[kp - 1])) return;
  int64_t pos = *size < kp ? (*size)++ : kp - 1;
  while (pos > 0 && kept[pos - 1] < v) {
    kept[pos] = kept[pos - 1];
    out[pos] = out[pos - 1];
    --pos;
  }
  kept[pos] = v;
  out[pos] = i;
}

// coded_dots and int8_dots one row after another, for the paths without interleaved versions.
template <float (*Dot)(DType, const uint8_t*, const uint8_t*, int64_t, const float*)>
void dots_one_by_one(DType t, const CodedRow* rows, int count, int64_t n, const float* x,
                     float* out) {
  for (int r = 0; r < count; ++r) out[r] = Dot(t, rows[r].scales, rows[r].codes, n, x);
}
template <float (*Dot)(DType, const uint8_t*, const uint8_t*, int64_t, const Int8Activations&)>
void int8_dots_one_by_one(DType t, const CodedRow* rows, int count, int64_t n,
                          const Int8Activations& x, float* out) {
  for (int r = 0; r < count; ++r) out[r] = Dot(t, rows[r].scales, rows[r].codes, n, x);
}

}  // namespace trove::peer_internal

namespace trove::avx2 {
// REQUIRES: the CPU supports AVX2, FMA and F16C.
const peer_internal::PeerKernels& peer_kernels();
}  // namespace trove::avx2

namespace trove::avxvnni {
// The AVX2 table with the int8 dot on AVX-VNNI. REQUIRES: AVX2, FMA, F16C and AVX-VNNI.
const peer_internal::PeerKernels& peer_kernels();
}  // namespace trove::avxvnni

namespace trove::avx512 {
// REQUIRES: AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
const peer_internal::PeerKernels& peer_kernels();
}  // namespace trove::avx512

namespace trove::avx512bf16 {
// The router's products in RoutingPrecision::kBf16 (kernels/cpu/peer.cc): C[m, n] (row stride
// ldc) = sum over pairs p of A[i][p] . B[j][p], fp32 accumulation with vdpbf16ps. A pair is two
// bf16 values in a uint32 (element 2p in the low half; an odd k's last pair has a zero high
// half). A: m rows of `pairs` pairs, row stride lda (in pairs). B packed in panels of 16 columns:
// b[(panel * pairs + p) * 16 + lane] is column panel * 16 + lane's pair p (columns past n zero).
// Each C element is its pairs summed in order into one fp32 accumulator starting at 0, so it does
// not depend on m, on the blocking or on which thread runs it.
// REQUIRES: the CPU supports AVX-512 F/BW/VL and AVX512_BF16; m, n >= 0, pairs >= 1.
void gemm_nt(int64_t m, int64_t n, int64_t pairs, const uint32_t* a, int64_t lda, const uint32_t* b,
             float* c, int64_t ldc);
}  // namespace trove::avx512bf16
