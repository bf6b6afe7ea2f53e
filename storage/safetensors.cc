// safetensors reader and writer. The reader trusts nothing in the file: every size and offset
// is checked against the image before a view or an allocation is made from it, and every
// nlohmann::json exception is caught here and turned into a Status.
//
// Layout written (the reference layout, which the Hugging Face reader requires exactly):
//   [u64 LE N][N bytes of JSON, space-padded so 8 + N is a multiple of 8][tensor bytes ...]
// Tensors follow each other with no gaps, in the caller's order, starting at data offset 0,
// and the file ends with the last tensor: the reference reader rejects gaps ("InvalidOffset")
// and trailing bytes ("MetadataIncompleteBuffer"). The data section therefore starts 8-byte
// aligned; a tensor inside it is aligned only as far as the sizes before it allow.
#include "storage/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <new>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>
#include <utility>

#include "base/half.h"
#include "base/strings.h"

namespace trove {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian and is handed out without byte swaps");

namespace {

using Json = nlohmann::json;

constexpr const char* kMetadataKey = "__metadata__";
constexpr const char* kAcceptedDtypes = "F32, F16, BF16, I8, U8, I32, I64";
// Chunk size for streaming `fill` tensors: large enough for full-speed writes, small enough
// that a 100 GB tensor never needs more than this in memory.
constexpr uint64_t kFillChunkBytes = 4u << 20;

constexpr StDType kAllDtypes[] = {StDType::kF32, StDType::kF16, StDType::kBF16, StDType::kI8,
                                  StDType::kU8,  StDType::kI32, StDType::kI64};

bool dtype_from_name(const std::string& name, StDType* out) {
  for (StDType t : kAllDtypes) {
    if (name == st_dtype_name(t)) {
      *out = t;
      return true;
    }
  }
  return false;
}

// Dtypes of the safetensors format that trove does not read: a file holding them is valid,
// just not supported, so the error code differs from a made-up dtype.
bool is_foreign_safetensors_dtype(const std::string& name) {
  static const char* kOthers[] = {
      "BOOL",    "F4",      "F6_E2M3", "F6_E3M2", "U16",         "I16",         "U32", "U64", "F64",
      "F8_E4M3", "F8_E5M2", "E8M0",    "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64", "C128"};
  for (const char* other : kOthers) {
    if (name == other) return true;
  }
  return false;
}

// Names and values in messages come from untrusted headers: cut them to a readable length.
std::string clip(const std::string& s) {
  return s.size() <= 128 ? s : s.substr(0, 128) + "...";
}
std::string quoted(const std::string& s) {
  return "\"" + clip(s) + "\"";
}

// A short, printable description of an untrusted JSON value for an error message. Containers
// are not dumped: a hostile header could nest them deeply or make them huge.
std::string describe(const Json& j) {
  switch (j.type()) {
    case Json::value_t::object:
      return str_printf("an object of %zu entries", j.size());
    case Json::value_t::array:
      return str_printf("an array of %zu elements", j.size());
    case Json::value_t::string:
      return "the string " + quoted(j.get_ref<const std::string&>());
    default:
      return j.dump();
  }
}

// Reads a JSON value that must be an integer in [0, 2^63). `what` names the field.
Status read_nonnegative(const Json& j, const std::string& what, uint64_t* out) {
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Status::corruption(str_printf("%s is %llu, which is 2^63 or more", what.c_str(),
                                           static_cast<unsigned long long>(v)));
    }
    *out = v;
    return {};
  }
  if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v < 0) {
      return Status::corruption(str_printf("%s is %lld; it must not be negative", what.c_str(),
                                           static_cast<long long>(v)));
    }
    *out = static_cast<uint64_t>(v);
    return {};
  }
  return Status::corruption(what + " is " + describe(j) + ", not a non-negative integer");
}

// Tracks the keys of every object being parsed so a key repeated within one object is caught
// (nlohmann keeps the last value silently, which would hide a tensor or a field).
class DuplicateKeyFinder {
 public:
  bool on_event(Json::parse_event_t event, const Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        open_.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        if (!open_.empty()) open_.pop_back();
        break;
      case Json::parse_event_t::key:
        if (!open_.empty() && parsed.is_string()) {
          const std::string& key = parsed.get_ref<const std::string&>();
          if (!open_.back().insert(key).second && duplicate_.empty()) {
            duplicate_ = key.empty() ? std::string("\"\"") : clip(key);
          }
        }
        break;
      default:
        break;
    }
    return true;  // keep every value
  }
  // The first key seen twice in one object; empty when none.
  const std::string& duplicate() const { return duplicate_; }

 private:
  std::vector<std::set<std::string>> open_;
  std::string duplicate_;
};

