// What the executors (runtime/layer/peer_executor.h) share for one batch: the distinct experts of
// a routing with each slot's index among them, a lease on their records, and the batch's
// counters. Internal to runtime/layer.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/status.h"
#include "kernels/peer.h"
#include "runtime/layer/peer_executor.h"
#include "runtime/tiers/expert_source.h"

namespace trove {

// One batch's distinct experts. This runs on the critical path of every layer call with tens of
// thousands of slots, so dedupe neither sorts nor searches: it sets a bit per slot's expert in
// a bitmap of the N experts and a bit per touched 64-expert word in a summary, then walks the
// summary's set bits in order (the ids come out ascending), noting each touched word's rank
// base; a slot's index is its word's base plus the set bits below it. O(slots + N / 4096), and
// both bitmaps are all zero again between calls. (A sort of the ids took 2.8 ms of a 28 ms
// forward at N = 262K, 2048 tokens.)
struct ExpertBatch {
  std::vector<int64_t> unique_ids;             // ascending
  std::vector<int32_t> slot_index;             // per slot: its index in unique_ids
  std::vector<const uint8_t*> unique_records;  // per unique id (sized by dedupe)
  std::vector<const uint8_t*> slot_records;    // per slot (point_slots)
  std::vector<uint64_t> present;               // [ceil(N / 64)], see above
  std::vector<uint64_t> touched;               // [ceil(N / 4096)]: words of `present` in use
  std::vector<int32_t> rank_base;              // [ceil(N / 64)]: valid for touched words

  // unique_ids and slot_index of `r`, whose ids are in [0, num_experts).
  void dedupe(const PeerRouting& r, int64_t num_experts);
  // slot_records from unique_records (nullptr for a record not here yet).
  void point_slots();
};

// Releases what it acquired when it goes out of scope.
class ExpertLease {
 public:
  explicit ExpertLease(ExpertSource& source) : source_(source) {}
  ~ExpertLease();
  ExpertLease(const ExpertLease&) = delete;
  ExpertLease& operator=(const ExpertLease&) = delete;
  // ExpertSource::begin_acquire and finish_acquire; an error from either ends the lease (the
  // source has let go of everything). REQUIRES: `ids` outlives the lease.
  Status begin(std::span<const int64_t> ids, std::span<const uint8_t*> records);
  Status finish(std::span<const uint8_t*> records);
  // ExpertSource::wait_landed: the next group of records on their way; an error ends the lease.
  Status wait_landed(std::span<const uint8_t*> records, std::vector<uint32_t>* landed);
  // begin and finish of b's unique experts, then b's slot_records.
  Status all(ExpertBatch& b);

 private:
  ExpertSource& source_;
  std::span<const int64_t> ids_;
  bool held_ = false;
};

// Pointers into `params` for the kernels.
PeerRouterParams router_params(const PeerDenseParams& params);

// The counters every executor reports the same way: tokens, slots, unique experts, record bytes.
void count_batch(const PeerRouting& r, const ExpertBatch& b, uint64_t record_bytes,
                 PeerBatchStats* stats);
// A host executor's batch: count_batch, the source's fetch, and the expert time (`seconds` since
// the batch began, less the time blocked on the disk, which is the fetch's, not the kernels').
void report_host_batch(const PeerRouting& r, const ExpertBatch& b, const ExpertSource& source,
                       double acquire_seconds, double seconds, PeerBatchStats* stats);

}  // namespace trove
