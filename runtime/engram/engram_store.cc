#include "runtime/engram/engram_store.h"

#include <algorithm>

#include "base/bytes.h"
#include "base/strings.h"

namespace trove {

namespace {

Result<int64_t> get_int(const nlohmann::json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_number_integer()) {
    return Status::corruption(where + "." + key + " is missing or not an integer");
  }
  return it->get<int64_t>();
}

}  // namespace

nlohmann::json engram_rows_json(const EngramRowLayout& l, int64_t tables, int64_t rows) {
  nlohmann::json j = {{"dtype", dtype_name(l.dtype)},
                      {"dim", l.dim},
                      {"row_bytes", l.row_bytes},
                      {"rows_per_record", l.rows_per_record},
                      {"record_bytes", l.record_bytes},
                      {"tables", tables},
                      {"rows", rows}};
  if (dtype_is_quantized(l.dtype)) {
    j["group"] = kQuantGroup;
    j["scale_dtype"] = "f16";
    if (l.dtype == DType::kI4) j["nibble_order"] = "ggml_q4_0";
  }
  return j;
}

Status EngramConfig::validate() const {
  TROVE_RETURN_IF_ERROR(hash.validate());
  if (hidden < 1) {
    return Status::invalid_argument(
        str_printf("engram hidden size is %lld; it must be >= 1", static_cast<long long>(hidden)));
  }
  if (embed_per_head < 1) {
    return Status::invalid_argument(str_printf("engram embed_per_head is %lld; it must be >= 1",
                                               static_cast<long long>(embed_per_head)));
  }
  if (kernel_size < 1) {
    return Status::invalid_argument(str_printf("engram kernel_size is %lld; it must be >= 1",
                                               static_cast<long long>(kernel_size)));
  }
  if (hash.vocab > (int64_t{1} << 40) / std::max<int64_t>(1, tables())) {
    return Status::invalid_argument("engram tables of " + with_commas(hash.vocab) +
                                    " rows are too many (2^40 rows at most in all)");
  }
  return {};
}

bool is_engram_layer(const StoreLayerInfo& layer) {
  const auto it = layer.info.find("kind");
  return it != layer.info.end() && it->is_string() && it->get<std::string>() == kEngramKind;
}

nlohmann::json engram_config_json(const EngramConfig& c) {
  return {{"hidden", c.hidden},
          {"embed_per_head", c.embed_per_head},
          {"kernel_size", c.kernel_size},
          {"layer_idx", c.layer_idx},
          {"max_ngram", c.hash.max_ngram},
          {"heads", c.hash.heads},
          {"vocab", c.hash.vocab},
          {"hash_mult", c.hash.mult},
          {"head_prime", kEngramHeadPrime},
          {"gate", "sqrt_sign_sigmoid"},
          {"norm_eps", 1e-5}};
}

Result<EngramConfig> engram_config_from_json(const nlohmann::json& j) {
  const std::string where = "config";
  if (!j.is_object()) return Status::invalid_argument("engram config is not a JSON object");
  EngramConfig c;
  TROVE_ASSIGN_OR_RETURN(c.hidden, get_int(j, "hidden", where));
  TROVE_ASSIGN_OR_RETURN(c.embed_per_head, get_int(j, "embed_per_head", where));
  TROVE_ASSIGN_OR_RETURN(c.kernel_size, get_int(j, "kernel_size", where));
  TROVE_ASSIGN_OR_RETURN(c.layer_idx, get_int(j, "layer_idx", where));
  TROVE_ASSIGN_OR_RETURN(const int64_t max_ngram, get_int(j, "max_ngram", where));
  TROVE_ASSIGN_OR_RETURN(const int64_t heads, get_int(j, "heads", where));
  TROVE_ASSIGN_OR_RETURN(c.hash.vocab, get_int(j, "vocab", where));
  if (max_ngram < 2 || max_ngram > 64 || heads < 1 || heads > (1 << 20)) {
    return Status::invalid_argument(
        str_printf("engram config max_ngram %lld, heads %lld: out of "
                   "range (max_ngram 2..64, heads >= 1)",
                   static_cast<long long>(max_ngram), static_cast<long long>(heads)));
  }
  c.hash.max_ngram = static_cast<int>(max_ngram);
  c.hash.heads = static_cast<int>(heads);
  if (j.contains("head_prime") && j["head_prime"] != kEngramHeadPrime) {
    return Status::not_supported("engram config.head_prime is " + j["head_prime"].dump() +
                                 "; this build hashes with " + std::to_string(kEngramHeadPrime) +
                                 " (written by another layout)");
  }
  const auto m = j.find("hash_mult");
  if (m == j.end() || !m->is_array()) {
    return Status::invalid_argument("engram config.hash_mult is missing or not an array");
  }
  for (const auto& v : *m) {
    if (!v.is_number_integer()) {
      return Status::invalid_argument("engram config.hash_mult holds " + v.dump() +
                                      ", not an integer");
    }
    c.hash.mult.push_back(v.get<int64_t>());
  }
  TROVE_RETURN_IF_ERROR(c.validate());
  return c;
}

