// runtime/bench: workloads, the synthetic bench store, and the accounting of run_bench on
// small tables (every workload; Belady never below the policy; budgets refused before work;
// layers stacked on the residual stream, their figures summed and their budgets split).
#include "runtime/bench/bench.h"
#include "runtime/layer/lookahead.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "base/random.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/store_layer.h"
#include "storage/safetensors.h"
#include "storage/store.h"
#include "tests/test_util.h"

#if TROVE_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace trove {
namespace {

using testing::ScratchDir;

PeerConfig bench_config(int64_t n_keys = 48) {
  PeerConfig c;
  c.dim = 96;
  c.dim_out = 64;
  c.heads = 2;
  c.n_keys = n_keys;  // N = 2304
  c.dim_key = 8;
  c.topk = 4;
  c.topk_per_half = 4;
  c.activation = Activation::kSilu;
  c.gate = Gate::kRelu;
  return c;
}

// A routing dump (as `trove forward --dump-routing` writes) of `layer` on T tokens, for trace:.
void write_routing_dump(const std::string& path, PeerLayer& layer, int64_t T) {
  const PeerConfig& c = layer.config();
  std::vector<float> x(static_cast<size_t>(T * c.dim));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 13) - 6.0f;
  std::vector<float> y(static_cast<size_t>(T * c.dim_out));
  PeerRouting r;
  ASSERT_TRUE(layer.forward(x, T, y, &r).ok());
  auto bytes = [](const auto& v) {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()),
                                    v.size() * sizeof(v[0]));
  };
  const std::vector<int64_t> shape = {T, c.heads, c.topk};
  ASSERT_TRUE(write_safetensors(path,
                                {{"ids", StDType::kI64, shape, bytes(r.ids), nullptr},
                                 {"gates", StDType::kF32, shape, bytes(r.gates), nullptr}},
                                {})
                  .ok());
}

TEST(BenchWorkload, ParsesEveryFormAndRejectsTheRestNamingTheForms) {
  EXPECT_EQ(BenchWorkload::parse("uniform")->kind, BenchWorkload::Kind::kUniform);
  EXPECT_EQ(BenchWorkload::parse("pk")->kind, BenchWorkload::Kind::kProductKey);
  auto z = BenchWorkload::parse("zipf:1.09");
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(z->kind, BenchWorkload::Kind::kZipf);
  EXPECT_DOUBLE_EQ(z->exponent, 1.09);
  EXPECT_EQ(z->name(), "zipf:1.09");
  auto t = BenchWorkload::parse("trace:r.safetensors");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->trace, "r.safetensors");
  for (const char* bad : {"zipf:", "zipf:x", "zipf:-1", "trace:", "normal", ""}) {
    auto r = BenchWorkload::parse(bad);
    EXPECT_FALSE(r.ok()) << bad;
    if (!r.ok() && std::string(bad).rfind("zipf", 0) != 0) {
      EXPECT_NE(r.status().message().find("zipf:A"), std::string::npos) << r.status().to_string();
    }
  }
}

TEST(BenchStore, VerifiesLoadsAsALayerAndHasDistinctRecords) {
  ScratchDir dir;
  const std::string path = dir.file("b.trove");
  int64_t last = 0;
  ASSERT_TRUE(write_bench_store(path, bench_config(), DType::kI4, 3, [&](int64_t done, int64_t n) {
                EXPECT_GE(done, last);
                EXPECT_EQ(n, 48 * 48);
                last = done;
              }).ok());
  EXPECT_EQ(last, 48 * 48);
  auto store = StoreReader::open(path);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto faults = store->verify();
  ASSERT_TRUE(faults.ok()) << faults.status().to_string();
  EXPECT_TRUE(faults->empty());
  auto stored = load_stored_layer(*store, "bench");
  ASSERT_TRUE(stored.ok()) << stored.status().to_string();
  EXPECT_EQ(stored->config.num_experts(), 48 * 48);
  // Every record has its own bytes (the pool's copies are varied by id), so checksums differ.
  std::set<uint64_t> sums;
  for (int64_t id = 0; id < 48 * 48; ++id) sums.insert(store->record_checksum(*stored->info, id));
  EXPECT_EQ(sums.size(), static_cast<size_t>(48 * 48));
  // The layer runs (and so every record decodes to finite values on the way).
  auto layer = PeerLayer::open(*store, "bench");
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  std::vector<float> x(4 * 96, 0.5f), y(4 * 64);
  ASSERT_TRUE(layer->forward(x, 4, y).ok());
  for (float v : y) EXPECT_TRUE(std::isfinite(v));
}

