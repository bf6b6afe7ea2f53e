#include "runtime/convert/inspect.h"

#include <algorithm>

#include "base/bytes.h"
#include "base/strings.h"
#include "runtime/engram/engram_store.h"
#include "runtime/layer/peer_config_json.h"
#include "runtime/layer/store_layer.h"

namespace trove {

namespace {

// The manifest's provenance and each layer's `source` and `quant_error` are free-form JSON that
// pack wrote; a damaged or hand-edited store may hold anything there. The report copies only
// fields of the expected type, so render_inspect can rely on every type it reads.
std::string string_or(const nlohmann::json& obj, const char* key, const char* fallback = "?") {
  if (!obj.is_object()) return fallback;
  auto it = obj.find(key);
  return it != obj.end() && it->is_string() ? it->get<std::string>() : fallback;
}

double number_or(const nlohmann::json& obj, const char* key, double fallback = -1) {
  if (!obj.is_object()) return fallback;
  auto it = obj.find(key);
  return it != obj.end() && it->is_number() ? it->get<double>() : fallback;
}

nlohmann::json clean_provenance(const nlohmann::json& p) {
  nlohmann::json out = {{"tool", string_or(p, "tool")},
                        {"created", string_or(p, "created")},
                        {"command", string_or(p, "command", "")},
                        {"layout", string_or(p, "layout")}};
  nlohmann::json sources = nlohmann::json::array();
  if (p.is_object() && p.contains("sources") && p["sources"].is_array()) {
    for (const auto& src : p["sources"]) {
      const double bytes = number_or(src, "bytes", 0);
      sources.push_back({{"file", string_or(src, "file")},
                         {"bytes", bytes > 0 ? static_cast<uint64_t>(bytes) : 0}});
    }
  }
  out["sources"] = sources;
  return out;
}

nlohmann::json clean_error(const nlohmann::json& e) {
  return {{"rmse", number_or(e, "rmse")},
          {"max_abs", number_or(e, "max_abs")},
          {"rel_fro", number_or(e, "rel_fro")}};
}

}  // namespace

Result<nlohmann::json> inspect_store(const StoreReader& store, const TierBudgets& budgets) {
  nlohmann::json out;
  out["file"] = store.path();
  out["file_bytes"] = store.file_size();
  out["format_version"] = {store.version_major(), store.version_minor()};
  out["generation"] = store.generation();
  out["provenance"] = clean_provenance(store.provenance());

  uint64_t total_table = 0;
  uint64_t total_dense = 0;
  uint64_t total_bf16 = 0;
  nlohmann::json layers = nlohmann::json::array();
  nlohmann::json engram = nlohmann::json::array();
  for (const StoreLayerInfo& info : store.layers()) {
    if (is_engram_layer(info)) {
      TROVE_ASSIGN_OR_RETURN(nlohmann::json e, engram_inspect_json(store, info));
      for (const StoreDenseInfo& d : info.dense) total_dense += d.bytes;
      total_table += info.table.bytes;
      total_bf16 += e["bf16_bytes"].get<uint64_t>();
      engram.push_back(std::move(e));
      continue;
    }
    TROVE_ASSIGN_OR_RETURN(StoredLayer layer, load_stored_layer(store, info));
    const RecordLayout& r = layer.record;
    nlohmann::json l;
    l["name"] = info.name;
    l["config"] = peer_config_to_json(layer.config);
    l["dtype"] = info.table.dtype;
    l["experts"] = info.table.count;
    l["record_bytes"] = info.table.record_bytes;
    l["stride"] = info.table.stride;
    l["table_bytes"] = info.table.bytes;
    l["table_offset"] = info.table.offset;
    const uint64_t bf16 =
        info.table.count * static_cast<uint64_t>(layer.config.dim + layer.config.dim_out) * 2;
    l["bf16_bytes"] = bf16;
    l["read_amplification"] = {{"512", r.read_amplification(512)},
                               {"4096", r.read_amplification(4096)}};
    nlohmann::json dense = nlohmann::json::array();
    for (const StoreDenseInfo& d : info.dense) {
      dense.push_back({{"name", d.name}, {"shape", d.shape}, {"bytes", d.bytes}});
      total_dense += d.bytes;
    }
    l["dense"] = dense;
    if (info.info.contains("quant_error") && info.info["quant_error"].is_object()) {
      const nlohmann::json& e = info.info["quant_error"];
      l["quant_error"] = {{"down", clean_error(e.value("down", nlohmann::json()))},
                          {"up", clean_error(e.value("up", nlohmann::json()))}};
    }
    if (info.info.contains("source")) {
      const nlohmann::json& src = info.info["source"];
      l["source"] = {{"file", string_or(src, "file")},
                     {"prefix", string_or(src, "prefix", "")},
                     {"layout", string_or(src, "layout")},
                     {"dtype", string_or(src, "dtype")}};
    }
    total_table += info.table.bytes;
    total_bf16 += bf16;
    layers.push_back(std::move(l));
  }
  out["layers"] = layers;
  if (!engram.empty()) out["engram_layers"] = engram;
  out["totals"] = {
      {"table_bytes", total_table}, {"dense_bytes", total_dense}, {"bf16_bytes", total_bf16}};

  if (budgets.vram > 0 || budgets.host > 0) {
    const uint64_t t0 = std::min(budgets.vram, total_table);
    const uint64_t t1 = std::min(budgets.host, total_table - t0);
    const uint64_t t2 = total_table - t0 - t1;
    auto frac = [&](uint64_t b) {
      return total_table == 0 ? 0.0 : static_cast<double>(b) / static_cast<double>(total_table);
    };
    out["tiers"] = {
        {"vram", {{"budget", budgets.vram}, {"bytes", t0}, {"fraction", frac(t0)}}},
        {"host", {{"budget", budgets.host}, {"bytes", t1}, {"fraction", frac(t1)}}},
        {"disk", {{"bytes", t2}, {"fraction", frac(t2)}}},
    };
  }
  return out;
}

std::string render_inspect(const nlohmann::json& j) {
  std::string s;
  s += str_printf("%s  (%s, trove format %d.%d, generation %llu)\n",
                  j["file"].get<std::string>().c_str(),
                  format_bytes(j["file_bytes"].get<uint64_t>()).c_str(),
                  j["format_version"][0].get<int>(), j["format_version"][1].get<int>(),
                  static_cast<unsigned long long>(j["generation"].get<uint64_t>()));
  // Every field read here was written by inspect_store with its type checked.
  const nlohmann::json& p = j["provenance"];
  s += str_printf("  written by %s on %s\n", p["tool"].get<std::string>().c_str(),
                  p["created"].get<std::string>().c_str());
  for (const auto& src : p["sources"]) {
    s += str_printf("  source     %s (%s, layout %s)\n", src["file"].get<std::string>().c_str(),
                    format_bytes(src["bytes"].get<uint64_t>()).c_str(),
                    p["layout"].get<std::string>().c_str());
  }
  s += "\n";
  for (const auto& l : j["layers"]) {
    const auto& c = l["config"];
    s += str_printf("layer %s\n", l["name"].get<std::string>().c_str());
    s += str_printf(
        "  config     D=%lld D_out=%lld heads=%lld n_keys=%lld (N=%llu experts) dk=%lld k=%lld "
        "k'=%lld\n             activation=%s gate=%s input_norm=%s keys=%s query_bias=%s\n",
        c["dim"].get<long long>(), c["dim_out"].get<long long>(), c["heads"].get<long long>(),
        c["n_keys"].get<long long>(), static_cast<unsigned long long>(l["experts"].get<uint64_t>()),
        c["dim_key"].get<long long>(), c["topk"].get<long long>(),
        c["topk_per_half"].get<long long>(), c["activation"].get<std::string>().c_str(),
        c["gate"].get<std::string>().c_str(), c["input_norm"].get<std::string>().c_str(),
        c["shared_keys"].get<bool>() ? "shared" : "per-head",
        c["query_bias"].get<bool>() ? "yes" : "no");
    const uint64_t table = l["table_bytes"].get<uint64_t>();
    const uint64_t bf16 = l["bf16_bytes"].get<uint64_t>();
    s += str_printf(
        "  records    %s, %llu bytes each, stride %llu; table %s (%.2fx smaller than bf16's %s)\n",
        l["dtype"].get<std::string>().c_str(),
        static_cast<unsigned long long>(l["record_bytes"].get<uint64_t>()),
        static_cast<unsigned long long>(l["stride"].get<uint64_t>()), format_bytes(table).c_str(),
        table == 0 ? 0.0 : static_cast<double>(bf16) / static_cast<double>(table),
        format_bytes(bf16).c_str());
    s += str_printf(
        "  read amp.  %.3f bytes read per useful byte at 4096-byte O_DIRECT alignment, %.3f at "
        "512\n",
        l["read_amplification"]["4096"].get<double>(),
        l["read_amplification"]["512"].get<double>());
    std::string dense;
    for (const auto& d : l["dense"]) {
      std::string shape;
      for (const auto& dim : d["shape"])
        shape += (shape.empty() ? "" : "x") + std::to_string(dim.get<long long>());
      dense += str_printf("%s%s [%s]", dense.empty() ? "" : ", ",
                          d["name"].get<std::string>().c_str(), shape.c_str());
    }
    s += "  dense      " + dense + " (fp32)\n";
    if (l.contains("quant_error")) {
      s += str_printf(
          "  error      down rmse %.4g max %.4g rel %.4g | up rmse %.4g max %.4g rel %.4g\n",
          l["quant_error"]["down"]["rmse"].get<double>(),
          l["quant_error"]["down"]["max_abs"].get<double>(),
          l["quant_error"]["down"]["rel_fro"].get<double>(),
          l["quant_error"]["up"]["rmse"].get<double>(),
          l["quant_error"]["up"]["max_abs"].get<double>(),
          l["quant_error"]["up"]["rel_fro"].get<double>());
    }
    if (l.contains("source")) {
      const auto& src = l["source"];
      s += str_printf(
          "  source     %s prefix '%s' (%s, %s)\n", src["file"].get<std::string>().c_str(),
          src["prefix"].get<std::string>().c_str(), src["layout"].get<std::string>().c_str(),
          src["dtype"].get<std::string>().c_str());
    }
    s += "\n";
  }
  if (j.contains("engram_layers")) {
    for (const auto& e : j["engram_layers"]) s += render_engram_inspect(e) + "\n";
  }
  const auto& t = j["totals"];
  s += str_printf("total      tables %s, dense %s (bf16 tables would be %s)\n",
                  format_bytes(t["table_bytes"].get<uint64_t>()).c_str(),
                  format_bytes(t["dense_bytes"].get<uint64_t>()).c_str(),
                  format_bytes(t["bf16_bytes"].get<uint64_t>()).c_str());
  if (j.contains("tiers")) {
    const auto& tiers = j["tiers"];
    s += "\ntier   budget        holds        share of experts\n";
    for (const char* name : {"vram", "host", "disk"}) {
      const auto& tier = tiers[name];
      s += str_printf(
          "%-6s %-13s %-12s %5.1f%%\n", name,
          tier.contains("budget") ? format_bytes(tier["budget"].get<uint64_t>()).c_str() : "-",
          format_bytes(tier["bytes"].get<uint64_t>()).c_str(),
          100.0 * tier["fraction"].get<double>());
    }
  }
  return s;
}

}  // namespace trove