Result<EngramStoredLayer> read_engram_layer(const StoreReader& store, const StoreLayerInfo& layer) {
  const std::string where = store.path() + ": layer " + layer.name + ": info";
  if (!is_engram_layer(layer)) {
    return Status::invalid_argument(store.path() + ": layer " + layer.name +
                                    " is not an Engram layer (its info has no \"kind\": "
                                    "\"engram\")");
  }
  const nlohmann::json& info = layer.info;
  if (!info.contains("config") || !info.contains("rows") || !info["rows"].is_object()) {
    return Status::corruption(where + " lacks 'config' or 'rows'");
  }
  auto config = engram_config_from_json(info["config"]);
  if (!config.ok()) return Status::corruption(where + ".config: " + config.status().message());
  EngramStoredLayer out;
  out.config = *config;
  const nlohmann::json& r = info["rows"];
  if (!r.contains("dtype") || !r["dtype"].is_string()) {
    return Status::corruption(where + ".rows.dtype is missing");
  }
  auto dtype = parse_dtype(r["dtype"].get<std::string>());
  if (!dtype.ok()) return Status::corruption(where + ".rows.dtype: " + dtype.status().message());
  TROVE_ASSIGN_OR_RETURN(const int64_t dim, get_int(r, "dim", where + ".rows"));
  TROVE_ASSIGN_OR_RETURN(const int64_t rpr, get_int(r, "rows_per_record", where + ".rows"));
  TROVE_ASSIGN_OR_RETURN(const int64_t row_bytes, get_int(r, "row_bytes", where + ".rows"));
  TROVE_ASSIGN_OR_RETURN(const int64_t tables, get_int(r, "tables", where + ".rows"));
  TROVE_ASSIGN_OR_RETURN(const int64_t rows, get_int(r, "rows", where + ".rows"));
  if (dim != out.config.embed_per_head) {
    return Status::corruption(str_printf("%s.rows.dim is %lld but config.embed_per_head is %lld",
                                         where.c_str(), static_cast<long long>(dim),
                                         static_cast<long long>(out.config.embed_per_head)));
  }
  if (tables != out.config.tables() || rows != out.config.rows()) {
    return Status::corruption(where + ".rows: tables " + std::to_string(tables) + ", rows " +
                              std::to_string(rows) + " disagree with the config's " +
                              std::to_string(out.config.tables()) + ", " +
                              std::to_string(out.config.rows()));
  }
  if (dtype_is_quantized(*dtype)) {
    if (r.value("group", int64_t{kQuantGroup}) != kQuantGroup ||
        r.value("scale_dtype", std::string("f16")) != "f16" ||
        (*dtype == DType::kI4 &&
         r.value("nibble_order", std::string("ggml_q4_0")) != "ggml_q4_0")) {
      return Status::not_supported(where + ".rows declares group " +
                                   r.value("group", nlohmann::json()).dump() + ", scale_dtype " +
                                   r.value("scale_dtype", nlohmann::json()).dump() +
                                   ": this build decodes group 32, f16 scales, ggml_q4_0 nibbles");
    }
  }
  // The layout is a function of (dtype, dim, record size): rebuild it for the record size the
  // table has, then require that every declared member agrees.
  const uint64_t record_bytes = layer.table.record_bytes;
  auto l = EngramRowLayout::make(*dtype, dim, 0);
  if (!l.ok()) return Status::corruption(where + ".rows: " + l.status().message());
  EngramRowLayout layout = *l;
  if (row_bytes != static_cast<int64_t>(layout.row_bytes) || rpr < 1 ||
      static_cast<uint64_t>(rpr) * layout.row_bytes != record_bytes || record_bytes % 64 != 0 ||
      layer.table.stride != record_bytes) {
    return Status::corruption(str_printf(
        "%s.rows: row_bytes %lld x rows_per_record %lld disagree with the table's record_bytes "
        "%llu, stride %llu (a %s row of %lld elements is %zu bytes)",
        where.c_str(), static_cast<long long>(row_bytes), static_cast<long long>(rpr),
        static_cast<unsigned long long>(record_bytes),
        static_cast<unsigned long long>(layer.table.stride),
        std::string(dtype_name(*dtype)).c_str(), static_cast<long long>(dim), layout.row_bytes));
  }
  layout.rows_per_record = rpr;
  layout.record_bytes = record_bytes;
  if (static_cast<int64_t>(layer.table.count) != layout.records(rows)) {
    return Status::corruption(
        str_printf("%s: the table has %llu records; %lld rows of %lld a "
                   "record need %lld",
                   where.c_str(), static_cast<unsigned long long>(layer.table.count),
                   static_cast<long long>(rows), static_cast<long long>(rpr),
                   static_cast<long long>(layout.records(rows))));
  }
  if (layer.table.dtype != dtype_name(*dtype)) {
    return Status::corruption(where + ".rows.dtype " + std::string(dtype_name(*dtype)) +
                              " disagrees with the table's dtype " + layer.table.dtype);
  }
  const EngramConfig& c = out.config;
  const std::pair<const char*, std::vector<int64_t>> dense[] = {
      {"value_proj.weight", {c.hidden, c.concat_dim()}},
      {"key_proj.weight", {c.hidden, c.concat_dim()}},
      {"norm_k.weight", {c.hidden}},
      {"norm_q.weight", {c.hidden}},
      {"conv.weight", {c.hidden, 1, c.kernel_size}}};
  // A training state layer (runtime/engram/engram_trainer.h) holds rows and the accumulators;
  // the module's tensors stay with the layer it trains.
  const bool state = info.contains("training_view");
  for (const auto& [name, shape] : dense) {
    if (state) break;
    const StoreDenseInfo* d = layer.find_dense(name);
    if (d == nullptr) {
      return Status::corruption(store.path() + ": layer " + layer.name + " lacks dense tensor '" +
                                name + "'");
    }
    if (d->shape != shape) {
      return Status::corruption(store.path() + ": layer " + layer.name + ": dense tensor '" + name +
                                "' has shape " + shape_to_string(d->shape) +
                                ", the config implies " + shape_to_string(shape));
    }
  }
  out.rows = layout;
  return out;
}