class BenchRun : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = dir_.file("b.trove");
    ASSERT_TRUE(write_bench_store(store_, bench_config(), DType::kI8, 1, nullptr).ok());
  }
  BenchOptions options(const std::string& workload) {
    BenchOptions o;
    o.store = store_;
    o.workload = BenchWorkload::parse(workload).value();
    o.batch = 16;
    o.batches = 10;
    o.warmup_batches = 3;
    o.host_budget_bytes = 400 * 1024;  // ~ a third of the table
    o.threads = 2;
    o.io.engine = RecordReaderOptions::Engine::kPread;
    o.io.pread_threads = 4;
    return o;
  }
  ScratchDir dir_;
  std::string store_;
};

void expect_consistent(const BenchResult& r, const BenchOptions& o) {
  const int64_t per_batch = o.batch * 2 * 4;
  EXPECT_EQ(r.batches, o.batches);
  EXPECT_EQ(r.tokens, o.batch * o.batches);
  EXPECT_EQ(r.requested(), per_batch * o.batches);
  EXPECT_EQ(r.hits() + r.misses(), r.unique());
  EXPECT_LE(r.unique(), r.requested());
  EXPECT_GE(r.unique(), o.batches);
  EXPECT_GE(r.hit_rate, 0.0);
  EXPECT_LE(r.hit_rate, 1.0);
  EXPECT_GT(r.tokens_per_second, 0.0);
  EXPECT_GT(r.resident_tokens_per_second, 0.0);
  EXPECT_GE(r.bytes_read(), static_cast<uint64_t>(r.misses()) * r.record_stride);
  // Every stage's latency: one sample per measured batch, its percentiles in order, and the
  // stages of a batch within its wall time.
  for (const char* stage : {"batch", "route", "resolve", "disk", "compute", "stall", "transfer"}) {
    SCOPED_TRACE(stage);
    const LatencyHistogram t = r.latency(stage);
    EXPECT_EQ(t.count(), o.batches);
    EXPECT_GE(t.quantile(0.5), 0.0);
    EXPECT_LE(t.quantile(0.5), t.quantile(0.9));
    EXPECT_LE(t.quantile(0.9), t.quantile(0.99));
    EXPECT_LE(t.quantile(0.99), t.quantile(1.0));
  }
  EXPECT_LE(r.latency("route").quantile(0.5), r.latency("batch").quantile(1.0));
  EXPECT_LE(r.latency("compute").sum(), r.latency("batch").sum());
  EXPECT_NEAR(r.latency("batch").sum(), r.seconds, 1e-9);
  // The histograms hold the samples the counters add.
  EXPECT_NEAR(r.latency("route").sum(), r.metrics.real("route_seconds"), 1e-9);
  EXPECT_NEAR(r.latency("compute").sum(), r.metrics.real("expert_seconds"), 1e-9);
  EXPECT_EQ(r.metrics.counter("tokens"), r.tokens * static_cast<int64_t>(r.layers.size()));
  // Belady is optimal for demand fills: no policy beats it on the same batches.
  EXPECT_GE(r.oracle_hit_rate + 1e-12, r.achieved_hit_rate_all);
  EXPECT_GE(r.achieved_hit_rate_all, 0.0);
}

TEST_F(BenchRun, EveryWorkloadAccountsForEverySelection) {
  // A routing dump of the layer itself, for trace:.
  auto store = StoreReader::open(store_);
  ASSERT_TRUE(store.ok());
  auto layer = PeerLayer::open(*store, "bench");
  ASSERT_TRUE(layer.ok());
  const std::string trace = dir_.file("r.safetensors");
  write_routing_dump(trace, *layer, 40);
  for (const std::string& w :
       std::vector<std::string>{"uniform", "zipf:1.09", "pk", "trace:" + trace}) {
    SCOPED_TRACE(w);
    const BenchOptions o = options(w);
    auto res = run_bench(o);
    ASSERT_TRUE(res.ok()) << res.status().to_string();
    expect_consistent(*res, o);
    // The GPU peers run on the cuda backend only.
    EXPECT_EQ(res->device_peers.resident_tokens_per_second, 0.0);
    EXPECT_EQ(res->device_peers.expert_kernel_bytes, 0u);
  }
}

