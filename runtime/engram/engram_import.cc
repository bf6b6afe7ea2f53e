#include "runtime/engram/engram_import.h"

#include <cstring>

#include "base/strings.h"

namespace trove {

namespace {

// The model layer a prefix names: the number after a "layers." component ("model.layers.5.engram"
// -> 5), or -1 where there is none (informational: config.layer_idx).
int64_t layer_index(const std::string& prefix) {
  for (size_t at = prefix.find("layers."); at != std::string::npos;
       at = prefix.find("layers.", at + 1)) {
    if (at != 0 && prefix[at - 1] != '.') continue;
    const size_t begin = at + 7;
    size_t end = begin;
    while (end < prefix.size() && prefix[end] >= '0' && prefix[end] <= '9') ++end;
    if (end > begin && end - begin <= 9 && (end == prefix.size() || prefix[end] == '.')) {
      return std::stoll(prefix.substr(begin, end - begin));
    }
  }
  return -1;
}

struct Finder {
  const std::vector<const SafetensorsFile*>& files;
  std::string prefix;

  std::string full(const std::string& suffix) const {
    return prefix.empty() ? suffix : prefix + "." + suffix;
  }
  Result<const StTensorView*> find(const std::string& suffix, bool required,
                                   const SafetensorsFile** in = nullptr) const {
    const std::string name = full(suffix);
    const StTensorView* found = nullptr;
    for (const SafetensorsFile* f : files) {
      const StTensorView* v = f->find(name);
      if (v == nullptr) continue;
      if (found != nullptr) {
        return Status::invalid_argument("tensor '" + name + "' is in two of the input files");
      }
      found = v;
      if (in != nullptr) *in = f;
    }
    if (found == nullptr && required) {
      return Status::not_found("engram layer " + prefix + ": tensor '" + name +
                               "' not found (layout mikeybeez: LlamaEngram's state dict)");
    }
    return found;
  }
};

Status check_shape(const StTensorView& t, const std::vector<int64_t>& want) {
  if (t.shape != want) {
    return Status::invalid_argument("tensor '" + t.name + "' has shape " +
                                    shape_to_string(t.shape) + ", expected " +
                                    shape_to_string(want));
  }
  if (!st_dtype_is_float(t.dtype)) {
    return Status::invalid_argument("tensor '" + t.name + "' is " + st_dtype_name(t.dtype) +
                                    "; expected F32, F16 or BF16");
  }
  return {};
}

Result<std::vector<float>> to_f32(const StTensorView& t) {
  const int64_t rows = t.shape.empty() ? 1 : t.shape[0];
  std::vector<float> out(static_cast<size_t>(t.numel()));
  if (out.empty()) return out;
  // read_rows_f32 reads 2-D tables; view the tensor as [rows, numel / rows].
  StTensorView v = t;
  v.shape = {rows, t.numel() / rows};
  TROVE_RETURN_IF_ERROR(read_rows_f32(v, 0, rows, out.data()));
  return out;
}

}  // namespace

Result<ImportedEngram> import_engram(const std::vector<const SafetensorsFile*>& files,
                                     const std::string& prefix) {
  Finder f{files, prefix};
  ImportedEngram out;
  out.prefix = prefix;
  TROVE_ASSIGN_OR_RETURN(const StTensorView* mult, f.find("hash_mult", true));
  if (mult->dtype != StDType::kI64 || mult->shape.size() != 1 || mult->shape[0] < 2) {
    return Status::invalid_argument("tensor '" + mult->name + "' is " + st_dtype_name(mult->dtype) +
                                    " " + shape_to_string(mult->shape) +
                                    "; expected I64 [max_ngram] with max_ngram >= 2");
  }
  EngramConfig& c = out.config;
  c.hash.max_ngram = static_cast<int>(mult->shape[0]);
  c.hash.mult.resize(static_cast<size_t>(mult->shape[0]));
  std::memcpy(c.hash.mult.data(), mult->bytes.data(), c.hash.mult.size() * 8);

  const SafetensorsFile* first_file = nullptr;
  for (int64_t j = 0;; ++j) {
    const SafetensorsFile* in = nullptr;
    TROVE_ASSIGN_OR_RETURN(const StTensorView* t,
                           f.find("embeddings." + std::to_string(j) + ".weight", j == 0, &in));
    if (t == nullptr) break;
    if (j == 0) {
      first_file = in;
      if (t->shape.size() != 2) {
        return Status::invalid_argument("tensor '" + t->name + "' has shape " +
                                        shape_to_string(t->shape) + "; expected [vocab, e]");
      }
      c.hash.vocab = t->shape[0];
      c.embed_per_head = t->shape[1];
      out.source_dtype = st_dtype_name(t->dtype);
    }
    TROVE_RETURN_IF_ERROR(check_shape(*t, {c.hash.vocab, c.embed_per_head}));
    out.tables.push_back(t);
  }
  const int64_t orders = c.hash.max_ngram - 1;
  const auto tables = static_cast<int64_t>(out.tables.size());
  if (tables % orders != 0) {
    return Status::invalid_argument(str_printf(
        "engram layer %s: %lld embedding tables are not a multiple of the %lld n-gram orders "
        "that hash_mult's %d multipliers imply",
        prefix.c_str(), static_cast<long long>(tables), static_cast<long long>(orders),
        c.hash.max_ngram));
  }
  c.hash.heads = static_cast<int>(tables / orders);
  TROVE_ASSIGN_OR_RETURN(const StTensorView* value, f.find("value_proj.weight", true));
  if (value->shape.size() != 2) {
    return Status::invalid_argument("tensor '" + value->name + "' has shape " +
                                    shape_to_string(value->shape) + "; expected [D, E]");
  }
  c.hidden = value->shape[0];
  TROVE_ASSIGN_OR_RETURN(const StTensorView* key, f.find("key_proj.weight", true));
  TROVE_ASSIGN_OR_RETURN(const StTensorView* norm_k, f.find("norm_k.weight", true));
  TROVE_ASSIGN_OR_RETURN(const StTensorView* norm_q, f.find("norm_q.weight", true));
  TROVE_ASSIGN_OR_RETURN(const StTensorView* conv, f.find("conv.weight", true));
  if (conv->shape.size() != 3) {
    return Status::invalid_argument("tensor '" + conv->name + "' has shape " +
                                    shape_to_string(conv->shape) + "; expected [D, 1, K]");
  }
  c.kernel_size = conv->shape[2];
  TROVE_RETURN_IF_ERROR(check_shape(*value, {c.hidden, c.concat_dim()}));
  TROVE_RETURN_IF_ERROR(check_shape(*key, {c.hidden, c.concat_dim()}));
  TROVE_RETURN_IF_ERROR(check_shape(*norm_k, {c.hidden}));
  TROVE_RETURN_IF_ERROR(check_shape(*norm_q, {c.hidden}));
  TROVE_RETURN_IF_ERROR(check_shape(*conv, {c.hidden, 1, c.kernel_size}));
  c.layer_idx = layer_index(prefix);
  Status valid = c.validate();
  if (!valid.ok())
    return Status::invalid_argument("engram layer " + prefix + ": " + valid.message());
  TROVE_ASSIGN_OR_RETURN(out.dense.value_proj, to_f32(*value));
  TROVE_ASSIGN_OR_RETURN(out.dense.key_proj, to_f32(*key));
  TROVE_ASSIGN_OR_RETURN(out.dense.norm_k, to_f32(*norm_k));
  TROVE_ASSIGN_OR_RETURN(out.dense.norm_q, to_f32(*norm_q));
  TROVE_ASSIGN_OR_RETURN(out.dense.conv, to_f32(*conv));
  out.source_file = first_file != nullptr ? first_file->path() : "";
  return out;
}

Result<QuantError> write_imported_engram(StoreWriter* w, const std::string& name,
                                         const ImportedEngram& layer, DType dtype) {
  auto fill = [&](int64_t k, int64_t begin, int64_t count, float* out) {
    return read_rows_f32(*layer.tables[static_cast<size_t>(k)], begin, count, out);
  };
  const nlohmann::json source = {{"file", layer.source_file},
                                 {"prefix", layer.prefix},
                                 {"layout", "mikeybeez"},
                                 {"dtype", layer.source_dtype}};
  return write_engram_layer(w, name, layer.config, dtype, fill, layer.dense, source);
}

}  // namespace trove
