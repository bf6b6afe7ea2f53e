// PeerLayer through the runtime API: the same layer from a store and from memory, backends
// against each other, the checks on every input, corrupt records, and RoutingStats.
#include "runtime/layer/peer_layer.h"
#include "kernels/cpu/peer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include <gtest/gtest.h>

#include "runtime/bench/synthetic.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/routing_stats.h"
#include "storage/store.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using testing::ScratchDir;

PeerConfig small_config() {
  PeerConfig c;
  c.dim = 72;  // not a multiple of 32
  c.dim_out = 72;
  c.heads = 3;
  c.n_keys = 9;  // N = 81
  c.dim_key = 6;
  c.topk = 4;
  c.topk_per_half = 3;
  c.activation = Activation::kSilu;
  c.gate = Gate::kRelu;
  return c;
}

std::vector<float> gaussian(size_t n, uint32_t seed, float std = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, std);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// A packed int4 store of one synthetic layer "blk.0.peer" in `dir`.
std::string make_store(const ScratchDir& dir, DType dtype = DType::kI4) {
  SyntheticCheckpoint spec;
  spec.layout = ImportLayout::kMikeybeez;
  spec.prefixes = {"blk.0.peer"};
  spec.config = small_config();
  spec.dtype = StDType::kF32;
  spec.router_std = 0.3f;
  EXPECT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"), spec).ok());
  PackOptions opt;
  opt.inputs = {dir.file("in.safetensors")};
  opt.output = dir.file("m.trove");
  opt.layout = ImportLayout::kMikeybeez;
  opt.dtype = dtype;
  opt.layers = {{"blk.0.peer", "blk.0.peer"}};
  opt.overrides.topk = 4;
  opt.overrides.topk_per_half = 3;
  EXPECT_TRUE(pack_store(opt).ok());
  return opt.output;
}

// The same layer with its records copied into memory.
PeerLayer memory_copy(PeerLayer& from, const StoreReader& store, PeerLayerOptions options) {
  const StoreLayerInfo* info = store.find_layer("blk.0.peer");
  std::span<const uint8_t> table = store.mapped_records(*info);
  auto source = std::make_unique<MemoryExpertSource>(
      from.record_layout(), std::vector<uint8_t>(table.begin(), table.end()));
  return std::move(PeerLayer::create(from.config(), from.params(), std::move(source), options))
      .value();
}

TEST(PeerLayer, StoreAndMemorySourcesGiveIdenticalOutputs) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto layer = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  PeerLayer mem = memory_copy(*layer, *store, {});

  const int64_t T = 33;
  const std::vector<float> x = gaussian(T * 72, 1);
  std::vector<float> y1(T * 72), y2(T * 72);
  PeerRouting r1, r2;
  ASSERT_TRUE(layer->forward(x, T, y1, &r1).ok());
  ASSERT_TRUE(mem.forward(x, T, y2, &r2).ok());
  EXPECT_EQ(r1.ids, r2.ids);
  EXPECT_EQ(0, std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)));
  // Every record the batch used was read (and verified against its checksum) once.
  auto* resident = dynamic_cast<ResidentStoreExpertSource*>(&layer->experts());
  ASSERT_NE(resident, nullptr);
  std::vector<int64_t> ids = r1.ids;
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  EXPECT_EQ(resident->loaded_records(), static_cast<int64_t>(ids.size()));
  // A second batch over the same experts reads nothing new.
  ASSERT_TRUE(layer->forward(x, T, y1, &r1).ok());
  EXPECT_EQ(resident->loaded_records(), static_cast<int64_t>(ids.size()));
}