Result<EngramDense> read_engram_dense(const StoreReader& store, const StoreLayerInfo& layer,
                                      const EngramConfig&) {
  EngramDense d;
  TROVE_ASSIGN_OR_RETURN(d.value_proj, store.read_dense(layer, "value_proj.weight"));
  TROVE_ASSIGN_OR_RETURN(d.key_proj, store.read_dense(layer, "key_proj.weight"));
  TROVE_ASSIGN_OR_RETURN(d.norm_k, store.read_dense(layer, "norm_k.weight"));
  TROVE_ASSIGN_OR_RETURN(d.norm_q, store.read_dense(layer, "norm_q.weight"));
  TROVE_ASSIGN_OR_RETURN(d.conv, store.read_dense(layer, "conv.weight"));
  return d;
}

Result<QuantError> write_engram_layer(StoreWriter* w, const std::string& name,
                                      const EngramConfig& c, DType dtype,
                                      const EngramTableFill& table, const EngramDense& dense,
                                      const nlohmann::json& source, size_t min_record_bytes) {
  TROVE_RETURN_IF_ERROR(c.validate());
  TROVE_ASSIGN_OR_RETURN(const EngramRowLayout l,
                         EngramRowLayout::make(dtype, c.embed_per_head, min_record_bytes));
  const int64_t d = c.hidden;
  const int64_t e = c.concat_dim();
  const std::pair<const char*, size_t> sizes[] = {
      {"value_proj.weight", static_cast<size_t>(d * e)},
      {"key_proj.weight", static_cast<size_t>(d * e)},
      {"norm_k.weight", static_cast<size_t>(d)},
      {"norm_q.weight", static_cast<size_t>(d)},
      {"conv.weight", static_cast<size_t>(d * c.kernel_size)}};
  const std::vector<float>* tensors[] = {&dense.value_proj, &dense.key_proj, &dense.norm_k,
                                         &dense.norm_q, &dense.conv};
  for (size_t i = 0; i < 5; ++i) {
    if (tensors[i]->size() != sizes[i].second) {
      return Status::invalid_argument(
          str_printf("engram layer %s: %s has %zu elements, expected "
                     "%zu",
                     name.c_str(), sizes[i].first, tensors[i]->size(), sizes[i].second));
    }
  }
  const int64_t rows = c.rows();
  nlohmann::json info = {{"kind", kEngramKind},
                         {"config", engram_config_json(c)},
                         {"rows", engram_rows_json(l, c.tables(), rows)},
                         {"source", source}};
  StoreTableSpec spec;
  spec.dtype = std::string(dtype_name(dtype));
  spec.count = static_cast<uint64_t>(l.records(rows));
  spec.record_bytes = l.record_bytes;
  spec.stride = l.record_bytes;
  TROVE_RETURN_IF_ERROR(w->begin_layer(name, info, spec));

  // Rows stream a chunk of whole records at a time; a chunk may span two tables.
  const int64_t chunk_records =
      std::max<int64_t>(1, (int64_t{1} << 22) / static_cast<int64_t>(l.record_bytes));
  const int64_t chunk_rows = chunk_records * l.rows_per_record;
  std::vector<float> x(static_cast<size_t>(chunk_rows * c.embed_per_head));
  std::vector<float> back(x.size());
  std::vector<uint8_t> bytes(static_cast<size_t>(chunk_records) * l.record_bytes);
  QuantError err;
  for (int64_t g = 0; g < rows; g += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - g);
    for (int64_t done = 0; done < n;) {
      const int64_t k = (g + done) / c.hash.vocab;
      const int64_t r = (g + done) % c.hash.vocab;
      const int64_t take = std::min(n - done, c.hash.vocab - r);
      float* out = x.data() + done * c.embed_per_head;
      TROVE_RETURN_IF_ERROR(table(k, r, take, out));
      for (int64_t i = 0; i < take; ++i) {
        Status s = quant_check_range(dtype, out + i * c.embed_per_head, c.embed_per_head);
        if (!s.ok()) {
          return Status::invalid_argument(str_printf(
              "engram layer %s, table %lld, row %lld: %s", name.c_str(), static_cast<long long>(k),
              static_cast<long long>(r + i), s.message().c_str()));
        }
      }
      done += take;
    }
    const int64_t recs = l.records(n);
    std::fill(bytes.begin(), bytes.begin() + static_cast<ptrdiff_t>(recs * l.record_bytes), 0);
    engram_pack_rows(l, x.data(), n, bytes.data());
    std::vector<const uint8_t*> ptrs(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) ptrs[static_cast<size_t>(i)] = bytes.data() + i * l.row_bytes;
    engram_gather(l, ptrs.data(), n, back.data(), c.embed_per_head);
    err.add(x.data(), back.data(), n * c.embed_per_head);
    TROVE_RETURN_IF_ERROR(
        w->append_records({bytes.data(), static_cast<size_t>(recs) * l.record_bytes}));
  }
  nlohmann::json quant = {{"rmse", err.rmse()},
                          {"max_abs", err.max_abs},
                          {"rel_fro", err.rel_fro()},
                          {"elements", err.count}};
  info["quant_error"] = quant;
  TROVE_RETURN_IF_ERROR(w->update_layer_info(info));
  TROVE_RETURN_IF_ERROR(w->add_dense("value_proj.weight", {d, e}, dense.value_proj));
  TROVE_RETURN_IF_ERROR(w->add_dense("key_proj.weight", {d, e}, dense.key_proj));
  TROVE_RETURN_IF_ERROR(w->add_dense("norm_k.weight", {d}, dense.norm_k));
  TROVE_RETURN_IF_ERROR(w->add_dense("norm_q.weight", {d}, dense.norm_q));
  TROVE_RETURN_IF_ERROR(w->add_dense("conv.weight", {d, 1, c.kernel_size}, dense.conv));
  TROVE_RETURN_IF_ERROR(w->end_layer());
  return err;
}

