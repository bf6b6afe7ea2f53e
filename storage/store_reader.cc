// StoreReader: validates a .trove file completely at open (header, trailer, manifest and every
// manifest field; see "What a reader must verify" in storage/FORMAT.md), then serves records
// with aligned O_DIRECT reads and verifies each against its stored checksum.
//
// Every const method may be called from several threads at once: reads use pread on shared
// descriptors and per-call buffers; nothing mutable is shared.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <set>
#include <utility>

#include "base/log.h"
#include "base/strings.h"
#include "storage/record_io.h"
#include "storage/store.h"
#include "storage/store_format.h"
#include "storage/store_lock.h"
#include "storage/store_update.h"

namespace trove {

namespace {

using nlohmann::json;

// Adjacent records are read with one request while the combined extent stays below this.
constexpr uint64_t kMaxCoalescedReadBytes = uint64_t{1} << 20;
// verify() checks records in chunks of about this many bytes between progress calls.
constexpr uint64_t kVerifyChunkBytes = uint64_t{8} << 20;

std::string hex(uint64_t v) {
  return str_printf("0x%016llx", ull(v));
}

// A heap buffer aligned for O_DIRECT (address and length multiples of kDirectAlignment).
class AlignedBuffer {
 public:
  static Result<AlignedBuffer> allocate(uint64_t bytes) {
    const uint64_t rounded =
        std::max<uint64_t>(store_align_up(bytes, kDirectAlignment), kDirectAlignment);
    AlignedBuffer b;
    b.data_.reset(static_cast<uint8_t*>(std::aligned_alloc(kDirectAlignment, rounded)));
    if (b.data_ == nullptr) {
      return Status::resource_exhausted(
          str_printf("allocating a %llu-byte aligned read buffer failed", ull(rounded)));
    }
    return b;
  }
  uint8_t* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
};

// A named extent of the file, for the overlap check.
struct Region {
  std::string name;  // the manifest path: "layers[0].table", "manifest", ...
  uint64_t offset = 0;
  uint64_t bytes = 0;
};

// ---- header and trailer ---------------------------------------------------------------------

// Checks the header block `bytes` (the first min(file size, 4096) bytes of the file) of a file
// of `actual_size` bytes. The order matters: magic first (is it ours at all?), then the fields
// whose position never changes across major versions (endianness, version), and only then the
// 1.x checksum and fields.
Result<StoreHeader> check_header(const std::string& path, std::span<const uint8_t> bytes,
                                 uint64_t actual_size) {
  if (bytes.size() < sizeof(kStoreMagic) ||
      std::memcmp(bytes.data(), kStoreMagic, sizeof(kStoreMagic)) != 0) {
    return Status::corruption(
        path + ": not a trove store (the file does not start with the magic \"TROVE\\0\\r\\n\")");
  }
  if (bytes.size() < kStoreHeaderBytes) {
    return Status::corruption(
        str_printf("%s: truncated: %llu bytes is shorter than the %llu-byte header", path.c_str(),
                   ull(actual_size), ull(kStoreHeaderBytes)));
  }
  const StoreHeader h = decode_store_header(bytes);
  if (h.endian_check != kStoreEndianCheck) {
    if (h.endian_check == __builtin_bswap32(kStoreEndianCheck)) {
      return Status::not_supported(
          path + ": written by a big-endian writer; this build reads little-endian stores");
    }
    return Status::corruption(str_printf("%s: header endian_check = 0x%08x is not 0x%08x",
                                         path.c_str(), h.endian_check, kStoreEndianCheck));
  }
  if (h.version_major != kStoreVersionMajor) {
    if (h.version_major > kStoreVersionMajor) {
      return Status::not_supported(
          str_printf("%s: written by a newer trove (format %u.x); this build reads %u.x",
                     path.c_str(), h.version_major, kStoreVersionMajor));
    }
    return Status::not_supported(
        str_printf("%s: format %u.x is not supported; this build reads %u.x", path.c_str(),
                   h.version_major, kStoreVersionMajor));
  }
  const uint64_t computed = store_header_checksum(h);
  if (computed != h.header_xxh3) {
    return Status::corruption(str_printf("%s: header checksum mismatch (stored %s, computed %s)",
                                         path.c_str(), hex(h.header_xxh3).c_str(),
                                         hex(computed).c_str()));
  }
  for (uint64_t i = sizeof(StoreHeader); i < kStoreHeaderBytes; ++i) {
    if (bytes[i] != 0) {
      return Status::corruption(
          str_printf("%s: header padding byte at offset %llu is 0x%02x, not zero", path.c_str(),
                     ull(i), bytes[i]));
    }
  }
  if (h.flags != 0) {
    return Status::not_supported(
        str_printf("%s: header flags = %s name features this build does not know", path.c_str(),
                   hex(h.flags).c_str()));
  }
  if (h.generation == 0) {
    return Status::corruption(path + ": header generation = 0 (generations start at 1)");
  }
  if (actual_size < h.file_size) {
    return Status::corruption(
        str_printf("%s: truncated: the header says %llu bytes but the file has %llu", path.c_str(),
                   ull(h.file_size), ull(actual_size)));
  }
  if (actual_size > h.file_size) {
    return Status::corruption(
        str_printf("%s: has %llu trailing bytes after the %llu bytes the header describes",
                   path.c_str(), ull(actual_size - h.file_size), ull(h.file_size)));
  }
  if (h.file_size < kStoreHeaderBytes + kStoreTrailerBytes) {
    return Status::corruption(
        str_printf("%s: header file_size = %llu is too small for a header and a trailer",
                   path.c_str(), ull(h.file_size)));
  }
  const uint64_t data_end = h.file_size - kStoreTrailerBytes;
  uint64_t manifest_end = 0;
  if (h.manifest_offset < kStoreHeaderBytes || h.manifest_bytes == 0 ||
      __builtin_add_overflow(h.manifest_offset, h.manifest_bytes, &manifest_end) ||
      manifest_end > data_end) {
    return Status::corruption(
        str_printf("%s: header manifest_offset = %llu, manifest_bytes = %llu: outside the data "
                   "area [%llu, %llu)",
                   path.c_str(), ull(h.manifest_offset), ull(h.manifest_bytes),
                   ull(kStoreHeaderBytes), ull(data_end)));
  }
  return h;
}

// Checks the 64 trailer bytes against the (already checked) header.
Status check_trailer(const std::string& path, std::span<const uint8_t> bytes,
                     const StoreHeader& h) {
  const StoreTrailer t = decode_store_trailer(bytes);
  if (std::memcmp(t.magic, kStoreTrailerMagic, sizeof(t.magic)) != 0) {
    return Status::corruption(
        path +
        ": trailer magic \"TROVEEND\" missing at the end of the file (truncated or damaged)");
  }
  const uint64_t computed = store_trailer_checksum(t);
  if (computed != t.trailer_xxh3) {
    return Status::corruption(str_printf("%s: trailer checksum mismatch (stored %s, computed %s)",
                                         path.c_str(), hex(t.trailer_xxh3).c_str(),
                                         hex(computed).c_str()));
  }
  struct Field {
    const char* name;
    uint64_t trailer;
    uint64_t header;
  };
  const Field fields[] = {
      {"version_major", t.version_major, h.version_major},
      {"version_minor", t.version_minor, h.version_minor},
      {"endian_check", t.endian_check, h.endian_check},
      {"file_size", t.file_size, h.file_size},
      {"manifest_offset", t.manifest_offset, h.manifest_offset},
      {"manifest_bytes", t.manifest_bytes, h.manifest_bytes},
      {"manifest_xxh3", t.manifest_xxh3, h.manifest_xxh3},
      {"generation", t.generation, h.generation},
  };
  for (const Field& f : fields) {
    if (f.trailer != f.header) {
      return Status::corruption(str_printf("%s: trailer %s = %llu does not match header %s = %llu",
                                           path.c_str(), f.name, ull(f.trailer), f.name,
                                           ull(f.header)));
    }
  }
  return {};
}

// ---- manifest -------------------------------------------------------------------------------

struct ChecksumArrayInfo {
  uint64_t offset = 0;
  uint64_t bytes = 0;
  uint64_t xxh3 = 0;
};

struct ParsedManifest {
  std::vector<StoreLayerInfo> layers;
  std::vector<ChecksumArrayInfo> checksum_arrays;  // parallel to layers
  std::vector<Region> regions;                     // sorted by offset, zero-byte ones left out
};

// Validates every field of the manifest. Errors read
//   "<file>: manifest layers[1].table.stride = 100 is not a multiple of 64".
class ManifestValidator {
 public:
  ManifestValidator(const std::string& path, const StoreHeader& header)
      : path_(path), header_(header) {}

