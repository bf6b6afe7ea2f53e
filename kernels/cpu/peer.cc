// The optimized CPU PEER layer: the one dispatch point between the AVX2 inner loops
// (peer_avx2.cc) and their portable scalar versions below, the thread partitioning, and the
// routing and backward logic both paths share.
//
// Thread-count independence, step by step: every parallel loop is a base/thread_pool.h
// parallel_for whose chunks write disjoint outputs, each output computed in a fixed order.
//   norm, experts: chunks of tokens; each token's row by one thread.
//   query, route: on the AVX2 and AVX-512 paths the fp32 router products run on gemm_nt_panels
//     (peer_avx2.cc, peer_avx512.cc: the same bits), where each output is one fma chain over k in
//     order: no bit depends on the block, the batch or the thread, and a short block is not padded.
//     Elsewhere: fixed blocks of tokens from the batch's first, one single-threaded BLAS call per
//     block (kernels/cpu/blas.h), so chunk boundaries change no bit. Route blocks are kRouteBlock
//     (64) rows; the query runs 256-row blocks, then 64-row ones, where the BLAS rounds a row alike
//     in both (kQueryBlock says why and how that is probed). A shorter last block is zero-padded to
//     16, 32, 48 or 64 rows, the fewest whose calls a probe finds rounding a row as 64-row calls do
//     (short_block_rows; the library picks its kernels by shape): a token's q and scores do not
//     depend on the thread count, nor on the batch (a one-token run equals the first token of a
//     longer one). RoutingPrecision::kBf16 on the AVX512_BF16 kernel needs no padding: each of its
//     outputs is a fixed-order sum. kInt8's products are exact integers: on paths with int8_scores
//     (AVX2 and up) the sub-key scores of kScoreTile tokens are computed and selected at once,
//     while in L1.
//   route's selection (top-k' per half, the merge of the halves, the gates) is per (token,
//     head), by rules that give one answer whatever the path (kernels/cpu/peer_kernels.h).
//   backward: per-token work (chunks of tokens) writes per-token or per-slot results; the
//     sums over tokens are then formed by partitioning the summed-into rows (rows of W_q,
//     columns of gamma, key rows, unique experts), each row adding its terms in token order.
//     The row-sparse expert gradients come from sorting (expert id, slot) pairs: no dense
//     [N, D] buffer and no atomics.
#include "kernels/cpu/peer.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "base/check.h"
#include "base/half.h"
#include "base/random.h"
#include "base/thread_pool.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/peer_kernels.h"
#include "kernels/cpu/quant.h"
#include "kernels/quant.h"

namespace trove {

namespace {

using peer_internal::CodedRow;
using peer_internal::Int8Activations;
using peer_internal::PeerKernels;

// ---- scalar inner loops --------------------------------------------------------------------

template <DType kType>
float scalar_float_code(const uint8_t* codes, int64_t i) {
  if constexpr (kType == DType::kF32) {
    float v;
    std::memcpy(&v, codes + 4 * i, sizeof(v));
    return v;
  } else {
    static_assert(kType == DType::kF16 || kType == DType::kBF16);
    uint16_t h;
    std::memcpy(&h, codes + 2 * i, sizeof(h));
    return kType == DType::kF16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
  }
}

template <DType kType>
float scalar_float_dot(const uint8_t* codes, int64_t n, const float* x) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += scalar_float_code<kType>(codes, i) * x[i];
  return s;
}

template <DType kType>
void scalar_float_axpy(const uint8_t* codes, int64_t n, float alpha, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * scalar_float_code<kType>(codes, i);
}

// Code j (0..31, unscaled) of the group starting at `group`.
int scalar_quant_code(DType t, const uint8_t* group, int64_t j) {
  if (t == DType::kI8) return static_cast<int8_t>(group[j]);
  return j < kQuantGroup / 2 ? (group[j] & 0x0f) - 8 : (group[j - kQuantGroup / 2] >> 4) - 8;
}

float scalar_scale(const uint8_t* scales, int64_t g) {
  uint16_t h;
  std::memcpy(&h, scales + 2 * g, sizeof(h));
  return fp16_to_fp32(h);
}

int64_t group_code_bytes(DType t) {
  return t == DType::kI8 ? kQuantGroup : kQuantGroup / 2;
}

float scalar_coded_dot(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n,
                       const float* x) {
  switch (t) {
    case DType::kF32:
      return scalar_float_dot<DType::kF32>(codes, n, x);
    case DType::kF16:
      return scalar_float_dot<DType::kF16>(codes, n, x);
    case DType::kBF16:
      return scalar_float_dot<DType::kBF16>(codes, n, x);
    case DType::kI8:
    case DType::kI4:
      break;
  }
  float acc = 0.0f;
  for (int64_t g = 0; g < quant_groups(n); ++g) {
    const uint8_t* group = codes + g * group_code_bytes(t);
    const int64_t base = g * kQuantGroup;
    const int64_t len = std::min<int64_t>(kQuantGroup, n - base);
    float partial = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
      partial += static_cast<float>(scalar_quant_code(t, group, j)) * x[base + j];
    }
    acc += partial * scalar_scale(scales, g);
  }
  return acc;
}

void scalar_coded_axpy(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n, float alpha,
                       float* y) {
  switch (t) {
    case DType::kF32:
      return scalar_float_axpy<DType::kF32>(codes, n, alpha, y);
    case DType::kF16:
      return scalar_float_axpy<DType::kF16>(codes, n, alpha, y);
    case DType::kBF16:
      return scalar_float_axpy<DType::kBF16>(codes, n, alpha, y);
    case DType::kI8:
    case DType::kI4:
      break;
  }
  for (int64_t g = 0; g < quant_groups(n); ++g) {
    const uint8_t* group = codes + g * group_code_bytes(t);
    const int64_t base = g * kQuantGroup;
    const int64_t len = std::min<int64_t>(kQuantGroup, n - base);
    const float alpha_d = alpha * scalar_scale(scales, g);
    for (int64_t j = 0; j < len; ++j) {
      y[base + j] += alpha_d * static_cast<float>(scalar_quant_code(t, group, j));
    }
  }
}

void scalar_axpy(float alpha, const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

// Keeps a sorted list and scans ascending, so an element enters only when strictly greater than
// the list's last (an equal score has a higher index) and goes after every element not smaller.
void peer_internal::portable_top_indices(const float* s, int64_t n, int64_t kp, int64_t* out) {
  int64_t size = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = s[i];
    if (size == kp && !(v > s[out[kp - 1]])) continue;
    int64_t pos = size < kp ? size++ : kp - 1;
    while (pos > 0 && s[out[pos - 1]] < v) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = i;
  }
}

namespace {

// The int8 dot in the order kernels/cpu/peer_kernels.h fixes for every path.
float scalar_int8_dot(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n,
                      const Int8Activations& x) {
  (void)n;
  float lanes[16] = {};
  for (int64_t g = 0; g < x.groups; ++g) {
    const uint8_t* group = codes + g * group_code_bytes(t);
    const int8_t* xq = x.codes + g * kQuantGroup;
    const float s = scalar_scale(scales, g) * x.scales[g];
    for (int j = 0; j < 8; ++j) {
      int32_t lane = 0;
      for (int b = 0; b < 4; ++b) lane += scalar_quant_code(t, group, 4 * j + b) * xq[4 * j + b];
      float& acc = lanes[(g % 2) * 8 + j];
      acc = std::fma(static_cast<float>(lane), s, acc);
    }
  }
  float v[8];
  for (int j = 0; j < 8; ++j) v[j] = lanes[j] + lanes[8 + j];
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

float scalar_routing_quantize(const float* v, int64_t n, int levels, int8_t* codes) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(v[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  std::memset(codes, 0, static_cast<size_t>(std::max<int64_t>(n, 0)));
  if (!finite) return std::numeric_limits<float>::quiet_NaN();
  const float lv = static_cast<float>(levels);
  const float inv = lv / amax;
  if (amax == 0.0f || !std::isfinite(inv)) return 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    codes[i] = static_cast<int8_t>(std::min(std::max(std::rint(v[i] * inv), -lv), lv));
  }
  return amax / lv;
}

}  // namespace

bool peer_internal::portable_quantize_activations(const float* x, int64_t n, int8_t* codes,
                                                  uint16_t* half_scales, float* scales,
                                                  int32_t* int4_bias) {
  if (!quant_check_range(DType::kI8, x, n).ok()) return false;
  quantize_row_int8(x, n, half_scales, codes);
  const int64_t groups = quant_groups(n);
  for (int64_t g = 0; g < groups; ++g) scales[g] = fp16_to_fp32(half_scales[g]);
  for (int64_t lane = 0; lane < groups * 8; ++lane) {
    const int8_t* q = &codes[4 * lane];
    int4_bias[lane] = -8 * (q[0] + q[1] + q[2] + q[3]);
  }
  return true;
}

bool peer_internal::portable_up_coefficients(const CodedRow* rows, const float* ga, int count,
                                             int64_t n, float* work, int32_t* pairs, int32_t* bias,
                                             float* scales) {
  const int64_t groups = quant_groups(n), stride = up_stride(groups);
  float* amax = scales;  // d_g replaces a_g at the end
  float* inv = work + count * stride;
  std::fill(amax, amax + stride, 0.0f);
  for (int r = 0; r < count; ++r) {
    float* c = work + r * stride;
    for (int64_t g = 0; g < stride; ++g) {
      c[g] = g < groups ? ga[r] * scalar_scale(rows[r].scales, g) : 0.0f;
      if (!std::isfinite(c[g])) return false;
      amax[g] = std::max(amax[g], std::fabs(c[g]));
    }
  }
  const float levels = static_cast<float>(kUpLevels);
  for (int64_t g = 0; g < stride; ++g) {
    inv[g] = levels / amax[g];
    if (amax[g] == 0.0f || !std::isfinite(inv[g])) inv[g] = 0.0f;
    scales[g] = amax[g] / levels;
    bias[g] = 0;
  }
  for (int p = 0; p < (count + 1) / 2; ++p) {
    for (int64_t g = 0; g < stride; ++g) {
      int32_t k[2] = {0, 0};
      for (int h = 0; h < 2 && 2 * p + h < count; ++h) {
        const float v = std::rint(work[(2 * p + h) * stride + g] * inv[g]);
        k[h] = static_cast<int32_t>(std::min(std::max(v, -levels), levels));
      }
      bias[g] -= 8 * (k[0] + k[1]);
      pairs[p * stride + g] =
          static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(k[0])) |
                               static_cast<uint32_t>(static_cast<uint16_t>(k[1])) << 16);
    }
  }
  return true;
}

