// The CUDA PEER forward (kernels/cuda/peer_cuda.h) against the CPU oracles
// (kernels/cpu/ref/peer_ref.h), as tests/peer_parity_test.cc holds the optimized CPU path to
// them: every step on many shapes (T in {1, 7, 128, 1000}, D not a power of two, n in
// {1, 3, 11, 128} with k = n^2 and k' < k, shared and per-head keys), every activation, gate
// and record dtype, records whose sections sit at every alignment, routing compared
// faiss-compareIndices style (tie swaps only at the k-th position), exact ties, all tokens on
// the same experts, N = 1, an empty batch, the CUDA path's size limits, and the device form
// (device pointers, both ways of addressing records) bit for bit against the host form.
//
// Tests that need a GPU skip with a message when none is present; the argument checks and the
// no-device error run everywhere (through an empty context: every entry point checks its
// arguments before it looks at the device).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/ref/peer_ref.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/peer_cuda.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "tests/peer_test_util.h"

namespace trove {
namespace {

// ---- tolerances --------------------------------------------------------------------------------
// As in tests/peer_parity_test.cc: the oracle accumulates in double and rounds once; the GPU
// accumulates in fp32 in other orders (cuBLAS tiles for q and the sub-scores; lanes, a shuffle
// tree and per-group partials times the scale for the expert dot; slot order for y), so the
// difference is fp32 rounding of the sums, about eps32 * sqrt(terms) * sum|term| (~5e-6 at
// D = 2048), measured against each array's largest magnitude. xhat and the gates are computed
// in double on both sides and differ by an ulp at most. cuBLAS runs in CUBLAS_DEFAULT_MATH
// (full fp32; TF32 would be ~1e-3 and fail these on purpose).
constexpr double kForwardAbs = 1e-5;  // xhat, q, y
constexpr double kForwardRel = 1e-5;
constexpr testing::RoutingTolerance kRoutingTolerance = {/*score_abs=*/1e-5, /*score_rel=*/1e-5,
                                                         /*gate_abs=*/2e-5};

using testing::describe;
using testing::expect_bits_equal;
using testing::expect_close;
using testing::kAllDTypes;
using testing::kAllGates;
using testing::layout_of;
using testing::make_config;
using testing::normal_values;
using testing::PeerLayer;
using testing::PeerShape;
using testing::random_layer;
using testing::ref_forward;
using testing::RefForward;

void expect_routing_close(const PeerRouting& got, const PeerRouting& want,
                          const std::string& what) {
  testing::expect_routing_close(got, want, kRoutingTolerance, what);
}

// ---- device memory for the device-form tests -----------------------------------------------

// A device array of T, freed on destruction; copies in and out synchronously.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t count) : count_(count) {
    if (count_ > 0) {
      const cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&ptr_), count_ * sizeof(T));
      EXPECT_EQ(err, cudaSuccess) << cudaGetErrorString(err);
    }
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    if (count_ > 0) {
      const cudaError_t err =
          cudaMemcpy(ptr_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice);
      EXPECT_EQ(err, cudaSuccess) << cudaGetErrorString(err);
    }
  }
  ~DeviceArray() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return ptr_; }
  std::vector<T> to_host() const {
    std::vector<T> host(count_);
    if (count_ > 0) {
      const cudaError_t err =
          cudaMemcpy(host.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost);
      EXPECT_EQ(err, cudaSuccess) << cudaGetErrorString(err);
    }
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// ---- the steps on the GPU ----------------------------------------------------------------------

// The CUDA steps through the host form, each fed the oracle's input to that step.
struct CudaSteps {
  std::vector<float> xhat, q, y;
  PeerRouting routing;
};

CudaSteps cuda_steps(CudaPeerContext& ctx, const PeerLayer& l, const RefForward& ref) {
  const PeerConfig& c = l.config;
  const PeerRouterParams p = l.router();
  CudaSteps o;
  o.xhat.assign(sz(l.tokens * c.dim), -1.0f);
  o.q.assign(sz(l.tokens * c.query_rows()), -1.0f);
  o.y.assign(sz(l.tokens * c.dim_out), -1.0f);
  Status s = ctx.norm(c, p.norm_weight, l.x.data(), l.tokens, o.xhat.data());
  EXPECT_TRUE(s.ok()) << s.to_string();
  s = ctx.query(c, p, ref.xhat.data(), l.tokens, o.q.data());
  EXPECT_TRUE(s.ok()) << s.to_string();
  s = ctx.route(c, p, ref.q.data(), l.tokens, &o.routing);
  EXPECT_TRUE(s.ok()) << s.to_string();
  const std::vector<const uint8_t*> records = l.slot_records(ref.routing);
  s = ctx.experts(c, l.layout, ref.xhat.data(), ref.routing, records.data(), o.y.data());
  EXPECT_TRUE(s.ok()) << s.to_string();
  return o;
}

class CudaPeerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0 (no driver or no GPU); the "
                      "CUDA PEER kernels are compiled but not run";
    }
    Result<CudaPeerContext> ctx = CudaPeerContext::create();
    ASSERT_TRUE(ctx.ok()) << ctx.status().to_string();
    ctx_ = std::move(*ctx);
  }

  // Every step of one shape against the oracle.
  void check_parity(const PeerShape& shape, uint32_t seed) {
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, seed);
    const RefForward ref = ref_forward(l);
    const CudaSteps got = cuda_steps(ctx_, l, ref);
    expect_close(got.xhat, ref.xhat, kForwardAbs, kForwardRel, "xhat");
    expect_close(got.q, ref.q, kForwardAbs, kForwardRel, "q");
    expect_routing_close(got.routing, ref.routing, "routing");
    expect_close(got.y, ref.y, kForwardAbs, kForwardRel, "y");
  }

  CudaPeerContext ctx_;
};

