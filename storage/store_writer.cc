// StoreWriter: streams record tables to an AtomicFileWriter, keeps what is small (per-record
// checksums, 8 bytes each, and the dense tensors) in memory, and lays out the tail of the file
// in finish(). The byte layout is specified in storage/FORMAT.md.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "base/strings.h"
#include "storage/store.h"
#include "storage/store_format.h"

namespace trove {

namespace {

using nlohmann::json;

// Whether `path` names the file `lock` is on.
bool file_exists_as(const std::string& path, const StoreLock& lock) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const Result<bool> same = lock.covers(fd);
  ::close(fd);
  return same.ok() && *same;
}

struct DenseTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;
};

struct LayerState {
  std::string name;
  json info;
  StoreTableSpec table;
  uint64_t table_offset = 0;
  uint64_t appended = 0;            // records so far
  std::vector<uint64_t> checksums;  // XXH3 of each record's full stride
  std::vector<DenseTensor> dense;
};

}  // namespace

struct StoreWriter::Impl {
  AtomicFileWriter file;
  std::string path;
  json provenance;
  std::vector<LayerState> layers;
  bool layer_open = false;
  bool finished = false;
  bool failed = false;  // an I/O error abandoned the file; every later call fails

  Status misuse(const char* op, const std::string& what) const {
    return Status::invalid_argument(str_printf("%s: %s: %s", path.c_str(), op, what.c_str()));
  }

  // OK when `op` may run at all.
  Status usable(const char* op) const {
    if (finished) return misuse(op, "the store is already finished");
    if (failed) return misuse(op, "an earlier write failed and the store was abandoned");
    return {};
  }

  Status open_layer_required(const char* op) const {
    TROVE_RETURN_IF_ERROR(usable(op));
    if (!layer_open) return misuse(op, "no layer is open (call begin_layer first)");
    return {};
  }

  // Runs a file operation, marking the writer failed when it fails (AtomicFileWriter has
  // then already removed its temporary).
  Status io(Status s) {
    if (!s.ok()) failed = true;
    return s;
  }

  Status pad_to(uint64_t alignment) {
    const uint64_t pos = file.offset();
    return io(file.append_zeros(store_align_up(pos, alignment) - pos));
  }
};

