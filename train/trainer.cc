#include "train/trainer.h"

#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>

#include "base/numeric.h"
#include "base/random.h"
#include "base/stopwatch.h"
#include "base/strings.h"
#include "base/thread_pool.h"
#include "kernels/cpu/train.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/peer_config_json.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/store_layer.h"
#include "runtime/tiers/overlay_source.h"
#include "storage/safetensors.h"
#include "storage/store.h"
#include "storage/store_update.h"
#include "train/adam.h"

namespace trove {

namespace {

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

// The router tensors in the order of PeerDenseParams; a layer has the ones its config asks for.
constexpr const char* kRouterTensors[] = {"query.weight", "query.bias", "keys", "norm.weight"};

template <typename Params>  // PeerDenseParams, const or not
auto* router_tensor(Params& p, int i) {
  decltype(&p.keys) all[] = {&p.query_weight, &p.query_bias, &p.keys, &p.norm_weight};
  return all[i];
}

const std::vector<float>& router_grad(const PeerGrads& g, int i) {
  const std::vector<float>* all[] = {&g.d_query_weight, &g.d_query_bias, &g.d_keys,
                                     &g.d_norm_weight};
  return *all[i];
}

// One trained layer: its student, its teacher, and what a checkpoint holds of it.
//
// Records live in the store: the serving int4 table (read through a mapped or a tiered source)
// and, once the first checkpoint wrote it, the training view in the state layer (mapped). A
// step reads the touched experts' training records (the state layer's, or the int4 records
// imported when there is no state yet), updates them and keeps the results in two overlays,
// the training records and their int4 export, which the student computes on from then on. A
// checkpoint writes the overlays into the store as a new generation and empties them, so the
// memory held is the records changed since the last checkpoint, the optimizer states (8
// bytes per expert row pair for Adagrad, 2 floats per router weight for Adam) and the tier.
struct LayerRun {
  std::string name;
  std::string teacher_name;  // the teacher's layer (kPeer) or tensor prefix (kMlp)
  uint32_t table = 0;        // the SR hash's table input: the layer's index in --layer order
  StoredLayer stored;
  RecordLayout training;
  std::optional<PeerLayer> teacher_peer;
  std::optional<MlpTeacher> teacher_mlp;
  std::optional<InputSource> inputs;

  std::unique_ptr<RecordOverlay> dirty_training;  // int8 training records changed
  std::unique_ptr<RecordOverlay> dirty_serving;   // their int4 export
  OverlayExpertSource* serving = nullptr;         // the student's source (the layer owns it)
  TieredExpertSource* tier = nullptr;             // its base when --host, else null
  std::unique_ptr<OverlayExpertSource> unbound;   // the source before the student takes it
  std::unique_ptr<ExpertSource> training_base;    // the state layer, or null before the first
                                                  // checkpoint (then imported from serving)
  bool has_adam_state = false;                    // the state layer holds Adam's moments
  std::vector<float> accum;                       // N x 2m Adagrad accumulators
  std::vector<float> adam_m[4], adam_v[4];        // the router's Adam moments (--train-router)
  std::optional<PeerLayer> student;

  // Per-step scratch.
  std::vector<float> x, y, yt, dy;
  std::vector<int64_t> clean_ids;
  std::vector<size_t> clean_at;
  std::vector<const uint8_t*> clean_records;
  std::vector<uint8_t> scratch, exported, imported, converted;
  std::vector<float> accum_scratch;
  PeerGrads grads;

