// ExpertSource: where a PEER layer's expert records come from. The layer asks for the unique
// experts of a batch, computes with the records it is handed, then releases them; between
// acquire and release a record may not move or be evicted (a lease). The kernels only ever see
// record pointers, so a tiered source (device, pinned host, disk) slots in without touching
// them.
//
// Sources here: MemoryExpertSource (records in an owned buffer, e.g. packed from fp32 tensors)
// and ResidentStoreExpertSource (each record read from the store, verified, the first time it
// is acquired, and kept).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/record.h"
#include "storage/store.h"

namespace trove {

// What fetching one batch's records cost (sources without a slower tier report zeros).
struct ExpertFetchStats {
  int64_t hits = 0;            // unique experts already resident
  int64_t misses = 0;          // unique experts read from the tier below
  uint64_t bytes_read = 0;     // bytes read from the tier below (aligned extents included)
  double resolve_seconds = 0;  // residency lookup, leases, issuing the reads
  double disk_seconds = 0;     // from issuing the reads to the last one verified in memory
  double stall_seconds = 0;    // the caller blocked in finish_acquire() waiting for them
  // Look-ahead (ExpertSource::prefetch): unique experts of the batch that a prefetch read ahead
  // of it (counted in hits: the batch itself did not read them), and the time spent waiting for
  // prefetch reads still in flight: at begin_acquire (within resolve_seconds) and in prefetch()
  // calls since the last batch (outside the layer's call). bytes_read and disk_seconds include
  // the consumed prefetch's reads.
  int64_t prefetched = 0;
  int64_t prefetch_reads = 0;  // records the batch's prefetch read, used by the batch or not
  double prefetch_wait_seconds = 0;
};

class ExpertSource {
 public:
  ExpertSource() = default;
  ExpertSource(const ExpertSource&) = delete;
  ExpertSource& operator=(const ExpertSource&) = delete;
  virtual ~ExpertSource() = default;

  virtual const RecordLayout& layout() const = 0;
  virtual int64_t num_experts() const = 0;
  // "store model.trove, layer L (mapped)": for error messages and reports.
  virtual std::string describe() const = 0;

  // Makes the records of `ids` readable: on success records[i] points at the layout().stride
  // bytes of expert ids[i], valid until release(ids). Errors name the expert (a record that
  // fails its checksum, an I/O error); on error nothing stays acquired.
  // REQUIRES: ids ascending and unique, each in [0, num_experts()); records.size() == ids.size().
  virtual Status acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) = 0;
  // REQUIRES: exactly the ids of one successful acquire() not yet released.
  virtual void release(std::span<const int64_t> ids) = 0;

  // acquire() in two halves, so the caller can compute on the records that are here while the
  // rest are read: begin_acquire() leases every id and sets records[i] for the experts readable
  // now and nullptr for those on their way; finish_acquire() waits for those and sets them.
  // After finish_acquire() returns OK, the batch is as after acquire(). An error from either
  // leaves nothing acquired (no release). The defaults: everything is here at once.
  // REQUIRES: as for acquire(); finish_acquire() with the ids and records of the
  // begin_acquire() just before it.
  virtual Status begin_acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) {
    return acquire(ids, records);
  }
  virtual Status finish_acquire(std::span<const int64_t>, std::span<const uint8_t*>) {
    return Status::ok_status();
  }
  // Between begin_acquire() and finish_acquire(), for a caller that computes on records as they
  // land: waits until the next group of the records on their way is readable, sets records[i]
  // for them and appends their indices i to *landed. Returns OK leaving *landed as it was once
  // nothing is left on its way (finish_acquire() then waits for nothing). An error is as
  // finish_acquire()'s: nothing stays acquired (no finish_acquire(), no release). The default:
  // one group, which finish_acquire() waits for.
  // REQUIRES: the ids and records of the begin_acquire() just before it.
  virtual Status wait_landed(std::span<const int64_t> /*ids*/,
                             std::span<const uint8_t*> /*records*/,
                             std::vector<uint32_t>* /*landed*/) {
    return Status::ok_status();
  }
  // OK when one batch may lease `max_unique` distinct experts at once. A source with a bounded
  // tier says otherwise (resource_exhausted naming the budget, and `what` the batch) so callers
  // can refuse a batch size before any work. The default: any batch fits.
  virtual Status check_batch(int64_t /*max_unique*/, const std::string& /*what*/) const {
    return Status::ok_status();
  }
  // What the last (begin_acquire, finish_acquire) or acquire() cost.
  virtual ExpertFetchStats last_fetch() const { return {}; }
  // For a record acquire() returned (still acquired): the address at which a CUDA kernel reads
  // it (pinned, mapped host memory: copies from it are DMA and an SM-driven gather can read
  // it), or null when the device cannot (pageable memory). The default: null.
  virtual const uint8_t* device_address(const uint8_t* /*record*/) const { return nullptr; }

  // Look-ahead: the experts `ids` of a batch still to come, so that a source with a slower tier
  // leases the ones it holds and starts reading the ones it lacks now, while the batches before
  // them compute. Prefetches are consumed in order, one by each later begin_acquire() (or
  // acquire()): call prefetch() once per batch, for the batches in the order they will run (a
  // prediction whose ids differ from the batch's is fine: what it read stays resident). A hint:
  // it never fails and never makes a batch fail; when the budget has no room, it prefetches less
  // or nothing. The default: nothing.
  // REQUIRES: ids ascending and unique, each in [0, num_experts()).
  virtual void prefetch(std::span<const int64_t> /*ids*/) {}
  // Ends every prefetch not yet consumed (what was read stays resident).
  virtual void drop_prefetches() {}
};

