// The .trove store: one file holding a model's expert tables (several PEER layers), their
// dense tensors and a JSON manifest. Byte layout, checksums and versioning are specified in
// storage/FORMAT.md; this header is the API.
//
// storage knows regions, offsets and checksums, not PEER math: each layer carries an opaque
// `info` JSON object (config, record layout, quantization error, source) that runtime writes
// and reads. Record tables are N fixed-stride records whose regions start 4096-aligned, so any
// record can be read with O_DIRECT.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/status.h"
#include "storage/file.h"
#include "storage/store_lock.h"

namespace trove {

class FileOps;  // storage/record_io.h

inline constexpr uint16_t kStoreVersionMajor = 1;
inline constexpr uint16_t kStoreVersionMinor = 0;

// ---- writing ---------------------------------------------------------------------------------

struct StoreTableSpec {
  std::string dtype;   // "int4", "int8", "bf16", ... (recorded, not interpreted)
  uint64_t count = 0;  // records N
  uint64_t record_bytes = 0;
  uint64_t stride = 0;  // >= record_bytes, multiple of 64
};

// Writes a store through an AtomicFileWriter: nothing appears at `path` until finish()
// succeeds, and a crash at any point leaves the previous file (or none).
//
// Usage:
//   TROVE_ASSIGN_OR_RETURN(auto w, StoreWriter::create(path, provenance));
//   for each layer:
//     w.begin_layer(name, info, table);
//     w.append_records(...) until `count` records;      // streamed, any chunk size
//     w.add_dense("query.weight", shape, data); ...      // small fp32 tensors
//     w.end_layer();
//   w.finish();
class StoreWriter {
 public:
  StoreWriter(StoreWriter&&) noexcept;
  StoreWriter& operator=(StoreWriter&&) noexcept;
  StoreWriter(const StoreWriter&) = delete;
  StoreWriter& operator=(const StoreWriter&) = delete;
  ~StoreWriter();

  static Result<StoreWriter> create(const std::string& path, nlohmann::json provenance);

  // REQUIRES: no layer open. Layer names are unique and non-empty.
  Status begin_layer(const std::string& name, nlohmann::json info, const StoreTableSpec& table);
  // Whole records: a multiple of table.stride bytes, never past `count` in total.
  Status append_records(std::span<const uint8_t> records);
  // Dense tensors of the open layer, stored as fp32 little-endian. Names unique per layer.
  Status add_dense(const std::string& name, const std::vector<int64_t>& shape,
                   std::span<const float> data);
  // Replaces the open layer's info (for statistics known only after its records, such as
  // quantization error).
  Status update_layer_info(nlohmann::json info);
  // Checks that exactly `count` records were appended.
  Status end_layer();
  // Writes dense data, checksums, manifest, trailer and header, fsyncs and renames.
  Status finish();
  // finish() for a writer that holds `lock`, the writer lock of the store at the same path (a
  // training run rewriting its store): the new file is locked before it is renamed over the
  // old one, and `lock` moves to it, so no second writer can slip in between.
  Status finish(StoreLock* lock);

