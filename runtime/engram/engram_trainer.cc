#include "runtime/engram/engram_trainer.h"

#include <algorithm>
#include <cstring>

#include "base/half.h"
#include "base/strings.h"
#include "kernels/quant.h"
#include "storage/store_lock.h"

namespace trove {

std::string engram_state_layer_name(const std::string& layer) {
  return layer + ".train";
}

Result<std::unique_ptr<EngramTrainer>> EngramTrainer::open(const std::string& path,
                                                           const std::string& layer,
                                                           const EngramTrainOptions& options) {
  std::unique_ptr<EngramTrainer> t(new EngramTrainer());
  t->path_ = path;
  t->name_ = layer;
  t->options_ = options;
  t->seed_ = options.seed;
  TROVE_RETURN_IF_ERROR(t->reopen());
  if (t->layer_->info.contains("training_view")) {
    return Status::invalid_argument(path + ": layer " + layer +
                                    " is a training state; train the layer it belongs to");
  }
  if (t->stored_.rows.dtype != DType::kI4) {
    return Status::invalid_argument(path + ": Engram layer " + layer + " holds " +
                                    std::string(dtype_name(t->stored_.rows.dtype)) +
                                    " rows; training runs on int4 rows (pack with --quant int4)");
  }
  TROVE_ASSIGN_OR_RETURN(t->training_, EngramRowLayout::make(DType::kI8, t->stored_.rows.dim));
  const int64_t rows = t->stored_.config.rows();
  t->accum_.assign(static_cast<size_t>(rows), 0.0f);
  if (const StoreLayerInfo* state = t->state_) {
    // Resume: the state layer must be this layer's, in this build's training layout.
    const std::string where = path + ": training state " + state->name;
    const nlohmann::json tv = state->info.value("training_view", nlohmann::json());
    if (!tv.is_object() || tv.value("of", std::string()) != layer) {
      return Status::corruption(where + ": info.training_view.of does not name layer " + layer);
    }
    if (state->table.record_bytes != t->training_.record_bytes ||
        state->table.count != static_cast<uint64_t>(t->training_.records(rows))) {
      return Status::corruption(str_printf(
          "%s: %llu records of %llu bytes, expected %lld of %zu", where.c_str(),
          static_cast<unsigned long long>(state->table.count),
          static_cast<unsigned long long>(state->table.record_bytes),
          static_cast<long long>(t->training_.records(rows)), t->training_.record_bytes));
    }
    TROVE_ASSIGN_OR_RETURN(t->accum_, t->store_->read_dense(*state, "adagrad"));
    if (t->accum_.size() != static_cast<size_t>(rows)) {
      return Status::corruption(str_printf("%s: 'adagrad' holds %zu values for %lld rows",
                                           where.c_str(), t->accum_.size(),
                                           static_cast<long long>(rows)));
    }
    t->steps_ = tv.value("step", uint64_t{0});
    t->seed_ = tv.value("seed", options.seed);
  }
  return t;
}

Status EngramTrainer::reopen() {
  layer_ = nullptr;
  state_ = nullptr;
  store_.reset();
  TROVE_ASSIGN_OR_RETURN(StoreReader r, StoreReader::open(path_));
  store_ = std::make_unique<StoreReader>(std::move(r));
  layer_ = store_->find_layer(name_);
  if (layer_ == nullptr) return Status::not_found(path_ + " has no layer '" + name_ + "'");
  TROVE_ASSIGN_OR_RETURN(stored_, read_engram_layer(*store_, *layer_));
  state_ = store_->find_layer(engram_state_layer_name(name_));
  return {};
}

Status EngramTrainer::check_open() const {
  if (store_ != nullptr) return {};
  return Status::aborted(path_ + ": a checkpoint of Engram layer " + name_ +
                         " failed; open a new trainer (the store opens at a whole generation)");
}

Result<uint8_t*> EngramTrainer::training_row(int64_t g) {
  auto it = rows_.find(g);
  if (it != rows_.end()) return it->second.data();
  TROVE_RETURN_IF_ERROR(check_open());
  std::vector<uint8_t> row(training_.row_bytes);
  if (state_ != nullptr) {
    const int64_t rec = g / training_.rows_per_record;
    std::vector<uint8_t> record(training_.record_bytes);
    TROVE_RETURN_IF_ERROR(store_->read_records(*state_, {&rec, 1}, record));
    std::memcpy(
        row.data(),
        record.data() + static_cast<size_t>(g % training_.rows_per_record) * training_.row_bytes,
        training_.row_bytes);
  } else {
    const EngramRowLayout& s = stored_.rows;
    const int64_t rec = g / s.rows_per_record;
    std::vector<uint8_t> record(s.record_bytes);
    TROVE_RETURN_IF_ERROR(store_->read_records(*layer_, {&rec, 1}, record));
    engram_train_import_row(
        s, training_, record.data() + static_cast<size_t>(g % s.rows_per_record) * s.row_bytes,
        row.data());
  }
  return rows_.emplace(g, std::move(row)).first->second.data();
}

Status EngramTrainer::add_row_grads(int64_t table, std::span<const int64_t> ids,
                                    std::span<const float> grads) {
  const EngramConfig& c = stored_.config;
  const int64_t e = c.embed_per_head;
  if (table < 0 || table >= c.tables()) {
    return Status::invalid_argument(str_printf("engram table %lld of %lld",
                                               static_cast<long long>(table),
                                               static_cast<long long>(c.tables())));
  }
  if (grads.size() != ids.size() * static_cast<size_t>(e)) {
    return Status::invalid_argument(
        str_printf("engram row gradients: %zu values for %zu rows of "
                   "%lld",
                   grads.size(), ids.size(), static_cast<long long>(e)));
  }
  for (int64_t id : ids) {
    if (id < 0 || id >= c.hash.vocab) {
      return Status::out_of_range(
          str_printf("engram table %lld: row %lld of %lld", static_cast<long long>(table),
                     static_cast<long long>(id), static_cast<long long>(c.hash.vocab)));
    }
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    auto [it, fresh] =
        pending_.try_emplace(table * c.hash.vocab + ids[i], static_cast<size_t>(e), 0.0f);
    for (int64_t j = 0; j < e; ++j) it->second[static_cast<size_t>(j)] += grads[i * e + j];
  }
  return {};
}

Result<TrainStats> EngramTrainer::step(float lr) {
  TrainStep s;
  s.optimizer = options_.optimizer;
  s.lr = lr;
  s.eps = options_.eps;
  s.seed = seed_;
  s.step = steps_ + 1;
  s.table = options_.table_id;
  s.saturation_tolerance = options_.saturation_tolerance;
  TROVE_RETURN_IF_ERROR(check_train_step(s));
  std::vector<int64_t> ids;
  std::vector<float> grads;
  std::vector<uint8_t*> ptrs;
  std::vector<float> accum;
  for (const auto& [g, grad] : pending_) {
    TROVE_ASSIGN_OR_RETURN(uint8_t * row, training_row(g));
    ids.push_back(g);
    grads.insert(grads.end(), grad.begin(), grad.end());
    ptrs.push_back(row);
    accum.push_back(accum_[static_cast<size_t>(g)]);
  }
  Result<TrainStats> stats =
      engram_train_update_rows(training_, s, ids.data(), static_cast<int64_t>(ids.size()),
                               grads.data(), ptrs.data(), accum.data());
  if (!stats.ok() && stats.status().code() != Status::Code::kOutOfRange) return stats;
  for (size_t i = 0; i < ids.size(); ++i) {
    accum_[static_cast<size_t>(ids[i])] = accum[i];
    dirty_.insert(ids[i]);
  }
  pending_.clear();
  ++steps_;
  return stats;
}

Status EngramTrainer::read_rows(int64_t table, std::span<const int64_t> ids, float* out) {
  const EngramConfig& c = stored_.config;
  const int64_t e = c.embed_per_head;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (table < 0 || table >= c.tables() || ids[i] < 0 || ids[i] >= c.hash.vocab) {
      return Status::out_of_range("engram read_rows: table or row out of range");
    }
    TROVE_ASSIGN_OR_RETURN(uint8_t * row, training_row(table * c.hash.vocab + ids[i]));
    // The training view: weight = d / 16 * b.
    for (int64_t j = 0; j < e; ++j) {
      uint16_t h;
      std::memcpy(&h, row + 2 * (j / kQuantGroup), 2);
      const auto b = static_cast<int8_t>(row[training_.scale_bytes + static_cast<size_t>(j)]);
      out[static_cast<int64_t>(i) * e + j] = fp16_to_fp32(h) / 16.0f * static_cast<float>(b);
    }
  }
  return {};
}

