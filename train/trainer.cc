#include "train/trainer.h"

#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>

#include "base/random.h"
#include "base/stopwatch.h"
#include "base/strings.h"
#include "base/thread_pool.h"
#include "kernels/cpu/train.h"
#include "runtime/pack.h"
#include "runtime/peer_config_json.h"
#include "runtime/peer_layer.h"
#include "runtime/store_layer.h"
#include "storage/safetensors.h"
#include "storage/store.h"

namespace trove {

namespace {

size_t sz(int64_t v) {
  return static_cast<size_t>(v);
}

// Records in a buffer the trainer owns and rewrites between steps.
class BufferExpertSource final : public ExpertSource {
 public:
  BufferExpertSource(const RecordLayout& layout, std::vector<uint8_t>* records)
      : layout_(layout), records_(records) {}
  const RecordLayout& layout() const override { return layout_; }
  int64_t num_experts() const override {
    return static_cast<int64_t>(records_->size() / layout_.stride);
  }
  std::string describe() const override { return "records being trained (in memory)"; }
  Status acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override {
    for (size_t i = 0; i < ids.size(); ++i) {
      records[i] = records_->data() + sz(ids[i]) * layout_.stride;
    }
    return Status::ok_status();
  }
  void release(std::span<const int64_t>) override {}

 private:
  RecordLayout layout_;
  std::vector<uint8_t>* records_;
};

// The inputs of step s: gaussian rows drawn from (seed, s), or the next rows of a file.
class InputSource {
 public:
  static Result<InputSource> make(const std::string& spec, int64_t dim, int64_t batch,
                                  uint64_t seed) {
    InputSource in;
    in.dim_ = dim;
    in.batch_ = batch;
    in.seed_ = seed;
    if (spec == "gaussian") return in;
    TROVE_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::open(spec));
    in.file_ = std::make_unique<SafetensorsFile>(std::move(f));
    const StTensorView* x = in.file_->find("x");
    if (x == nullptr && in.file_->tensors().size() == 1) x = &in.file_->tensors()[0];
    if (x == nullptr) {
      return Status::invalid_argument(spec + ": no tensor 'x' (and more than one tensor)");
    }
    if (!st_dtype_is_float(x->dtype) || x->shape.empty() || x->shape.back() != dim ||
        x->numel() < dim) {
      return Status::invalid_argument(
          str_printf("%s: tensor '%s' is %s %s; training inputs are F32/F16/BF16 [..., %lld]",
                     spec.c_str(), x->name.c_str(), st_dtype_name(x->dtype),
                     shape_to_string(x->shape).c_str(), static_cast<long long>(dim)));
    }
    in.rows_ = *x;
    in.rows_.shape = {x->numel() / dim, dim};
    return in;
  }

  Status fill(int64_t step, std::vector<float>* x) const {
    x->resize(sz(batch_ * dim_));
    if (!file_) {
      fill_gaussian(*x, 1.0, splitmix64(seed_ ^ splitmix64(static_cast<uint64_t>(step) + 0x5eed)));
      return Status::ok_status();
    }
    const int64_t total = rows_.shape[0];
    int64_t row = (step * batch_) % total;
    for (int64_t done = 0; done < batch_;) {
      const int64_t n = std::min(batch_ - done, total - row);
      TROVE_RETURN_IF_ERROR(read_rows_f32(rows_, row, n, x->data() + done * dim_));
      done += n;
      row = (row + n) % total;
    }
    for (float v : *x) {
      if (!std::isfinite(v)) return Status::invalid_argument("training inputs hold NaN or Inf");
    }
    return Status::ok_status();
  }