void peer_internal::portable_int_up(DType t, const CodedRow* rows, int64_t n,
                                    const UpCoefficients& c, float* y) {
  const int64_t stride = up_stride(c.groups);
  for (int64_t g = 0; g < c.groups; ++g) {
    const int64_t base = g * kQuantGroup;
    const int64_t len = std::min<int64_t>(kQuantGroup, n - base);
    for (int64_t j = 0; j < len; ++j) {
      int32_t acc = t == DType::kI4 ? c.bias[g] : 0;
      for (int r = 0; r < c.count; ++r) {
        const uint32_t pair = static_cast<uint32_t>(c.pairs[r / 2 * stride + g]);
        const int32_t k = static_cast<int16_t>(r % 2 == 0 ? pair & 0xffff : pair >> 16);
        const uint8_t* group = rows[r].codes + g * group_code_bytes(t);
        // int4: the nibble u, the bias adding -8 * k (scalar_quant_code is u - 8).
        const int32_t q =
            t == DType::kI4 ? scalar_quant_code(t, group, j) + 8 : scalar_quant_code(t, group, j);
        acc += k * q;
      }
      y[base + j] = static_cast<float>(acc) * c.scales[g];
    }
  }
}

std::vector<float> peer_internal::pack_f32_panels(const float* b, int64_t n, int64_t k,
                                                  int64_t ldb) {
  std::vector<float> out(static_cast<size_t>((n + 15) / 16 * k * 16), 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    float* panel = &out[static_cast<size_t>(j / 16 * k * 16 + j % 16)];
    for (int64_t kk = 0; kk < k; ++kk) panel[kk * 16] = b[j * ldb + kk];
  }
  return out;
}

namespace {

// 128 * the code sum of each of `rows` rows of n codes (row stride ld): what the integer
// products of activations stored as code + 128 subtract.
std::vector<int32_t> code_offsets(const int8_t* codes, int64_t rows, int64_t n, int64_t ld) {
  std::vector<int32_t> out(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    int32_t sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += codes[r * ld + j];
    out[static_cast<size_t>(r)] = 128 * sum;
  }
  return out;
}

}  // namespace

peer_internal::Int8Panels peer_internal::pack_int8_panels(const int8_t* b, int64_t n, int64_t k,
                                                          int64_t ldb) {
  // int8_scores' 32-bit sums of (code + 128) * code: 255 * 64 * k < 2^31.
  TROVE_CHECK_MSG(k < (int64_t{1} << 31) / (255 * 64), "pack_int8_panels: k = %lld is too long",
                  static_cast<long long>(k));
  const int64_t quads = (k + 3) / 4, rows = (n + 15) / 16 * 16;
  Int8Panels out;
  out.codes.assign(static_cast<size_t>(rows * quads * 4), 0);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t kk = 0; kk < k; ++kk) {
      out.codes[static_cast<size_t>(((j / 8) * quads + kk / 4) * 32 + (j % 8) * 4 + kk % 4)] =
          b[j * ldb + kk];
    }
  }
  out.offsets = code_offsets(b, n, k, ldb);
  out.offsets.resize(static_cast<size_t>(rows), 0);  // the padding rows' codes are zero
  return out;
}

// C[i, j] = (float(acc[i, j]) * scale_a[i]) * scale_b[j], rounded once per operation.
void peer_internal::portable_scale_products(const int32_t* acc, int64_t m, int64_t n,
                                            const float* scale_a, const float* scale_b, float* c,
                                            int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    const int32_t* a = acc + i * n;
    float* out = c + i * ldc;
    const float sa = scale_a[i];
    for (int64_t j = 0; j < n; ++j) {
      const float scaled = static_cast<float>(a[j]) * sa;
      out[j] = scaled * scale_b[j];
    }
  }
}

namespace {

struct Candidate {
  float score;
  int64_t id;
};

// Score descending, then id ascending: the order of routing slots.
bool better(const Candidate& a, const Candidate& b) {
  return a.score != b.score ? a.score > b.score : a.id < b.id;
}

}  // namespace

// A heap of the k best (its front the worst kept). Rows and columns are scanned best first and
// a scan stops at the first sum strictly below the worst kept: fp32 addition is monotone, so
// nothing later in that row (or, for the first column, in any later row) can enter, ties
// included.
void peer_internal::portable_merge_top(const float* s0, const float* s1, const int64_t* top0,
                                       const int64_t* top1, int64_t kp, int64_t n, int64_t k,
                                       int64_t* ids, float* scores) {
  constexpr int64_t kOnStack = 64;
  Candidate on_stack[kOnStack];
  std::vector<Candidate> on_heap(static_cast<size_t>(k > kOnStack ? k : 0));
  Candidate* const best = k > kOnStack ? on_heap.data() : on_stack;
  int64_t size = 0;
  for (int64_t a = 0; a < kp; ++a) {
    const float si = s0[top0[a]];
    if (size == k && si + s1[top1[0]] < best[0].score) break;
    for (int64_t b = 0; b < kp; ++b) {
      const Candidate c{si + s1[top1[b]], top0[a] * n + top1[b]};
      if (size < k) {
        best[size++] = c;
        std::push_heap(best, best + size, better);
        continue;
      }
      if (c.score < best[0].score) break;
      if (better(c, best[0])) {
        std::pop_heap(best, best + size, better);
        best[size - 1] = c;
        std::push_heap(best, best + size, better);
      }
    }
  }
  std::sort_heap(best, best + size, better);
  for (int64_t s = 0; s < size; ++s) {
    ids[s] = best[s].id;
    scores[s] = best[s].score;
  }
}

namespace {

constexpr PeerKernels kScalarKernels = {
    .coded_dot = scalar_coded_dot,
    .coded_dots = peer_internal::dots_one_by_one<scalar_coded_dot>,
    .coded_axpy = scalar_coded_axpy,
    .axpy = scalar_axpy,
    .top_indices = peer_internal::portable_top_indices,
    .merge_top = peer_internal::portable_merge_top,
    .int8_dot = scalar_int8_dot,
    .int8_dots = peer_internal::int8_dots_one_by_one<scalar_int8_dot>,
    .quantize_activations = peer_internal::portable_quantize_activations,
    .int8_products_few = nullptr,
    .gemm_nt_panels = nullptr,
    .int8_scores = nullptr,
    .scale_products = peer_internal::portable_scale_products,
    .routing_quantize = scalar_routing_quantize,
    .up_coefficients = peer_internal::portable_up_coefficients,
    .int_up = peer_internal::portable_int_up,
};

const PeerKernels& kernels() {
  switch (active_cpu_path()) {
    case CpuPath::kAvx512:
      return avx512::peer_kernels();
    case CpuPath::kAvxVnni:
      return avxvnni::peer_kernels();
    case CpuPath::kAvx2:
      return avx2::peer_kernels();
    case CpuPath::kAuto:
    case CpuPath::kScalar:
      break;
  }
  return kScalarKernels;
}

// One token's xhat quantized for the int8 dot (kernels/cpu/peer_kernels.h), in buffers kept
// across the tokens of a thread.
class TokenActivations {
 public:
  explicit TokenActivations(int64_t n)
      : n_(n),
        groups_(quant_groups(n)),
        codes_(static_cast<size_t>(groups_ * kQuantGroup), 0),
        half_scales_(static_cast<size_t>(groups_)),
        scales_(static_cast<size_t>(groups_)),
        int4_bias_(static_cast<size_t>(groups_ * 8)) {}

  // False (and nothing usable) when x is out of the int8 quantizer's range (non-finite, or
  // beyond quant_max_abs): the caller takes the float dot for this token.
  bool quantize(const PeerKernels& kr, const float* x) {
    return kr.quantize_activations(x, n_, codes_.data(), half_scales_.data(), scales_.data(),
                                   int4_bias_.data());
  }

  Int8Activations view() const {
    return {groups_, codes_.data(), scales_.data(), int4_bias_.data()};
  }

