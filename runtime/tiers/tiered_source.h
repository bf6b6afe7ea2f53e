// TieredExpertSource: a store layer's records served from a byte-budgeted host tier (T1, an
// ExpertCache) over the store file on disk (T2, a RecordReader), SPEC §5. The layer runs over
// it unchanged: it is an ExpertSource.
//
// One batch, as PeerLayer::forward drives it (the prefetch pipeline):
//
//   layer     route ─ begin_acquire ─┬─ wave 1 ─────────────── finish_acquire ─┬─ wave 2 ─ release
//                     admit: hits    │  every slot whose record  (stall while   │  the rest of
//                     leased, misses │  is here; each token      the disk is    │  every token
//                     get "filling"  │  accumulated up to its    busy), commit  │
//                     slots          │  first missing slot       the fills      │
//   I/O thread               start ──┴─ read misses: verify XXH3, copy to slots ─┘
//   disk (T2)                           ████ queue_depth reads in flight ████
//
// Hits of the batch are computed while its misses are read; when the reads land, each token
// resumes where it stopped, so the output equals the all-resident output bit for bit
// (kernels/cpu/peer.h: peer_experts_resume). Misses are written straight into their host slots
// (leased and marked "filling", invisible to other batches until committed), and verified
// against the store's per-record checksum before they can be used; a failed read aborts the
// batch's fills and leaves the host tier and the store as they were.
//
// Look-ahead (prefetch(): the driver routes batches b+1..b+N while batch b computes): each
// prefetch admits its batch's experts into the host tier (leased, so they stay until their batch
// has used them) and reads its misses on a reader of its own, so the disk works for the batches
// to come while this one computes. The batch that consumes it (the next begin_acquire) waits for
// what is still in flight, commits it, ends the prefetch's leases and admits its ids as any
// batch (the prefetched ones are hits, leased before its misses take room):
//
//   batch b     ─ consume P(b): wait, commit, end ─ admit b (hits) ─ wave 1 ─ wave 2 ─ release
//   reader P(b+1)    █████ reads of b+1's misses ██████ (issued before batch b began)
//
// Budgets hold: a prefetch that does not fit the tier's free slots is skipped (counted), and a
// batch that cannot be admitted while later prefetches hold slots drops them and is admitted
// alone. A prefetch that needs ids an earlier one is still reading first waits for that one
// (the tier's admit would wait on them; the time counts as the next batch's wait), so the disk
// reads one prefetch after another, each the moment the one before lands. A prefetch read that
// fails is dropped (counted); its batch reads the record again and reports the error.
//
// Landing groups (TieredSourceOptions::landing_groups = G > 1): a batch's misses are read in G
// groups in id order on two readers, group g + 2 started when the caller takes group g, so the disk
// has group g + 1 to read while the caller computes on group g (ExpertSource::wait_landed):
//
//   reader A    ██ group 0 ██┐ ██ group 2 ██┐
//   reader B    ███ group 1 ███┐ ██ group 3 ██┐
//   caller      wave 1 (hits) ─┴ group 0 ─────┴ group 1 ─ group 2 ─ ... finish: commit all
//
// The fills are committed (or, on a failed read, aborted) together, at finish_acquire.
//
// The host tier must hold one batch's working set (its unique experts, all leased while it
// computes): check_batch() says so before any work. Not thread-safe: one batch at a time (the
// ExpertCache beneath is the thread-safe part, shared with the device tier later).
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/record.h"
#include "runtime/tiers/cache_policy.h"
#include "runtime/tiers/expert_cache.h"
#include "runtime/tiers/expert_source.h"
#include "storage/record_io.h"
#include "storage/store.h"