TEST(PeerLayer, CpuBackendMatchesTheReferenceBackend) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI8));
  ASSERT_TRUE(store.ok());
  auto cpu = PeerLayer::open(*store, "blk.0.peer", {PeerBackend::kCpu, 2});
  auto ref = PeerLayer::open(*store, "blk.0.peer", {PeerBackend::kRef, 1});
  ASSERT_TRUE(cpu.ok() && ref.ok());
  const int64_t T = 20;
  const std::vector<float> x = gaussian(T * 72, 2);
  std::vector<float> y_cpu(T * 72), y_ref(T * 72);
  PeerRouting r_cpu, r_ref;
  ASSERT_TRUE(cpu->forward(x, T, y_cpu, &r_cpu).ok());
  ASSERT_TRUE(ref->forward(x, T, y_ref, &r_ref).ok());
  ASSERT_EQ(r_cpu.ids, r_ref.ids);  // random data: no near-ties at this size
  for (size_t i = 0; i < y_cpu.size(); ++i) {
    EXPECT_NEAR(y_cpu[i], y_ref[i], 1e-4 + 1e-4 * std::abs(y_ref[i])) << i;
  }
  const std::vector<float> dy = gaussian(T * 72, 3);
  PeerGrads g_cpu, g_ref;
  ASSERT_TRUE(cpu->backward(x, T, dy, &g_cpu).ok());
  ASSERT_TRUE(ref->backward(x, T, dy, &g_ref).ok());
  EXPECT_EQ(g_cpu.expert_ids, g_ref.expert_ids);
  ASSERT_EQ(g_cpu.d_down.size(), g_ref.d_down.size());
  for (size_t i = 0; i < g_cpu.d_down.size(); ++i) {
    EXPECT_NEAR(g_cpu.d_down[i], g_ref.d_down[i], 1e-4 + 1e-4 * std::abs(g_ref.d_down[i]));
  }
  for (size_t i = 0; i < g_cpu.dx.size(); ++i) {
    EXPECT_NEAR(g_cpu.dx[i], g_ref.dx[i], 1e-4 + 1e-4 * std::abs(g_ref.dx[i]));
  }
}

// CpuExecutorOptions::routing_precision reaches the router: kBf16's scores are not kF32's bits,
// but within bf16's rounding of them, and its forward runs the experts on its own routing.
TEST(PeerLayer, CpuBackendRoutesInBf16WhenAsked) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI8));
  ASSERT_TRUE(store.ok());
  PeerLayerOptions bf16_options{PeerBackend::kCpu, 2};
  bf16_options.cpu.routing_precision = RoutingPrecision::kBf16;
  auto f32 = PeerLayer::open(*store, "blk.0.peer", {PeerBackend::kCpu, 2});
  auto bf16 = PeerLayer::open(*store, "blk.0.peer", bf16_options);
  ASSERT_TRUE(f32.ok() && bf16.ok());
  const int64_t T = 20;
  const std::vector<float> x = gaussian(T * 72, 4);
  std::vector<float> y_f32(T * 72), y_bf16(T * 72), y_routed(T * 72);
  PeerRouting r_f32, r_bf16;
  ASSERT_TRUE(f32->forward(x, T, y_f32, &r_f32).ok());
  ASSERT_TRUE(bf16->forward(x, T, y_bf16, &r_bf16).ok());
  ASSERT_EQ(r_f32.scores.size(), r_bf16.scores.size());
  EXPECT_NE(0, std::memcmp(r_f32.scores.data(), r_bf16.scores.data(),
                           r_f32.scores.size() * sizeof(float)));
  double max_score = 0;
  for (float s : r_f32.scores) max_score = std::max(max_score, std::abs(static_cast<double>(s)));
  for (size_t i = 0; i < r_f32.scores.size(); ++i) {
    if (r_f32.ids[i] != r_bf16.ids[i]) continue;  // a near-tie may swap experts
    EXPECT_NEAR(r_bf16.scores[i], r_f32.scores[i], 2e-2 * max_score) << i;
  }
  // The fp32 layer run on the bf16 routing gives the bf16 layer's y (the experts are the same).
  ASSERT_TRUE(f32->forward_routed(x, T, r_bf16, y_routed).ok());
  EXPECT_EQ(0, std::memcmp(y_routed.data(), y_bf16.data(), y_bf16.size() * sizeof(float)));
}

