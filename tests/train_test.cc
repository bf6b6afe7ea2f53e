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
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "runtime/pack.h"
#include "runtime/peer_layer.h"
#include "runtime/synthetic.h"
#include "storage/safetensors.h"
#include "storage/store.h"
#include "tests/test_util.h"

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
  // The teacher's router with the other draw's int4 experts.
  void make_student() {
    auto t = StoreReader::open(teacher_);
    auto o = StoreReader::open(dir_.file("other.trove"));
    ASSERT_TRUE(t.ok() && o.ok());
    const StoreLayerInfo& ti = *t->find_layer(kLayer);
    const StoreLayerInfo& oi = *o->find_layer(kLayer);
    auto w = StoreWriter::create(student0_, o->provenance());
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE(
        w->begin_layer(kLayer, oi.info,
                       {oi.table.dtype, oi.table.count, oi.table.record_bytes, oi.table.stride})
            .ok());
    ASSERT_TRUE(w->append_records(o->mapped_records(oi)).ok());
    for (const StoreDenseInfo& d : ti.dense) {
      ASSERT_TRUE(w->add_dense(d.name, d.shape, t->read_dense(ti, d.name).value()).ok());
    }
    ASSERT_TRUE(w->end_layer().ok());
    ASSERT_TRUE(w->finish().ok());
  }
  std::string fresh_student(const std::string& name) {
    const std::string path = dir_.file(name);
    std::filesystem::copy_file(student0_, path, std::filesystem::copy_options::overwrite_existing);
    return path;
  }
  TrainOptions options(const std::string& store) {
    TrainOptions o;
    o.store = store;
    o.layer = kLayer;
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
  EXPECT_GT(r->expert_updates, 0);
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
  ASSERT_TRUE(run_train(ref).ok());

  const std::string store = fresh_student("killed.trove");
  std::mt19937 rng(3);
  for (int attempt = 0; attempt < 6; ++attempt) {
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
  o.layer = "nope";
  EXPECT_FALSE(run_train(o).ok());
  EXPECT_EQ(testing::read_all(store), before);

  // A checkpoint resumes only with the seed and optimizer it was written with.
  o = options(store);
  o.steps = 10;
  ASSERT_TRUE(run_train(o).ok());
  o.steps = 20;
  o.seed = 8;
  auto other = run_train(o);
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.status().message().find("another seed or optimizer"), std::string::npos)
      << other.status().to_string();
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
    o.teacher_layer = "mlp";
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
