// The PEER layer over the tiered store (host tier over the store file): outputs equal the
// all-resident (mapped) layer's bit for bit at every budget from one batch's working set up,
// on both I/O engines and every policy; budgets too small are clear errors before any work;
// disk faults surface as documented errors or correct results, never a wrong output, and the
// store file is never touched.
#include "runtime/tiers/tiered_source.h"

#include <chrono>
#include <cstring>
#include <optional>
#include <random>

#include <gtest/gtest.h>

#include "runtime/bench/synthetic.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/lookahead.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/store_layer.h"
#include "storage/store.h"
#include "storage/store_update.h"
#include "tests/fault_injection.h"
#include "tests/runtime_test_util.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using testing::ScratchDir;
using Engine = RecordReaderOptions::Engine;

constexpr int64_t kTokens = 16;  // per batch
constexpr int64_t kBatches = 12;

// One batch's working set can be every selection: T * h * k.
constexpr int64_t kWorkingSet = kTokens * 3 * 4;

std::string make_store(const ScratchDir& dir, DType dtype) {
  return testing::pack_synthetic_store(dir, testing::small_tier_config(), dtype, 0.5f);
}

// Batches of gaussian tokens, with every other batch repeating an earlier one (so later
// batches hit what earlier ones loaded).
std::vector<std::vector<float>> batches(uint32_t seed) {
  return testing::repeating_batches(seed, kBatches, kTokens, testing::small_tier_config().dim);
}

std::vector<std::vector<float>> run(PeerLayer& layer, const std::vector<std::vector<float>>& xs,
                                    std::vector<PeerBatchStats>* stats = nullptr) {
  std::vector<std::vector<float>> ys;
  for (const auto& x : xs) {
    std::vector<float> y(static_cast<size_t>(kTokens * layer.config().dim_out));
    PeerBatchStats st;
    const Status s = layer.forward(x, kTokens, y, nullptr, &st);
    EXPECT_TRUE(s.ok()) << s.to_string();
    ys.push_back(std::move(y));
    if (stats != nullptr) stats->push_back(st);
  }
  return ys;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

PeerLayerOptions tiered(uint64_t budget_slots, size_t stride, Engine engine = Engine::kPread,
                        EvictionPolicy policy = EvictionPolicy::kFrequency,
                        std::shared_ptr<FileOps> ops = nullptr) {
  PeerLayerOptions o;
  o.threads = 2;
  TieredSourceOptions t;
  t.host_budget_bytes = budget_slots * stride;
  t.policy = policy;
  t.io.engine = engine;
  t.io.queue_depth = 8;
  t.io.pread_threads = 3;
  t.io.file_ops = std::move(ops);
  o.tiers = t;
  return o;
}

bool io_uring_refused(const Result<PeerLayer>& layer) {
  return !layer.ok() && layer.status().code() == Status::Code::kNotSupported;
}

TEST(TieredSource, OutputsEqualTheResidentLayerBitForBitAtEveryBudget) {
  ScratchDir dir;
  for (DType dtype : {DType::kI4, DType::kI8, DType::kBF16}) {
    auto store = StoreReader::open(make_store(dir, dtype));
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    PeerLayerOptions resident_options;
    resident_options.threads = 2;
    auto resident = PeerLayer::open(*store, "blk.0.peer", resident_options);
    ASSERT_TRUE(resident.ok()) << resident.status().to_string();
    const auto xs = batches(5);
    const auto want = run(*resident, xs);
    const size_t stride = resident->record_layout().stride;
    const int64_t n = resident->config().num_experts();
    for (Engine engine : {Engine::kPread, Engine::kIoUring}) {
      for (EvictionPolicy policy :
           {EvictionPolicy::kLru, EvictionPolicy::kClock, EvictionPolicy::kFrequency}) {
        for (int64_t slots : {kWorkingSet, kWorkingSet + 7, 2 * kWorkingSet, n / 2, n}) {
          SCOPED_TRACE(std::string(dtype_name(dtype)) + " " +
                       (engine == Engine::kPread ? "pread" : "io_uring") + " " +
                       eviction_policy_name(policy) + " " + std::to_string(slots) + " slots");
          auto layer = PeerLayer::open(*store, "blk.0.peer", tiered(slots, stride, engine, policy));
          if (engine == Engine::kIoUring && io_uring_refused(layer)) continue;
          ASSERT_TRUE(layer.ok()) << layer.status().to_string();
          std::vector<PeerBatchStats> stats;
          const auto got = run(*layer, xs, &stats);
          ASSERT_EQ(got.size(), want.size());
          for (size_t b = 0; b < got.size(); ++b) {
            EXPECT_TRUE(same_bits(got[b], want[b])) << "batch " << b;
            const ExpertFetchStats& f = stats[b].fetch;
            EXPECT_EQ(f.hits + f.misses, stats[b].unique_experts) << "batch " << b;
          }
          // The first batch starts cold; a repeated batch finds what it needs when the tier
          // can hold both it and its predecessor.
          EXPECT_EQ(stats[0].fetch.hits, 0);
          EXPECT_EQ(stats[0].fetch.misses, stats[0].unique_experts);
          if (slots >= n) {
            EXPECT_EQ(stats[1].fetch.misses, 0);
          }
        }
      }
    }
  }
}

TEST(TieredSource, AllHitBatchReadsNothingAndReportsNoStall) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok());
  auto layer = PeerLayer::open(*store, "blk.0.peer", tiered(1000, 4096));
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  const auto xs = batches(9);
  std::vector<PeerBatchStats> stats;
  run(*layer, {xs[0], xs[0]}, &stats);
  EXPECT_GT(stats[0].fetch.misses, 0);
  EXPECT_GT(stats[0].fetch.bytes_read, 0u);
  EXPECT_EQ(stats[1].fetch.misses, 0);
  EXPECT_EQ(stats[1].fetch.hits, stats[1].unique_experts);
  EXPECT_EQ(stats[1].fetch.bytes_read, 0u);
  auto* source = dynamic_cast<TieredExpertSource*>(&layer->experts());
  ASSERT_NE(source, nullptr);
  const CacheMetrics m = source->host().metrics();
  EXPECT_EQ(m.hits, stats[1].unique_experts);
  EXPECT_EQ(m.misses, stats[0].unique_experts);
  EXPECT_EQ(m.leased_slots, 0);  // every batch released its experts
}

