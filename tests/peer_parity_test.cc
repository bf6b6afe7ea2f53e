// The optimized CPU PEER layer (kernels/cpu/peer.h) against its oracle
// (kernels/cpu/ref/peer_ref.h), on both CPU paths: every step and the backward pass on many
// shapes (nothing a power of two but one D = 2048), every activation, gate and record dtype;
// routing compared faiss-compareIndices style (tie swaps allowed at the k-th position);
// the code-level dot/axpy against the dequantizers; exact ties; all tokens on one expert;
// N = 1; and bit-identical results for any thread count.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "base/check.h"
#include "base/half.h"
#include "kernels/cpu/peer.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/peer_ref.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "kernels/peer.h"
#include "kernels/quant.h"
#include "kernels/record.h"
#include "tests/cpu_path_test.h"
#include "tests/peer_test_util.h"

namespace trove {

inline void PrintTo(CpuPath path, std::ostream* os) {
  *os << cpu_path_name(path);
}

namespace {

// ---- tolerances --------------------------------------------------------------------------------
// The oracle accumulates in double and rounds once; the optimized path accumulates in fp32 in
// another order (8 SIMD lanes, per-group partials times the group scale). Both read the same
// codes and scales, so the only difference is fp32 rounding in the sums, about
// eps32 * sqrt(terms) * sum|term|. sum|term| can exceed a result many times over (a dot of
// N(0,1) vectors, a sum over tokens with cancellation), so each array's tolerance is relative
// to its largest magnitude (abs term) plus a small per-element relative term. With D <= 2048
// and up to 1000 tokens, eps32 * sqrt(2048) ~ 5e-6; the largest errors seen on these shapes
// are below 1/10 of each tolerance.
constexpr double kForwardAbs = 1e-5;  // xhat, q, y: <= one D-long dot + h*k terms
constexpr double kForwardRel = 1e-5;
constexpr double kScoreAbs = 1e-5;  // router scores: dk-long dots of O(1) values, relative to
constexpr double kScoreRel = 1e-5;  // the largest |score| of the (token, head)
constexpr double kGateAbs = 2e-5;   // gates: functions of the scores above, in [0, 1] or ~score
constexpr double kGradAbs = 3e-5;   // gradients: sums over tokens and slots of products of
constexpr double kGradRel = 1e-5;   // forward quantities, so forward errors compound
// Code-level dot / axpy of one row against the dequantized row in double.
constexpr double kRowAbs = 1e-5;
constexpr double kRowRel = 1e-5;

constexpr DType kAllDTypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kI8, DType::kI4};
constexpr Activation kAllActivations[] = {Activation::kRelu, Activation::kGelu,
                                          Activation::kGeluTanh, Activation::kSilu};
constexpr Gate kAllGates[] = {Gate::kSoftmax, Gate::kRelu, Gate::kSigmoid};
constexpr int kThreads = 3;  // not a divisor of most token counts below

using testing::describe;
using testing::expect_bits_equal;
using testing::expect_close;
using testing::for_each_sweep_shape;
using testing::layout_of;
using testing::make_config;
using testing::normal_values;
using testing::PeerLayer;
using testing::PeerShape;
using testing::random_layer;
using testing::ref_forward;
using testing::RefForward;

// The CPU path against the oracle: its routing tolerances.
constexpr testing::RoutingTolerance kRoutingTolerance = {kScoreAbs, kScoreRel, kGateAbs};

void expect_routing_close(const PeerRouting& got, const PeerRouting& want,
                          const std::string& what) {
  testing::expect_routing_close(got, want, kRoutingTolerance, what);
}

std::string precision_name(RoutingPrecision p) {
  return routing_precision_name(p);
}

// ---- the steps on both implementations ---------------------------------------------------------

// The optimized steps, each fed the oracle's input to that step.
struct OptSteps {
  std::vector<float> xhat, q, y;
  PeerRouting routing;
  PeerGrads grads;
};

OptSteps opt_steps(const PeerLayer& l, const RefForward& ref, int threads, bool backward) {
  const PeerConfig& c = l.config;
  const PeerRouterParams p = l.router();
  OptSteps o;
  o.xhat.assign(sz(l.tokens * c.dim), -1.0f);
  o.q.assign(sz(l.tokens * c.query_rows()), -1.0f);
  o.y.assign(sz(l.tokens * c.dim_out), -1.0f);
  peer_norm(c, p.norm_weight, l.x.data(), l.tokens, o.xhat.data(), threads);
  peer_query(c, p, ref.xhat.data(), l.tokens, o.q.data(), threads);
  peer_route(c, p, ref.q.data(), l.tokens, &o.routing, threads);
  const std::vector<const uint8_t*> records = l.slot_records(ref.routing);
  peer_experts(c, l.layout, ref.xhat.data(), ref.routing, records.data(), o.y.data(), threads);
  if (backward) {
    peer_backward(c, p, l.layout, l.x.data(), l.tokens, ref.routing, records.data(), l.dy.data(),
                  &o.grads, threads);
  }
  return o;
}

void expect_grads_close(const PeerGrads& got, const PeerGrads& want, const std::string& what) {
  EXPECT_EQ(got.expert_ids, want.expert_ids) << what;
  expect_close(got.dx, want.dx, kGradAbs, kGradRel, what + " dx");
  expect_close(got.d_query_weight, want.d_query_weight, kGradAbs, kGradRel, what + " dW_q");
  expect_close(got.d_query_bias, want.d_query_bias, kGradAbs, kGradRel, what + " db_q");
  expect_close(got.d_keys, want.d_keys, kGradAbs, kGradRel, what + " dK");
  expect_close(got.d_norm_weight, want.d_norm_weight, kGradAbs, kGradRel, what + " dgamma");
  expect_close(got.d_down, want.d_down, kGradAbs, kGradRel, what + " d_down");
  expect_close(got.d_up, want.d_up, kGradAbs, kGradRel, what + " d_up");
}

// Every step and the backward of one shape against the oracle.
void check_parity(const PeerShape& shape, uint32_t seed) {
  const std::string what = describe(shape);
  SCOPED_TRACE(what);
  const PeerLayer l = random_layer(shape, seed);
  const RefForward ref = ref_forward(l);
  const OptSteps got = opt_steps(l, ref, kThreads, /*backward=*/true);
  expect_close(got.xhat, ref.xhat, kForwardAbs, kForwardRel, "xhat");
  expect_close(got.q, ref.q, kForwardAbs, kForwardRel, "q");
  expect_routing_close(got.routing, ref.routing, "routing");
  expect_close(got.y, ref.y, kForwardAbs, kForwardRel, "y");
  PeerGrads want;
  const std::vector<const uint8_t*> records = l.slot_records(ref.routing);
  peer_backward_ref(l.config, l.router(), l.layout, l.x.data(), l.tokens, ref.routing,
                    records.data(), l.dy.data(), &want);
  expect_grads_close(got.grads, want, "backward");
}

class PeerParityTest : public testing::CpuPathTest {};

// ---- code-level dot and axpy -------------------------------------------------------------------

// Row lengths 1..up_to, then `more`: every partial last group and odd group count, then sizes.
std::vector<int64_t> lengths_up_to(int64_t up_to, std::initializer_list<int64_t> more) {
  std::vector<int64_t> lengths;
  for (int64_t n = 1; n <= up_to; ++n) lengths.push_back(n);
  lengths.insert(lengths.end(), more);
  return lengths;
}

TEST_P(PeerParityTest, RecordDotAndAxpyMatchTheDequantizedRowOnEveryLength) {
  std::mt19937 rng(7);
  const std::vector<int64_t> lengths = lengths_up_to(200, {2048});
  for (DType t : kAllDTypes) {
    for (int64_t n : lengths) {
      const RecordLayout l = layout_of(t, n, n);
      const std::vector<float> down = normal_values(sz(n), 1.0, &rng);
      const std::vector<float> up = normal_values(sz(n), 1.0, &rng);
      std::vector<uint8_t> record(l.stride);
      pack_record_ref(l, down.data(), up.data(), record.data());
      std::vector<float> u(sz(n)), v(sz(n));
      unpack_record_ref(l, record.data(), u.data(), v.data());

      // x is followed by NaNs: reading past n into a padding lane would poison the sum.
      std::vector<float> x = normal_values(sz(n) + kQuantGroup, 1.0, &rng);
      std::fill(x.begin() + n, x.end(), std::numeric_limits<float>::quiet_NaN());
      double want = 0, sum_abs = 0;
      for (int64_t i = 0; i < n; ++i) {
        want += static_cast<double>(u[sz(i)]) * x[sz(i)];
        sum_abs += std::abs(static_cast<double>(u[sz(i)]) * x[sz(i)]);
      }
      const float got = record_down_dot(l, record.data(), x.data());
      EXPECT_NEAR(got, want, kRowAbs * sum_abs + kRowRel * std::abs(want))
          << dtype_name(t) << " n " << n;

      // y has sentinels after n that must survive.
      constexpr float kAlpha = -0.75f;
      constexpr float kSentinel = 12345.0f;
      std::vector<float> y = normal_values(sz(n) + kQuantGroup, 1.0, &rng);
      std::fill(y.begin() + n, y.end(), kSentinel);
      std::vector<float> want_y(y);
      for (int64_t i = 0; i < n; ++i) want_y[sz(i)] += kAlpha * v[sz(i)];
      record_up_axpy(l, record.data(), kAlpha, y.data());
      expect_close(y, want_y, kRowAbs, kRowRel,
                   std::string(dtype_name(t)) + " axpy n " + std::to_string(n));
      EXPECT_TRUE(std::all_of(y.begin() + n, y.end(), [](float s) { return s == kSentinel; }))
          << dtype_name(t) << " n " << n << ": axpy wrote past the row";
    }
  }
}

// ---- every step against the oracle
// ---------------------------------------------------------------

// Activations x gates x dtypes, each once, with the other settings cycled so that every token
// count, D, n, h, key sharing, bias and norm setting meets many of them.
TEST_P(PeerParityTest, EveryStepMatchesTheOracleAcrossShapesActivationsGatesAndDTypes) {
  const int64_t token_counts[] = {1, 7, 40, 7, 128};
  const int64_t dims[][2] = {{37, 37}, {100, 45}, {200, 200}, {45, 100}};
  for_each_sweep_shape(token_counts, dims, [&](PeerShape shape, uint32_t seed) {
    if (shape.config.n_keys == 128) {  // 16384 experts: keep the table and the oracle's time small
      shape.config.dim = std::min<int64_t>(shape.config.dim, 45);
      shape.tokens = std::min<int64_t>(shape.tokens, 40);
    }
    check_parity(shape, seed);
  });
}

TEST_P(PeerParityTest, ManyTokensAndTheBackgroundWidthMatchTheOracle) {
  check_parity({1000, testing::many_tokens_config(), DType::kI4}, 11);

  // D = 2048 as in the background documents, every dtype.
  for (DType t : kAllDTypes) check_parity({5, testing::background_width_config(), t}, 12);
}

// ---- nasty cases -------------------------------------------------------------------------------

TEST_P(PeerParityTest, OneExpertOneTokenMatchesTheOracle) {
  PeerConfig c = make_config(33, 31, 1, 1, 3, 1, 1);
  for (Gate g : kAllGates) {
    c.gate = g;
    check_parity({1, c, DType::kI8}, 21);
  }
}

TEST_P(PeerParityTest, EmptyBatchGivesEmptyResultsAndZeroGradients) {
  PeerConfig c = make_config(20, 30, 2, 4, 3, 3, 2);
  c.input_norm = InputNorm::kRms;
  c.query_bias = true;
  const PeerLayer l = random_layer({0, c, DType::kI8}, 61);
  const RefForward ref = ref_forward(l);
  const OptSteps got = opt_steps(l, ref, kThreads, /*backward=*/true);
  EXPECT_EQ(got.routing.tokens, 0);
  EXPECT_EQ(got.routing.slots(), 0u);
  PeerGrads want;
  peer_backward_ref(l.config, l.router(), l.layout, l.x.data(), 0, ref.routing, nullptr,
                    l.dy.data(), &want);
  EXPECT_TRUE(got.grads.dx.empty());
  EXPECT_TRUE(got.grads.expert_ids.empty());
  EXPECT_EQ(got.grads.d_query_weight, want.d_query_weight);
  EXPECT_EQ(got.grads.d_query_bias, want.d_query_bias);
  EXPECT_EQ(got.grads.d_keys, want.d_keys);
  EXPECT_EQ(got.grads.d_norm_weight, want.d_norm_weight);
}

// Equal keys make every sub-score of a head equal: every token picks the same experts (the
// k lowest ids of the k'^2 candidates), so the backward's row-sparse gradients sum all tokens
// onto a few rows.
TEST_P(PeerParityTest, AllTokensRoutedToTheSameExpertsFollowTheLowerIdRule) {
  for (const int64_t k : {int64_t{1}, int64_t{5}}) {
    PeerConfig c = make_config(50, 70, 2, 7, 5, k, 3);
    c.shared_keys = true;
    c.input_norm = InputNorm::kRms;
    c.activation = Activation::kGelu;
    // Not softmax: with equal keys its dscore sums to 0 over a head's slots, so dq, dW_q and
    // db_q are pure rounding noise on both sides, nothing to compare.
    c.gate = Gate::kSigmoid;
    const PeerShape shape{300, c, DType::kI4};
    SCOPED_TRACE(describe(shape));
    PeerLayer l = random_layer(shape, 31);
    // Every key row is (0, 0.25, 0.5, 0.75, 1): dk = 5.
    for (size_t j = 0; j < l.keys.size(); ++j) l.keys[j] = 0.25f * static_cast<float>(j % 5);
    const RefForward ref = ref_forward(l);
    const OptSteps got = opt_steps(l, ref, kThreads, /*backward=*/true);
    // Expert ids by the lower-id rule among (i, j) in [0, 3)^2: i*7 + j ascending.
    const std::vector<int64_t> lowest = {0, 1, 2, 7, 8, 9, 14, 15, 16};
    for (int64_t row = 0; row < l.tokens * c.heads; ++row) {
      for (int64_t s = 0; s < k; ++s) {
        ASSERT_EQ(ref.routing.ids[sz(row * k + s)], lowest[sz(s)]) << "oracle, row " << row;
        ASSERT_EQ(got.routing.ids[sz(row * k + s)], lowest[sz(s)]) << "optimized, row " << row;
      }
    }
    expect_routing_close(got.routing, ref.routing, "routing");
    expect_close(got.y, ref.y, kForwardAbs, kForwardRel, "y");
    PeerGrads want;
    const std::vector<const uint8_t*> records = l.slot_records(ref.routing);
    peer_backward_ref(l.config, l.router(), l.layout, l.x.data(), l.tokens, ref.routing,
                      records.data(), l.dy.data(), &want);
    EXPECT_EQ(got.grads.expert_ids, std::vector<int64_t>(lowest.begin(), lowest.begin() + k));
    expect_grads_close(got.grads, want, "backward");
  }
}

// Integer queries and keys make every sub-score an exact small integer on both paths, with
// many exact ties between distinct sub-keys and between candidate sums: ids and scores must
// then be identical, ties broken by lower index per half and lower expert id overall.
TEST_P(PeerParityTest, ExactTiesAreBrokenByLowerIdIdenticallyOnBothPaths) {
  PeerConfig c = make_config(10, 10, 3, 12, 4, 7, 5);
  c.gate = Gate::kSigmoid;
  ASSERT_TRUE(c.validate_and_fill().ok());
  constexpr int64_t kTokens = 50;
  std::mt19937 rng(41);
  std::uniform_int_distribution<int> small(-2, 2);
  std::vector<float> q(sz(kTokens * c.query_rows())), keys(sz(c.key_heads() * 2 * 12 * 4));
  for (float& v : q) v = static_cast<float>(small(rng));
  for (float& v : keys) v = static_cast<float>(small(rng));
  PeerRouterParams p;
  p.keys = keys.data();
  PeerRouting want, got;
  peer_route_ref(c, p, q.data(), kTokens, &want);
  peer_route(c, p, q.data(), kTokens, &got, kThreads);
  EXPECT_EQ(got.ids, want.ids);
  EXPECT_EQ(got.scores, want.scores);
  EXPECT_EQ(got.gates, want.gates);
  // The lower-id rule, checked directly on the oracle's output: equal scores ascend by id.
  int ties = 0;
  for (size_t s = 0; s + 1 < want.ids.size(); ++s) {
    if ((s + 1) % sz(c.topk) == 0) continue;
    ASSERT_GE(want.scores[s], want.scores[s + 1]);
    if (want.scores[s] == want.scores[s + 1]) {
      ++ties;
      EXPECT_LT(want.ids[s], want.ids[s + 1]);
    }
  }
  EXPECT_GT(ties, 50) << "the integer scores should tie often";
}

// ---- int8 activations (ExpertDot::kInt8) ------------------------------------------------------

// xhat through the int8 quantizer and back: the activations the int8 dot sees. Row by row, as
// the kernel quantizes each token.
std::vector<float> int8_round_trip(const std::vector<float>& xhat, int64_t tokens, int64_t D) {
  std::vector<float> out(xhat.size());
  std::vector<uint16_t> scales(sz(quant_groups(D)));
  std::vector<int8_t> codes(sz(quant_groups(D) * kQuantGroup));
  for (int64_t t = 0; t < tokens; ++t) {
    quantize_row_int8_ref(&xhat[sz(t * D)], D, scales.data(), codes.data());
    dequantize_row_int8_ref(scales.data(), codes.data(), D, &out[sz(t * D)]);
  }
  return out;
}

std::vector<float> experts_y(const PeerLayer& l, const RefForward& ref, const float* xhat,
                             ExpertDot dot, int threads = kThreads) {
  std::vector<float> y(sz(l.tokens * l.config.dim_out), -1.0f);
  const std::vector<const uint8_t*> records = l.slot_records(ref.routing);
  peer_experts(l.config, l.layout, xhat, ref.routing, records.data(), y.data(), threads, dot);
  return y;
}

// ---- ExpertDot::kInt8's integer up rows --------------------------------------------------------

// Signed code i of an int8/int4 row (kernels/record.h's packing).
int row_code(DType t, const uint8_t* codes, int64_t i) {
  const int64_t g = i / kQuantGroup, j = i % kQuantGroup;
  if (t == DType::kI8) return static_cast<int8_t>(codes[sz(i)]);
  const uint8_t b = codes[sz(g * kQuantGroup / 2 + j % (kQuantGroup / 2))];
  return (j < kQuantGroup / 2 ? b & 0x0f : b >> 4) - 8;
}

// The rule of kernels/peer.h, written out plainly: per group, the coefficients ga * w (fp32), their
// largest magnitude, codes rounded at 32767 levels, one exact integer sum per element, times d.
// Also the bound on |y - the exact sum| that the coefficients' rounding allows (half a code each).
struct UpRule {
  std::vector<float> y;
  std::vector<double> bound;
};
UpRule int_up_rule(const RecordLayout& l, const std::vector<const uint8_t*>& records,
                   const std::vector<float>& ga) {
  const int64_t n = l.dim_out;
  UpRule out{std::vector<float>(sz(n)), std::vector<double>(sz(n))};
  for (int64_t g = 0; g < quant_groups(n); ++g) {
    std::vector<float> c;
    std::vector<const uint8_t*> rows;
    float amax = 0.0f;
    for (size_t r = 0; r < records.size(); ++r) {
      if (ga[r] == 0.0f) continue;
      uint16_t h;
      std::memcpy(&h, records[r] + l.up_scales_offset + 2 * g, 2);
      c.push_back(ga[r] * fp16_to_fp32(h));
      rows.push_back(records[r] + l.up_codes_offset);
      amax = std::max(amax, std::fabs(c.back()));
    }
    float inv = 32767.0f / amax;
    if (amax == 0.0f || !std::isfinite(inv)) inv = 0.0f;
    const float d = amax / 32767.0f;
    for (int64_t i = g * kQuantGroup; i < std::min(n, (g + 1) * kQuantGroup); ++i) {
      int64_t acc = 0;
      for (size_t r = 0; r < c.size(); ++r) {
        const float k = std::min(std::max(std::rint(c[r] * inv), -32767.0f), 32767.0f);
        acc += static_cast<int64_t>(k) * row_code(l.dtype, rows[r], i);
        out.bound[sz(i)] +=
            (inv == 0.0f ? std::fabs(c[r]) : 0.5 * d) * std::abs(row_code(l.dtype, rows[r], i));
      }
      out.y[sz(i)] = static_cast<float>(acc) * d;
    }
  }
  return out;
}

// Per element of y, how far ExpertDot::kInt8's integer up rows may move it from the oracle's sum
// (int_up_rule's bound), each slot's gated activation taken from the oracle's dot on the
// quantized activations xq.
std::vector<double> int_up_bounds(const PeerLayer& l, const PeerRouting& routing,
                                  const std::vector<float>& xq) {
  const PeerConfig& c = l.config;
  const RecordLayout& lay = l.layout;
  const int64_t per_token = routing.heads * routing.topk, groups = quant_groups(c.dim_out);
  std::vector<double> bound(sz(l.tokens * c.dim_out), 0.0);
  const std::vector<const uint8_t*> records = l.slot_records(routing);
  std::vector<float> down(sz(c.dim)), up(sz(c.dim_out));
  for (int64_t t = 0; t < l.tokens; ++t) {
    std::vector<double> ga(sz(per_token)), amax(sz(groups), 0.0);
    for (int64_t s = 0; s < per_token; ++s) {
      const uint8_t* r = records[sz(t * per_token + s)];
      unpack_record_ref(lay, r, down.data(), up.data());
      double z = 0;
      for (int64_t i = 0; i < c.dim; ++i)
        z += static_cast<double>(down[sz(i)]) * xq[sz(t * c.dim + i)];
      ga[sz(s)] = routing.gates[sz(t * per_token + s)] * activation_ref(c.activation, z);
      for (int64_t g = 0; g < groups; ++g) {
        uint16_t h;
        std::memcpy(&h, r + lay.up_scales_offset + 2 * g, 2);
        amax[sz(g)] = std::max(amax[sz(g)], std::fabs(ga[sz(s)] * fp16_to_fp32(h)));
      }
    }
    for (int64_t s = 0; s < per_token; ++s) {
      const uint8_t* codes = records[sz(t * per_token + s)] + lay.up_codes_offset;
      for (int64_t i = 0; i < c.dim_out; ++i) {
        const double d = amax[sz(i / kQuantGroup)] / 32767.0;
        bound[sz(t * c.dim_out + i)] += 0.505 * d * std::abs(row_code(lay.dtype, codes, i));
      }
    }
  }
  return bound;
}

// expect_close's forward tolerances plus the integer up rows' bound.
void expect_close_within(const std::vector<float>& got, const std::vector<float>& want,
                         const std::vector<double>& bound, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (float w : want) scale = std::max(scale, std::abs(static_cast<double>(w)));
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    const double tol = kForwardAbs * scale + kForwardRel * std::abs(want[i]) + bound[i];
    if (!(err <= tol) && bad++ == 0) {
      ADD_FAILURE() << what << ": element " << i << " got " << got[i] << " want " << want[i]
                    << " (tolerance " << tol << ", of it the integer up rows' " << bound[i] << ")";
    }
  }
  EXPECT_EQ(bad, 0u) << what;
}