 private:
  struct Impl;
  explicit StoreWriter(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// ---- reading ---------------------------------------------------------------------------------

struct StoreDenseInfo {
  std::string name;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // absolute file offset of fp32 data
  uint64_t bytes = 0;
  uint64_t xxh3 = 0;
};

struct StoreTableInfo {
  std::string dtype;
  uint64_t count = 0;
  uint64_t record_bytes = 0;
  uint64_t stride = 0;
  uint64_t offset = 0;  // absolute, 4096-aligned
  uint64_t bytes = 0;   // count * stride
};

struct StoreLayerInfo {
  std::string name;
  nlohmann::json info;
  StoreTableInfo table;
  std::vector<StoreDenseInfo> dense;

  const StoreDenseInfo* find_dense(const std::string& dense_name) const;
};

struct StoreOpenOptions {
  // Verify checksums of data read from disk (records, dense tensors). The manifest, header and
  // trailer are always verified.
  bool verify_checksums = true;
  // Open a second descriptor with O_DIRECT for read_records (falls back to buffered reads,
  // with a debug log, where the filesystem refuses O_DIRECT, e.g. tmpfs).
  bool direct_io = true;
  // Pin the generation opened: from open until the reader is destroyed, an update's commit waits
  // before writing the store (storage/store_lock.h), so every byte this reader reads belongs to
  // the generation it validated. False only for a process that holds the store's writer lock
  // itself (its commits would otherwise wait for its own reader).
  bool pin_generation = true;
  // Test seam for the reads of read_records and verify (tests/fault_injection.h); null: the
  // real syscalls.
  std::shared_ptr<FileOps> file_ops;
};

// One failed check found by verify().
struct StoreFault {
  std::string region;   // "header", "trailer", "manifest", "records", "dense", "checksums"
  std::string layer;    // empty for file-level regions
  std::string item;     // "expert 1234", "query.weight", ...
  uint64_t offset = 0;  // absolute file offset of the damaged extent
  uint64_t bytes = 0;
  // What is wrong: "checksum mismatch", "not zero", or the failed read ("read failed:
  // Input/output error (errno 5)").
  std::string error;
  // "records of layer L, expert 1234 at offset 8192 (2304 bytes): checksum mismatch"
  std::string message() const;
};

class StoreReader {
 public:
  StoreReader(StoreReader&&) noexcept;
  StoreReader& operator=(StoreReader&&) noexcept;
  StoreReader(const StoreReader&) = delete;
  StoreReader& operator=(const StoreReader&) = delete;
  ~StoreReader();

  // Validates header, trailer, manifest checksum and every manifest field (offsets in bounds,
  // aligned, non-overlapping; sizes consistent). Any failure is a Status naming the file and
  // the field; nothing is guessed. Corruption inside record or dense data is found when that
  // data is read, or by verify(). A file renamed over `path` while open runs is
  // Status::aborted ("changed while being opened; retry").
  //
  // First, when an update journal lies beside the store (storage/store_update.h), open runs
  // recover_store: it replays a committed journal (a crash after an update's commit point
  // leaves the file torn until then) or removes an uncommitted one, so that open never reads a
  // torn file. A committed journal that this process cannot replay (no write access) or that
  // belongs to another generation fails open with a Status naming it and what to do.
  static Result<StoreReader> open(const std::string& path, StoreOpenOptions options = {});

  const std::string& path() const;
  uint64_t file_size() const;
  uint16_t version_major() const;
  uint16_t version_minor() const;
  uint64_t generation() const;
  // XXH3-64 of the manifest bytes (with file_size and generation, the generation's identity).
  uint64_t manifest_xxh3() const;
  const nlohmann::json& manifest() const;
  const nlohmann::json& provenance() const;
  const std::vector<StoreLayerInfo>& layers() const;
  // nullptr when absent.
  const StoreLayerInfo* find_layer(const std::string& name) const;

  // A dense tensor as fp32, checksum verified (unless disabled).
  Result<std::vector<float>> read_dense(const StoreLayerInfo& layer, const std::string& name) const;

  // Copies records `ids` of `layer` into `out` (ids.size() * stride bytes, in the order of ids)
  // with aligned O_DIRECT reads (buffered when unavailable), verifying each record's checksum
  // (unless `verify` is false or the store was opened without verification). Errors name the
  // file, layer, expert id, offset and errno; on error `out` is unspecified.
  Status read_records(const StoreLayerInfo& layer, std::span<const int64_t> ids,
                      std::span<uint8_t> out, bool verify = true) const;

  // The whole record table, memory-mapped, NOT verified (callers verify with
  // verify_record when the data matters). A page the disk fails to read raises SIGBUS in the
  // thread touching it: trove's own read paths use read_records (errors name the expert and
  // errno) and keep this for benchmarks of the page cache.
  // REQUIRES: `layer` belongs to this reader (one of layers(), or a copy of one: it is found
  // by name). Violations abort.
  std::span<const uint8_t> mapped_records(const StoreLayerInfo& layer) const;
  // Checks the table.stride bytes at `record` against expert `id`'s stored checksum; a
  // mismatch is Status::corruption naming the file, layer, expert and offset.
  // REQUIRES: `record` points at table.stride readable bytes. A layer not of this reader is
  // Status::invalid_argument and an id outside [0, table.count) Status::out_of_range.
  Status verify_record(const StoreLayerInfo& layer, int64_t id, const uint8_t* record) const;
  // Expert `id`'s stored checksum (XXH3-64 of its full stride).
  // REQUIRES: `layer` belongs to this reader; 0 <= id < layer.table.count. Violations abort.
  uint64_t record_checksum(const StoreLayerInfo& layer, int64_t id) const;

  // Checks every checksum in the file. Returns OK and no faults, or the list of every damaged
  // extent found. `progress(done, total)` is called with bytes checked. Reads with pread (never
  // the mapping): an extent the disk fails to read is a fault naming the errno, and verify reads
  // on around it, record by record, so every readable record is still checked.
  Result<std::vector<StoreFault>> verify(
      const std::function<void(uint64_t, uint64_t)>& progress = nullptr) const;

 private:
  struct Impl;
  explicit StoreReader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Copies layer `info` of `store` into `w` whole (begin_layer .. end_layer), as a rewrite of the
// store keeps its other layers: records in chunks through checked reads (a bad sector is an error
// naming the record), each chunk handed to `patch(first, count, chunk)` first when given (it may
// overwrite records first .. first + count); dense tensors as stored, except those for which
// `dense(name)` returns a tensor.
using StoreRecordPatch = std::function<void(uint64_t first, uint64_t count, uint8_t* chunk)>;
using StoreDensePatch = std::function<const std::vector<float>*(const std::string& name)>;
Status copy_store_layer(const StoreReader& store, const StoreLayerInfo& info, StoreWriter* w,
                        const StoreRecordPatch& patch = nullptr,
                        const StoreDensePatch& dense = nullptr);

// XXH3-64 with seed 0, the store's checksum.
uint64_t store_checksum(std::span<const uint8_t> bytes);

}  // namespace trove
