// runtime/bench: workloads, the synthetic bench store, and the accounting of run_bench on
// small tables (every workload; Belady never below the policy; budgets refused before work).
#include "runtime/bench.h"

#include <cmath>
#include <set>

#include <gtest/gtest.h>

#include "runtime/peer_layer.h"
#include "runtime/store_layer.h"
#include "storage/safetensors.h"
#include "storage/store.h"
#include "tests/test_util.h"

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
  EXPECT_EQ(r.requested, per_batch * o.batches);
  EXPECT_EQ(r.hits + r.misses, r.unique);
  EXPECT_LE(r.unique, r.requested);
  EXPECT_GE(r.unique, o.batches);
  EXPECT_GE(r.hit_rate, 0.0);
  EXPECT_LE(r.hit_rate, 1.0);
  EXPECT_GT(r.tokens_per_second, 0.0);
  EXPECT_GT(r.resident_tokens_per_second, 0.0);
  EXPECT_GE(r.bytes_read, static_cast<uint64_t>(r.misses) * r.record_stride);
  EXPECT_LE(r.total.p50, r.total.p99);
  EXPECT_LE(r.route.p50, r.total.p99);
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
  const int64_t T = 40;
  std::vector<float> x(static_cast<size_t>(T * 96));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 13) - 6.0f;
  std::vector<float> y(static_cast<size_t>(T * 64));
  PeerRouting r;
  ASSERT_TRUE(layer->forward(x, T, y, &r).ok());
  const std::string trace = dir_.file("r.safetensors");
  auto bytes = [](const auto& v) {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()),
                                    v.size() * sizeof(v[0]));
  };
  ASSERT_TRUE(write_safetensors(trace,
                                {{"ids", StDType::kI64, {T, 2, 4}, bytes(r.ids), nullptr},
                                 {"gates", StDType::kF32, {T, 2, 4}, bytes(r.gates), nullptr}},
                                {})
                  .ok());
  for (const std::string& w :
       std::vector<std::string>{"uniform", "zipf:1.09", "pk", "trace:" + trace}) {
    SCOPED_TRACE(w);
    const BenchOptions o = options(w);
    auto res = run_bench(o);
    ASSERT_TRUE(res.ok()) << res.status().to_string();
    expect_consistent(*res, o);
  }
}

TEST_F(BenchRun, SkewedRoutingHitsMoreThanUniformAtTheSameBudget) {
  auto uniform = run_bench(options("uniform"));
  auto zipf = run_bench(options("zipf:1.2"));
  ASSERT_TRUE(uniform.ok() && zipf.ok());
  EXPECT_GT(zipf->hit_rate, uniform->hit_rate + 0.1)
      << "zipf " << zipf->hit_rate << " uniform " << uniform->hit_rate;
  EXPECT_LT(zipf->unique, uniform->unique);
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

}  // namespace
}  // namespace trove