// The integer dot is exact per lane of 4 products and the oracle's dot on the dequantized
// activations is exact in double, so the two differ by the fp32 sums and by the up rows'
// coefficients rounded to 32767 levels (int_up_bounds): those hold at the sweep's odd widths
// (partial last groups) and every activation.
TEST_P(PeerParityTest, Int8ActivationsMatchTheOracleOnTheQuantizedActivations) {
  const int64_t token_counts[] = {1, 7, 40, 7, 128};
  const int64_t dims[][2] = {{37, 37}, {100, 45}, {200, 200}, {45, 100}};
  int checked = 0;
  for_each_sweep_shape(token_counts, dims, [&](PeerShape shape, uint32_t seed) {
    if (!dtype_is_quantized(shape.dtype)) return;
    if (shape.config.n_keys == 128) {
      shape.config.dim = std::min<int64_t>(shape.config.dim, 45);
      shape.tokens = std::min<int64_t>(shape.tokens, 40);
    }
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, seed);
    const RefForward ref = ref_forward(l);
    const std::vector<float> xq = int8_round_trip(ref.xhat, l.tokens, l.config.dim);
    std::vector<float> want(sz(l.tokens * l.config.dim_out));
    const std::vector<const uint8_t*> records = l.slot_records(ref.routing);
    peer_experts_ref(l.config, l.layout, xq.data(), ref.routing, records.data(), want.data());
    expect_close_within(experts_y(l, ref, ref.xhat.data(), ExpertDot::kInt8), want,
                        int_up_bounds(l, ref.routing, xq), "y (int8 activations)");
    ++checked;
  });
  EXPECT_GT(checked, 10);
  // D = 2048, as in the background documents.
  for (DType t : {DType::kI8, DType::kI4}) {
    const PeerLayer l = random_layer({5, testing::background_width_config(), t}, 12);
    const RefForward ref = ref_forward(l);
    const std::vector<float> xq = int8_round_trip(ref.xhat, l.tokens, l.config.dim);
    std::vector<float> want(sz(l.tokens * l.config.dim_out));
    const std::vector<const uint8_t*> records = l.slot_records(ref.routing);
    peer_experts_ref(l.config, l.layout, xq.data(), ref.routing, records.data(), want.data());
    expect_close_within(experts_y(l, ref, ref.xhat.data(), ExpertDot::kInt8), want,
                        int_up_bounds(l, ref.routing, xq),
                        "D = 2048 " + std::string(dtype_name(t)));
  }
}

