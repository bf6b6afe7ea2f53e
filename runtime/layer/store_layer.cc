#include "runtime/layer/store_layer.h"

#include "base/strings.h"
#include "kernels/quant.h"
#include "runtime/layer/peer_config_json.h"

namespace trove {

namespace {

Result<int64_t> get_int(const nlohmann::json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_number_integer()) {
    return Status::corruption(where + "." + key + " is missing or not an integer");
  }
  return it->get<int64_t>();
}

// The dense tensors the config implies, with exactly these shapes. Other dense tensors (from a
// newer minor format version) are left alone.
Status check_dense_shapes(const StoreLayerInfo& layer, const PeerConfig& c,
                          const std::string& where) {
  struct Expected {
    const char* name;
    bool present;
    std::vector<int64_t> shape;
  };
  const Expected expected[] = {
      {"query.weight", true, {c.query_rows(), c.dim}},
      {"query.bias", c.query_bias, {c.query_rows()}},
      {"keys", true, {c.key_heads(), 2, c.n_keys, c.dim_key}},
      {"norm.weight", c.input_norm == InputNorm::kRms, {c.dim}},
  };
  for (const Expected& e : expected) {
    const StoreDenseInfo* d = layer.find_dense(e.name);
    if (d == nullptr && e.present) {
      return Status::corruption(where + ": the config needs dense tensor '" + e.name +
                                "', which the store lacks");
    }
    if (d != nullptr && !e.present) {
      return Status::corruption(where + ": dense tensor '" + e.name +
                                "' is present but the config does not use it");
    }
    if (d != nullptr && d->shape != e.shape) {
      return Status::corruption(where + ": dense tensor '" + e.name + "' has shape " +
                                shape_to_string(d->shape) + ", the config implies " +
                                shape_to_string(e.shape));
    }
  }
  return {};
}

// Every member of info.record must be one this build knows and, when declared, say what the
// decoder implements (kernels/record.h, FORMAT.md "Expert records and layer info"): a store
// declaring another group size, scale type, nibble order or field offset would otherwise be
// decoded as if it were trove's layout, silently wrong. A different layout is NotSupported
// (a newer writer's, valid but not readable here); a malformed value is Corruption.
Status check_record_fields(const nlohmann::json& r, const RecordLayout& layout,
                           const std::string& where) {
  const bool quantized = dtype_is_quantized(layout.dtype);
  struct Expected {
    const char* key;
    nlohmann::json value;  // null: the member must be absent for this dtype
  };
  auto when = [&](bool applies, nlohmann::json v) { return applies ? v : nlohmann::json(); };
  const Expected expected[] = {
      {"dtype", std::string(dtype_name(layout.dtype))},
      {"dim", layout.dim},
      {"dim_out", layout.dim_out},
      {"width", layout.width},
      {"record_bytes", layout.record_bytes},
      {"stride", nullptr},  // checked against the table by the caller
      {"group", when(quantized, kQuantGroup)},
      {"scale_dtype", when(quantized, "f16")},
      {"nibble_order", when(layout.dtype == DType::kI4, "ggml_q4_0")},
      {"down_scales_offset", when(quantized, layout.down_scales_offset)},
      {"up_scales_offset", when(quantized, layout.up_scales_offset)},
      {"down_codes_offset", layout.down_codes_offset},
      {"up_codes_offset", layout.up_codes_offset},
  };
  for (const auto& [key, value] : r.items()) {
    const Expected* e = nullptr;
    for (const Expected& x : expected) {
      if (key == x.key) e = &x;
    }
    if (e == nullptr) {
      return Status::not_supported(where + ".record." + key +
                                   " is a record layout field this build does not know; the "
                                   "store was written by a newer trove");
    }
    if (std::string_view(e->key) == "stride") continue;
    if (e->value.is_null()) {
      return Status::not_supported(where + ".record." + key + " = " + value.dump() +
                                   " is declared, but " + std::string(dtype_name(layout.dtype)) +
                                   " records have no such field in this build's layout");
    }
    if (value.type() != e->value.type() && !(value.is_number() && e->value.is_number())) {
      return Status::corruption(where + ".record." + key + " = " + value.dump() + " is not a " +
                                e->value.type_name());
    }
    if (value != e->value) {
      return Status::not_supported(
          where + ".record." + key + " = " + value.dump() + ", but this build decodes " +
          std::string(dtype_name(layout.dtype)) + " records with " + key + " = " + e->value.dump() +
          "; the store was written by another layout");
    }
  }
  return {};
}

}  // namespace