 private:
  int64_t dim_ = 0, batch_ = 0;
  uint64_t seed_ = 0;
  std::unique_ptr<SafetensorsFile> file_;
  StTensorView rows_{};
};

// A dense MLP teacher (TrainOptions::TeacherKind::kMlp), in fp32 from a safetensors file.
class MlpTeacher {
 public:
  static Result<MlpTeacher> open(const std::string& path, const std::string& prefix, int64_t dim,
                                 int64_t dim_out) {
    TROVE_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::open(path));
    MlpTeacher m;
    const std::string p = prefix.empty() ? "" : prefix + ".";
    auto load = [&](const std::string& name, int64_t rows, int64_t cols, bool required,
                    std::vector<float>* out) -> Status {
      const StTensorView* t = f.find(p + name);
      if (t == nullptr) {
        if (!required) return Status::ok_status();
        return Status::not_found(path + ": no tensor " + p + name);
      }
      const std::vector<int64_t> want =
          cols > 0 ? std::vector<int64_t>{rows, cols} : std::vector<int64_t>{rows};
      if (!st_dtype_is_float(t->dtype) || t->shape != want) {
        return Status::invalid_argument(
            str_printf("%s: tensor %s is %s %s, expected a float tensor %s", path.c_str(),
                       t->name.c_str(), st_dtype_name(t->dtype), shape_to_string(t->shape).c_str(),
                       shape_to_string(want).c_str()));
      }
      TROVE_ASSIGN_OR_RETURN(*out, f.read_f32(t->name));
      return Status::ok_status();
    };
    const StTensorView* gate = f.find(p + "gate_proj.weight");
    const StTensorView* fc1 = f.find(p + "fc1.weight");
    const StTensorView* first = gate != nullptr ? gate : fc1;
    if (first == nullptr || first->shape.size() != 2) {
      return Status::invalid_argument(
          path + ": no dense MLP under prefix '" + prefix + "': expected " + p +
          "gate_proj/up_proj/down_proj.weight (SwiGLU) or " + p +
          "fc1/fc2.weight (GELU); name the prefix with --teacher-layer");
    }
    m.swiglu_ = gate != nullptr;
    m.dim_ = dim;
    m.dim_out_ = dim_out;
    m.hidden_ = first->shape[0];
    if (m.swiglu_) {
      TROVE_RETURN_IF_ERROR(load("gate_proj.weight", m.hidden_, dim, true, &m.w1_));
      TROVE_RETURN_IF_ERROR(load("up_proj.weight", m.hidden_, dim, true, &m.w3_));
      TROVE_RETURN_IF_ERROR(load("down_proj.weight", dim_out, m.hidden_, true, &m.w2_));
    } else {
      TROVE_RETURN_IF_ERROR(load("fc1.weight", m.hidden_, dim, true, &m.w1_));
      TROVE_RETURN_IF_ERROR(load("fc2.weight", dim_out, m.hidden_, true, &m.w2_));
      TROVE_RETURN_IF_ERROR(load("fc1.bias", m.hidden_, 0, false, &m.b1_));
      TROVE_RETURN_IF_ERROR(load("fc2.bias", dim_out, 0, false, &m.b2_));
    }
    return m;
  }

  // y [T, dim_out] for x [T, dim]; threads over tokens, the same bits for any thread count.
  void forward(const std::vector<float>& x, int64_t T, std::vector<float>* y, int threads) const {
    y->assign(sz(T * dim_out_), 0.0f);
    parallel_for(T, threads, [&](int64_t begin, int64_t end) {
      std::vector<float> h(sz(hidden_));
      for (int64_t t = begin; t < end; ++t) {
        const float* xt = &x[sz(t * dim_)];
        for (int64_t j = 0; j < hidden_; ++j) {
          double a = 0, b = 0;
          for (int64_t i = 0; i < dim_; ++i) {
            a += static_cast<double>(w1_[sz(j * dim_ + i)]) * xt[i];
            if (swiglu_) b += static_cast<double>(w3_[sz(j * dim_ + i)]) * xt[i];
          }
          if (swiglu_) {
            h[sz(j)] = static_cast<float>(a / (1.0 + std::exp(-a)) * b);
          } else {
            if (!b1_.empty()) a += b1_[sz(j)];
            h[sz(j)] = static_cast<float>(0.5 * a * (1.0 + std::erf(a * 0.70710678118654752440)));
          }
        }
        float* yt = &(*y)[sz(t * dim_out_)];
        for (int64_t o = 0; o < dim_out_; ++o) {
          double acc = b2_.empty() ? 0.0 : b2_[sz(o)];
          for (int64_t j = 0; j < hidden_; ++j) {
            acc += static_cast<double>(w2_[sz(o * hidden_ + j)]) * h[sz(j)];
          }
          yt[o] = static_cast<float>(acc);
        }
      }
    });
  }

 private:
  bool swiglu_ = false;
  int64_t dim_ = 0, dim_out_ = 0, hidden_ = 0;
  std::vector<float> w1_, w2_, w3_, b1_, b2_;
};

const char* optimizer_name(TrainOptimizer o) {
  return o == TrainOptimizer::kSgd ? "sgd" : "adagrad";
}