StoreWriter::StoreWriter(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StoreWriter::StoreWriter(StoreWriter&&) noexcept = default;
StoreWriter& StoreWriter::operator=(StoreWriter&&) noexcept = default;
StoreWriter::~StoreWriter() = default;

Result<StoreWriter> StoreWriter::create(const std::string& path, nlohmann::json provenance) {
  TROVE_RETURN_IF_ERROR(
      check_store_json_depth(provenance, kStoreProvenanceLevels, path + ": provenance"));
  auto impl = std::make_unique<Impl>();
  TROVE_ASSIGN_OR_RETURN(impl->file, AtomicFileWriter::create(path));
  impl->path = path;
  impl->provenance = std::move(provenance);
  // The header is written last, once every offset is known; reserve its block now.
  TROVE_RETURN_IF_ERROR(impl->file.append_zeros(kStoreHeaderBytes));
  return StoreWriter(std::move(impl));
}

Status StoreWriter::begin_layer(const std::string& name, nlohmann::json info,
                                const StoreTableSpec& table) {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreWriter");
  Impl& w = *impl_;
  const char* op = "begin_layer";
  TROVE_RETURN_IF_ERROR(w.usable(op));
  if (w.layer_open) {
    return w.misuse(op, "layer '" + w.layers.back().name + "' is still open (call end_layer)");
  }
  if (name.empty()) return w.misuse(op, "the layer name is empty");
  for (const LayerState& l : w.layers) {
    if (l.name == name) return w.misuse(op, "a layer named '" + name + "' already exists");
  }
  const std::string where = "layer '" + name + "': ";
  if (table.dtype.empty()) return w.misuse(op, where + "table dtype is empty");
  if (table.count == 0) return w.misuse(op, where + "table count is 0 (a table needs a record)");
  if (table.record_bytes == 0) return w.misuse(op, where + "table record_bytes is 0");
  if (table.stride < table.record_bytes) {
    return w.misuse(op, where + str_printf("table stride %llu is smaller than record_bytes %llu",
                                           ull(table.stride), ull(table.record_bytes)));
  }
  if (table.stride % kStoreStrideAlignment != 0) {
    return w.misuse(op, where + str_printf("table stride %llu is not a multiple of %llu",
                                           ull(table.stride), ull(kStoreStrideAlignment)));
  }
  uint64_t table_bytes = 0;
  if (__builtin_mul_overflow(table.count, table.stride, &table_bytes) ||
      table_bytes > (uint64_t{1} << 62)) {
    return w.misuse(op, where + str_printf("table of %llu records of %llu bytes is too large",
                                           ull(table.count), ull(table.stride)));
  }
  TROVE_RETURN_IF_ERROR(
      check_store_json_depth(info, kStoreInfoLevels, w.path + ": layer '" + name + "' info"));

  TROVE_RETURN_IF_ERROR(w.pad_to(kStoreTableAlignment));
  LayerState layer;
  layer.name = name;
  layer.info = std::move(info);
  layer.table = table;
  layer.table_offset = w.file.offset();
  layer.checksums.reserve(table.count);
  w.layers.push_back(std::move(layer));
  w.layer_open = true;
  return {};
}

Status StoreWriter::append_records(std::span<const uint8_t> records) {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreWriter");
  Impl& w = *impl_;
  const char* op = "append_records";
  TROVE_RETURN_IF_ERROR(w.open_layer_required(op));
  LayerState& layer = w.layers.back();
  const uint64_t stride = layer.table.stride;
  if (records.size() % stride != 0) {
    return w.misuse(op,
                    str_printf("layer '%s': %zu bytes is not a whole number of %llu-byte records",
                               layer.name.c_str(), records.size(), ull(stride)));
  }
  const uint64_t n = records.size() / stride;
  if (n > layer.table.count - layer.appended) {
    return w.misuse(
        op,
        str_printf("layer '%s': %llu more records would make %llu, past the table's count of %llu",
                   layer.name.c_str(), ull(n), ull(layer.appended + n), ull(layer.table.count)));
  }
  for (uint64_t i = 0; i < n; ++i) {
    layer.checksums.push_back(store_checksum(records.subspan(i * stride, stride)));
  }
  TROVE_RETURN_IF_ERROR(w.io(w.file.append(records)));
  layer.appended += n;
  return {};
}

Status StoreWriter::add_dense(const std::string& name, const std::vector<int64_t>& shape,
                              std::span<const float> data) {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreWriter");
  Impl& w = *impl_;
  const char* op = "add_dense";
  TROVE_RETURN_IF_ERROR(w.open_layer_required(op));
  LayerState& layer = w.layers.back();
  if (name.empty()) return w.misuse(op, "layer '" + layer.name + "': the tensor name is empty");
  for (const DenseTensor& d : layer.dense) {
    if (d.name == name) {
      return w.misuse(op, "layer '" + layer.name + "' already has a dense tensor '" + name + "'");
    }
  }
  uint64_t numel = 1;
  for (int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(numel, static_cast<uint64_t>(dim), &numel) ||
        numel > (uint64_t{1} << 60)) {
      return w.misuse(
          op,
          str_printf(
              "layer '%s' tensor '%s': shape dimension %lld is negative or the shape is too large",
              layer.name.c_str(), name.c_str(), static_cast<long long>(dim)));
    }
  }
  if (numel != data.size()) {
    return w.misuse(
        op, str_printf("layer '%s' tensor '%s': the shape holds %llu elements but %zu were given",
                       layer.name.c_str(), name.c_str(), ull(numel), data.size()));
  }
  layer.dense.push_back({name, shape, std::vector<float>(data.begin(), data.end())});
  return {};
}

