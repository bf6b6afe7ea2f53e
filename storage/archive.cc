// Store archives (storage/archive.h): Zstandard frames over a pinned store generation.
#include "storage/archive.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include <zstd.h>

#include "storage/file.h"
#include "storage/store.h"
#include "storage/store_format.h"
#include "storage/store_lock.h"
#include "storage/store_update.h"

namespace trove {
namespace {

// zstd's skippable frames are 0x184D2A50..5F; trove's description uses the last.
constexpr uint32_t kDescriptionMagic = 0x184D2A5Eu;
constexpr uint32_t kDescriptionMaxBytes = 16u << 20;
constexpr int kArchiveFormatVersion = 1;
constexpr uint64_t kChunkBytes = 4u << 20;

struct CCtxDeleter {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};
struct DCtxDeleter {
  void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}

// The store cut into the extents export compresses as separate frames: each record table,
// and the runs of bytes between them.
std::vector<ArchiveRegion> plan_regions(const StoreReader& store) {
  std::vector<const StoreLayerInfo*> tables;
  for (const StoreLayerInfo& l : store.layers()) {
    if (l.table.bytes > 0) tables.push_back(&l);
  }
  std::sort(tables.begin(), tables.end(), [](const StoreLayerInfo* a, const StoreLayerInfo* b) {
    return a->table.offset < b->table.offset;
  });
  std::vector<ArchiveRegion> regions;
  uint64_t at = 0;
  for (const StoreLayerInfo* l : tables) {
    if (l->table.offset > at) regions.push_back({"other", "", "", at, l->table.offset - at, 0});
    regions.push_back({"records", l->name, l->table.dtype, l->table.offset, l->table.bytes, 0});
    at = l->table.offset + l->table.bytes;
  }
  if (store.file_size() > at) regions.push_back({"other", "", "", at, store.file_size() - at, 0});
  return regions;
}

// Compresses one region of `file` as one frame appended to `out`, checking its records when
// `verify_layer` is set. Returns the frame's size.
Result<uint64_t> compress_region(ZSTD_CCtx* cctx, const File& file, const ArchiveRegion& region,
                                 const StoreReader& store, const StoreLayerInfo* verify_layer,
                                 AtomicFileWriter& out, std::vector<uint8_t>& in_buf,
                                 std::vector<uint8_t>& out_buf,
                                 const std::function<void(uint64_t)>& done_bytes) {
  const size_t pledged = ZSTD_CCtx_setPledgedSrcSize(cctx, region.bytes);
  if (ZSTD_isError(pledged)) {
    return Status::invalid_argument(std::string("zstd: ") + ZSTD_getErrorName(pledged));
  }
  uint64_t chunk = kChunkBytes;
  if (region.kind == "records") {
    const uint64_t stride = store.find_layer(region.layer)->table.stride;
    chunk = std::max<uint64_t>(1, kChunkBytes / stride) * stride;
  }
  const uint64_t frame_start = out.offset();
  for (uint64_t done = 0; done < region.bytes;) {
    const uint64_t n = std::min(chunk, region.bytes - done);
    in_buf.resize(n);
    TROVE_RETURN_IF_ERROR(file.read_exact(region.offset + done, in_buf));
    if (verify_layer != nullptr) {
      const uint64_t stride = verify_layer->table.stride;
      const int64_t first = static_cast<int64_t>(done / stride);
      for (uint64_t r = 0; r * stride < n; ++r) {
        TROVE_RETURN_IF_ERROR(store.verify_record(*verify_layer, first + static_cast<int64_t>(r),
                                                  in_buf.data() + r * stride));
      }
    }
    const bool last = done + n == region.bytes;
    ZSTD_inBuffer in{in_buf.data(), n, 0};
    for (;;) {
      ZSTD_outBuffer zout{out_buf.data(), out_buf.size(), 0};
      const size_t left =
          ZSTD_compressStream2(cctx, &zout, &in, last ? ZSTD_e_end : ZSTD_e_continue);
      if (ZSTD_isError(left)) {
        return Status::io_error(std::string("zstd compression failed: ") + ZSTD_getErrorName(left));
      }
      TROVE_RETURN_IF_ERROR(out.append({out_buf.data(), zout.pos}));
      if (last ? left == 0 : in.pos == in.size) break;
    }
    done += n;
    done_bytes(n);
  }
  return out.offset() - frame_start;
}

Status fsync_folder_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string folder = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::from_errno("opening folder " + folder, errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  return rc == 0 ? Status() : Status::from_errno("fsync of folder " + folder, err);
}

// A temporary beside `dest` that restores land in before they are checked and renamed.
std::string import_temp_path(const std::string& dest) {
  const size_t slash = dest.rfind('/');
  const std::string folder = slash == std::string::npos ? "" : dest.substr(0, slash + 1);
  const std::string name = slash == std::string::npos ? dest : dest.substr(slash + 1);
  return folder + "." + name + ".import-" + std::to_string(::getpid());
}

}  // namespace

nlohmann::json archive_ratios_json(const std::vector<ArchiveRegion>& regions) {
  nlohmann::json by = nlohmann::json::object();
  for (const ArchiveRegion& r : regions) {
    const std::string key = r.kind == "records" ? r.dtype : "other";
    if (!by.contains(key)) by[key] = {{"bytes", uint64_t{0}}, {"compressed_bytes", uint64_t{0}}};
    nlohmann::json& e = by[key];
    e["bytes"] = e["bytes"].get<uint64_t>() + r.bytes;
    e["compressed_bytes"] = e["compressed_bytes"].get<uint64_t>() + r.compressed_bytes;
  }
  for (auto& [key, e] : by.items()) {
    const double b = e["bytes"].get<double>();
    e["ratio"] = b > 0 ? e["compressed_bytes"].get<double>() / b : 0.0;
  }
  return by;
}

nlohmann::json export_report_json(const ExportReport& r) {
  nlohmann::json regions = nlohmann::json::array();
  for (const ArchiveRegion& g : r.regions) {
    regions.push_back({{"kind", g.kind},
                       {"layer", g.layer},
                       {"dtype", g.dtype},
                       {"offset", g.offset},
                       {"bytes", g.bytes},
                       {"compressed_bytes", g.compressed_bytes}});
  }
  return {{"store", r.store_path},
          {"archive", r.archive_path},
          {"generation", r.generation},
          {"store_bytes", r.store_bytes},
          {"archive_bytes", r.archive_bytes},
          {"ratio", r.store_bytes ? static_cast<double>(r.archive_bytes) / r.store_bytes : 0.0},
          {"level", r.level},
          {"threads", r.threads},
          {"verified", r.verified},
          {"seconds", r.seconds},
          {"by_dtype", archive_ratios_json(r.regions)},
          {"regions", regions}};
}

nlohmann::json import_report_json(const ImportReport& r) {
  return {{"archive", r.archive_path},        {"store", r.store_path},
          {"generation", r.generation},       {"store_bytes", r.store_bytes},
          {"archive_bytes", r.archive_bytes}, {"seconds", r.seconds}};
}

Result<ExportReport> export_store(const std::string& store_path, const std::string& archive_path,
                                  const ExportOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.level < -7 || options.level > 19) {
    return Status::invalid_argument("zstd level " + std::to_string(options.level) +
                                    " is outside -7..19");
  }
  if (options.threads < 1 || options.threads > 256) {
    return Status::invalid_argument("threads " + std::to_string(options.threads) +
                                    " is outside 1..256");
  }
  if (!options.overwrite && file_exists(archive_path)) {
    return Status::invalid_argument(archive_path +
                                    ": already exists; choose another name or allow replacing it");
  }
  // Our descriptor first, then the reader that pins the generation: if something renamed a new
  // store over the path in between, the identity check at the end sees it.
  TROVE_ASSIGN_OR_RETURN(File file, File::open_read(store_path));
  TROVE_ASSIGN_OR_RETURN(StoreReader store, StoreReader::open(store_path));