// The CPU executor keeps the router's weights prepared for int8 and bf16 routing across calls:
// its routing equals the kernels' with weights made in the call, and a change through
// mutable_params() (the trainer's step) reaches the next call rather than the kept copy.
TEST(PeerLayer, CpuBackendsPreparedRouterWeightsFollowAParameterChange) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI8));
  ASSERT_TRUE(store.ok());
  for (RoutingPrecision precision : {RoutingPrecision::kInt8, RoutingPrecision::kBf16}) {
    SCOPED_TRACE(static_cast<int>(precision));
    PeerLayerOptions options{PeerBackend::kCpu, 2};
    options.cpu.routing_precision = precision;
    auto layer = PeerLayer::open(*store, "blk.0.peer", options);
    ASSERT_TRUE(layer.ok());
    const PeerConfig& c = layer->config();
    const int64_t T = 20;
    const std::vector<float> x = gaussian(T * c.dim, 6);
    std::vector<float> y(T * c.dim_out);
    // The kernels' routing with the weights made in the call, on the layer's current params.
    const auto routing_of = [&](const PeerDenseParams& d) {
      PeerRouterParams p;
      p.query_weight = d.query_weight.data();
      p.query_bias = d.query_bias.empty() ? nullptr : d.query_bias.data();
      p.keys = d.keys.data();
      p.norm_weight = d.norm_weight.empty() ? nullptr : d.norm_weight.data();
      std::vector<float> xhat(x.size()), q(T * c.query_rows());
      peer_norm(c, p.norm_weight, x.data(), T, xhat.data(), 1);
      peer_query(c, p, xhat.data(), T, q.data(), 1, precision);
      PeerRouting r;
      peer_route(c, p, q.data(), T, &r, 1, precision);
      return r;
    };
    PeerRouting before, after;
    ASSERT_TRUE(layer->forward(x, T, y, &before).ok());
    const PeerRouting want_before = routing_of(layer->params());
    EXPECT_EQ(before.ids, want_before.ids);
    EXPECT_EQ(0, std::memcmp(before.scores.data(), want_before.scores.data(),
                             before.scores.size() * sizeof(float)));
    PeerDenseParams& params = layer->mutable_params();
    for (float& w : params.query_weight) w *= 0.5f;
    for (float& k : params.keys) k = -k;  // the other end of each sub-key ranking
    ASSERT_TRUE(layer->forward(x, T, y, &after).ok());
    const PeerRouting want_after = routing_of(layer->params());
    EXPECT_EQ(after.ids, want_after.ids);
    EXPECT_EQ(0, std::memcmp(after.scores.data(), want_after.scores.data(),
                             after.scores.size() * sizeof(float)));
    EXPECT_NE(after.ids, before.ids);
  }
}

// The look-ahead contract: route() now, forward_routed() later gives forward()'s routing and
// bits on every host executor, and the layer reports which executor ran
// through the interface alone.
TEST(PeerLayer, RouteThenForwardRoutedGivesForwardsBitsOnEveryHostExecutor) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok());
  for (PeerBackend b : {PeerBackend::kCpu, PeerBackend::kRef}) {
    SCOPED_TRACE(std::string(peer_backend_name(b)));
    auto layer = PeerLayer::open(*store, "blk.0.peer", {b, 2});
    ASSERT_TRUE(layer.ok()) << layer.status().to_string();
    EXPECT_EQ(layer->executor().name(), peer_backend_name(b));
    EXPECT_TRUE(layer->h2d_totals().empty());
    const int64_t T = 23;  // odd
    const std::vector<float> x0 = gaussian(T * 72, 11), x1 = gaussian(T * 72, 12);
    std::vector<float> y_forward(T * 72), y_routed(T * 72, -1.0f);
    PeerRouting r_forward, r_ahead;
    ASSERT_TRUE(layer->forward(x1, T, y_forward, &r_forward).ok());
    // Route batch 1 ahead, run batch 0 in between (its x-hat replaces batch 1's), then batch 1.
    ASSERT_TRUE(layer->route(x1, T, &r_ahead).ok());
    EXPECT_EQ(r_ahead.ids, r_forward.ids);
    EXPECT_EQ(r_ahead.gates, r_forward.gates);
    std::vector<float> y0(T * 72);
    ASSERT_TRUE(layer->forward(x0, T, y0).ok());
    PeerBatchStats st;
    ASSERT_TRUE(layer->forward_routed(x1, T, r_ahead, y_routed, &st).ok());
    EXPECT_EQ(std::memcmp(y_routed.data(), y_forward.data(), y_forward.size() * 4), 0);
    EXPECT_EQ(st.tokens, T);
    EXPECT_EQ(st.slots, static_cast<int64_t>(r_ahead.ids.size()));
    EXPECT_EQ(st.unique_experts, static_cast<int64_t>(layer->last_experts().size()));
    // Bad input is refused by route() as by forward().
    std::vector<float> bad = x1;
    bad[5] = std::nanf("");
    const Status s = layer->route(bad, T, &r_ahead);
    EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
    EXPECT_NE(s.message().find("token 0, element 5 is nan"), std::string::npos) << s.to_string();
  }
}