// Records in memory, owned.
class MemoryExpertSource final : public ExpertSource {
 public:
  // Takes `records` (num_experts * layout.stride bytes).
  // REQUIRES: records.size() is a multiple of layout.stride.
  MemoryExpertSource(const RecordLayout& layout, std::vector<uint8_t> records);

  // Packs fp32 tables `down` [N, D] and `up` [N, D_out] into records of `layout` (any dtype;
  // values must be finite and in range for it, see kernels/quant.h). Errors name the table and
  // the expert of a value that cannot be packed.
  static Result<std::unique_ptr<MemoryExpertSource>> pack(const RecordLayout& layout,
                                                          std::span<const float> down,
                                                          std::span<const float> up,
                                                          int threads = 0);

  const RecordLayout& layout() const override { return layout_; }
  int64_t num_experts() const override { return num_experts_; }
  std::string describe() const override;
  Status acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override;
  void release(std::span<const int64_t>) override {}

  std::span<const uint8_t> records() const { return records_; }

 private:
  RecordLayout layout_;
  std::vector<uint8_t> records_;
  int64_t num_experts_ = 0;
};

// The record table of one store layer, read through the store's checked reads
// (StoreReader::read_records: O_DIRECT or pread, each record's checksum verified unless `verify`
// is false) the first time each record is acquired, then kept in memory. A record the disk
// fails to read, or one that fails its checksum, is a Status naming the file, layer, expert
// and errno (a memory-mapped table would raise SIGBUS instead), and is never handed out.
// Records stay resident for the source's life: memory grows with the experts used, up to the
// whole table (address space for it is reserved, not committed, at open); a host budget
// (TieredExpertSource) bounds it instead.
// Not thread-safe: one batch at a time (the tiered store of SPEC §5 is the concurrent one).
class ResidentStoreExpertSource final : public ExpertSource {
 public:
  // REQUIRES: `store` outlives this source; `layer` is one of store.layers() and `layout` its
  // record layout (runtime/layer/store_layer.h).
  static Result<std::unique_ptr<ResidentStoreExpertSource>> open(const StoreReader& store,
                                                                 const StoreLayerInfo& layer,
                                                                 const RecordLayout& layout,
                                                                 bool verify = true);
  ~ResidentStoreExpertSource() override;

  const RecordLayout& layout() const override { return layout_; }
  int64_t num_experts() const override { return static_cast<int64_t>(layer_.table.count); }
  std::string describe() const override;
  Status acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override;
  void release(std::span<const int64_t>) override {}

  // Records read from the store so far (each once).
  int64_t loaded_records() const { return loaded_count_; }

 private:
  ResidentStoreExpertSource(const StoreReader& store, const StoreLayerInfo& layer,
                            const RecordLayout& layout, bool verify, uint8_t* table);

  const StoreReader& store_;
  const StoreLayerInfo& layer_;
  RecordLayout layout_;
  bool verify_;
  uint8_t* table_;                // anonymous mapping of table.bytes
  std::vector<uint64_t> loaded_;  // one bit per expert
  int64_t loaded_count_ = 0;
  std::vector<int64_t> missing_;  // scratch of acquire()
  std::vector<uint8_t> staging_;  // scratch of acquire()
};

}  // namespace trove