// One validated header entry before views are made.
struct Entry {
  std::string name;
  StDType dtype;
  std::vector<int64_t> shape;
  uint64_t begin;
  uint64_t end;
};

Status parse_entry(const std::string& name, const Json& j, uint64_t data_size, Entry* out) {
  const std::string tensor = "tensor '" + clip(name) + "'";
  if (!j.is_object()) {
    return Status::corruption(tensor + ": entry is " + describe(j) +
                              ", not an object with dtype, shape and data_offsets");
  }
  out->name = name;

  const auto dtype_it = j.find("dtype");
  if (dtype_it == j.end()) return Status::corruption(tensor + ": missing \"dtype\"");
  if (!dtype_it->is_string()) {
    return Status::corruption(tensor + ": \"dtype\" is " + describe(*dtype_it) + ", not a string");
  }
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  if (!dtype_from_name(dtype_name, &out->dtype)) {
    const std::string msg = tensor + ": dtype " + quoted(dtype_name) + " is not one trove " +
                            "reads (accepted: " + kAcceptedDtypes + ")";
    if (is_foreign_safetensors_dtype(dtype_name)) return Status::not_supported(msg);
    return Status::corruption(msg);
  }

  const auto shape_it = j.find("shape");
  if (shape_it == j.end()) return Status::corruption(tensor + ": missing \"shape\"");
  if (!shape_it->is_array()) {
    return Status::corruption(tensor + ": \"shape\" is " + describe(*shape_it) +
                              ", not an array of integers");
  }
  uint64_t numel = 1;
  bool numel_overflow = false;
  out->shape.clear();
  out->shape.reserve(shape_it->size());  // bounded by the header, itself bounded by the file
  for (size_t i = 0; i < shape_it->size(); ++i) {
    uint64_t dim = 0;
    TROVE_RETURN_IF_ERROR(
        read_nonnegative((*shape_it)[i], tensor + ": shape dim " + std::to_string(i), &dim));
    out->shape.push_back(static_cast<int64_t>(dim));
    if (__builtin_mul_overflow(numel, dim, &numel)) numel_overflow = true;
  }
  uint64_t bytes = 0;
  if (numel_overflow || __builtin_mul_overflow(numel, st_dtype_size(out->dtype), &bytes)) {
    return Status::corruption(tensor + ": shape " + shape_to_string(out->shape) + " of " +
                              dtype_name + " overflows: its byte count exceeds 2^64");
  }

  const auto offsets_it = j.find("data_offsets");
  if (offsets_it == j.end()) return Status::corruption(tensor + ": missing \"data_offsets\"");
  if (!offsets_it->is_array() || offsets_it->size() != 2) {
    return Status::corruption(tensor + ": \"data_offsets\" is " + describe(*offsets_it) +
                              ", not an array [begin, end]");
  }
  TROVE_RETURN_IF_ERROR(
      read_nonnegative((*offsets_it)[0], tensor + ": data_offsets begin", &out->begin));
  TROVE_RETURN_IF_ERROR(
      read_nonnegative((*offsets_it)[1], tensor + ": data_offsets end", &out->end));
  const auto offsets = [&] {
    return str_printf("data_offsets [%llu, %llu]", static_cast<unsigned long long>(out->begin),
                      static_cast<unsigned long long>(out->end));
  };
  if (out->begin > out->end) {
    return Status::corruption(tensor + ": " + offsets() + " begin after end");
  }
  if (out->end > data_size) {
    return Status::corruption(tensor + ": " + offsets() +
                              str_printf(" end past the %llu-byte data section (file truncated?)",
                                         static_cast<unsigned long long>(data_size)));
  }
  if (out->end - out->begin != bytes) {
    return Status::corruption(
        tensor + ": shape " + shape_to_string(out->shape) + " of " + dtype_name +
        str_printf(" needs %llu bytes but ", static_cast<unsigned long long>(bytes)) + offsets() +
        str_printf(" hold %llu", static_cast<unsigned long long>(out->end - out->begin)));
  }
  return {};
}