namespace trove {

struct TieredSourceOptions {
  uint64_t host_budget_bytes = 0;  // --host
  EvictionPolicy policy = EvictionPolicy::kFrequency;
  RecordReaderOptions io;  // engine, queue depth, O_DIRECT, verify, fault injection
  // Where the host tier's slots live; null: plain host memory. The cuda backend passes pinned,
  // mapped memory (runtime/layer/cuda_executor.h) so the device tier's fills come straight from
  // the slots.
  std::shared_ptr<SlotMemory> host_memory;
  // A batch's misses are read in this many groups, in id order, two in flight at a time (each
  // on its own reader, so the disk never idles between them), and wait_landed() hands out each
  // group as it lands: the cuda executor copies and computes a group while the next is read.
  // 1: one group (wait_landed() has nothing to hand out; finish_acquire() waits for all).
  int landing_groups = 1;
};

// What the look-ahead did over a source's life (TieredExpertSource::prefetch).
struct PrefetchStats {
  int64_t prefetches = 0;     // prefetch() calls
  int64_t skipped = 0;        // admitted nothing: no room in the host tier (or no reader)
  int64_t dropped = 0;        // ended before their batch consumed them (room, drop_prefetches)
  int64_t read_errors = 0;    // prefetches whose reads failed (their batch read again)
  int64_t records_read = 0;   // misses read ahead
  int64_t waits = 0;          // prefetch() calls that waited for an earlier prefetch's reads
  int64_t consumed_hits = 0;  // ids of consumed prefetches that their batch asked for
  int64_t consumed_ids = 0;   // ids of consumed prefetches
  double wait_seconds = 0;    // waited for prefetch reads (in begin_acquire and prefetch())
};

class TieredExpertSource final : public ExpertSource {
 public:
  // REQUIRES: `store` outlives the source; `layer` is one of store.layers() and `layout` its
  // record layout. Errors: a budget below one record, the store file that cannot be opened
  // for reading, an io engine the kernel refuses (when asked for explicitly).
  static Result<std::unique_ptr<TieredExpertSource>> open(const StoreReader& store,
                                                          const StoreLayerInfo& layer,
                                                          const RecordLayout& layout,
                                                          const TieredSourceOptions& options);
  ~TieredExpertSource() override;

  // OK when a batch of up to `max_unique` distinct experts fits the host tier, else
  // resource_exhausted: "the host budget 64 MiB holds 27,000 records of 2,368 bytes; one batch
  // of 2048 tokens x 32 selections can need 65,536 (155 MiB): raise --host to at least
  // 155 MiB or lower --batch". `what` describes the batch ("2048 tokens x 32 selections").
  Status check_batch(int64_t max_unique, const std::string& what) const override;

  const RecordLayout& layout() const override { return layout_; }
  int64_t num_experts() const override { return static_cast<int64_t>(layer_->table.count); }
  std::string describe() const override;
  Status acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override;
  void release(std::span<const int64_t> ids) override;
  Status begin_acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override;
  Status finish_acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override;
  Status wait_landed(std::span<const int64_t> ids, std::span<const uint8_t*> records,
                     std::vector<uint32_t>* landed) override;
  ExpertFetchStats last_fetch() const override { return last_; }
  void prefetch(std::span<const int64_t> ids) override;
  void drop_prefetches() override;
  // Prefetches admitted and not yet consumed.
  int64_t pending_prefetches() const { return static_cast<int64_t>(groups_.size()); }
  PrefetchStats prefetch_stats() const { return prefetch_stats_; }
  const uint8_t* device_address(const uint8_t* record) const override {
    return cache_->device_address(record);
  }

  // After the store was updated in place to a new generation (storage/store_update.h) with
  // new bytes for experts `ids`: the resident copies of those experts take the new bytes
  // (`bytes(id)`, stride bytes each), so the tier stays warm, and the source reads through
  // `store` (reopened at the new generation; `layer` one of its layers) from now on: its
  // checksums verify later reads. The file must be the same one, updated in place (a rewrite
  // by rename needs a new source). The rewritten residents count as hits in metrics().
  // Errors: `layer` of another geometry.
  // REQUIRES: no batch acquired.
  Status refresh(const StoreReader& store, const StoreLayerInfo& layer,
                 std::span<const int64_t> ids, const std::function<const uint8_t*(int64_t)>& bytes);

