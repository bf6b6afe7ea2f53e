// train/trainer: distillation into an int4 layer trained in place, checkpoints as store
// generations, resume equal to an uninterrupted run bit for bit, a process killed at random
// moments always leaving a verifiable store that resumes, and the errors before any work.
#include "train/trainer.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "runtime/bench/synthetic.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/peer_layer.h"
#include "storage/safetensors.h"
#include "storage/store.h"
#include "tests/test_util.h"
#include "train/adam.h"

namespace trove {
namespace {

using testing::ScratchDir;

const std::string kLayer = "blk.0.peer";

PeerConfig train_config() {
  PeerConfig c;
  c.dim = 48;
  c.dim_out = 40;
  c.heads = 2;
  c.n_keys = 12;  // N = 144
  c.dim_key = 8;
  c.topk = 4;
  c.topk_per_half = 4;
  c.activation = Activation::kSilu;
  c.gate = Gate::kRelu;
  return c;
}

// A synthetic layer (seed) packed as `dtype` into `path`. Teacher and student share the router
// when they share the seed; the student's experts then start at the teacher's, quantized, plus
// whatever `expert_std` changes.
void make_store(const ScratchDir& dir, const std::string& path, uint64_t seed, DType dtype,
                float expert_std = 0.2f) {
  SyntheticCheckpoint spec;
  spec.layout = ImportLayout::kTrove;
  spec.prefixes = {kLayer};
  spec.config = train_config();
  spec.dtype = StDType::kF32;
  spec.seed = seed;
  spec.expert_std = expert_std;
  spec.router_std = 0.2f;
  const std::string ckpt = dir.file("ckpt-" + std::to_string(seed) + ".safetensors");
  ASSERT_TRUE(write_synthetic_checkpoint(ckpt, spec).ok());
  PackOptions opt;
  opt.inputs = {ckpt};
  opt.output = path;
  opt.layout = ImportLayout::kTrove;
  opt.dtype = dtype;
  opt.layers = {{kLayer, kLayer}};
  auto packed = pack_store(opt);
  ASSERT_TRUE(packed.ok()) << packed.status().to_string();
}

class Train : public ::testing::Test {
 protected:
  void SetUp() override {
    teacher_ = dir_.file("teacher.trove");
    student0_ = dir_.file("student0.trove");
    ASSERT_NO_FATAL_FAILURE(make_store(dir_, teacher_, 1, DType::kF32));
    // Same router, experts of another draw: the student has to learn the teacher's experts.
    ASSERT_NO_FATAL_FAILURE(make_store(dir_, dir_.file("other.trove"), 2, DType::kI4));
    ASSERT_NO_FATAL_FAILURE(make_student());
  }
  // The teacher's router with the other draw's int4 experts, as each of `names`.
  void make_student(const std::string& path, const std::vector<std::string>& names) {
    auto t = StoreReader::open(teacher_);
    auto o = StoreReader::open(dir_.file("other.trove"));
    ASSERT_TRUE(t.ok() && o.ok());
    const StoreLayerInfo& ti = *t->find_layer(kLayer);
    const StoreLayerInfo& oi = *o->find_layer(kLayer);
    auto w = StoreWriter::create(path, o->provenance());
    ASSERT_TRUE(w.ok());
    for (const std::string& name : names) {
      ASSERT_TRUE(
          w->begin_layer(name, oi.info,
                         {oi.table.dtype, oi.table.count, oi.table.record_bytes, oi.table.stride})
              .ok());
      ASSERT_TRUE(w->append_records(o->mapped_records(oi)).ok());
      for (const StoreDenseInfo& d : ti.dense) {
        ASSERT_TRUE(w->add_dense(d.name, d.shape, t->read_dense(ti, d.name).value()).ok());
      }
      ASSERT_TRUE(w->end_layer().ok());
    }
    ASSERT_TRUE(w->finish().ok());
  }
  void make_student() { make_student(student0_, {kLayer}); }
  std::string fresh_student(const std::string& name) {
    const std::string path = dir_.file(name);
    std::filesystem::copy_file(student0_, path, std::filesystem::copy_options::overwrite_existing);
    return path;
  }
  TrainOptions options(const std::string& store) {
    TrainOptions o;
    o.store = store;
    o.layers = {kLayer};
    o.teacher = teacher_;
    o.steps = 40;
    o.batch = 64;
    o.lr = 0.05f;
    o.checkpoint_every = 10;
    o.threads = 2;
    o.seed = 7;
    return o;
  }
  std::vector<uint8_t> records(const std::string& store, const std::string& layer) {
    auto s = StoreReader::open(store);
    EXPECT_TRUE(s.ok());
    auto r = s->mapped_records(*s->find_layer(layer));
    return {r.begin(), r.end()};
  }
  std::vector<float> dense(const std::string& store, const std::string& layer,
                           const std::string& name) {
    auto s = StoreReader::open(store);
    EXPECT_TRUE(s.ok());
    auto d = s->read_dense(*s->find_layer(layer), name);
    EXPECT_TRUE(d.ok()) << layer << " " << name << ": " << d.status().to_string();
    return d.ok() ? *d : std::vector<float>{};
  }