TEST(TieredSource, BudgetBelowOneBatchIsAClearErrorBeforeAnyWork) {
  ScratchDir dir;
  const std::string path = make_store(dir, DType::kI4);
  auto store = StoreReader::open(path);
  ASSERT_TRUE(store.ok());
  const std::vector<uint8_t> before = testing::read_all(path);
  auto probe = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(probe.ok());
  const size_t stride = probe->record_layout().stride;
  auto layer = PeerLayer::open(*store, "blk.0.peer", tiered(kWorkingSet - 1, stride));
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  auto* source = dynamic_cast<TieredExpertSource*>(&layer->experts());
  ASSERT_NE(source, nullptr);
  const Status s = source->check_batch(kWorkingSet, "16 tokens x 12 selections");
  EXPECT_EQ(s.code(), Status::Code::kResourceExhausted);
  EXPECT_NE(s.message().find("raise --host"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("16 tokens x 12 selections"), std::string::npos) << s.to_string();
  EXPECT_TRUE(source->check_batch(kWorkingSet - 1, "a smaller batch").ok());

  // A budget below one record cannot make a tier at all.
  auto none = PeerLayer::open(*store, "blk.0.peer", tiered(0, stride));
  EXPECT_FALSE(none.ok());

  // A batch that selects more distinct experts than the tier holds fails as a whole, leaves
  // the tier usable, and the next batch that fits is still exact.
  const auto xs = batches(11);
  std::vector<float> y(static_cast<size_t>(kTokens * layer->config().dim_out));
  std::vector<float> big(xs[0]);
  big.insert(big.end(), xs[2].begin(), xs[2].end());
  std::vector<float> ybig(2 * y.size());
  const Status too_big = layer->forward(big, 2 * kTokens, ybig);
  EXPECT_EQ(too_big.code(), Status::Code::kResourceExhausted) << too_big.to_string();
  std::vector<float> y_small(static_cast<size_t>(layer->config().dim_out));
  std::vector<float> y_want(y_small.size());
  const std::vector<float> one(xs[0].begin(), xs[0].begin() + layer->config().dim);
  ASSERT_TRUE(layer->forward(one, 1, y_small).ok());
  ASSERT_TRUE(probe->forward(one, 1, y_want).ok());
  EXPECT_TRUE(same_bits(y_small, y_want));
  EXPECT_EQ(testing::read_all(path), before);
}

TEST(TieredSource, EmptyBatchOneHotExpertAndBackwardMatchTheResidentLayer) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok());
  PeerLayerOptions resident_options;
  resident_options.threads = 2;
  auto resident = PeerLayer::open(*store, "blk.0.peer", resident_options);
  ASSERT_TRUE(resident.ok()) << resident.status().to_string();
  const size_t stride = resident->record_layout().stride;
  auto layer = PeerLayer::open(*store, "blk.0.peer", tiered(kWorkingSet, stride));
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  const PeerConfig& c = layer->config();

  // T = 0: nothing to lease, nothing read, nothing left leased.
  std::vector<float> none;
  PeerBatchStats empty;
  ASSERT_TRUE(layer->forward(none, 0, none, nullptr, &empty).ok());
  EXPECT_EQ(empty.unique_experts, 0);
  EXPECT_EQ(empty.fetch.misses, 0);

  // Every selection of every token is one expert (duplicates within a head too), then every
  // other slot is a second one: one or two unique experts, each read once.
  const auto xs = batches(17);
  PeerRouting r;
  r.resize(kTokens, c.heads, c.topk);
  for (size_t s = 0; s < r.ids.size(); ++s) {
    r.ids[s] = 7;
    r.gates[s] = 0.25f + 0.01f * static_cast<float>(s % 5);
  }
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1) {
      for (size_t s = 0; s < r.ids.size(); s += 2) r.ids[s] = c.num_experts() - 1;
    }
    std::vector<float> want(static_cast<size_t>(kTokens * c.dim_out));
    std::vector<float> got(want.size());
    PeerBatchStats st;
    ASSERT_TRUE(resident->forward_routed(xs[0], kTokens, r, want).ok());
    ASSERT_TRUE(layer->forward_routed(xs[0], kTokens, r, got, &st).ok());
    EXPECT_TRUE(same_bits(got, want)) << "pass " << pass;
    EXPECT_EQ(st.unique_experts, pass + 1);
    // Pass 0 reads expert 7; pass 1 finds it resident and reads only the new one.
    EXPECT_EQ(st.fetch.misses, 1) << "pass " << pass;
  }

  // Backward leases through the same source (acquire = both halves at once).
  std::vector<float> dy(static_cast<size_t>(kTokens * c.dim_out));
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = static_cast<float>(i % 7) - 3.0f;
  PeerGrads want, got;
  ASSERT_TRUE(resident->backward(xs[2], kTokens, dy, &want).ok());
  ASSERT_TRUE(layer->backward(xs[2], kTokens, dy, &got).ok());
  EXPECT_EQ(got.expert_ids, want.expert_ids);
  EXPECT_TRUE(same_bits(got.dx, want.dx));
  EXPECT_TRUE(same_bits(got.d_down, want.d_down));
  EXPECT_TRUE(same_bits(got.d_up, want.d_up));

  auto* source = dynamic_cast<TieredExpertSource*>(&layer->experts());
  ASSERT_NE(source, nullptr);
  EXPECT_EQ(source->host().metrics().leased_slots, 0);
}