// ---- every step against the oracle ---------------------------------------------------------

// The parity sweep (tests/peer_test_util.h), 16384 experts at no more than 128 tokens.
TEST_F(CudaPeerTest, EveryStepMatchesTheOracleAcrossShapesActivationsGatesAndDTypes) {
  const int64_t token_counts[] = {1, 7, 128, 1000, 7};
  const int64_t dims[][2] = {{96, 96}, {200, 45}, {37, 200}, {45, 100}};
  testing::for_each_sweep_shape(token_counts, dims, [&](PeerShape shape, uint32_t seed) {
    if (shape.config.n_keys == 128) shape.tokens = std::min<int64_t>(shape.tokens, 128);
    check_parity(shape, seed);
  });
}

TEST_F(CudaPeerTest, ManyTokensAndTheBackgroundWidthMatchTheOracle) {
  check_parity({1000, testing::many_tokens_config(), DType::kI4}, 11);

  // D = 2048 as in the background documents (h = 4, k = 8, silu), every dtype; D = 5000 stages
  // xhat in two chunks (4096 + 904 floats).
  for (DType t : kAllDTypes) check_parity({5, testing::background_width_config(), t}, 12);
  PeerConfig wider = make_config(5000, 300, 2, 4, 8, 3, 2);
  wider.input_norm = InputNorm::kRms;
  for (DType t : {DType::kI4, DType::kBF16, DType::kF32}) check_parity({3, wider, t}, 13);
}

// Every dtype with D and D_out from 1 to 200 in uneven steps: partial groups and vectors, and
// the record's sections at every offset mod 16 (quantized codes start at 2 * (G(D) + G(D_out))
// bytes, the f16/bf16 up row at 2D, the f32 up row at 4D), read by every load width.
TEST_F(CudaPeerTest, ExpertsMatchTheOracleForEveryRowLengthAndSectionAlignment) {
  const int64_t lengths[] = {1, 2, 3, 4, 5, 8, 31, 32, 33, 64, 65, 96, 127, 128, 200};
  uint32_t seed = 300;
  for (DType t : kAllDTypes) {
    for (int64_t d : lengths) {
      for (int64_t d_out : {int64_t{1}, int64_t{32}, int64_t{33}, d, 2 * d + 1}) {
        PeerConfig c = make_config(d, d_out, 2, 3, 4, 4, 2);
        c.activation = Activation::kGeluTanh;
        const PeerShape shape{3, c, t};
        SCOPED_TRACE(describe(shape));
        const PeerLayer l = random_layer(shape, ++seed);
        const RefForward ref = ref_forward(l);
        const std::vector<const uint8_t*> records = l.slot_records(ref.routing);
        std::vector<float> y(ref.y.size(), -1.0f);
        const Status s = ctx_.experts(l.config, l.layout, ref.xhat.data(), ref.routing,
                                      records.data(), y.data());
        ASSERT_TRUE(s.ok()) << s.to_string();
        expect_close(y, ref.y, kForwardAbs, kForwardRel, "y");
      }
    }
  }
}

// ---- nasty cases -------------------------------------------------------------------------------

TEST_F(CudaPeerTest, OneExpertOneTokenMatchesTheOracle) {
  PeerConfig c = make_config(33, 31, 1, 1, 3, 1, 1);
  for (Gate g : kAllGates) {
    c.gate = g;
    check_parity({1, c, DType::kI8}, 21);
  }
}