Status parse_metadata(const Json& j, std::map<std::string, std::string>* out) {
  if (!j.is_object()) {
    return Status::corruption(std::string(kMetadataKey) + " is " + describe(j) +
                              ", not an object of strings");
  }
  for (const auto& [key, value] : j.items()) {
    if (!value.is_string()) {
      return Status::corruption(std::string(kMetadataKey) + " key '" + clip(key) + "' holds " +
                                describe(value) + "; metadata values must be strings");
    }
    (*out)[key] = value.get_ref<const std::string&>();
  }
  return {};
}

// Validates the image and fills tensors/metadata. Errors are unprefixed (the caller adds the
// file name). May throw nlohmann::json exceptions or std::bad_alloc; the caller catches them.
Status parse_image(std::span<const uint8_t> image, std::vector<StTensorView>* tensors,
                   std::map<std::string, std::string>* metadata) {
  if (image.size() < 8) {
    return Status::corruption(str_printf(
        "file is %zu bytes, shorter than the 8-byte header length (truncated?)", image.size()));
  }
  uint64_t header_len = 0;
  std::memcpy(&header_len, image.data(), 8);  // little-endian host (static_assert above)
  if (header_len > SafetensorsFile::kMaxHeaderBytes) {
    return Status::corruption(
        str_printf("absurd header length %llu (the limit is %llu bytes)",
                   static_cast<unsigned long long>(header_len),
                   static_cast<unsigned long long>(SafetensorsFile::kMaxHeaderBytes)));
  }
  if (header_len > image.size() - 8) {
    return Status::corruption(
        str_printf("absurd header length %llu: only %llu bytes follow it (truncated?)",
                   static_cast<unsigned long long>(header_len),
                   static_cast<unsigned long long>(image.size() - 8)));
  }
  const auto header = image.subspan(8, header_len);
  const auto data = image.subspan(8 + header_len);

  DuplicateKeyFinder duplicates;
  Json root;
  try {
    root = Json::parse(
        header.begin(), header.end(),
        [&duplicates](int /*depth*/, Json::parse_event_t event, Json& parsed) {
          return duplicates.on_event(event, parsed);
        },
        /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const Json::parse_error& e) {
    return Status::corruption(std::string("header is not valid JSON: ") + e.what());
  }
  if (!root.is_object()) {
    return Status::corruption("header is " + describe(root) + ", not a JSON object");
  }
  if (!duplicates.duplicate().empty()) {
    return Status::corruption("header has the key '" + duplicates.duplicate() + "' twice");
  }

  std::vector<Entry> entries;
  entries.reserve(root.size());
  for (const auto& [key, value] : root.items()) {
    if (key == kMetadataKey) {
      TROVE_RETURN_IF_ERROR(parse_metadata(value, metadata));
      continue;
    }
    Entry e;
    TROVE_RETURN_IF_ERROR(parse_entry(key, value, data.size(), &e));
    entries.push_back(std::move(e));
  }

  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  // The tensors must tile the data section exactly, as the format requires and its reference
  // reader enforces: a hole (bytes inserted before a tensor) would otherwise shift nothing and
  // go unnoticed, trailing bytes likewise. Empty tensors cover no bytes, so they overlap nothing
  // and leave no hole wherever they point.
  const Entry* last = nullptr;
  uint64_t covered = 0;  // the data section is tiled up to here
  auto ull = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  for (const Entry& e : entries) {
    if (e.begin == e.end) continue;
    if (last != nullptr && e.begin < last->end) {
      return Status::corruption(str_printf(
          "tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap", clip(last->name).c_str(),
          ull(last->begin), ull(last->end), clip(e.name).c_str(), ull(e.begin), ull(e.end)));
    }
    if (e.begin > covered) {
      return Status::corruption(str_printf(
          "data bytes [%llu, %llu) belong to no tensor: a hole before tensor '%s' [%llu, %llu) "
          "(the tensors must tile the data section)",
          ull(covered), ull(e.begin), clip(e.name).c_str(), ull(e.begin), ull(e.end)));
    }
    covered = e.end;
    last = &e;
  }
  if (covered != data.size()) {
    return Status::corruption(str_printf(
        "%llu trailing bytes: the tensors end at data byte %llu but the data section has %llu "
        "(the tensors must tile the data section)",
        ull(data.size() - covered), ull(covered), ull(data.size())));
  }

  tensors->reserve(entries.size());
  for (Entry& e : entries) {
    tensors->push_back(StTensorView{std::move(e.name), e.dtype, std::move(e.shape),
                                    data.subspan(e.begin, e.end - e.begin)});
  }
  return {};
}

}  // namespace

