// The CUDA PEER backward (kernels/cuda/peer_cuda_backward.h) against the oracle
// (kernels/cpu/ref/peer_ref.h's peer_backward_ref) at the shapes of tests/peer_parity_test.cc:
// every activation, gate and record dtype, shared and per-head keys, bias and rms norm, N = 1,
// k = N, 1000 tokens, D = 2048, an empty batch and all tokens routed to the same experts.
// The routing fed to both is the oracle's forward routing. Tests that need a GPU skip with a
// message when none is present; the argument checks and the no-device error run everywhere.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "base/check.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/peer_ref.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/peer_cuda_backward.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "tests/peer_test_util.h"

namespace trove {
namespace {

using ::testing::HasSubstr;
using testing::layout_of;
using testing::normal_values;

// ---- tolerances --------------------------------------------------------------------------------
// The oracle accumulates in double and rounds once. The CUDA path accumulates in fp32 in other
// orders - warp trees for the record dot products (32 lane partials of D/32 terms each), slot
// order per column for dxhat and the expert rows (as the CPU path), cuBLAS's blocking for the
// three GEMMs (pedantic fp32: no TF32) - and in double for the norm, the gate and the column
// sums. Both read the same codes and scales, so the difference is fp32 rounding in sums, about
// eps32 · sqrt(terms) · sum|term|: the same model, and the same tolerances, as the optimized
// CPU path in tests/peer_parity_test.cc (abs relative to the array's largest magnitude, plus a
// small per-element relative term). With D <= 2048 and up to 1000 tokens, eps32 · sqrt(2048)
// ~ 5e-6.
constexpr double kGradAbs = 3e-5;
constexpr double kGradRel = 1e-5;

constexpr DType kAllDTypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kI8, DType::kI4};
constexpr Activation kAllActivations[] = {Activation::kRelu, Activation::kGelu,
                                          Activation::kGeluTanh, Activation::kSilu};
constexpr Gate kAllGates[] = {Gate::kSoftmax, Gate::kRelu, Gate::kSigmoid};

size_t sz(int64_t v) {
  return static_cast<size_t>(v);
}

std::vector<float> uniform_values(size_t n, double stddev, std::mt19937* rng) {
  const double half_width = std::sqrt(3.0) * stddev;
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(((*rng)() * 0x1p-32 * 2.0 - 1.0) * half_width);
  return v;
}

struct Shape {
  int64_t tokens;
  PeerConfig config;
  DType dtype;
};

std::string describe(const Shape& s) {
  const PeerConfig& c = s.config;
  std::ostringstream o;
  o << "T=" << s.tokens << " D=" << c.dim << " Dout=" << c.dim_out << " h=" << c.heads
    << " n=" << c.n_keys << " dk=" << c.dim_key << " k=" << c.topk << " k'=" << c.topk_per_half
    << (c.shared_keys ? " shared" : "") << " " << activation_name(c.activation) << " "
    << gate_name(c.gate) << " " << dtype_name(s.dtype) << (c.query_bias ? " bias" : "")
    << (c.input_norm == InputNorm::kRms ? " rms" : "");
  return o.str();
}

// A layer's fp32 parameters, its packed expert table, a batch, and the oracle's routing.
struct Layer {
  PeerConfig config;
  RecordLayout layout;
  int64_t tokens = 0;
  std::vector<float> query_weight, query_bias, keys, norm_weight;
  std::vector<uint8_t> table;
  std::vector<float> x, dy;
  PeerRouting routing;

