// Engram training (runtime/engram/engram_trainer.h): int4 rows trained with SR and row-wise
// Adagrad, checkpointed as store generations; a crash at every file-system call of a
// checkpoint leaves the old or the new generation whole (as PEER's, tests/store_update_test.cc).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <vector>

#include "runtime/engram/engram_store.h"
#include "runtime/engram/engram_trainer.h"
#include "storage/store.h"
#include "tests/fault_injection.h"
#include "tests/test_util.h"

namespace trove {
namespace {

EngramConfig small_config() {
  EngramConfig c;
  c.hidden = 8;
  c.embed_per_head = 32;
  c.kernel_size = 2;
  c.hash.max_ngram = 3;
  c.hash.heads = 2;
  c.hash.vocab = 300;
  c.hash.mult = {3, 5, 7};
  return c;
}

void write_store(const std::string& path) {
  const EngramConfig c = small_config();
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  EngramDense d;
  d.value_proj.assign(static_cast<size_t>(c.hidden * c.concat_dim()), 0.1f);
  d.key_proj = d.value_proj;
  d.norm_k.assign(static_cast<size_t>(c.hidden), 1.0f);
  d.norm_q = d.norm_k;
  d.conv.assign(static_cast<size_t>(c.hidden * c.kernel_size), 0.0f);
  auto w = StoreWriter::create(path, nlohmann::json::object());
  ASSERT_TRUE(w.ok());
  auto fill = [&](int64_t, int64_t, int64_t count, float* out) -> Status {
    for (int64_t i = 0; i < count * c.embed_per_head; ++i) out[i] = nd(rng);
    return {};
  };
  ASSERT_TRUE(write_engram_layer(&*w, "engram", c, DType::kI4, fill, d).ok());
  ASSERT_TRUE(w->finish().ok());
}

std::vector<uint8_t> table_bytes(const std::string& path) {
  auto store = StoreReader::open(path);
  EXPECT_TRUE(store.ok()) << store.status().to_string();
  const StoreLayerInfo& l = store->layers()[0];
  auto m = store->mapped_records(l);
  return {m.begin(), m.end()};
}

// Two steps on a few rows of tables 0 and 3, each checkpointed; the second checkpoint uses
// `ops` (null: the real syscalls).
Result<uint64_t> train_two(const std::string& path, std::shared_ptr<StoreUpdateOps> ops,
                           std::vector<float>* trained = nullptr) {
  EngramTrainOptions o;
  o.seed = 9;
  TROVE_ASSIGN_OR_RETURN(auto t, EngramTrainer::open(path, "engram", o));
  std::vector<float> g(3 * 32);
  for (size_t i = 0; i < g.size(); ++i) g[i] = (i % 3 == 0 ? 1.0f : -0.5f) * (1 + i % 5);
  const std::vector<int64_t> ids = {0, 17, 299};
  TROVE_RETURN_IF_ERROR(t->add_row_grads(0, ids, g));
  TROVE_RETURN_IF_ERROR(t->add_row_grads(3, ids, g));
  TROVE_RETURN_IF_ERROR(t->step(0.01f).status());
  TROVE_RETURN_IF_ERROR(t->checkpoint().status());
  TROVE_RETURN_IF_ERROR(t->add_row_grads(0, {ids.data(), 2}, {g.data(), 64}));
  TROVE_RETURN_IF_ERROR(t->step(0.01f).status());
  if (trained != nullptr) {
    trained->resize(3 * 32);
    TROVE_RETURN_IF_ERROR(t->read_rows(0, ids, trained->data()));
  }
  StoreUpdateOptions u;
  u.ops = ops;
  return t->checkpoint(u);
}

TEST(EngramTrain, StepsChangeTheTouchedRowsOnlyAndCheckpointsPersistThem) {
  testing::ScratchDir dir;
  const std::string path = dir.file("e.trove");
  write_store(path);
  const std::vector<uint8_t> g0 = table_bytes(path);
  std::vector<float> trained;
  auto gen = train_two(path, nullptr, &trained);
  ASSERT_TRUE(gen.ok()) << gen.status().to_string();
  EXPECT_EQ(*gen, 3u);  // a new store is generation 1; two checkpoints
  const std::vector<uint8_t> g2 = table_bytes(path);
  ASSERT_EQ(g0.size(), g2.size());
  // Only the records of the touched rows changed: rows 0, 17, 299 of table 0 (records 0, 9)
  // and of table 3 (global rows 900, 917, 1199: records 28, 37).
  std::set<size_t> changed;
  for (size_t i = 0; i < g0.size(); ++i) {
    if (g0[i] != g2[i]) changed.insert(i / 576);
  }
  EXPECT_EQ(changed, (std::set<size_t>{0, 9, 28, 37}));
  // The stored int4 rows are the trained rows rounded to int4: close to the training view.
  auto store = StoreReader::open(path);
  ASSERT_TRUE(store.ok());
  auto faults = store->verify();
  ASSERT_TRUE(faults.ok());
  EXPECT_TRUE(faults->empty());
  EngramTrainOptions o;
  auto again = EngramTrainer::open(path, "engram", o);
  ASSERT_TRUE(again.ok());
  std::vector<float> reread(3 * 32);
  const std::vector<int64_t> ids = {0, 17, 299};
  ASSERT_TRUE((*again)->read_rows(0, ids, reread.data()).ok());
  for (size_t i = 0; i < reread.size(); ++i) EXPECT_NEAR(reread[i], trained[i], 0.03) << i;
}

TEST(EngramTrain, ACrashAnywhereInACheckpointLeavesOneWholeGeneration) {
  testing::ScratchDir dir;
  const std::string base = dir.file("base.trove");
  write_store(base);
  // The clean run: generation 2 after the first checkpoint, 3 after the second.
  const std::string clean = dir.file("clean.trove");
  std::filesystem::copy_file(base, clean);
  std::vector<uint8_t> g1;
  ASSERT_TRUE(train_two(clean, nullptr).ok());
  const std::vector<uint8_t> g2 = table_bytes(clean);
  int crashes = 0;
  for (uint64_t n = 1;; ++n) {
    const std::string path = dir.file("crash" + std::to_string(n) + ".trove");
    std::filesystem::copy_file(base, path);
    auto ops = std::make_shared<CrashingStoreUpdateOps>();
    ops->crash_at(n);
    auto gen = train_two(path, ops);
    const bool crashed = ops->crashed();
    ops->lose_unsynced(
        n % 2 ? CrashingStoreUpdateOps::Loss::kAll : CrashingStoreUpdateOps::Loss::kRandom, n);
    if (!crashed) {
      ASSERT_TRUE(gen.ok()) << gen.status().to_string();
      EXPECT_EQ(table_bytes(path), g2);
      break;
    }
    ++crashes;
    // A crash after the store was synced (removing the journal) still commits: OK, and
    // generation 3 below.
    // Reopening recovers: the store is the first checkpoint's generation (2) or the second's (3),
    // whole, and verifies.
    auto store = StoreReader::open(path);
    ASSERT_TRUE(store.ok()) << "crash at call " << n << ": " << store.status().to_string();
    const uint64_t generation = store->generation();
    ASSERT_TRUE(generation == 2 || generation == 3) << generation;
    if (gen.ok()) {
      EXPECT_EQ(generation, 3u) << "crash at call " << n;
    }
    auto faults = store->verify();
    ASSERT_TRUE(faults.ok());
    EXPECT_TRUE(faults->empty()) << "crash at call " << n;
    const std::vector<uint8_t> got = table_bytes(path);
    if (generation == 3) {
      EXPECT_EQ(got, g2) << "crash at call " << n;
    } else {
      g1 = g1.empty() ? got : g1;
      EXPECT_EQ(got, g1) << "crash at call " << n;
      EXPECT_NE(got, g2);
    }
    ASSERT_LT(n, 200u);
  }
  EXPECT_GT(crashes, 5);
}

}  // namespace
}  // namespace trove