  ExportReport report;
  report.store_path = store_path;
  report.archive_path = archive_path;
  report.generation = store.generation();
  report.store_bytes = store.file_size();
  report.level = options.level;
  report.threads = options.threads;
  report.verified = options.verify;
  report.regions = plan_regions(store);

  std::unique_ptr<ZSTD_CCtx, CCtxDeleter> cctx(ZSTD_createCCtx());
  if (!cctx) return Status::resource_exhausted("zstd: cannot allocate a compression context");
  ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_compressionLevel, options.level);
  ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_checksumFlag, 1);
  if (options.threads > 1) {
    const size_t rc = ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_nbWorkers, options.threads);
    if (ZSTD_isError(rc)) {
      return Status::not_supported(std::string("this libzstd cannot compress with threads (") +
                                   ZSTD_getErrorName(rc) + "); use 1 thread");
    }
  }

  // The description: what import checks the restored file against.
  nlohmann::json regions = nlohmann::json::array();
  for (const ArchiveRegion& r : report.regions) {
    regions.push_back({{"kind", r.kind},
                       {"layer", r.layer},
                       {"dtype", r.dtype},
                       {"offset", r.offset},
                       {"bytes", r.bytes}});
  }
  const nlohmann::json description = {{"format", "trove-export"},
                                      {"version", kArchiveFormatVersion},
                                      {"store",
                                       {{"file_size", store.file_size()},
                                        {"generation", store.generation()},
                                        {"manifest_xxh3", store.manifest_xxh3()},
                                        {"version", std::to_string(store.version_major()) + "." +
                                                        std::to_string(store.version_minor())}}},
                                      {"regions", regions}};
  const std::string text = description.dump();

  TROVE_ASSIGN_OR_RETURN(AtomicFileWriter out, AtomicFileWriter::create(archive_path));
  uint8_t frame_header[8];
  put_u32(frame_header, kDescriptionMagic);
  put_u32(frame_header + 4, static_cast<uint32_t>(text.size()));
  TROVE_RETURN_IF_ERROR(out.append(frame_header));
  TROVE_RETURN_IF_ERROR(out.append({reinterpret_cast<const uint8_t*>(text.data()), text.size()}));

  std::vector<uint8_t> in_buf, out_buf(ZSTD_CStreamOutSize());
  uint64_t done = 0;
  auto advance = [&](uint64_t n) {
    done += n;
    if (options.progress) options.progress(done, store.file_size());
  };
  for (ArchiveRegion& r : report.regions) {
    const StoreLayerInfo* verify_layer =
        options.verify && r.kind == "records" ? store.find_layer(r.layer) : nullptr;
    Result<uint64_t> bytes =
        compress_region(cctx.get(), file, r, store, verify_layer, out, in_buf, out_buf, advance);
    if (!bytes.ok()) return bytes.status().with_context("exporting " + store_path);
    r.compressed_bytes = *bytes;
  }
  if (options.verify) {
    for (const StoreLayerInfo& l : store.layers()) {
      for (const StoreDenseInfo& d : l.dense) {
        Result<std::vector<float>> data = store.read_dense(l, d.name);
        if (!data.ok()) return data.status().with_context("exporting " + store_path);
      }
    }
  }

  // The bytes compressed must be the generation the reader validated.
  StoreHeader header;
  TROVE_RETURN_IF_ERROR(file.read_exact(0, {reinterpret_cast<uint8_t*>(&header), sizeof(header)}));
  if (header.generation != store.generation() || header.manifest_xxh3 != store.manifest_xxh3() ||
      header.file_size != store.file_size()) {
    return Status::aborted(store_path + ": the store changed while being exported; retry");
  }
  TROVE_RETURN_IF_ERROR(out.commit());
  report.archive_bytes = out.offset();
  report.seconds = seconds_since(start);
  return report;
}

