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

namespace {

// The most prefetches pending at once (a driver's look-ahead depth is far below).
constexpr size_t kMaxPrefetches = 16;

// |a ∩ b| of two ascending lists.
int64_t count_common(std::span<const int64_t> a, std::span<const int64_t> b) {
  int64_t n = 0;
  for (size_t i = 0, j = 0; i < a.size() && j < b.size();) {
    if (a[i] < b[j]) {
      ++i;
    } else if (b[j] < a[i]) {
      ++j;
    } else {
      ++n, ++i, ++j;
    }
  }
  return n;
}

}  // namespace

TieredExpertSource::~TieredExpertSource() {
  // A batch begun and never finished: let its reads land before the slots go away.
  if (in_flight_) {
    (void)reader_->wait();
    if (second_reader_ != nullptr) (void)second_reader_->wait();
    cache_->abort_fills(batch_ids_, batch_);
  }
  for (auto& p : groups_) end(*p);
}

Result<std::unique_ptr<TieredExpertSource>> TieredExpertSource::open(
    const StoreReader& store, const StoreLayerInfo& layer, const RecordLayout& layout,
    const TieredSourceOptions& options) {
  TROVE_CHECK(layout.stride == layer.table.stride);
  std::unique_ptr<TieredExpertSource> source(new TieredExpertSource(store, layer, layout));
  if (options.landing_groups < 1) {
    return Status::invalid_argument(
               str_printf("landing groups must be at least 1, got %d", options.landing_groups))
        .with_context(source->describe());
  }
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
  if (options.landing_groups > 1) {
    auto second = RecordReader::open(store.path(), options.io);
    if (!second.ok()) return second.status().with_context(source->describe());
    source->second_reader_ = std::move(second).value();
    source->landing_groups_ = options.landing_groups;
  }
  source->io_ = options.io;
  source->filling_.assign(static_cast<size_t>(layer.table.count), 0);
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
  // The oldest prefetch is this batch's: its reads land and commit, and its leases (which kept
  // the records resident since it was made) end.
  std::unique_ptr<Prefetch> mine;
  if (!groups_.empty()) {
    mine = std::move(groups_.front());
    groups_.erase(groups_.begin());
    const Stopwatch wait;
    settle(*mine);
    last_.disk_seconds += mine->disk_seconds;
    last_.bytes_read += mine->bytes_read;
    last_.prefetch_wait_seconds += wait.seconds();
    prefetch_stats_.wait_seconds += wait.seconds();
    std::vector<int64_t> read_ids;
    read_ids.reserve(mine->reads.size());
    for (const RecordRead& r : mine->reads) read_ids.push_back(r.id);
    last_.prefetched = mine->ids.empty() ? 0 : count_common(read_ids, ids);
    last_.prefetch_reads = static_cast<int64_t>(mine->reads.size());
    prefetch_stats_.consumed_ids += static_cast<int64_t>(mine->ids.size());
    prefetch_stats_.consumed_hits += count_common(mine->ids, ids);
    // Its leases end before this batch's admit: the admit leases the batch's hits before its
    // misses take any room, so what the prefetch read for it stays; the rest may make room.
    end(*mine);
  }
  last_.prefetch_wait_seconds += settle_overlapping(ids) + pending_wait_;
  pending_wait_ = 0;
  Status admitted = cache_->admit(ids, &batch_);
  if (admitted.code() == Status::Code::kResourceExhausted) {
    // Later prefetches hold the room this batch needs: they give it back (staying in the queue,
    // empty, so each later batch still consumes its own).
    bool held = false;
    for (auto& p : groups_) {
      if (p->ids.empty()) continue;
      end(*p);
      ++prefetch_stats_.dropped;
      held = true;
    }
    if (held) admitted = cache_->admit(ids, &batch_);
  }
  TROVE_RETURN_IF_ERROR(admitted.with_context(describe()));
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
  group_begin_.clear();
  started_groups_ = landed_groups_ = 0;
  Status started;
  if (landing_groups_ > 1 && reads_.size() > 1) {
    // Groups of equal size in id order, two in flight at a time.
    const size_t groups = std::min(static_cast<size_t>(landing_groups_), reads_.size());
    for (size_t g = 0; g <= groups; ++g) group_begin_.push_back(reads_.size() * g / groups);
    const RecordReaderStats second = second_reader_->stats();
    second_busy_ = second.busy_seconds;
    second_bytes_ = second.bytes_read;
    started = start_group(0);
    if (started.ok()) started = start_group(1);
    if (!started.ok()) (void)wait_groups();
  } else {
    started = reader_->start(reads_);
  }
  if (!started.ok()) {
    cache_->abort_fills(ids, batch_);
    return started.with_context(describe());
  }
  batch_ids_.assign(ids.begin(), ids.end());
  in_flight_ = true;
  mark_filling(ids, batch_, true);
  last_.misses = static_cast<int64_t>(reads_.size());
  last_.hits = static_cast<int64_t>(ids.size()) - last_.misses;
  last_.resolve_seconds = start.seconds();
  return Status::ok_status();
}