// Float records have no integer codes, and a token whose xhat the int8 quantizer cannot take
// (beyond quant_max_abs(kI8), here 1e30; NaN; -inf) falls back to the float dot: the same bits
// as kFloat's dots, then the up rows by the integer rule (or kFloat's axpys, for NaN). The bad
// values sit in a first, a middle and a last, partial vector of the row.
TEST_P(PeerParityTest, Int8ActivationsFallBackToTheFloatDotWhereTheyCannotApply) {
  PeerConfig c = make_config(70, 50, 2, 9, 6, 4, 3);
  for (DType t : kAllDTypes) {
    const PeerShape shape{23, c, t};
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 81);
    RefForward ref = ref_forward(l);
    ref.xhat[sz(5 * c.dim + 3)] = 1e30f;                                            // token 5
    ref.xhat[sz(7 * c.dim + c.dim - 1)] = std::numeric_limits<float>::quiet_NaN();  // token 7
    ref.xhat[sz(9 * c.dim + 40)] = -std::numeric_limits<float>::infinity();         // token 9
    const std::vector<float> exact = experts_y(l, ref, ref.xhat.data(), ExpertDot::kFloat);
    const std::vector<float> int8 = experts_y(l, ref, ref.xhat.data(), ExpertDot::kInt8);
    if (!dtype_is_quantized(t)) {
      expect_bits_equal(int8, exact, "float records");
      continue;
    }
    const auto row = [&](const std::vector<float>& y, int64_t token) {
      return std::vector<float>(y.begin() + token * c.dim_out, y.begin() + (token + 1) * c.dim_out);
    };
    // The float dot's gated activations, then the up rows by the integer rule where it takes
    // them (the float axpys where a coefficient is not finite: token 7's NaN).
    const int64_t per_token = c.heads * c.topk;
    const std::vector<const uint8_t*> all = l.slot_records(ref.routing);
    const auto float_dot_row = [&](int64_t token) {
      std::vector<float> ga(sz(per_token)), y(sz(c.dim_out));
      const uint8_t* const* records = &all[sz(token * per_token)];
      for (int64_t s = 0; s < per_token; ++s) {
        const float z = record_down_dot(l.layout, records[s], &ref.xhat[sz(token * c.dim)]);
        ga[sz(s)] = static_cast<float>(ref.routing.gates[sz(token * per_token + s)] *
                                       activation_ref(c.activation, z));
      }
      if (!record_up_int(l.layout, records, ga.data(), per_token, y.data()))
        return row(exact, token);
      return y;
    };
    expect_bits_equal(row(int8, 5), float_dot_row(5), "token 5, out of the int8 range");
    expect_bits_equal(row(int8, 7), float_dot_row(7), "token 7, NaN in the last vector");
    expect_bits_equal(row(int8, 7), row(exact, 7), "token 7, NaN: the float axpys too");
    expect_bits_equal(row(int8, 9), float_dot_row(9), "token 9, -inf");
    EXPECT_NE(row(int8, 4), row(exact, 4)) << "token 4 should take the int8 dot";
  }
}