  PeerRouterParams router() const {
    PeerRouterParams p;
    p.query_weight = query_weight.data();
    p.query_bias = config.query_bias ? query_bias.data() : nullptr;
    p.keys = keys.data();
    p.norm_weight = config.input_norm == InputNorm::kRms ? norm_weight.data() : nullptr;
    return p;
  }
  std::vector<const uint8_t*> slot_records() const {
    std::vector<const uint8_t*> records(routing.slots());
    for (size_t s = 0; s < records.size(); ++s) {
      records[s] = table.data() + sz(routing.ids[s]) * layout.stride;
    }
    return records;
  }
  // The oracle's forward up to the routing (xhat -> q -> top-k -> gates).
  void route() {
    std::vector<float> xhat(sz(tokens * config.dim)), q(sz(tokens * config.query_rows()));
    peer_norm_ref(config, router().norm_weight, x.data(), tokens, xhat.data());
    peer_query_ref(config, router(), xhat.data(), tokens, q.data());
    peer_route_ref(config, router(), q.data(), tokens, &routing);
  }
};

// As tests/peer_parity_test.cc: every stage O(1).
Layer random_layer(const Shape& shape, uint32_t seed) {
  Layer l;
  l.config = shape.config;
  const Status st = l.config.validate_and_fill();
  TROVE_CHECK_MSG(st.ok(), "%s", st.to_string().c_str());
  const PeerConfig& c = l.config;
  l.layout = layout_of(shape.dtype, c.dim, c.dim_out);
  l.tokens = shape.tokens;
  std::mt19937 rng(seed);
  const double row_scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  const size_t experts = sz(c.num_experts());
  l.query_weight = normal_values(sz(c.query_rows() * c.dim), row_scale, &rng);
  l.query_bias = normal_values(sz(c.query_rows()), 0.5, &rng);
  l.keys = normal_values(sz(c.key_heads() * 2 * c.n_keys * c.dim_key), 1.0, &rng);
  l.norm_weight = normal_values(sz(c.dim), 0.3, &rng);
  for (float& g : l.norm_weight) g += 1.0f;
  const std::vector<float> down = uniform_values(experts * sz(c.dim), row_scale, &rng);
  const std::vector<float> up = uniform_values(experts * sz(c.dim_out), 1.0, &rng);
  l.table.assign(experts * l.layout.stride, 0);
  pack_records(l.layout, down.data(), up.data(), c.num_experts(), l.table.data());
  l.x = normal_values(sz(shape.tokens * c.dim), 1.0, &rng);
  l.dy = normal_values(sz(shape.tokens * c.dim_out), 1.0, &rng);
  l.route();
  return l;
}

// |got - want| <= abs_tol · max|want| + rel_tol · |want| for every element; reports the worst.
void expect_close(const std::vector<float>& got, const std::vector<float>& want,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (float w : want) scale = std::max(scale, std::abs(static_cast<double>(w)));
  size_t bad = 0, worst = 0;
  double worst_excess = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    const double tol = kGradAbs * scale + kGradRel * std::abs(static_cast<double>(want[i]));
    if (!(err <= tol)) {
      if (bad == 0 || err - tol > worst_excess) {
        worst = i;
        worst_excess = err - tol;
      }
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << want.size()
                     << " elements out of tolerance; worst at " << worst << ": got "
                     << (bad ? got[worst] : 0.0f) << " want " << (bad ? want[worst] : 0.0f)
                     << " (array max " << scale << ")";
}

void expect_grads_close(const PeerGrads& got, const PeerGrads& want) {
  EXPECT_EQ(got.expert_ids, want.expert_ids);
  expect_close(got.dx, want.dx, "dx");
  expect_close(got.d_query_weight, want.d_query_weight, "dW_q");
  expect_close(got.d_query_bias, want.d_query_bias, "db_q");
  expect_close(got.d_keys, want.d_keys, "dK");
  expect_close(got.d_norm_weight, want.d_norm_weight, "dgamma");
  expect_close(got.d_down, want.d_down, "d_down");
  expect_close(got.d_up, want.d_up, "d_up");
}

void check_backward(const Layer& l) {
  const std::vector<const uint8_t*> records = l.slot_records();
  PeerGrads want, got;
  peer_backward_ref(l.config, l.router(), l.layout, l.x.data(), l.tokens, l.routing, records.data(),
                    l.dy.data(), &want);
  const Status s = cuda_peer_backward(l.config, l.router(), l.layout, l.x.data(), l.tokens,
                                      l.routing, records.data(), l.dy.data(), &got);
  ASSERT_TRUE(s.ok()) << s.to_string();
  expect_grads_close(got, want);
}

void check_parity(const Shape& shape, uint32_t seed) {
  SCOPED_TRACE(describe(shape));
  check_backward(random_layer(shape, seed));
}

PeerConfig make_config(int64_t dim, int64_t dim_out, int64_t heads, int64_t n, int64_t dk,
                       int64_t k, int64_t kp) {
  PeerConfig c;
  c.dim = dim;
  c.dim_out = dim_out;
  c.heads = heads;
  c.n_keys = n;
  c.dim_key = dk;
  c.topk = k;
  c.topk_per_half = kp;
  return c;
}

class CudaPeerBackwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0 (no driver or no GPU); the "
                      "CUDA backward is compiled but not run";
    }
  }
};