  int64_t rows() const { return 2 * stored.config.expert_width; }
  uint64_t optimizer_bytes() const {
    uint64_t b = accum.size() * sizeof(float);
    for (int i = 0; i < 4; ++i) b += (adam_m[i].size() + adam_v[i].size()) * sizeof(float);
    return b;
  }
  uint64_t dirty_bytes() const { return dirty_training->bytes() + dirty_serving->bytes(); }
};

std::string adam_name(const char* moment, int i) {
  return str_printf("adam.%s.%s", moment, kRouterTensors[i]);
}

// What a resumed run must share with the run that wrote the checkpoint to continue it: the
// flags that decide the steps' inputs, gradients and updates.
nlohmann::json resume_flags(const TrainOptions& o, const LayerRun& r) {
  return {{"seed", o.seed},
          {"optimizer", optimizer_name(o.optimizer)},
          {"table", r.table},
          {"batch", o.batch},
          {"inputs", o.inputs},
          {"teacher", o.teacher},
          {"teacher_layer", r.teacher_name},
          {"lr", o.lr},
          {"train_router", o.train_router},
          {"router_lr", o.router_lr},
          {"lr_phases", lr_phases_text(o.lr_phases)},
          {"saturation_tolerance", o.saturation_tolerance}};
}

nlohmann::json training_view_info(const TrainOptions& o, const LayerRun& r, int64_t step) {
  nlohmann::json tv = resume_flags(o, r);
  tv["of"] = r.name;
  tv["step"] = step;
  tv["meaning"] = "int8 code b at scale d/16; served int4 q = clamp((b + 8) >> 4, -8, 7)";
  return {{"config", peer_config_to_json(r.stored.config)},
          {"record", record_layout_json(r.training)},
          {"training_view", tv}};
}

nlohmann::json trained_provenance(const TrainOptions& o, const StoreReader& store, int64_t step) {
  nlohmann::json provenance = store.provenance();
  provenance["trained"] = {{"tool", "trove train"},
                           {"teacher", o.teacher},
                           {"step", step},
                           {"optimizer", optimizer_name(o.optimizer)},
                           {"lr", o.lr},
                           {"train_router", o.train_router},
                           {"seed", o.seed}};
  return provenance;
}

// The training records of `ids` (ascending) into out[i * stride]: the overlay's when changed,
// else the state layer's, else the committed int4 records (from `committed`) imported.
Status read_training_records(const TrainOptions& o, LayerRun* r, ExpertSource& committed,
                             std::span<const int64_t> ids, uint8_t* out) {
  const size_t stride = r->training.stride;
  r->clean_ids.clear();
  r->clean_at.clear();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (const uint8_t* d = r->dirty_training->find(ids[i])) {
      std::memcpy(out + i * stride, d, stride);
    } else {
      r->clean_ids.push_back(ids[i]);
      r->clean_at.push_back(i);
    }
  }
  if (r->clean_ids.empty()) return Status::ok_status();
  r->clean_records.assign(r->clean_ids.size(), nullptr);
  if (r->training_base) {
    TROVE_RETURN_IF_ERROR(r->training_base->acquire(r->clean_ids, r->clean_records));
    for (size_t j = 0; j < r->clean_ids.size(); ++j) {
      std::memcpy(out + r->clean_at[j] * stride, r->clean_records[j], stride);
    }
    r->training_base->release(r->clean_ids);
    return Status::ok_status();
  }
  // No training state yet: import the committed int4 records (not the overlay's: an expert
  // not in the training overlay was never updated).
  const size_t sstride = r->stored.record.stride;
  TROVE_RETURN_IF_ERROR(committed.acquire(r->clean_ids, r->clean_records));
  r->imported.resize(r->clean_ids.size() * sstride);
  for (size_t j = 0; j < r->clean_ids.size(); ++j) {
    std::memcpy(&r->imported[j * sstride], r->clean_records[j], sstride);
  }
  committed.release(r->clean_ids);
  r->converted.resize(r->clean_ids.size() * stride);
  TROVE_RETURN_IF_ERROR(train_import_records(r->stored.record, r->training, r->imported.data(),
                                             static_cast<int64_t>(r->clean_ids.size()),
                                             r->converted.data(), o.threads));
  for (size_t j = 0; j < r->clean_ids.size(); ++j) {
    std::memcpy(out + r->clean_at[j] * stride, &r->converted[j * stride], stride);
  }
  return Status::ok_status();
}

// The records of one acquire() read from the store into a buffer of its own (verified; I/O
// errors name the expert), kept only until the next: a whole table streamed through it is never
// all in memory at once.
class ChunkStoreSource final : public ExpertSource {
 public:
  ChunkStoreSource(const StoreReader& store, const StoreLayerInfo& layer,
                   const RecordLayout& layout)
      : store_(store), layer_(layer), layout_(layout) {}
  const RecordLayout& layout() const override { return layout_; }
  int64_t num_experts() const override { return static_cast<int64_t>(layer_.table.count); }
  std::string describe() const override {
    return "store " + store_.path() + ", layer " + layer_.name;
  }
  Status acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override {
    buffer_.resize(ids.size() * layout_.stride);
    TROVE_RETURN_IF_ERROR(store_.read_records(layer_, ids, buffer_));
    for (size_t i = 0; i < ids.size(); ++i) records[i] = buffer_.data() + i * layout_.stride;
    return Status::ok_status();
  }
  void release(std::span<const int64_t>) override {}