Status StoreWriter::update_layer_info(nlohmann::json info) {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreWriter");
  Impl& w = *impl_;
  const char* op = "update_layer_info";
  TROVE_RETURN_IF_ERROR(w.open_layer_required(op));
  LayerState& layer = w.layers.back();
  TROVE_RETURN_IF_ERROR(
      check_store_json_depth(info, kStoreInfoLevels, w.path + ": layer '" + layer.name + "' info"));
  layer.info = std::move(info);
  return {};
}

Status StoreWriter::end_layer() {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreWriter");
  Impl& w = *impl_;
  const char* op = "end_layer";
  TROVE_RETURN_IF_ERROR(w.open_layer_required(op));
  const LayerState& layer = w.layers.back();
  if (layer.appended != layer.table.count) {
    return w.misuse(op, str_printf("layer '%s' has %llu of its %llu records", layer.name.c_str(),
                                   ull(layer.appended), ull(layer.table.count)));
  }
  w.layer_open = false;
  return {};
}

Status StoreWriter::finish() {
  return finish(nullptr);
}

Status StoreWriter::finish(StoreLock* lock) {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreWriter");
  Impl& w = *impl_;
  const char* op = "finish";
  TROVE_RETURN_IF_ERROR(w.usable(op));
  if (w.layer_open) {
    return w.misuse(op, "layer '" + w.layers.back().name + "' is still open (call end_layer)");
  }
  if (w.layers.empty()) return w.misuse(op, "the store has no layers");

  json layers_json = json::array();
  for (LayerState& layer : w.layers) {
    json table = {{"dtype", layer.table.dtype},
                  {"count", layer.table.count},
                  {"record_bytes", layer.table.record_bytes},
                  {"stride", layer.table.stride},
                  {"offset", layer.table_offset},
                  {"bytes", layer.table.count * layer.table.stride}};
    layers_json.push_back({{"name", layer.name},
                           {"info", std::move(layer.info)},
                           {"table", std::move(table)},
                           {"dense", json::array()}});
  }

  // Dense region: every tensor, layer by layer, each 64-aligned.
  for (size_t li = 0; li < w.layers.size(); ++li) {
    for (DenseTensor& d : w.layers[li].dense) {
      TROVE_RETURN_IF_ERROR(w.pad_to(kStoreDenseAlignment));
      const uint64_t offset = w.file.offset();
      std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(d.data.data()),
                                     d.data.size() * sizeof(float));
      TROVE_RETURN_IF_ERROR(w.io(w.file.append(bytes)));
      layers_json[li]["dense"].push_back({{"name", d.name},
                                          {"shape", d.shape},
                                          {"dtype", "f32"},
                                          {"offset", offset},
                                          {"bytes", bytes.size()},
                                          {"xxh3", store_checksum(bytes)}});
      d.data = {};  // written; free it
    }
  }

  // Checksum arrays: one per layer, each 4096-aligned, u64 little-endian per record.
  for (size_t li = 0; li < w.layers.size(); ++li) {
    const std::vector<uint64_t>& sums = w.layers[li].checksums;
    TROVE_CHECK(sums.size() == w.layers[li].table.count);
    TROVE_RETURN_IF_ERROR(w.pad_to(kStoreChecksumsAlignment));
    const uint64_t offset = w.file.offset();
    std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(sums.data()),
                                   sums.size() * sizeof(uint64_t));
    TROVE_RETURN_IF_ERROR(w.io(w.file.append(bytes)));
    layers_json[li]["table"]["checksums"] = {
        {"offset", offset}, {"bytes", bytes.size()}, {"xxh3", store_checksum(bytes)}};
  }

  const uint64_t generation = 1;
  json manifest = {
      {"format", "trove"},
      {"version", {kStoreVersionMajor, kStoreVersionMinor}},
      {"generation", generation},
      {"checksum", {{"algorithm", "xxh3-64"}, {"records", "per-record"}, {"verify_on_read", true}}},
      {"provenance", std::move(w.provenance)},
      {"layers", std::move(layers_json)}};
  const std::string text = store_manifest_text(manifest);
  // begin_layer, update_layer_info and create checked the parts; the whole must agree.
  TROVE_CHECK(json_nesting_depth(text) <= kMaxJsonDepth);
  std::span<const uint8_t> manifest_bytes(reinterpret_cast<const uint8_t*>(text.data()),
                                          text.size());

  const uint64_t manifest_offset = w.file.offset();
  TROVE_RETURN_IF_ERROR(w.io(w.file.append(manifest_bytes)));
  const uint64_t file_size = manifest_offset + manifest_bytes.size() + kStoreTrailerBytes;
  const StoreHeader header = make_store_header(file_size, manifest_offset, manifest_bytes.size(),
                                               store_checksum(manifest_bytes), generation);
  uint8_t trailer_block[kStoreTrailerBytes];
  encode_store_trailer(make_store_trailer(header), trailer_block);
  TROVE_RETURN_IF_ERROR(w.io(w.file.append(trailer_block)));
  TROVE_CHECK(w.file.offset() == file_size);

  // Last, the header: a file is a store only once its header is in place (and only once it is
  // renamed over `path`, which commit() does after fsync).
  std::vector<uint8_t> header_block(kStoreHeaderBytes);
  encode_store_header(header, std::span<uint8_t, kStoreHeaderBytes>(header_block));
  TROVE_RETURN_IF_ERROR(w.io(w.file.write_at(0, header_block)));
  // The caller's writer lock moves to the new file before anyone can open it by name.
  StoreLock new_lock;
  if (lock != nullptr) {
    const int fd = ::fcntl(w.file.fd(), F_DUPFD_CLOEXEC, 0);
    if (fd < 0) {
      const int err = errno;
      return Status::from_errno(w.file.dest() + ": duplicating the new file's descriptor", err);
    }
    TROVE_ASSIGN_OR_RETURN(new_lock, StoreLock::adopt(fd, w.file.dest()));
  }
  const Status committed = w.io(w.file.commit());
  // After a failed fsync of the folder the new file is in place: the lock follows it.
  if (lock != nullptr && (committed.ok() || file_exists_as(w.file.dest(), new_lock))) {
    *lock = std::move(new_lock);
  }
  TROVE_RETURN_IF_ERROR(committed);
  w.finished = true;
  return {};
}