TEST_P(PeerParityTest, Int8ActivationsInWavesEqualOnePassBitForBit) {
  PeerConfig c = make_config(77, 50, 4, 10, 9, 6, 3);
  c.activation = Activation::kRelu;
  for (DType t : {DType::kI4, DType::kI8}) {
    const PeerShape shape{61, c, t};
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 91);
    const RefForward ref = ref_forward(l);
    const std::vector<float> want = experts_y(l, ref, ref.xhat.data(), ExpertDot::kInt8, 2);
    const std::vector<const uint8_t*> all = l.slot_records(ref.routing);
    std::vector<float> y(want.size(), std::nanf(""));
    PeerExpertProgress progress;
    progress.reset(l.tokens, c.heads * c.topk);
    for (int w = 0; w < 3; ++w) {  // slot s arrives in wave s % 3
      std::vector<const uint8_t*> records(all.size());
      for (size_t s = 0; s < all.size(); ++s)
        records[s] = static_cast<int>(s % 3) <= w ? all[s] : nullptr;
      peer_experts_resume(c, l.layout, ref.xhat.data(), ref.routing, records.data(), y.data(),
                          &progress, w + 1, ExpertDot::kInt8);
    }
    EXPECT_TRUE(progress.done());
    expect_bits_equal(y, want, "three waves");
  }
}

// ---- threads -----------------------------------------------------------------------------------

TEST_P(PeerParityTest, ThreadCountDoesNotChangeAnyBit) {
  for (DType t : {DType::kI4, DType::kF16}) {
    PeerConfig c = make_config(77, 50, 4, 10, 9, 6, 3);
    c.input_norm = InputNorm::kRms;
    c.query_bias = true;
    c.gate = Gate::kSoftmax;
    c.activation = Activation::kGeluTanh;
    const PeerShape shape{203, c, t};
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 51);
    const RefForward ref = ref_forward(l);
    const OptSteps one = opt_steps(l, ref, 1, /*backward=*/true);
    for (int threads : {3, 8}) {
      const OptSteps many = opt_steps(l, ref, threads, /*backward=*/true);
      const std::string what = "threads " + std::to_string(threads);
      expect_bits_equal(many.xhat, one.xhat, what + " xhat");
      expect_bits_equal(many.q, one.q, what + " q");
      EXPECT_EQ(many.routing.ids, one.routing.ids) << what;
      expect_bits_equal(many.routing.scores, one.routing.scores, what + " scores");
      expect_bits_equal(many.routing.gates, one.routing.gates, what + " gates");
      expect_bits_equal(many.y, one.y, what + " y");
      EXPECT_EQ(many.grads.expert_ids, one.grads.expert_ids) << what;
      expect_bits_equal(many.grads.dx, one.grads.dx, what + " dx");
      expect_bits_equal(many.grads.d_query_weight, one.grads.d_query_weight, what + " dW_q");
      expect_bits_equal(many.grads.d_query_bias, one.grads.d_query_bias, what + " db_q");
      expect_bits_equal(many.grads.d_keys, one.grads.d_keys, what + " dK");
      expect_bits_equal(many.grads.d_norm_weight, one.grads.d_norm_weight, what + " dgamma");
      expect_bits_equal(many.grads.d_down, one.grads.d_down, what + " d_down");
      expect_bits_equal(many.grads.d_up, one.grads.d_up, what + " d_up");
    }
  }
}

// q and the sub-key scores come from the BLAS in fixed blocks of tokens: token counts on both
// sides of a block boundary, a last block of one token, shared and per-head keys, k' = n.
TEST_P(PeerParityTest, QueryAndRoutingAreBitIdenticalForAnyThreadCount) {
  struct Case {
    int64_t tokens, dim, n_keys, dk, heads, topk, topk_per_half;
    bool shared_keys;
  };
  const Case cases[] = {{1, 33, 5, 7, 2, 3, 2, false},      {63, 100, 13, 16, 3, 4, 4, true},
                        {64, 64, 9, 9, 1, 2, 9, false},     {65, 129, 31, 64, 4, 8, 8, false},
                        {129, 2048, 20, 64, 4, 8, 8, true}, {257, 45, 40, 5, 2, 16, 6, false}};
  for (const Case& k : cases) {
    PeerConfig c = make_config(k.dim, k.dim, k.heads, k.n_keys, k.dk, k.topk, k.topk_per_half);
    c.shared_keys = k.shared_keys;
    c.query_bias = true;
    const PeerShape shape{k.tokens, c, DType::kI8};
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 71);
    const PeerRouterParams p = l.router();
    for (RoutingPrecision precision :
         {RoutingPrecision::kF32, RoutingPrecision::kBf16, RoutingPrecision::kInt8}) {
      std::vector<float> q1(sz(l.tokens * c.query_rows()));
      PeerRouting r1;
      peer_query(c, p, l.x.data(), l.tokens, q1.data(), 1, precision);
      peer_route(c, p, q1.data(), l.tokens, &r1, 1, precision);
      for (int threads : {2, 3, 8}) {
        const std::string what = precision_name(precision) + " threads " + std::to_string(threads);
        std::vector<float> q(q1.size(), -1.0f);
        PeerRouting r;
        peer_query(c, p, l.x.data(), l.tokens, q.data(), threads, precision);
        peer_route(c, p, q.data(), l.tokens, &r, threads, precision);
        expect_bits_equal(q, q1, what + " q");
        EXPECT_EQ(r.ids, r1.ids) << what;
        expect_bits_equal(r.scores, r1.scores, what + " scores");
        expect_bits_equal(r.gates, r1.gates, what + " gates");
      }
    }
  }
}

// A token's q and routing are the same bits alone, at any place of any batch: the BLAS runs
// 256- and 64-row blocks (a short last block zero-padded), whose rows round alike wherever they
// sit (kernels/cpu/peer.cc: kQueryBlock); spans in and across both kinds of block.
TEST_P(PeerParityTest, QueryAndRoutingOfATokenDoNotDependOnItsBatch) {
  PeerConfig c = make_config(2048, 40, 4, 23, 64, 8, 8);
  c.query_bias = true;
  const PeerShape shape{600, c, DType::kI4};  // two 256-token query blocks, then 64-token ones
  SCOPED_TRACE(describe(shape));
  const PeerLayer l = random_layer(shape, 111);
  const PeerRouterParams p = l.router();
  const int64_t rows = l.config.query_rows(), D = l.config.dim, hk = c.heads * c.topk;
  for (RoutingPrecision precision :
       {RoutingPrecision::kF32, RoutingPrecision::kBf16, RoutingPrecision::kInt8}) {
    std::vector<float> q_all(sz(l.tokens * rows));
    PeerRouting all;
    peer_query(l.config, p, l.x.data(), l.tokens, q_all.data(), kThreads, precision);
    peer_route(l.config, p, q_all.data(), l.tokens, &all, kThreads, precision);
    // Sub-batches [first, first + count): one token, a block's tail, across a block boundary.
    // Short last blocks of 1 to 63 tokens are padded to 16, 32, 48 or 64 rows (short_block_rows):
    // counts at and across each of those.
    const int64_t spans[][2] = {{0, 1},     {149, 1},  {70, 1},   {3, 5},   {60, 10}, {64, 64},
                                {100, 50},  {599, 1},  {250, 10}, {0, 256}, {7, 16},  {30, 17},
                                {90, 32},   {41, 33},  {10, 48},  {5, 49},  {1, 63},  {300, 300},
                                {200, 400}, {512, 88}, {0, 600}};
    for (const auto& span : spans) {
      const int64_t first = span[0], count = span[1];
      std::vector<float> q(sz(count * rows));
      PeerRouting r;
      peer_query(l.config, p, l.x.data() + first * D, count, q.data(), kThreads, precision);
      peer_route(l.config, p, q.data(), count, &r, kThreads, precision);
      const std::string what = precision_name(precision) + " tokens " + std::to_string(first) +
                               " + " + std::to_string(count);
      expect_bits_equal(
          q,
          std::vector<float>(q_all.begin() + first * rows, q_all.begin() + (first + count) * rows),
          what + " q");
      EXPECT_EQ(r.ids, std::vector<int64_t>(all.ids.begin() + first * hk,
                                            all.ids.begin() + (first + count) * hk))
          << what;
      expect_bits_equal(r.scores,
                        std::vector<float>(all.scores.begin() + first * hk,
                                           all.scores.begin() + (first + count) * hk),
                        what + " scores");
    }
  }
}

// ---- bf16 routing (RoutingPrecision::kBf16) ----------------------------------------------------

// q and the routing in kBf16 against the oracle's kBf16 (the same bf16 operands, summed in
// double), each step fed the oracle's input, across the sweep's shapes (odd D and dk: a half-empty
// last pair; n not a multiple of 16: a partial column panel) and at D = 2048.
void check_bf16_routing(const PeerShape& shape, uint32_t seed) {
  const std::string what = describe(shape) + " bf16 routing";
  SCOPED_TRACE(what);
  const PeerLayer l = random_layer(shape, seed);
  const PeerConfig& c = l.config;
  const PeerRouterParams p = l.router();
  const RefForward ref = ref_forward(l);
  std::vector<float> want_q(sz(l.tokens * c.query_rows())), got_q(want_q.size(), -1.0f);
  peer_query_ref(c, p, ref.xhat.data(), l.tokens, want_q.data(), RoutingPrecision::kBf16);
  peer_query(c, p, ref.xhat.data(), l.tokens, got_q.data(), kThreads, RoutingPrecision::kBf16);
  expect_close(got_q, want_q, kForwardAbs, kForwardRel, what + " q");
  PeerRouting want, got;
  peer_route_ref(c, p, want_q.data(), l.tokens, &want, RoutingPrecision::kBf16);
  peer_route(c, p, want_q.data(), l.tokens, &got, kThreads, RoutingPrecision::kBf16);
  expect_routing_close(got, want, what);
}