  ScratchDir dir_;
  std::string teacher_, student0_;
};

double mean(const std::vector<double>& v, size_t from, size_t to) {
  double s = 0;
  for (size_t i = from; i < to; ++i) s += v[i];
  return s / static_cast<double>(to - from);
}

TEST_F(Train, LossFallsAndEveryCheckpointIsAServableVerifiedStore) {
  const std::string store = fresh_student("s.trove");
  std::vector<int64_t> committed;
  TrainOptions o = options(store);
  o.steps = 120;
  o.checkpoint_every = 30;
  o.checkpointed = [&](int64_t step) {
    committed.push_back(step);
    auto s = StoreReader::open(store);
    ASSERT_TRUE(s.ok()) << s.status().to_string();
    auto faults = s->verify();
    ASSERT_TRUE(faults.ok() && faults->empty());
    auto layer = PeerLayer::open(*s, kLayer);  // what `trove forward` serves
    ASSERT_TRUE(layer.ok()) << layer.status().to_string();
    std::vector<float> x(2 * 48, 0.3f), y(2 * 40);
    EXPECT_TRUE(layer->forward(x, 2, y).ok());
    // The training state is not servable by mistake.
    auto state = PeerLayer::open(*s, train_state_layer_name(kLayer));
    EXPECT_FALSE(state.ok());
  };
  auto r = run_train(o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(committed, (std::vector<int64_t>{30, 60, 90, 120}));
  ASSERT_EQ(r->losses.size(), 120u);
  EXPECT_LT(mean(r->losses, 115, 120), 0.7 * mean(r->losses, 0, 5))
      << "loss " << r->losses.front() << " -> " << r->losses.back();
  const Metrics& m = r->metrics;
  EXPECT_GT(m.counter("expert_updates"), 0);
  EXPECT_EQ(m.counter("tokens"), 120 * o.batch);
  // One latency sample per step and per checkpoint, one update per layer and step.
  ASSERT_NE(m.histogram("latency.step"), nullptr);
  EXPECT_EQ(m.histogram("latency.step")->count(), 120);
  EXPECT_EQ(m.histogram("latency.update")->count(), 120);
  EXPECT_EQ(r->checkpoints(), 4);
  EXPECT_EQ(m.counter("checkpoint.whole_rewrites"), 1);
  for (const char* name : {"latency.step", "latency.update", "latency.checkpoint"}) {
    const LatencyHistogram& h = *m.histogram(name);
    EXPECT_LE(h.quantile(0.5), h.quantile(0.9)) << name;
    EXPECT_LE(h.quantile(0.9), h.quantile(0.99)) << name;
    EXPECT_LE(h.quantile(0.99), h.quantile(1.0)) << name;
  }
  EXPECT_LE(r->update_seconds(), r->seconds());
  EXPECT_GT(m.counter("checkpoint.bytes_written"), 0);
  // The served records are the export of the training view (kept in the same store).
  EXPECT_NE(records(store, kLayer), records(student0_, kLayer));
}

TEST_F(Train, ResumedRunEqualsAnUninterruptedOneBitForBit) {
  const std::string whole = fresh_student("whole.trove");
  auto a = run_train(options(whole));
  ASSERT_TRUE(a.ok()) << a.status().to_string();

  const std::string parts = fresh_student("parts.trove");
  TrainOptions first = options(parts);
  first.steps = 20;  // "killed" after the checkpoint at step 20
  ASSERT_TRUE(run_train(first).ok());
  auto b = run_train(options(parts));
  ASSERT_TRUE(b.ok()) << b.status().to_string();
  EXPECT_EQ(b->start_step, 20);
  ASSERT_EQ(b->losses.size(), 20u);
  for (size_t i = 0; i < 20; ++i) {
    EXPECT_EQ(std::memcmp(&b->losses[i], &a->losses[20 + i], sizeof(double)), 0) << "step " << i;
  }
  EXPECT_EQ(records(parts, kLayer), records(whole, kLayer));
  EXPECT_EQ(records(parts, train_state_layer_name(kLayer)),
            records(whole, train_state_layer_name(kLayer)));
}

TEST_F(Train, KilledAtRandomMomentsTheStoreVerifiesAndResumesToTheSameRecords) {
  const std::string whole = fresh_student("whole.trove");
  TrainOptions ref = options(whole);
  ref.checkpoint_every = 2;
  // The served records of every committed generation of an uninterrupted run, by step.
  std::map<int64_t, std::vector<uint8_t>> at_step = {{0, records(student0_, kLayer)}};
  ref.checkpointed = [&](int64_t step) { at_step[step] = records(whole, kLayer); };
  ASSERT_TRUE(run_train(ref).ok());

  const std::string store = fresh_student("killed.trove");
  std::mt19937 rng(3);
  for (int attempt = 0; attempt < 12; ++attempt) {
    const pid_t pid = fork();
    if (pid == 0) {
      TrainOptions o = options(store);
      o.checkpoint_every = 2;
      o.threads = 1;
      _exit(run_train(o).ok() ? 0 : 1);
    }
    std::this_thread::sleep_for(
        std::chrono::microseconds(std::uniform_int_distribution<int>(2000, 60000)(rng)));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    auto s = StoreReader::open(store);
    ASSERT_TRUE(s.ok()) << "attempt " << attempt << ": " << s.status().to_string();
    auto faults = s->verify();
    ASSERT_TRUE(faults.ok() && faults->empty()) << "attempt " << attempt;
    // Whole: exactly the uninterrupted run's generation at the step it says it holds.
    int64_t step = 0;
    if (const StoreLayerInfo* st = s->find_layer(train_state_layer_name(kLayer))) {
      step = st->info["training_view"]["step"].get<int64_t>();
    }
    ASSERT_TRUE(at_step.count(step)) << "attempt " << attempt << ": step " << step;
    EXPECT_EQ(records(store, kLayer), at_step[step]) << "attempt " << attempt << " step " << step;
  }
  TrainOptions o = options(store);
  o.checkpoint_every = 2;
  auto r = run_train(o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(records(store, kLayer), records(whole, kLayer));
  // A killed writer leaves at most its named temporary next to the store, nothing else.
  for (const auto& e : std::filesystem::directory_iterator(dir_.path())) {
    const std::string name = e.path().filename().string();
    EXPECT_TRUE(name.find(".tmp") == std::string::npos || name.find("killed.trove") == 0) << name;
  }
}

TEST_F(Train, BadInputsAreRefusedBeforeAnyWork) {
  const std::string store = fresh_student("s.trove");
  const std::vector<uint8_t> before = testing::read_all(store);
  TrainOptions o = options(store);
  o.lr = -1;
  EXPECT_FALSE(run_train(o).ok());
  o = options(teacher_);  // an f32 layer is not an int4 student
  auto f32 = run_train(o);
  ASSERT_FALSE(f32.ok());
  EXPECT_NE(f32.status().message().find("int4"), std::string::npos) << f32.status().to_string();
  o = options(store);
  o.layers = {"nope"};
  EXPECT_FALSE(run_train(o).ok());
  EXPECT_EQ(testing::read_all(store), before);

  // A checkpoint resumes only with the flags that decide its steps; each change is named.
  o = options(store);
  o.steps = 10;
  ASSERT_TRUE(run_train(o).ok());
  const std::vector<uint8_t> checkpointed = testing::read_all(store);
  const std::vector<std::pair<std::string, std::function<void(TrainOptions&)>>> changes = {
      {"seed 7, now 8", [](TrainOptions& t) { t.seed = 8; }},
      {"batch 64, now 32", [](TrainOptions& t) { t.batch = 32; }},
      {"lr ", [](TrainOptions& t) { t.lr = 0.5f; }},
      {"saturation_tolerance 64, now 0", [](TrainOptions& t) { t.saturation_tolerance = 0; }},
      {"train_router false, now true", [](TrainOptions& t) { t.train_router = true; }},
      {"optimizer \"adagrad\", now \"sgd\"",
       [](TrainOptions& t) { t.optimizer = TrainOptimizer::kSgd; }},
  };
  for (const auto& [says, change] : changes) {
    TrainOptions other = options(store);
    other.steps = 20;
    change(other);
    auto r = run_train(other);
    ASSERT_FALSE(r.ok()) << says;
    EXPECT_NE(r.status().message().find(says), std::string::npos) << r.status().to_string();
    EXPECT_NE(r.status().message().find("another seed, optimizer"), std::string::npos);
  }
  EXPECT_EQ(testing::read_all(store), checkpointed);
  // More steps, other threads, checkpoint interval or tier change nothing of the run: resumed.
  o.steps = 12;
  o.threads = 1;
  o.checkpoint_every = 1;
  EXPECT_TRUE(run_train(o).ok());
}

// Checkpoints after the first write only the changed records, in place, as new generations;
// the results equal those of a run that checkpoints at other moments (more often, or forced by
// the dirty-bytes limit), and of one whose records come through a small host tier.
TEST_F(Train, CheckpointsWriteChangedRecordsInPlaceAsGenerations) {
  const std::string whole = fresh_student("whole.trove");
  TrainOptions o = options(whole);  // 40 steps, a checkpoint every 10
  std::vector<uint64_t> generations;
  uint64_t first_size = 0;
  o.checkpointed = [&](int64_t) {
    auto s = StoreReader::open(whole);
    ASSERT_TRUE(s.ok()) << s.status().to_string();
    generations.push_back(s->generation());
    if (generations.size() == 1) first_size = std::filesystem::file_size(whole);
    auto faults = s->verify();
    ASSERT_TRUE(faults.ok() && faults->empty());
  };
  auto a = run_train(o);
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  // The first checkpoint rewrote the store (adding the training state), the others updated it.
  EXPECT_EQ(generations, (std::vector<uint64_t>{1, 2, 3, 4}));
  EXPECT_EQ(a->metrics.counter("checkpoint.whole_rewrites"), 1);
  EXPECT_GT(a->metrics.counter("checkpoint.records_written"), 0);
  // What the in-place checkpoints wrote follows the changed records: each is journaled and
  // applied (2x) in both tables, plus checksums, the optimizer state, manifest and header.
  const uint64_t strides = records(whole, kLayer).size() / 144 +
                           records(whole, train_state_layer_name(kLayer)).size() / 144;
  EXPECT_LE(
      static_cast<uint64_t>(a->metrics.counter("checkpoint.bytes_written")),
      first_size +
          2 * static_cast<uint64_t>(a->metrics.counter("checkpoint.records_written")) * strides +
          3 * 65536);
  EXPECT_GT(a->peak_dirty_bytes, 0u);
  EXPECT_FALSE(std::filesystem::exists(whole + ".journal"));

  // Checkpoints at other moments (every 3 steps; forced by a tiny dirty limit) and records
  // through a host tier of a tenth of the table change no bit.
  auto same_as_a = [&](TrainOptions other, const char* what) {
    auto r = run_train(other);
    ASSERT_TRUE(r.ok()) << what << ": " << r.status().to_string();
    EXPECT_EQ(records(other.store, kLayer), records(whole, kLayer)) << what;
    EXPECT_EQ(records(other.store, train_state_layer_name(kLayer)),
              records(whole, train_state_layer_name(kLayer)))
        << what;
    ASSERT_EQ(r->losses.size(), a->losses.size()) << what;
    for (size_t i = 0; i < r->losses.size(); ++i) {
      ASSERT_EQ(std::memcmp(&r->losses[i], &a->losses[i], sizeof(double)), 0) << what << i;
    }
  };
  TrainOptions every3 = options(fresh_student("every3.trove"));
  every3.checkpoint_every = 3;
  same_as_a(every3, "every 3 steps");
  TrainOptions dirty = options(fresh_student("dirty.trove"));
  dirty.checkpoint_every = 0;
  dirty.max_dirty_bytes = 4096;
  same_as_a(dirty, "dirty limit");
  TrainOptions tiered = options(fresh_student("tiered.trove"));
  TieredSourceOptions t;
  const uint64_t stride = records(student0_, kLayer).size() / 144;
  t.host_budget_bytes = 144 * stride;  // every expert: a batch of 64 tokens can touch them all
  tiered.tiers = t;
  same_as_a(tiered, "host tier");

  // A host tier smaller than the table (one batch of 8 tokens: 64 records of 144) through
  // checkpoints, the first of which rewrites every record: as the mapped run.
  TrainOptions small = options(fresh_student("small-mapped.trove"));
  small.batch = 8;
  small.steps = 12;
  small.checkpoint_every = 4;
  auto mapped = run_train(small);
  ASSERT_TRUE(mapped.ok()) << mapped.status().to_string();
  TrainOptions small_tier = small;
  small_tier.store = fresh_student("small-tier.trove");
  t.host_budget_bytes = 64 * stride;
  small_tier.tiers = t;
  auto through = run_train(small_tier);
  ASSERT_TRUE(through.ok()) << through.status().to_string();
  EXPECT_EQ(records(small_tier.store, kLayer), records(small.store, kLayer));
  EXPECT_EQ(records(small_tier.store, train_state_layer_name(kLayer)),
            records(small.store, train_state_layer_name(kLayer)));
}

// --saturation-tolerance: groups that overshoot a little are clamped instead of doubling
// their scale; with 0 nothing is ever clamped (SPEC §7).
TEST_F(Train, SaturationToleranceClampsInsteadOfRescaling) {
  TrainOptions o = options(fresh_student("t0.trove"));
  o.saturation_tolerance = 0;
  auto spec = run_train(o);
  ASSERT_TRUE(spec.ok()) << spec.status().to_string();
  EXPECT_EQ(spec->metrics.counter("clamps"), 0);
  EXPECT_GT(spec->metrics.counter("rescales"), 0);
  o = options(fresh_student("t64.trove"));
  o.saturation_tolerance = 64;
  auto tol = run_train(o);
  ASSERT_TRUE(tol.ok()) << tol.status().to_string();
  EXPECT_GT(tol->metrics.counter("clamps"), 0);
  EXPECT_LT(tol->metrics.counter("rescales"), spec->metrics.counter("rescales"));
  o.saturation_tolerance = 129;
  o.store = fresh_student("bad.trove");
  EXPECT_FALSE(run_train(o).ok());
}

// --train-router: W_q, its bias, the keys and the norm train with Adam; the trained router is
// what the stored layer serves, its Adam moments are in the training state, and a run split at
// a checkpoint equals an uninterrupted one bit for bit, router included.
TEST_F(Train, RouterTrainsWithAdamAndResumesBitForBit) {
  const std::string whole = fresh_student("whole.trove");
  TrainOptions o = options(whole);
  o.train_router = true;
  o.router_lr = 1e-2f;
  auto a = run_train(o);
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  EXPECT_NE(dense(whole, kLayer, "query.weight"), dense(student0_, kLayer, "query.weight"));
  EXPECT_NE(dense(whole, kLayer, "keys"), dense(student0_, kLayer, "keys"));
  EXPECT_EQ(dense(whole, kLayer, "keys"), dense(whole, train_state_layer_name(kLayer), "keys"));
  EXPECT_EQ(dense(whole, train_state_layer_name(kLayer), "adam.v.keys").size(),
            dense(whole, kLayer, "keys").size());

  // Without --train-router the router is what it was.
  const std::string fixed = fresh_student("fixed.trove");
  ASSERT_TRUE(run_train(options(fixed)).ok());
  EXPECT_EQ(dense(fixed, kLayer, "query.weight"), dense(student0_, kLayer, "query.weight"));

  const std::string parts = fresh_student("parts.trove");
  TrainOptions first = o;
  first.store = parts;
  first.steps = 20;
  ASSERT_TRUE(run_train(first).ok());
  TrainOptions second = o;
  second.store = parts;
  auto b = run_train(second);
  ASSERT_TRUE(b.ok()) << b.status().to_string();
  ASSERT_EQ(b->losses.size(), 20u);
  for (size_t i = 0; i < 20; ++i) {
    EXPECT_EQ(std::memcmp(&b->losses[i], &a->losses[20 + i], sizeof(double)), 0) << "step " << i;
  }
  EXPECT_EQ(records(parts, kLayer), records(whole, kLayer));
  for (const char* t : {"query.weight", "keys"}) {
    EXPECT_EQ(dense(parts, kLayer, t), dense(whole, kLayer, t)) << t;
  }
  EXPECT_EQ(dense(parts, train_state_layer_name(kLayer), "adam.m.query.weight"),
            dense(whole, train_state_layer_name(kLayer), "adam.m.query.weight"));
}

// Two layers side by side with the differential schedule: while one leads at a high rate the
// other barely moves, then they swap; the run resumes across a phase boundary bit for bit.
TEST_F(Train, TwoLayersFollowTheirLearningRatePhases) {
  const std::string kOther = "blk.1.peer";
  const std::string whole = dir_.file("two.trove");
  ASSERT_NO_FATAL_FAILURE(make_student(whole, {kLayer, kOther}));
  const std::string parts = dir_.file("two-parts.trove");
  std::filesystem::copy_file(whole, parts);
  TrainOptions o = options(whole);
  o.layers = {kLayer, kOther};
  o.teacher_layers = {kLayer, kLayer};
  o.steps = 30;
  auto phases = parse_lr_phases(
      "10:blk.0.peer=5e-2,blk.1.peer=1e-7; 10:blk.0.peer=1e-7,"
      "blk.1.peer=5e-2; 10:all=2e-2");
  ASSERT_TRUE(phases.ok()) << phases.status().to_string();
  o.lr_phases = *phases;
  // Each layer's int4 records at every checkpoint (steps 10, 20, 30).
  std::vector<std::vector<uint8_t>> at[2];
  o.checkpointed = [&](int64_t) {
    at[0].push_back(records(whole, kLayer));
    at[1].push_back(records(whole, kOther));
  };
  auto a = run_train(o);
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  ASSERT_EQ(a->layer_losses.size(), 2u);
  ASSERT_EQ(at[0].size(), 3u);
  auto changed = [](const std::vector<uint8_t>& x, const std::vector<uint8_t>& y) {
    int64_t n = 0;
    for (size_t i = 0; i < x.size(); ++i) n += x[i] != y[i];
    return n;
  };
  const std::vector<uint8_t> start = records(parts, kLayer);  // both layers start equal
  // Phase 1: layer 0 learns, layer 1 (same start, same inputs) barely moves; phase 2 the
  // reverse; phase 3 both.
  const int64_t lead1 = changed(start, at[0][0]), follow1 = changed(start, at[1][0]);
  const int64_t lead2 = changed(at[1][0], at[1][1]), follow2 = changed(at[0][0], at[0][1]);
  EXPECT_GT(lead1, 100 * std::max<int64_t>(follow1, 1)) << lead1 << " vs " << follow1;
  EXPECT_GT(lead2, 100 * std::max<int64_t>(follow2, 1)) << lead2 << " vs " << follow2;
  EXPECT_GT(changed(at[0][1], at[0][2]), 0);
  EXPECT_GT(changed(at[1][1], at[1][2]), 0);
  const std::vector<double>& l0 = a->layer_losses[0];
  const std::vector<double>& l1 = a->layer_losses[1];
  EXPECT_EQ(l0[0], l1[0]);  // identical layers before any step

  TrainOptions first = o;
  first.checkpointed = nullptr;
  first.store = parts;
  first.steps = 15;
  first.checkpoint_every = 15;
  ASSERT_TRUE(run_train(first).ok());
  TrainOptions second = first;
  second.steps = o.steps;
  auto b = run_train(second);
  ASSERT_TRUE(b.ok()) << b.status().to_string();
  EXPECT_EQ(b->start_step, 15);
  EXPECT_EQ(records(parts, kLayer), records(whole, kLayer));
  EXPECT_EQ(records(parts, kOther), records(whole, kOther));

  // Resuming with another layer list is refused.
  TrainOptions swapped = o;
  swapped.store = parts;
  swapped.steps = 40;
  swapped.layers = {kOther, kLayer};
  auto c = run_train(swapped);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("layer list"), std::string::npos) << c.status().to_string();
}

// adam_step against the textbook update computed here in double, over several steps.
TEST(Adam, MatchesTheTextbookUpdate) {
  std::vector<float> p = {0.5f, -1.0f, 2.0f, 0.0f}, m(4, 0.0f), v(4, 0.0f);
  std::vector<double> pd(p.begin(), p.end()), md(4, 0.0), vd(4, 0.0);
  const double lr = 0.01, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  for (int t = 1; t <= 5; ++t) {
    const std::vector<float> g = {0.1f * t, -0.3f, 1e-4f, t % 2 ? 2.0f : -2.0f};
    adam_step(p, g, m, v, static_cast<float>(lr), t);
    for (size_t i = 0; i < 4; ++i) {
      md[i] = b1 * md[i] + (1 - b1) * g[i];
      vd[i] = b2 * vd[i] + (1 - b2) * g[i] * g[i];
      const double mh = md[i] / (1 - std::pow(b1, t)), vh = vd[i] / (1 - std::pow(b2, t));
      pd[i] -= lr * mh / (std::sqrt(vh) + eps);
      EXPECT_NEAR(p[i], pd[i], 1e-6) << "step " << t << " element " << i;
    }
  }
  // The first step moves every parameter with a non-zero gradient by about lr.
  std::vector<float> q = {1.0f}, mq(1, 0.0f), vq(1, 0.0f);
  adam_step(q, std::vector<float>{123.0f}, mq, vq, 0.01f, 1);
  EXPECT_NEAR(q[0], 0.99f, 1e-6);
}

TEST(LrPhases, ParseAndLookUp) {
  auto p = parse_lr_phases("2:A=1e-3,B.router=2e-3,router=3e-3;1:all=5e-4;");
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  ASSERT_EQ(p->size(), 2u);
  EXPECT_EQ(phase_lr(*p, 0, "A", false, 9.0f), 1e-3f);
  EXPECT_EQ(phase_lr(*p, 1, "B", false, 9.0f), 9.0f);  // not named: the base rate
  EXPECT_EQ(phase_lr(*p, 1, "B", true, 9.0f), 2e-3f);  // the most specific name wins
  EXPECT_EQ(phase_lr(*p, 1, "A", true, 9.0f), 3e-3f);
  EXPECT_EQ(phase_lr(*p, 2, "A", false, 9.0f), 5e-4f);
  EXPECT_EQ(phase_lr(*p, 99, "B", true, 9.0f), 5e-4f);  // the last phase holds
  EXPECT_EQ(phase_lr({}, 5, "A", false, 9.0f), 9.0f);
  EXPECT_TRUE(check_lr_phase_groups(*p, {"A", "B"}, true).ok());
  const Status no_router = check_lr_phase_groups(*p, {"A", "B"}, false);
  EXPECT_NE(no_router.message().find("--train-router"), std::string::npos) << no_router.to_string();
  EXPECT_EQ(lr_phases_text(*p), "2:A=0.001,B.router=0.002,router=0.003;1:all=0.0005");
  const Status unknown = check_lr_phase_groups(*p, {"A"}, true);
  EXPECT_NE(unknown.message().find("'B.router'"), std::string::npos) << unknown.to_string();
  for (const char* bad : {"", "10", "x:A=1", "0:A=1", "1.5:A=1", "10:A", "10:A=0", "10:A=-1",
                          "10:A=nan", "10:A=1,A=2", "10:=1"}) {
    auto r = parse_lr_phases(bad);
    EXPECT_FALSE(r.ok()) << "'" << bad << "' parsed";
  }
}

// A dense MLP teacher: the first step's loss equals the MSE between the student's output and
// the MLP computed here independently, for SwiGLU and GELU (with biases) teachers; training
// on a SwiGLU teacher lowers the loss.
TEST_F(Train, DenseMlpTeachersAreComputedExactlyAndDistilled) {
  const int64_t D = 48, Dout = 40, H = 24, T = 64;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto gaussian = [&](size_t n, float std) {
    std::vector<float> v(n);
    for (float& x : v) x = std * normal(rng);
    return v;
  };
  const std::vector<float> x = gaussian(static_cast<size_t>(T * D), 1.0f);
  const std::string xin = dir_.file("x.safetensors");
  auto bytes = [](const std::vector<float>& v) {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()), v.size() * 4);
  };
  ASSERT_TRUE(write_safetensors(xin, {{"x", StDType::kF32, {T, D}, bytes(x), nullptr}}, {}).ok());
  auto student = StoreReader::open(student0_);
  ASSERT_TRUE(student.ok());
  auto layer = PeerLayer::open(*student, kLayer);
  ASSERT_TRUE(layer.ok());
  std::vector<float> ys(static_cast<size_t>(T * Dout));
  ASSERT_TRUE(layer->forward(x, T, ys).ok());