Status copy_store_layer(const StoreReader& store, const StoreLayerInfo& info, StoreWriter* w,
                        const StoreRecordPatch& patch, const StoreDensePatch& dense) {
  const StoreTableSpec table{info.table.dtype, info.table.count, info.table.record_bytes,
                             info.table.stride};
  TROVE_RETURN_IF_ERROR(w->begin_layer(info.name, info.info, table));
  const uint64_t stride = info.table.stride;
  std::vector<int64_t> ids;
  std::vector<uint8_t> chunk;
  for (uint64_t first = 0; first < info.table.count; first += 4096) {
    const uint64_t count = std::min<uint64_t>(4096, info.table.count - first);
    ids.resize(count);
    for (uint64_t i = 0; i < count; ++i) ids[i] = static_cast<int64_t>(first + i);
    chunk.resize(count * stride);
    TROVE_RETURN_IF_ERROR(store.read_records(info, ids, chunk));
    if (patch) patch(first, count, chunk.data());
    TROVE_RETURN_IF_ERROR(w->append_records(chunk));
  }
  for (const StoreDenseInfo& d : info.dense) {
    const std::vector<float>* replaced = dense ? dense(d.name) : nullptr;
    if (replaced != nullptr) {
      TROVE_RETURN_IF_ERROR(w->add_dense(d.name, d.shape, *replaced));
      continue;
    }
    TROVE_ASSIGN_OR_RETURN(std::vector<float> v, store.read_dense(info, d.name));
    TROVE_RETURN_IF_ERROR(w->add_dense(d.name, d.shape, v));
  }
  return w->end_layer();
}

}  // namespace trove