Result<StoredLayer> load_stored_layer(const StoreReader& store, const StoreLayerInfo& layer) {
  const std::string where = store.path() + ": layer " + layer.name + ": info";
  const nlohmann::json& info = layer.info;
  if (info.is_object() && info.value("kind", nlohmann::json()) == "engram") {
    return Status::not_supported(store.path() + ": layer " + layer.name +
                                 " is an Engram table (runtime/engram), not a PEER layer; open "
                                 "it with trove.torch.Engram");
  }
  if (!info.is_object() || !info.contains("config") || !info.contains("record") ||
      !info["record"].is_object()) {
    return Status::corruption(where +
                              " lacks 'config' or 'record'; was this store written by "
                              "`trove pack`?");
  }
  StoredLayer out;
  out.info = &layer;
  auto config = peer_config_from_json(info["config"]);
  if (!config.ok()) {
    // A config that pack wrote and that no longer parses is damage, not a caller's mistake.
    return Status::corruption(where + ".config: " + config.status().message());
  }
  out.config = config.value();

  const nlohmann::json& r = info["record"];
  if (!r.contains("dtype") || !r["dtype"].is_string()) {
    return Status::corruption(where + ".record.dtype is missing");
  }
  TROVE_ASSIGN_OR_RETURN(DType dtype, parse_dtype(r["dtype"].get<std::string>()));
  TROVE_ASSIGN_OR_RETURN(int64_t dim, get_int(r, "dim", where + ".record"));
  TROVE_ASSIGN_OR_RETURN(int64_t dim_out, get_int(r, "dim_out", where + ".record"));
  TROVE_ASSIGN_OR_RETURN(int64_t width, get_int(r, "width", where + ".record"));
  auto record = RecordLayout::make(dtype, dim, dim_out, width);
  if (!record.ok()) return record.status().with_context(where + ".record");
  out.record = record.value();
  TROVE_RETURN_IF_ERROR(check_record_fields(r, out.record, where));

  const StoreTableInfo& t = layer.table;
  if (t.dtype != dtype_name(dtype)) {
    return Status::corruption(str_printf("%s.record.dtype %s disagrees with the table's %s",
                                         where.c_str(), std::string(dtype_name(dtype)).c_str(),
                                         t.dtype.c_str()));
  }
  if (t.record_bytes != out.record.record_bytes || t.stride < out.record.record_bytes ||
      t.stride % 64 != 0) {
    return Status::corruption(str_printf(
        "%s.record implies %zu-byte records; the table says record_bytes %llu, stride %llu",
        where.c_str(), out.record.record_bytes, static_cast<unsigned long long>(t.record_bytes),
        static_cast<unsigned long long>(t.stride)));
  }
  out.record.stride = static_cast<size_t>(t.stride);
  if (dim != out.config.dim || dim_out != out.config.dim_out || width != out.config.expert_width ||
      static_cast<int64_t>(t.count) != out.config.num_experts()) {
    return Status::corruption(str_printf(
        "%s: config (dim %lld, dim_out %lld, %lld experts) disagrees with the table (dim %lld, "
        "dim_out %lld, %llu records)",
        where.c_str(), static_cast<long long>(out.config.dim),
        static_cast<long long>(out.config.dim_out),
        static_cast<long long>(out.config.num_experts()), static_cast<long long>(dim),
        static_cast<long long>(dim_out), static_cast<unsigned long long>(t.count)));
  }
  TROVE_RETURN_IF_ERROR(check_dense_shapes(layer, out.config, where));
  return out;
}

Result<StoredLayer> load_stored_layer(const StoreReader& store, const std::string& name) {
  const StoreLayerInfo* layer = store.find_layer(name);
  if (layer == nullptr) {
    std::string have;
    for (const auto& l : store.layers()) have += (have.empty() ? "" : ", ") + l.name;
    return Status::not_found(store.path() + ": no layer named '" + name + "' (layers: " + have +
                             ")");
  }
  return load_stored_layer(store, *layer);
}

}  // namespace trove