 private:
  int64_t n_, groups_;
  std::vector<int8_t> codes_;  // past n_: zeros, never written
  std::vector<uint16_t> half_scales_;
  std::vector<float> scales_;
  std::vector<int32_t> int4_bias_;
};

// ---- shared helpers ------------------------------------------------------------------------

void check_common(const PeerConfig& c, const RecordLayout* layout) {
  TROVE_CHECK(c.dim > 0 && c.dim_out > 0 && c.n_keys > 0 && c.topk > 0 && c.topk_per_half > 0);
  TROVE_CHECK(c.topk_per_half <= c.n_keys && c.topk <= c.topk_per_half * c.topk_per_half);
  TROVE_CHECK(c.expert_width == 1);
  if (layout != nullptr) {
    TROVE_CHECK(layout->dim == c.dim && layout->dim_out == c.dim_out && layout->width == 1);
  }
}

void check_routing(const PeerConfig& c, const PeerRouting& routing) {
  TROVE_CHECK(routing.heads == c.heads && routing.topk == c.topk);
  TROVE_CHECK(routing.slots() == static_cast<size_t>(routing.tokens * c.heads * c.topk));
}

// A record's down row and up row as coded rows.
CodedRow down_row(const RecordLayout& l, const uint8_t* record) {
  return {record + l.down_scales_offset, record + l.down_codes_offset};
}
CodedRow up_row(const RecordLayout& l, const uint8_t* record) {
  return {record + l.up_scales_offset, record + l.up_codes_offset};
}

// 1 / sqrt(mean(x^2) + eps), in double as the oracle computes it.
double inverse_rms(const float* x, int64_t D, float eps) {
  double ss = 0;
  for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(x[d]) * x[d];
  return 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
}

// d loss / d score of each of a head's k slots, given dg = d loss / d gate.
void gate_backward(Gate gate, const float* scores, const float* gates, const double* dg, int64_t k,
                   double* dscore) {
  double g_dg = 0;
  if (gate == Gate::kSoftmax) {
    for (int64_t s = 0; s < k; ++s) g_dg += gates[s] * dg[s];
  }
  for (int64_t s = 0; s < k; ++s) {
    switch (gate) {
      case Gate::kSoftmax:
        dscore[s] = gates[s] * (dg[s] - g_dg);
        break;
      case Gate::kRelu:
        dscore[s] = scores[s] > 0 ? dg[s] : 0.0;
        break;
      case Gate::kSigmoid:
        dscore[s] = dg[s] * gates[s] * (1.0 - gates[s]);
        break;
    }
  }
}

// Routing runs in blocks of kRouteBlock tokens counted from the batch's first token: one BLAS
// call per block (and per head and half for the sub-key scores), each on one thread. The
// blocks, and so every bit of q and of the scores, do not depend on the thread count.
// 64 tokens: the sub-scores of a block's (head, half) pair, 64 x n floats, stay in L2 up to
// n = 2048 while the two halves are merged, and a block is big enough for the GEMM kernels.
constexpr int64_t kRouteBlock = 64;

// Tokens whose sub-scores the SIMD paths (int8_scores, gemm_nt_panels) compute at once before
// they are selected: 2 x 4 x n floats, 32 KB at n = 1024, so the top-k' reads them from L1.
constexpr int64_t kScoreTile = 4;

// Up to this many tokens a block of the int8 query runs PeerKernels::int8_products_few where the
// path has it: one token's query took 0.19 ms through oneDNN, most of it the call's setup; at 16
// tokens 0.13 ms against oneDNN's 0.26 (D 2048, one thread), at 32 about even.
constexpr int64_t kFewInt8Rows = 16;

int64_t route_blocks(int64_t T) {
  return (T + kRouteBlock - 1) / kRouteBlock;
}

// Tokens per block where no bit depends on the block (the fixed-order fp32 GEMM, the bf16
// kernel, exact int8 products): kRouteBlock, or fewer (a multiple of 4) so that a small batch
// still gives every thread a block. (A 64-token batch ran on one of the two cores.)
int64_t free_block_rows(int64_t T, int threads) {
  const int64_t workers = resolve_thread_count(threads);
  const int64_t per = (T + workers - 1) / workers;
  return std::clamp<int64_t>((per + 3) / 4 * 4, 4, kRouteBlock);
}

// The query projection (K = D, the router's big GEMM) runs whole blocks of kQueryBlock tokens
// first, then the rest in kRouteBlock blocks as above: oneDNN's single-threaded sgemm ran
// [M, 2048] x [2048, 512] at 85-95 GFLOP/s for M = 64 and 150 for M = 256 on one core of the
// dev VM (the sub-key scores, K = dk, gain little). The blocks depend on T only, never on the
// thread count. A token's q does not depend on its batch only if the BLAS rounds a row alike in
// 64- and 256-row calls. oneDNN's AVX-512 sgemm does on every shape measured; its AVX2 kernels
// (an AVX2-only CPU, or ONEDNN_MAX_CPU_ISA=AVX2) do not. So the 256-row blocks are used only for
// a shape where a probe finds the two alike (big_query_block_rounds_alike); elsewhere every block
// has 64 rows. The tests cross both kinds of block under each oneDNN ISA: ctest runs
// QueryAndRoutingOfATokenDoNotDependOnItsBatch again with ONEDNN_MAX_CPU_ISA=AVX2 and AVX512_CORE.
constexpr int64_t kQueryBlock = 256;

// True when blas::gemm_nt's calls of `small` rows give the bits that one [big, k] x [k, n] call
// gives the same rows, wherever in the big call those rows sit (a token is at any row of its
// block in one batch and at row 0 of a short block in another), for A's row stride lda and B's
// k as peer_query and peer_route pass them: small calls at offsets 0, 1, 3, 7, ... and the last
// one that fits, compared with the big call's rows there. Probed once per (big, small, k, n,
// lda) and process on pseudo-random operands; a summation order that differs shows in a few of
// the rows of k-term sums, so equal bits mean the same order.
bool blocks_round_alike(int64_t big, int64_t small, int64_t k, int64_t n, int64_t lda) {
  static std::mutex mu;
  static std::map<std::array<int64_t, 5>, bool> probed;
  const std::array<int64_t, 5> key = {big, small, k, n, lda};
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = probed.find(key);
  if (it != probed.end()) return it->second;
  std::vector<float> a(static_cast<size_t>(big * lda)), b(static_cast<size_t>(n * k));
  fill_gaussian(a, 1.0, 1);
  fill_gaussian(b, 1.0, 2);
  std::vector<float> whole(static_cast<size_t>(big * n)), part(static_cast<size_t>(small * n));
  blas::gemm_nt(big, n, k, a.data(), lda, b.data(), k, whole.data(), n);
  bool alike = true;
  std::vector<int64_t> offsets;
  for (int64_t o = 0; o + small <= big; o = 2 * o + 1) offsets.push_back(o);
  offsets.push_back(big - small);
  for (const int64_t o : offsets) {
    blas::gemm_nt(small, n, k, &a[static_cast<size_t>(o * lda)], lda, b.data(), k, part.data(), n);
    alike = alike && std::memcmp(part.data(), &whole[static_cast<size_t>(o * n)],
                                 part.size() * sizeof(float)) == 0;
  }
  probed.emplace(key, alike);
  return alike;
}

bool big_query_block_rounds_alike(int64_t k, int64_t n) {
  return blocks_round_alike(kQueryBlock, kRouteBlock, k, n, k);
}

// The rows of the BLAS call for a batch's short last block of m < kRouteBlock tokens: m padded
// with zero rows to the fewest of 16, 32 or 48 rows whose calls round a row as a kRouteBlock-row
// call does (probed), else to kRouteBlock. A token's q and scores then do not depend on its
// batch, while one token alone (decoding) computes 16 rows rather than 64: oneDNN's AVX-512
// sgemm gives the 64-row bits from 16 rows up (not at 1 to 8, where it takes other kernels),
// its AVX2 one at 16 and 48 but not 32.
int64_t short_block_rows(int64_t m, int64_t k, int64_t n, int64_t lda) {
  for (const int64_t rows : {16, 32, 48}) {
    if (m <= rows && blocks_round_alike(kRouteBlock, rows, k, n, lda)) return rows;
  }
  return kRouteBlock;
}

struct QueryBlock {
  int64_t t0, rows;  // first token, and rows of the BLAS call (big or kRouteBlock)
};

// Blocks of big rows (kQueryBlock or kRouteBlock) from the batch's first token, then the rest
// in kRouteBlock blocks.
int64_t query_blocks(int64_t T, int64_t big) {
  const int64_t whole = T / big;
  return whole + route_blocks(T - whole * big);
}

QueryBlock query_block(int64_t T, int64_t big, int64_t b) {
  const int64_t whole = T / big;
  if (b < whole) return {b * big, big};
  return {whole * big + (b - whole) * kRouteBlock, kRouteBlock};
}

// ---- RoutingPrecision::kBf16 -----------------------------------------------------------------
// On CPUs with AVX512_BF16 (and the avx512 path active) the router's products run on
// avx512bf16::gemm_nt (kernels/cpu/peer_kernels.h), whose every output is its pairs summed in
// order: no padding or fixed blocks needed for thread- or batch-independence. Elsewhere the
// operands are rounded to bf16, held in fp32, and go through the fp32 BLAS path unchanged.
bool bf16_kernel_available() {
  static const bool cpu_has = __builtin_cpu_supports("avx512bf16");
  return cpu_has && active_cpu_path() == CpuPath::kAvx512;
}

uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(fp32_to_bf16(lo)) | (static_cast<uint32_t>(fp32_to_bf16(hi)) << 16);
}

int64_t bf16_pairs(int64_t k) {
  return (k + 1) / 2;
}

// m rows of k floats (row stride lda) as rows of bf16_pairs(k) pairs (row stride bf16_pairs(k)).
void pack_bf16_rows(const float* a, int64_t m, int64_t k, int64_t lda, uint32_t* out) {
  const int64_t pairs = bf16_pairs(k);
  for (int64_t i = 0; i < m; ++i) {
    const float* row = a + i * lda;
    uint32_t* o = out + i * pairs;
    for (int64_t p = 0; p < k / 2; ++p) o[p] = bf16_pair(row[2 * p], row[2 * p + 1]);
    if (k % 2 != 0) o[pairs - 1] = bf16_pair(row[k - 1], 0.0f);
  }
}