TEST_F(BenchRun, OnTheCudaBackendTheGpuPeersRunTheMeasuredBatches) {
#if !TROVE_HAVE_CUDA
  GTEST_SKIP() << "trove was built without CUDA";
#else
  if (cuda_device_count() == 0) {
    GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0 (no driver or no GPU)";
  }
  for (const char* w : {"zipf:1.09", "pk"}) {
    SCOPED_TRACE(w);
    BenchOptions o = options(w);
    o.backend = PeerBackend::kCuda;
    auto res = run_bench(o);
    ASSERT_TRUE(res.ok()) << res.status().to_string();
    expect_consistent(*res, o);
    const DevicePeerResult& d = res->device_peers;
    EXPECT_GT(d.resident_tokens_per_second, 0.0);
    EXPECT_GT(d.einsum_tokens_per_second, 0.0);
    EXPECT_GT(d.managed_tokens_per_second, 0.0);
    EXPECT_GE(d.einsum_max_error, 0.0);
    EXPECT_LT(d.einsum_max_error, 0x1p-5);
    EXPECT_GT(d.expert_kernel_seconds, 0.0);
    // At least xhat, gates, ids and y of every measured batch, at most every slot's record too.
    const uint64_t activations = static_cast<uint64_t>(o.batch * o.batches) * (96 + 64) * 4 +
                                 static_cast<uint64_t>(res->requested()) * 12;
    EXPECT_GT(d.expert_kernel_bytes, activations);
    EXPECT_LE(d.expert_kernel_bytes, activations + res->requested() * res->record_bytes);
  }
  BenchOptions o = options("uniform");
  o.backend = PeerBackend::kCuda;
  o.resident_baseline = false;
  auto res = run_bench(o);
  ASSERT_TRUE(res.ok()) << res.status().to_string();
  EXPECT_EQ(res->device_peers.resident_tokens_per_second, 0.0);
  EXPECT_EQ(res->device_peers.einsum_tokens_per_second, 0.0);
#endif
}

TEST_F(BenchRun, SkewedRoutingHitsMoreThanUniformAtTheSameBudget) {
  auto uniform = run_bench(options("uniform"));
  auto zipf = run_bench(options("zipf:1.2"));
  ASSERT_TRUE(uniform.ok() && zipf.ok());
  EXPECT_GT(zipf->hit_rate, uniform->hit_rate + 0.1)
      << "zipf " << zipf->hit_rate << " uniform " << uniform->hit_rate;
  EXPECT_LT(zipf->unique(), uniform->unique());
}

TEST_F(BenchRun, BudgetBelowOneBatchAndBadTracesAreRefusedBeforeAnyWork) {
  BenchOptions o = options("uniform");
  o.host_budget_bytes = 20 * 1024;
  int64_t progress_calls = 0;
  o.progress = [&](int64_t, int64_t) { ++progress_calls; };
  auto r = run_bench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kResourceExhausted) << r.status().to_string();
  EXPECT_NE(r.status().message().find("raise --host"), std::string::npos);
  EXPECT_EQ(progress_calls, 0);

  auto missing = run_bench(options("trace:" + dir_.file("none.safetensors")));
  EXPECT_FALSE(missing.ok());
  // A trace with the wrong head count names what to change.
  const std::string trace = dir_.file("r3.safetensors");
  std::vector<int64_t> ids(5 * 3 * 4, 1);
  std::vector<float> gates(ids.size(), 0.25f);
  ASSERT_TRUE(
      write_safetensors(trace,
                        {{"ids",
                          StDType::kI64,
                          {5, 3, 4},
                          {reinterpret_cast<const uint8_t*>(ids.data()), ids.size() * 8},
                          nullptr},
                         {"gates",
                          StDType::kF32,
                          {5, 3, 4},
                          {reinterpret_cast<const uint8_t*>(gates.data()), gates.size() * 4},
                          nullptr}},
                        {})
          .ok());
  auto wrong = run_bench(options("trace:" + trace));
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("--heads"), std::string::npos)
      << wrong.status().to_string();
}

