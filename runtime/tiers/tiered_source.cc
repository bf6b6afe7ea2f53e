#include "runtime/tiers/tiered_source.h"

#include <algorithm>
#include <cstring>

#include "base/bytes.h"
#include "base/check.h"
#include "base/stopwatch.h"
#include "base/strings.h"

namespace trove {

TieredExpertSource::TieredExpertSource(const StoreReader& store, const StoreLayerInfo& layer,
                                       const RecordLayout& layout)
    : store_(&store), layer_(&layer), layout_(layout) {}

TieredExpertSource::~TieredExpertSource() {
  // A batch begun and never finished: let its reads land before the slots go away.
  if (in_flight_) {
    (void)reader_->wait();
    cache_->abort_fills(batch_ids_, batch_);
  }
}

Result<std::unique_ptr<TieredExpertSource>> TieredExpertSource::open(
    const StoreReader& store, const StoreLayerInfo& layer, const RecordLayout& layout,
    const TieredSourceOptions& options) {
  TROVE_CHECK(layout.stride == layer.table.stride);
  std::unique_ptr<TieredExpertSource> source(new TieredExpertSource(store, layer, layout));
  ExpertCacheOptions cache;
  cache.budget_bytes = options.host_budget_bytes;
  cache.slot_bytes = layout.stride;
  cache.num_experts = static_cast<int64_t>(layer.table.count);
  cache.policy = options.policy;
  cache.memory = options.host_memory;
  auto made = ExpertCache::create(cache);
  if (!made.ok()) return made.status().with_context(source->describe());
  source->cache_ = std::move(made).value();
  auto reader = RecordReader::open(store.path(), options.io);
  if (!reader.ok()) return reader.status().with_context(source->describe());
  source->reader_ = std::move(reader).value();
  return source;
}

std::string TieredExpertSource::describe() const {
  return "store " + store_->path() + ", layer " + layer_->name + " (host tier " +
         format_bytes(cache_ != nullptr ? cache_->options().budget_bytes : 0) + " over disk)";
}

Status TieredExpertSource::check_batch(int64_t max_unique, const std::string& what) const {
  const int64_t need = std::min<int64_t>(max_unique, num_experts());
  if (need <= cache_->capacity_slots()) return Status::ok_status();
  const uint64_t need_bytes = static_cast<uint64_t>(need) * cache_->slot_stride();
  return Status::resource_exhausted(str_printf(
      "the host budget %s holds %lld records of %zu bytes; one batch of %s can need %lld "
      "distinct experts (%s): raise --host to at least %s or lower --batch",
      format_bytes(cache_->options().budget_bytes).c_str(),
      static_cast<long long>(cache_->capacity_slots()), cache_->slot_stride(), what.c_str(),
      static_cast<long long>(need), format_bytes(need_bytes).c_str(),
      format_bytes(need_bytes).c_str()));
}

Status TieredExpertSource::begin_acquire(std::span<const int64_t> ids,
                                         std::span<const uint8_t*> records) {
  TROVE_CHECK(!in_flight_ && ids.size() == records.size());
  const Stopwatch start;
  last_ = ExpertFetchStats{};
  TROVE_RETURN_IF_ERROR(cache_->admit(ids, &batch_).with_context(describe()));
  reads_.clear();
  reads_.reserve(batch_.miss_index.size());
  const uint64_t stride = layer_->table.stride;
  for (uint32_t i : batch_.miss_index) {
    RecordRead r;
    r.id = ids[i];
    r.offset = layer_->table.offset + static_cast<uint64_t>(ids[i]) * stride;
    r.bytes = static_cast<uint32_t>(stride);
    r.dest = batch_.slots[i];
    r.xxh3 = store_->record_checksum(*layer_, ids[i]);
    reads_.push_back(r);
  }
  for (size_t i = 0, m = 0; i < ids.size(); ++i) {
    const bool miss = m < batch_.miss_index.size() && batch_.miss_index[m] == i;
    records[i] = miss ? nullptr : batch_.slots[i];
    m += miss ? 1 : 0;
  }
  const RecordReaderStats before = reader_->stats();
  disk_busy_ = before.busy_seconds;
  disk_bytes_ = before.bytes_read;
  Status started = reader_->start(reads_);
  if (!started.ok()) {
    cache_->abort_fills(ids, batch_);
    return started.with_context(describe());
  }
  batch_ids_.assign(ids.begin(), ids.end());
  in_flight_ = true;
  last_.misses = static_cast<int64_t>(reads_.size());
  last_.hits = static_cast<int64_t>(ids.size()) - last_.misses;
  last_.resolve_seconds = start.seconds();
  return Status::ok_status();
}

Status TieredExpertSource::finish_acquire(std::span<const int64_t> ids,
                                          std::span<const uint8_t*> records) {
  TROVE_CHECK(in_flight_ && ids.size() == batch_.slots.size());
  const Stopwatch start;
  Status s = reader_->wait();
  last_.stall_seconds = start.seconds();
  in_flight_ = false;
  const RecordReaderStats after = reader_->stats();
  last_.disk_seconds = after.busy_seconds - disk_busy_;
  last_.bytes_read = after.bytes_read - disk_bytes_;
  if (!s.ok()) {
    cache_->abort_fills(ids, batch_);
    return s.with_context(describe());
  }
  cache_->commit_fills(ids, batch_);
  for (uint32_t i : batch_.miss_index) records[i] = batch_.slots[i];
  return Status::ok_status();
}

Status TieredExpertSource::acquire(std::span<const int64_t> ids,
                                   std::span<const uint8_t*> records) {
  TROVE_RETURN_IF_ERROR(begin_acquire(ids, records));
  return finish_acquire(ids, records);
}

void TieredExpertSource::release(std::span<const int64_t> ids) {
  cache_->release(ids);
}

Status TieredExpertSource::refresh(const StoreReader& store, const StoreLayerInfo& layer,
                                   std::span<const int64_t> ids,
                                   const std::function<const uint8_t*(int64_t)>& bytes) {
  TROVE_CHECK(!in_flight_);
  if (layer.table.offset != layer_->table.offset || layer.table.stride != layer_->table.stride ||
      layer.table.count != layer_->table.count) {
    return Status::invalid_argument(describe() + ": refresh with layer " + layer.name +
                                    " of another table geometry (a rewritten store needs a new "
                                    "source)");
  }
  // The resident ones only (probes, no policy update), leased a bounded chunk at a time: all
  // hits, so admit() cannot evict or fail for room.
  std::vector<int64_t> resident;
  for (int64_t id : ids) {
    if (cache_->contains(id)) resident.push_back(id);
  }
  std::sort(resident.begin(), resident.end());
  const size_t chunk = static_cast<size_t>(std::max<int64_t>(1, cache_->capacity_slots()));
  CacheBatch batch;
  for (size_t first = 0; first < resident.size(); first += chunk) {
    const std::span<const int64_t> part =
        std::span<const int64_t>(resident).subspan(first, std::min(chunk, resident.size() - first));
    TROVE_RETURN_IF_ERROR(cache_->admit(part, &batch).with_context(describe()));
    TROVE_CHECK(batch.miss_index.empty());
    for (size_t i = 0; i < part.size(); ++i) {
      std::memcpy(batch.slots[i], bytes(part[i]), layer.table.stride);
    }
    cache_->release(part);
  }
  store_ = &store;
  layer_ = &layer;
  return Status::ok_status();
}

}  // namespace trove