// tests/peer_parity_test.cc's sweep: activations x gates x dtypes, each once, the other
// settings cycled so every token count, D, n, h, key sharing, bias and norm meets many.
TEST_F(CudaPeerBackwardTest, MatchesTheOracleAcrossShapesActivationsGatesAndDTypes) {
  struct Router {
    int64_t n, k, kp, dk;
  };
  // n = 1: N = 1, k = 1; n = 3: k = n^2 = N; k' < k throughout where k > 1.
  const Router routers[] = {
      {1, 1, 1, 5}, {3, 9, 3, 6}, {3, 4, 2, 4}, {11, 6, 3, 7}, {128, 8, 4, 12}};
  const int64_t token_counts[] = {1, 7, 40, 7, 128};
  const int64_t dims[][2] = {{37, 37}, {100, 45}, {200, 200}, {45, 100}};
  int i = 0;
  for (Activation a : kAllActivations) {
    for (Gate g : kAllGates) {
      for (DType t : kAllDTypes) {
        const Router& r = routers[(i + i / 5) % 5];
        const int64_t* d = dims[(i / 5) % 4];
        PeerConfig c = make_config(d[0], d[1], (i / 2) % 2 == 0 ? 4 : 1, r.n, r.dk, r.k, r.kp);
        c.activation = a;
        c.gate = g;
        c.shared_keys = (i / 3) % 2 == 1;
        c.query_bias = i % 2 == 0;
        c.input_norm = (i / 7) % 2 == 0 ? InputNorm::kRms : InputNorm::kNone;
        int64_t tokens = token_counts[(i / 4) % 5];
        if (r.n == 128) {
          c.dim = std::min<int64_t>(c.dim, 45);
          tokens = std::min<int64_t>(tokens, 40);
        }
        check_parity({tokens, c, t}, 100 + static_cast<uint32_t>(i));
        ++i;
      }
    }
  }
}

TEST_F(CudaPeerBackwardTest, ManyTokensAndTheBackgroundWidthMatchTheOracle) {
  PeerConfig many = make_config(24, 40, 4, 9, 8, 5, 3);
  many.input_norm = InputNorm::kRms;
  many.activation = Activation::kSilu;
  many.gate = Gate::kRelu;
  check_parity({1000, many, DType::kI4}, 11);

  PeerConfig wide = make_config(2048, 2048, 4, 6, 16, 8, 4);
  wide.activation = Activation::kSilu;
  wide.gate = Gate::kSoftmax;
  wide.query_bias = true;
  for (DType t : kAllDTypes) check_parity({5, wide, t}, 12);
}