Result<nlohmann::json> engram_inspect_json(const StoreReader& store, const StoreLayerInfo& layer) {
  TROVE_ASSIGN_OR_RETURN(EngramStoredLayer s, read_engram_layer(store, layer));
  const EngramConfig& c = s.config;
  nlohmann::json j;
  j["name"] = layer.name;
  j["kind"] = kEngramKind;
  j["config"] = engram_config_json(c);
  j["dtype"] = layer.table.dtype;
  j["tables"] = c.tables();
  j["rows"] = c.rows();
  j["row_bytes"] = s.rows.row_bytes;
  j["rows_per_record"] = s.rows.rows_per_record;
  j["record_bytes"] = s.rows.record_bytes;
  j["records"] = layer.table.count;
  j["table_bytes"] = layer.table.bytes;
  j["table_offset"] = layer.table.offset;
  j["bf16_bytes"] = static_cast<uint64_t>(c.rows()) * static_cast<uint64_t>(c.embed_per_head) * 2;
  j["overhead"] = s.rows.overhead(c.rows());
  nlohmann::json dense = nlohmann::json::array();
  for (const StoreDenseInfo& d : layer.dense) {
    dense.push_back({{"name", d.name}, {"shape", d.shape}, {"bytes", d.bytes}});
  }
  j["dense"] = dense;
  if (layer.info.contains("quant_error") && layer.info["quant_error"].is_object()) {
    j["quant_error"] = layer.info["quant_error"];
  }
  if (layer.info.contains("source")) j["source"] = layer.info["source"];
  if (layer.info.contains("training_view")) j["training_view"] = layer.info["training_view"];
  return j;
}