// Runs the batches over a faulty disk and checks each against the resident layer: a batch
// either matches it to the bit or fails with an error (never a wrong output).
struct FaultRun {
  int ok = 0, failed = 0;
  std::vector<Status> errors;
};

FaultRun run_with_faults(const StoreReader& store, const std::shared_ptr<FileOps>& ops,
                         Engine engine, int64_t slots) {
  FaultRun out;
  auto resident = PeerLayer::open(store, "blk.0.peer");
  EXPECT_TRUE(resident.ok());
  auto layer = PeerLayer::open(
      store, "blk.0.peer",
      tiered(slots, resident->record_layout().stride, engine, EvictionPolicy::kLru, ops));
  if (engine == Engine::kIoUring && io_uring_refused(layer)) return out;
  EXPECT_TRUE(layer.ok()) << layer.status().to_string();
  for (const auto& x : batches(13)) {
    std::vector<float> want(static_cast<size_t>(kTokens * resident->config().dim_out));
    std::vector<float> got(want.size(), 12345.0f);
    EXPECT_TRUE(resident->forward(x, kTokens, want).ok());
    const Status s = layer->forward(x, kTokens, got);
    if (s.ok()) {
      ++out.ok;
      EXPECT_TRUE(same_bits(got, want));
    } else {
      ++out.failed;
      out.errors.push_back(s);
    }
  }
  return out;
}

class TieredFaults : public ::testing::TestWithParam<Engine> {};

TEST_P(TieredFaults, EioNamesTheFileExpertAndOffsetAndLaterBatchesStayExact) {
  ScratchDir dir;
  const std::string path = make_store(dir, DType::kI4);
  auto store = StoreReader::open(path);
  ASSERT_TRUE(store.ok());
  const std::vector<uint8_t> before = testing::read_all(path);
  auto faults = std::make_shared<FaultyFileOps>();
  faults->fail_nth_read(5);
  const FaultRun r = run_with_faults(*store, faults, GetParam(), kWorkingSet);
  if (r.ok + r.failed == 0) GTEST_SKIP() << "io_uring refused by this kernel";
  ASSERT_EQ(r.failed, 1);
  EXPECT_EQ(r.ok, kBatches - 1);
  const Status& e = r.errors[0];
  EXPECT_EQ(e.code(), Status::Code::kIOError) << e.to_string();
  EXPECT_NE(e.message().find(path), std::string::npos) << e.to_string();
  EXPECT_NE(e.message().find("expert"), std::string::npos) << e.to_string();
  EXPECT_NE(e.message().find("offset"), std::string::npos) << e.to_string();
  EXPECT_EQ(testing::read_all(path), before);
}