// More than 256 slots per token and per expert: the kernels' shared-memory chunks of slots.
TEST_F(CudaPeerBackwardTest, ManySlotsPerTokenAndPerExpertMatchTheOracle) {
  PeerConfig c = make_config(70, 33, 9, 12, 6, 40, 12);  // 360 slots per token
  c.gate = Gate::kSoftmax;
  c.activation = Activation::kGelu;
  c.input_norm = InputNorm::kRms;
  check_parity({20, c, DType::kI8}, 13);
}

TEST_F(CudaPeerBackwardTest, OneExpertOneTokenMatchesTheOracle) {
  PeerConfig c = make_config(33, 31, 1, 1, 3, 1, 1);
  for (Gate g : kAllGates) {
    c.gate = g;
    check_parity({1, c, DType::kI8}, 21);
  }
}

// Equal keys: every token picks the same experts, so each expert's run holds every token
// (600 slots for the lowest id): the hot-row case, summed by one block without atomics.
TEST_F(CudaPeerBackwardTest, AllTokensRoutedToTheSameExpertsMatchTheOracle) {
  for (const int64_t k : {int64_t{1}, int64_t{5}}) {
    PeerConfig c = make_config(50, 70, 2, 7, 5, k, 3);
    c.shared_keys = true;
    c.input_norm = InputNorm::kRms;
    c.activation = Activation::kGelu;
    c.gate = Gate::kSigmoid;  // not softmax: see tests/peer_parity_test.cc
    const Shape shape{300, c, DType::kI4};
    SCOPED_TRACE(describe(shape));
    Layer l = random_layer(shape, 31);
    for (size_t j = 0; j < l.keys.size(); ++j) l.keys[j] = 0.25f * static_cast<float>(j % 5);
    l.route();
    const std::vector<int64_t> lowest = {0, 1, 2, 7, 8, 9, 14, 15, 16};
    for (int64_t s = 0; s < k; ++s) ASSERT_EQ(l.routing.ids[sz(s)], lowest[sz(s)]);
    check_backward(l);
  }
}

TEST_F(CudaPeerBackwardTest, EmptyBatchGivesTheOracleResult) {
  PeerConfig c = make_config(20, 30, 2, 4, 3, 3, 2);
  c.input_norm = InputNorm::kRms;
  c.query_bias = true;
  const Layer l = random_layer({0, c, DType::kI8}, 61);
  PeerGrads want, got;
  peer_backward_ref(l.config, l.router(), l.layout, l.x.data(), 0, l.routing, nullptr, l.dy.data(),
                    &want);
  ASSERT_TRUE(cuda_peer_backward(l.config, l.router(), l.layout, l.x.data(), 0, l.routing, nullptr,
                                 l.dy.data(), &got)
                  .ok());
  EXPECT_TRUE(got.dx.empty());
  EXPECT_TRUE(got.expert_ids.empty());
  EXPECT_EQ(got.d_query_weight, want.d_query_weight);
  EXPECT_EQ(got.d_query_bias, want.d_query_bias);
  EXPECT_EQ(got.d_keys, want.d_keys);
  EXPECT_EQ(got.d_norm_weight, want.d_norm_weight);
}

// ---- everywhere: argument checks and the no-device path ---------------------------------------

// A small valid call whose pieces the tests below break one at a time.
struct SmallCall {
  Layer layer;
  std::vector<const uint8_t*> records;
  PeerGrads grads;

  SmallCall() {
    PeerConfig c = make_config(20, 30, 2, 4, 3, 3, 2);
    c.input_norm = InputNorm::kRms;
    c.query_bias = true;
    layer = random_layer({6, c, DType::kI4}, 77);
    records = layer.slot_records();
  }
  Status run(const PeerConfig& config, const PeerRouterParams& params, const RecordLayout& layout,
             int64_t T, const PeerRouting& routing) {
    return cuda_peer_backward(config, params, layout, layer.x.data(), T, routing, records.data(),
                              layer.dy.data(), &grads);
  }
  Status run() {
    return run(layer.config, layer.router(), layer.layout, layer.tokens, layer.routing);
  }
};

