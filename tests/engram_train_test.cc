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
#include "runtime/engram/engram_table.h"
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

// The records of layer `layer` (default: the Engram layer; its state layer "engram.train").
std::vector<uint8_t> table_bytes(const std::string& path, const std::string& layer = "engram") {
  auto store = StoreReader::open(path);
  EXPECT_TRUE(store.ok()) << store.status().to_string();
  const StoreLayerInfo* l = store->find_layer(layer);
  EXPECT_NE(l, nullptr) << path << " has no layer " << layer;
  if (l == nullptr) return {};
  auto m = store->mapped_records(*l);
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
  // The first checkpoint rewrote the store with the state layer added (generation 1), the
  // second committed generation 2 in place.
  EXPECT_EQ(*gen, 2u);
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
  // The clean run: generation 1 after the first checkpoint (the store rewritten with the state
  // layer), 2 after the second (in place, through the journal).
  const std::string clean = dir.file("clean.trove");
  std::filesystem::copy_file(base, clean);
  std::vector<uint8_t> g1;
  ASSERT_TRUE(train_two(clean, nullptr).ok());
  const std::vector<uint8_t> g2 = table_bytes(clean);
  const std::vector<uint8_t> s2 = table_bytes(clean, "engram.train");
  std::vector<uint8_t> s1;
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
      EXPECT_EQ(table_bytes(path, "engram.train"), s2);
      break;
    }
    ++crashes;
    // A crash after the store was synced (removing the journal) still commits: OK, and
    // generation 2 below.
    // Reopening recovers: the store is the first checkpoint's generation (1) or the second's (2),
    // both layers whole, and verifies.
    auto store = StoreReader::open(path);
    ASSERT_TRUE(store.ok()) << "crash at call " << n << ": " << store.status().to_string();
    const uint64_t generation = store->generation();
    ASSERT_TRUE(generation == 1 || generation == 2) << generation;
    if (gen.ok()) {
      EXPECT_EQ(generation, 2u) << "crash at call " << n;
    }
    auto faults = store->verify();
    ASSERT_TRUE(faults.ok());
    EXPECT_TRUE(faults->empty()) << "crash at call " << n;
    const std::vector<uint8_t> got = table_bytes(path);
    const std::vector<uint8_t> state = table_bytes(path, "engram.train");
    if (generation == 2) {
      EXPECT_EQ(got, g2) << "crash at call " << n;
      EXPECT_EQ(state, s2) << "crash at call " << n;
    } else {
      g1 = g1.empty() ? got : g1;
      s1 = s1.empty() ? state : s1;
      EXPECT_EQ(got, g1) << "crash at call " << n;
      EXPECT_EQ(state, s1) << "crash at call " << n;
      EXPECT_NE(got, g2);
      EXPECT_NE(state, s2);
    }
    ASSERT_LT(n, 200u);
  }
  EXPECT_GT(crashes, 5);
}

// Three steps, stopping (checkpoint, trainer closed, a new one opened) after `stop_after`
// steps, or never (0); each step touches rows that earlier steps touched too, so a resumed run
// depends on the saved training view and accumulators, not only on the served int4 rows.
Status train_three(const std::string& path, int stop_after, std::vector<float>* trained) {
  EngramTrainOptions o;
  o.seed = 5;
  TROVE_ASSIGN_OR_RETURN(auto t, EngramTrainer::open(path, "engram", o));
  const std::vector<int64_t> ids = {3, 40, 41, 250};
  for (int step = 1; step <= 3; ++step) {
    std::vector<float> g(ids.size() * 32);
    for (size_t i = 0; i < g.size(); ++i) {
      g[i] = 0.3f * static_cast<float>((i * 7 + static_cast<size_t>(step) * 3) % 11) - 1.4f;
    }
    TROVE_RETURN_IF_ERROR(t->add_row_grads(1, ids, g));
    TROVE_RETURN_IF_ERROR(t->step(0.02f).status());
    if (step == stop_after) {
      TROVE_RETURN_IF_ERROR(t->checkpoint().status());
      t.reset();
      o.seed = 77;  // ignored: a store with a training state resumes its own seed
      TROVE_ASSIGN_OR_RETURN(t, EngramTrainer::open(path, "engram", o));
      if (t->steps() != static_cast<uint64_t>(step) || t->seed() != 5) {
        return Status::aborted("resumed at step " + std::to_string(t->steps()) + ", seed " +
                               std::to_string(t->seed()));
      }
    }
  }
  trained->resize(ids.size() * 32);
  TROVE_RETURN_IF_ERROR(t->read_rows(1, ids, trained->data()));
  return t->checkpoint().status();
}