TEST_F(CudaPeerTest, EmptyBatchGivesEmptyResults) {
  PeerConfig c = make_config(20, 30, 2, 4, 3, 3, 2);
  c.input_norm = InputNorm::kRms;
  c.query_bias = true;
  const PeerLayer l = random_layer({0, c, DType::kI8}, 61);
  const PeerRouterParams p = l.router();
  EXPECT_TRUE(ctx_.norm(l.config, p.norm_weight, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(ctx_.query(l.config, p, nullptr, 0, nullptr).ok());
  PeerRouting routing;
  routing.resize(3, 3, 3);
  ASSERT_TRUE(ctx_.route(l.config, p, nullptr, 0, &routing).ok());
  EXPECT_EQ(routing.tokens, 0);
  EXPECT_EQ(routing.slots(), 0u);
  EXPECT_TRUE(ctx_.experts(l.config, l.layout, nullptr, routing, nullptr, nullptr).ok());
  EXPECT_TRUE(ctx_.synchronize().ok());
}

// Key rows of one element 1.0 make every sub-score of a half equal to that half's single query
// element, exactly: every token picks the k lowest ids of the k'^2 candidates (lower-id rule
// in both the per-half selection and the merge), for shared and per-head keys.
TEST_F(CudaPeerTest, AllTokensRoutedToTheSameExpertsFollowTheLowerIdRule) {
  for (const bool shared : {true, false}) {
    for (const int64_t k : {int64_t{1}, int64_t{5}}) {
      PeerConfig c = make_config(50, 70, 2, 7, 1, k, 3);
      c.shared_keys = shared;
      c.input_norm = InputNorm::kRms;
      c.activation = Activation::kGelu;
      c.gate = Gate::kSigmoid;
      const PeerShape shape{300, c, DType::kI4};
      SCOPED_TRACE(describe(shape));
      PeerLayer l = random_layer(shape, 31);
      std::fill(l.keys.begin(), l.keys.end(), 1.0f);
      const RefForward ref = ref_forward(l);
      const CudaSteps got = cuda_steps(ctx_, l, ref);
      // The lower-id rule among (i, j) in [0, 3)^2: i*7 + j ascending.
      const std::vector<int64_t> lowest = {0, 1, 2, 7, 8, 9, 14, 15, 16};
      for (int64_t row = 0; row < l.tokens * c.heads; ++row) {
        for (int64_t s = 0; s < k; ++s) {
          ASSERT_EQ(ref.routing.ids[sz(row * k + s)], lowest[sz(s)]) << "oracle, row " << row;
          ASSERT_EQ(got.routing.ids[sz(row * k + s)], lowest[sz(s)]) << "cuda, row " << row;
        }
      }
      expect_routing_close(got.routing, ref.routing, "routing");
      expect_close(got.y, ref.y, kForwardAbs, kForwardRel, "y");
    }
  }
}

// Integer queries and keys make every sub-score an exact small integer on both sides, whatever
// cuBLAS's summation order, with many exact ties between sub-keys and between candidate sums:
// ids and scores must then be identical, ties broken by lower index per half and lower expert
// id overall.
TEST_F(CudaPeerTest, ExactTiesAreBrokenByLowerIdIdenticallyToTheOracle) {
  for (const bool shared : {false, true}) {
    for (Gate gate : kAllGates) {
      PeerConfig c = make_config(10, 10, 3, 12, 4, 7, 5);
      c.shared_keys = shared;
      c.gate = gate;
      ASSERT_TRUE(c.validate_and_fill().ok());
      constexpr int64_t kTokens = 50;
      std::mt19937 rng(41);
      std::uniform_int_distribution<int> small(-2, 2);
      std::vector<float> q(sz(kTokens * c.query_rows()));
      std::vector<float> keys(sz(c.key_heads() * 2 * 12 * 4));
      for (float& v : q) v = static_cast<float>(small(rng));
      for (float& v : keys) v = static_cast<float>(small(rng));
      PeerRouterParams p;
      p.keys = keys.data();
      PeerRouting want, got;
      peer_route_ref(c, p, q.data(), kTokens, &want);
      ASSERT_TRUE(ctx_.route(c, p, q.data(), kTokens, &got).ok());
      EXPECT_EQ(got.ids, want.ids) << gate_name(gate) << (shared ? " shared" : "");
      EXPECT_EQ(got.scores, want.scores) << gate_name(gate) << (shared ? " shared" : "");
      expect_close(got.gates, want.gates, 1e-7, 1e-7, "gates");
    }
  }
}

// n = 65536: the largest expert id is 2^32 - 1, the edge of the 32-bit id in the routing keys;
// 2 * h * n sub-scores per token are 1/3 of route_device's scratch, so 5 tokens run in tiles of
// 3 and 2. k' = k = 1024 elsewhere fills the selection's shared-memory buffers.
TEST_F(CudaPeerTest, LargestKeySetsAndTopkMatchTheOracle) {
  {
    PeerConfig c = make_config(8, 8, 40, 65536, 1, 8, 4);
    ASSERT_TRUE(c.validate_and_fill().ok());
    std::mt19937 rng(71);
    std::vector<float> q = normal_values(sz(5 * c.query_rows()), 1.0, &rng);
    std::vector<float> keys = normal_values(sz(c.key_heads() * 2 * c.n_keys), 1.0, &rng);
    keys[sz(c.n_keys - 1)] = 50.0f;      // head 0, half 0: sub-key n-1 on top for q > 0 ...
    keys[sz(2 * c.n_keys - 1)] = 50.0f;  // ... and in half 1: expert (n-1)*n + n-1 = 2^32 - 1
    q[0] = q[1] = 1.0f;                  // token 0, head 0: both halves positive
    PeerRouterParams p;
    p.keys = keys.data();
    PeerRouting want, got;
    peer_route_ref(c, p, q.data(), 5, &want);
    ASSERT_EQ(want.ids[0], (int64_t{1} << 32) - 1);
    ASSERT_TRUE(ctx_.route(c, p, q.data(), 5, &got).ok());
    expect_routing_close(got, want, "n = 65536");
    EXPECT_EQ(got.ids[0], (int64_t{1} << 32) - 1);
  }
  {
    PeerConfig c = make_config(8, 8, 2, 2048, 6, 1024, 1024);
    c.shared_keys = true;
    c.gate = Gate::kSoftmax;
    ASSERT_TRUE(c.validate_and_fill().ok());
    std::mt19937 rng(72);
    std::vector<float> q = normal_values(sz(2 * c.query_rows()), 1.0, &rng);
    std::vector<float> keys = normal_values(sz(2 * c.n_keys * c.dim_key), 1.0, &rng);
    PeerRouterParams p;
    p.keys = keys.data();
    PeerRouting want, got;
    peer_route_ref(c, p, q.data(), 2, &want);
    ASSERT_TRUE(ctx_.route(c, p, q.data(), 2, &got).ok());
    expect_routing_close(got, want, "k' = k = 1024");
  }
}

// The host form gathers records from anywhere in host memory (any alignment, the same record
// for several slots) into one device slab.
TEST_F(CudaPeerTest, HostRecordsAtAnyAddressAreGatheredOnce) {
  PeerConfig c = make_config(45, 100, 4, 5, 6, 6, 3);
  for (DType t : {DType::kI4, DType::kF16}) {
    const PeerShape shape{40, c, t};
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 81);
    const RefForward ref = ref_forward(l);
    // Each expert copied to its own buffer at an odd offset.
    const int64_t experts = l.config.num_experts();
    std::vector<std::vector<uint8_t>> copies(sz(experts));
    for (int64_t e = 0; e < experts; ++e) {
      copies[sz(e)].assign(l.layout.record_bytes + 3, 0);
      std::memcpy(copies[sz(e)].data() + 3, l.table.data() + sz(e) * l.layout.stride,
                  l.layout.record_bytes);
    }
    std::vector<const uint8_t*> records(ref.routing.slots());
    for (size_t s = 0; s < records.size(); ++s) {
      records[s] = copies[sz(ref.routing.ids[s])].data() + 3;
    }
    std::vector<float> y(ref.y.size(), -1.0f);
    ASSERT_TRUE(
        ctx_.experts(l.config, l.layout, ref.xhat.data(), ref.routing, records.data(), y.data())
            .ok());
    expect_close(y, ref.y, kForwardAbs, kForwardRel, "y");
  }
}

// ---- the device form -----------------------------------------------------------------------

// norm -> query -> route -> experts on device pointers, the records found by pointer table and
// by table + routing id, equal bit for bit to the host form (the same kernels on the same
// inputs) and close to the oracle.
TEST_F(CudaPeerTest, DeviceFormEqualsHostFormBitForBit) {
  PeerConfig c = make_config(96, 80, 4, 11, 8, 6, 3);
  c.input_norm = InputNorm::kRms;
  c.query_bias = true;
  c.activation = Activation::kSilu;
  c.gate = Gate::kSoftmax;
  for (DType t : {DType::kI4, DType::kI8, DType::kBF16}) {
    const PeerShape shape{77, c, t};
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 91);
    const PeerConfig& lc = l.config;
    const RefForward ref = ref_forward(l);
    const int64_t T = l.tokens;
    const size_t slots = sz(T * lc.heads * lc.topk);

    // Host form, end to end on its own outputs.
    std::vector<float> xhat(sz(T * lc.dim)), q(sz(T * lc.query_rows())), y(sz(T * lc.dim_out));
    PeerRouting routing;
    const PeerRouterParams p = l.router();
    ASSERT_TRUE(ctx_.norm(lc, p.norm_weight, l.x.data(), T, xhat.data()).ok());
    ASSERT_TRUE(ctx_.query(lc, p, xhat.data(), T, q.data()).ok());
    ASSERT_TRUE(ctx_.route(lc, p, q.data(), T, &routing).ok());
    const std::vector<const uint8_t*> host_records = l.slot_records(routing);
    ASSERT_TRUE(
        ctx_.experts(lc, l.layout, xhat.data(), routing, host_records.data(), y.data()).ok());

    // Device form.
    const DeviceArray<float> d_x(l.x), d_w(l.query_weight), d_b(l.query_bias), d_keys(l.keys),
        d_gamma(l.norm_weight);
    const DeviceArray<uint8_t> d_table(l.table);
    const DeviceArray<float> d_xhat(xhat.size()), d_q(q.size()), d_y(y.size()), d_y2(y.size());
    const DeviceArray<int64_t> d_ids(slots);
    const DeviceArray<float> d_scores(slots), d_gates(slots);
    PeerRouterParams dp;
    dp.query_weight = d_w.get();
    dp.query_bias = d_b.get();
    dp.keys = d_keys.get();
    dp.norm_weight = d_gamma.get();
    ASSERT_TRUE(ctx_.norm_device(lc, dp.norm_weight, d_x.get(), T, d_xhat.get()).ok());
    ASSERT_TRUE(ctx_.query_device(lc, dp, d_xhat.get(), T, d_q.get()).ok());
    PeerDeviceRouting dr;
    dr.ids = d_ids.get();
    dr.scores = d_scores.get();
    dr.gates = d_gates.get();
    ASSERT_TRUE(ctx_.route_device(lc, dp, d_q.get(), T, dr).ok());
    ASSERT_TRUE(ctx_.experts_device_indexed(lc, l.layout, d_xhat.get(), T, d_gates.get(),
                                            d_table.get(), d_ids.get(), d_y.get())
                    .ok());
    // The same through a pointer table built from the ids.
    ASSERT_TRUE(ctx_.synchronize().ok());
    const std::vector<int64_t> ids = d_ids.to_host();
    std::vector<const uint8_t*> device_records(slots);
    for (size_t s = 0; s < slots; ++s) {
      device_records[s] = d_table.get() + sz(ids[s]) * l.layout.stride;
    }
    const DeviceArray<const uint8_t*> d_records(device_records);
    ASSERT_TRUE(ctx_.experts_device(lc, l.layout, d_xhat.get(), T, d_gates.get(), d_records.get(),
                                    d_y2.get())
                    .ok());
    ASSERT_TRUE(ctx_.synchronize().ok());

    expect_bits_equal(d_xhat.to_host(), xhat, "xhat");
    expect_bits_equal(d_q.to_host(), q, "q");
    EXPECT_EQ(ids, routing.ids);
    expect_bits_equal(d_scores.to_host(), routing.scores, "scores");
    expect_bits_equal(d_gates.to_host(), routing.gates, "gates");
    expect_bits_equal(d_y.to_host(), y, "y (indexed)");
    expect_bits_equal(d_y2.to_host(), y, "y (pointer table)");

    // And the chain as a whole against the oracle's.
    expect_close(xhat, ref.xhat, kForwardAbs, kForwardRel, "xhat vs oracle");
    expect_routing_close(routing, ref.routing, "routing vs oracle");
  }
}

