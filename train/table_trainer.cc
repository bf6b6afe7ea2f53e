#include "train/table_trainer.h"

#include <algorithm>
#include <cstring>

#include "base/numeric.h"
#include "base/strings.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/train.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/peer_config_json.h"
#include "runtime/tiers/tiered_source.h"
#include "storage/store_update.h"
#include "train/trainer.h"

namespace trove {
namespace {

constexpr const char* kRouterTensors[] = {"query.weight", "query.bias", "keys", "norm.weight"};

const std::vector<float>& router_tensor(const PeerDenseParams& p, int i) {
  const std::vector<float>* all[] = {&p.query_weight, &p.query_bias, &p.keys, &p.norm_weight};
  return *all[i];
}

// The trainer's own readers: unpinned, since it holds the writer lock (storage/store_lock.h).
StoreOpenOptions own_reader() {
  StoreOpenOptions o;
  o.pin_generation = false;
  return o;
}

}  // namespace

TableTrainer::~TableTrainer() = default;

Result<std::unique_ptr<TableTrainer>> TableTrainer::open(const std::string& path,
                                                         const std::string& name,
                                                         PeerLayerOptions options) {
  std::unique_ptr<TableTrainer> t(new TableTrainer());
  t->path_ = path;
  t->name_ = name;
  t->options_ = options;
  // The trainer is the store's one writer while it lives (a second one gets "busy"); its own
  // reader then need not pin the generation (a pin would make its commits wait for itself).
  TROVE_ASSIGN_OR_RETURN(t->lock_, StoreLock::acquire(path));
  TROVE_ASSIGN_OR_RETURN(StoreReader store, StoreReader::open(path, own_reader()));
  t->store_ = std::make_unique<StoreReader>(std::move(store));
  TROVE_ASSIGN_OR_RETURN(t->stored_, load_stored_layer(*t->store_, name));
  const PeerConfig& c = t->stored_.config;
  if (t->stored_.record.dtype != DType::kI4) {
    return Status::invalid_argument(str_printf(
        "%s: layer %s holds %s records; its experts train in place only as int4 (pack it with "
        "quant int4)",
        path.c_str(), name.c_str(), std::string(dtype_name(t->stored_.record.dtype)).c_str()));
  }
  TROVE_ASSIGN_OR_RETURN(t->training_,
                         RecordLayout::make(DType::kI8, c.dim, c.dim_out, c.expert_width));
  t->dirty_serving_ = RecordOverlay(t->stored_.record.stride);
  t->dirty_training_ = RecordOverlay(t->training_.stride);
  t->accum_.assign(sz(c.num_experts() * 2 * c.expert_width), 0.0f);
  if (const StoreLayerInfo* saved = t->store_->find_layer(train_state_layer_name(name))) {
    const nlohmann::json& tv = saved->info.value("training_view", nlohmann::json());
    t->step_ = tv.is_object() ? tv.value("step", int64_t{0}) : 0;
    t->seed_ = tv.is_object() ? tv.value("seed", uint64_t{1}) : 1;
    if (saved->find_dense("adagrad") != nullptr) {
      TROVE_ASSIGN_OR_RETURN(t->accum_, t->store_->read_dense(*saved, "adagrad"));
      if (t->accum_.size() != sz(c.num_experts() * 2 * c.expert_width)) {
        return Status::corruption(path + ": training state 'adagrad' of layer " + name +
                                  " has the wrong size");
      }
    }
  }
  PeerDenseParams params;
  const StoreLayerInfo& info = *t->stored_.info;
  TROVE_ASSIGN_OR_RETURN(params.query_weight, t->store_->read_dense(info, "query.weight"));
  TROVE_ASSIGN_OR_RETURN(params.keys, t->store_->read_dense(info, "keys"));
  if (c.query_bias) {
    TROVE_ASSIGN_OR_RETURN(params.query_bias, t->store_->read_dense(info, "query.bias"));
  }
  if (c.input_norm == InputNorm::kRms) {
    TROVE_ASSIGN_OR_RETURN(params.norm_weight, t->store_->read_dense(info, "norm.weight"));
  }
  TROVE_RETURN_IF_ERROR(t->open_sources());
  TROVE_ASSIGN_OR_RETURN(
      PeerLayer layer,
      PeerLayer::create(c, std::move(params), std::move(t->pending_source_), options));
  t->layer_ = std::make_unique<PeerLayer>(std::move(layer));
  return t;
}

// The serving table (through a host tier or mapped) under the overlay, the committed records
// mapped for imports, and the state layer when the store has one; over store_ as it is now.
Status TableTrainer::open_sources() {
  TROVE_ASSIGN_OR_RETURN(stored_, load_stored_layer(*store_, name_));
  std::unique_ptr<ExpertSource> serving;
  if (options_.tiers.has_value()) {
    TROVE_ASSIGN_OR_RETURN(
        serving, TieredExpertSource::open(*store_, *stored_.info, stored_.record, *options_.tiers));
  } else {
    TROVE_ASSIGN_OR_RETURN(serving,
                           ResidentStoreExpertSource::open(*store_, *stored_.info, stored_.record,
                                                           options_.verify_checksums));
  }
  TROVE_ASSIGN_OR_RETURN(committed_,
                         ResidentStoreExpertSource::open(*store_, *stored_.info, stored_.record,
                                                         options_.verify_checksums));
  training_base_.reset();
  if (const StoreLayerInfo* saved = store_->find_layer(train_state_layer_name(name_))) {
    TROVE_ASSIGN_OR_RETURN(
        training_base_,
        ResidentStoreExpertSource::open(*store_, *saved, training_, options_.verify_checksums));
  }
  if (serving_ != nullptr) {
    serving_->reset_base(std::move(serving));
  } else {
    auto overlay = std::make_unique<OverlayExpertSource>(std::move(serving), &dirty_serving_);
    serving_ = overlay.get();
    pending_source_ = std::move(overlay);
  }
  return Status::ok_status();
}

Status TableTrainer::accumulate(const PeerGrads& g) {
  const PeerConfig& c = stored_.config;
  const size_t down = sz(c.expert_width * c.dim), up = sz(c.expert_width * c.dim_out);
  if (g.d_down.size() != g.expert_ids.size() * down || g.d_up.size() != g.expert_ids.size() * up) {
    return Status::invalid_argument("accumulate: expert gradients of the wrong size");
  }
  for (size_t i = 0; i < g.expert_ids.size(); ++i) {
    auto [it, fresh] = pending_.try_emplace(g.expert_ids[i], pending_.size());
    if (fresh) {
      pending_down_.resize(pending_.size() * down, 0.0f);
      pending_up_.resize(pending_.size() * up, 0.0f);
    }
    float* d = &pending_down_[it->second * down];
    float* u = &pending_up_[it->second * up];
    for (size_t j = 0; j < down; ++j) d[j] += g.d_down[i * down + j];
    for (size_t j = 0; j < up; ++j) u[j] += g.d_up[i * up + j];
  }
  return Status::ok_status();
}

void TableTrainer::zero_grad() {
  pending_.clear();
  pending_down_.clear();
  pending_up_.clear();
}

// The training records of `ids` (ascending): the overlay's when changed since the last
// checkpoint, else the state layer's, else the committed int4 records imported (b = 16 q).
Status TableTrainer::read_training_records(std::span<const int64_t> ids, uint8_t* out) {
  const size_t stride = training_.stride;
  std::vector<int64_t> clean;
  std::vector<size_t> at;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (const uint8_t* d = dirty_training_.find(ids[i])) {
      std::memcpy(out + i * stride, d, stride);
    } else {
      clean.push_back(ids[i]);
      at.push_back(i);
    }
  }
  if (clean.empty()) return Status::ok_status();
  std::vector<const uint8_t*> recs(clean.size());
  if (training_base_) {
    TROVE_RETURN_IF_ERROR(training_base_->acquire(clean, recs));
    for (size_t j = 0; j < clean.size(); ++j) std::memcpy(out + at[j] * stride, recs[j], stride);
    training_base_->release(clean);
    return Status::ok_status();
  }
  const size_t sstride = stored_.record.stride;
  std::vector<uint8_t> serving(clean.size() * sstride), converted(clean.size() * stride);
  TROVE_RETURN_IF_ERROR(committed_->acquire(clean, recs));
  for (size_t j = 0; j < clean.size(); ++j) std::memcpy(&serving[j * sstride], recs[j], sstride);
  committed_->release(clean);
  TROVE_RETURN_IF_ERROR(train_import_records(stored_.record, training_, serving.data(),
                                             static_cast<int64_t>(clean.size()), converted.data(),
                                             options_.threads));
  for (size_t j = 0; j < clean.size(); ++j) {
    std::memcpy(out + at[j] * stride, &converted[j * stride], stride);
  }
  return Status::ok_status();
}