// n rows of k floats (row stride ldb) in avx512bf16::gemm_nt's panels of 16 columns.
std::vector<uint32_t> pack_bf16_panels(const float* b, int64_t n, int64_t k, int64_t ldb) {
  const int64_t pairs = bf16_pairs(k), panels = (n + 15) / 16;
  std::vector<uint32_t> out(static_cast<size_t>(panels * pairs * 16), 0);
  std::vector<uint32_t> row(static_cast<size_t>(pairs));
  for (int64_t j = 0; j < n; ++j) {
    pack_bf16_rows(b + j * ldb, 1, k, ldb, row.data());
    uint32_t* panel = &out[static_cast<size_t>((j / 16) * pairs * 16 + j % 16)];
    for (int64_t p = 0; p < pairs; ++p) panel[p * 16] = row[static_cast<size_t>(p)];
  }
  return out;
}

// count floats rounded to bf16, held in fp32.
std::vector<float> rounded_to_bf16(const float* x, int64_t count) {
  std::vector<float> out(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    out[static_cast<size_t>(i)] = bf16_to_fp32(fp32_to_bf16(x[i]));
  return out;
}

// ---- RoutingPrecision::kInt8 -----------------------------------------------------------------
// The weight rows (W_q, the sub-keys) are quantized once per call, the activation rows (xhat, a
// head's half of q) per block, as the GEMM's unsigned operand (code + 128); the exact integer
// products (blas::gemm_nt_int8) are then scaled as kernels/peer.h says. Integer sums are exact,
// so no padding is needed: a token's q and scores do not depend on its batch or on the threads.
// W's rows of n floats quantized by kRoutingWeightLevels' rule: codes [rows, n], scales [rows].
void quantize_weight_rows(const PeerKernels& kr, const float* w, int64_t rows, int64_t n,
                          int threads, std::vector<int8_t>* codes, std::vector<float>* scales) {
  codes->resize(static_cast<size_t>(rows * n));
  scales->resize(static_cast<size_t>(rows));
  parallel_for(rows, threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      (*scales)[static_cast<size_t>(r)] =
          kr.routing_quantize(w + r * n, n, kRoutingWeightLevels, &(*codes)[r * n]);
    }
  });
}

// m activation rows of n floats (row stride ld) as codes + 128, [m, n], and their scales.
void quantize_activation_rows(const PeerKernels& kr, const float* x, int64_t m, int64_t n,
                              int64_t ld, uint8_t* out, float* scales) {
  for (int64_t i = 0; i < m; ++i) {
    uint8_t* row = out + i * n;
    scales[i] = kr.routing_quantize(x + i * ld, n, kRoutingActivationLevels,
                                    reinterpret_cast<int8_t*>(row));
    for (int64_t j = 0; j < n; ++j) row[j] ^= 0x80;  // two's complement code + 128
  }
}

// The down-row dot of one token: on its fp32 xhat, or (ExpertDot::kInt8 on int8/int4 records)
// on xhat quantized once per token and shared by its slots.
class TokenDown {
 public:
  TokenDown(const RecordLayout& layout, const PeerKernels& kr, ExpertDot dot)
      : layout_(layout), kr_(kr) {
    if (dot == ExpertDot::kInt8 && dtype_is_quantized(layout.dtype)) {
      quantized_.emplace_back(layout.dim);
    }
  }

  // Before the token's slots.
  void set_token(const float* xhat_t) {
    xhat_t_ = xhat_t;
    use_int8_ = !quantized_.empty() && quantized_[0].quantize(kr_, xhat_t);
  }

  float dot(const uint8_t* record) const {
    float z;
    dots(&record, 1, &z);
    return z;
  }

  // dot() of records[0..count), count <= kDotRows, into out: each the bits of its dot alone (the
  // kernels run the rows interleaved).
  void dots(const uint8_t* const* records, int count, float* out) const {
    CodedRow rows[peer_internal::kDotRows];
    for (int r = 0; r < count; ++r) rows[r] = down_row(layout_, records[r]);
    if (use_int8_) {
      kr_.int8_dots(layout_.dtype, rows, count, layout_.dim, quantized_[0].view(), out);
    } else {
      kr_.coded_dots(layout_.dtype, rows, count, layout_.dim, xhat_t_, out);
    }
  }

 private:
  const RecordLayout& layout_;
  const PeerKernels& kr_;
  std::vector<TokenActivations> quantized_;  // one, for ExpertDot::kInt8 on int8/int4 records
  const float* xhat_t_ = nullptr;
  bool use_int8_ = false;
};

// A token's up rows summed in integers as ExpertDot::kInt8 says (kernels/peer.h), in buffers kept
// across the tokens of a thread.
class TokenUp {
 public:
  TokenUp(const RecordLayout& layout, const PeerKernels& kr, ExpertDot dot, int64_t slots)
      : layout_(layout),
        kr_(kr),
        enabled_(dot == ExpertDot::kInt8 && dtype_is_quantized(layout.dtype)) {
    if (!enabled_) return;
    const int64_t stride = peer_internal::up_stride(quant_groups(layout.dim_out));
    rows_.resize(static_cast<size_t>(slots));
    ga_.resize(static_cast<size_t>(slots));
    work_.resize(static_cast<size_t>((slots + 1) * stride));
    pairs_.resize(static_cast<size_t>((slots + 1) / 2 * stride));
    bias_.resize(static_cast<size_t>(stride));
    scales_.resize(static_cast<size_t>(stride));
  }

  // Whether accumulate() can take tokens (ExpertDot::kInt8 on int8/int4 records).
  bool enabled() const { return enabled_; }

  // y_t = the sum over slots [0, count) of ga[s] * up row of records[s], written whole (slots
  // with ga 0 skipped); false, with y_t untouched, where the rule sends the token to the float
  // axpys (not kInt8, float records, more than kUpMaxSlots such slots, a non-finite c_rg).
  bool accumulate(const uint8_t* const* records, const float* ga, int64_t count, float* yt) {
    if (!enabled_) return false;
    int used = 0;
    for (int64_t s = 0; s < count; ++s) {
      if (ga[s] == 0.0f) continue;
      rows_[static_cast<size_t>(used)] = up_row(layout_, records[s]);
      ga_[static_cast<size_t>(used++)] = ga[s];
    }
    if (used > peer_internal::kUpMaxSlots) return false;
    const int64_t n = layout_.dim_out;
    if (used == 0) {
      std::fill(yt, yt + n, 0.0f);
      return true;
    }
    if (!kr_.up_coefficients(rows_.data(), ga_.data(), used, n, work_.data(), pairs_.data(),
                             bias_.data(), scales_.data())) {
      return false;
    }
    kr_.int_up(layout_.dtype, rows_.data(), n,
               {quant_groups(n), used, pairs_.data(), bias_.data(), scales_.data()}, yt);
    return true;
  }

 private:
  const RecordLayout& layout_;
  const PeerKernels& kr_;
  const bool enabled_;
  std::vector<CodedRow> rows_;
  std::vector<float> ga_, work_, scales_;
  std::vector<int32_t> pairs_, bias_;
};

// peer_prepare_router's W_q part, into *w (whose precision is set).
void prepare_query_weights(const PeerConfig& config, const PeerRouterParams& params, int threads,
                           PeerRouterWeights* w) {
  const int64_t D = config.dim, rows = config.query_rows();
  if (w->precision == RoutingPrecision::kInt8) {
    quantize_weight_rows(kernels(), params.query_weight, rows, D, threads, &w->query_codes,
                         &w->query_scales);
    w->query_code_offsets = code_offsets(w->query_codes.data(), rows, D, D);
  } else if (w->precision == RoutingPrecision::kBf16 && bf16_kernel_available()) {
    w->query_panels = pack_bf16_panels(params.query_weight, rows, D, D);
  } else if (w->precision == RoutingPrecision::kF32 && kernels().gemm_nt_panels != nullptr) {
    w->query_panels_f32 = peer_internal::pack_f32_panels(params.query_weight, rows, D, D);
  }
}

// peer_prepare_router's key-table part, into *w (whose precision is set).
void prepare_key_weights(const PeerConfig& config, const PeerRouterParams& params, int threads,
                         PeerRouterWeights* w) {
  const int64_t n = config.n_keys, dk = config.dim_key, key_tables = config.key_heads() * 2;
  if (w->precision == RoutingPrecision::kInt8) {
    quantize_weight_rows(kernels(), params.keys, key_tables * n, dk, threads, &w->key_codes,
                         &w->key_scales);
    if (kernels().int8_scores != nullptr) {
      for (int64_t table = 0; table < key_tables; ++table) {
        w->key_panels_int8.push_back(
            peer_internal::pack_int8_panels(&w->key_codes[table * n * dk], n, dk, dk));
      }
    }
  } else if (w->precision == RoutingPrecision::kBf16 && bf16_kernel_available()) {
    for (int64_t table = 0; table < key_tables; ++table) {
      w->key_panels.push_back(pack_bf16_panels(params.keys + table * n * dk, n, dk, dk));
    }
  } else if (w->precision == RoutingPrecision::kF32 && kernels().gemm_nt_panels != nullptr) {
    for (int64_t table = 0; table < key_tables; ++table) {
      w->key_panels_f32.push_back(
          peer_internal::pack_f32_panels(params.keys + table * n * dk, n, dk, dk));
    }
  }
}

// q[t][r] += b_q[r] for the m rows of a block (no-op without a bias).
void add_query_bias(const float* bias, int64_t m, int64_t rows, float* qb) {
  if (bias == nullptr) return;
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t r = 0; r < rows; ++r) qb[t * rows + r] += bias[r];
  }
}

}  // namespace

// ---- public entry points ---------------------------------------------------------------------

