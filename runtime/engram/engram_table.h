// EngramTable: the rows of a stored Engram layer (runtime/engram/engram_store.h), looked up by
// hashed n-gram over the store's tiers. Its rows live in records of rows_per_record rows; a
// batch's lookup acquires the unique records its rows fall in from an ExpertSource (all
// resident, or a byte-budgeted host tier over the store file: runtime/tiers), dequantizes the
// rows (kernels/engram.h) and releases them.
//
// Prefetch from tokens: a batch's rows depend only on its token ids, so prefetch(ids) begins
// acquiring them (a tiered source issues the disk reads on its I/O thread) as soon as the ids
// are known, and the lookup that follows finishes the acquisition: the reads overlap whatever
// runs in between (the layers in front of the Engram layer). One batch at a time per table.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/engram.h"
#include "runtime/engram/engram_store.h"
#include "runtime/tiers/expert_source.h"
#include "runtime/tiers/tiered_source.h"
#include "storage/store.h"

namespace trove {

struct EngramTableOptions {
  // Host tier budget and I/O (--host); none: every record read once, verified, then resident.
  std::optional<TieredSourceOptions> tiers;
  bool verify_checksums = true;
  int threads = 1;  // the gather's threads (0: all cores)
};

// What the last lookup cost.
struct EngramLookupStats {
  int64_t rows = 0;            // rows looked up (tables x positions)
  int64_t unique_records = 0;  // records they fall in
  bool prefetched = false;     // the records were asked for by prefetch()
  ExpertFetchStats fetch;      // the source's hits, misses, bytes, stall
  double acquire_seconds = 0;  // waiting for the records (0 after a finished prefetch's reads)
  double gather_seconds = 0;   // dequantizing the rows
};

class EngramTable {
 public:
  // REQUIRES: `store` outlives the table; `layer` is one of store.layers().
  static Result<std::unique_ptr<EngramTable>> open(const StoreReader& store,
                                                   const StoreLayerInfo& layer,
                                                   const EngramTableOptions& options = {});
  ~EngramTable();
  EngramTable(const EngramTable&) = delete;
  EngramTable& operator=(const EngramTable&) = delete;

  const EngramConfig& config() const { return config_; }
  const EngramRowLayout& rows() const { return rows_; }
  const ExpertSource& source() const { return *source_; }
  std::string describe() const { return source_->describe(); }

  // ids [tables][batch * seq] of tokens [batch, seq] (kernels/engram.h).
  Status hash(const int64_t* tokens, int64_t batch, int64_t seq, std::vector<int64_t>* ids) const;

  // Begins acquiring the records of ids [tables][n]; the next lookup() with the same ids
  // finishes it (a lookup of other ids, or a second prefetch, drops it first).
  Status prefetch(std::span<const int64_t> ids, int64_t n);
  // out [n][E] (E = tables * e; table k's row at columns k*e..k*e+e) for ids [tables][n].
  // Errors: an id outside [0, vocab) (naming the table and position), a record the store
  // fails to read or verify (naming it), a batch larger than the host tier (what to raise).
  Status lookup(std::span<const int64_t> ids, int64_t n, float* out);
  // Drops a pending prefetch (its records are released).
  void cancel_prefetch();
  // Reads every record through the source once (all resident: the whole table is then in
  // memory, verified; a host tier keeps what its budget holds). Errors as lookup's.
  Status preload();

  const EngramLookupStats& last_lookup() const { return last_; }

 private:
  EngramTable() = default;
  Status records_of(std::span<const int64_t> ids, int64_t n, std::vector<int64_t>* recs) const;

  const StoreReader* store_ = nullptr;
  const StoreLayerInfo* layer_ = nullptr;
  EngramConfig config_;
  EngramRowLayout rows_;
  RecordLayout record_;  // what the sources see: opaque records of rows_.record_bytes
  std::unique_ptr<ExpertSource> source_;
  int threads_ = 1;

  // The prefetched batch: its record ids and their pointers (null while on their way).
  bool pending_ = false;
  std::vector<int64_t> pending_recs_;
  std::vector<const uint8_t*> pending_ptrs_;
  EngramLookupStats last_;
};

}  // namespace trove