TEST(EngramTrain, AResumedRunGivesTheBitsOfOneThatNeverStopped) {
  testing::ScratchDir dir;
  const std::string whole = dir.file("whole.trove");
  write_store(whole);
  std::vector<float> w;
  ASSERT_TRUE(train_three(whole, 0, &w).ok());
  for (int stop : {1, 2}) {
    const std::string path = dir.file("stop" + std::to_string(stop) + ".trove");
    write_store(path);
    std::vector<float> r;
    Status s = train_three(path, stop, &r);
    ASSERT_TRUE(s.ok()) << s.to_string();
    EXPECT_EQ(r, w) << "stopped after step " << stop;
    EXPECT_EQ(table_bytes(path), table_bytes(whole)) << "stopped after step " << stop;
    EXPECT_EQ(table_bytes(path, "engram.train"), table_bytes(whole, "engram.train"))
        << "stopped after step " << stop;
  }
  auto store = StoreReader::open(whole);
  ASSERT_TRUE(store.ok());
  const StoreLayerInfo* state = store->find_layer("engram.train");
  ASSERT_NE(state, nullptr);
  // What makes the resume exact is state the int4 rows lack: the touched rows' accumulators are
  // nonzero and their codes are finer than int4's (not all multiples of 16), so a run resumed
  // from the int4 rows would differ.
  auto accum = store->read_dense(*state, "adagrad");
  ASSERT_TRUE(accum.ok());
  ASSERT_EQ(accum->size(), 4u * 300u);  // (3 - 1) orders x 2 heads
  auto layout = EngramRowLayout::make(DType::kI8, 32);
  ASSERT_TRUE(layout.ok());
  const std::vector<uint8_t> codes = table_bytes(whole, "engram.train");
  int finer = 0;
  for (int64_t id : {3, 40, 41, 250}) {
    const int64_t g = 300 + id;  // table 1
    EXPECT_GT((*accum)[static_cast<size_t>(g)], 0.0f) << g;
    const size_t row = static_cast<size_t>(g / layout->rows_per_record) * layout->record_bytes +
                       static_cast<size_t>(g % layout->rows_per_record) * layout->row_bytes;
    for (size_t j = 0; j < 32; ++j) {
      finer += static_cast<int8_t>(codes[row + layout->scale_bytes + j]) % 16 != 0;
    }
  }
  EXPECT_GT(finer, 0);
  EXPECT_EQ((*accum)[0], 0.0f);  // untouched
  // The state layer is not servable, and inspect reports what it is.
  auto table = EngramTable::open(*store, *state);
  ASSERT_FALSE(table.ok());
  EXPECT_THAT(table.status().to_string(), ::testing::HasSubstr("training state of Engram layer"));
  auto j = engram_inspect_json(*store, *state);
  ASSERT_TRUE(j.ok()) << j.status().to_string();
  EXPECT_EQ((*j)["training_view"]["step"].get<int64_t>(), 3);
  EXPECT_THAT(render_engram_inspect(*j), ::testing::HasSubstr("the training state of engram"));
  // A state layer that does not fit its layer is refused, naming it.
  auto t = EngramTrainer::open(whole, "engram.train");
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(t.status().to_string(), ::testing::HasSubstr("is a training state"));
}

}  // namespace
}  // namespace trove