Status TieredExpertSource::finish_acquire(std::span<const int64_t> ids,
                                          std::span<const uint8_t*> records) {
  TROVE_CHECK(in_flight_ && ids.size() == batch_.slots.size());
  const Stopwatch start;
  Status s;
  if (group_begin_.empty()) {
    s = reader_->wait();
  } else {
    while (s.ok() && landed_groups_ < static_cast<int>(group_begin_.size()) - 1) {
      s = land_next_group();
    }
    if (!s.ok()) (void)wait_groups();
  }
  return finish_batch(ids, records, s, start.seconds());
}

Status TieredExpertSource::finish_batch(std::span<const int64_t> ids,
                                        std::span<const uint8_t*> records, const Status& s,
                                        double stalled) {
  last_.stall_seconds += stalled;
  in_flight_ = false;
  mark_filling(ids, batch_, false);
  const RecordReaderStats after = reader_->stats();
  last_.disk_seconds += after.busy_seconds - disk_busy_;
  last_.bytes_read += after.bytes_read - disk_bytes_;
  if (!group_begin_.empty()) {
    // The two readers' busy times, summed (they overlap: an upper bound of the disk's time).
    const RecordReaderStats second = second_reader_->stats();
    last_.disk_seconds += second.busy_seconds - second_busy_;
    last_.bytes_read += second.bytes_read - second_bytes_;
  }
  if (!s.ok()) {
    cache_->abort_fills(ids, batch_);
    return s.with_context(describe());
  }
  cache_->commit_fills(ids, batch_);
  for (uint32_t i : batch_.miss_index) records[i] = batch_.slots[i];
  return Status::ok_status();
}

Status TieredExpertSource::wait_landed(std::span<const int64_t> ids,
                                       std::span<const uint8_t*> records,
                                       std::vector<uint32_t>* landed) {
  TROVE_CHECK(in_flight_ && ids.size() == batch_.slots.size());
  const int groups = static_cast<int>(group_begin_.size()) - 1;
  if (group_begin_.empty() || landed_groups_ == groups) return Status::ok_status();
  const Stopwatch start;
  const int g = landed_groups_;
  const Status s = land_next_group();
  if (!s.ok()) {
    (void)wait_groups();
    return finish_batch(ids, records, s, start.seconds());
  }
  last_.stall_seconds += start.seconds();
  // reads_[r] is the read of miss miss_index[r].
  for (size_t r = group_begin_[static_cast<size_t>(g)];
       r < group_begin_[static_cast<size_t>(g) + 1]; ++r) {
    const uint32_t i = batch_.miss_index[r];
    records[i] = batch_.slots[i];
    landed->push_back(i);
  }
  return Status::ok_status();
}

Status TieredExpertSource::start_group(int g) {
  const size_t b = group_begin_[static_cast<size_t>(g)];
  const size_t e = group_begin_[static_cast<size_t>(g) + 1];
  TROVE_RETURN_IF_ERROR(
      group_reader(g)->start(std::span<const RecordRead>(reads_).subspan(b, e - b)));
  ++started_groups_;
  return Status::ok_status();
}

Status TieredExpertSource::land_next_group() {
  const int g = landed_groups_;
  TROVE_CHECK(g < started_groups_);
  Status s = group_reader(g)->wait();
  ++landed_groups_;
  if (s.ok() && started_groups_ < static_cast<int>(group_begin_.size()) - 1) {
    s = start_group(started_groups_);
  }
  return s;
}