nlohmann::json EngramTrainer::state_info() const {
  nlohmann::json info = layer_->info;
  info.erase("quant_error");
  info.erase("source");
  info["rows"] = engram_rows_json(training_, stored_.config.tables(), stored_.config.rows());
  info["training_view"] = {
      {"of", name_},
      {"step", steps_},
      {"seed", seed_},
      {"optimizer", options_.optimizer == TrainOptimizer::kAdagrad ? "adagrad" : "sgd"},
      {"meaning", "int8 code b at scale d/16; served int4 q = clamp((b + 8) >> 4, -8, 7)"}};
  return info;
}

Status EngramTrainer::changed_records(const StoreLayerInfo& layer, const EngramRowLayout& l,
                                      std::vector<int64_t>* recs, std::vector<uint8_t>* bytes,
                                      const std::function<void(const uint8_t*, uint8_t*)>& put) {
  std::set<int64_t> changed;
  for (int64_t g : dirty_) changed.insert(g / l.rows_per_record);
  recs->assign(changed.begin(), changed.end());
  bytes->resize(recs->size() * l.record_bytes);
  if (!recs->empty()) TROVE_RETURN_IF_ERROR(store_->read_records(layer, *recs, *bytes));
  for (size_t i = 0; i < recs->size(); ++i) {
    const int64_t first = (*recs)[i] * l.rows_per_record;
    for (auto it = rows_.lower_bound(first);
         it != rows_.end() && it->first < first + l.rows_per_record; ++it) {
      put(it->second.data(), bytes->data() + i * l.record_bytes +
                                 static_cast<size_t>(it->first - first) * l.row_bytes);
    }
  }
  return {};
}

