// ExpertCache: one residency tier of expert records (SPEC §5): a fixed budget of equal slots,
// an index from expert id to slot, leases, and a pluggable replacement policy. T1 (host memory)
// and T0 (device memory, through a SlotMemory that allocates there) share it: the cache only
// hands out slot addresses and never reads or writes the bytes behind them.
//
// Modelled on LevelDB's Cache: an entry's "charge" is one slot; admit() is Lookup-or-Insert for
// a whole batch and hands out leases (LevelDB's handles); release() ends them; an entry in use
// is never evicted and sits outside the policy's candidates. One batch, from the layer's view:
//
//   admit(ids, &batch)             every id leased; hits point at valid records, misses at
//        |                         slots marked "filling" (batch.miss_index)
//   caller fills the misses        from the next tier down (disk, host), outside any lock
//        |
//   commit_fills(ids, batch)  -->  compute with batch.slots  -->  release(ids)
//   or, when a fill fails:
//   abort_fills(ids, batch)        misses dropped, every lease of the batch ended
//
// Thread safety: every method may be called from any thread. One mutex guards the index, the
// leases, the policy and the metrics; it is held for O(batch) bookkeeping per call and never
// while records are copied or read. A slot being filled is invisible as a hit: admit() of a
// batch that asks for an id another batch is filling waits (condition variable) until that
// batch commits (then it is a hit) or aborts (then it is this batch's miss). It waits before it
// changes anything, so a waiting admit holds nothing.
// REQUIRES (against deadlock): a thread that has admitted a batch commits or aborts its fills
// before it waits on an admit() of this cache itself.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "runtime/tiers/cache_policy.h"

namespace trove {

// Where a cache's slots live. The default (ExpertCacheOptions::memory null) is anonymous host
// memory (mmap, huge-page advice); the device tier passes one over cudaMalloc. allocate() is
// called once per block of at most 1 GiB at create(), release() once per block at destruction.
class SlotMemory {
 public:
  SlotMemory() = default;
  SlotMemory(const SlotMemory&) = delete;
  SlotMemory& operator=(const SlotMemory&) = delete;
  virtual ~SlotMemory() = default;
  // `bytes` starting at a multiple of the cache's slot_alignment (cudaMalloc's 256 bytes
  // covers the default 64), or resource_exhausted saying why.
  virtual Result<uint8_t*> allocate(size_t bytes) = 0;
  // REQUIRES: `data` and `bytes` of one allocate() not yet released.
  virtual void release(uint8_t* data, size_t bytes) = 0;
  // Where a CUDA kernel reads the byte at host address `p` of an allocated block: pinned, mapped
  // host memory (runtime/layer/cuda_executor.h: make_pinned_slot_memory) says; null when the
  // device cannot read it there (pageable memory, device memory). The default: null.
  virtual const uint8_t* device_address(const uint8_t* /*p*/) const { return nullptr; }
};

// The default slot memory's blocks (anonymous mmap, huge pages advised), for a SlotMemory that
// adds to it (pinning): `bytes` page-aligned, or the mmap error.
Result<uint8_t*> allocate_host_block(size_t bytes);
void free_host_block(uint8_t* data, size_t bytes);

struct ExpertCacheOptions {
  uint64_t budget_bytes = 0;  // the tier's byte budget (--host); whole slots only
  size_t slot_bytes = 0;      // one record: RecordLayout::stride
  int64_t num_experts = 0;    // ids are in [0, num_experts)
  EvictionPolicy policy = EvictionPolicy::kLru;
  // Every slot starts at a multiple of this (a power of two, at most 4096); slots are
  // slot_bytes rounded up to it. 64 (a cache line; record strides are multiples of 64) wastes
  // nothing. 4096 lets slots take O_DIRECT reads in place, which only pays when the store's
  // stride is itself a multiple of 4096, so it is not the default.
  size_t slot_alignment = 64;
  // For messages: "the host budget 64 MiB holds ...: raise --host or lower --batch".
  std::string tier_name = "host";
  std::string budget_flag = "--host";
  // Where the slots live; null: host memory. Must outlive the cache.
  std::shared_ptr<SlotMemory> memory;
};

// What admit() decided for one batch of ids.
struct CacheBatch {
  // Per id: the slot holding its record (a hit) or to receive it (a miss); slot_bytes
  // writable bytes. Valid until the batch's leases end.
  std::vector<uint8_t*> slots;
  // Indices into ids of the misses, ascending: the caller fills slots[miss_index[j]] with the
  // record of ids[miss_index[j]], then calls commit_fills (or abort_fills).
  std::vector<uint32_t> miss_index;
  // The ids admit() evicted to make room (no longer resident, whatever happens to the fills):
  // for a mirror of the residency kept elsewhere (the device's, runtime/layer/cuda_executor.h).
  std::vector<int64_t> evicted;
};

struct CacheMetrics {
  int64_t capacity_slots = 0;
  size_t slot_bytes = 0;
  int64_t batches = 0;           // admitted
  int64_t rejected_batches = 0;  // admit() said resource_exhausted
  int64_t requested = 0;         // expert selections reported, duplicates included
  int64_t unique = 0;            // ids admitted, unique per batch: hits + misses
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t evictions = 0;
  int64_t fills_committed = 0;
  int64_t fills_aborted = 0;
  uint64_t bytes_filled = 0;  // fills_committed * slot_bytes
  int64_t fill_waits = 0;     // times an admit() waited for another batch's fill
  int64_t leased_slots = 0;   // now: slots with a lease (filling ones included)
  int64_t resident = 0;       // now: entries in the index (filling ones included)
  int64_t peak_leased_slots = 0;

