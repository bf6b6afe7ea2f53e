// Store archives: one generation of a .trove store compressed with Zstandard for shipping or
// keeping (`trove export` / `trove import`, SPEC §4). Archives are never read on the serving
// path; a store is imported back to a plain .trove file before use.
//
// An archive is a standard zstd stream, so `zstd -d model.trove.zst` also gives the store
// back byte for byte:
//   - first a skippable frame (magic 0x184D2A5E) holding a JSON description: the store's
//     file_size, generation and manifest_xxh3 (its identity) and its regions;
//   - then the store's bytes in order, one zstd frame per record table and one per run of
//     everything else (header, dense tensors, checksums, manifest, trailer), each frame with
//     its content size and zstd's content checksum.
// One frame per table is what lets export report the ratio each record dtype reaches.
//
// Export reads the generation it pinned (StoreReader) and, unless told not to, checks every
// record and dense tensor against its stored checksum as it compresses it: a damaged store is
// refused, not shipped. Import decompresses beside the destination, checks the size and
// identity against the description, verifies every checksum of the result, and only then
// renames it over `store_path`; on any error nothing at `store_path` changes.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/status.h"

namespace trove {

struct ExportOptions {
  int level = 3;           // zstd level, 1..19 (negative: zstd's fast levels, down to -7)
  int threads = 1;         // zstd worker threads; 1 compresses on the calling thread
  bool verify = true;      // check records and dense tensors against their checksums
  bool overwrite = false;  // replace an existing archive at archive_path
  // Called with (bytes of the store done, store bytes in all).
  std::function<void(uint64_t, uint64_t)> progress;
};

// One compressed extent of the store: a layer's record table, or a run of everything else.
struct ArchiveRegion {
  std::string kind;   // "records" or "other"
  std::string layer;  // records: the layer; empty otherwise
  std::string dtype;  // records: the table's dtype ("int4", "bf16", ...); empty otherwise
  uint64_t offset = 0;
  uint64_t bytes = 0;
  uint64_t compressed_bytes = 0;  // the frame's size in the archive
};

struct ExportReport {
  std::string store_path, archive_path;
  uint64_t generation = 0;
  uint64_t store_bytes = 0;
  uint64_t archive_bytes = 0;  // including the description frame
  int level = 0, threads = 0;
  bool verified = false;
  double seconds = 0;
  std::vector<ArchiveRegion> regions;
};

// The per-dtype view of report.regions: {dtype or "other": {bytes, compressed_bytes, ratio}},
// ratio = compressed / original.
nlohmann::json archive_ratios_json(const std::vector<ArchiveRegion>& regions);
nlohmann::json export_report_json(const ExportReport& report);

// Writes the archive of `store_path`'s current generation to `archive_path` (atomically:
// nothing appears there unless it is complete). An existing archive_path is refused unless
// options.overwrite. A record or dense tensor failing its checksum is Status::corruption
// naming the layer and expert/tensor, and no archive is written.
Result<ExportReport> export_store(const std::string& store_path, const std::string& archive_path,
                                  const ExportOptions& options = {});

struct ImportOptions {
  bool overwrite = false;                            // replace an existing store at store_path
  std::function<void(uint64_t, uint64_t)> progress;  // (store bytes written, store bytes)
};

struct ImportReport {
  std::string archive_path, store_path;
  uint64_t generation = 0;
  uint64_t store_bytes = 0;
  uint64_t archive_bytes = 0;
  double seconds = 0;
};

nlohmann::json import_report_json(const ImportReport& report);

// Restores the store in `archive_path` to `store_path`. A truncated or damaged archive, one
// without trove's description frame, or a result that does not match the description or fails
// a checksum is an error naming the archive and what is wrong; `store_path` is then untouched
// (a temporary beside it is removed).
Result<ImportReport> import_store(const std::string& archive_path, const std::string& store_path,
                                  const ImportOptions& options = {});

}  // namespace trove