Status TieredExpertSource::wait_groups() {
  Status first;
  for (; landed_groups_ < started_groups_; ++landed_groups_) {
    const Status s = group_reader(landed_groups_)->wait();
    if (first.ok() && !s.ok()) first = s;
  }
  return first;
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
  drop_prefetches();
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

void TieredExpertSource::mark_filling(std::span<const int64_t> ids, const CacheBatch& batch,
                                      bool on) {
  for (uint32_t i : batch.miss_index) filling_[static_cast<size_t>(ids[i])] = on ? 1 : 0;
}

void TieredExpertSource::settle(Prefetch& p) {
  if (!p.in_flight) return;
  const Status s = p.reader->wait();
  p.in_flight = false;
  const RecordReaderStats after = p.reader->stats();
  p.disk_seconds = after.busy_seconds - p.busy_before;
  p.bytes_read = after.bytes_read - p.bytes_before;
  mark_filling(p.ids, p.batch, false);
  if (s.ok()) {
    cache_->commit_fills(p.ids, p.batch);
  } else {
    // The batch reads these again and reports the error, naming the record.
    cache_->abort_fills(p.ids, p.batch);
    p.ids.clear();
    p.reads.clear();
    ++prefetch_stats_.read_errors;
  }
  spare_readers_.push_back(std::move(p.reader));
}

void TieredExpertSource::end(Prefetch& p) {
  settle(p);
  if (!p.ids.empty()) cache_->release(p.ids);
  p.ids.clear();
}

double TieredExpertSource::settle_overlapping(std::span<const int64_t> ids) {
  bool overlap = false;
  for (int64_t id : ids) overlap = overlap || filling_[static_cast<size_t>(id)] != 0;
  if (!overlap) return 0;
  const Stopwatch wait;
  for (auto& p : groups_) settle(*p);
  prefetch_stats_.wait_seconds += wait.seconds();
  return wait.seconds();
}

void TieredExpertSource::prefetch(std::span<const int64_t> ids) {
  ++prefetch_stats_.prefetches;
  auto p = std::make_unique<Prefetch>();
  if (groups_.size() >= kMaxPrefetches) {
    ++prefetch_stats_.skipped;
    groups_.push_back(std::move(p));
    return;
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    TROVE_CHECK_MSG(ids[i] >= 0 && ids[i] < num_experts() && (i == 0 || ids[i] > ids[i - 1]),
                    "prefetch: expert ids must be unique, ascending and in range (%lld at %zu)",
                    static_cast<long long>(ids[i]), i);
  }
  if (in_flight_) {
    // Between a batch's begin_acquire and finish_acquire (drivers prefetch between batches):
    // nothing, so the batch's own fills are never waited on here.
    ++prefetch_stats_.skipped;
    groups_.push_back(std::move(p));
    return;
  }
  // Ids an earlier prefetch is still reading: that one lands first.
  if (const double waited = settle_overlapping(ids); waited > 0) {
    pending_wait_ += waited;
    ++prefetch_stats_.waits;
  }
  p->ids.assign(ids.begin(), ids.end());
  // What does not fit is not prefetched: a shorter prefix, then nothing.
  Status admitted = cache_->admit(p->ids, &p->batch);
  for (int tries = 0; !admitted.ok() && tries < 2 && p->ids.size() > 1; ++tries) {
    p->ids.resize(p->ids.size() / 2);
    admitted = cache_->admit(p->ids, &p->batch);
  }
  if (!admitted.ok()) {
    ++prefetch_stats_.skipped;
    p->ids.clear();
    groups_.push_back(std::move(p));
    return;
  }
  const uint64_t stride = layer_->table.stride;
  for (uint32_t i : p->batch.miss_index) {
    RecordRead r;
    r.id = p->ids[i];
    r.offset = layer_->table.offset + static_cast<uint64_t>(r.id) * stride;
    r.bytes = static_cast<uint32_t>(stride);
    r.dest = p->batch.slots[i];
    r.xxh3 = store_->record_checksum(*layer_, r.id);
    p->reads.push_back(r);
  }
  if (!p->reads.empty()) {
    if (!spare_readers_.empty()) {
      p->reader = std::move(spare_readers_.back());
      spare_readers_.pop_back();
    } else {
      auto reader = RecordReader::open(store_->path(), io_);
      if (reader.ok()) p->reader = std::move(reader).value();
    }
    const Status started = p->reader != nullptr ? p->reader->start(p->reads) : Status::aborted("");
    if (!started.ok()) {
      if (p->reader != nullptr) spare_readers_.push_back(std::move(p->reader));
      cache_->abort_fills(p->ids, p->batch);
      ++prefetch_stats_.skipped;
      p->ids.clear();
      p->reads.clear();
      groups_.push_back(std::move(p));
      return;
    }
    const RecordReaderStats before = p->reader->stats();
    p->busy_before = before.busy_seconds;
    p->bytes_before = before.bytes_read;
    p->in_flight = true;
    mark_filling(p->ids, p->batch, true);
    prefetch_stats_.records_read += static_cast<int64_t>(p->reads.size());
  }
  groups_.push_back(std::move(p));
}

void TieredExpertSource::drop_prefetches() {
  for (auto& p : groups_) {
    if (!p->ids.empty()) ++prefetch_stats_.dropped;
    end(*p);
  }
  groups_.clear();
}

}  // namespace trove