std::string render_engram_inspect(const nlohmann::json& j) {
  const auto& c = j["config"];
  std::string s = str_printf("engram layer %s\n", j["name"].get<std::string>().c_str());
  s += str_printf(
      "  config     D=%lld orders 2..%lld x %lld heads = %lld tables of %s rows x e=%lld "
      "(E=%lld), conv K=%lld, hash mult %s\n",
      c["hidden"].get<long long>(), c["max_ngram"].get<long long>(), c["heads"].get<long long>(),
      j["tables"].get<long long>(), with_commas(c["vocab"].get<int64_t>()).c_str(),
      c["embed_per_head"].get<long long>(),
      j["tables"].get<long long>() * c["embed_per_head"].get<long long>(),
      c["kernel_size"].get<long long>(), c["hash_mult"].dump().c_str());
  const uint64_t table = j["table_bytes"].get<uint64_t>();
  const uint64_t bf16 = j["bf16_bytes"].get<uint64_t>();
  s += str_printf(
      "  rows       %s, %llu bytes a row, %lld rows a record (%llu bytes, no padding); table %s "
      "(%.2fx smaller than bf16's %s), %.4fx the row bytes\n",
      j["dtype"].get<std::string>().c_str(),
      static_cast<unsigned long long>(j["row_bytes"].get<uint64_t>()),
      j["rows_per_record"].get<long long>(),
      static_cast<unsigned long long>(j["record_bytes"].get<uint64_t>()),
      format_bytes(table).c_str(),
      table == 0 ? 0.0 : static_cast<double>(bf16) / static_cast<double>(table),
      format_bytes(bf16).c_str(), j["overhead"].get<double>());
  std::string dense;
  for (const auto& d : j["dense"]) {
    dense += (dense.empty() ? "" : ", ") + d["name"].get<std::string>() + " " + d["shape"].dump();
  }
  s += "  dense      " + dense + " (fp32)\n";
  if (j.contains("training_view")) {
    const auto& tv = j["training_view"];
    s += str_printf("  training   the training state of %s at step %lld (%s)\n",
                    tv.value("of", std::string("?")).c_str(),
                    static_cast<long long>(tv.value("step", int64_t{0})),
                    tv.value("meaning", std::string()).c_str());
  }
  if (j.contains("quant_error")) {
    const auto& e = j["quant_error"];
    s += str_printf("  error      rmse %.4g max %.4g rel %.4g\n", e.value("rmse", 0.0),
                    e.value("max_abs", 0.0), e.value("rel_fro", 0.0));
  }
  return s;
}

}  // namespace trove