Result<nlohmann::json> TableTrainer::step(float lr, int saturation_tolerance,
                                          TrainOptimizer optimizer) {
  TrainStep ts;
  ts.optimizer = optimizer;
  ts.lr = lr;
  ts.seed = seed_;
  ts.step = static_cast<uint64_t>(step_);
  ts.table = 0;
  ts.saturation_tolerance = saturation_tolerance;
  TROVE_RETURN_IF_ERROR(check_train_step(ts));
  const PeerConfig& c = stored_.config;
  const int64_t rows = 2 * c.expert_width;
  const size_t down = sz(c.expert_width * c.dim), up = sz(c.expert_width * c.dim_out);
  std::vector<int64_t> ids;
  for (const auto& [id, row] : pending_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  const int64_t u = static_cast<int64_t>(ids.size());
  std::vector<float> gd(sz(u) * down), gu(sz(u) * up), accum(sz(u * rows));
  for (int64_t i = 0; i < u; ++i) {
    const size_t row = pending_.at(ids[sz(i)]);
    std::copy_n(&pending_down_[row * down], down, &gd[sz(i) * down]);
    std::copy_n(&pending_up_[row * up], up, &gu[sz(i) * up]);
    std::copy_n(&accum_[sz(ids[sz(i)] * rows)], rows, &accum[sz(i * rows)]);
  }
  std::vector<uint8_t> records(sz(u) * training_.stride);
  TROVE_RETURN_IF_ERROR(read_training_records(ids, records.data()));
  TROVE_ASSIGN_OR_RETURN(
      TrainStats st,
      train_update_records(training_, ts, ids.data(), u, gd.data(), gu.data(), records.data(),
                           optimizer == TrainOptimizer::kAdagrad ? accum.data() : nullptr,
                           options_.threads));
  std::vector<uint8_t> exported(sz(u) * stored_.record.stride);
  TROVE_RETURN_IF_ERROR(train_export_records(stored_.record, training_, records.data(), u,
                                             exported.data(), options_.threads));
  for (int64_t i = 0; i < u; ++i) {
    const int64_t id = ids[sz(i)];
    std::memcpy(dirty_training_.put(id), &records[sz(i) * training_.stride], training_.stride);
    std::memcpy(dirty_serving_.put(id), &exported[sz(i) * stored_.record.stride],
                stored_.record.stride);
    std::copy_n(&accum[sz(i * rows)], rows, &accum_[sz(id * rows)]);
  }
  ++step_;
  zero_grad();
  nlohmann::json j = train_step_metrics(st, u).to_json();
  j["experts"] = u;  // the Python side's name for expert_updates
  return j;
}

Status TableTrainer::training_rows(std::span<const int64_t> ids, std::vector<float>* down,
                                   std::vector<float>* up) {
  std::vector<int64_t> sorted(ids.begin(), ids.end());
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end() ||
      (!sorted.empty() && (sorted.front() < 0 || sorted.back() >= stored_.config.num_experts()))) {
    return Status::invalid_argument("training_rows: ids must be distinct experts in [0, N)");
  }
  std::vector<uint8_t> records(sorted.size() * training_.stride);
  TROVE_RETURN_IF_ERROR(read_training_records(sorted, records.data()));
  const PeerConfig& c = stored_.config;
  down->assign(ids.size() * sz(c.dim), 0.0f);
  up->assign(ids.size() * sz(c.dim_out), 0.0f);
  std::vector<float> d(sz(c.dim)), u(sz(c.dim_out));
  for (size_t i = 0; i < ids.size(); ++i) {
    const size_t r = sz(std::lower_bound(sorted.begin(), sorted.end(), ids[i]) - sorted.begin());
    // The view holds d/16 * b: unpacked as an int8 record at scale d it reads d * b.
    unpack_records(training_, &records[r * training_.stride], 1, d.data(), u.data(), 1);
    for (int64_t j = 0; j < c.dim; ++j) (*down)[i * sz(c.dim) + sz(j)] = d[sz(j)] / 16.0f;
    for (int64_t j = 0; j < c.dim_out; ++j) (*up)[i * sz(c.dim_out) + sz(j)] = u[sz(j)] / 16.0f;
  }
  return Status::ok_status();
}