  Result<ParsedManifest> run(const json& root) {
    if (!root.is_object()) return bad("", root, "is not a JSON object");
    TROVE_ASSIGN_OR_RETURN(const json* format, member(root, "", "format"));
    if (!format->is_string() || format->get<std::string>() != "trove") {
      return bad("format", *format, "is not \"trove\"");
    }
    TROVE_ASSIGN_OR_RETURN(const json* version, member(root, "", "version"));
    if (!version->is_array() || version->size() != 2 || !(*version)[0].is_number_unsigned() ||
        !(*version)[1].is_number_unsigned() ||
        (*version)[0].get<uint64_t>() != header_.version_major ||
        (*version)[1].get<uint64_t>() != header_.version_minor) {
      return bad("version", *version,
                 str_printf("does not match the header's version [%u, %u]", header_.version_major,
                            header_.version_minor));
    }
    TROVE_ASSIGN_OR_RETURN(uint64_t generation, get_u64(root, "", "generation"));
    if (generation != header_.generation) {
      return bad(
          "generation", root["generation"],
          str_printf("does not match the header's generation %llu", ull(header_.generation)));
    }
    TROVE_ASSIGN_OR_RETURN(const json* checksum, member(root, "", "checksum"));
    if (!checksum->is_object()) return bad("checksum", *checksum, "is not an object");
    TROVE_ASSIGN_OR_RETURN(std::string algorithm, get_string(*checksum, "checksum", "algorithm"));
    if (algorithm != "xxh3-64") {
      return Status::not_supported(path_ + ": manifest checksum.algorithm = \"" + algorithm +
                                   "\" is not supported (this build knows \"xxh3-64\")");
    }
    TROVE_ASSIGN_OR_RETURN(std::string records, get_string(*checksum, "checksum", "records"));
    if (records != "per-record") {
      return Status::not_supported(path_ + ": manifest checksum.records = \"" + records +
                                   "\" is not supported (this build knows \"per-record\")");
    }
    TROVE_ASSIGN_OR_RETURN(const json* verify_on_read,
                           member(*checksum, "checksum", "verify_on_read"));
    if (!verify_on_read->is_boolean()) {
      return bad("checksum.verify_on_read", *verify_on_read, "is not a boolean");
    }
    TROVE_RETURN_IF_ERROR(member(root, "", "provenance"));

    TROVE_ASSIGN_OR_RETURN(const json* layers, member(root, "", "layers"));
    if (!layers->is_array()) return bad("layers", *layers, "is not an array");
    if (layers->empty()) return bad("layers", *layers, "is empty (a store has at least one layer)");

    ParsedManifest out;
    std::set<std::string> names;
    for (size_t i = 0; i < layers->size(); ++i) {
      TROVE_RETURN_IF_ERROR(parse_layer((*layers)[i], str_printf("layers[%zu]", i), out));
      if (!names.insert(out.layers.back().name).second) {
        return bad(str_printf("layers[%zu].name", i), (*layers)[i]["name"],
                   "repeats an earlier layer's name");
      }
    }
    out.regions.push_back({"manifest", header_.manifest_offset, header_.manifest_bytes});
    TROVE_RETURN_IF_ERROR(check_overlaps(out.regions));
    return out;
  }

 private:
  static std::string join(const std::string& parent, const char* key) {
    return parent.empty() ? std::string(key) : parent + "." + key;
  }

  // "<file>: manifest <field> = <value> <what>"
  Status bad(const std::string& field, const json& value, const std::string& what) const {
    std::string shown = value.dump(-1, ' ', false, json::error_handler_t::replace);
    if (shown.size() > 80) shown = shown.substr(0, 77) + "...";
    return Status::corruption(path_ + ": manifest " + (field.empty() ? "root" : field) + " = " +
                              shown + " " + what);
  }

  Result<const json*> member(const json& obj, const std::string& parent, const char* key) const {
    auto it = obj.find(key);
    if (it == obj.end()) {
      return Status::corruption(path_ + ": manifest " + join(parent, key) + " is missing");
    }
    return &*it;
  }