float record_down_dot(const RecordLayout& layout, const uint8_t* record, const float* x) {
  const CodedRow row = down_row(layout, record);
  return kernels().coded_dot(layout.dtype, row.scales, row.codes, layout.dim, x);
}

float record_down_dot_int8(const RecordLayout& layout, const uint8_t* record, const float* x) {
  TokenDown down(layout, kernels(), ExpertDot::kInt8);
  down.set_token(x);
  return down.dot(record);
}

void record_down_dots(const RecordLayout& layout, const uint8_t* const* records, int64_t count,
                      const float* x, float* out, ExpertDot dot) {
  TokenDown down(layout, kernels(), dot);
  down.set_token(x);
  for (int64_t r = 0; r < count; r += peer_internal::kDotRows) {
    down.dots(records + r, static_cast<int>(std::min<int64_t>(peer_internal::kDotRows, count - r)),
              out + r);
  }
}

bool record_up_int(const RecordLayout& layout, const uint8_t* const* records, const float* ga,
                   int64_t count, float* y) {
  TokenUp up(layout, kernels(), ExpertDot::kInt8, count);
  return up.accumulate(records, ga, count, y);
}

void record_up_axpy(const RecordLayout& layout, const uint8_t* record, float alpha, float* y) {
  const CodedRow row = up_row(layout, record);
  kernels().coded_axpy(layout.dtype, row.scales, row.codes, layout.dim_out, alpha, y);
}

void peer_norm(const PeerConfig& config, const float* norm_weight, const float* x, int64_t T,
               float* xhat, int threads) {
  check_common(config, nullptr);
  const int64_t D = config.dim;
  if (config.input_norm == InputNorm::kNone) {
    if (xhat != x) std::memmove(xhat, x, static_cast<size_t>(T * D) * sizeof(float));
    return;
  }
  TROVE_CHECK(norm_weight != nullptr);
  parallel_for(T, threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* xt = x + t * D;
      float* out = xhat + t * D;
      const double r = inverse_rms(xt, D, config.norm_eps);
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(xt[d] * r * norm_weight[d]);
    }
  });
}

PeerRouterWeights peer_prepare_router(const PeerConfig& config, const PeerRouterParams& params,
                                      RoutingPrecision precision, int threads) {
  check_common(config, nullptr);
  PeerRouterWeights w;
  w.precision = precision;
  prepare_query_weights(config, params, threads, &w);
  prepare_key_weights(config, params, threads, &w);
  return w;
}

void peer_query(const PeerConfig& config, const PeerRouterParams& params, const float* xhat,
                int64_t T, float* q, int threads, RoutingPrecision precision,
                const PeerRouterWeights* weights) {
  check_common(config, nullptr);
  const int64_t D = config.dim, rows = config.query_rows();
  PeerRouterWeights made;
  if (weights == nullptr) {
    made.precision = precision;
    prepare_query_weights(config, params, threads, &made);
    weights = &made;
  }
  TROVE_CHECK(weights->precision == precision);
  if (!weights->query_panels_f32.empty() && kernels().gemm_nt_panels != nullptr) {
    // kF32 on the fixed-order GEMM: blocks of any size, no padding.
    const PeerKernels& kr = kernels();
    const int64_t block = free_block_rows(T, threads);
    parallel_for((T + block - 1) / block, threads, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t t0 = b * block, m = std::min(block, T - t0);
        float* qb = q + t0 * rows;
        kr.gemm_nt_panels(m, rows, D, xhat + t0 * D, D, weights->query_panels_f32.data(), qb, rows);
        add_query_bias(params.query_bias, m, rows, qb);
      }
    });
    return;
  }
  if (precision == RoutingPrecision::kBf16 && bf16_kernel_available()) {
    const int64_t pairs = bf16_pairs(D);
    const std::vector<uint32_t>& w = weights->query_panels;
    const int64_t block = free_block_rows(T, threads);
    parallel_for((T + block - 1) / block, threads, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> a(static_cast<size_t>(block * pairs));
      for (int64_t b = begin; b < end; ++b) {
        const int64_t t0 = b * block, m = std::min(block, T - t0);
        float* qb = q + t0 * rows;
        pack_bf16_rows(xhat + t0 * D, m, D, D, a.data());
        avx512bf16::gemm_nt(m, rows, pairs, a.data(), pairs, w.data(), qb, rows);
        add_query_bias(params.query_bias, m, rows, qb);
      }
    });
    return;
  }
  if (precision == RoutingPrecision::kInt8) {
    const PeerKernels& kr = kernels();
    // Integer products are exact, so any blocking gives the same bits: a small batch is split
    // over the threads.
    const int64_t big = T < kQueryBlock ? free_block_rows(T, threads) : kQueryBlock;
    parallel_for(query_blocks(T, big), threads, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> a;
      std::vector<float> scale_x;
      std::vector<int32_t> acc;
      for (int64_t b = begin; b < end; ++b) {
        const QueryBlock block = query_block(T, big, b);
        const int64_t t0 = block.t0, m = std::min(block.rows, T - t0);
        a.resize(static_cast<size_t>(m * D));
        scale_x.resize(static_cast<size_t>(m));
        acc.resize(static_cast<size_t>(m * rows));
        quantize_activation_rows(kr, xhat + t0 * D, m, D, D, a.data(), scale_x.data());
        if (m <= kFewInt8Rows && kr.int8_products_few != nullptr &&
            !weights->query_code_offsets.empty()) {
          kr.int8_products_few(m, rows, D, a.data(), D, weights->query_codes.data(), D,
                               weights->query_code_offsets.data(), acc.data(), rows);
        } else {
          blas::gemm_nt_int8(m, rows, D, a.data(), D, weights->query_codes.data(), D, acc.data(),
                             rows);
        }
        float* qb = q + t0 * rows;
        kr.scale_products(acc.data(), m, rows, scale_x.data(), weights->query_scales.data(), qb,
                          rows);
        add_query_bias(params.query_bias, m, rows, qb);
      }
    });
    return;
  }
  std::vector<float> rounded_x, rounded_w;  // kBf16 without the kernel: bf16 values in fp32
  if (precision == RoutingPrecision::kBf16) {
    rounded_x = rounded_to_bf16(xhat, T * D);
    rounded_w = rounded_to_bf16(params.query_weight, rows * D);
    xhat = rounded_x.data();
  }
  const float* query_weight =
      precision == RoutingPrecision::kBf16 ? rounded_w.data() : params.query_weight;
  const int64_t big =
      T < kQueryBlock || big_query_block_rounds_alike(D, rows) ? kQueryBlock : kRouteBlock;
  parallel_for(query_blocks(T, big), threads, [&](int64_t begin, int64_t end) {
    std::vector<float> pad_x, pad_q;  // a short last block, zero-padded (short_block_rows)
    for (int64_t b = begin; b < end; ++b) {
      const QueryBlock block = query_block(T, big, b);
      const int64_t t0 = block.t0, m = std::min(block.rows, T - t0);
      float* qb = q + t0 * rows;
      if (m == block.rows) {
        blas::gemm_nt(m, rows, D, xhat + t0 * D, D, query_weight, D, qb, rows);
      } else {
        const int64_t padded = short_block_rows(m, D, rows, D);
        pad_x.assign(static_cast<size_t>(padded * D), 0.0f);
        pad_q.resize(static_cast<size_t>(padded * rows));
        std::memcpy(pad_x.data(), xhat + t0 * D, static_cast<size_t>(m * D) * sizeof(float));
        blas::gemm_nt(padded, rows, D, pad_x.data(), D, query_weight, D, pad_q.data(), rows);
        std::memcpy(qb, pad_q.data(), static_cast<size_t>(m * rows) * sizeof(float));
      }
      add_query_bias(params.query_bias, m, rows, qb);
    }
  });
}