// The ranged pass (runtime/layer/cuda_executor.h's waves): each token's slots split at random
// points into up to three passes, each pass reading only its slots' records (the rest null),
// give the one-pass bits: every y element is the same fp32 sum continued from y.
TEST_F(CudaPeerTest, RangedPassesOverAnySplitEqualOnePassBitForBit) {
  std::mt19937 rng(23);
  for (DType t : {DType::kI4, DType::kI8, DType::kBF16, DType::kF32}) {
    for (Activation act : {Activation::kRelu, Activation::kGelu}) {
      PeerConfig c = make_config(77, 50, 3, 10, 8, 5, 3);
      c.activation = act;
      const PeerShape shape{41, c, t};
      SCOPED_TRACE(describe(shape));
      const PeerLayer l = random_layer(shape, 17);
      const PeerConfig& lc = l.config;
      const RefForward ref = ref_forward(l);
      const int64_t T = l.tokens;
      const int64_t S = lc.heads * lc.topk;
      const DeviceArray<uint8_t> d_table(l.table);
      const DeviceArray<float> d_xhat(ref.xhat), d_gates(ref.routing.gates);
      std::vector<const uint8_t*> all(sz(T * S));
      for (size_t s = 0; s < all.size(); ++s) {
        all[s] = d_table.get() + sz(ref.routing.ids[s]) * l.layout.stride;
      }
      const DeviceArray<const uint8_t*> d_all(all);
      const DeviceArray<float> d_want(sz(T * lc.dim_out)), d_y(sz(T * lc.dim_out));
      ASSERT_TRUE(ctx_.experts_device(lc, l.layout, d_xhat.get(), T, d_gates.get(), d_all.get(),
                                      d_want.get())
                      .ok());
      // Per token two cut points in [0, S]: passes [0, a), [a, b), [b, S).
      std::uniform_int_distribution<int32_t> cut(0, static_cast<int32_t>(S));
      std::vector<int32_t> a(sz(T)), b(sz(T));
      for (int64_t i = 0; i < T; ++i) {
        a[sz(i)] = cut(rng);
        b[sz(i)] = cut(rng);
        if (a[sz(i)] > b[sz(i)]) std::swap(a[sz(i)], b[sz(i)]);
      }
      for (int pass = 0; pass < 3; ++pass) {
        std::vector<int32_t> ranges(sz(2 * T));
        std::vector<const uint8_t*> records(all.size(), nullptr);
        for (int64_t i = 0; i < T; ++i) {
          const int32_t begin = pass == 0 ? 0 : pass == 1 ? a[sz(i)] : b[sz(i)];
          const int32_t end = pass == 0 ? a[sz(i)] : pass == 1 ? b[sz(i)] : static_cast<int32_t>(S);
          ranges[sz(2 * i)] = begin;
          ranges[sz(2 * i + 1)] = end;
          for (int32_t s = begin; s < end; ++s) records[sz(i * S + s)] = all[sz(i * S + s)];
        }
        const DeviceArray<int32_t> d_ranges(ranges);
        const DeviceArray<const uint8_t*> d_records(records);
        ASSERT_TRUE(ctx_.experts_device_ranged(lc, l.layout, d_xhat.get(), T, d_gates.get(),
                                               d_records.get(), d_ranges.get(), d_y.get())
                        .ok());
        ASSERT_TRUE(ctx_.synchronize().ok());
      }
      expect_bits_equal(d_y.to_host(), d_want.to_host(), "three ranged passes");
      expect_close(d_y.to_host(), ref.y, kForwardAbs, kForwardRel, "ranged y vs oracle");
    }
  }
}