TEST_P(TieredFaults, FlippedByteOnDiskIsCorruptionAndNeverReachesAnOutput) {
  ScratchDir dir;
  const std::string path = make_store(dir, DType::kI4);
  auto store = StoreReader::open(path);
  ASSERT_TRUE(store.ok());
  const std::vector<uint8_t> before = testing::read_all(path);
  const StoreLayerInfo* info = store->find_layer("blk.0.peer");
  ASSERT_NE(info, nullptr);
  auto faults = std::make_shared<FaultyFileOps>();
  // A byte in the middle of every record: whichever the batches need, the first read fails.
  for (uint64_t e = 0; e < info->table.count; ++e) {
    faults->flip_byte(info->table.offset + e * info->table.stride + 17);
  }
  const FaultRun r = run_with_faults(*store, faults, GetParam(), 2 * kWorkingSet);
  if (r.ok + r.failed == 0) GTEST_SKIP() << "io_uring refused by this kernel";
  EXPECT_EQ(r.ok, 0);
  ASSERT_EQ(r.failed, kBatches);
  for (const Status& e : r.errors) {
    EXPECT_EQ(e.code(), Status::Code::kCorruption) << e.to_string();
    EXPECT_NE(e.message().find("checksum"), std::string::npos) << e.to_string();
  }
  EXPECT_EQ(testing::read_all(path), before);
}

TEST_P(TieredFaults, ShortReadsEagainAndASlowDiskGiveExactOutputs) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI8));
  ASSERT_TRUE(store.ok());
  auto faults = std::make_shared<FaultyFileOps>();
  faults->short_read_every(3);
  faults->eagain_every(4);
  faults->delay_each_read(std::chrono::microseconds(200));
  const FaultRun r = run_with_faults(*store, faults, GetParam(), kWorkingSet + 20);
  if (r.ok + r.failed == 0) GTEST_SKIP() << "io_uring refused by this kernel";
  EXPECT_EQ(r.failed, 0) << (r.errors.empty() ? "" : r.errors[0].to_string());
  EXPECT_EQ(r.ok, kBatches);
  EXPECT_GT(faults->faults_injected(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Engines, TieredFaults, ::testing::Values(Engine::kPread, Engine::kIoUring),
                         [](const ::testing::TestParamInfo<Engine>& p) {
                           return std::string(p.param == Engine::kPread ? "Pread" : "IoUring");
                         });

// ---- look-ahead (prefetch) ---------------------------------------------------------------------

// forward_with_lookahead over the batches at `depth`: the outputs, and each batch's stats.
std::vector<std::vector<float>> run_ahead(PeerLayer& layer,
                                          const std::vector<std::vector<float>>& xs, int depth,
                                          std::vector<PeerBatchStats>* stats) {
  std::vector<std::vector<float>> ys(xs.size());
  const Status s = forward_with_lookahead(
      layer, static_cast<int64_t>(xs.size()), depth,
      [&](int64_t b, std::vector<float>* x, int64_t* n) {
        *x = xs[static_cast<size_t>(b)];
        *n = kTokens;
        return Status::ok_status();
      },
      [&](int64_t b, std::span<const float> y, const PeerRouting&, const PeerBatchStats& st) {
        ys[static_cast<size_t>(b)].assign(y.begin(), y.end());
        stats->push_back(st);
        return Status::ok_status();
      });
  EXPECT_TRUE(s.ok()) << s.to_string();
  return ys;
}

// Look-ahead at every depth and budget, from one batch's working set (no room to prefetch
// beside the batch computing: it prefetches less) to the whole table, on both engines: outputs
// equal the resident layer's to the bit, every lease ends, and where the table fits every record
// is read ahead of its batch.
TEST(TieredSource, LookaheadOutputsEqualTheResidentLayerAtEveryDepthAndBudget) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  PeerLayerOptions resident_options;
  resident_options.threads = 2;
  auto resident = PeerLayer::open(*store, "blk.0.peer", resident_options);
  ASSERT_TRUE(resident.ok()) << resident.status().to_string();
  const auto xs = batches(7);
  const auto want = run(*resident, xs);
  const size_t stride = resident->record_layout().stride;
  const int64_t n = resident->config().num_experts();
  for (Engine engine : {Engine::kPread, Engine::kIoUring}) {
    for (int64_t slots : {kWorkingSet, kWorkingSet + 7, 2 * kWorkingSet, n}) {
      for (int depth : {0, 1, 2, 5}) {
        SCOPED_TRACE(std::string(engine == Engine::kPread ? "pread " : "io_uring ") +
                     std::to_string(slots) + " slots, depth " + std::to_string(depth));
        auto layer = PeerLayer::open(*store, "blk.0.peer", tiered(slots, stride, engine));
        if (engine == Engine::kIoUring && io_uring_refused(layer)) continue;
        ASSERT_TRUE(layer.ok()) << layer.status().to_string();
        std::vector<PeerBatchStats> stats;
        const auto got = run_ahead(*layer, xs, depth, &stats);
        ASSERT_EQ(got.size(), want.size());
        int64_t misses = 0, prefetched = 0;
        for (size_t b = 0; b < got.size(); ++b) {
          EXPECT_TRUE(same_bits(got[b], want[b])) << "batch " << b;
          const ExpertFetchStats& f = stats[b].fetch;
          EXPECT_EQ(f.hits + f.misses, stats[b].unique_experts) << "batch " << b;
          EXPECT_LE(f.prefetched, f.hits) << "batch " << b;
          misses += f.misses;
          prefetched += f.prefetched;
        }
        auto* source = dynamic_cast<TieredExpertSource*>(&layer->experts());
        ASSERT_NE(source, nullptr);
        const CacheMetrics m = source->host().metrics();
        EXPECT_EQ(m.leased_slots, 0);
        EXPECT_LE(m.peak_leased_slots, m.capacity_slots);
        EXPECT_EQ(source->pending_prefetches(), 0);
        const PrefetchStats p = source->prefetch_stats();
        if (depth == 0) {
          EXPECT_EQ(p.prefetches, 0);
          EXPECT_EQ(prefetched, 0);
        } else {
          EXPECT_EQ(p.prefetches, kBatches);
          EXPECT_EQ(p.read_errors, 0);
        }
        if (depth > 0 && slots == n) {
          // Nothing is ever evicted: each record is read once, by a prefetch.
          EXPECT_EQ(misses, 0);
          EXPECT_EQ(prefetched, m.fills_committed);
          EXPECT_EQ(p.skipped, 0);
        }
      }
    }
  }
}