  Result<uint64_t> get_u64(const json& obj, const std::string& parent, const char* key) const {
    TROVE_ASSIGN_OR_RETURN(const json* v, member(obj, parent, key));
    if (!v->is_number_unsigned()) return bad(join(parent, key), *v, "is not an unsigned integer");
    return v->get<uint64_t>();
  }

  Result<std::string> get_string(const json& obj, const std::string& parent,
                                 const char* key) const {
    TROVE_ASSIGN_OR_RETURN(const json* v, member(obj, parent, key));
    if (!v->is_string()) return bad(join(parent, key), *v, "is not a string");
    return v->get<std::string>();
  }

  // The extent [offset, offset + bytes) must lie in the data area: past the header, before
  // the trailer, without overflow.
  Status check_extent(const std::string& field, uint64_t offset, uint64_t bytes) const {
    const uint64_t data_end = header_.file_size - kStoreTrailerBytes;
    uint64_t end = 0;
    if (__builtin_add_overflow(offset, bytes, &end) || offset < kStoreHeaderBytes ||
        end > data_end) {
      return Status::corruption(
          str_printf("%s: manifest %s.offset = %llu: bytes [%llu, %llu%s) lie outside the data "
                     "area [%llu, %llu) of the file",
                     path_.c_str(), field.c_str(), ull(offset), ull(offset),
                     ull(end < offset ? UINT64_MAX : end), end < offset ? "+" : "",
                     ull(kStoreHeaderBytes), ull(data_end)));
    }
    return {};
  }

  Status parse_layer(const json& j, const std::string& where, ParsedManifest& out) {
    if (!j.is_object()) return bad(where, j, "is not an object");
    StoreLayerInfo layer;
    TROVE_ASSIGN_OR_RETURN(layer.name, get_string(j, where, "name"));
    if (layer.name.empty()) return bad(where + ".name", j["name"], "is empty");
    TROVE_ASSIGN_OR_RETURN(const json* info, member(j, where, "info"));
    layer.info = *info;

    // table
    const std::string tw = where + ".table";
    TROVE_ASSIGN_OR_RETURN(const json* table, member(j, where, "table"));
    if (!table->is_object()) return bad(tw, *table, "is not an object");
    StoreTableInfo& t = layer.table;
    TROVE_ASSIGN_OR_RETURN(t.dtype, get_string(*table, tw, "dtype"));
    if (t.dtype.empty()) return bad(tw + ".dtype", (*table)["dtype"], "is empty");
    TROVE_ASSIGN_OR_RETURN(t.count, get_u64(*table, tw, "count"));
    TROVE_ASSIGN_OR_RETURN(t.record_bytes, get_u64(*table, tw, "record_bytes"));
    TROVE_ASSIGN_OR_RETURN(t.stride, get_u64(*table, tw, "stride"));
    TROVE_ASSIGN_OR_RETURN(t.offset, get_u64(*table, tw, "offset"));
    TROVE_ASSIGN_OR_RETURN(t.bytes, get_u64(*table, tw, "bytes"));
    if (t.count == 0) return bad(tw + ".count", (*table)["count"], "is not at least 1");
    if (t.record_bytes == 0) {
      return bad(tw + ".record_bytes", (*table)["record_bytes"], "is not at least 1");
    }
    if (t.stride % kStoreStrideAlignment != 0) {
      return bad(tw + ".stride", (*table)["stride"],
                 str_printf("is not a multiple of %llu", ull(kStoreStrideAlignment)));
    }
    if (t.stride < t.record_bytes) {
      return bad(tw + ".stride", (*table)["stride"],
                 str_printf("is smaller than record_bytes = %llu", ull(t.record_bytes)));
    }
    if (t.offset % kStoreTableAlignment != 0) {
      return bad(tw + ".offset", (*table)["offset"],
                 str_printf("is not a multiple of %llu", ull(kStoreTableAlignment)));
    }
    uint64_t table_bytes = 0;
    if (__builtin_mul_overflow(t.count, t.stride, &table_bytes) || table_bytes != t.bytes) {
      return bad(tw + ".bytes", (*table)["bytes"],
                 str_printf("is not count * stride = %llu * %llu", ull(t.count), ull(t.stride)));
    }
    TROVE_RETURN_IF_ERROR(check_extent(tw, t.offset, t.bytes));
    out.regions.push_back({tw, t.offset, t.bytes});

    // table.checksums
    const std::string cw = tw + ".checksums";
    TROVE_ASSIGN_OR_RETURN(const json* sums, member(*table, tw, "checksums"));
    if (!sums->is_object()) return bad(cw, *sums, "is not an object");
    ChecksumArrayInfo c;
    TROVE_ASSIGN_OR_RETURN(c.offset, get_u64(*sums, cw, "offset"));
    TROVE_ASSIGN_OR_RETURN(c.bytes, get_u64(*sums, cw, "bytes"));
    TROVE_ASSIGN_OR_RETURN(c.xxh3, get_u64(*sums, cw, "xxh3"));
    if (c.offset % kStoreChecksumsAlignment != 0) {
      return bad(cw + ".offset", (*sums)["offset"],
                 str_printf("is not a multiple of %llu", ull(kStoreChecksumsAlignment)));
    }
    uint64_t sums_bytes = 0;
    if (__builtin_mul_overflow(t.count, uint64_t{8}, &sums_bytes) || sums_bytes != c.bytes) {
      return bad(cw + ".bytes", (*sums)["bytes"],
                 str_printf("is not 8 * count = 8 * %llu", ull(t.count)));
    }
    TROVE_RETURN_IF_ERROR(check_extent(cw, c.offset, c.bytes));
    out.regions.push_back({cw, c.offset, c.bytes});

    // dense
    TROVE_ASSIGN_OR_RETURN(const json* dense, member(j, where, "dense"));
    if (!dense->is_array()) return bad(where + ".dense", *dense, "is not an array");
    std::set<std::string> dense_names;
    for (size_t k = 0; k < dense->size(); ++k) {
      const std::string dw = str_printf("%s.dense[%zu]", where.c_str(), k);
      const json& dj = (*dense)[k];
      if (!dj.is_object()) return bad(dw, dj, "is not an object");
      StoreDenseInfo d;
      TROVE_ASSIGN_OR_RETURN(d.name, get_string(dj, dw, "name"));
      if (d.name.empty()) return bad(dw + ".name", dj["name"], "is empty");
      if (!dense_names.insert(d.name).second) {
        return bad(dw + ".name", dj["name"], "repeats an earlier tensor's name in this layer");
      }
      TROVE_ASSIGN_OR_RETURN(std::string dtype, get_string(dj, dw, "dtype"));
      if (dtype != "f32") return bad(dw + ".dtype", dj["dtype"], "is not \"f32\"");
      TROVE_ASSIGN_OR_RETURN(const json* shape, member(dj, dw, "shape"));
      if (!shape->is_array()) return bad(dw + ".shape", *shape, "is not an array");
      uint64_t numel = 1;
      for (const json& dim : *shape) {
        if (!dim.is_number_unsigned()) {
          return bad(dw + ".shape", *shape, "has an element that is not a non-negative integer");
        }
        const uint64_t v = dim.get<uint64_t>();
        if (v > static_cast<uint64_t>(INT64_MAX) || __builtin_mul_overflow(numel, v, &numel)) {
          return bad(dw + ".shape", *shape, "overflows");
        }
        d.shape.push_back(static_cast<int64_t>(v));
      }
      TROVE_ASSIGN_OR_RETURN(d.offset, get_u64(dj, dw, "offset"));
      TROVE_ASSIGN_OR_RETURN(d.bytes, get_u64(dj, dw, "bytes"));
      TROVE_ASSIGN_OR_RETURN(d.xxh3, get_u64(dj, dw, "xxh3"));
      uint64_t shape_bytes = 0;
      if (__builtin_mul_overflow(numel, uint64_t{sizeof(float)}, &shape_bytes) ||
          shape_bytes != d.bytes) {
        return bad(dw + ".bytes", dj["bytes"],
                   str_printf("is not 4 * (elements of shape) = 4 * %llu", ull(numel)));
      }
      if (d.offset % kStoreDenseAlignment != 0) {
        return bad(dw + ".offset", dj["offset"],
                   str_printf("is not a multiple of %llu", ull(kStoreDenseAlignment)));
      }
      TROVE_RETURN_IF_ERROR(check_extent(dw, d.offset, d.bytes));
      if (d.bytes > 0) out.regions.push_back({dw, d.offset, d.bytes});
      layer.dense.push_back(std::move(d));
    }
    out.layers.push_back(std::move(layer));
    out.checksum_arrays.push_back(c);
    return {};
  }