  for (bool swiglu : {true, false}) {
    SCOPED_TRACE(swiglu ? "swiglu" : "gelu");
    const auto w1 = gaussian(static_cast<size_t>(H * D), 0.15f);
    const auto w3 = gaussian(static_cast<size_t>(H * D), 0.15f);
    const auto w2 = gaussian(static_cast<size_t>(Dout * H), 0.2f);
    const auto b1 = gaussian(static_cast<size_t>(H), 0.3f);
    const auto b2 = gaussian(static_cast<size_t>(Dout), 0.3f);
    const std::string path = dir_.file(swiglu ? "swiglu.safetensors" : "gelu.safetensors");
    std::vector<StTensorOut> tensors;
    if (swiglu) {
      tensors = {{"mlp.gate_proj.weight", StDType::kF32, {H, D}, bytes(w1), nullptr},
                 {"mlp.up_proj.weight", StDType::kF32, {H, D}, bytes(w3), nullptr},
                 {"mlp.down_proj.weight", StDType::kF32, {Dout, H}, bytes(w2), nullptr}};
    } else {
      tensors = {{"mlp.fc1.weight", StDType::kF32, {H, D}, bytes(w1), nullptr},
                 {"mlp.fc1.bias", StDType::kF32, {H}, bytes(b1), nullptr},
                 {"mlp.fc2.weight", StDType::kF32, {Dout, H}, bytes(w2), nullptr},
                 {"mlp.fc2.bias", StDType::kF32, {Dout}, bytes(b2), nullptr}};
    }
    ASSERT_TRUE(write_safetensors(path, tensors, {}).ok());
    double want = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> h(static_cast<size_t>(H));
      for (int64_t j = 0; j < H; ++j) {
        double a = 0, b = 0;
        for (int64_t i = 0; i < D; ++i) {
          a += double{w1[j * D + i]} * x[t * D + i];
          b += double{w3[j * D + i]} * x[t * D + i];
        }
        h[j] = swiglu ? a / (1 + std::exp(-a)) * b
                      : 0.5 * (a + b1[j]) * (1 + std::erf((a + b1[j]) / std::sqrt(2.0)));
      }
      for (int64_t o = 0; o < Dout; ++o) {
        double yt = swiglu ? 0.0 : double{b2[o]};
        for (int64_t j = 0; j < H; ++j) yt += double{w2[o * H + j]} * h[j];
        const double e = ys[t * Dout + o] - yt;
        want += e * e;
      }
    }
    want /= static_cast<double>(T * Dout);

    TrainOptions o = options(fresh_student(swiglu ? "s1.trove" : "s2.trove"));
    o.teacher = path;
    o.teacher_kind = TrainOptions::TeacherKind::kMlp;
    o.teacher_layers = {"mlp"};
    o.inputs = xin;
    o.batch = T;
    o.steps = swiglu ? 40 : 1;
    auto r = run_train(o);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_NEAR(r->losses[0], want, 1e-5 * want);
    if (swiglu) {
      EXPECT_LT(mean(r->losses, 35, 40), 0.9 * mean(r->losses, 0, 5));
    }
  }
  // A file without such tensors says what it looked for.
  TrainOptions o = options(fresh_student("s3.trove"));
  o.teacher = xin;
  o.teacher_kind = TrainOptions::TeacherKind::kMlp;
  auto bad = run_train(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("gate_proj"), std::string::npos)
      << bad.status().to_string();
}

}  // namespace
}  // namespace trove