// The source's prefetch() alone: what it reads is the store's bytes; a prefetch that does not fit
// takes less; one holding the room a batch needs gives it back; ids another prefetch is reading
// are left out (no deadlock); a failed prefetch read is the batch's to report.
class TieredPrefetch : public ::testing::Test {
 protected:
  void open(int64_t slots, std::shared_ptr<FileOps> ops = nullptr, int landing_groups = 1) {
    store_path_ = make_store(dir_, DType::kI8);
    auto store = StoreReader::open(store_path_);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    store_.emplace(std::move(*store));
    auto stored = load_stored_layer(*store_, "blk.0.peer");
    ASSERT_TRUE(stored.ok()) << stored.status().to_string();
    stored_.emplace(std::move(*stored));
    TieredSourceOptions t;
    t.host_budget_bytes = static_cast<uint64_t>(slots) * stored_->record.stride;
    t.policy = EvictionPolicy::kLru;
    t.io.engine = Engine::kPread;
    t.io.pread_threads = 2;
    t.io.file_ops = std::move(ops);
    t.landing_groups = landing_groups;
    auto source = TieredExpertSource::open(*store_, *stored_->info, stored_->record, t);
    ASSERT_TRUE(source.ok()) << source.status().to_string();
    source_ = std::move(*source);
  }
  // acquire(ids): OK with every record equal to the store's, then release.
  Status acquire_and_check(const std::vector<int64_t>& ids) {
    std::vector<const uint8_t*> records(ids.size());
    Status s = source_->acquire(ids, records);
    if (!s.ok()) return s;
    const std::span<const uint8_t> table = store_->mapped_records(*stored_->info);
    const size_t stride = stored_->record.stride;
    for (size_t i = 0; i < ids.size(); ++i) {
      EXPECT_EQ(std::memcmp(records[i], table.data() + static_cast<size_t>(ids[i]) * stride,
                            stored_->record.record_bytes),
                0)
          << "expert " << ids[i];
    }
    source_->release(ids);
    return s;
  }
  static std::vector<int64_t> range(int64_t first, int64_t last) {
    std::vector<int64_t> v;
    for (int64_t i = first; i < last; ++i) v.push_back(i);
    return v;
  }

  ScratchDir dir_;
  std::string store_path_;
  std::optional<StoreReader> store_;
  std::optional<StoredLayer> stored_;
  std::unique_ptr<TieredExpertSource> source_;
};