TEST_F(CudaPeerTest, ResultsDoNotChangeBetweenRuns) {
  PeerConfig c = make_config(77, 50, 4, 10, 9, 6, 3);
  c.input_norm = InputNorm::kRms;
  c.query_bias = true;
  c.activation = Activation::kGeluTanh;
  const PeerLayer l = random_layer({203, c, DType::kI4}, 51);
  const RefForward ref = ref_forward(l);
  const CudaSteps one = cuda_steps(ctx_, l, ref);
  const CudaSteps two = cuda_steps(ctx_, l, ref);
  expect_bits_equal(one.xhat, two.xhat, "xhat");
  expect_bits_equal(one.q, two.q, "q");
  EXPECT_EQ(one.routing.ids, two.routing.ids);
  expect_bits_equal(one.routing.gates, two.routing.gates, "gates");
  expect_bits_equal(one.y, two.y, "y");
}

// ---- without a device: argument checks and the no-device error ---------------------------

// A small valid layer for the argument tests.
struct ArgsFixture {
  PeerConfig config = make_config(40, 24, 2, 5, 4, 3, 2);
  RecordLayout layout = layout_of(DType::kI4, 40, 24);
  std::vector<float> x = std::vector<float>(3 * 40, 0.5f);
  std::vector<float> out = std::vector<float>(3 * 40, 0.0f);
  std::vector<float> weight = std::vector<float>(2 * 2 * 4 * 40, 0.1f);
  std::vector<float> keys = std::vector<float>(2 * 2 * 5 * 4, 0.1f);
  std::vector<float> q = std::vector<float>(3 * 2 * 2 * 4, 0.1f);
  std::vector<uint8_t> record = std::vector<uint8_t>(1024, 0);
  PeerRouting routing;
  std::vector<const uint8_t*> records;