// peer_prepare_router's weights, made once, give the bits of the weights each call makes, for
// every precision, with shared and per-head keys, at a shape with a short last block.
TEST_P(PeerParityTest, PreparedRouterWeightsGiveTheBitsOfWeightsMadeInTheCall) {
  for (bool shared : {false, true}) {
    PeerConfig c = make_config(96, 40, 3, 21, 12, 5, 4);
    c.shared_keys = shared;
    c.query_bias = true;
    const PeerShape shape{70, c, DType::kI4};
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 131);
    const PeerRouterParams p = l.router();
    for (RoutingPrecision precision :
         {RoutingPrecision::kF32, RoutingPrecision::kBf16, RoutingPrecision::kInt8}) {
      const PeerRouterWeights w = peer_prepare_router(l.config, p, precision, kThreads);
      std::vector<float> q_made(sz(l.tokens * l.config.query_rows())), q_kept(q_made.size());
      PeerRouting made, kept;
      peer_query(l.config, p, l.x.data(), l.tokens, q_made.data(), kThreads, precision);
      peer_query(l.config, p, l.x.data(), l.tokens, q_kept.data(), kThreads, precision, &w);
      expect_bits_equal(q_kept, q_made, precision_name(precision) + " q");
      peer_route(l.config, p, q_made.data(), l.tokens, &made, kThreads, precision);
      peer_route(l.config, p, q_made.data(), l.tokens, &kept, kThreads, precision, &w);
      EXPECT_EQ(kept.ids, made.ids) << precision_name(precision);
      expect_bits_equal(kept.scores, made.scores, precision_name(precision) + " scores");
    }
  }
}

TEST_P(PeerParityTest, Bf16RoutingMatchesTheBf16OracleAcrossShapes) {
  const int64_t token_counts[] = {1, 7, 70, 7, 130};
  const int64_t dims[][2] = {{37, 37}, {100, 45}, {201, 200}, {45, 100}};
  for_each_sweep_shape(token_counts, dims, [&](PeerShape shape, uint32_t seed) {
    if (shape.config.dim_key % 2 == 0) ++shape.config.dim_key;  // odd dk too: a half-empty pair
    if (shape.config.n_keys == 128) shape.config.dim = std::min<int64_t>(shape.config.dim, 45);
    shape.dtype = DType::kI8;  // the records do not enter the routing
    check_bf16_routing(shape, seed);
  });
  check_bf16_routing({65, testing::background_width_config(), DType::kI8}, 13);
  PeerConfig wide = make_config(2048, 40, 4, 40, 64, 8, 8);  // n = 40: panels of 16, 16, 8
  check_bf16_routing({9, wide, DType::kI8}, 14);
}

// q of kF32 and of `precision` on the same layer, the largest |q| of kF32 and |difference|.
struct QueryPair {
  std::vector<float> q32, q;
  double max_q = 0, max_diff = 0;
};
QueryPair query_pair(const PeerLayer& l, RoutingPrecision precision) {
  const PeerConfig& c = l.config;
  const PeerRouterParams p = l.router();
  QueryPair r{std::vector<float>(sz(l.tokens * c.query_rows())), {}};
  r.q.resize(r.q32.size());
  peer_query(c, p, l.x.data(), l.tokens, r.q32.data(), kThreads, RoutingPrecision::kF32);
  peer_query(c, p, l.x.data(), l.tokens, r.q.data(), kThreads, precision);
  for (size_t i = 0; i < r.q32.size(); ++i) {
    r.max_q = std::max(r.max_q, std::abs(static_cast<double>(r.q32[i])));
    r.max_diff = std::max(r.max_diff, std::abs(static_cast<double>(r.q32[i]) - r.q[i]));
  }
  return r;
}

// kBf16 really rounds: its q differs from kF32's, by about bf16's rounding of the operands.
TEST_P(PeerParityTest, Bf16RoutingDiffersFromF32ByTheOperandsRounding) {
  PeerConfig c = make_config(512, 40, 2, 30, 32, 4, 4);
  c.query_bias = true;
  const PeerLayer l = random_layer({20, c, DType::kI8}, 15);
  const QueryPair qs = query_pair(l, RoutingPrecision::kBf16);
  const double max_q = qs.max_q, max_diff = qs.max_diff;
  EXPECT_GT(max_diff, 1e-4 * max_q);  // bf16 has 8 significant bits: not fp32's rounding
  EXPECT_LT(max_diff, 3e-2 * max_q);  // but the same product
}

// ---- int8 routing (RoutingPrecision::kInt8) ----------------------------------------------------

// q and the routing in kInt8 against the oracle's kInt8: the products are exact integers and
// the scaling is the same operations, so every bit agrees, on every path; each step fed the
// oracle's input.
void check_int8_routing(const PeerShape& shape, uint32_t seed) {
  const std::string what = describe(shape) + " int8 routing";
  SCOPED_TRACE(what);
  const PeerLayer l = random_layer(shape, seed);
  const PeerConfig& c = l.config;
  const PeerRouterParams p = l.router();
  const RefForward ref = ref_forward(l);
  std::vector<float> want_q(sz(l.tokens * c.query_rows())), got_q(want_q.size(), -1.0f);
  peer_query_ref(c, p, ref.xhat.data(), l.tokens, want_q.data(), RoutingPrecision::kInt8);
  peer_query(c, p, ref.xhat.data(), l.tokens, got_q.data(), kThreads, RoutingPrecision::kInt8);
  expect_bits_equal(got_q, want_q, what + " q");
  PeerRouting want, got;
  peer_route_ref(c, p, want_q.data(), l.tokens, &want, RoutingPrecision::kInt8);
  peer_route(c, p, want_q.data(), l.tokens, &got, kThreads, RoutingPrecision::kInt8);
  EXPECT_EQ(got.ids, want.ids) << what;
  expect_bits_equal(got.scores, want.scores, what + " scores");
  expect_bits_equal(got.gates, want.gates, what + " gates");
}

TEST_P(PeerParityTest, Int8RoutingMatchesTheInt8OracleBitForBitAcrossShapes) {
  const int64_t token_counts[] = {1, 7, 70, 7, 130};
  const int64_t dims[][2] = {{37, 37}, {100, 45}, {201, 200}, {45, 100}};
  for_each_sweep_shape(token_counts, dims, [&](PeerShape shape, uint32_t seed) {
    if (shape.config.dim_key % 2 == 0) ++shape.config.dim_key;  // odd dk: a partial vector
    if (shape.config.n_keys == 128) shape.config.dim = std::min<int64_t>(shape.config.dim, 45);
    shape.dtype = DType::kI8;  // the records do not enter the routing
    check_int8_routing(shape, seed);
  });
  check_int8_routing({65, testing::background_width_config(), DType::kI8}, 13);
  PeerConfig wide = make_config(2048, 40, 4, 40, 64, 8, 8);
  wide.query_bias = true;
  check_int8_routing({300, wide, DType::kI8}, 14);  // a 256-token query block and a short one
}

// Rows the quantizer must not scale: all zeros (zero codes, scale 0: q is the bias), a NaN or an
// infinity (a NaN scale: q is NaN, as kF32 gives NaN), values so small that levels / amax
// overflows (treated as zeros), and rows mixing huge and tiny values (codes saturate at +-127).
// The same on every path, against the oracle.
TEST_P(PeerParityTest, Int8RoutingQuantizesZeroNonFiniteAndTinyRowsByTheRule) {
  PeerConfig c = make_config(70, 40, 2, 11, 9, 4, 4);  // D = 70: two 32-blocks, a 6-element tail
  c.query_bias = true;
  c.input_norm = InputNorm::kNone;
  const PeerLayer l = random_layer({9, c, DType::kI8}, 21);
  PeerRouterParams p = l.router();
  std::vector<float> x = l.x;
  const int64_t D = c.dim, rows = c.query_rows();
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::fill(x.begin(), x.begin() + D, 0.0f);                  // token 0: zeros
  x[sz(D + 5)] = nan;                                         // token 1: a NaN, vector part
  x[sz(2 * D + 69)] = -inf;                                   // token 2: an infinity, tail
  for (int64_t d = 0; d < D; ++d) x[sz(3 * D + d)] = 1e-39f;  // token 3: inv overflows
  x[sz(4 * D + 3)] = 3e38f;                                   // token 4: one huge value
  x[sz(5 * D + 10)] = inf;                                    // token 5: an infinity, vector part
  x[sz(6 * D + 68)] = nan;                                    // token 6: a NaN, tail
  // Weight rows by the same rule: a zero row of W_q (its q is the bias) and a tiny one.
  std::vector<float> w(p.query_weight, p.query_weight + rows * D);
  std::fill(w.begin() + 2 * D, w.begin() + 3 * D, 0.0f);
  std::fill(w.begin() + 5 * D, w.begin() + 6 * D, 1e-39f);
  p.query_weight = w.data();
  std::vector<float> want(sz(l.tokens * rows)), got(want.size(), -1.0f);
  peer_query_ref(c, p, x.data(), l.tokens, want.data(), RoutingPrecision::kInt8);
  peer_query(c, p, x.data(), l.tokens, got.data(), kThreads, RoutingPrecision::kInt8);
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(got[sz(r)], p.query_bias[r]) << "zero row, q " << r;
    for (int64_t t : {1, 2, 5, 6}) EXPECT_TRUE(std::isnan(got[sz(t * rows + r)])) << t << ", " << r;
    EXPECT_EQ(got[sz(3 * rows + r)], p.query_bias[r]) << "tiny row, q " << r;
  }
  for (int64_t t : {0, 3, 4, 7, 8}) {
    EXPECT_EQ(got[sz(t * rows + 2)], p.query_bias[2]) << "zero W_q row, token " << t;
    EXPECT_EQ(got[sz(t * rows + 5)], p.query_bias[5]) << "tiny W_q row, token " << t;
  }
  for (int64_t i = 0; i < l.tokens * rows; ++i) {
    EXPECT_EQ(std::isnan(got[sz(i)]), std::isnan(want[sz(i)])) << "q " << i;
    if (std::isnan(want[sz(i)])) continue;
    EXPECT_EQ(std::memcmp(&got[sz(i)], &want[sz(i)], sizeof(float)), 0)
        << "q " << i << ": " << got[sz(i)] << " vs " << want[sz(i)];
  }
  // Sub-key scores: a zero key and a zero head-half of q score 0 (the routing's ids and scores
  // as the oracle's).
  std::vector<float> keys(p.keys, p.keys + c.key_heads() * 2 * c.n_keys * c.dim_key);
  std::fill(keys.begin() + 3 * c.dim_key, keys.begin() + 4 * c.dim_key, 0.0f);
  p.keys = keys.data();
  std::vector<float> q = want;
  for (float& v : q) v = std::isfinite(v) && std::abs(v) < 1e30f ? v : 0.5f;  // scores finite
  std::fill(q.begin() + 7 * rows, q.begin() + 7 * rows + c.dim_key, 0.0f);
  PeerRouting want_r, got_r;
  peer_route_ref(c, p, q.data(), l.tokens, &want_r, RoutingPrecision::kInt8);
  peer_route(c, p, q.data(), l.tokens, &got_r, kThreads, RoutingPrecision::kInt8);
  for (size_t i = 0; i < want_r.ids.size(); ++i) {
    EXPECT_EQ(got_r.ids[i], want_r.ids[i])
        << "slot " << i << ": scores " << got_r.scores[i] << " vs " << want_r.scores[i];
  }
  expect_bits_equal(got_r.scores, want_r.scores, "scores");
}