TEST_F(TieredPrefetch, ReadsAheadTakesLessWithoutRoomAndGivesRoomBack) {
  ASSERT_NO_FATAL_FAILURE(open(10));
  source_->prefetch(range(0, 6));
  source_->prefetch(range(6, 14));  // 8 more do not fit beside 6: half of them do
  EXPECT_EQ(source_->host().metrics().leased_slots, 10);
  EXPECT_EQ(source_->prefetch_stats().records_read, 10);
  ASSERT_TRUE(acquire_and_check(range(0, 6)).ok());
  EXPECT_EQ(source_->last_fetch().misses, 0);
  EXPECT_EQ(source_->last_fetch().prefetched, 6);
  EXPECT_EQ(source_->last_fetch().hits, 6);
  // The next batch is not what was predicted for it: what was read stays resident, the rest is
  // read by the batch itself.
  ASSERT_TRUE(acquire_and_check(range(8, 18)).ok());
  EXPECT_EQ(source_->last_fetch().prefetched, 2);  // 8 and 9 (of 6..9)
  EXPECT_EQ(source_->last_fetch().hits, 2);
  EXPECT_EQ(source_->last_fetch().misses, 8);
  // A prefetch holds 5 slots; a batch of all 10 that was not prefetched still runs.
  source_->prefetch(range(20, 25));
  source_->prefetch(range(30, 35));
  ASSERT_TRUE(acquire_and_check(range(20, 25)).ok());  // consumes the first
  ASSERT_TRUE(acquire_and_check(range(40, 50)).ok());  // consumes the second: it ends first
  source_->prefetch(range(50, 55));
  source_->prefetch(range(60, 65));
  ASSERT_TRUE(acquire_and_check(range(70, 80)).ok());  // the pending 60..64 gives its room back
  EXPECT_EQ(source_->prefetch_stats().dropped, 1);
  EXPECT_EQ(source_->pending_prefetches(), 1);  // kept, empty, for the next batch
  ASSERT_TRUE(acquire_and_check(range(60, 65)).ok());
  EXPECT_EQ(source_->last_fetch().prefetched, 0);
  EXPECT_EQ(source_->host().metrics().leased_slots, 0);
  EXPECT_EQ(source_->prefetch_stats().read_errors, 0);
}

TEST_F(TieredPrefetch, IdsBeingReadAreWaitedForAndNothingDeadlocks) {
  auto faults = std::make_shared<FaultyFileOps>();
  faults->delay_each_read(std::chrono::milliseconds(20));  // reads still in flight below
  ASSERT_NO_FATAL_FAILURE(open(40, faults));
  source_->prefetch(range(0, 6));
  source_->prefetch(range(3, 9));  // 3, 4, 5 are being read by the first: it lands first
  EXPECT_EQ(source_->prefetch_stats().waits, 1);
  EXPECT_EQ(source_->prefetch_stats().records_read, 9);
  ASSERT_TRUE(acquire_and_check(range(0, 6)).ok());
  EXPECT_EQ(source_->last_fetch().prefetched, 6);
  EXPECT_GT(source_->last_fetch().prefetch_wait_seconds, 0.0);  // the wait in prefetch()
  ASSERT_TRUE(acquire_and_check(range(3, 9)).ok());
  EXPECT_EQ(source_->last_fetch().misses, 0);
  EXPECT_EQ(source_->last_fetch().prefetched, 3);
  // A batch that needs what a pending prefetch is still reading waits for it, not forever.
  source_->prefetch(range(10, 14));
  source_->prefetch(range(20, 24));
  ASSERT_TRUE(acquire_and_check(range(18, 24)).ok());  // consumes 10..13, needs 20..23
  EXPECT_EQ(source_->last_fetch().misses, 2);          // 18, 19
  ASSERT_TRUE(acquire_and_check(range(20, 24)).ok());
  EXPECT_EQ(source_->last_fetch().misses, 0);
  EXPECT_EQ(source_->host().metrics().leased_slots, 0);
}

TEST_F(TieredPrefetch, AFailedPrefetchReadIsTheBatchsToReportAndLeavesNothingLeased) {
  auto faults = std::make_shared<FaultyFileOps>();
  ASSERT_NO_FATAL_FAILURE(open(40, faults));
  const StoreLayerInfo& info = *stored_->info;
  // A bad sector under expert 4: the prefetch fails, and the batch's own read too (the error
  // names the first record whose read covers it: O_DIRECT reads aligned extents).
  faults->fail_offset(info.table.offset + 4 * info.table.stride + 1);
  source_->prefetch(range(0, 8));
  const Status s = acquire_and_check(range(0, 8));
  EXPECT_EQ(s.code(), Status::Code::kIOError) << s.to_string();
  EXPECT_NE(s.message().find(": expert "), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find(store_path_), std::string::npos) << s.to_string();
  EXPECT_EQ(source_->prefetch_stats().read_errors, 1);
  EXPECT_EQ(source_->host().metrics().leased_slots, 0);
  // A transient failure: the prefetch fails, the batch reads again and gets the right bytes.
  faults->fail_nth_read(faults->reads_seen() + 1);
  source_->prefetch(range(10, 16));
  ASSERT_TRUE(acquire_and_check(range(10, 16)).ok());
  EXPECT_EQ(source_->prefetch_stats().read_errors, 2);
  EXPECT_EQ(source_->host().metrics().leased_slots, 0);
  // Dropped prefetches leave nothing leased, and the source can be destroyed with some pending.
  source_->prefetch(range(20, 30));
  source_->drop_prefetches();
  EXPECT_EQ(source_->host().metrics().leased_slots, 0);
  source_->prefetch(range(30, 35));
  source_->prefetch(range(35, 40));
  source_.reset();
}