void expect_invalid(const Status& s, const char* mentions) {
  EXPECT_TRUE(s.is_invalid_argument()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr(mentions));
}

TEST(CudaPeerBackwardArgs, BadInputIsAnErrorNamingTheField) {
  SmallCall call;
  const Layer& l = call.layer;

  PeerConfig wide = l.config;
  wide.expert_width = 2;
  const Status width = call.run(wide, l.router(), l.layout, l.tokens, l.routing);
  EXPECT_EQ(width.code(), Status::Code::kNotSupported) << width.to_string();  // the config's word
  EXPECT_THAT(width.message(), HasSubstr("expert_width"));
  PeerConfig raw = l.config;
  raw.dim_out = 0;
  expect_invalid(call.run(raw, l.router(), l.layout, l.tokens, l.routing), "validated first");
  PeerConfig broken = l.config;
  broken.topk = 100;  // > k'^2
  EXPECT_FALSE(call.run(broken, l.router(), l.layout, l.tokens, l.routing).ok());

  expect_invalid(call.run(l.config, l.router(), layout_of(DType::kI4, 21, 30), l.tokens, l.routing),
                 "does not match the config");
  expect_invalid(call.run(l.config, l.router(), l.layout, l.tokens + 1, l.routing), "routing is");
  expect_invalid(call.run(l.config, l.router(), l.layout, -1, l.routing), "T must be >= 0");

  PeerRouting bad_id = l.routing;
  bad_id.ids[3] = l.config.num_experts();
  expect_invalid(call.run(l.config, l.router(), l.layout, l.tokens, bad_id), "routing.ids[3]");
  PeerRouting short_gates = l.routing;
  short_gates.gates.pop_back();
  expect_invalid(call.run(l.config, l.router(), l.layout, l.tokens, short_gates), "gates");

  PeerRouterParams no_norm = l.router();
  no_norm.norm_weight = nullptr;
  expect_invalid(call.run(l.config, no_norm, l.layout, l.tokens, l.routing), "norm_weight");
  PeerRouterParams no_bias = l.router();
  no_bias.query_bias = nullptr;
  expect_invalid(call.run(l.config, no_bias, l.layout, l.tokens, l.routing), "query_bias");
  PeerRouterParams no_keys = l.router();
  no_keys.keys = nullptr;
  expect_invalid(call.run(l.config, no_keys, l.layout, l.tokens, l.routing), "params.keys");

  call.records[4] = nullptr;
  expect_invalid(call.run(), "records[4]");
  EXPECT_TRUE(cuda_peer_backward(l.config, l.router(), l.layout, l.x.data(), l.tokens, l.routing,
                                 call.records.data(), l.dy.data(), nullptr)
                  .is_invalid_argument());
}

TEST(CudaPeerBackwardArgs, EmptyBatchNeedsNoDeviceAndANonEmptyOneDoes) {
  PeerConfig c = make_config(20, 30, 2, 4, 3, 3, 2);
  c.input_norm = InputNorm::kRms;
  const Layer l = random_layer({0, c, DType::kBF16}, 5);
  PeerGrads got;
  const Status empty = cuda_peer_backward(l.config, l.router(), l.layout, nullptr, 0, l.routing,
                                          nullptr, nullptr, &got);
  ASSERT_TRUE(empty.ok()) << empty.to_string();
  EXPECT_EQ(got.d_keys.size(), sz(c.key_heads() * 2 * c.n_keys * c.dim_key));
  EXPECT_EQ(got.d_norm_weight.size(), sz(c.dim));
  EXPECT_TRUE(got.d_query_bias.empty());

  if (cuda_device_count() > 0) {
    GTEST_SKIP() << "a CUDA device is present; the no-device path is not reachable";
  }
  SmallCall call;
  const Status s = call.run();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Status::Code::kNotSupported) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr("no CUDA device is available"));
}

}  // namespace
}  // namespace trove