  const ExpertCache& host() const { return *cache_; }
  const RecordReader& disk() const { return *reader_; }

 private:
  TieredExpertSource(const StoreReader& store, const StoreLayerInfo& layer,
                     const RecordLayout& layout);

  // One prefetch: its ids (those admitted), its leases and fills, and the reader of its misses.
  struct Prefetch {
    std::vector<int64_t> ids;
    CacheBatch batch;
    std::vector<RecordRead> reads;
    std::unique_ptr<RecordReader> reader;  // null when nothing was read
    bool in_flight = false;
    double busy_before = 0;  // reader's busy_seconds and bytes_read at start
    uint64_t bytes_before = 0;
    double disk_seconds = 0;  // what its reads cost, once settled
    uint64_t bytes_read = 0;
  };
  // Waits for p's reads and commits them (or on error drops its fills and leases: p.ids then
  // empty); the reader goes back to the spares, the reads' cost into p.
  void settle(Prefetch& p);
  // settle(), then ends p's leases.
  void end(Prefetch& p);
  // Settles every prefetch if one has a fill among `ids`, so an admit of them does not wait on
  // this source's own reads. Returns the seconds it waited.
  double settle_overlapping(std::span<const int64_t> ids);
  // Starts landing group g of reads_ on reader g % 2 (landing_groups > 1).
  Status start_group(int g);
  // Waits for the oldest group in flight, then starts the next one not started.
  Status land_next_group();
  // Waits for every group in flight (after an error); the first error.
  Status wait_groups();
  // The end of the batch in flight once its reads are done (`s`: how they went; `stalled`: the
  // seconds waited now): commits its fills and sets its records, or drops them on error.
  Status finish_batch(std::span<const int64_t> ids, std::span<const uint8_t*> records,
                      const Status& s, double stalled);
  void mark_filling(std::span<const int64_t> ids, const CacheBatch& batch, bool on);

  const StoreReader* store_;
  const StoreLayerInfo* layer_;
  RecordLayout layout_;
  std::unique_ptr<ExpertCache> cache_;
  std::unique_ptr<RecordReader> reader_;

  // The batch between begin_acquire and finish_acquire.
  std::vector<int64_t> batch_ids_;  // a copy: the destructor may outlive the caller's ids
  CacheBatch batch_;
  std::vector<RecordRead> reads_;
  bool in_flight_ = false;
  double begin_time_ = 0;    // monotonic seconds at begin_acquire
  double disk_busy_ = 0;     // reader's busy_seconds at begin_acquire
  uint64_t disk_bytes_ = 0;  // reader's bytes_read at begin_acquire
  ExpertFetchStats last_;
  // Landing groups (landing_groups > 1): reads_[group_begin_[g], group_begin_[g + 1]) is group g;
  // groups landed_groups_ .. started_groups_ - 1 are in flight, group g on readers_[g % 2].
  int landing_groups_ = 1;
  std::vector<size_t> group_begin_;
  int started_groups_ = 0, landed_groups_ = 0;
  std::unique_ptr<RecordReader> second_reader_;
  double second_busy_ = 0;
  uint64_t second_bytes_ = 0;
  RecordReader* group_reader(int g) { return g % 2 == 0 ? reader_.get() : second_reader_.get(); }

  // Look-ahead.
  RecordReaderOptions io_;
  std::vector<std::unique_ptr<Prefetch>> groups_;  // oldest first
  std::vector<std::unique_ptr<RecordReader>> spare_readers_;
  std::vector<uint8_t> filling_;  // per expert: a read of this source is in flight for it
  PrefetchStats prefetch_stats_;
  double pending_wait_ = 0;  // waited in prefetch() since the last begin_acquire
};

}  // namespace trove