// refresh(): after the store is updated in place, resident copies of the changed records take
// the new bytes with no disk read, others are read through the new generation's checksums,
// and unchanged residents stay hits; a layer of another geometry is refused.
// Landing groups: begin_acquire reads a batch's misses in groups (id order, two in flight);
// wait_landed hands out each group once it lands, every miss exactly once and only with its
// store bytes, then nothing; finish_acquire ends the batch as one. Hits are there from the start.
TEST_F(TieredPrefetch, LandingGroupsHandOutEachMissOnceInIdOrder) {
  for (int groups : {2, 3, 7}) {
    SCOPED_TRACE(std::to_string(groups) + " groups");
    ASSERT_NO_FATAL_FAILURE(open(64, nullptr, groups));
    ASSERT_TRUE(acquire_and_check(range(0, 5)).ok());  // hits for the batch below
    const std::vector<int64_t> ids = range(0, 20);     // 5 hits, 15 misses
    std::vector<const uint8_t*> records(ids.size());
    ASSERT_TRUE(source_->begin_acquire(ids, records).ok());
    for (size_t i = 0; i < ids.size(); ++i) {
      EXPECT_EQ(records[i] != nullptr, i < 5) << "expert " << ids[i];
    }
    const std::span<const uint8_t> table = store_->mapped_records(*stored_->info);
    const size_t stride = stored_->record.stride;
    std::vector<uint32_t> landed;
    int calls = 0;
    for (;;) {
      const size_t before = landed.size();
      ASSERT_TRUE(source_->wait_landed(ids, records, &landed).ok());
      if (landed.size() == before) break;
      ++calls;
      for (size_t k = before; k < landed.size(); ++k) {
        const uint32_t i = landed[k];
        ASSERT_NE(records[i], nullptr);
        EXPECT_EQ(std::memcmp(records[i], table.data() + static_cast<size_t>(ids[i]) * stride,
                              stored_->record.record_bytes),
                  0)
            << "expert " << ids[i];
      }
    }
    EXPECT_EQ(calls, std::min(groups, 15));
    std::vector<uint32_t> want;
    for (uint32_t i = 5; i < 20; ++i) want.push_back(i);
    EXPECT_EQ(landed, want) << "each miss once, in id order";
    ASSERT_TRUE(source_->finish_acquire(ids, records).ok());
    EXPECT_EQ(source_->last_fetch().misses, 15);
    source_->release(ids);
    EXPECT_EQ(source_->host().metrics().leased_slots, 0);
    // Later batches find them resident.
    ASSERT_TRUE(acquire_and_check(ids).ok());
    EXPECT_EQ(source_->last_fetch().misses, 0);
  }
}

// A read that fails in a landing group (the 9th, while two groups are in flight) is the error of
// wait_landed or finish_acquire, naming the expert, and leaves nothing acquired or leased; the
// same batch then reads whole.
TEST_F(TieredPrefetch, ALandingGroupThatFailsEndsTheBatchWithNothingLeased) {
  auto faults = std::make_shared<FaultyFileOps>();
  ASSERT_NO_FATAL_FAILURE(open(64, faults, 3));
  faults->fail_nth_read(9);
  const std::vector<int64_t> ids = range(0, 18);  // groups [0, 6), [6, 12), [12, 18)
  std::vector<const uint8_t*> records(ids.size());
  ASSERT_TRUE(source_->begin_acquire(ids, records).ok());
  std::vector<uint32_t> landed;
  Status s;
  for (;;) {
    const size_t before = landed.size();
    s = source_->wait_landed(ids, records, &landed);
    if (!s.ok() || landed.size() == before) break;
  }
  if (s.ok()) s = source_->finish_acquire(ids, records);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Status::Code::kIOError) << s.to_string();
  EXPECT_NE(s.message().find("expert "), std::string::npos) << s.to_string();
  EXPECT_LT(landed.size(), ids.size());
  EXPECT_EQ(source_->host().metrics().leased_slots, 0);
  ASSERT_TRUE(acquire_and_check(ids).ok());
  EXPECT_EQ(source_->host().metrics().leased_slots, 0);
}