  Status check_overlaps(std::vector<Region>& regions) const {
    std::stable_sort(regions.begin(), regions.end(),
                     [](const Region& a, const Region& b) { return a.offset < b.offset; });
    for (size_t i = 1; i < regions.size(); ++i) {
      const Region& a = regions[i - 1];
      const Region& b = regions[i];
      if (b.offset < a.offset + a.bytes) {
        return Status::corruption(
            str_printf("%s: manifest %s (bytes [%llu, %llu)) overlaps %s (bytes [%llu, %llu))",
                       path_.c_str(), b.name.c_str(), ull(b.offset), ull(b.offset + b.bytes),
                       a.name.c_str(), ull(a.offset), ull(a.offset + a.bytes)));
      }
    }
    return {};
  }

  const std::string& path_;
  const StoreHeader& header_;
};

}  // namespace

// ---- StoreFault, StoreLayerInfo -------------------------------------------------------------

std::string StoreFault::message() const {
  std::string s = region;
  if (!layer.empty()) s += " of layer " + layer;
  if (!item.empty()) s += ", " + item;
  s += str_printf(" at offset %llu (%llu bytes)", ull(offset), ull(bytes));
  if (!error.empty()) s += ": " + error;
  return s;
}

const StoreDenseInfo* StoreLayerInfo::find_dense(const std::string& dense_name) const {
  for (const StoreDenseInfo& d : dense) {
    if (d.name == dense_name) return &d;
  }
  return nullptr;
}

// ---- StoreReader ----------------------------------------------------------------------------

struct StoreReader::Impl {
  std::string path;
  StoreOpenOptions options;
  File file;         // buffered reads (header, trailer, manifest, dense)
  StorePin pin;      // on `file` (declared after it: released before it closes)
  File direct_file;  // O_DIRECT reads of records; closed when the filesystem refuses O_DIRECT
  MappedFile map;
  StoreHeader header{};
  json manifest;
  const json* provenance = nullptr;  // points into manifest
  std::vector<StoreLayerInfo> layers;
  std::vector<ChecksumArrayInfo> checksum_arrays;
  std::vector<std::vector<uint64_t>> record_checksums;  // per layer, per record

  // Index of `layer` in `layers`: by address when it is one of ours, else by name (callers may
  // hold copies). npos when absent.
  size_t layer_index(const StoreLayerInfo& layer) const {
    if (!layers.empty() && &layer >= layers.data() && &layer < layers.data() + layers.size()) {
      return static_cast<size_t>(&layer - layers.data());
    }
    for (size_t i = 0; i < layers.size(); ++i) {
      if (layers[i].name == layer.name) return i;
    }
    return static_cast<size_t>(-1);
  }

  Result<size_t> require_layer(const StoreLayerInfo& layer) const {
    const size_t i = layer_index(layer);
    if (i == static_cast<size_t>(-1)) {
      return Status::invalid_argument(path + ": no layer named '" + layer.name + "'");
    }
    return i;
  }

  Status record_mismatch(size_t li, int64_t id, uint64_t stored, uint64_t computed) const {
    const StoreTableInfo& t = layers[li].table;
    return Status::corruption(
        str_printf("%s: layer %s expert %lld at offset %llu (%llu bytes): checksum mismatch "
                   "(stored %s, computed %s)",
                   path.c_str(), layers[li].name.c_str(), static_cast<long long>(id),
                   ull(t.offset + static_cast<uint64_t>(id) * t.stride), ull(t.stride),
                   hex(stored).c_str(), hex(computed).c_str()));
  }

  // Reads file bytes [offset, offset + len) into `buf` until at least `needed` bytes have
  // arrived or the file ends (an aligned extent may run past the end of the file); returns the
  // number of bytes read. With `direct`, offset, len and buf are kDirectAlignment-aligned and a
  // short read resumes at an aligned position.
  // One pread(2) through the test seam: bytes read, or -errno.
  int64_t pread_at(int fd, uint8_t* buf, uint64_t len, uint64_t offset) const {
    if (options.file_ops != nullptr) return options.file_ops->read_at(fd, buf, len, offset);
    const ssize_t n = ::pread(fd, buf, len, static_cast<off_t>(offset));
    return n < 0 ? -errno : n;
  }