TEST(BenchStore, WritesEachLayerWithItsOwnTableAndProgressOverAllOfThem) {
  ScratchDir dir;
  const std::string one = dir.file("one.trove"), three = dir.file("three.trove");
  ASSERT_TRUE(write_bench_store(one, bench_config(), DType::kI4, 5, nullptr).ok());
  int64_t last = 0, all = 0;
  ASSERT_TRUE(write_bench_store(
                  three, bench_config(), DType::kI4, 5,
                  [&](int64_t done, int64_t n) {
                    EXPECT_GE(done, last);
                    last = done;
                    all = n;
                  },
                  3)
                  .ok());
  EXPECT_EQ(all, 3 * 48 * 48);
  EXPECT_EQ(last, all);
  auto a = StoreReader::open(one);
  auto b = StoreReader::open(three);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(b->layers().size(), 3u);
  EXPECT_EQ(b->layers()[0].name, "bench");
  EXPECT_EQ(b->layers()[1].name, "bench.1");
  EXPECT_EQ(b->layers()[2].name, "bench.2");
  // Layer 0 is the one-layer store's layer; the others have tables and routers of their own.
  std::vector<std::set<uint64_t>> sums(3);
  for (int l = 0; l < 3; ++l) {
    auto stored = load_stored_layer(*b, bench_layer_name(l));
    ASSERT_TRUE(stored.ok()) << stored.status().to_string();
    for (int64_t id = 0; id < 64; ++id) sums[l].insert(b->record_checksum(*stored->info, id));
  }
  auto first = load_stored_layer(*a, "bench");
  ASSERT_TRUE(first.ok());
  std::set<uint64_t> single;
  for (int64_t id = 0; id < 64; ++id) single.insert(a->record_checksum(*first->info, id));
  EXPECT_EQ(single, sums[0]);
  for (int l = 1; l < 3; ++l) {
    std::vector<uint64_t> shared;
    std::set_intersection(sums[0].begin(), sums[0].end(), sums[l].begin(), sums[l].end(),
                          std::back_inserter(shared));
    EXPECT_TRUE(shared.empty()) << "layer " << l << " repeats records of layer 0";
  }
  EXPECT_FALSE(
      write_bench_store(dir.file("none.trove"), bench_config(), DType::kI4, 5, nullptr, 0).ok());
}