Result<uint64_t> EngramTrainer::checkpoint(const StoreUpdateOptions& update) {
  TROVE_RETURN_IF_ERROR(check_open());
  // The served records of the changed rows, re-encoded from the training view.
  const EngramRowLayout& s = stored_.rows;
  std::vector<int64_t> recs;
  std::vector<uint8_t> served;
  TROVE_RETURN_IF_ERROR(changed_records(
      *layer_, s, &recs, &served,
      [&](const uint8_t* row, uint8_t* out) { engram_train_export_row(s, training_, row, out); }));
  Result<uint64_t> generation = [&]() -> Result<uint64_t> {
    if (state_ == nullptr) {
      TROVE_RETURN_IF_ERROR(rewrite_with_state(recs, served));
      return uint64_t{1};
    }
    return update_in_place(recs, served, update);
  }();
  // A failed commit leaves the trainer closed: the store is generation g, or g + 1 behind a
  // committed journal that the next StoreReader::open replays; a new trainer starts from it.
  if (!generation.ok()) {
    layer_ = state_ = nullptr;
    store_.reset();
    return generation;
  }
  TROVE_RETURN_IF_ERROR(reopen());
  dirty_.clear();
  return store_->generation();
}

Status EngramTrainer::rewrite_with_state(std::span<const int64_t> recs,
                                         std::span<const uint8_t> served) {
  // One writer: the lock moves to the new file before it replaces the old one. Pinned readers
  // (ours included) keep the old file's inode, which the rename leaves as it was.
  TROVE_ASSIGN_OR_RETURN(StoreLock lock, StoreLock::acquire(path_));
  TROVE_ASSIGN_OR_RETURN(StoreWriter w, StoreWriter::create(path_, store_->provenance()));
  for (const StoreLayerInfo& info : store_->layers()) {
    if (&info != layer_) {
      TROVE_RETURN_IF_ERROR(copy_store_layer(*store_, info, &w));
      continue;
    }
    // This layer's changed records (`recs`, ascending) replaced.
    const size_t stride = info.table.stride;
    size_t next = 0;
    TROVE_RETURN_IF_ERROR(
        copy_store_layer(*store_, info, &w, [&](uint64_t first, uint64_t count, uint8_t* chunk) {
          for (; next < recs.size() && static_cast<uint64_t>(recs[next]) < first + count; ++next) {
            std::memcpy(chunk + (static_cast<uint64_t>(recs[next]) - first) * stride,
                        &served[next * stride], stride);
          }
        }));
  }
  // The state layer: every row's training view, the trainer's where it has one, else imported
  // from the served row it had before this checkpoint (untouched rows did not change).
  const EngramRowLayout& s = stored_.rows;
  const int64_t rows = stored_.config.rows();
  const int64_t records = training_.records(rows);
  const StoreTableSpec table{"int8", static_cast<uint64_t>(records), training_.record_bytes,
                             training_.record_bytes};
  TROVE_RETURN_IF_ERROR(w.begin_layer(engram_state_layer_name(name_), state_info(), table));
  const int64_t chunk_records = 1024;
  std::vector<int64_t> ids;
  std::vector<uint8_t> old_served, out;
  for (int64_t r0 = 0; r0 < records; r0 += chunk_records) {
    const int64_t nrec = std::min(chunk_records, records - r0);
    const int64_t g0 = r0 * training_.rows_per_record;
    const int64_t g1 = std::min(rows, (r0 + nrec) * training_.rows_per_record);
    const int64_t s0 = g0 / s.rows_per_record, s1 = (g1 - 1) / s.rows_per_record + 1;
    ids.resize(static_cast<size_t>(s1 - s0));
    for (int64_t i = s0; i < s1; ++i) ids[static_cast<size_t>(i - s0)] = i;
    old_served.resize(ids.size() * s.record_bytes);
    TROVE_RETURN_IF_ERROR(store_->read_records(*layer_, ids, old_served));
    out.assign(static_cast<size_t>(nrec) * training_.record_bytes, 0);
    for (int64_t g = g0; g < g1; ++g) {
      uint8_t* row = out.data() + static_cast<size_t>(g - g0) * training_.row_bytes;
      auto it = rows_.find(g);
      if (it != rows_.end()) {
        std::memcpy(row, it->second.data(), training_.row_bytes);
      } else {
        engram_train_import_row(
            s, training_,
            old_served.data() + static_cast<size_t>(g - s0 * s.rows_per_record) * s.row_bytes, row);
      }
    }
    TROVE_RETURN_IF_ERROR(w.append_records(out));
  }
  TROVE_RETURN_IF_ERROR(w.add_dense("adagrad", {rows}, accum_));
  TROVE_RETURN_IF_ERROR(w.end_layer());
  return w.finish(&lock);
}