// kInt8 really quantizes: its q differs from kF32's by about the codes' rounding, a percent or so
// of the largest |q|, and its routing keeps most of kF32's experts.
TEST_P(PeerParityTest, Int8RoutingDiffersFromF32ByTheQuantization) {
  PeerConfig c = make_config(512, 40, 2, 30, 32, 4, 4);
  c.query_bias = true;
  const PeerLayer l = random_layer({40, c, DType::kI8}, 15);
  const PeerRouterParams p = l.router();
  const QueryPair qs = query_pair(l, RoutingPrecision::kInt8);
  const double max_q = qs.max_q, max_diff = qs.max_diff;
  const std::vector<float>&q32 = qs.q32, &q8 = qs.q;
  EXPECT_GT(max_diff, 1e-4 * max_q);  // not fp32's rounding
  EXPECT_LT(max_diff, 5e-2 * max_q);  // but the same product
  PeerRouting r32, r8;
  peer_route(c, p, q32.data(), l.tokens, &r32, kThreads, RoutingPrecision::kF32);
  peer_route(c, p, q8.data(), l.tokens, &r8, kThreads, RoutingPrecision::kInt8);
  int64_t kept = 0;
  const size_t k = static_cast<size_t>(c.topk);
  for (size_t base = 0; base < r32.ids.size(); base += k) {
    for (size_t s = 0; s < k; ++s) {
      kept += std::count(r8.ids.begin() + base, r8.ids.begin() + base + k, r32.ids[base + s]);
    }
  }
  EXPECT_GT(static_cast<double>(kept), 0.8 * static_cast<double>(r32.ids.size()));
}

TEST_P(PeerParityTest, ExpertsInWavesEqualOnePassBitForBit) {
  // The tiered store's two-wave expert pass: records missing from a wave (nullptr) arrive in a
  // later one; whatever the pattern, y is peer_experts' to the bit.
  for (DType t : {DType::kI4, DType::kI8, DType::kBF16}) {
    PeerConfig c = make_config(77, 50, 4, 10, 9, 6, 3);
    c.activation = Activation::kRelu;  // relu's exact zeros skip the axpy: must skip alike
    c.gate = Gate::kSoftmax;
    const PeerShape shape{131, c, t};
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 61);
    const RefForward ref = ref_forward(l);
    const std::vector<const uint8_t*> all = l.slot_records(ref.routing);
    std::vector<float> want(sz(l.tokens * l.config.dim_out));
    peer_experts(l.config, l.layout, ref.xhat.data(), ref.routing, all.data(), want.data(), 2);
    std::mt19937 rng(7);
    for (double late : {0.0, 0.1, 0.5, 0.9, 1.0}) {
      for (int waves : {2, 3}) {
        // Each slot's record arrives in wave 0 (present from the start) or a later one.
        std::bernoulli_distribution is_late(late);
        std::uniform_int_distribution<int> which(1, waves - 1);
        std::vector<int> arrives(all.size());
        for (int& a : arrives) a = is_late(rng) ? which(rng) : 0;
        std::vector<float> y(want.size(), std::nanf(""));
        PeerExpertProgress progress;
        progress.reset(l.tokens, l.config.heads * l.config.topk);
        for (int w = 0; w < waves; ++w) {
          std::vector<const uint8_t*> records(all.size());
          for (size_t s = 0; s < all.size(); ++s) records[s] = arrives[s] <= w ? all[s] : nullptr;
          peer_experts_resume(l.config, l.layout, ref.xhat.data(), ref.routing, records.data(),
                              y.data(), &progress, w + 1);
          if (late == 0.0) {
            EXPECT_TRUE(progress.done());
          }
        }
        EXPECT_TRUE(progress.done()) << "late " << late << ", waves " << waves;
        expect_bits_equal(y, want,
                          "late " + std::to_string(late) + " waves " + std::to_string(waves));
      }
    }
  }
}

// The cuda executor's misses computed on the CPU (runtime/layer/cuda_executor.h): the CPU sums
// a chosen subset of each token's slots (the unchosen records may be absent), the device the
// rest, and y is the fp32 sum of the two. The CPU's part matches the oracle run on the chosen
// slots alone (the others' gates zero) at many shapes; every slot chosen is peer_experts' bits;
// and the split's y stays within the forward tolerance of the all-resident y (it is not the same
// bits: two fp32 partial sums added, instead of one sum in slot order), with the largest error
// seen printed.
TEST_P(PeerParityTest, PartialExpertsMatchTheOracleOnTheChosenSlotsAndTheSplitStaysClose) {
  double worst = 0;  // max |split - all| / max |all|
  std::mt19937 rng(77);
  for (DType t : {DType::kI4, DType::kI8, DType::kBF16, DType::kF32}) {
    for (const auto& [tokens, dim, dim_out] :
         {std::tuple{1, 32, 16}, std::tuple{37, 77, 50}, std::tuple{130, 96, 33}}) {
      PeerConfig c = make_config(dim, dim_out, 3, 10, 8, 5, 3);
      c.activation = tokens == 37 ? Activation::kRelu : Activation::kGelu;
      const PeerShape shape{tokens, c, t};
      SCOPED_TRACE(describe(shape));
      const PeerLayer l = random_layer(shape, 40 + tokens);
      const RefForward ref = ref_forward(l);
      const std::vector<const uint8_t*> all = l.slot_records(ref.routing);
      const size_t out = sz(l.tokens * l.config.dim_out);
      std::vector<float> whole(out);
      peer_experts(l.config, l.layout, ref.xhat.data(), ref.routing, all.data(), whole.data(),
                   kThreads);
      for (double p : {0.0, 0.2, 0.7, 1.0}) {
        std::bernoulli_distribution chosen(p);
        std::vector<uint8_t> selected(all.size());
        for (uint8_t& s : selected) s = chosen(rng) ? 1 : 0;
        std::vector<const uint8_t*> cpu_records(all.size(), nullptr);
        PeerRouting cpu_only = ref.routing, device_only = ref.routing;
        for (size_t s = 0; s < all.size(); ++s) {
          if (selected[s] != 0) {
            cpu_records[s] = all[s];
            device_only.gates[s] = 0.0f;
          } else {
            cpu_only.gates[s] = 0.0f;
          }
        }
        std::vector<float> part(out, std::nanf(""));
        peer_experts_partial(l.config, l.layout, ref.xhat.data(), ref.routing, cpu_records.data(),
                             selected.data(), part.data(), kThreads);
        std::vector<float> oracle(out);
        peer_experts_ref(l.config, l.layout, ref.xhat.data(), cpu_only, all.data(), oracle.data());
        expect_close(part, oracle, kForwardAbs, kForwardRel, "chosen part vs oracle");
        if (p == 1.0) {
          expect_bits_equal(part, whole, "every slot chosen");
        }
        if (dtype_is_quantized(t)) {
          // ExpertDot::kInt8 sums the chosen slots' up rows as a token's whole set: the bits of
          // peer_experts with the other slots' gates zero (their gated activations skipped).
          std::vector<float> part8(out, std::nanf("")), want8(out);
          peer_experts_partial(l.config, l.layout, ref.xhat.data(), ref.routing, cpu_records.data(),
                               selected.data(), part8.data(), kThreads, ExpertDot::kInt8);
          peer_experts(l.config, l.layout, ref.xhat.data(), cpu_only, all.data(), want8.data(),
                       kThreads, ExpertDot::kInt8);
          expect_bits_equal(part8, want8, "int8: the chosen part");
        }
        // The device's part (the kernels skip zero gates alike) plus the CPU's.
        std::vector<float> rest(out);
        peer_experts(l.config, l.layout, ref.xhat.data(), device_only, all.data(), rest.data(),
                     kThreads);
        std::vector<float> split(out);
        double scale = 0, err = 0;
        for (size_t i = 0; i < out; ++i) {
          split[i] = rest[i] + part[i];
          scale = std::max(scale, std::abs(static_cast<double>(whole[i])));
          err = std::max(err, std::abs(static_cast<double>(split[i]) - whole[i]));
        }
        expect_close(split, whole, kForwardAbs, kForwardRel, "split vs all-resident");
        if (scale > 0) worst = std::max(worst, err / scale);
      }
    }
  }
  std::printf("largest |split - all-resident| / max|y|: %.3g\n", worst);
}

// ---- every path alike --------------------------------------------------------------------------

// The CPU paths this machine can run, scalar first.
std::vector<CpuPath> supported_paths() {
  std::vector<CpuPath> paths;
  for (CpuPath p : {CpuPath::kScalar, CpuPath::kAvx2, CpuPath::kAvxVnni, CpuPath::kAvx512}) {
    if (cpu_path_supported(p)) paths.push_back(p);
  }
  return paths;
}