// Look-ahead runs the same batches (same selections, same distinct experts) and reads ahead of
// them; without it nothing is prefetched and every record read is a batch's own miss.
TEST_F(BenchRun, LookaheadRunsTheSameBatchesAndReadsAheadOfThem) {
  for (const std::string w : {"uniform", "zipf:1.09", "pk"}) {
    SCOPED_TRACE(w);
    BenchOptions o = options(w);
    auto off = run_bench(o);
    ASSERT_TRUE(off.ok()) << off.status().to_string();
    EXPECT_EQ(off->lookahead, 0);
    EXPECT_EQ(off->metrics.counter("host.prefetched"), 0);
    EXPECT_EQ(off->records_read(), off->misses());
    o.lookahead = 2;
    auto on = run_bench(o);
    ASSERT_TRUE(on.ok()) << on.status().to_string();
    EXPECT_EQ(on->lookahead, 2);
    EXPECT_EQ(on->requested(), off->requested());
    EXPECT_EQ(on->unique(), off->unique());
    EXPECT_EQ(on->hits() + on->misses(), on->unique());
    EXPECT_GT(on->metrics.counter("host.prefetched"), 0);
    EXPECT_LE(on->metrics.counter("host.prefetched"), on->hits());
    EXPECT_GE(on->records_read(), on->misses() + on->metrics.counter("host.prefetched"));
    EXPECT_GT(on->resident_tokens_per_second, 0.0);
    EXPECT_EQ(on->predicted_of, 0);  // one layer: nothing to predict
  }
  BenchOptions bad = options("uniform");
  bad.lookahead = kMaxLookahead + 1;
  auto refused = run_bench(bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(refused.status().is_invalid_argument()) << refused.status().to_string();
  EXPECT_NE(refused.status().message().find("look-ahead"), std::string::npos);
}

// Layers of dim_out = dim, so they stack on the residual stream.
class BenchLayers : public BenchRun {
 protected:
  void SetUp() override {
    PeerConfig c = bench_config();
    c.dim_out = c.dim;
    store_ = dir_.file("stack.trove");
    ASSERT_TRUE(write_bench_store(store_, c, DType::kI8, 1, nullptr, 3).ok());
    auto store = StoreReader::open(store_);
    ASSERT_TRUE(store.ok());
    stride_ = store->layers()[0].table.stride;
  }
  BenchOptions stacked(const std::string& workload, int64_t layers) {
    BenchOptions o = options(workload);
    o.layers = layers;
    o.host_budget_bytes = static_cast<uint64_t>(layers) * 400 * 1024;  // 400 KiB per layer
    return o;
  }
  uint64_t stride_ = 0;
};

// Cross-layer prediction (pk): each layer after the first is predicted from the input of the one
// before, and its recall counts the experts it then used; a synthetic routing (zipf) does not
// depend on the input, so nothing is predicted there.
TEST_F(BenchLayers, CrossLayerPredictionReportsRecallOverTheLaterLayersExperts) {
  BenchOptions o = stacked("pk", 3);
  auto off = run_bench(o);
  ASSERT_TRUE(off.ok()) << off.status().to_string();
  EXPECT_EQ(off->predicted_of, 0);
  EXPECT_EQ(off->recall(), -1);
  o.cross_layer = true;
  auto on = run_bench(o);
  ASSERT_TRUE(on.ok()) << on.status().to_string();
  EXPECT_TRUE(on->cross_layer);
  // Layers 1 and 2 are predicted: their distinct experts over the measured batches.
  EXPECT_EQ(on->predicted_of, on->layers[1].unique() + on->layers[2].unique());
  EXPECT_GT(on->predicted_used, 0);
  EXPECT_LE(on->predicted_used, on->predicted_of);
  EXPECT_GT(on->recall(), 0.0);
  EXPECT_LE(on->recall(), 1.0);
  EXPECT_GE(on->records_read(), on->misses());
  // The same batches either way (pk routes by the layers' own routers on the same tokens).
  EXPECT_EQ(on->unique(), off->unique());
  o = stacked("zipf:1.09", 2);
  o.cross_layer = true;
  auto zipf = run_bench(o);
  ASSERT_TRUE(zipf.ok()) << zipf.status().to_string();
  EXPECT_EQ(zipf->predicted_of, 0);
}

TEST_F(BenchLayers, TwoLayersSumTheirFiguresAndCountEachTokenOnce) {
  const BenchOptions o = stacked("zipf:1.09", 2);
  auto r = run_bench(o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_EQ(r->layers.size(), 2u);
  EXPECT_EQ(r->layers[0].name, "bench");
  EXPECT_EQ(r->layers[1].name, "bench.1");
  // A token through both layers is one token; every selection of both layers is counted.
  EXPECT_EQ(r->tokens, o.batch * o.batches);
  EXPECT_DOUBLE_EQ(r->tokens_per_second, static_cast<double>(r->tokens) / r->seconds);
  EXPECT_EQ(r->requested(), 2 * o.batch * 2 * 4 * o.batches);
  int64_t requested = 0, unique = 0, hits = 0, misses = 0, slots = 0;
  uint64_t bytes_read = 0;
  for (const BenchLayerResult& l : r->layers) {
    SCOPED_TRACE(l.name);
    EXPECT_EQ(l.requested(), o.batch * 2 * 4 * o.batches);
    EXPECT_EQ(l.hits() + l.misses(), l.unique());
    EXPECT_DOUBLE_EQ(l.hit_rate, static_cast<double>(l.hits()) / static_cast<double>(l.unique()));
    EXPECT_EQ(l.host_budget_bytes, 400u * 1024);
    EXPECT_GE(l.oracle_hit_rate + 1e-12, l.achieved_hit_rate_all);
    requested += l.requested();
    unique += l.unique();
    hits += l.hits();
    misses += l.misses();
    bytes_read += l.bytes_read();
    slots += l.capacity_slots;
  }
  EXPECT_EQ(r->requested(), requested);
  EXPECT_EQ(r->unique(), unique);
  EXPECT_EQ(r->hits(), hits);
  EXPECT_EQ(r->misses(), misses);
  EXPECT_EQ(r->bytes_read(), bytes_read);
  EXPECT_EQ(r->capacity_slots, slots);
  EXPECT_DOUBLE_EQ(r->hit_rate, static_cast<double>(hits) / static_cast<double>(unique));
  // Every counter of the run is its layers' summed with += (added in another order: reals to
  // rounding); the latency histograms are the run's own.
  Metrics layers_sum;
  for (const BenchLayerResult& l : r->layers) layers_sum += l.metrics;
  nlohmann::json want = layers_sum.to_json(), got = r->metrics.to_json();
  ASSERT_TRUE(got.contains("latency"));
  got.erase("latency");
  const nlohmann::json want_flat = want.flatten(), got_flat = got.flatten();
  ASSERT_EQ(want_flat.size(), got_flat.size()) << got.dump();
  for (const auto& [key, value] : want_flat.items()) {
    SCOPED_TRACE(key);
    ASSERT_TRUE(got_flat.contains(key));
    const nlohmann::json& g = got_flat.at(key);
    if (value.is_number_float()) {
      EXPECT_NEAR(g.get<double>(), value.get<double>(), 1e-9 * (1 + value.get<double>()));
    } else {
      EXPECT_EQ(g, value);
    }
  }
  EXPECT_EQ(r->table_bytes, 2 * 48 * 48 * stride_);
  // Belady over the layers lies between theirs, and no policy beats it.
  EXPECT_GE(r->oracle_hit_rate,
            std::min(r->layers[0].oracle_hit_rate, r->layers[1].oracle_hit_rate) - 1e-12);
  EXPECT_LE(r->oracle_hit_rate,
            std::max(r->layers[0].oracle_hit_rate, r->layers[1].oracle_hit_rate) + 1e-12);
  EXPECT_GE(r->oracle_hit_rate + 1e-12, r->achieved_hit_rate_all);
  EXPECT_GT(r->resident_tokens_per_second, 0.0);
  EXPECT_TRUE(r->resident_skipped.empty());

  // Layer 0 is the one-layer run with its share of the budget; layer 1 draws its own stream.
  BenchOptions single = options("zipf:1.09");
  single.host_budget_bytes = 400 * 1024;
  auto one = run_bench(single);
  ASSERT_TRUE(one.ok()) << one.status().to_string();
  ASSERT_EQ(one->layers.size(), 1u);
  EXPECT_EQ(one->unique(), r->layers[0].unique());
  EXPECT_EQ(one->hits(), r->layers[0].hits());
  EXPECT_TRUE(r->layers[1].unique() != r->layers[0].unique() ||
              r->layers[1].hits() != r->layers[0].hits());
}

TEST_F(BenchLayers, ThreeLayersRunEveryWorkloadAndATraceRoutesEachLayerAlike) {
  auto store = StoreReader::open(store_);
  ASSERT_TRUE(store.ok());
  auto layer = PeerLayer::open(*store, "bench");
  ASSERT_TRUE(layer.ok());
  const std::string trace = dir_.file("r.safetensors");
  write_routing_dump(trace, *layer, 40);
  for (const std::string& w :
       std::vector<std::string>{"uniform", "zipf:1.2", "pk", "trace:" + trace}) {
    SCOPED_TRACE(w);
    const BenchOptions o = stacked(w, 3);
    auto r = run_bench(o);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    ASSERT_EQ(r->layers.size(), 3u);
    EXPECT_EQ(r->tokens, o.batch * o.batches);
    EXPECT_EQ(r->requested(), 3 * o.batch * 2 * 4 * o.batches);
    int64_t unique = 0;
    for (const BenchLayerResult& l : r->layers) unique += l.unique();
    EXPECT_EQ(r->unique(), unique);
    EXPECT_EQ(r->hits() + r->misses(), r->unique());
    EXPECT_GT(r->resident_tokens_per_second, 0.0);
    if (w.rfind("trace:", 0) == 0) {
      // The same trace for every layer: the same experts, so the same figures.
      EXPECT_EQ(r->layers[1].unique(), r->layers[0].unique());
      EXPECT_EQ(r->layers[2].hits(), r->layers[0].hits());
    }
  }
}

TEST_F(BenchLayers, PkRoutingOfALaterLayerReadsTheResidualStream) {
  BenchOptions o = stacked("pk", 2);
  o.batches = 1;
  o.warmup_batches = 0;
  o.host_budget_bytes = 2 * 48 * 48 * stride_;  // every record fits: hits do not matter here
  auto r = run_bench(o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();

  // The same batch by hand: the bench's pk tokens (gaussian, seeded per batch by the run's
  // seed), layer 0, then layer 1 on x + y and on x alone.
  auto store = StoreReader::open(store_);
  ASSERT_TRUE(store.ok());
  auto first = PeerLayer::open(*store, "bench");
  auto second = PeerLayer::open(*store, "bench.1");
  ASSERT_TRUE(first.ok() && second.ok());
  const int64_t T = o.batch;
  std::vector<float> x(static_cast<size_t>(T * 96)), y(x.size()), h(x.size()), y1(x.size());
  fill_gaussian(x, 1.0, splitmix64(o.seed * 1000003 + 0));
  ASSERT_TRUE(first->forward(x, T, y).ok());
  ASSERT_EQ(static_cast<int64_t>(first->last_experts().size()), r->layers[0].unique())
      << "the hand-made batch is not the bench's";
  for (size_t i = 0; i < x.size(); ++i) h[i] = x[i] + y[i];
  ASSERT_TRUE(second->forward(h, T, y1).ok());
  const std::vector<int64_t> through_stream(second->last_experts().begin(),
                                            second->last_experts().end());
  EXPECT_EQ(static_cast<int64_t>(through_stream.size()), r->layers[1].unique());
  ASSERT_TRUE(second->forward(x, T, y1).ok());
  const std::vector<int64_t> on_x(second->last_experts().begin(), second->last_experts().end());
  EXPECT_NE(through_stream, on_x) << "layer 1's routing does not depend on layer 0's output";
}

TEST_F(BenchLayers, BudgetsAreSplitOverTheLayersAndCheckedForEachBeforeAnyWork) {
  // One layer's batch (16 tokens x 8 selections) fits the whole budget but not half of it.
  BenchOptions o = stacked("uniform", 1);
  o.host_budget_bytes = 16 * 8 * stride_ * 3 / 2;
  o.resident_baseline = false;
  ASSERT_TRUE(run_bench(o).ok());
  o.layers = 2;
  int64_t progress_calls = 0;
  o.progress = [&](int64_t, int64_t) { ++progress_calls; };
  auto r = run_bench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kResourceExhausted) << r.status().to_string();
  const std::string& m = r.status().message();
  EXPECT_NE(m.find("layer bench (1 of 2"), std::string::npos) << m;
  EXPECT_NE(m.find(" = 2 x "), std::string::npos) << m;
  EXPECT_NE(m.find("raise --host"), std::string::npos) << m;
  EXPECT_EQ(progress_calls, 0);
}

TEST_F(BenchLayers, MoreLayersThanTheStoreHoldsOrFewerThanOneAreRefused) {
  BenchOptions o = stacked("uniform", 4);
  auto r = run_bench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(r.status().message().find(store_ + " holds 3 of the 4 bench layers"), std::string::npos)
      << r.status().to_string();
  EXPECT_NE(r.status().message().find("--layers 4"), std::string::npos) << r.status().to_string();
  for (int64_t bad : {0, -1}) {
    o.layers = bad;
    auto b = run_bench(o);
    ASSERT_FALSE(b.ok()) << bad;
    EXPECT_EQ(b.status().code(), Status::Code::kInvalidArgument) << b.status().to_string();
  }
}

TEST_F(BenchRun, AOneLayerStoreAskedForTwoLayersNamesTheStoreAndWhatToDo) {
  BenchOptions o = options("uniform");
  o.layers = 2;
  auto r = run_bench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(store_ + " holds 1 of the 2 bench layers asked for"),
            std::string::npos)
      << r.status().to_string();
  EXPECT_NE(r.status().message().find("write the store with at least 2 layers"), std::string::npos)
      << r.status().to_string();
}

TEST(BenchStack, LayersWhoseOutputIsNotTheirInputDoNotStack) {
  ScratchDir dir;
  const std::string path = dir.file("b.trove");
  ASSERT_TRUE(write_bench_store(path, bench_config(), DType::kI8, 1, nullptr, 2).ok());
  BenchOptions o;
  o.store = path;
  o.layers = 2;
  o.batch = 4;
  o.batches = 1;
  o.host_budget_bytes = 1 << 20;
  auto r = run_bench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("dim_out = dim"), std::string::npos)
      << r.status().to_string();
}

}  // namespace
}  // namespace trove
