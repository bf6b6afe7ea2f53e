#include "runtime/engram/engram_trainer.h"

#include <cstring>

#include "base/half.h"
#include "base/strings.h"
#include "kernels/quant.h"

namespace trove {

Result<std::unique_ptr<EngramTrainer>> EngramTrainer::open(const std::string& path,
                                                           const std::string& layer,
                                                           const EngramTrainOptions& options) {
  std::unique_ptr<EngramTrainer> t(new EngramTrainer());
  t->path_ = path;
  t->name_ = layer;
  t->options_ = options;
  TROVE_RETURN_IF_ERROR(t->reopen());
  if (t->stored_.rows.dtype != DType::kI4) {
    return Status::invalid_argument(path + ": Engram layer " + layer + " holds " +
                                    std::string(dtype_name(t->stored_.rows.dtype)) +
                                    " rows; training runs on int4 rows (pack with --quant int4)");
  }
  TROVE_ASSIGN_OR_RETURN(t->training_, EngramRowLayout::make(DType::kI8, t->stored_.rows.dim));
  return t;
}

Status EngramTrainer::reopen() {
  layer_ = nullptr;
  store_.reset();
  TROVE_ASSIGN_OR_RETURN(StoreReader r, StoreReader::open(path_));
  store_ = std::make_unique<StoreReader>(std::move(r));
  layer_ = store_->find_layer(name_);
  if (layer_ == nullptr) return Status::not_found(path_ + " has no layer '" + name_ + "'");
  TROVE_ASSIGN_OR_RETURN(stored_, read_engram_layer(*store_, *layer_));
  return {};
}

Status EngramTrainer::check_open() const {
  if (store_ != nullptr) return {};
  return Status::aborted(path_ + ": a checkpoint of Engram layer " + name_ +
                         " failed; open a new trainer (the store opens at a whole generation)");
}

Result<uint8_t*> EngramTrainer::training_row(int64_t g) {
  auto it = rows_.find(g);
  if (it != rows_.end()) return it->second.bytes.data();
  TROVE_RETURN_IF_ERROR(check_open());
  const EngramRowLayout& s = stored_.rows;
  const int64_t rec = g / s.rows_per_record;
  std::vector<uint8_t> record(s.record_bytes);
  TROVE_RETURN_IF_ERROR(store_->read_records(*layer_, {&rec, 1}, record));
  Row row;
  row.bytes.resize(training_.row_bytes);
  engram_train_import_row(s, training_,
                          record.data() + static_cast<size_t>(g % s.rows_per_record) * s.row_bytes,
                          row.bytes.data());
  return rows_.emplace(g, std::move(row)).first->second.bytes.data();
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
  s.seed = options_.seed;
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
    accum.push_back(rows_[g].accum);
  }
  Result<TrainStats> stats =
      engram_train_update_rows(training_, s, ids.data(), static_cast<int64_t>(ids.size()),
                               grads.data(), ptrs.data(), accum.data());
  if (!stats.ok() && stats.status().code() != Status::Code::kOutOfRange) return stats;
  for (size_t i = 0; i < ids.size(); ++i) {
    rows_[ids[i]].accum = accum[i];
    dirty_.insert(ids[i] / stored_.rows.rows_per_record);
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

Result<uint64_t> EngramTrainer::checkpoint(const StoreUpdateOptions& update) {
  TROVE_RETURN_IF_ERROR(check_open());
  const EngramRowLayout& s = stored_.rows;
  std::vector<int64_t> recs(dirty_.begin(), dirty_.end());
  std::vector<uint8_t> strides(recs.size() * s.record_bytes);
  if (!recs.empty()) {
    TROVE_RETURN_IF_ERROR(store_->read_records(*layer_, recs, strides));
  }
  for (size_t i = 0; i < recs.size(); ++i) {
    uint8_t* record = strides.data() + i * s.record_bytes;
    const int64_t first = recs[i] * s.rows_per_record;
    for (auto it = rows_.lower_bound(first);
         it != rows_.end() && it->first < first + s.rows_per_record; ++it) {
      engram_train_export_row(s, training_, it->second.bytes.data(),
                              record + static_cast<size_t>(it->first - first) * s.row_bytes);
    }
  }
  // Our own reader would pin the generation the commit replaces: closed around it.
  layer_ = nullptr;
  store_.reset();
  Result<uint64_t> generation = [&]() -> Result<uint64_t> {
    TROVE_ASSIGN_OR_RETURN(StoreUpdate u, StoreUpdate::begin(path_, update));
    TROVE_RETURN_IF_ERROR(u.put_records(name_, recs, strides));
    return u.commit();
  }();
  // A failed commit leaves the trainer closed: the store is generation g, or g + 1 behind a
  // committed journal that the next StoreReader::open replays; a new trainer starts from it.
  if (!generation.ok()) return generation;
  TROVE_RETURN_IF_ERROR(reopen());
  dirty_.clear();
  return generation;
}

}  // namespace trove