// The int8 dot sums the same exact integer lanes in the same fp32 order on every path
// (kernels/cpu/peer_kernels.h): the same bits everywhere, and the oracle's double dot on the
// dequantized activations within the row tolerance, at every length (partial last groups, odd
// and even group counts for AVX-512's pairs).
TEST(PeerPathsTest, Int8DotGivesTheSameBitsOnEveryPathAndMatchesTheQuantizedOracle) {
  const std::vector<CpuPath> paths = supported_paths();
  std::mt19937 rng(19);
  const std::vector<int64_t> lengths = lengths_up_to(200, {2048});
  for (DType t : {DType::kI8, DType::kI4}) {
    for (int64_t n : lengths) {
      const RecordLayout l = layout_of(t, n, n);
      const std::vector<float> down = normal_values(sz(n), 1.0, &rng);
      std::vector<uint8_t> record(l.stride);
      pack_record_ref(l, down.data(), down.data(), record.data());
      std::vector<float> u(sz(n)), v(sz(n));
      unpack_record_ref(l, record.data(), u.data(), v.data());
      std::vector<float> x = normal_values(sz(n) + kQuantGroup, 1.0, &rng);
      std::fill(x.begin() + n, x.end(), std::numeric_limits<float>::quiet_NaN());
      const std::vector<float> xq = int8_round_trip(x, 1, n);
      double want = 0, sum_abs = 0;
      for (int64_t i = 0; i < n; ++i) {
        want += static_cast<double>(u[sz(i)]) * xq[sz(i)];
        sum_abs += std::abs(static_cast<double>(u[sz(i)]) * xq[sz(i)]);
      }
      float first = 0;
      for (CpuPath p : paths) {
        set_cpu_path(p);
        const float got = record_down_dot_int8(l, record.data(), x.data());
        if (p == paths.front()) {
          first = got;
          EXPECT_NEAR(got, want, kRowAbs * sum_abs + kRowRel * std::abs(want))
              << dtype_name(t) << " n " << n;
        } else {
          EXPECT_EQ(std::memcmp(&got, &first, sizeof(float)), 0)
              << dtype_name(t) << " n " << n << " on " << cpu_path_name(p) << ": " << got << " vs "
              << first;
        }
      }
      set_cpu_path(CpuPath::kAuto);
    }
  }
}

// peer_experts runs a token's down-row dots several rows at a time, interleaved: each row keeps
// the bits of its dot alone, on every path, for every dtype, at lengths with partial last groups
// and odd group counts, and for counts that leave a partial block of rows.
TEST(PeerPathsTest, DotsOfSeveralRowsGiveEachRowTheBitsOfItsDotAlone) {
  const std::vector<CpuPath> paths = supported_paths();
  std::mt19937 rng(29);
  const std::vector<int64_t> lengths = lengths_up_to(70, {2047, 2048});
  constexpr int64_t kRows = 9;
  for (CpuPath p : paths) {
    set_cpu_path(p);
    for (DType t : {DType::kI4, DType::kI8, DType::kBF16, DType::kF16, DType::kF32}) {
      for (int64_t n : lengths) {
        const RecordLayout l = layout_of(t, n, n);
        std::vector<uint8_t> table(l.stride * kRows);
        std::vector<const uint8_t*> records;
        for (int64_t r = 0; r < kRows; ++r) {
          const std::vector<float> w = normal_values(sz(n), 1.0, &rng);
          pack_record_ref(l, w.data(), w.data(), &table[sz(r) * l.stride]);
          records.push_back(&table[sz(r) * l.stride]);
        }
        const std::vector<float> x = normal_values(sz(n), 1.0, &rng);
        for (ExpertDot dot : {ExpertDot::kFloat, ExpertDot::kInt8}) {
          for (int64_t count = 0; count <= kRows; ++count) {
            std::vector<float> got(sz(kRows), -1.0f);
            record_down_dots(l, records.data(), count, x.data(), got.data(), dot);
            for (int64_t r = 0; r < kRows; ++r) {
              const float want = r >= count ? -1.0f
                                 : dot == ExpertDot::kFloat
                                     ? record_down_dot(l, records[sz(r)], x.data())
                                     : record_down_dot_int8(l, records[sz(r)], x.data());
              ASSERT_EQ(std::memcmp(&got[sz(r)], &want, sizeof(float)), 0)
                  << dtype_name(t) << " n " << n << " count " << count << " row " << r << " on "
                  << cpu_path_name(p) << ": " << got[sz(r)] << " vs " << want;
            }
          }
        }
      }
    }
  }
  set_cpu_path(CpuPath::kAuto);
}

// The up-row axpy is element-wise (y[i] = fma(code_i, alpha * scale_g, y[i])), so every SIMD
// path, whatever its vector width, gives the same bits (the scalar path rounds the product
// apart: within one rounding of them), and none writes past n (partial last groups; y one
// float off alignment).
TEST(PeerPathsTest, CodedAxpyGivesTheSameBitsOnEveryPathAndWritesNothingPastN) {
  const std::vector<CpuPath> paths = supported_paths();
  constexpr float kSentinel = 12345.0f;
  std::mt19937 rng(23);
  const std::vector<int64_t> lengths = lengths_up_to(100, {2048, 2047});
  for (DType t : {DType::kI4, DType::kI8, DType::kBF16, DType::kF16, DType::kF32}) {
    for (int64_t n : lengths) {
      const RecordLayout l = layout_of(t, n, n);
      const std::vector<float> up = normal_values(sz(n), 1.0, &rng);
      std::vector<uint8_t> record(l.stride);
      pack_record_ref(l, up.data(), up.data(), record.data());
      // Nonzero padding codes, so that a kernel writing past n would change what it writes.
      if (dtype_is_quantized(t) && n % kQuantGroup != 0) {
        const int64_t g = n / kQuantGroup;
        uint8_t* codes = record.data() + l.up_codes_offset;
        for (int64_t j = n % kQuantGroup; j < kQuantGroup; ++j) {
          if (t == DType::kI8) {
            codes[sz(g * kQuantGroup + j)] = 0x55;
          } else {
            uint8_t& b = codes[sz(g * kQuantGroup / 2 + j % (kQuantGroup / 2))];
            b = j < kQuantGroup / 2 ? static_cast<uint8_t>((b & 0xf0) | 0x3)
                                    : static_cast<uint8_t>((b & 0x0f) | 0x30);
          }
        }
      }
      const std::vector<float> y0 = normal_values(sz(n) + 1 + kQuantGroup, 1.0, &rng);
      std::vector<float> first, scalar;
      for (CpuPath p : paths) {
        set_cpu_path(p);
        std::vector<float> y = y0;
        std::fill(y.begin() + 1 + n, y.end(), kSentinel);  // not NaN: fma(c, a, NaN) is NaN
        record_up_axpy(l, record.data(), 0.37f, y.data() + 1);
        EXPECT_EQ(y[0], y0[0]) << dtype_name(t) << " n " << n << " on " << cpu_path_name(p);
        for (size_t i = sz(1 + n); i < y.size(); ++i) {
          ASSERT_EQ(y[i], kSentinel)
              << dtype_name(t) << " n " << n << " wrote past n on " << cpu_path_name(p);
        }
        if (p == CpuPath::kScalar) {
          scalar = y;
        } else if (first.empty()) {
          first = y;
        } else {
          EXPECT_EQ(std::memcmp(y.data(), first.data(), sz(1 + n) * sizeof(float)), 0)
              << dtype_name(t) << " n " << n << " on " << cpu_path_name(p);
        }
      }
      set_cpu_path(CpuPath::kAuto);
      if (scalar.empty() || first.empty()) continue;
      for (int64_t i = 1; i <= n; ++i) {
        const double bound = 1e-6 * (std::abs(y0[sz(i)]) + std::abs(first[sz(i)])) + 1e-30;
        ASSERT_NEAR(scalar[sz(i)], first[sz(i)], bound) << dtype_name(t) << " n " << n;
      }
    }
  }
}

// Every path sums a token's up rows to the rule's bits, writes nothing past n, and lands within
// the rule's bound of the exact sum: row lengths with every partial last group and odd group
// counts (the avx512 int4 kernel takes two groups at once), odd and even slot counts, zero gated
// activations among them, coefficients spanning 2^-20..2^10.
TEST(PeerPathsTest, IntegerUpRowsFollowTheRuleBitForBitOnEveryPath) {
  constexpr float kSentinel = 12345.0f;
  std::mt19937 rng(29);
  std::uniform_real_distribution<float> exponent(-20.0f, 10.0f);
  int checked = 0;
  for (DType t : {DType::kI4, DType::kI8}) {
    for (int64_t n : lengths_up_to(70, {96, 127, 1000, 2048})) {
      for (int count : {1, 2, 3, 8, 32, 33}) {
        const RecordLayout l = layout_of(t, 4, n);
        std::vector<std::vector<uint8_t>> store(sz(count), std::vector<uint8_t>(l.stride));
        std::vector<const uint8_t*> records;
        std::vector<float> ga(sz(count));
        const std::vector<float> down(4, 0.5f);
        for (int r = 0; r < count; ++r) {
          const std::vector<float> up = normal_values(sz(n), 1.0, &rng);
          pack_record_ref(l, down.data(), up.data(), store[sz(r)].data());
          records.push_back(store[sz(r)].data());
          ga[sz(r)] = r % 5 == 3 ? 0.0f : normal_values(1, 1.0, &rng)[0] * std::exp2(exponent(rng));
        }
        const UpRule want = int_up_rule(l, records, ga);
        // The exact sum, in double on the dequantized rows.
        std::vector<double> exact(sz(n), 0.0);
        std::vector<float> down_f(4), up_f(sz(n));
        for (int r = 0; r < count; ++r) {
          unpack_record_ref(l, records[sz(r)], down_f.data(), up_f.data());
          for (int64_t i = 0; i < n; ++i)
            exact[sz(i)] += static_cast<double>(ga[sz(r)]) * up_f[sz(i)];
        }
        const std::string what = std::string(dtype_name(t)) + " n " + std::to_string(n) +
                                 " slots " + std::to_string(count);
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_NEAR(want.y[sz(i)], exact[sz(i)],
                      want.bound[sz(i)] * 1.001 + 1e-6 * std::fabs(exact[sz(i)]) + 1e-37)
              << what << " element " << i;
        }
        for (CpuPath p : supported_paths()) {
          set_cpu_path(p);
          std::vector<float> y(sz(n) + 1 + kQuantGroup, kSentinel);
          ASSERT_TRUE(record_up_int(l, records.data(), ga.data(), count, y.data() + 1)) << what;
          EXPECT_EQ(y[0], kSentinel) << what;
          for (size_t i = sz(1 + n); i < y.size(); ++i) {
            ASSERT_EQ(y[i], kSentinel) << what << " wrote past n on " << cpu_path_name(p);
          }
          EXPECT_EQ(std::memcmp(y.data() + 1, want.y.data(), sz(n) * sizeof(float)), 0)
              << what << " on " << cpu_path_name(p);
          ++checked;
        }
        set_cpu_path(CpuPath::kAuto);
      }
    }
  }
  EXPECT_GT(checked, 500);
}