  // `what` (naming the records a read was for) and the failed read, with its errno.
  Status read_error(const std::string& what, int err, uint64_t len, uint64_t offset,
                    bool direct) const {
    return Status::from_errno(
        str_printf("%s: %s: read of %llu bytes at offset %llu%s", path.c_str(), what.c_str(),
                   ull(len), ull(offset), direct ? " (O_DIRECT)" : ""),
        err);
  }

  Result<uint64_t> read_extent(bool direct, uint64_t offset, uint64_t len, uint64_t needed,
                               uint8_t* buf, const std::string& what) const {
    const int fd = direct ? direct_file.fd() : file.fd();
    uint64_t done = 0;
    while (done < needed) {
      const int64_t n = pread_at(fd, buf + done, len - done, offset + done);
      if (n < 0) {
        const int err = static_cast<int>(-n);
        if (err == EINTR || err == EAGAIN) continue;
        return read_error(what, err, len - done, offset + done, direct);
      }
      if (n == 0) break;  // end of file
      uint64_t next = done + static_cast<uint64_t>(n);
      if (direct && next < needed) {
        // O_DIRECT cannot resume mid-block; re-read from the block boundary.
        const uint64_t aligned = store_align_down(next, kDirectAlignment);
        if (aligned <= done) {  // a partial block: the end of the file
          done = next;
          break;
        }
        next = aligned;
      }
      done = next;
    }
    return done;
  }
};

StoreReader::StoreReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StoreReader::StoreReader(StoreReader&&) noexcept = default;
StoreReader& StoreReader::operator=(StoreReader&&) noexcept = default;
StoreReader::~StoreReader() = default;

Result<StoreReader> StoreReader::open(const std::string& path, StoreOpenOptions options) {
  // An update interrupted after its commit point leaves the file torn until its journal is
  // replayed: never read it before that (see "Generations" in FORMAT.md).
  TROVE_RETURN_IF_ERROR(recover_store(path));
  auto impl = std::make_unique<Impl>();
  Impl& r = *impl;
  r.path = path;
  r.options = options;
  TROVE_ASSIGN_OR_RETURN(r.file, File::open_read(path));
  if (options.pin_generation) {
    // Pinned, the bytes cannot change until the reader is destroyed. They could be torn only if
    // a writer crashed in the middle of a replay after recover_store above looked: then unpin,
    // recover and pin again.
    for (int attempt = 0;; ++attempt) {
      TROVE_ASSIGN_OR_RETURN(r.pin, StorePin::take(r.file.fd(), path));
      TROVE_ASSIGN_OR_RETURN(bool torn, store_needs_recovery(path, r.file.fd()));
      if (!torn) break;
      r.pin.release();
      if (attempt == 3) {
        return Status::aborted(path + ": its update journal keeps coming back; retry");
      }
      TROVE_RETURN_IF_ERROR(recover_store(path));
    }
  }
  TROVE_ASSIGN_OR_RETURN(uint64_t actual_size, r.file.size());

  // Header.
  std::vector<uint8_t> header_block(std::min(actual_size, kStoreHeaderBytes));
  TROVE_RETURN_IF_ERROR(r.file.read_exact(0, header_block));
  TROVE_ASSIGN_OR_RETURN(r.header, check_header(path, header_block, actual_size));
  const StoreHeader& h = r.header;

  // Trailer.
  uint8_t trailer_block[kStoreTrailerBytes];
  TROVE_RETURN_IF_ERROR(r.file.read_exact(h.file_size - kStoreTrailerBytes, trailer_block));
  TROVE_RETURN_IF_ERROR(check_trailer(path, trailer_block, h));

  // Manifest.
  std::string text(h.manifest_bytes, '\0');
  TROVE_RETURN_IF_ERROR(
      r.file.read_exact(h.manifest_offset, {reinterpret_cast<uint8_t*>(text.data()), text.size()}));
  const uint64_t manifest_xxh3 =
      store_checksum({reinterpret_cast<const uint8_t*>(text.data()), text.size()});
  if (manifest_xxh3 != h.manifest_xxh3) {
    return Status::corruption(str_printf(
        "%s: manifest at offset %llu (%llu bytes): checksum mismatch (stored %s, computed %s)",
        path.c_str(), ull(h.manifest_offset), ull(h.manifest_bytes), hex(h.manifest_xxh3).c_str(),
        hex(manifest_xxh3).c_str()));
  }
  // nlohmann parses iteratively but copies, compares and dumps recursively: a deep document
  // (300,000 nested [ in a layer's info) would overflow the stack later, so refuse it here.
  const int depth = json_nesting_depth(text);
  if (depth > kMaxJsonDepth) {
    return Status::corruption(
        str_printf("%s: manifest nesting depth %d exceeds %d", path.c_str(), depth, kMaxJsonDepth));
  }
  try {
    r.manifest = json::parse(text);
  } catch (const json::exception& e) {
    return Status::corruption(path + ": manifest is not valid JSON: " + e.what());
  }
  ManifestValidator validator(path, h);
  TROVE_ASSIGN_OR_RETURN(ParsedManifest parsed, validator.run(r.manifest));
  r.layers = std::move(parsed.layers);
  r.checksum_arrays = std::move(parsed.checksum_arrays);
  r.provenance = &r.manifest["provenance"];

  // Record checksums: loaded once, verified against the manifest.
  for (size_t li = 0; li < r.layers.size(); ++li) {
    const ChecksumArrayInfo& c = r.checksum_arrays[li];
    std::vector<uint64_t> sums(r.layers[li].table.count);
    std::span<uint8_t> bytes(reinterpret_cast<uint8_t*>(sums.data()), c.bytes);
    TROVE_RETURN_IF_ERROR(r.file.read_exact(c.offset, bytes));
    const uint64_t computed = store_checksum(bytes);
    if (computed != c.xxh3) {
      return Status::corruption(
          str_printf("%s: checksums of layer %s at offset %llu (%llu bytes): checksum mismatch "
                     "(stored %s, computed %s)",
                     path.c_str(), r.layers[li].name.c_str(), ull(c.offset), ull(c.bytes),
                     hex(c.xxh3).c_str(), hex(computed).c_str()));
    }
    r.record_checksums.push_back(std::move(sums));
  }

  // Everything below must reach the file validated above. The mapping comes from the same
  // descriptor; the O_DIRECT one has to be opened by path again, and a file renamed over the
  // path in between would pair this manifest with another file's bytes.
  TROVE_ASSIGN_OR_RETURN(r.map, MappedFile::map(r.file));
  if (r.map.size() != h.file_size) {
    return Status::corruption(
        str_printf("%s: the file changed size while it was opened", path.c_str()));
  }
  if (options.direct_io) {
    Result<File> direct = File::open_read(path, /*direct=*/true);
    if (direct.ok()) {
      TROVE_ASSIGN_OR_RETURN(bool same, r.file.is_same_file(*direct));
      if (!same) {
        return Status::aborted(path + ": changed while being opened; retry");
      }
      r.direct_file = std::move(direct).value();
    } else if (direct.status().code() == Status::Code::kNotSupported) {
      TROVE_LOG_DEBUG("%s: O_DIRECT refused by the filesystem; records are read buffered",
                      path.c_str());
    } else {
      return direct.status();
    }
  }
  return StoreReader(std::move(impl));
}

const std::string& StoreReader::path() const {
  return impl_->path;
}
uint64_t StoreReader::file_size() const {
  return impl_->header.file_size;
}
uint16_t StoreReader::version_major() const {
  return impl_->header.version_major;
}
uint16_t StoreReader::version_minor() const {
  return impl_->header.version_minor;
}
uint64_t StoreReader::generation() const {
  return impl_->header.generation;
}
uint64_t StoreReader::manifest_xxh3() const {
  return impl_->header.manifest_xxh3;
}
const nlohmann::json& StoreReader::manifest() const {
  return impl_->manifest;
}
const nlohmann::json& StoreReader::provenance() const {
  return *impl_->provenance;
}
const std::vector<StoreLayerInfo>& StoreReader::layers() const {
  return impl_->layers;
}

const StoreLayerInfo* StoreReader::find_layer(const std::string& name) const {
  for (const StoreLayerInfo& l : impl_->layers) {
    if (l.name == name) return &l;
  }
  return nullptr;
}

Result<std::vector<float>> StoreReader::read_dense(const StoreLayerInfo& layer,
                                                   const std::string& name) const {
  const Impl& r = *impl_;
  TROVE_ASSIGN_OR_RETURN(size_t li, r.require_layer(layer));
  const StoreDenseInfo* d = r.layers[li].find_dense(name);
  if (d == nullptr) {
    return Status::not_found(r.path + ": layer " + r.layers[li].name +
                             " has no dense tensor named '" + name + "'");
  }
  // Pinned: no commit of this process writes the file during the read (FORMAT.md).
  std::shared_lock<std::shared_mutex> reading;
  TROVE_RETURN_IF_ERROR(r.pin.begin_read(&reading, r.path));
  std::vector<float> out(d->bytes / sizeof(float));
  std::span<uint8_t> bytes(reinterpret_cast<uint8_t*>(out.data()), d->bytes);
  TROVE_RETURN_IF_ERROR(r.file.read_exact(d->offset, bytes));
  if (r.options.verify_checksums) {
    const uint64_t computed = store_checksum(bytes);
    if (computed != d->xxh3) {
      return Status::corruption(
          str_printf("%s: layer %s dense tensor %s at offset %llu (%llu bytes): checksum mismatch "
                     "(stored %s, computed %s)",
                     r.path.c_str(), r.layers[li].name.c_str(), name.c_str(), ull(d->offset),
                     ull(d->bytes), hex(d->xxh3).c_str(), hex(computed).c_str()));
    }
  }
  return out;
}

Status StoreReader::read_records(const StoreLayerInfo& layer, std::span<const int64_t> ids,
                                 std::span<uint8_t> out, bool verify) const {
  const Impl& r = *impl_;
  TROVE_ASSIGN_OR_RETURN(size_t li, r.require_layer(layer));
  const StoreTableInfo& t = r.layers[li].table;
  const uint64_t stride = t.stride;
  if (out.size() != ids.size() * stride) {
    return Status::invalid_argument(str_printf(
        "%s: read_records of layer %s: the output holds %zu bytes, %zu records need %llu",
        r.path.c_str(), r.layers[li].name.c_str(), out.size(), ids.size(),
        ull(ids.size() * stride)));
  }
  for (int64_t id : ids) {
    if (id < 0 || static_cast<uint64_t>(id) >= t.count) {
      return Status::out_of_range(str_printf(
          "%s: layer %s expert %lld is out of range (the table has %llu experts)", r.path.c_str(),
          r.layers[li].name.c_str(), static_cast<long long>(id), ull(t.count)));
    }
  }
  if (ids.empty()) return {};
  // Pinned: no commit of this process writes the file during the read (FORMAT.md).
  std::shared_lock<std::shared_mutex> reading;
  TROVE_RETURN_IF_ERROR(r.pin.begin_read(&reading, r.path));

  // Visit ids in file order so neighbours can share one read; `order` maps back to `out`.
  std::vector<size_t> order(ids.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ids[a] < ids[b]; });