// The layer over a source reading in landing groups (the cpu executor waits for all of them in
// finish_acquire) gives the resident layer's bits.
TEST(TieredSource, LandingGroupsGiveTheResidentLayersBits) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto resident = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(resident.ok()) << resident.status().to_string();
  const auto xs = batches(41);
  const auto want = run(*resident, xs);
  const size_t stride = resident->record_layout().stride;
  for (Engine engine : {Engine::kPread, Engine::kIoUring}) {
    for (int groups : {2, 5}) {
      for (int depth : {0, 2}) {
        SCOPED_TRACE(std::string(engine == Engine::kPread ? "pread, " : "io_uring, ") +
                     std::to_string(groups) + " groups, look-ahead " + std::to_string(depth));
        PeerLayerOptions o = tiered(kWorkingSet + 7, stride, engine);
        o.tiers->landing_groups = groups;
        auto layer = PeerLayer::open(*store, "blk.0.peer", o);
        if (engine == Engine::kIoUring && io_uring_refused(layer)) continue;
        ASSERT_TRUE(layer.ok()) << layer.status().to_string();
        std::vector<PeerBatchStats> stats;
        const auto got =
            depth == 0 ? run(*layer, xs, &stats) : run_ahead(*layer, xs, depth, &stats);
        int64_t misses = 0;
        for (size_t b = 0; b < got.size(); ++b) {
          EXPECT_TRUE(same_bits(got[b], want[b])) << "batch " << b;
          misses += stats[b].fetch.misses;
        }
        if (depth == 0) {
          EXPECT_GT(misses, 0);
        }
        auto* source = dynamic_cast<TieredExpertSource*>(&layer->experts());
        ASSERT_NE(source, nullptr);
        EXPECT_EQ(source->host().metrics().leased_slots, 0);
        EXPECT_EQ(source->pending_prefetches(), 0);
      }
    }
  }
  PeerLayerOptions bad = tiered(kWorkingSet, stride);
  bad.tiers->landing_groups = 0;
  auto refused = PeerLayer::open(*store, "blk.0.peer", bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("landing groups must be at least 1, got 0"),
            std::string::npos)
      << refused.status().to_string();
}

TEST(TieredSource, RefreshKeepsTheTierWarmAcrossAnInPlaceGeneration) {
  ScratchDir dir;
  const std::string path = make_store(dir, DType::kI8);
  // As the trainer does: its own readers stay open across its commits, unpinned (a pin would
  // make the commit refuse to wait for its own process).
  StoreOpenOptions own;
  own.pin_generation = false;
  auto store = StoreReader::open(path, own);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const StoreLayerInfo& info = *store->find_layer("blk.0.peer");
  auto stored = load_stored_layer(*store, "blk.0.peer");
  ASSERT_TRUE(stored.ok());
  const size_t stride = info.table.stride;
  TieredSourceOptions t;
  t.host_budget_bytes = 8 * stride;
  t.io.engine = Engine::kPread;
  auto source = TieredExpertSource::open(*store, info, stored->record, t);
  ASSERT_TRUE(source.ok()) << source.status().to_string();
  TieredExpertSource& tier = **source;

  const std::vector<int64_t> resident = {1, 4, 9};
  std::vector<const uint8_t*> recs(resident.size());
  ASSERT_TRUE(tier.acquire(resident, recs).ok());
  tier.release(resident);

  // Generation 2: new bytes for expert 4 (resident) and 20 (not).
  std::vector<uint8_t> four(stride, 0x44), twenty(stride, 0x20);
  {
    auto u = StoreUpdate::begin(path);
    ASSERT_TRUE(u.ok()) << u.status().to_string();
    std::vector<uint8_t> both(four);
    both.insert(both.end(), twenty.begin(), twenty.end());
    const std::vector<int64_t> ids = {4, 20};
    ASSERT_TRUE(u->put_records("blk.0.peer", ids, both).ok());
    ASSERT_TRUE(u->commit().ok());
  }
  auto next = StoreReader::open(path, own);
  ASSERT_TRUE(next.ok()) << next.status().to_string();
  const StoreLayerInfo& next_info = *next->find_layer("blk.0.peer");
  const std::vector<int64_t> changed = {4, 20};
  ASSERT_TRUE(tier.refresh(*next, next_info, changed,
                           [&](int64_t id) { return id == 4 ? four.data() : twenty.data(); })
                  .ok());

  ASSERT_TRUE(tier.acquire(resident, recs).ok());
  EXPECT_EQ(tier.last_fetch().misses, 0);  // still warm
  EXPECT_EQ(std::memcmp(recs[1], four.data(), stride), 0);
  tier.release(resident);
  const std::vector<int64_t> cold = {20};
  std::vector<const uint8_t*> one(1);
  ASSERT_TRUE(tier.acquire(cold, one).ok());  // read and verified against generation 2
  EXPECT_EQ(tier.last_fetch().misses, 1);
  EXPECT_EQ(std::memcmp(one[0], twenty.data(), stride), 0);
  tier.release(cold);

  StoreLayerInfo other = next_info;
  other.table.stride += 64;
  EXPECT_FALSE(tier.refresh(*next, other, {}, [](int64_t) { return nullptr; }).ok());
}

}  // namespace
}  // namespace trove