void peer_route(const PeerConfig& config, const PeerRouterParams& params, const float* q, int64_t T,
                PeerRouting* routing, int threads, RoutingPrecision precision,
                const PeerRouterWeights* weights) {
  check_common(config, nullptr);
  PeerRouterWeights made;
  if (weights == nullptr) {
    made.precision = precision;
    prepare_key_weights(config, params, threads, &made);
    weights = &made;
  }
  TROVE_CHECK(weights->precision == precision);
  const bool f32_panels = !weights->key_panels_f32.empty() && kernels().gemm_nt_panels != nullptr;
  const bool int8_panels = !weights->key_panels_int8.empty() && kernels().int8_scores != nullptr;
  const int64_t h = config.heads, k = config.topk, kp = config.topk_per_half;
  const int64_t n = config.n_keys, dk = config.dim_key, rows = config.query_rows();
  routing->resize(T, h, k);
  const PeerKernels& kr = kernels();
  const int64_t key_tables = config.key_heads() * 2;
  // kBf16: the key tables packed for the kernel, or (without it) q and the keys rounded.
  const bool bf16_kernel = precision == RoutingPrecision::kBf16 && bf16_kernel_available();
  const int64_t pairs = bf16_pairs(dk);
  std::vector<float> rounded_q, rounded_keys;
  const float* keys = params.keys;
  const bool int8 = precision == RoutingPrecision::kInt8;
  if (precision == RoutingPrecision::kBf16 && !bf16_kernel) {
    rounded_q = rounded_to_bf16(q, T * rows);
    rounded_keys = rounded_to_bf16(params.keys, key_tables * n * dk);
    q = rounded_q.data();
    keys = rounded_keys.data();
  }
  // Blocks of kRouteBlock tokens on oneDNN's fp32 sgemm (whose bits depend on the call's shape),
  // of free_block_rows where no bit depends on the block.
  const int64_t block =
      bf16_kernel || int8 || f32_panels ? free_block_rows(T, threads) : kRouteBlock;
  parallel_for((T + block - 1) / block, threads, [&](int64_t begin, int64_t end) {
    // One head's sub-scores, [half][token][n]: of a tile's tokens where they are selected at
    // once, else of the block's; the per-half selections.
    const bool tiles = int8_panels || f32_panels;
    std::vector<float> scores(static_cast<size_t>(2 * (tiles ? kScoreTile : kRouteBlock) * n));
    std::vector<int64_t> top(static_cast<size_t>(2 * kp));
    std::vector<float> pad_q;  // a short last block's q, zero-padded (short_block_rows)
    std::vector<uint32_t> q_pairs(bf16_kernel ? static_cast<size_t>(kRouteBlock * pairs) : 0);
    std::vector<uint8_t> q_codes(int8 ? static_cast<size_t>(2 * kRouteBlock * dk) : 0);
    std::vector<float> q_scales(int8 ? static_cast<size_t>(2 * kRouteBlock) : 0);
    std::vector<int32_t> acc(int8 && !int8_panels ? static_cast<size_t>(kRouteBlock * n) : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t t0 = b * block, m = std::min(block, T - t0);
      const float* qb = q + t0 * rows;
      // The fp32 BLAS's rows: a short block padded as short_block_rows says.
      int64_t blas_rows = kRouteBlock;
      if (m < kRouteBlock && !bf16_kernel && !int8 && !f32_panels) {
        blas_rows = short_block_rows(m, dk, n, rows);
        pad_q.assign(static_cast<size_t>(blas_rows * rows), 0.0f);
        std::memcpy(pad_q.data(), qb, static_cast<size_t>(m * rows) * sizeof(float));
        qb = pad_q.data();
      }
      // Token t of the block's selection from its two rows of sub-scores.
      const auto select = [&](const float* s0, const float* s1, int64_t t, int64_t head) {
        kr.top_indices(s0, n, kp, top.data());
        kr.top_indices(s1, n, kp, top.data() + kp);
        const size_t base = static_cast<size_t>(((t0 + t) * h + head) * k);
        kr.merge_top(s0, s1, top.data(), top.data() + kp, kp, n, k, &routing->ids[base],
                     &routing->scores[base]);
        gates_ref(config.gate, &routing->scores[base], k, &routing->gates[base]);
      };
      for (int64_t head = 0; head < h; ++head) {
        const int64_t hk = config.shared_keys ? 0 : head;
        if (tiles) {
          // kScoreTile tokens at a time (kInt8: both halves' codes first): their scores are
          // selected while in L1 (the block's whole [2][64][n] did not stay in L2 at n = 1024).
          if (int8_panels) {
            for (int half = 0; half < 2; ++half) {
              quantize_activation_rows(kr, qb + (head * 2 + half) * dk, m, dk, rows,
                                       &q_codes[static_cast<size_t>(half * kRouteBlock * dk)],
                                       &q_scales[static_cast<size_t>(half * kRouteBlock)]);
            }
          }
          for (int64_t t = 0; t < m; t += kScoreTile) {
            const int64_t tile = std::min(kScoreTile, m - t);
            for (int half = 0; half < 2; ++half) {
              const int64_t table = hk * 2 + half;
              float* s_tile = &scores[static_cast<size_t>(half * kScoreTile * n)];
              if (int8_panels) {
                kr.int8_scores(tile, n, dk,
                               &q_codes[static_cast<size_t>((half * kRouteBlock + t) * dk)], dk,
                               weights->key_panels_int8[static_cast<size_t>(table)],
                               &q_scales[static_cast<size_t>(half * kRouteBlock + t)],
                               &weights->key_scales[table * n], s_tile, n);
              } else {  // each score one fma chain in order: no bit depends on the tile
                kr.gemm_nt_panels(tile, n, dk, qb + t * rows + (head * 2 + half) * dk, rows,
                                  weights->key_panels_f32[static_cast<size_t>(table)].data(),
                                  s_tile, n);
              }
            }
            for (int64_t u = 0; u < tile; ++u) {
              select(&scores[static_cast<size_t>(u * n)],
                     &scores[static_cast<size_t>((kScoreTile + u) * n)], t + u, head);
            }
          }
          continue;
        }
        for (int half = 0; half < 2; ++half) {
          float* s_half = &scores[static_cast<size_t>(half * kRouteBlock * n)];
          if (bf16_kernel) {  // the block's m rows
            pack_bf16_rows(qb + (head * 2 + half) * dk, m, dk, rows, q_pairs.data());
            avx512bf16::gemm_nt(m, n, pairs, q_pairs.data(), pairs,
                                weights->key_panels[static_cast<size_t>(hk * 2 + half)].data(),
                                s_half, n);
            continue;
          }
          if (int8) {  // the block's m rows
            const int64_t table = hk * 2 + half;
            quantize_activation_rows(kr, qb + (head * 2 + half) * dk, m, dk, rows, q_codes.data(),
                                     q_scales.data());
            blas::gemm_nt_int8(m, n, dk, q_codes.data(), dk, &weights->key_codes[table * n * dk],
                               dk, acc.data(), n);
            kr.scale_products(acc.data(), m, n, q_scales.data(), &weights->key_scales[table * n],
                              s_half, n);
            continue;
          }
          // s[t][i] = <q[t][head][half], K[hk][half][i]>: [blas_rows, dk] x [n, dk]^T (the
          // padding rows' scores are not read).
          blas::gemm_nt(blas_rows, n, dk, qb + (head * 2 + half) * dk, rows,
                        keys + (hk * 2 + half) * n * dk, dk, s_half, n);
        }
        for (int64_t t = 0; t < m; ++t) {
          const float* s0 = &scores[static_cast<size_t>(t * n)];
          select(s0, s0 + kRouteBlock * n, t, head);
        }
      }
    }
  });
}

// Records sit at random addresses, so each one starts a fresh stream of cache misses that the
// hardware prefetcher learns too late: peer_experts fetches them into L2 (prefetcht2) one token
// ahead, the first half of each record's lines (its scales and down row, mostly) while the
// token's dots run and the second half while its axpys run, so that neither phase issues a
// burst with no work to overlap (a burst of a record's 36 prefetches, int4 at D = 2048, stalled
// the pass on the fill buffers: perf put 91% of its samples on the instruction after a prefetch).
inline void prefetch_lines(const uint8_t* record, size_t begin, size_t end) {
  for (size_t off = begin; off < end; off += 64) __builtin_prefetch(record + off, 0, 1);
}

// The share of a float row of n elements that slots [s, s + count) of per_token fetch: the next
// token's xhat and y rows arrive while this token works, not when it starts.
inline void prefetch_rows(const float* row, int64_t n, int64_t s, int64_t count, int64_t per_token,
                          bool write) {
  const int64_t lines = (n * 4 + 63) / 64;
  const int64_t begin = lines * s / per_token, end = lines * (s + count) / per_token;
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t l = begin; l < end; ++l) {
    if (write) {
      __builtin_prefetch(p + l * 64, 1, 1);
    } else {
      __builtin_prefetch(p + l * 64, 0, 1);
    }
  }
}

// gate * act(z) of one slot. Shared by every expert pass so a slot computes to the same bits in
// each.
inline float gated_activation(const PeerConfig& config, float z, float gate) {
  return static_cast<float>(gate * activation_ref(config.activation, z));
}

inline float slot_gated_activation(const PeerConfig& config, const TokenDown& down, float gate,
                                   const uint8_t* record) {
  return gated_activation(config, down.dot(record), gate);
}

inline void slot_accumulate(const RecordLayout& layout, const PeerKernels& kr, float ga,
                            const uint8_t* record, int64_t dim_out, float* yt) {
  if (ga == 0.0f) return;  // relu's zeros and zero gates add nothing
  const CodedRow up = up_row(layout, record);
  kr.coded_axpy(layout.dtype, up.scales, up.codes, dim_out, ga, yt);
}

// y_t = the sum over slots [0, count) of ga[s] * up row of records[s]: the integer sums where
// ExpertDot::kInt8 takes the token, else the float axpys in slot order.
void token_up(TokenUp& up, const RecordLayout& layout, const PeerKernels& kr,
              const uint8_t* const* records, const float* ga, int64_t count, float* yt) {
  if (up.accumulate(records, ga, count, yt)) return;
  std::fill(yt, yt + layout.dim_out, 0.0f);
  for (int64_t s = 0; s < count; ++s)
    slot_accumulate(layout, kr, ga[s], records[s], layout.dim_out, yt);
}