// The rule's edges on every path: a group too small to scale (inv overflows) sums to zero, all
// gated activations zero give a zero row, and a non-finite coefficient (ga inf or NaN, or
// ga * w overflowing), more than 512 nonzero slots, or float records leave y alone and answer
// false (the caller takes the float axpys).
TEST(PeerPathsTest, IntegerUpRowsTakeTheRulesEdgeCases) {
  std::mt19937 rng(31);
  for (CpuPath p : supported_paths()) {
    set_cpu_path(p);
    for (DType t : {DType::kI4, DType::kI8}) {
      const std::string what = std::string(dtype_name(t)) + " on " + cpu_path_name(p);
      const int64_t n = 45;
      const RecordLayout l = layout_of(t, 4, n);
      std::vector<std::vector<uint8_t>> store(3, std::vector<uint8_t>(l.stride));
      std::vector<const uint8_t*> records;
      const std::vector<float> down(4, 0.5f);
      for (auto& r : store) {
        const std::vector<float> up = normal_values(sz(n), 1.0, &rng);
        pack_record_ref(l, down.data(), up.data(), r.data());
        records.push_back(r.data());
      }
      std::vector<float> y(sz(n), -1.0f);
      const std::vector<float> tiny = {1e-36f, -2e-37f, 0.0f};
      ASSERT_TRUE(record_up_int(l, records.data(), tiny.data(), 3, y.data())) << what;
      EXPECT_EQ(y, int_up_rule(l, records, tiny).y) << what;
      EXPECT_EQ(y, std::vector<float>(sz(n), 0.0f)) << what << ": tiny coefficients";
      std::fill(y.begin(), y.end(), -1.0f);
      const std::vector<float> zeros(3, 0.0f);
      ASSERT_TRUE(record_up_int(l, records.data(), zeros.data(), 3, y.data())) << what;
      EXPECT_EQ(y, std::vector<float>(sz(n), 0.0f)) << what << ": zero gated activations";
      for (float bad : {std::numeric_limits<float>::infinity(), std::nanf(""), 1e34f}) {
        // 1e34 times the largest fp16 scale (65504, in record 1's last group) overflows.
        std::vector<uint8_t> big = store[1];
        const uint16_t largest = 0x7bff;
        std::memcpy(big.data() + l.up_scales_offset + 2 * (quant_groups(n) - 1), &largest, 2);
        const std::vector<const uint8_t*> rows = {records[0], big.data(), records[2]};
        std::fill(y.begin(), y.end(), -1.0f);
        const std::vector<float> ga = {0.5f, bad, 1.0f};
        EXPECT_FALSE(record_up_int(l, rows.data(), ga.data(), 3, y.data())) << what << " " << bad;
        EXPECT_EQ(y, std::vector<float>(sz(n), -1.0f)) << what << " " << bad;
      }
      std::vector<const uint8_t*> many(513, records[0]);
      std::vector<float> ga(513, 0.25f);
      EXPECT_FALSE(record_up_int(l, many.data(), ga.data(), 513, y.data())) << what;
      ga[7] = 0.0f;  // 512 nonzero: taken
      EXPECT_TRUE(record_up_int(l, many.data(), ga.data(), 513, y.data())) << what;
      EXPECT_EQ(y, int_up_rule(l, many, ga).y) << what << ": 512 slots";
    }
    const RecordLayout f = layout_of(DType::kBF16, 4, 45);
    std::vector<uint8_t> record(f.stride, 0);
    const uint8_t* r = record.data();
    const float one = 1.0f;
    std::vector<float> y(45, -1.0f);
    EXPECT_FALSE(record_up_int(f, &r, &one, 1, y.data())) << "bf16 records";
  }
  set_cpu_path(CpuPath::kAuto);
}

// Sub-scores with many exact ties (small integers): every path's top-k' picks the same indices.
// Integer q and keys make every score exact in any summation order, so the oracle's ids are the
// answer bit for bit. n below, at and across multiples of 16 (the avx512 top-k' bound takes
// per-lane maxima of whole 16-score vectors), k' from 1 to past 16 (where it scans instead), and
// both heavy ties (values in -1..1) and few (-50..50).
TEST(PeerPathsTest, TiedScoresSelectTheSameIndicesOnEveryPath) {
  const std::vector<CpuPath> paths = supported_paths();
  if (paths.size() < 2) GTEST_SKIP() << "this CPU runs the scalar path only";
  struct Case {
    int64_t n, k, kp, range;
  };
  const Case cases[] = {{53, 9, 7, 1},  {53, 9, 7, 50},  {16, 4, 16, 1},   {15, 3, 2, 50},
                        {17, 1, 1, 50}, {32, 8, 8, 1},   {100, 8, 16, 50}, {100, 8, 17, 1},
                        {512, 8, 8, 1}, {512, 8, 8, 50}, {47, 4, 3, 50},   {64, 16, 5, 1}};
  for (const Case& k : cases) {
    PeerConfig c = make_config(10, 10, 2, k.n, 3, k.k, k.kp);
    ASSERT_TRUE(c.validate_and_fill().ok());
    constexpr int64_t kTokens = 70;
    std::mt19937 rng(static_cast<uint32_t>(43 + k.n + k.range));
    std::uniform_int_distribution<int> small(-static_cast<int>(k.range), static_cast<int>(k.range));
    std::vector<float> q(sz(kTokens * c.query_rows())), keys(sz(c.key_heads() * 2 * k.n * 3));
    for (float& v : q) v = static_cast<float>(small(rng));
    for (float& v : keys) v = static_cast<float>(small(rng));
    PeerRouterParams p;
    p.keys = keys.data();
    PeerRouting want;
    peer_route_ref(c, p, q.data(), kTokens, &want);
    for (CpuPath path : paths) {
      set_cpu_path(path);
      PeerRouting got;
      peer_route(c, p, q.data(), kTokens, &got, kThreads);
      EXPECT_EQ(got.ids, want.ids)
          << cpu_path_name(path) << " n " << k.n << " k' " << k.kp << " range " << k.range;
    }
  }
  set_cpu_path(CpuPath::kAuto);
}

// A token whose q is NaN (an input row with a NaN or an infinity): its sub-scores are NaN in
// fp32 and in int8 routing (a NaN row scale), and every path must still give it the scalar
// path's experts, in any batch, never indices left from another token.
TEST(PeerPathsTest, ANanQueryRowRoutesAlikeOnEveryPathAndInAnyBatch) {
  PeerConfig c = make_config(10, 10, 2, 40, 8, 4, 4);
  ASSERT_TRUE(c.validate_and_fill().ok());
  constexpr int64_t kTokens = 3;
  std::mt19937 rng(47);
  std::vector<float> q = normal_values(sz(kTokens * c.query_rows()), 1.0, &rng);
  const std::vector<float> keys = normal_values(sz(c.key_heads() * 2 * 40 * 8), 1.0, &rng);
  for (int64_t r = 0; r < c.query_rows(); ++r) {
    q[sz(c.query_rows() + r)] = std::numeric_limits<float>::quiet_NaN();
  }
  PeerRouterParams p;
  p.keys = keys.data();
  for (RoutingPrecision precision : {RoutingPrecision::kF32, RoutingPrecision::kInt8}) {
    set_cpu_path(CpuPath::kScalar);
    PeerRouting want;
    peer_route(c, p, q.data(), kTokens, &want, 1, precision);
    const size_t per_token = sz(c.heads * c.topk);
    const std::vector<int64_t> want_nan(want.ids.begin() + per_token,
                                        want.ids.begin() + 2 * per_token);
    for (int64_t id : want_nan) {
      ASSERT_GE(id, 0);
      ASSERT_LT(id, c.num_experts());
    }
    for (CpuPath path : supported_paths()) {
      set_cpu_path(path);
      const std::string what =
          std::string(cpu_path_name(path)) + " " + routing_precision_name(precision) + " routing";
      PeerRouting batch, alone;
      peer_route(c, p, q.data(), kTokens, &batch, kThreads, precision);
      EXPECT_EQ(batch.ids, want.ids) << what;
      peer_route(c, p, q.data() + c.query_rows(), 1, &alone, 1, precision);
      EXPECT_EQ(alone.ids, want_nan) << what << ", the token alone";
    }
  }
  set_cpu_path(CpuPath::kAuto);
}

INSTANTIATE_TEST_SUITE_P(CpuPaths, PeerParityTest,
                         ::testing::Values(CpuPath::kScalar, CpuPath::kAvx2, CpuPath::kAvxVnni,
                                           CpuPath::kAvx512),
                         [](const ::testing::TestParamInfo<CpuPath>& param_info) {
                           return std::string(cpu_path_name(param_info.param));
                         });

}  // namespace
}  // namespace trove