TEST(PeerLayer, RejectsInputsOfTheWrongSizeNamingTheShape) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir));
  auto layer = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(5 * 71), y(5 * 72);
  Status s = layer->forward(x, 5, y);
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_NE(s.message().find("5 tokens x dim 72"), std::string::npos) << s.message();
  x.resize(5 * 72);
  y.resize(5 * 72 + 1);
  s = layer->forward(x, 5, y);
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_NE(s.message().find("output"), std::string::npos) << s.message();
  EXPECT_TRUE(layer->forward(x, -1, y).is_invalid_argument());
}

TEST(PeerLayer, RejectsNonFiniteInputsNamingTokenAndElement) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir));
  auto layer = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(layer.ok());
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<float> x = gaussian(4 * 72, 4), y(4 * 72, 7.0f);
    x[2 * 72 + 17] = bad;
    Status s = layer->forward(x, 4, y);
    EXPECT_TRUE(s.is_invalid_argument());
    EXPECT_NE(s.message().find("token 2, element 17"), std::string::npos) << s.message();
    EXPECT_EQ(y[0], 7.0f);  // nothing written
  }
  std::vector<float> x = gaussian(2 * 72, 5), dy(2 * 72, 0.0f);
  dy[72 + 3] = std::numeric_limits<float>::quiet_NaN();
  PeerGrads g;
  Status s = layer->backward(x, 2, dy, &g);
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_NE(s.message().find("output gradient: token 1, element 3"), std::string::npos)
      << s.message();
}

TEST(PeerLayer, EmptyBatchIsValidAndProducesNothing) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir));
  auto layer = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(layer.ok());
  PeerRouting r;
  PeerBatchStats stats;
  ASSERT_TRUE(layer->forward({}, 0, {}, &r, &stats).ok());
  EXPECT_EQ(r.tokens, 0);
  EXPECT_TRUE(r.ids.empty());
  EXPECT_EQ(stats.unique_experts, 0);
  PeerGrads g;
  ASSERT_TRUE(layer->backward({}, 0, {}, &g).ok());
  EXPECT_TRUE(g.expert_ids.empty());
  EXPECT_TRUE(g.dx.empty());
}

TEST(PeerLayer, UnknownLayerListsTheStoresLayers) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir));
  auto layer = PeerLayer::open(*store, "blk.7.peer");
  ASSERT_FALSE(layer.ok());
  EXPECT_TRUE(layer.status().is_not_found());
  EXPECT_NE(layer.status().message().find("blk.0.peer"), std::string::npos);
}

TEST(PeerLayer, CreateChecksEveryTensorAgainstTheConfig) {
  PeerConfig c = small_config();
  ASSERT_TRUE(c.validate_and_fill().ok());
  auto layout = RecordLayout::make(DType::kF32, c.dim, c.dim_out).value();
  auto source = [&] {
    return std::make_unique<MemoryExpertSource>(
        layout, std::vector<uint8_t>(static_cast<size_t>(c.num_experts()) * layout.stride));
  };
  PeerDenseParams good;
  good.query_weight.resize(static_cast<size_t>(c.query_rows() * c.dim));
  good.keys.resize(static_cast<size_t>(c.key_heads() * 2 * c.n_keys * c.dim_key));
  EXPECT_TRUE(PeerLayer::create(c, good, source()).ok());

  PeerDenseParams p = good;
  p.query_weight.pop_back();
  auto r = PeerLayer::create(c, p, source());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("query.weight"), std::string::npos);
  EXPECT_NE(r.status().message().find("[36, 72]"), std::string::npos) << r.status().message();

  p = good;
  p.keys.push_back(0);
  r = PeerLayer::create(c, p, source());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("keys"), std::string::npos);

  p = good;
  p.norm_weight.assign(72, 1.0f);
  EXPECT_FALSE(PeerLayer::create(c, p, source()).ok());  // no rms norm in the config

  PeerConfig wrong = c;
  wrong.dim_out = 40;
  r = PeerLayer::create(wrong, good, source());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("does not match the config"), std::string::npos);
}