  double hit_rate() const { return unique == 0 ? 0.0 : static_cast<double>(hits) / unique; }
};

class ExpertCache {
 public:
  // Allocates the slots once, in blocks of at most 1 GiB (io_uring's limit for a registered
  // buffer; also the unit to pin), page-aligned. Capacity: budget_bytes / slot stride, at most
  // num_experts. Errors: invalid_argument for a budget below one slot or bad sizes,
  // resource_exhausted when the memory cannot be had.
  static Result<std::unique_ptr<ExpertCache>> create(const ExpertCacheOptions& options);

  ExpertCache(const ExpertCache&) = delete;
  ExpertCache& operator=(const ExpertCache&) = delete;
  ~ExpertCache();

  // Leases every id of the batch. Hits are leased as they are; each miss gets a free slot or
  // the slot of a victim the policy picks among unleased valid entries, marked "filling". When
  // the batch's ids that are not leased already, plus the slots leased now, exceed capacity:
  // resource_exhausted naming the budget, the record size and what the batch needs, and
  // nothing changes (retry after other batches release, or split the batch). ids not unique,
  // ascending and in [0, num_experts): invalid_argument, nothing changes.
  // On success batch->slots has ids.size() entries.
  Status admit(std::span<const int64_t> ids, CacheBatch* batch);

  // The caller has written the records of the batch's misses: they become valid hits for
  // later batches. The batch keeps its leases.
  // REQUIRES: ids and batch from one successful admit(), fills not yet committed or aborted.
  void commit_fills(std::span<const int64_t> ids, const CacheBatch& batch);

  // A fill failed: the batch's misses are dropped (slots freed, no entry; waiting batches then
  // miss them) and every lease of the batch ends, hits included. Do not release() it after.
  // (Ending the hits' leases here rather than in release() matters: once a dropped id is gone
  // another batch may admit it into another slot, and release(ids) could not tell the two.)
  // REQUIRES: as for commit_fills.
  void abort_fills(std::span<const int64_t> ids, const CacheBatch& batch);

  // Ends the leases of a batch; its entries stay resident and may now be evicted.
  // REQUIRES: the ids of one admit() whose fills were committed, not yet released.
  void release(std::span<const int64_t> ids);

  // Adds `selections` (the batch's expert choices before dedup) to metrics().requested.
  void report_requested(int64_t selections);

  // Whether `id` is resident and valid (not filling). A probe: no lease, no policy update.
  bool contains(int64_t id) const;

  int64_t capacity_slots() const { return capacity_; }
  // Bytes from one slot's start to the next: slot_bytes rounded up to slot_alignment.
  size_t slot_stride() const { return stride_; }
  // SlotMemory::device_address of a slot's address (null with the default host memory).
  const uint8_t* device_address(const uint8_t* slot) const {
    return options_.memory != nullptr ? options_.memory->device_address(slot) : nullptr;
  }
  const ExpertCacheOptions& options() const { return options_; }
  // The memory holding the slots, for registering (io_uring, cudaHostRegister); device
  // addresses when options().memory allocates there.
  const std::vector<std::span<uint8_t>>& blocks() const { return blocks_; }

  CacheMetrics metrics() const;

 private:
  enum class SlotState : uint8_t { kFree, kFilling, kValid };

  ExpertCache(const ExpertCacheOptions& options, size_t stride, int32_t capacity);
  // A hint for the loops over a batch: the entries of ids a few places after i (ids out of
  // range are skipped). REQUIRES: mutex_ held.
  void prefetch_entry(std::span<const int64_t> ids, size_t i) const;

  uint8_t* slot_address(int32_t slot) const {
    return blocks_[static_cast<size_t>(slot / slots_per_block_)].data() +
           static_cast<size_t>(slot % slots_per_block_) * stride_;
  }
  Status check_ids(std::span<const int64_t> ids) const;
  Status capacity_error(int64_t batch_unique, int64_t needed_now, int64_t leased_by_others,
                        int64_t shared) const;
  // REQUIRES: mutex_ held.
  void pin(int32_t slot);
  void unpin(int32_t slot);
  void drop_filling(int32_t slot);

  const ExpertCacheOptions options_;
  const size_t stride_;
  const int32_t capacity_;
  int32_t slots_per_block_ = 0;
  std::vector<std::span<uint8_t>> blocks_;  // released by the destructor

  mutable std::mutex mutex_;  // guards everything below
  std::condition_variable fill_done_;
  int waiters_ = 0;  // admit() calls waiting on fill_done_
  std::unique_ptr<ReplacementPolicy> policy_;
  std::vector<int32_t> slot_of_;     // per expert: its slot, -1 when absent
  std::vector<int64_t> id_of_;       // per slot: its expert, -1 when free
  std::vector<uint32_t> leases_;     // per slot: batches holding it
  std::vector<SlotState> state_;     // per slot
  std::vector<int32_t> free_slots_;  // a stack; starts with every slot, lowest on top
  CacheMetrics metrics_;
};

}  // namespace trove