 private:
  const StoreReader& store_;
  const StoreLayerInfo& layer_;
  RecordLayout layout_;
  std::vector<uint8_t> buffer_;
};

// Streams every record of a table, in id order and in chunks, to `sink`.
Status stream_table(int64_t n, size_t stride,
                    const std::function<Status(std::span<const int64_t>, uint8_t*)>& read,
                    const std::function<Status(std::span<const uint8_t>)>& sink) {
  constexpr int64_t kChunk = 4096;
  std::vector<int64_t> ids;
  std::vector<uint8_t> bytes;
  for (int64_t first = 0; first < n; first += kChunk) {
    const int64_t count = std::min(kChunk, n - first);
    ids.resize(sz(count));
    for (int64_t i = 0; i < count; ++i) ids[sz(i)] = first + i;
    bytes.resize(sz(count) * stride);
    TROVE_RETURN_IF_ERROR(read(ids, bytes.data()));
    TROVE_RETURN_IF_ERROR(sink(bytes));
  }
  return Status::ok_status();
}

// The first checkpoint (no training state in the store yet, or one without the Adam moments
// --train-router now needs): the store is rewritten whole, atomically, with the trained
// layers' records and routers and their state layers. Streams the tables; records read from
// the store are verified on the way.
Status rewrite_store(const TrainOptions& o, const StoreReader& store, std::vector<LayerRun>& runs,
                     int64_t step, StoreLock* lock) {
  TROVE_ASSIGN_OR_RETURN(StoreWriter w,
                         StoreWriter::create(o.store, trained_provenance(o, store, step)));
  auto run_of = [&](const std::string& name) -> LayerRun* {
    for (LayerRun& r : runs) {
      if (r.name == name) return &r;
    }
    return nullptr;
  };
  // Committed records come from the store, chunk by chunk, each verified (the host tier, if
  // any, may hold fewer records than a chunk), changed ones from the overlays.
  std::vector<std::unique_ptr<ChunkStoreSource>> committed;
  for (LayerRun& r : runs) {
    committed.push_back(std::make_unique<ChunkStoreSource>(store, *r.stored.info, r.stored.record));
  }
  auto serving_reader = [](LayerRun* r, ExpertSource* source) {
    return [r, source](std::span<const int64_t> ids, uint8_t* out) -> Status {
      const size_t stride = r->stored.record.stride;
      std::vector<const uint8_t*> recs(ids.size());
      TROVE_RETURN_IF_ERROR(source->acquire(ids, recs));
      for (size_t i = 0; i < ids.size(); ++i) {
        const uint8_t* changed = r->dirty_serving->find(ids[i]);
        std::memcpy(out + i * stride, changed != nullptr ? changed : recs[i], stride);
      }
      source->release(ids);
      return Status::ok_status();
    };
  };
  auto append = [&](std::span<const uint8_t> b) { return w.append_records(b); };
  for (const StoreLayerInfo& info : store.layers()) {
    bool state_layer = false;
    for (const LayerRun& r : runs) state_layer |= info.name == train_state_layer_name(r.name);
    if (state_layer) continue;  // written anew below
    LayerRun* run = run_of(info.name);
    StoreTableSpec table{info.table.dtype, info.table.count, info.table.record_bytes,
                         info.table.stride};
    TROVE_RETURN_IF_ERROR(w.begin_layer(info.name, info.info, table));
    if (run != nullptr) {
      ExpertSource* source = committed[static_cast<size_t>(run - runs.data())].get();
      TROVE_RETURN_IF_ERROR(stream_table(run->stored.config.num_experts(),
                                         run->stored.record.stride, serving_reader(run, source),
                                         append));
    } else {
      // Read (and verified) through checked I/O: a bad sector is an error naming the expert.
      TROVE_RETURN_IF_ERROR(stream_table(
          static_cast<int64_t>(info.table.count), info.table.stride,
          [&](std::span<const int64_t> ids, uint8_t* out) {
            return store.read_records(info, ids, {out, ids.size() * info.table.stride});
          },
          append));
    }
    for (const StoreDenseInfo& d : info.dense) {
      TROVE_ASSIGN_OR_RETURN(std::vector<float> v, store.read_dense(info, d.name));
      for (int i = 0; run != nullptr && i < 4; ++i) {  // the router as trained
        if (d.name == kRouterTensors[i]) v = *router_tensor(run->student->params(), i);
      }
      TROVE_RETURN_IF_ERROR(w.add_dense(d.name, d.shape, v));
    }
    TROVE_RETURN_IF_ERROR(w.end_layer());
  }
  for (size_t l = 0; l < runs.size(); ++l) {
    LayerRun& r = runs[l];
    const int64_t n = r.stored.config.num_experts();
    StoreTableSpec table{"int8", static_cast<uint64_t>(n), r.training.record_bytes,
                         r.training.stride};
    TROVE_RETURN_IF_ERROR(
        w.begin_layer(train_state_layer_name(r.name), training_view_info(o, r, step), table));
    TROVE_RETURN_IF_ERROR(stream_table(
        n, r.training.stride,
        [&](std::span<const int64_t> ids, uint8_t* out) {
          return read_training_records(o, &r, *committed[l], ids, out);
        },
        append));
    // The router again (small beside the tables), so the state layer reads back as a complete
    // layer description for `trove inspect` and verify.
    for (const StoreDenseInfo& d : r.stored.info->dense) {
      for (int i = 0; i < 4; ++i) {
        if (d.name == kRouterTensors[i]) {
          TROVE_RETURN_IF_ERROR(
              w.add_dense(d.name, d.shape, *router_tensor(r.student->params(), i)));
        }
      }
    }
    if (o.optimizer == TrainOptimizer::kAdagrad) {
      TROVE_RETURN_IF_ERROR(w.add_dense("adagrad", {n, r.rows()}, r.accum));
    }
    for (int i = 0; i < 4; ++i) {
      if (r.adam_m[i].empty()) continue;
      const int64_t len = static_cast<int64_t>(r.adam_m[i].size());
      TROVE_RETURN_IF_ERROR(w.add_dense(adam_name("m", i), {len}, r.adam_m[i]));
      TROVE_RETURN_IF_ERROR(w.add_dense(adam_name("v", i), {len}, r.adam_v[i]));
    }
    TROVE_RETURN_IF_ERROR(w.end_layer());
  }
  return w.finish(lock);  // the run's writer lock moves to the new file
}

// Every later checkpoint: the changed records (both tables), the optimizer states, the router
// and the step, written in place as the store's next generation (storage/store_update.h: a
// crash at any moment leaves the old or the new generation whole).
Result<StoreUpdateStats> update_store(const TrainOptions& o, const StoreReader& store,
                                      std::vector<LayerRun>& runs, int64_t step,
                                      const StoreLock& lock) {
  StoreUpdateOptions options;
  options.lock = &lock;
  TROVE_ASSIGN_OR_RETURN(StoreUpdate u, StoreUpdate::begin(o.store, options));
  std::vector<uint8_t> bytes;
  for (LayerRun& r : runs) {
    const std::string state = train_state_layer_name(r.name);
    const std::vector<int64_t> ids = r.dirty_training->sorted_ids();
    for (RecordOverlay* overlay : {r.dirty_serving.get(), r.dirty_training.get()}) {
      bytes.resize(ids.size() * overlay->stride());
      for (size_t i = 0; i < ids.size(); ++i) {
        std::memcpy(&bytes[i * overlay->stride()], overlay->find(ids[i]), overlay->stride());
      }
      TROVE_RETURN_IF_ERROR(
          u.put_records(overlay == r.dirty_serving.get() ? r.name : state, ids, bytes));
    }
    if (o.optimizer == TrainOptimizer::kAdagrad) {
      TROVE_RETURN_IF_ERROR(u.put_dense(state, "adagrad", r.accum));
    }
    if (o.train_router) {
      for (int i = 0; i < 4; ++i) {
        const std::vector<float>& t = *router_tensor(r.student->params(), i);
        if (t.empty()) continue;
        TROVE_RETURN_IF_ERROR(u.put_dense(r.name, kRouterTensors[i], t));
        TROVE_RETURN_IF_ERROR(u.put_dense(state, kRouterTensors[i], t));
        TROVE_RETURN_IF_ERROR(u.put_dense(state, adam_name("m", i), r.adam_m[i]));
        TROVE_RETURN_IF_ERROR(u.put_dense(state, adam_name("v", i), r.adam_v[i]));
      }
    }
    TROVE_RETURN_IF_ERROR(u.set_layer_info(state, training_view_info(o, r, step)));
  }
  TROVE_RETURN_IF_ERROR(u.set_provenance(trained_provenance(o, store, step)));
  TROVE_RETURN_IF_ERROR(u.commit().status());
  return u.stats();
}

// A layer's sources over `store` (just opened, or reopened at a new generation): the serving
// table through the tier (or mapped), the state layer mapped when there is one.
struct LayerSources {
  StoredLayer stored;
  std::unique_ptr<ExpertSource> serving;
  TieredExpertSource* tier = nullptr;      // serving, when it is a host tier
  std::unique_ptr<ExpertSource> training;  // null before the first checkpoint
  bool has_adam_state = false;
};

// With `keep_tier` the layer's host tier stays (refreshed by the caller) and s.serving is null.
Result<LayerSources> open_sources(const TrainOptions& o, const StoreReader& store,
                                  const LayerRun& run, bool keep_tier = false) {
  LayerSources s;
  TROVE_ASSIGN_OR_RETURN(s.stored, load_stored_layer(store, run.name));
  if (keep_tier) {
    // The tier over the file updated in place: refreshed, not reopened (it stays warm).
  } else if (o.tiers.has_value()) {
    TROVE_ASSIGN_OR_RETURN(
        auto tiered, TieredExpertSource::open(store, *s.stored.info, s.stored.record, *o.tiers));
    s.tier = tiered.get();
    s.serving = std::move(tiered);
  } else {
    TROVE_ASSIGN_OR_RETURN(s.serving,
                           ResidentStoreExpertSource::open(store, *s.stored.info, s.stored.record));
  }
  if (const StoreLayerInfo* saved = store.find_layer(train_state_layer_name(run.name))) {
    TROVE_ASSIGN_OR_RETURN(s.training,
                           ResidentStoreExpertSource::open(store, *saved, run.training));
    s.has_adam_state = saved->find_dense(adam_name("m", 0)) != nullptr;
  }
  return s;
}

// Puts `s` in place (cannot fail). The first time it also creates the overlays and the
// student's source (left in run->unbound for PeerLayer::create).
void install_sources(LayerSources s, LayerRun* run) {
  run->stored = s.stored;
  if (s.serving == nullptr) {
    // The tier was kept.
  } else if (run->serving != nullptr) {
    run->tier = s.tier;
    run->serving->reset_base(std::move(s.serving));
  } else {
    run->tier = s.tier;
    run->dirty_serving = std::make_unique<RecordOverlay>(run->stored.record.stride);
    run->dirty_training = std::make_unique<RecordOverlay>(run->training.stride);
    auto overlay =
        std::make_unique<OverlayExpertSource>(std::move(s.serving), run->dirty_serving.get());
    run->serving = overlay.get();
    run->unbound = std::move(overlay);
  }
  run->training_base = std::move(s.training);
  run->has_adam_state = s.has_adam_state;
}

// Opens layer `run->name` of the student store, its teacher, its inputs and its optimizer
// state (from the last checkpoint, or fresh); returns the checkpoint's step (0 when none).
Result<int64_t> open_layer(const TrainOptions& o, const StoreReader& store,
                           const std::string& teacher_name,
                           const std::optional<StoreReader>& teacher_store, LayerRun* run) {
  TROVE_ASSIGN_OR_RETURN(run->stored, load_stored_layer(store, run->name));
  const PeerConfig& c = run->stored.config;
  const StoreLayerInfo& info = *run->stored.info;
  if (run->stored.record.dtype != DType::kI4) {
    return Status::invalid_argument(
        str_printf("%s: layer %s holds %s records; trove train trains int4 tables in place "
                   "(pack the student with --quant int4)",
                   o.store.c_str(), run->name.c_str(),
                   std::string(dtype_name(run->stored.record.dtype)).c_str()));
  }
  TROVE_ASSIGN_OR_RETURN(run->training,
                         RecordLayout::make(DType::kI8, c.dim, c.dim_out, c.expert_width));
  const int64_t n = c.num_experts();

  PeerLayerOptions lo;
  lo.threads = o.threads;
  if (o.teacher_kind == TrainOptions::TeacherKind::kMlp) {
    TROVE_ASSIGN_OR_RETURN(MlpTeacher m,
                           MlpTeacher::open(o.teacher, teacher_name, c.dim, c.dim_out));
    run->teacher_mlp.emplace(std::move(m));
  } else {
    TROVE_ASSIGN_OR_RETURN(PeerLayer t, PeerLayer::open(*teacher_store, teacher_name, lo));
    if (t.config().dim != c.dim || t.config().dim_out != c.dim_out) {
      return Status::invalid_argument(str_printf(
          "teacher %s layer %s maps %lld -> %lld; the student layer %s maps %lld -> %lld",
          o.teacher.c_str(), teacher_name.c_str(), (long long)t.config().dim,
          (long long)t.config().dim_out, run->name.c_str(), (long long)c.dim,
          (long long)c.dim_out));
    }
    run->teacher_peer.emplace(std::move(t));
  }
  TROVE_ASSIGN_OR_RETURN(InputSource in, InputSource::make(o.inputs, c.dim, o.batch, o.seed));
  run->inputs.emplace(std::move(in));

  PeerDenseParams params;
  TROVE_ASSIGN_OR_RETURN(params.query_weight, store.read_dense(info, "query.weight"));
  TROVE_ASSIGN_OR_RETURN(params.keys, store.read_dense(info, "keys"));
  if (c.query_bias) {
    TROVE_ASSIGN_OR_RETURN(params.query_bias, store.read_dense(info, "query.bias"));
  }
  if (c.input_norm == InputNorm::kRms) {
    TROVE_ASSIGN_OR_RETURN(params.norm_weight, store.read_dense(info, "norm.weight"));
  }

  int64_t step = 0;
  run->accum.assign(sz(n * run->rows()), 0.0f);
  if (const StoreLayerInfo* saved = store.find_layer(train_state_layer_name(run->name))) {
    const nlohmann::json& tv = saved->info.value("training_view", nlohmann::json());
    std::string differ;
    const nlohmann::json flags = resume_flags(o, *run);
    for (const auto& [key, now] : flags.items()) {
      const nlohmann::json was =
          tv.is_object() ? tv.value(key, nlohmann::json()) : nlohmann::json();
      if (was != now)
        differ += str_printf("%s%s %s, now %s", differ.empty() ? "" : "; ", key.c_str(),
                             was.dump().c_str(), now.dump().c_str());
    }
    if (saved->table.count != static_cast<uint64_t>(n) ||
        saved->table.stride != run->training.stride) {
      differ += "; the training table's size";
    }
    if (!differ.empty()) {
      return Status::invalid_argument(str_printf(
          "%s holds a checkpoint of layer %s written with other flags (%s); resume with the flags "
          "it was written with (another seed, optimizer, layer list, batch, inputs, teacher, rate "
          "or tolerance would not continue the same run), or train a fresh copy of the store",
          o.store.c_str(), run->name.c_str(), differ.c_str()));
    }
    step = tv.value("step", int64_t{0});
    if (o.optimizer == TrainOptimizer::kAdagrad) {
      TROVE_ASSIGN_OR_RETURN(run->accum, store.read_dense(*saved, "adagrad"));
      if (run->accum.size() != sz(n * run->rows())) {
        return Status::corruption(o.store + ": training state 'adagrad' of layer " + run->name +
                                  " has the wrong size");
      }
    }
    for (int i = 0; i < 4; ++i) {
      if (saved->find_dense(adam_name("m", i)) == nullptr) continue;
      TROVE_ASSIGN_OR_RETURN(run->adam_m[i], store.read_dense(*saved, adam_name("m", i)));
      TROVE_ASSIGN_OR_RETURN(run->adam_v[i], store.read_dense(*saved, adam_name("v", i)));
      if (run->adam_m[i].size() != router_tensor(params, i)->size() ||
          run->adam_v[i].size() != router_tensor(params, i)->size()) {
        return Status::corruption(o.store + ": training state " + adam_name("m", i) + " of layer " +
                                  run->name + " has the wrong size");
      }
    }
  }
  if (o.train_router) {
    for (int i = 0; i < 4; ++i) {
      const size_t len = router_tensor(params, i)->size();
      if (run->adam_m[i].size() != len) {
        run->adam_m[i].assign(len, 0.0f);
        run->adam_v[i].assign(len, 0.0f);
      }
    }
  }
  TROVE_ASSIGN_OR_RETURN(LayerSources sources, open_sources(o, store, *run));
  install_sources(std::move(sources), run);
  TROVE_ASSIGN_OR_RETURN(PeerLayer student,
                         PeerLayer::create(c, std::move(params), std::move(run->unbound), lo));
  run->student.emplace(std::move(student));
  TROVE_RETURN_IF_ERROR(run->student->check_batch(o.batch));
  return step;
}

// The int4 update's parameters at `step` for the table of `layer` (index `table`).
TrainStep update_step(const TrainOptions& o, int64_t step, const std::string& layer,
                      uint32_t table) {
  TrainStep ts;
  ts.optimizer = o.optimizer;
  ts.lr = phase_lr(o.lr_phases, step, layer, false, o.lr);
  ts.seed = o.seed;
  ts.step = static_cast<uint64_t>(step);
  ts.table = table;
  ts.saturation_tolerance = o.saturation_tolerance;
  return ts;
}

// One optimizer step of one layer: forward, loss, backward, the int4 update of the touched
// experts and (with --train-router) Adam on the router. Returns the layer's loss.
Result<double> train_layer_step(const TrainOptions& o, int64_t step, LayerRun* r,
                                Metrics* metrics) {
  const PeerConfig& c = r->stored.config;
  const int64_t T = o.batch;
  r->y.resize(sz(T * c.dim_out));
  r->yt.resize(r->y.size());
  r->dy.resize(r->y.size());
  TROVE_RETURN_IF_ERROR(r->inputs->fill(step, &r->x));
  if (r->teacher_mlp) {
    r->teacher_mlp->forward(r->x, T, &r->yt, o.threads);
  } else {
    TROVE_RETURN_IF_ERROR(r->teacher_peer->forward(r->x, T, r->yt));
  }
  TROVE_RETURN_IF_ERROR(r->student->forward(r->x, T, r->y));
  double loss = 0;
  const float scale = 2.0f / static_cast<float>(T * c.dim_out);
  for (size_t i = 0; i < r->y.size(); ++i) {
    const float e = r->y[i] - r->yt[i];
    loss += static_cast<double>(e) * e;
    r->dy[i] = scale * e;
  }
  loss /= static_cast<double>(r->y.size());
  TROVE_RETURN_IF_ERROR(r->student->backward(r->x, T, r->dy, &r->grads));

  // The touched experts' training records, updated together, then exported for serving.
  const PeerGrads& g = r->grads;
  const RecordLayout& training = r->training;
  const RecordLayout& serving = r->stored.record;
  const int64_t rows = r->rows();
  const int64_t u = static_cast<int64_t>(g.expert_ids.size());
  const Stopwatch update_time;
  r->scratch.resize(sz(u) * training.stride);
  TROVE_RETURN_IF_ERROR(
      read_training_records(o, r, r->serving->base(), g.expert_ids, r->scratch.data()));
  r->accum_scratch.resize(sz(u * rows));
  for (int64_t i = 0; i < u; ++i) {
    std::copy_n(&r->accum[sz(g.expert_ids[sz(i)] * rows)], rows, &r->accum_scratch[sz(i * rows)]);
  }
  const TrainStep ts = update_step(o, step, r->name, r->table);
  Result<TrainStats> st = train_update_records(
      training, ts, g.expert_ids.data(), u, g.d_down.data(), g.d_up.data(), r->scratch.data(),
      o.optimizer == TrainOptimizer::kAdagrad ? r->accum_scratch.data() : nullptr, o.threads);
  if (!st.ok()) {
    return st.status().with_context(
        str_printf("layer %s, step %lld", r->name.c_str(), static_cast<long long>(step)));
  }
  r->exported.resize(sz(u) * serving.stride);
  TROVE_RETURN_IF_ERROR(
      train_export_records(serving, training, r->scratch.data(), u, r->exported.data(), o.threads));
  for (int64_t i = 0; i < u; ++i) {
    const int64_t id = g.expert_ids[sz(i)];
    std::memcpy(r->dirty_training->put(id), &r->scratch[sz(i) * training.stride], training.stride);
    std::memcpy(r->dirty_serving->put(id), &r->exported[sz(i) * serving.stride], serving.stride);
    std::copy_n(&r->accum_scratch[sz(i * rows)], rows, &r->accum[sz(id * rows)]);
  }
  metrics->observe("latency.update", update_time.seconds());
  metrics->count("update.bytes",
                 u * static_cast<int64_t>(
                         2 * training.stride + serving.stride +
                         sizeof(float) * static_cast<uint64_t>(
                                             2 * rows + c.expert_width * (c.dim + c.dim_out))));
  if (o.train_router) {
    const float lr = phase_lr(o.lr_phases, step, r->name, true, o.router_lr);
    PeerDenseParams& p = r->student->mutable_params();
    for (int i = 0; i < 4; ++i) {
      std::vector<float>& t = *router_tensor(p, i);
      if (t.empty()) continue;
      adam_step(t, router_grad(g, i), r->adam_m[i], r->adam_v[i], lr, step + 1);
    }
  }
  *metrics += train_step_metrics(*st, u);
  return loss;
}

}  // namespace