// Everything a checkpoint holds, in memory.
struct State {
  int64_t step = 0;
  std::vector<uint8_t> training;  // N training records
  std::vector<float> accum;       // N x 2 (Adagrad)
  std::vector<uint8_t> serving;   // N int4 records: export(training)
};

// Rewrites the store with the trained layer's records and its training state, atomically.
Status write_checkpoint(const TrainOptions& o, const StoreReader& store, const StoredLayer& layer,
                        const RecordLayout& training, const State& s) {
  nlohmann::json provenance = store.provenance();
  provenance["trained"] = {{"tool", "trove train"},
                           {"teacher", o.teacher},
                           {"step", s.step},
                           {"optimizer", optimizer_name(o.optimizer)},
                           {"lr", o.lr},
                           {"seed", o.seed}};
  TROVE_ASSIGN_OR_RETURN(StoreWriter w, StoreWriter::create(o.store, provenance));
  const std::string state_name = train_state_layer_name(o.layer);
  for (const StoreLayerInfo& info : store.layers()) {
    if (info.name == state_name) continue;  // written anew below
    StoreTableSpec table{info.table.dtype, info.table.count, info.table.record_bytes,
                         info.table.stride};
    TROVE_RETURN_IF_ERROR(w.begin_layer(info.name, info.info, table));
    if (info.name == o.layer) {
      TROVE_RETURN_IF_ERROR(w.append_records(s.serving));
    } else {
      TROVE_RETURN_IF_ERROR(w.append_records(store.mapped_records(info)));
    }
    for (const StoreDenseInfo& d : info.dense) {
      TROVE_ASSIGN_OR_RETURN(std::vector<float> v, store.read_dense(info, d.name));
      TROVE_RETURN_IF_ERROR(w.add_dense(d.name, d.shape, v));
    }
    TROVE_RETURN_IF_ERROR(w.end_layer());
  }
  const int64_t n = layer.config.num_experts();
  nlohmann::json info = {{"config", peer_config_to_json(layer.config)},
                         {"record", record_layout_json(training)},
                         {"training_view",
                          {{"of", o.layer},
                           {"step", s.step},
                           {"seed", o.seed},
                           {"optimizer", optimizer_name(o.optimizer)},
                           {"lr", o.lr},
                           {"meaning",
                            "int8 code b at scale d/16; served int4 q = "
                            "clamp((b + 8) >> 4, -8, 7)"}}}};
  StoreTableSpec table{"int8", static_cast<uint64_t>(n), training.record_bytes, training.stride};
  TROVE_RETURN_IF_ERROR(w.begin_layer(state_name, info, table));
  TROVE_RETURN_IF_ERROR(w.append_records(s.training));
  // The router again (small beside the tables), so the state layer reads back as a complete
  // layer description for `trove inspect` and verify.
  for (const StoreDenseInfo& d : layer.info->dense) {
    TROVE_ASSIGN_OR_RETURN(std::vector<float> v, store.read_dense(*layer.info, d.name));
    TROVE_RETURN_IF_ERROR(w.add_dense(d.name, d.shape, v));
  }
  if (o.optimizer == TrainOptimizer::kAdagrad) {
    TROVE_RETURN_IF_ERROR(w.add_dense("adagrad", {n, 2 * layer.config.expert_width}, s.accum));
  }
  TROVE_RETURN_IF_ERROR(w.end_layer());
  return w.finish();
}

}  // namespace

std::string train_state_layer_name(const std::string& layer) {
  return layer + ".train";
}