Result<nlohmann::json> TableTrainer::checkpoint() {
  const std::vector<int64_t> ids = dirty_training_.sorted_ids();
  const PeerDenseParams& router = layer_->params();
  const std::string state = train_state_layer_name(name_);
  nlohmann::json tv = {{"of", name_},
                       {"step", step_},
                       {"seed", seed_},
                       {"optimizer", "trove.torch.Int4SR"},
                       {"meaning",
                        "int8 code b at scale d/16; served int4 q = clamp((b + 8) >> "
                        "4, -8, 7)"}};
  nlohmann::json state_info = {{"config", peer_config_to_json(stored_.config)},
                               {"record", record_layout_json(training_)},
                               {"training_view", tv}};
  const bool whole = !training_base_;
  if (whole) {
    // The first checkpoint adds the state layer: the store is rewritten whole, atomically.
    TROVE_ASSIGN_OR_RETURN(StoreWriter w, StoreWriter::create(path_, store_->provenance()));
    const int64_t n = stored_.config.num_experts();
    for (const StoreLayerInfo& info : store_->layers()) {
      if (info.name != name_) {
        TROVE_RETURN_IF_ERROR(copy_store_layer(*store_, info, &w));
        continue;
      }
      // The trained layer: its changed records and the router as trained replaced.
      const size_t stride = info.table.stride;
      TROVE_RETURN_IF_ERROR(copy_store_layer(
          *store_, info, &w,
          [&](uint64_t first, uint64_t count, uint8_t* chunk) {
            for (uint64_t i = 0; i < count; ++i) {
              if (const uint8_t* changed = dirty_serving_.find(static_cast<int64_t>(first + i))) {
                std::memcpy(chunk + i * stride, changed, stride);
              }
            }
          },
          [&](const std::string& dense) -> const std::vector<float>* {
            for (int i = 0; i < 4; ++i) {
              if (dense == kRouterTensors[i]) return &router_tensor(router, i);
            }
            return nullptr;
          }));
    }
    const StoreTableSpec table{"int8", static_cast<uint64_t>(n), training_.record_bytes,
                               training_.stride};
    TROVE_RETURN_IF_ERROR(w.begin_layer(state, state_info, table));
    std::vector<int64_t> chunk;
    std::vector<uint8_t> bytes;
    for (int64_t first = 0; first < n; first += 4096) {
      const int64_t count = std::min<int64_t>(4096, n - first);
      chunk.resize(sz(count));
      for (int64_t i = 0; i < count; ++i) chunk[sz(i)] = first + i;
      bytes.resize(sz(count) * training_.stride);
      TROVE_RETURN_IF_ERROR(read_training_records(chunk, bytes.data()));
      TROVE_RETURN_IF_ERROR(w.append_records(bytes));
    }
    TROVE_RETURN_IF_ERROR(w.add_dense("adagrad", {n, 2 * stored_.config.expert_width}, accum_));
    TROVE_RETURN_IF_ERROR(w.end_layer());
    TROVE_RETURN_IF_ERROR(w.finish(&lock_));  // the writer lock moves to the new file
  } else {
    StoreUpdateOptions update_options;
    update_options.lock = &lock_;
    TROVE_ASSIGN_OR_RETURN(StoreUpdate u, StoreUpdate::begin(path_, update_options));
    std::vector<uint8_t> bytes;
    for (const RecordOverlay* overlay : {&dirty_serving_, &dirty_training_}) {
      bytes.resize(ids.size() * overlay->stride());
      for (size_t i = 0; i < ids.size(); ++i) {
        std::memcpy(&bytes[i * overlay->stride()], overlay->find(ids[i]), overlay->stride());
      }
      TROVE_RETURN_IF_ERROR(u.put_records(overlay == &dirty_serving_ ? name_ : state, ids, bytes));
    }
    TROVE_RETURN_IF_ERROR(u.put_dense(state, "adagrad", accum_));
    for (int i = 0; i < 4; ++i) {
      if (!router_tensor(router, i).empty()) {
        TROVE_RETURN_IF_ERROR(u.put_dense(name_, kRouterTensors[i], router_tensor(router, i)));
      }
    }
    TROVE_RETURN_IF_ERROR(u.set_layer_info(state, state_info));
    TROVE_RETURN_IF_ERROR(u.commit().status());
  }
  // The new generation: sources over it first, then the overlays emptied.
  TROVE_ASSIGN_OR_RETURN(StoreReader reopened, StoreReader::open(path_, own_reader()));
  auto next = std::make_unique<StoreReader>(std::move(reopened));
  std::swap(store_, next);
  TROVE_RETURN_IF_ERROR(open_sources());
  dirty_serving_.clear();
  dirty_training_.clear();
  return nlohmann::json{
      {"records", static_cast<int64_t>(ids.size())}, {"whole_rewrite", whole}, {"step", step_}};
}

}  // namespace trove