  const bool direct = r.direct_file.is_open();
  auto record_offset = [&](size_t k) { return t.offset + static_cast<uint64_t>(ids[k]) * stride; };
  auto extent_of = [&](uint64_t first, uint64_t end) {
    return direct ? store_direct_span(first, end - first) : StoreDirectSpan{first, end};
  };

  // Runs [begin, end) of `order`: records no more than one block apart, within the cap.
  struct Run {
    size_t begin, end;
    StoreDirectSpan span;
    uint64_t data_end;  // end of the last record
  };
  std::vector<Run> runs;
  uint64_t max_span = 0;
  for (size_t i = 0; i < order.size();) {
    const uint64_t first = record_offset(order[i]);
    uint64_t last_end = first + stride;
    size_t j = i + 1;
    while (j < order.size()) {
      const uint64_t next = record_offset(order[j]);
      const uint64_t next_end = next + stride;
      if (next > last_end + kDirectAlignment ||
          extent_of(first, next_end).bytes() > kMaxCoalescedReadBytes) {
        break;
      }
      last_end = std::max(last_end, next_end);
      ++j;
    }
    const StoreDirectSpan span = extent_of(first, last_end);
    runs.push_back({i, j, span, last_end});
    max_span = std::max(max_span, span.bytes());
    i = j;
  }