TEST(PeerLayer, CorruptRecordFailsTheBatchNamingTheExpertAndLeavesTheStoreAlone) {
  ScratchDir dir;
  const std::string path = make_store(dir);
  const int64_t T = 6;
  const std::vector<float> x = gaussian(T * 72, 6);
  PeerRouting routing;
  uint64_t record_offset = 0;
  int64_t victim = 0;
  {
    auto store = StoreReader::open(path);
    auto layer = PeerLayer::open(*store, "blk.0.peer");
    std::vector<float> y(T * 72);
    ASSERT_TRUE(layer->forward(x, T, y, &routing).ok());
    victim = routing.ids[0];
    const StoreLayerInfo* info = store->find_layer("blk.0.peer");
    record_offset = info->table.offset + static_cast<uint64_t>(victim) * info->table.stride;
  }
  std::vector<uint8_t> bytes = testing::read_all(path);
  bytes[record_offset + 5] ^= 0x10;
  testing::write_all(path, bytes);

  auto store = StoreReader::open(path);
  ASSERT_TRUE(store.ok());
  auto layer = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(layer.ok());
  std::vector<float> y(T * 72);
  Status s = layer->forward(x, T, y);
  EXPECT_TRUE(s.is_corruption()) << s.to_string();
  EXPECT_NE(s.message().find("expert " + std::to_string(victim)), std::string::npos) << s.message();
  EXPECT_EQ(testing::read_all(path), bytes);
  // Without checksums the same batch runs (the caller asked for it).
  auto unchecked = PeerLayer::open(*store, "blk.0.peer", {PeerBackend::kCpu, 0, false});
  EXPECT_TRUE(unchecked->forward(x, T, y).ok());
}

// What the bench and the reports ask of a backend instead of its name: host executors have no
// memory of their own, so their resident options stay as given and need no fill pass; cuda's
// hold the whole table in the device tier, filled by one pass.
TEST(PeerExecutorTraits, HostBackendsHaveNoDeviceMemoryAndCudaHasOne) {
  PeerConfig c = small_config();
  ASSERT_TRUE(c.validate_and_fill().ok());
  const RecordLayout layout =
      RecordLayout::make(DType::kI4, c.dim, c.dim_out, c.expert_width).value();
  for (PeerBackend b : {PeerBackend::kCpu, PeerBackend::kRef}) {
    SCOPED_TRACE(std::string(peer_backend_name(b)));
    EXPECT_FALSE(peer_backend_traits(b).device_memory);
    EXPECT_EQ(peer_backend_traits(b).resident_fill_passes, 0);
    PeerLayerOptions o;
    o.backend = b;
    o.threads = 3;
    set_resident_options(uint64_t{1} << 30, &o);
    EXPECT_EQ(o.cuda.vram_budget_bytes, 0u);
    EXPECT_EQ(o.threads, 3);
    // So the options make a layer here (a device budget would be refused on a host backend).
    EXPECT_TRUE(make_peer_executor(c, layout, o).ok());
  }
  EXPECT_TRUE(peer_backend_traits(PeerBackend::kCuda).device_memory);
  EXPECT_EQ(peer_backend_traits(PeerBackend::kCuda).resident_fill_passes, 1);
  PeerLayerOptions o;
  o.backend = PeerBackend::kCuda;
  set_resident_options(12345, &o);
  EXPECT_EQ(o.cuda.vram_budget_bytes, 12345u);
}

TEST(RoutingStats, UsageUnevennessAndUniquePerBatch) {
  RoutingStats even(4);
  PeerRouting r;
  r.resize(2, 1, 2);
  r.ids = {0, 1, 2, 3};
  even.add(r);
  EXPECT_DOUBLE_EQ(even.usage(), 1.0);
  EXPECT_NEAR(even.kl_from_uniform(), 0.0, 1e-12);
  EXPECT_EQ(even.unique_per_batch(), std::vector<int64_t>{4});

  RoutingStats skewed(4);
  r.ids = {2, 2, 2, 2};
  skewed.add(r);
  r.ids = {2, 2, 2, 1};
  skewed.add(r);
  EXPECT_DOUBLE_EQ(skewed.usage(), 0.5);
  EXPECT_EQ(skewed.selections(), 8);
  EXPECT_EQ(skewed.tokens(), 4);
  EXPECT_DOUBLE_EQ(skewed.max_share(), 7.0 / 8.0);
  const double kl = 7.0 / 8 * std::log(7.0 / 8 * 4) + 1.0 / 8 * std::log(1.0 / 8 * 4);
  EXPECT_NEAR(skewed.kl_from_uniform(), kl, 1e-12);
  EXPECT_EQ(skewed.unique_per_batch(), (std::vector<int64_t>{1, 2}));

  RoutingStats one(1000);
  r.ids = {5, 5, 5, 5};
  one.add(r);
  EXPECT_NEAR(one.kl_from_uniform(), std::log(1000.0), 1e-12);  // everything on one expert
}

}  // namespace
}  // namespace trove