// Per token two phases: the down-row dots of all its slots, kDotRows at a time (interleaved rows
// overlap their accumulation chains: the int8 dot's 16 lane accumulators each take every group
// of a row in order, so one row alone waits on the FMA latency), then the up rows: the axpys in
// slot order, or kInt8's integer sums (token_up). Each slot's dot, and each token's up rows, are
// computed as peer_experts_resume and peer_experts_partial compute them, so y is the same bits.
void peer_experts(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                  const PeerRouting& routing, const uint8_t* const* records, float* y, int threads,
                  ExpertDot dot) {
  check_common(config, &layout);
  check_routing(config, routing);
  const int64_t D = config.dim, Dout = config.dim_out;
  const int64_t per_token = routing.heads * routing.topk;
  const PeerKernels& kr = kernels();
  const size_t half = layout.record_bytes / 2 / 64 * 64;
  parallel_for(routing.tokens, threads, [&](int64_t begin, int64_t end) {
    TokenDown down(layout, kr, dot);
    TokenUp up(layout, kr, dot, per_token);
    std::vector<float> ga(static_cast<size_t>(per_token));
    const size_t last = static_cast<size_t>(end * per_token);
    // The first token's records, which no earlier token fetched.
    for (size_t s = static_cast<size_t>(begin * per_token);
         s < std::min(last, static_cast<size_t>((begin + 1) * per_token)); ++s) {
      prefetch_lines(records[s], 0, layout.record_bytes);
    }
    for (int64_t t = begin; t < end; ++t) {
      const size_t first = static_cast<size_t>(t * per_token);
      const bool next = first + 2 * static_cast<size_t>(per_token) <= last;
      down.set_token(xhat + t * D);
      for (int64_t s = 0; s < per_token; s += peer_internal::kDotRows) {
        const int count =
            static_cast<int>(std::min<int64_t>(peer_internal::kDotRows, per_token - s));
        const size_t slot = first + static_cast<size_t>(s);
        if (next) {
          for (int r = 0; r < count; ++r) {
            prefetch_lines(records[slot + per_token + r], 0,
                           up.enabled() ? layout.record_bytes : half);
          }
          prefetch_rows(y + (t + 1) * Dout, Dout, s, count, per_token, /*write=*/true);
        }
        float z[peer_internal::kDotRows];
        down.dots(&records[slot], count, z);
        for (int r = 0; r < count; ++r) {
          ga[static_cast<size_t>(s + r)] = gated_activation(config, z[r], routing.gates[slot + r]);
        }
      }
      float* yt = y + t * Dout;
      if (up.accumulate(&records[first], ga.data(), per_token, yt)) {
        if (next) prefetch_rows(xhat + (t + 1) * D, D, 0, per_token, per_token, /*write=*/false);
        continue;
      }
      std::fill(yt, yt + Dout, 0.0f);
      for (int64_t s = 0; s < per_token; ++s) {
        const size_t slot = first + static_cast<size_t>(s);
        if (next) {
          prefetch_lines(records[slot + per_token], half, layout.record_bytes);
          prefetch_rows(xhat + (t + 1) * D, D, s, 1, per_token, /*write=*/false);
        }
        slot_accumulate(layout, kr, ga[static_cast<size_t>(s)], records[slot], Dout, yt);
      }
    }
  });
}

void peer_experts_partial(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                          const PeerRouting& routing, const uint8_t* const* records,
                          const uint8_t* selected, float* y_part, int threads, ExpertDot dot) {
  check_common(config, &layout);
  check_routing(config, routing);
  const int64_t D = config.dim, Dout = config.dim_out;
  const int64_t per_token = routing.heads * routing.topk;
  const PeerKernels& kr = kernels();
  parallel_for(routing.tokens, threads, [&](int64_t begin, int64_t end) {
    TokenDown down(layout, kr, dot);
    TokenUp up(layout, kr, dot, per_token);
    std::vector<const uint8_t*> chosen;
    std::vector<float> chosen_ga;
    for (int64_t t = begin; t < end; ++t) {
      float* yt = y_part + t * Dout;
      if (up.enabled()) {  // the selected slots' up rows summed as one token's
        chosen.clear();
        chosen_ga.clear();
        for (int64_t s = 0; s < per_token; ++s) {
          const size_t slot = static_cast<size_t>(t * per_token + s);
          if (selected[slot] == 0) continue;
          TROVE_CHECK(records[slot] != nullptr);
          if (chosen.empty()) down.set_token(xhat + t * D);
          chosen.push_back(records[slot]);
          chosen_ga.push_back(
              slot_gated_activation(config, down, routing.gates[slot], records[slot]));
        }
        token_up(up, layout, kr, chosen.data(), chosen_ga.data(),
                 static_cast<int64_t>(chosen.size()), yt);
        continue;
      }
      std::fill(yt, yt + Dout, 0.0f);
      bool token_set = false;
      for (int64_t s = 0; s < per_token; ++s) {
        const size_t slot = static_cast<size_t>(t * per_token + s);
        if (selected[slot] == 0) continue;
        TROVE_CHECK(records[slot] != nullptr);
        if (!token_set) {
          down.set_token(xhat + t * D);
          token_set = true;
        }
        const float ga = slot_gated_activation(config, down, routing.gates[slot], records[slot]);
        slot_accumulate(layout, kr, ga, records[slot], Dout, yt);
      }
    }
  });
}

void PeerExpertProgress::reset(int64_t tokens, int64_t slots_per_token) {
  next_slot.assign(static_cast<size_t>(tokens), 0);
  ga.assign(static_cast<size_t>(tokens * slots_per_token), 0.0f);
  has_ga.assign(static_cast<size_t>(tokens * slots_per_token), 0);
  pending_tokens = tokens;
}

void peer_experts_resume(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                         const PeerRouting& routing, const uint8_t* const* records, float* y,
                         PeerExpertProgress* progress, int threads, ExpertDot dot) {
  check_common(config, &layout);
  check_routing(config, routing);
  const int64_t D = config.dim, Dout = config.dim_out;
  const int64_t per_token = routing.heads * routing.topk;
  PeerExpertProgress& p = *progress;
  TROVE_CHECK(static_cast<int64_t>(p.next_slot.size()) == routing.tokens);
  TROVE_CHECK(static_cast<int64_t>(p.ga.size()) == routing.tokens * per_token);
  const PeerKernels& kr = kernels();
  std::atomic<int64_t> pending{0};
  parallel_for(routing.tokens, threads, [&](int64_t begin, int64_t end) {
    TokenDown down(layout, kr, dot);
    TokenUp up(layout, kr, dot, per_token);
    int64_t unfinished = 0;
    for (int64_t t = begin; t < end; ++t) {
      int32_t& next = p.next_slot[static_cast<size_t>(t)];
      if (next == per_token) continue;
      float* yt = y + t * Dout;
      if (up.enabled()) {  // the token's up rows summed at once, when all its records are here
        bool ready = true, token_set = false;
        for (int64_t s = 0; s < per_token; ++s) {
          const size_t slot = static_cast<size_t>(t * per_token + s);
          if (records[slot] == nullptr) {
            ready = false;
            continue;
          }
          if (p.has_ga[slot] != 0) continue;
          if (!token_set) {
            down.set_token(xhat + t * D);
            token_set = true;
          }
          p.ga[slot] = slot_gated_activation(config, down, routing.gates[slot], records[slot]);
          p.has_ga[slot] = 1;
        }
        if (!ready) {
          ++unfinished;
          continue;
        }
        const size_t first = static_cast<size_t>(t * per_token);
        token_up(up, layout, kr, &records[first], &p.ga[first], per_token, yt);
        next = static_cast<int32_t>(per_token);
        continue;
      }
      if (next == 0) std::fill(yt, yt + Dout, 0.0f);  // nothing accumulated yet
      bool blocked = false;
      bool token_set = false;
      for (int64_t s = next; s < per_token; ++s) {
        const size_t slot = static_cast<size_t>(t * per_token + s);
        const uint8_t* record = records[slot];
        if (record == nullptr) {
          blocked = true;
          continue;
        }
        if (p.has_ga[slot] == 0) {
          if (!token_set) {
            down.set_token(xhat + t * D);
            token_set = true;
          }
          p.ga[slot] = slot_gated_activation(config, down, routing.gates[slot], record);
          p.has_ga[slot] = 1;
        }
        if (!blocked) {
          slot_accumulate(layout, kr, p.ga[slot], record, Dout, yt);
          next = static_cast<int32_t>(s + 1);
        }
      }
      if (next != per_token) ++unfinished;
    }
    pending.fetch_add(unfinished, std::memory_order_relaxed);
  });
  p.pending_tokens = pending.load();
}