Result<TrainReport> run_train(const TrainOptions& o) {
  if (o.steps < 1 || o.batch < 1 || o.checkpoint_every < 0 || !(o.lr > 0) || !std::isfinite(o.lr)) {
    return Status::invalid_argument(str_printf(
        "train: --steps %lld and --batch %lld must be >= 1, --checkpoint-every %lld >= 0 and "
        "--lr %g a positive number",
        (long long)o.steps, (long long)o.batch, (long long)o.checkpoint_every, (double)o.lr));
  }
  TROVE_ASSIGN_OR_RETURN(StoreReader store, StoreReader::open(o.store));
  TROVE_ASSIGN_OR_RETURN(StoredLayer layer, load_stored_layer(store, o.layer));
  const PeerConfig& c = layer.config;
  if (layer.record.dtype != DType::kI4) {
    return Status::invalid_argument(str_printf(
        "%s: layer %s holds %s records; trove train trains int4 tables in place "
        "(pack the student with --quant int4)",
        o.store.c_str(), o.layer.c_str(), std::string(dtype_name(layer.record.dtype)).c_str()));
  }
  TROVE_ASSIGN_OR_RETURN(RecordLayout training,
                         RecordLayout::make(DType::kI8, c.dim, c.dim_out, c.expert_width));
  const int64_t n = c.num_experts();
  const int64_t rows = 2 * c.expert_width;

  // The teacher.
  PeerLayerOptions lo;
  lo.threads = o.threads;
  std::optional<StoreReader> teacher_store;
  std::optional<PeerLayer> teacher_peer;
  std::optional<MlpTeacher> teacher_mlp;
  if (o.teacher_kind == TrainOptions::TeacherKind::kMlp) {
    TROVE_ASSIGN_OR_RETURN(MlpTeacher m,
                           MlpTeacher::open(o.teacher, o.teacher_layer, c.dim, c.dim_out));
    teacher_mlp.emplace(std::move(m));
  } else {
    TROVE_ASSIGN_OR_RETURN(StoreReader ts, StoreReader::open(o.teacher));
    teacher_store.emplace(std::move(ts));
    const std::string tname = o.teacher_layer.empty() ? o.layer : o.teacher_layer;
    TROVE_ASSIGN_OR_RETURN(PeerLayer t, PeerLayer::open(*teacher_store, tname, lo));
    if (t.config().dim != c.dim || t.config().dim_out != c.dim_out) {
      return Status::invalid_argument(
          str_printf("teacher %s layer %s maps %lld -> %lld; the student maps %lld -> %lld",
                     o.teacher.c_str(), tname.c_str(), (long long)t.config().dim,
                     (long long)t.config().dim_out, (long long)c.dim, (long long)c.dim_out));
    }
    teacher_peer.emplace(std::move(t));
  }
  auto teach = [&](const std::vector<float>& xb, int64_t T, std::vector<float>* yb) -> Status {
    if (teacher_mlp) {
      teacher_mlp->forward(xb, T, yb, o.threads);
      return Status::ok_status();
    }
    return teacher_peer->forward(xb, T, *yb);
  };
  TROVE_ASSIGN_OR_RETURN(InputSource inputs, InputSource::make(o.inputs, c.dim, o.batch, o.seed));

  // The state: from the last checkpoint, or imported from the int4 records.
  State s;
  s.training.resize(sz(n) * training.stride);
  s.accum.assign(sz(n * rows), 0.0f);
  s.serving.assign(store.mapped_records(*layer.info).begin(),
                   store.mapped_records(*layer.info).end());
  if (const StoreLayerInfo* saved = store.find_layer(train_state_layer_name(o.layer))) {
    const nlohmann::json& tv = saved->info.value("training_view", nlohmann::json());
    if (!tv.is_object() || tv.value("seed", uint64_t{0}) != o.seed ||
        tv.value("optimizer", std::string()) != optimizer_name(o.optimizer) ||
        saved->table.count != static_cast<uint64_t>(n) || saved->table.stride != training.stride) {
      return Status::invalid_argument(str_printf(
          "%s holds a checkpoint of layer %s written with another seed or optimizer (%s); resume "
          "with the flags it was written with, or train a fresh copy of the store",
          o.store.c_str(), o.layer.c_str(), tv.dump().c_str()));
    }
    s.step = tv.value("step", int64_t{0});
    std::span<const uint8_t> rec = store.mapped_records(*saved);
    std::copy(rec.begin(), rec.end(), s.training.begin());
    if (o.optimizer == TrainOptimizer::kAdagrad) {
      TROVE_ASSIGN_OR_RETURN(s.accum, store.read_dense(*saved, "adagrad"));
      if (s.accum.size() != sz(n * rows)) {
        return Status::corruption(o.store + ": training state 'adagrad' has the wrong size");
      }
    }
  } else {
    TROVE_RETURN_IF_ERROR(train_import_records(layer.record, training, s.serving.data(), n,
                                               s.training.data(), o.threads));
  }

  PeerDenseParams params;
  TROVE_ASSIGN_OR_RETURN(params.query_weight, store.read_dense(*layer.info, "query.weight"));
  TROVE_ASSIGN_OR_RETURN(params.keys, store.read_dense(*layer.info, "keys"));
  if (c.query_bias) {
    TROVE_ASSIGN_OR_RETURN(params.query_bias, store.read_dense(*layer.info, "query.bias"));
  }
  if (c.input_norm == InputNorm::kRms) {
    TROVE_ASSIGN_OR_RETURN(params.norm_weight, store.read_dense(*layer.info, "norm.weight"));
  }
  TROVE_ASSIGN_OR_RETURN(
      PeerLayer student,
      PeerLayer::create(c, std::move(params),
                        std::make_unique<BufferExpertSource>(layer.record, &s.serving), lo));

  TrainReport report;
  report.start_step = s.step;
  report.state_bytes = s.training.size() + s.accum.size() * sizeof(float);
  const int64_t T = o.batch;
  std::vector<float> x, y(sz(T * c.dim_out)), yt(y.size()), dy(y.size());
  std::vector<uint8_t> scratch, exported;  // per step, reused
  std::vector<float> accum_scratch;
  PeerGrads grads;
  TrainStep ts;
  ts.optimizer = o.optimizer;
  ts.lr = o.lr;
  ts.seed = o.seed;
  ts.table = 0;

  auto checkpoint = [&]() -> Status {
    const Stopwatch t0;
    TROVE_RETURN_IF_ERROR(write_checkpoint(o, store, layer, training, s));
    report.checkpoint_seconds += t0.seconds();
    ++report.checkpoints;
    struct stat st {};
    if (::stat(o.store.c_str(), &st) == 0)
      report.checkpoint_bytes = static_cast<uint64_t>(st.st_size);
    if (o.checkpointed) o.checkpointed(s.step);
    return Status::ok_status();
  };

  while (s.step < o.steps) {
    const Stopwatch t0;
    TROVE_RETURN_IF_ERROR(inputs.fill(s.step, &x));
    TROVE_RETURN_IF_ERROR(teach(x, T, &yt));
    TROVE_RETURN_IF_ERROR(student.forward(x, T, y));
    double loss = 0;
    const float scale = 2.0f / static_cast<float>(T * c.dim_out);
    for (size_t i = 0; i < y.size(); ++i) {
      const float e = y[i] - yt[i];
      loss += static_cast<double>(e) * e;
      dy[i] = scale * e;
    }
    loss /= static_cast<double>(y.size());
    TROVE_RETURN_IF_ERROR(student.backward(x, T, dy, &grads));

    // The touched experts' training records, updated together, then exported for serving.
    const int64_t u = static_cast<int64_t>(grads.expert_ids.size());
    scratch.resize(sz(u) * training.stride);
    accum_scratch.resize(sz(u * rows));
    for (int64_t i = 0; i < u; ++i) {
      const int64_t id = grads.expert_ids[sz(i)];
      std::memcpy(&scratch[sz(i) * training.stride], &s.training[sz(id) * training.stride],
                  training.stride);
      std::copy_n(&s.accum[sz(id * rows)], rows, &accum_scratch[sz(i * rows)]);
    }
    ts.step = static_cast<uint64_t>(s.step);
    Result<TrainStats> st = train_update_records(
        training, ts, grads.expert_ids.data(), u, grads.d_down.data(), grads.d_up.data(),
        scratch.data(), o.optimizer == TrainOptimizer::kAdagrad ? accum_scratch.data() : nullptr,
        o.threads);
    if (!st.ok()) {
      return st.status().with_context(str_printf("step %lld", static_cast<long long>(s.step)));
    }
    exported.resize(sz(u) * layer.record.stride);
    TROVE_RETURN_IF_ERROR(train_export_records(layer.record, training, scratch.data(), u,
                                               exported.data(), o.threads));
    for (int64_t i = 0; i < u; ++i) {
      const int64_t id = grads.expert_ids[sz(i)];
      std::memcpy(&s.training[sz(id) * training.stride], &scratch[sz(i) * training.stride],
                  training.stride);
      std::copy_n(&accum_scratch[sz(i * rows)], rows, &s.accum[sz(id * rows)]);
      std::memcpy(&s.serving[sz(id) * layer.record.stride], &exported[sz(i) * layer.record.stride],
                  layer.record.stride);
    }
    ++s.step;
    report.seconds += t0.seconds();
    report.losses.push_back(loss);
    report.tokens += T;
    report.expert_updates += u;
    report.rescales += st->rescales;
    report.elements_changed += st->elements_changed;
    if (o.progress) o.progress(s.step, o.steps, loss);
    if ((o.checkpoint_every > 0 && s.step % o.checkpoint_every == 0) || s.step == o.steps) {
      TROVE_RETURN_IF_ERROR(checkpoint());
    }
  }
  report.steps = s.step;
  return report;
}

}  // namespace trove