  TROVE_ASSIGN_OR_RETURN(AlignedBuffer buffer, AlignedBuffer::allocate(max_span));
  const std::string& name = r.layers[li].name;
  // Copies (and verifies) the record at order[k] out of `got` bytes read at file offset `base`.
  auto deliver = [&](size_t k, size_t first_k, uint64_t base, uint64_t got) -> Status {
    const size_t pos = order[k];
    uint8_t* dst = out.data() + pos * stride;
    if (k > first_k && ids[order[k - 1]] == ids[pos]) {
      // A duplicate id: copied (and verified) just before.
      std::memcpy(dst, out.data() + order[k - 1] * stride, stride);
      return {};
    }
    if (record_offset(pos) + stride > base + got) {
      return Status::corruption(
          str_printf("%s: layer %s expert %lld at offset %llu (%llu bytes): truncated: the file "
                     "ends at offset %llu",
                     r.path.c_str(), name.c_str(), static_cast<long long>(ids[pos]),
                     ull(record_offset(pos)), ull(stride), ull(base + got)));
    }
    std::memcpy(dst, buffer.data() + (record_offset(pos) - base), stride);
    if (verify && r.options.verify_checksums) {
      const uint64_t stored = r.record_checksums[li][static_cast<size_t>(ids[pos])];
      const uint64_t computed = store_checksum({dst, stride});
      if (computed != stored) return r.record_mismatch(li, ids[pos], stored, computed);
    }
    return {};
  };
  auto expert = [&](size_t k) {
    return str_printf("layer %s expert %lld", name.c_str(), static_cast<long long>(ids[order[k]]));
  };
  for (const Run& run : runs) {
    // No buffered retry when an O_DIRECT read fails: EINVAL there means a misaligned request,
    // a bug this must surface rather than hide.
    const std::string what = run.end - run.begin == 1
                                 ? expert(run.begin)
                                 : str_printf("layer %s experts %lld..%lld", name.c_str(),
                                              static_cast<long long>(ids[order[run.begin]]),
                                              static_cast<long long>(ids[order[run.end - 1]]));
    const Result<uint64_t> read = r.read_extent(direct, run.span.begin, run.span.bytes(),
                                                run.data_end - run.span.begin, buffer.data(), what);
    if (read.ok()) {
      for (size_t k = run.begin; k < run.end; ++k) {
        TROVE_RETURN_IF_ERROR(deliver(k, run.begin, run.span.begin, *read));
      }
      continue;
    }
    if (run.end - run.begin == 1) return read.status();
    // A coalesced read failed (a bad sector somewhere in its extent, perhaps between the records
    // asked for): read record by record, so the error names the expert that cannot be read and
    // records beside the damage still arrive.
    for (size_t k = run.begin; k < run.end; ++k) {
      const uint64_t at = record_offset(order[k]);
      const StoreDirectSpan one = extent_of(at, at + stride);
      TROVE_ASSIGN_OR_RETURN(uint64_t got,
                             r.read_extent(direct, one.begin, one.bytes(), at + stride - one.begin,
                                           buffer.data(), expert(k)));
      TROVE_RETURN_IF_ERROR(deliver(k, run.begin, one.begin, got));
    }
  }
  return {};
}

std::span<const uint8_t> StoreReader::mapped_records(const StoreLayerInfo& layer) const {
  const size_t li = impl_->layer_index(layer);
  TROVE_CHECK_MSG(li != static_cast<size_t>(-1), "mapped_records: no layer named '%s'",
                  layer.name.c_str());
  const StoreTableInfo& t = impl_->layers[li].table;
  return impl_->map.bytes().subspan(t.offset, t.bytes);
}

Status StoreReader::verify_record(const StoreLayerInfo& layer, int64_t id,
                                  const uint8_t* record) const {
  const Impl& r = *impl_;
  TROVE_ASSIGN_OR_RETURN(size_t li, r.require_layer(layer));
  const StoreTableInfo& t = r.layers[li].table;
  if (id < 0 || static_cast<uint64_t>(id) >= t.count) {
    return Status::out_of_range(str_printf(
        "%s: layer %s expert %lld is out of range (the table has %llu experts)", r.path.c_str(),
        r.layers[li].name.c_str(), static_cast<long long>(id), ull(t.count)));
  }
  const uint64_t stored = r.record_checksums[li][static_cast<size_t>(id)];
  const uint64_t computed = store_checksum({record, t.stride});
  if (computed != stored) return r.record_mismatch(li, id, stored, computed);
  return {};
}

uint64_t StoreReader::record_checksum(const StoreLayerInfo& layer, int64_t id) const {
  const size_t li = impl_->layer_index(layer);
  TROVE_CHECK_MSG(li != static_cast<size_t>(-1), "record_checksum: no layer named '%s'",
                  layer.name.c_str());
  TROVE_CHECK_MSG(id >= 0 && static_cast<uint64_t>(id) < impl_->layers[li].table.count,
                  "record_checksum: expert %lld out of range", static_cast<long long>(id));
  return impl_->record_checksums[li][static_cast<size_t>(id)];
}