Result<ImportReport> import_store(const std::string& archive_path, const std::string& store_path,
                                  const ImportOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  TROVE_ASSIGN_OR_RETURN(File in, File::open_read(archive_path));
  TROVE_ASSIGN_OR_RETURN(uint64_t archive_bytes, in.size());
  auto damaged = [&](const std::string& what) {
    return Status::corruption(archive_path + ": " + what +
                              "; the archive is damaged or incomplete: copy or export it again");
  };

  // The description frame.
  uint8_t frame_header[8];
  if (archive_bytes < sizeof(frame_header)) return damaged("shorter than a description frame");
  TROVE_RETURN_IF_ERROR(in.read_exact(0, frame_header));
  if (get_u32(frame_header) != kDescriptionMagic) {
    return Status::invalid_argument(
        archive_path +
        ": not a trove export (no description frame at its start); make archives with "
        "`trove export`");
  }
  const uint32_t text_bytes = get_u32(frame_header + 4);
  if (text_bytes > kDescriptionMaxBytes || sizeof(frame_header) + text_bytes > archive_bytes) {
    return damaged("description frame of " + std::to_string(text_bytes) +
                   " bytes does not fit the file");
  }
  std::string text(text_bytes, '\0');
  TROVE_RETURN_IF_ERROR(
      in.read_exact(sizeof(frame_header), {reinterpret_cast<uint8_t*>(text.data()), text.size()}));
  const nlohmann::json description = nlohmann::json::parse(text, nullptr, false);
  uint64_t file_size = 0, generation = 0, manifest_xxh3 = 0;
  try {
    if (description.is_discarded()) return damaged("description is not JSON");
    if (description.at("format") != "trove-export")
      return damaged("description format is not trove-export");
    const int version = description.at("version").get<int>();
    if (version != kArchiveFormatVersion) {
      return Status::not_supported(archive_path + ": archive format version " +
                                   std::to_string(version) + " (this trove reads version " +
                                   std::to_string(kArchiveFormatVersion) + "); use a newer trove");
    }
    const nlohmann::json& s = description.at("store");
    file_size = s.at("file_size").get<uint64_t>();
    generation = s.at("generation").get<uint64_t>();
    manifest_xxh3 = s.at("manifest_xxh3").get<uint64_t>();
  } catch (const nlohmann::json::exception& e) {
    return damaged(std::string("description field missing or mistyped (") + e.what() + ")");
  }

  // Replacing a store: only one no one writes, whose updates are all recovered.
  StoreLock dest_lock;
  if (file_exists(store_path)) {
    if (!options.overwrite) {
      return Status::invalid_argument(
          store_path + ": already exists; choose another name or allow replacing it");
    }
    if (file_exists(store_journal_path(store_path))) {
      return Status::invalid_argument(
          store_path + ": an update journal lies beside it (" + store_journal_path(store_path) +
          "); open the store once (`trove verify`) to recover it before replacing it");
    }
    TROVE_ASSIGN_OR_RETURN(dest_lock, StoreLock::acquire(store_path));
  }

  const std::string temp = import_temp_path(store_path);
  struct RemoveTemp {
    const std::string& path;
    bool keep = false;
    ~RemoveTemp() {
      if (!keep) ::unlink(path.c_str());
    }
  } remove_temp{temp};

  {
    TROVE_ASSIGN_OR_RETURN(AtomicFileWriter out, AtomicFileWriter::create(temp));
    std::unique_ptr<ZSTD_DCtx, DCtxDeleter> dctx(ZSTD_createDCtx());
    if (!dctx) return Status::resource_exhausted("zstd: cannot allocate a decompression context");
    std::vector<uint8_t> in_buf(ZSTD_DStreamInSize()), out_buf(ZSTD_DStreamOutSize());
    uint64_t at = sizeof(frame_header) + text_bytes, written = 0;
    size_t expect = 0;  // zstd's hint: 0 when the last frame ended exactly
    bool any_frame = false;
    while (at < archive_bytes) {
      const uint64_t n = std::min<uint64_t>(in_buf.size(), archive_bytes - at);
      TROVE_RETURN_IF_ERROR(in.read_exact(at, {in_buf.data(), n}));
      ZSTD_inBuffer zin{in_buf.data(), n, 0};
      while (zin.pos < zin.size) {
        ZSTD_outBuffer zout{out_buf.data(), out_buf.size(), 0};
        expect = ZSTD_decompressStream(dctx.get(), &zout, &zin);
        if (ZSTD_isError(expect)) {
          return damaged("zstd data near byte " + std::to_string(at + zin.pos) + ": " +
                         ZSTD_getErrorName(expect));
        }
        if (written + zout.pos > file_size) {
          return damaged("decompresses to more than the " + std::to_string(file_size) +
                         " bytes its description gives");
        }
        TROVE_RETURN_IF_ERROR(out.append({out_buf.data(), zout.pos}));
        written += zout.pos;
        any_frame = true;
        if (options.progress) options.progress(written, file_size);
      }
      at += n;
    }
    if (!any_frame || expect != 0) {
      return damaged("ends inside a zstd frame at byte " + std::to_string(archive_bytes));
    }
    if (written != file_size) {
      return damaged("holds " + std::to_string(written) + " bytes of a " +
                     std::to_string(file_size) + "-byte store");
    }
    TROVE_RETURN_IF_ERROR(out.commit());
  }

  // The restored file must be the described generation, every checksum intact.
  {
    TROVE_ASSIGN_OR_RETURN(StoreReader restored, StoreReader::open(temp));
    if (restored.generation() != generation || restored.manifest_xxh3() != manifest_xxh3) {
      return damaged("restored store is not the generation its description names");
    }
    TROVE_ASSIGN_OR_RETURN(std::vector<StoreFault> faults, restored.verify());
    if (!faults.empty()) {
      return damaged("restored store fails its checksums (" + faults.front().message() +
                     (faults.size() > 1 ? ", and " + std::to_string(faults.size() - 1) + " more"
                                        : std::string()) +
                     ")");
    }
  }
  if (::rename(temp.c_str(), store_path.c_str()) != 0) {
    return Status::from_errno("renaming " + temp + " to " + store_path, errno);
  }
  remove_temp.keep = true;
  TROVE_RETURN_IF_ERROR(fsync_folder_of(store_path));

  ImportReport report;
  report.archive_path = archive_path;
  report.store_path = store_path;
  report.generation = generation;
  report.store_bytes = file_size;
  report.archive_bytes = archive_bytes;
  report.seconds = seconds_since(start);
  return report;
}

}  // namespace trove