  ArgsFixture() {
    routing.resize(3, 2, 3);
    records.assign(routing.slots(), record.data());
  }
  PeerRouterParams params() const {
    PeerRouterParams p;
    p.query_weight = weight.data();
    p.keys = keys.data();
    return p;
  }
};

void expect_error(const Status& s, Status::Code code, const std::string& mentions) {
  EXPECT_EQ(s.code(), code) << s.to_string();
  EXPECT_NE(s.message().find(mentions), std::string::npos)
      << "'" << s.to_string() << "' does not mention '" << mentions << "'";
}

TEST(CudaPeerArgsTest, CreateWithoutADeviceIsNotSupported) {
  if (cuda_device_count() > 0) {
    GTEST_SKIP() << "a CUDA device is present; the no-device path is not reachable";
  }
  const Result<CudaPeerContext> ctx = CudaPeerContext::create();
  ASSERT_FALSE(ctx.ok());
  expect_error(ctx.status(), Status::Code::kNotSupported, "no CUDA device is available");
  EXPECT_NE(ctx.status().message().find("CudaPeerContext::create"), std::string::npos);
}

TEST(CudaPeerArgsTest, AnEmptyContextChecksArgumentsThenRefuses) {
  CudaPeerContext empty;
  EXPECT_FALSE(empty.has_device());
  ArgsFixture f;
  const PeerRouterParams p = f.params();
  const auto refused = [](const Status& s, const char* fn) {
    expect_error(s, Status::Code::kInvalidArgument, "empty CudaPeerContext");
    EXPECT_NE(s.message().find(fn), std::string::npos) << s.to_string();
  };
  refused(empty.norm(f.config, nullptr, f.x.data(), 3, f.out.data()), "CudaPeerContext::norm");
  refused(empty.query(f.config, p, f.x.data(), 3, f.out.data()), "CudaPeerContext::query");
  PeerRouting routing;
  refused(empty.route(f.config, p, f.q.data(), 3, &routing), "CudaPeerContext::route");
  refused(empty.experts(f.config, f.layout, f.x.data(), f.routing, f.records.data(), f.out.data()),
          "CudaPeerContext::experts");
  PeerDeviceRouting dr;
  int64_t ids[18];
  float scores[18], gates[18];
  dr.ids = ids;
  dr.scores = scores;
  dr.gates = gates;
  refused(empty.norm_device(f.config, nullptr, f.x.data(), 3, f.out.data()), "norm_device");
  refused(empty.query_device(f.config, p, f.x.data(), 3, f.out.data()), "query_device");
  refused(empty.route_device(f.config, p, f.q.data(), 3, dr), "route_device");
  refused(empty.experts_device(f.config, f.layout, f.x.data(), 3, gates, f.records.data(),
                               f.out.data()),
          "experts_device");
  refused(empty.experts_device_indexed(f.config, f.layout, f.x.data(), 3, gates, f.record.data(),
                                       ids, f.out.data()),
          "experts_device_indexed");
  refused(empty.synchronize(), "synchronize");

  // A moved-from context is empty too.
  CudaPeerContext moved = std::move(empty);
  EXPECT_FALSE(moved.has_device());
}

