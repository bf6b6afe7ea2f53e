#include "runtime/engram/engram_table.h"

#include <algorithm>

#include "base/stopwatch.h"
#include "base/strings.h"

namespace trove {

Result<std::unique_ptr<EngramTable>> EngramTable::open(const StoreReader& store,
                                                       const StoreLayerInfo& layer,
                                                       const EngramTableOptions& options) {
  if (layer.info.contains("training_view")) {
    // int8 codes at scale d/16 (runtime/engram/engram_trainer.h): 16x too big as they are.
    return Status::invalid_argument(
        store.path() + ": layer " + layer.name + " is the training state of Engram layer " +
        layer.info["training_view"].value("of", std::string("?")) +
        " (int8 codes at scale d/16, not servable); open that layer instead");
  }
  TROVE_ASSIGN_OR_RETURN(EngramStoredLayer stored, read_engram_layer(store, layer));
  std::unique_ptr<EngramTable> t(new EngramTable());
  t->store_ = &store;
  t->layer_ = &layer;
  t->config_ = stored.config;
  t->rows_ = stored.rows;
  t->threads_ = options.threads;
  // The tiers move whole records; nothing else of a RecordLayout applies to Engram rows.
  t->record_.dtype = stored.rows.dtype;
  t->record_.dim = stored.rows.dim;
  t->record_.dim_out = stored.rows.dim;
  t->record_.record_bytes = stored.rows.record_bytes;
  t->record_.stride = stored.rows.record_bytes;
  if (options.tiers.has_value()) {
    TieredSourceOptions o = *options.tiers;
    o.io.verify = options.verify_checksums;
    TROVE_ASSIGN_OR_RETURN(t->source_, TieredExpertSource::open(store, layer, t->record_, o));
  } else {
    TROVE_ASSIGN_OR_RETURN(t->source_, ResidentStoreExpertSource::open(store, layer, t->record_,
                                                                       options.verify_checksums));
  }
  return t;
}

EngramTable::~EngramTable() {
  cancel_prefetch();
}

Status EngramTable::hash(const int64_t* tokens, int64_t batch, int64_t seq,
                         std::vector<int64_t>* ids) const {
  ids->resize(static_cast<size_t>(config_.tables() * batch * seq));
  return engram_hash(config_.hash, tokens, batch, seq, ids->data());
}

Status EngramTable::records_of(std::span<const int64_t> ids, int64_t n,
                               std::vector<int64_t>* recs) const {
  const int64_t tables = config_.tables();
  const int64_t vocab = config_.hash.vocab;
  if (static_cast<int64_t>(ids.size()) != tables * n) {
    return Status::invalid_argument(
        str_printf("engram lookup of %lld positions needs %lld ids "
                   "(%lld tables), got %zu",
                   static_cast<long long>(n), static_cast<long long>(tables * n),
                   static_cast<long long>(tables), ids.size()));
  }
  recs->resize(ids.size());
  for (int64_t k = 0; k < tables; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids[static_cast<size_t>(k * n + i)];
      if (id < 0 || id >= vocab) {
        return Status::out_of_range(
            str_printf("engram layer %s: table %lld, position %lld asks for row %lld of %lld",
                       layer_->name.c_str(), static_cast<long long>(k), static_cast<long long>(i),
                       static_cast<long long>(id), static_cast<long long>(vocab)));
      }
      (*recs)[static_cast<size_t>(k * n + i)] = (k * vocab + id) / rows_.rows_per_record;
    }
  }
  std::sort(recs->begin(), recs->end());
  recs->erase(std::unique(recs->begin(), recs->end()), recs->end());
  return {};
}

void EngramTable::cancel_prefetch() {
  if (!pending_) return;
  pending_ = false;
  // Finish before release: the source's reads land in leased slots.
  if (source_->finish_acquire(pending_recs_, pending_ptrs_).ok()) source_->release(pending_recs_);
}

Status EngramTable::preload() {
  cancel_prefetch();
  const int64_t count = source_->num_experts();
  std::vector<int64_t> ids;
  std::vector<const uint8_t*> ptrs;
  for (int64_t first = 0; first < count; first += 1024) {
    const int64_t n = std::min<int64_t>(1024, count - first);
    ids.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = first + i;
    ptrs.assign(ids.size(), nullptr);
    TROVE_RETURN_IF_ERROR(source_->acquire(ids, ptrs));
    source_->release(ids);
  }
  return {};
}

Status EngramTable::prefetch(std::span<const int64_t> ids, int64_t n) {
  cancel_prefetch();
  TROVE_RETURN_IF_ERROR(records_of(ids, n, &pending_recs_));
  TROVE_RETURN_IF_ERROR(
      source_->check_batch(static_cast<int64_t>(pending_recs_.size()),
                           str_printf("%lld positions x %lld tables", static_cast<long long>(n),
                                      static_cast<long long>(config_.tables()))));
  pending_ptrs_.assign(pending_recs_.size(), nullptr);
  TROVE_RETURN_IF_ERROR(source_->begin_acquire(pending_recs_, pending_ptrs_));
  pending_ = true;
  return {};
}

Status EngramTable::lookup(std::span<const int64_t> ids, int64_t n, float* out) {
  last_ = {};
  Stopwatch watch;
  std::vector<int64_t> recs;
  TROVE_RETURN_IF_ERROR(records_of(ids, n, &recs));
  std::vector<const uint8_t*> ptrs;
  if (pending_ && recs == pending_recs_) {
    pending_ = false;
    ptrs = std::move(pending_ptrs_);
    TROVE_RETURN_IF_ERROR(source_->finish_acquire(recs, ptrs));
    last_.prefetched = true;
  } else {
    cancel_prefetch();
    TROVE_RETURN_IF_ERROR(
        source_->check_batch(static_cast<int64_t>(recs.size()),
                             str_printf("%lld positions x %lld tables", static_cast<long long>(n),
                                        static_cast<long long>(config_.tables()))));
    ptrs.assign(recs.size(), nullptr);
    TROVE_RETURN_IF_ERROR(source_->begin_acquire(recs, ptrs));
    TROVE_RETURN_IF_ERROR(source_->finish_acquire(recs, ptrs));
  }
  last_.acquire_seconds = watch.seconds();
  last_.fetch = source_->last_fetch();
  last_.unique_records = static_cast<int64_t>(recs.size());
  last_.rows = static_cast<int64_t>(ids.size());

  watch.restart();
  const int64_t tables = config_.tables();
  const int64_t e = rows_.dim;
  const int64_t vocab = config_.hash.vocab;
  std::vector<const uint8_t*> rows(static_cast<size_t>(n));
  for (int64_t k = 0; k < tables; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t g = k * vocab + ids[static_cast<size_t>(k * n + i)];
      const int64_t rec = g / rows_.rows_per_record;
      const size_t at =
          static_cast<size_t>(std::lower_bound(recs.begin(), recs.end(), rec) - recs.begin());
      rows[static_cast<size_t>(i)] =
          ptrs[at] + static_cast<size_t>(g % rows_.rows_per_record) * rows_.row_bytes;
    }
    engram_gather(rows_, rows.data(), n, out + k * e, tables * e, threads_);
  }
  source_->release(recs);
  last_.gather_seconds = watch.seconds();
  return {};
}

}  // namespace trove