const char* st_dtype_name(StDType t) {
  switch (t) {
    case StDType::kF32:
      return "F32";
    case StDType::kF16:
      return "F16";
    case StDType::kBF16:
      return "BF16";
    case StDType::kI8:
      return "I8";
    case StDType::kU8:
      return "U8";
    case StDType::kI32:
      return "I32";
    case StDType::kI64:
      return "I64";
  }
  return "?";
}

size_t st_dtype_size(StDType t) {
  switch (t) {
    case StDType::kF32:
      return 4;
    case StDType::kF16:
      return 2;
    case StDType::kBF16:
      return 2;
    case StDType::kI8:
      return 1;
    case StDType::kU8:
      return 1;
    case StDType::kI32:
      return 4;
    case StDType::kI64:
      return 8;
  }
  return 0;
}

bool st_dtype_is_float(StDType t) {
  return t == StDType::kF32 || t == StDType::kF16 || t == StDType::kBF16;
}

DType st_float_dtype(StDType t) {
  TROVE_CHECK_MSG(st_dtype_is_float(t), "%s is not a float dtype", st_dtype_name(t));
  return t == StDType::kF32 ? DType::kF32 : t == StDType::kF16 ? DType::kF16 : DType::kBF16;
}

namespace {

// n elements of a float dtype at `src` (little-endian, possibly unaligned) as fp32.
void widen_to_f32(StDType dtype, const uint8_t* src, size_t n, float* out) {
  static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");
  if (dtype == StDType::kF32) {
    if (n > 0) std::memcpy(out, src, n * sizeof(float));
    return;
  }
  TROVE_CHECK(dtype == StDType::kF16 || dtype == StDType::kBF16);
  const bool f16 = dtype == StDType::kF16;
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    out[i] = f16 ? fp16_to_fp32(h) : bf16_to_fp32(h);
  }
}

}  // namespace

int64_t StTensorView::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return static_cast<int64_t>(n);
}

// ---- SafetensorsFile -----------------------------------------------------------------------

Result<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  TROVE_ASSIGN_OR_RETURN(MappedFile map, MappedFile::open(path));
  // The views point into the mapping, whose address survives moving the MappedFile.
  TROVE_ASSIGN_OR_RETURN(SafetensorsFile file, parse(map.bytes(), path));
  file.map_ = std::move(map);
  return file;
}

Result<SafetensorsFile> SafetensorsFile::parse(std::span<const uint8_t> image, std::string name) {
  SafetensorsFile file;
  Status s;
  try {
    s = parse_image(image, &file.tensors_, &file.metadata_);
  } catch (const nlohmann::json::exception& e) {
    s = Status::corruption(std::string("header: ") + e.what());
  } catch (const std::bad_alloc&) {
    s = Status::resource_exhausted("out of memory while parsing the header");
  }
  if (!s.ok()) return s.with_context(name);
  file.path_ = std::move(name);
  file.image_ = image;
  for (size_t i = 0; i < file.tensors_.size(); ++i) file.index_[file.tensors_[i].name] = i;
  return file;
}

const StTensorView* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Result<std::vector<float>> SafetensorsFile::read_f32(const std::string& name) const {
  const StTensorView* t = find(name);
  if (t == nullptr) return Status::not_found(path_ + ": no tensor named '" + name + "'");
  // The dtype first: an I8 tensor of n bytes would otherwise cost 4n bytes of floats before
  // being refused.
  if (!st_dtype_is_float(t->dtype)) {
    return Status::invalid_argument(path_ + ": tensor '" + name + "' is " +
                                    st_dtype_name(t->dtype) +
                                    "; read_f32 converts F32, F16 and BF16 only");
  }
  // The view's byte count was checked against numel * dtype size when the header was parsed.
  std::vector<float> out(static_cast<size_t>(t->numel()));
  widen_to_f32(t->dtype, t->bytes.data(), out.size(), out.data());
  return out;
}