TEST(CudaPeerArgsTest, BadConfigsAndShapesNameTheFieldAndValue) {
  CudaPeerContext ctx;  // argument checks come before any device work
  ArgsFixture f;
  const PeerRouterParams p = f.params();
  constexpr auto kInvalid = Status::Code::kInvalidArgument;
  constexpr auto kUnsupported = Status::Code::kNotSupported;

  PeerConfig bad = f.config;
  bad.dim = 0;
  expect_error(ctx.norm(bad, nullptr, f.x.data(), 3, f.out.data()), kInvalid, "dim must be >= 1");
  bad = f.config;
  bad.topk = 5;  // > k'^2 = 4
  expect_error(ctx.route(bad, p, f.q.data(), 3, &f.routing), kInvalid, "topk 5");
  expect_error(ctx.norm(f.config, nullptr, f.x.data(), -1, f.out.data()), kInvalid,
               "tokens must be in [0, 2147483647] (got -1)");
  expect_error(ctx.norm(f.config, nullptr, f.x.data(), int64_t{1} << 31, f.out.data()), kInvalid,
               "got 2147483648");

  // The CUDA path's own limits.
  PeerConfig big = make_config(8, 8, 1, 70000, 2, 4, 2);
  expect_error(ctx.route(big, p, f.q.data(), 3, &f.routing), kUnsupported, "n_keys 70000");
  big = make_config(8, 8, 1, 2000, 2, 4, 1100);
  expect_error(ctx.route(big, p, f.q.data(), 3, &f.routing), kUnsupported, "topk_per_half 1100");
  big = make_config(8, 8, 1, 2000, 2, 1500, 1000);
  expect_error(ctx.route(big, p, f.q.data(), 3, &f.routing), kUnsupported, "topk 1500");
  big = make_config(40, 24, 64, 100, 2, 100, 10);  // 6400 slots per token
  const RecordLayout big_layout = layout_of(DType::kI4, 40, 24);
  expect_error(ctx.experts_device(big, big_layout, f.x.data(), 3, f.out.data(), f.records.data(),
                                  f.out.data()),
               kUnsupported, "heads * topk = 6400");
}