Result<uint64_t> EngramTrainer::update_in_place(std::span<const int64_t> recs,
                                                std::span<const uint8_t> served,
                                                const StoreUpdateOptions& update) {
  // The state layer's changed records: the trainer's rows as they are.
  std::vector<int64_t> trecs;
  std::vector<uint8_t> training;
  TROVE_RETURN_IF_ERROR(changed_records(
      *state_, training_, &trecs, &training,
      [&](const uint8_t* row, uint8_t* out) { std::memcpy(out, row, training_.row_bytes); }));
  const nlohmann::json info = state_info();
  const std::string state = state_->name;
  // Our own reader would pin the generation the commit replaces: closed around it.
  layer_ = state_ = nullptr;
  store_.reset();
  TROVE_ASSIGN_OR_RETURN(StoreUpdate u, StoreUpdate::begin(path_, update));
  if (!recs.empty()) {
    TROVE_RETURN_IF_ERROR(u.put_records(name_, recs, served));
    TROVE_RETURN_IF_ERROR(u.put_records(state, trecs, training));
  }
  TROVE_RETURN_IF_ERROR(u.put_dense(state, "adagrad", accum_));
  TROVE_RETURN_IF_ERROR(u.set_layer_info(state, info));
  return u.commit();
}

}  // namespace trove