void peer_backward(const PeerConfig& config, const PeerRouterParams& params,
                   const RecordLayout& layout, const float* x, int64_t T,
                   const PeerRouting& routing, const uint8_t* const* records, const float* dy,
                   PeerGrads* grads, int threads) {
  check_common(config, &layout);
  check_routing(config, routing);
  TROVE_CHECK(routing.tokens == T);
  const int64_t D = config.dim, Dout = config.dim_out, h = config.heads, k = config.topk;
  const int64_t n = config.n_keys, dk = config.dim_key, rows = config.query_rows();
  const int64_t key_rows = config.key_heads() * 2 * n;
  const int64_t slots = T * h * k;
  const bool rms = config.input_norm == InputNorm::kRms;
  const PeerKernels& kr = kernels();
  const auto sz = [](int64_t v) { return static_cast<size_t>(v); };

  // The forward intermediates, recomputed.
  std::vector<float> xhat(sz(T * D)), q(sz(T * rows));
  peer_norm(config, params.norm_weight, x, T, xhat.data(), threads);
  peer_query(config, params, xhat.data(), T, q.data(), threads);

  // Per-token pass: per slot g*a (d_up's coefficient) and dz (d_down's), per token dq and dx,
  // and the key-gradient terms (key row, q row, ds) each token produces, at most 2k per head.
  struct KeyTerm {
    int64_t key_row;   // (hk*2 + half)*n + i
    int64_t q_offset;  // t*rows + (head*2 + half)*dk
    double ds;
  };
  const int64_t terms_per_token = h * 2 * k;
  std::vector<KeyTerm> key_terms(sz(T * terms_per_token));
  std::vector<int64_t> key_term_count(sz(T), 0);
  std::vector<float> slot_ga(sz(slots)), slot_dz(sz(slots));
  std::vector<float> dq(sz(T * rows), 0.0f);
  std::vector<float> dxhat_all(sz(T * D), 0.0f);
  std::vector<double> inv_rms(rms ? sz(T) : 0);
  grads->dx.assign(sz(T * D), 0.0f);

  // 1. Per token: the experts' part of dxhat, and dq.
  parallel_for(T, threads, [&](int64_t begin, int64_t end) {
    std::vector<double> dg(sz(k)), dscore(sz(k));
    std::vector<std::pair<int64_t, double>> ds(sz(k));  // (sub-key index, ds) of one half
    for (int64_t t = begin; t < end; ++t) {
      const float* xh = &xhat[sz(t * D)];
      const float* dyt = dy + t * Dout;
      float* dqt = &dq[sz(t * rows)];
      float* dxhat = &dxhat_all[sz(t * D)];
      for (int64_t head = 0; head < h; ++head) {
        const size_t base = sz((t * h + head) * k);
        for (int64_t s = 0; s < k; ++s) {
          const CodedRow down = down_row(layout, records[base + s]);
          const CodedRow up = up_row(layout, records[base + s]);
          const double g = routing.gates[base + s];
          const double z = kr.coded_dot(layout.dtype, down.scales, down.codes, D, xh);
          const double v_dy = kr.coded_dot(layout.dtype, up.scales, up.codes, Dout, dyt);
          const double a = activation_ref(config.activation, z);
          const double dz = g * v_dy * activation_grad_ref(config.activation, z);
          dg[sz(s)] = a * v_dy;
          slot_ga[base + s] = static_cast<float>(g * a);
          slot_dz[base + s] = static_cast<float>(dz);
          if (slot_dz[base + s] != 0.0f) {
            kr.coded_axpy(layout.dtype, down.scales, down.codes, D, slot_dz[base + s], dxhat);
          }
        }
        gate_backward(config.gate, &routing.scores[base], &routing.gates[base], dg.data(), k,
                      dscore.data());
        // score = s_0[i] + s_1[j] with e = i*n + j: each half's sub-score gets the sum of its
        // slots' dscore, summed in slot order per sub-key.
        const int64_t hk = config.shared_keys ? 0 : head;
        for (int half = 0; half < 2; ++half) {
          for (int64_t s = 0; s < k; ++s) {
            const int64_t e = routing.ids[base + s];
            ds[sz(s)] = {half == 0 ? e / n : e % n, dscore[sz(s)]};
          }
          std::stable_sort(ds.begin(), ds.end(),
                           [](const auto& a, const auto& b) { return a.first < b.first; });
          const int64_t q_offset = t * rows + (head * 2 + half) * dk;
          for (size_t s = 0; s < ds.size();) {
            const int64_t i = ds[s].first;
            double sum = 0;
            for (; s < ds.size() && ds[s].first == i; ++s) sum += ds[s].second;
            if (sum == 0.0) continue;
            const int64_t key_row = (hk * 2 + half) * n + i;
            kr.axpy(static_cast<float>(sum), params.keys + key_row * dk, dk,
                    dqt + (head * 2 + half) * dk);
            key_terms[sz(t * terms_per_token + key_term_count[sz(t)]++)] = {key_row, q_offset, sum};
          }
        }
      }
    }
  });

  // 2. q = W_q xhat + b: dxhat += dq W_q, one BLAS call per block of kRouteBlock tokens (a
  //    short last block zero-padded, as in peer_query), so no bit depends on the thread count.
  parallel_for(route_blocks(T), threads, [&](int64_t begin, int64_t end) {
    std::vector<float> pad_dq, pad_dxhat;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t t0 = b * kRouteBlock, m = std::min(kRouteBlock, T - t0);
      float* dxb = &dxhat_all[sz(t0 * D)];
      if (m == kRouteBlock) {
        blas::gemm_nn(m, D, rows, &dq[sz(t0 * rows)], rows, params.query_weight, D, dxb, D,
                      /*accumulate=*/true);
        continue;
      }
      pad_dq.assign(sz(kRouteBlock * rows), 0.0f);
      pad_dxhat.assign(sz(kRouteBlock * D), 0.0f);
      std::memcpy(pad_dq.data(), &dq[sz(t0 * rows)], sz(m * rows) * sizeof(float));
      std::memcpy(pad_dxhat.data(), dxb, sz(m * D) * sizeof(float));
      blas::gemm_nn(kRouteBlock, D, rows, pad_dq.data(), rows, params.query_weight, D,
                    pad_dxhat.data(), D, /*accumulate=*/true);
      std::memcpy(dxb, pad_dxhat.data(), sz(m * D) * sizeof(float));
    }
  });

  // 3. Per token, xhat = x r gamma: dx = r gamma dxhat - x r^3 / D * sum(gamma dxhat x).
  if (!rms) {
    grads->dx.assign(dxhat_all.begin(), dxhat_all.end());
  } else {
    parallel_for(T, threads, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* xt = x + t * D;
        const float* dxhat = &dxhat_all[sz(t * D)];
        float* dxt = &grads->dx[sz(t * D)];
        const double r = inverse_rms(xt, D, config.norm_eps);
        double wx = 0;
        for (int64_t d = 0; d < D; ++d) {
          wx += static_cast<double>(params.norm_weight[d]) * dxhat[d] * xt[d];
        }
        const double c = r * r * r * wx / static_cast<double>(D);
        for (int64_t d = 0; d < D; ++d) {
          dxt[d] = static_cast<float>(r * params.norm_weight[d] * dxhat[d] - xt[d] * c);
        }
        inv_rms[sz(t)] = r;
      }
    });
  }

  // d W_q = dq^T xhat: one BLAS call per block of kRouteBlock rows of W_q (fixed by the shape,
  // not the thread count), each summing all tokens. d b_q: columns of dq summed in token order.
  grads->d_query_weight.assign(sz(rows * D), 0.0f);
  parallel_for((rows + kRouteBlock - 1) / kRouteBlock, threads, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * kRouteBlock, m = std::min(kRouteBlock, rows - r0);
      blas::gemm_tn(m, D, T, dq.data() + r0, rows, xhat.data(), D,
                    grads->d_query_weight.data() + r0 * D, D);
    }
  });
  grads->d_query_bias.clear();
  if (config.query_bias) {
    std::vector<double> d_bias(sz(rows), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t r = 0; r < rows; ++r) d_bias[sz(r)] += dq[sz(t * rows + r)];
    }
    grads->d_query_bias.assign(d_bias.begin(), d_bias.end());
  }

  // d gamma: columns partitioned, tokens summed in order.
  grads->d_norm_weight.clear();
  if (rms) {
    grads->d_norm_weight.assign(sz(D), 0.0f);
    parallel_for(D, threads, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(sz(end - begin), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const float* dxh = &dxhat_all[sz(t * D)];
        const float* xt = x + t * D;
        for (int64_t d = begin; d < end; ++d) {
          acc[sz(d - begin)] += static_cast<double>(dxh[d]) * xt[d] * inv_rms[sz(t)];
        }
      }
      for (int64_t d = begin; d < end; ++d) {
        grads->d_norm_weight[sz(d)] = static_cast<float>(acc[sz(d - begin)]);
      }
    });
  }

  // d keys: the terms bucketed by key row (counting sort, token order kept), rows partitioned.
  std::vector<int64_t> key_start(sz(key_rows + 1), 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < key_term_count[sz(t)]; ++j) {
      ++key_start[sz(key_terms[sz(t * terms_per_token + j)].key_row + 1)];
    }
  }
  for (int64_t r = 0; r < key_rows; ++r) key_start[sz(r + 1)] += key_start[sz(r)];
  std::vector<KeyTerm> by_key(sz(key_start[sz(key_rows)]));
  {
    std::vector<int64_t> fill(key_start.begin(), key_start.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < key_term_count[sz(t)]; ++j) {
        const KeyTerm& term = key_terms[sz(t * terms_per_token + j)];
        by_key[sz(fill[sz(term.key_row)]++)] = term;
      }
    }
  }
  grads->d_keys.assign(sz(key_rows * dk), 0.0f);
  parallel_for(key_rows, threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = key_start[sz(r)]; j < key_start[sz(r + 1)]; ++j) {
        kr.axpy(static_cast<float>(by_key[sz(j)].ds), &q[sz(by_key[sz(j)].q_offset)], dk,
                &grads->d_keys[sz(r * dk)]);
      }
    }
  });

  // d down / d up, one row per unique expert: (expert id, slot) pairs sorted, unique experts
  // partitioned, each summing its slots in slot order.
  std::vector<std::pair<int64_t, int64_t>> by_expert(sz(slots));
  for (int64_t s = 0; s < slots; ++s) by_expert[sz(s)] = {routing.ids[sz(s)], s};
  std::sort(by_expert.begin(), by_expert.end());
  std::vector<int64_t> expert_start;  // index into by_expert of each unique expert's first slot
  grads->expert_ids.clear();
  for (int64_t s = 0; s < slots; ++s) {
    if (s == 0 || by_expert[sz(s)].first != by_expert[sz(s - 1)].first) {
      grads->expert_ids.push_back(by_expert[sz(s)].first);
      expert_start.push_back(s);
    }
  }
  expert_start.push_back(slots);
  const auto unique = static_cast<int64_t>(grads->expert_ids.size());
  grads->d_down.assign(sz(unique * D), 0.0f);
  grads->d_up.assign(sz(unique * Dout), 0.0f);
  const int64_t per_token = h * k;
  parallel_for(unique, threads, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      float* d_down = &grads->d_down[sz(u * D)];
      float* d_up = &grads->d_up[sz(u * Dout)];
      for (int64_t j = expert_start[sz(u)]; j < expert_start[sz(u + 1)]; ++j) {
        const int64_t slot = by_expert[sz(j)].second;
        const int64_t t = slot / per_token;
        if (slot_dz[sz(slot)] != 0.0f) kr.axpy(slot_dz[sz(slot)], &xhat[sz(t * D)], D, d_down);
        if (slot_ga[sz(slot)] != 0.0f) kr.axpy(slot_ga[sz(slot)], dy + t * Dout, Dout, d_up);
      }
    }
  });
}

}  // namespace trove