TEST(CudaPeerArgsTest, NullPointersAreNamed) {
  CudaPeerContext ctx;
  ArgsFixture f;
  PeerRouterParams p = f.params();
  constexpr auto kInvalid = Status::Code::kInvalidArgument;

  expect_error(ctx.norm(f.config, nullptr, nullptr, 3, f.out.data()), kInvalid, "x is null");
  expect_error(ctx.norm(f.config, nullptr, f.x.data(), 3, nullptr), kInvalid, "xhat is null");
  PeerConfig rms = f.config;
  rms.input_norm = InputNorm::kRms;
  expect_error(ctx.norm(rms, nullptr, f.x.data(), 3, f.out.data()), kInvalid, "norm_weight");

  expect_error(ctx.query(f.config, p, f.x.data(), 3, nullptr), kInvalid, "q is null");
  PeerRouterParams no_weight = p;
  no_weight.query_weight = nullptr;
  expect_error(ctx.query(f.config, no_weight, f.x.data(), 3, f.out.data()), kInvalid,
               "params.query_weight is null");
  PeerConfig with_bias = f.config;
  with_bias.query_bias = true;
  expect_error(ctx.query(with_bias, p, f.x.data(), 3, f.out.data()), kInvalid,
               "params.query_bias (config.query_bias is set) is null");
  PeerRouterParams stray_bias = p;
  stray_bias.query_bias = f.weight.data();
  expect_error(ctx.query(f.config, stray_bias, f.x.data(), 3, f.out.data()), kInvalid,
               "config.query_bias is false");

  PeerRouterParams no_keys = p;
  no_keys.keys = nullptr;
  expect_error(ctx.route(f.config, no_keys, f.q.data(), 3, &f.routing), kInvalid,
               "params.keys is null");
  expect_error(ctx.route(f.config, p, f.q.data(), 3, nullptr), kInvalid, "routing is null");
  PeerDeviceRouting dr;
  expect_error(ctx.route_device(f.config, p, f.q.data(), 3, dr), kInvalid, "routing.ids is null");

  std::vector<const uint8_t*> records = f.records;
  records[4] = nullptr;
  expect_error(ctx.experts(f.config, f.layout, f.x.data(), f.routing, records.data(), f.out.data()),
               kInvalid, "records[4] is null");
  expect_error(ctx.experts(f.config, f.layout, f.x.data(), f.routing, nullptr, f.out.data()),
               kInvalid, "records is null");
  expect_error(ctx.experts_device_indexed(f.config, f.layout, f.x.data(), 3, f.out.data(), nullptr,
                                          nullptr, f.out.data()),
               kInvalid, "table is null");
  expect_error(ctx.experts_device_indexed(f.config, f.layout, f.x.data(), 3, f.out.data(),
                                          f.record.data(), nullptr, f.out.data()),
               kInvalid, "record_index is null");
}

TEST(CudaPeerArgsTest, LayoutsAndRoutingsThatDoNotFitTheConfigAreNamed) {
  CudaPeerContext ctx;
  ArgsFixture f;
  constexpr auto kInvalid = Status::Code::kInvalidArgument;
  const auto experts = [&](const RecordLayout& layout, const PeerRouting& routing) {
    return ctx.experts(f.config, layout, f.x.data(), routing, f.records.data(), f.out.data());
  };

  RecordLayout layout = f.layout;
  layout.dtype = static_cast<DType>(9);
  expect_error(experts(layout, f.routing), kInvalid, "layout.dtype 9 is not a record dtype");
  layout = layout_of(DType::kI8, 41, 24);
  expect_error(experts(layout, f.routing), kInvalid,
               "layout is for dim 41, dim_out 24 but the config has dim 40, dim_out 24");
  layout = f.layout;
  layout.width = 2;
  expect_error(experts(layout, f.routing), Status::Code::kNotSupported, "layout.width 2");
  layout = f.layout;
  layout.up_codes_offset += 2;
  expect_error(experts(layout, f.routing), kInvalid,
               "differ from RecordLayout::make(int4, 40, 24)");
  layout = f.layout;
  layout.stride = layout.record_bytes + 8;
  expect_error(experts(layout, f.routing), kInvalid, "must be a multiple of 16");

  PeerRouting routing = f.routing;
  routing.heads = 3;
  expect_error(experts(f.layout, routing), kInvalid, "routing is for heads 3, topk 3");
  routing = f.routing;
  routing.gates.pop_back();
  expect_error(experts(f.layout, routing), kInvalid, "18 ids and 17 gates");
}

}  // namespace
}  // namespace trove