Metrics train_step_metrics(const TrainStats& s, int64_t experts) {
  Metrics m;
  m.count("expert_updates", experts);
  m.count("elements_changed", s.elements_changed);
  m.count("rescales", s.rescales);
  m.count("clamps", s.clamps);
  m.count("scale_inits", s.scale_inits);
  return m;
}

std::string train_state_layer_name(const std::string& layer) {
  return layer + ".train";
}

Result<TrainReport> run_train(const TrainOptions& o) {
  if (o.steps < 1 || o.batch < 1 || o.checkpoint_every < 0 || !(o.lr > 0) || !std::isfinite(o.lr) ||
      !(o.router_lr > 0) || !std::isfinite(o.router_lr)) {
    return Status::invalid_argument(str_printf(
        "train: --steps %lld and --batch %lld must be >= 1, --checkpoint-every %lld >= 0, --lr %g "
        "and --router-lr %g positive numbers",
        (long long)o.steps, (long long)o.batch, (long long)o.checkpoint_every, (double)o.lr,
        (double)o.router_lr));
  }
  // The update's own checks (tolerance, eps), before any work.
  TROVE_RETURN_IF_ERROR(check_train_step(update_step(o, 0, "", 0)).with_context("train"));
  if (o.layers.empty()) return Status::invalid_argument("train: no --layer given");
  if (!o.teacher_layers.empty() && o.teacher_layers.size() != o.layers.size()) {
    return Status::invalid_argument(str_printf(
        "train: %zu --teacher-layer for %zu --layer; give one per layer, in the same order, or "
        "none (the teacher's layers then have the students' names)",
        o.teacher_layers.size(), o.layers.size()));
  }
  for (size_t i = 0; i < o.layers.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (o.layers[i] == o.layers[j]) {
        return Status::invalid_argument("train: layer " + o.layers[i] + " is named twice");
      }
    }
  }
  TROVE_RETURN_IF_ERROR(check_lr_phase_groups(o.lr_phases, o.layers, o.train_router));
  // The run is the store's one writer from here to its end: a second `trove train` of the store
  // is refused now ("busy"), not at its first checkpoint, and readers never take the lock.
  TROVE_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(o.store));
  // This process's own readers do not pin their generation: nothing but this run changes the
  // store, and a pin would make its own commits wait for it.
  StoreOpenOptions own;
  own.pin_generation = false;
  // The store is reopened at every new generation; the layers' sources follow it.
  TROVE_ASSIGN_OR_RETURN(StoreReader opened, StoreReader::open(o.store, own));
  auto store = std::make_unique<StoreReader>(std::move(opened));
  std::optional<StoreReader> teacher_store;
  if (o.teacher_kind == TrainOptions::TeacherKind::kPeer) {
    TROVE_ASSIGN_OR_RETURN(StoreReader ts, StoreReader::open(o.teacher));
    teacher_store.emplace(std::move(ts));
  }

  std::vector<LayerRun> runs(o.layers.size());
  int64_t start = -1;
  for (size_t i = 0; i < runs.size(); ++i) {
    runs[i].name = o.layers[i];
    runs[i].table = static_cast<uint32_t>(i);
    runs[i].teacher_name = o.teacher_layers.empty() ? o.layers[i] : o.teacher_layers[i];
    TROVE_ASSIGN_OR_RETURN(int64_t step,
                           open_layer(o, *store, runs[i].teacher_name, teacher_store, &runs[i]));
    if (start >= 0 && step != start) {
      return Status::invalid_argument(str_printf(
          "%s: layer %s is checkpointed at step %lld but layer %s at step %lld (a layer added to "
          "or trained apart from the others); train the same layers together from the start, "
          "or train a fresh copy of the store",
          o.store.c_str(), runs[0].name.c_str(), (long long)start, runs[i].name.c_str(),
          (long long)step));
    }
    start = step;
  }

  TrainReport report;
  report.start_step = start;
  report.layer_losses.resize(runs.size());
  for (const LayerRun& r : runs) report.optimizer_bytes += r.optimizer_bytes();
  int64_t step = start;

  auto checkpoint = [&]() -> Status {
    const Stopwatch t0;
    Metrics cm;
    bool whole = false;  // no state layer yet, or one without the Adam moments now needed
    for (const LayerRun& r : runs)
      whole |= !r.training_base || (o.train_router && !r.has_adam_state);
    uint64_t dirty = 0;
    for (const LayerRun& r : runs) dirty += r.dirty_training->size();
    if (whole) {
      TROVE_RETURN_IF_ERROR(rewrite_store(o, *store, runs, step, &lock));
      struct stat st {};
      if (::stat(o.store.c_str(), &st) == 0) cm.count("checkpoint.bytes_written", st.st_size);
      cm.count("checkpoint.whole_rewrites");
    } else {
      TROVE_ASSIGN_OR_RETURN(StoreUpdateStats us, update_store(o, *store, runs, step, lock));
      cm.count("checkpoint.bytes_written",
               static_cast<int64_t>(us.journal_bytes + us.applied_bytes));
    }
    cm.count("checkpoint.records_written", static_cast<int64_t>(dirty));
    // The new generation: every layer's sources opened first, then all swapped in together.
    TROVE_ASSIGN_OR_RETURN(StoreReader reopened, StoreReader::open(o.store, own));
    auto next = std::make_unique<StoreReader>(std::move(reopened));
    // A host tier over a store updated in place stays warm: its resident copies of the changed
    // records take the new bytes and it reads through the new generation's checksums.
    std::vector<LayerSources> sources;
    for (const LayerRun& r : runs) {
      TROVE_ASSIGN_OR_RETURN(LayerSources ls, open_sources(o, *next, r, !whole && r.tier));
      sources.push_back(std::move(ls));
    }
    for (size_t i = 0; i < runs.size(); ++i) {
      if (sources[i].serving != nullptr) continue;
      const RecordOverlay& changed = *runs[i].dirty_serving;
      TROVE_RETURN_IF_ERROR(runs[i].tier->refresh(*next, *sources[i].stored.info,
                                                  changed.sorted_ids(),
                                                  [&](int64_t id) { return changed.find(id); }));
    }
    for (size_t i = 0; i < runs.size(); ++i) {
      install_sources(std::move(sources[i]), &runs[i]);
      runs[i].dirty_training->clear();
      runs[i].dirty_serving->clear();
    }
    store = std::move(next);
    cm.observe("latency.checkpoint", t0.seconds());
    report.metrics += cm;
    if (o.checkpointed) o.checkpointed(step);
    return Status::ok_status();
  };

  while (step < o.steps) {
    const Stopwatch t0;
    Metrics sm;  // this step's, over the layers
    double loss = 0;
    for (size_t i = 0; i < runs.size(); ++i) {
      TROVE_ASSIGN_OR_RETURN(double l, train_layer_step(o, step, &runs[i], &sm));
      report.layer_losses[i].push_back(l);
      loss += l;
    }
    loss /= static_cast<double>(runs.size());
    ++step;
    sm.observe("latency.step", t0.seconds());
    sm.count("tokens", o.batch);
    report.metrics += sm;
    report.losses.push_back(loss);
    uint64_t dirty = 0;
    for (const LayerRun& r : runs) dirty += r.dirty_bytes();
    report.peak_dirty_bytes = std::max(report.peak_dirty_bytes, dirty);
    if (o.progress) o.progress(step, o.steps, loss);
    if ((o.checkpoint_every > 0 && step % o.checkpoint_every == 0) || step == o.steps ||
        (o.max_dirty_bytes > 0 && dirty >= o.max_dirty_bytes)) {
      TROVE_RETURN_IF_ERROR(checkpoint());
    }
  }
  report.steps = step;
  return report;
}

}  // namespace trove
