// The CUDA PEER backward (kernels/cuda/peer_cuda_backward.h) against the oracle
// (kernels/cpu/ref/peer_ref.h's peer_backward_ref) at the shapes of tests/peer_parity_test.cc:
// every activation, gate and record dtype, shared and per-head keys, bias and rms norm, N = 1,
// k = N, 1000 tokens, D = 2048, an empty batch and all tokens routed to the same experts.
// The routing fed to both is the oracle's forward routing. Tests that need a GPU skip with a
// message when none is present; the argument checks and the no-device error run everywhere.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/ref/peer_ref.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/peer_cuda_backward.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "tests/peer_test_util.h"

namespace trove {
namespace {

using testing::describe;
using ::testing::HasSubstr;
using testing::kAllDTypes;
using testing::kAllGates;
using testing::layout_of;
using testing::make_config;
using testing::PeerShape;

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

// tests/peer_test_util.h's layer (every stage O(1)) and the oracle's routing of its batch.
struct Layer : testing::PeerLayer {
  PeerRouting routing;

  Layer() = default;
  explicit Layer(testing::PeerLayer layer) : PeerLayer(std::move(layer)) { route(); }

  std::vector<const uint8_t*> slot_records() const { return PeerLayer::slot_records(routing); }
  // The oracle's forward up to the routing (xhat -> q -> top-k -> gates).
  void route() {
    std::vector<float> xhat(sz(tokens * config.dim)), q(sz(tokens * config.query_rows()));
    peer_norm_ref(config, router().norm_weight, x.data(), tokens, xhat.data());
    peer_query_ref(config, router(), xhat.data(), tokens, q.data());
    peer_route_ref(config, router(), q.data(), tokens, &routing);
  }
};

Layer routed_layer(const PeerShape& shape, uint32_t seed) {
  return Layer(testing::random_layer(shape, seed));
}

// |got - want| <= kGradAbs · max|want| + kGradRel · |want| for every element.
void expect_close(const std::vector<float>& got, const std::vector<float>& want,
                  const std::string& what) {
  testing::expect_close(got, want, kGradAbs, kGradRel, what);
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

void check_parity(const PeerShape& shape, uint32_t seed) {
  SCOPED_TRACE(describe(shape));
  check_backward(routed_layer(shape, seed));
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

// tests/peer_parity_test.cc's sweep (tests/peer_test_util.h), with its trims for n = 128.
TEST_F(CudaPeerBackwardTest, MatchesTheOracleAcrossShapesActivationsGatesAndDTypes) {
  const int64_t token_counts[] = {1, 7, 40, 7, 128};
  const int64_t dims[][2] = {{37, 37}, {100, 45}, {200, 200}, {45, 100}};
  testing::for_each_sweep_shape(token_counts, dims, [](PeerShape shape, uint32_t seed) {
    if (shape.config.n_keys == 128) {
      shape.config.dim = std::min<int64_t>(shape.config.dim, 45);
      shape.tokens = std::min<int64_t>(shape.tokens, 40);
    }
    check_parity(shape, seed);
  });
}

TEST_F(CudaPeerBackwardTest, ManyTokensAndTheBackgroundWidthMatchTheOracle) {
  check_parity({1000, testing::many_tokens_config(), DType::kI4}, 11);

  for (DType t : kAllDTypes) check_parity({5, testing::background_width_config(), t}, 12);
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
    const PeerShape shape{300, c, DType::kI4};
    SCOPED_TRACE(describe(shape));
    Layer l = routed_layer(shape, 31);
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
  const Layer l = routed_layer({0, c, DType::kI8}, 61);
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
    layer = routed_layer({6, c, DType::kI4}, 77);
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
  const Layer l = routed_layer({0, c, DType::kBF16}, 5);
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