Status read_rows_f32(const StTensorView& table, int64_t first, int64_t count, float* out) {
  if (table.shape.size() != 2) {
    return Status::invalid_argument("tensor '" + table.name + "' has shape " +
                                    shape_to_string(table.shape) + ", expected [rows, row_len]");
  }
  if (!st_dtype_is_float(table.dtype)) {
    return Status::invalid_argument("tensor '" + table.name + "' has dtype " +
                                    st_dtype_name(table.dtype) +
                                    "; expert tables must be F32, F16 or BF16");
  }
  const int64_t rows = table.shape[0];
  const int64_t row_len = table.shape[1];
  if (first < 0 || count < 0 || first > rows || count > rows - first) {
    return Status::out_of_range(str_printf(
        "rows [%lld, %lld + %lld) are outside tensor '%s' with %lld rows",
        static_cast<long long>(first), static_cast<long long>(first), static_cast<long long>(count),
        table.name.c_str(), static_cast<long long>(rows)));
  }
  const size_t elem = st_dtype_size(table.dtype);
  if (table.bytes.size() != static_cast<size_t>(rows) * static_cast<size_t>(row_len) * elem) {
    return Status::corruption(str_printf("tensor '%s' has %zu bytes for shape %s",
                                         table.name.c_str(), table.bytes.size(),
                                         shape_to_string(table.shape).c_str()));
  }
  if (count == 0) return Status::ok_status();
  TROVE_CHECK(out != nullptr);
  const size_t n = static_cast<size_t>(count) * static_cast<size_t>(row_len);
  const uint8_t* src = table.bytes.data() + static_cast<size_t>(first) * row_len * elem;
  widen_to_f32(table.dtype, src, n, out);
  return Status::ok_status();
}

// ---- write_safetensors ---------------------------------------------------------------------

Status write_safetensors(const std::string& path, const std::vector<StTensorOut>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  const auto invalid = [&path](const std::string& msg) {
    return Status::invalid_argument(path + ": " + msg);
  };
  // Validate everything and lay out the data before creating the file.
  std::vector<uint64_t> sizes;
  sizes.reserve(tensors.size());
  std::set<std::string> names;
  Json header = Json::object();
  uint64_t offset = 0;
  for (const StTensorOut& t : tensors) {
    const std::string tensor = "tensor '" + t.name + "'";
    if (t.name == kMetadataKey) return invalid("a tensor may not be named " + t.name);
    if (!names.insert(t.name).second) return invalid(tensor + " is given twice");
    uint64_t bytes = st_dtype_size(t.dtype);
    for (int64_t d : t.shape) {
      if (d < 0)
        return invalid(tensor + ": shape " + shape_to_string(t.shape) + " has a negative dim");
      if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(d), &bytes)) {
        return invalid(tensor + ": shape " + shape_to_string(t.shape) + " overflows 2^64 bytes");
      }
    }
    if (t.fill) {
      if (!t.data.empty()) return invalid(tensor + ": give data or fill, not both");
    } else if (t.data.size() != bytes) {
      return invalid(tensor + str_printf(": shape %s of %s needs %llu bytes, data holds %zu",
                                         shape_to_string(t.shape).c_str(), st_dtype_name(t.dtype),
                                         static_cast<unsigned long long>(bytes), t.data.size()));
    }
    uint64_t end = 0;
    if (__builtin_add_overflow(offset, bytes, &end)) {
      return invalid("the tensors together exceed 2^64 bytes");
    }
    header[t.name] = {
        {"dtype", st_dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, end}}};
    offset = end;
    sizes.push_back(bytes);
  }
  if (!metadata.empty()) header[kMetadataKey] = metadata;

  std::string text;
  try {
    text = header.dump();  // keys sorted (std::map): the same input gives the same bytes
  } catch (const Json::type_error& e) {
    return invalid(std::string("a tensor name or metadata string is not valid UTF-8: ") + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t header_len = text.size();
  uint8_t len_bytes[8];
  std::memcpy(len_bytes, &header_len, 8);  // little-endian host

  TROVE_ASSIGN_OR_RETURN(AtomicFileWriter w, AtomicFileWriter::create(path));
  TROVE_RETURN_IF_ERROR(w.append(len_bytes));
  TROVE_RETURN_IF_ERROR(w.append({reinterpret_cast<const uint8_t*>(text.data()), text.size()}));
  std::vector<uint8_t> chunk;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const StTensorOut& t = tensors[i];
    if (!t.fill) {
      TROVE_RETURN_IF_ERROR(w.append(t.data));
      continue;
    }
    if (chunk.empty() && sizes[i] > 0) chunk.resize(kFillChunkBytes);
    for (uint64_t done = 0; done < sizes[i];) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(sizes[i] - done, chunk.size()));
      const std::span<uint8_t> piece(chunk.data(), n);
      const Status s = t.fill(done, piece);
      if (!s.ok()) {
        return s.with_context(str_printf("%s: filling tensor '%s' at byte %llu", path.c_str(),
                                         t.name.c_str(), static_cast<unsigned long long>(done)));
      }
      TROVE_RETURN_IF_ERROR(w.append(piece));
      done += n;
    }
  }
  return w.commit();
}

}  // namespace trove