Result<std::vector<StoreFault>> StoreReader::verify(
    const std::function<void(uint64_t, uint64_t)>& progress) const {
  const Impl& r = *impl_;
  // Pinned: no commit of this process writes the file during the read (FORMAT.md).
  std::shared_lock<std::shared_mutex> reading;
  TROVE_RETURN_IF_ERROR(r.pin.begin_read(&reading, r.path));
  const int fd = r.file.fd();
  const uint64_t total = r.header.file_size;
  uint64_t done = 0;
  auto advance = [&](uint64_t bytes) {
    done += bytes;
    if (progress) progress(done, total);
  };
  std::vector<StoreFault> faults;
  auto fault = [&](const char* region, std::string layer, std::string item, uint64_t offset,
                   uint64_t bytes, std::string error) {
    faults.push_back({region, std::move(layer), std::move(item), offset, bytes, std::move(error)});
  };
  // Sequential reads of the whole file: tell the kernel to read ahead.
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  // Every byte comes through pread, so a sector the disk cannot read is an errno here, never a
  // signal. Empty: read; else what went wrong.
  std::vector<uint8_t> buf;
  auto read = [&](uint64_t offset, uint64_t len) -> std::string {
    buf.resize(len);
    uint64_t got = 0;
    while (got < len) {
      const int64_t n = r.pread_at(fd, buf.data() + got, len - got, offset + got);
      if (n < 0) {
        const int err = static_cast<int>(-n);
        if (err == EINTR || err == EAGAIN) continue;
        return str_printf("read failed: %s (errno %d)", std::strerror(err), err);
      }
      if (n == 0) return "read failed: the file ends early (truncated while open)";
      got += static_cast<uint64_t>(n);
    }
    return {};
  };
  auto bytes = [&]() { return std::span<const uint8_t>(buf); };

  // Header and trailer: the same checks as open, and they must still say what they said then.
  if (std::string e = read(0, kStoreHeaderBytes); !e.empty()) {
    fault("header", "", "", 0, kStoreHeaderBytes, e);
  } else {
    Result<StoreHeader> header = check_header(r.path, bytes(), total);
    if (!header.ok() || std::memcmp(&*header, &r.header, sizeof(StoreHeader)) != 0) {
      fault("header", "", "", 0, kStoreHeaderBytes,
            header.ok() ? "differs from the header read at open" : header.status().message());
    }
  }
  advance(kStoreHeaderBytes);
  const uint64_t trailer_offset = total - kStoreTrailerBytes;
  if (std::string e = read(trailer_offset, kStoreTrailerBytes); !e.empty()) {
    fault("trailer", "", "", trailer_offset, kStoreTrailerBytes, e);
  } else if (Status t = check_trailer(r.path, bytes(), r.header); !t.ok()) {
    fault("trailer", "", "", trailer_offset, kStoreTrailerBytes, t.message());
  }
  advance(kStoreTrailerBytes);

  // Every region the manifest lists, in file order, and the padding between them (which must
  // be zero, so that a flipped byte anywhere in the file is found).
  enum class Kind { kManifest, kDense, kChecksums, kRecords };
  struct Check {
    uint64_t offset;
    uint64_t bytes;
    Kind kind;
    size_t layer = 0;
    size_t dense = 0;
  };
  std::vector<Check> checks;
  checks.push_back({r.header.manifest_offset, r.header.manifest_bytes, Kind::kManifest});
  for (size_t li = 0; li < r.layers.size(); ++li) {
    const StoreLayerInfo& layer = r.layers[li];
    for (size_t k = 0; k < layer.dense.size(); ++k) {
      checks.push_back({layer.dense[k].offset, layer.dense[k].bytes, Kind::kDense, li, k});
    }
    const ChecksumArrayInfo& c = r.checksum_arrays[li];
    checks.push_back({c.offset, c.bytes, Kind::kChecksums, li});
    checks.push_back({layer.table.offset, layer.table.bytes, Kind::kRecords, li});
  }
  const std::string kMismatch = "checksum mismatch";
  // A region checked whole against one checksum.
  auto check_whole = [&](const char* region, const std::string& layer, const std::string& item,
                         const Check& check, uint64_t want) {
    if (std::string e = read(check.offset, check.bytes); !e.empty()) {
      fault(region, layer, item, check.offset, check.bytes, e);
    } else if (store_checksum(bytes()) != want) {
      fault(region, layer, item, check.offset, check.bytes, kMismatch);
    }
    advance(check.bytes);
  };
  auto run_check = [&](const Check& check) {
    const StoreLayerInfo& layer = r.layers[check.layer];
    switch (check.kind) {
      case Kind::kManifest:
        check_whole("manifest", "", "", check, r.header.manifest_xxh3);
        break;
      case Kind::kDense: {
        const StoreDenseInfo& d = layer.dense[check.dense];
        check_whole("dense", layer.name, d.name, check, d.xxh3);
        break;
      }
      case Kind::kChecksums:
        check_whole("checksums", layer.name, "", check, r.checksum_arrays[check.layer].xxh3);
        break;
      case Kind::kRecords: {
        const StoreTableInfo& t = layer.table;
        const std::vector<uint64_t>& sums = r.record_checksums[check.layer];
        const uint64_t per_chunk = std::max<uint64_t>(1, kVerifyChunkBytes / t.stride);
        auto check_record = [&](uint64_t id, std::span<const uint8_t> record) {
          if (store_checksum(record) != sums[id]) {
            fault("records", layer.name, str_printf("expert %llu", ull(id)),
                  t.offset + id * t.stride, t.stride, kMismatch);
          }
        };
        for (uint64_t first = 0; first < t.count; first += per_chunk) {
          const uint64_t last = std::min(t.count, first + per_chunk);
          if (read(t.offset + first * t.stride, (last - first) * t.stride).empty()) {
            for (uint64_t id = first; id < last; ++id) {
              check_record(id, bytes().subspan((id - first) * t.stride, t.stride));
            }
          } else {
            // Read around the damage: record by record, each unreadable one a fault.
            for (uint64_t id = first; id < last; ++id) {
              const uint64_t off = t.offset + id * t.stride;
              if (std::string e = read(off, t.stride); !e.empty()) {
                fault("records", layer.name, str_printf("expert %llu", ull(id)), off, t.stride, e);
              } else {
                check_record(id, bytes());
              }
            }
          }
          advance((last - first) * t.stride);
        }
        break;
      }
    }
  };
  std::sort(checks.begin(), checks.end(),
            [](const Check& a, const Check& b) { return a.offset < b.offset; });
  uint64_t covered_end = kStoreHeaderBytes;
  auto check_padding = [&](uint64_t end) {
    for (uint64_t at = covered_end; at < end;) {
      const uint64_t n = std::min(end - at, kVerifyChunkBytes);
      if (std::string e = read(at, n); !e.empty()) {
        fault("padding", "", "", at, n, e);
      } else if (std::any_of(buf.begin(), buf.end(), [](uint8_t b) { return b != 0; })) {
        fault("padding", "", "", at, n, "not zero");
      }
      advance(n);
      at += n;
    }
  };
  // Regions do not overlap (checked at open), so covered_end only moves forward.
  for (const Check& check : checks) {
    check_padding(check.offset);
    run_check(check);
    covered_end = std::max(covered_end, check.offset + check.bytes);
  }
  check_padding(trailer_offset);
  return faults;
}

}  // namespace trove
