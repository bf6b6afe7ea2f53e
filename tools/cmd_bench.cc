// trove bench: the PEER layer over the tiered store on a synthetic table, per-tier figures
// beside the limits calibrated in the same run (runtime/bench/bench.h, runtime/bench/calibrate.h).
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <tuple>

#include "base/bytes.h"
#include "base/plot.h"
#include "base/progress.h"
#include "base/strings.h"
#include "runtime/bench/bench.h"
#include "runtime/bench/calibrate.h"
#include "runtime/layer/lookahead.h"
#include "runtime/layer/peer_config_json.h"
#include "runtime/layer/store_layer.h"
#include "storage/store.h"
#include "tools/commands.h"

namespace trove::cli {

namespace {

struct BenchArgs {
  std::string experts = "1M", batch = "2048", host = "10%", routing = "zipf:1.09";
  std::string lookahead = "0", cross_layer = "0";
  int64_t dim = 2048, dim_out = 0, heads = 4, topk = 8, topk_per_half = 0, dim_key = 64;
  std::string quant = "int4", store, plot;
  std::string device = "cpu", vram, h2d = "auto";
  TierFlags tier;
  int threads = 0;
  int64_t batches = 32, warmup = 8;
  int64_t layers = 1;
  double calibrate_seconds = 2.0;
  bool no_resident = false, no_calibrate = false, no_fio = false, cpu_misses = false;
  uint64_t seed = 1;
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t comma = s.find(',', start);
    const size_t end = comma == std::string::npos ? s.size() : comma;
    if (end > start) out.push_back(s.substr(start, end - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

// The most experts and tokens per batch a count may give. The host tier indexes at most
// INT32_MAX experts (runtime/tiers/expert_cache.h): a larger table is refused here, not after its
// store has been written.
constexpr int64_t kMaxExperts = INT32_MAX;
constexpr int64_t kMaxBatchTokens = int64_t{1} << 20;

// "4M" = 4 * 2^20 experts, "262144", "256K", "1.5K". A whole number in [1, max]: a fraction
// ("0.3", "1.5") or a value past `max` ("inf", "1e30") is an error, never rounded or wrapped.
Result<int64_t> parse_count(const std::string& flag, const std::string& text, int64_t max) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  double mult = 1;
  const std::string unit(end);
  if (unit == "K" || unit == "k")
    mult = 1024;
  else if (unit == "M" || unit == "m")
    mult = 1024.0 * 1024;
  else if (unit == "G" || unit == "g")
    mult = 1024.0 * 1024 * 1024;
  else if (!unit.empty())
    mult = -1;
  const double count = v * mult;
  if (end == text.c_str() || mult < 0 || !(count >= 1) || count != std::floor(count)) {
    return Status::invalid_argument(flag + " " + text +
                                    ": expected a positive whole count such as 2048, 256K or 4M");
  }
  if (!(count <= static_cast<double>(max))) {
    return Status::invalid_argument(
        str_printf("%s %s: at most %lld", flag.c_str(), text.c_str(), static_cast<long long>(max)));
  }
  return static_cast<int64_t>(count);
}

struct Point {
  int64_t experts = 0;
  int64_t batch = 0;
  std::string host;  // as given: "2GiB" or "10%"
  BenchWorkload workload;
  uint64_t host_bytes = 0;
  uint64_t vram_bytes = 0;  // --vram (0: none)
  int lookahead = 0;
  bool cross_layer = false;
  BenchResult result;
  nlohmann::json disk;  // this table's disk calibration (ours, fio)
};

// Every config field the flags set is in the name (k' only when it is not k, so the names of
// stores written before k' was a flag still match).
std::string store_name(const BenchArgs& a, int64_t experts) {
  const std::string kp = a.topk_per_half > 0 && a.topk_per_half != a.topk
                             ? str_printf("-kp%lld", (long long)a.topk_per_half)
                             : std::string();
  return str_printf("bench-N%lld-D%lld-Do%lld-h%lld-k%lld%s-dk%lld-%s.trove", (long long)experts,
                    (long long)a.dim, (long long)(a.dim_out > 0 ? a.dim_out : a.dim),
                    (long long)a.heads, (long long)a.topk, kp.c_str(), (long long)a.dim_key,
                    a.quant.c_str());
}

// The store for `experts` in `dir`: reused when a previous run wrote it (and it opens as a
// store whose first a.layers bench layers all have exactly this config and record dtype),
// written otherwise. The name does not count layers: a store of more layers serves a run of
// fewer, and one of fewer is written anew with a.layers (the folder is trove bench's own; a
// one-layer store of before is still used by --layers 1).
Result<std::string> ensure_store(const BenchArgs& a, const std::string& dir, int64_t experts,
                                 const PeerConfig& config, DType dtype, bool talk) {
  const std::string path = dir + "/" + store_name(a, experts);
  if (std::filesystem::exists(path)) {
    PeerConfig want = config;
    Result<StoreReader> s = StoreReader::open(path);
    if (s.ok() && want.validate_and_fill().ok()) {
      int64_t held = 0;
      while (held < a.layers) {
        Result<StoredLayer> l = load_stored_layer(*s, bench_layer_name(held));
        if (!l.ok() || peer_config_to_json(l->config) != peer_config_to_json(want) ||
            l->record.dtype != dtype) {
          break;
        }
        ++held;
      }
      if (held == a.layers) return path;
      if (held > 0 && talk) {
        std::printf("%s holds %lld of the %lld layers asked for: writing it anew\n", path.c_str(),
                    (long long)held, (long long)a.layers);
      }
    }
  }
  std::unique_ptr<ProgressBar> bar;
  if (talk) {
    bar = std::make_unique<ProgressBar>(
        "writing " + path +
            (a.layers > 1 ? str_printf(" (%lld layers)", (long long)a.layers) : std::string()),
        static_cast<uint64_t>(experts * a.layers));
  }
  TROVE_RETURN_IF_ERROR(write_bench_store(
      path, config, dtype, 1,
      [&](int64_t done, int64_t) {
        if (bar) bar->update(static_cast<uint64_t>(done));
      },
      a.layers));
  if (bar) bar->finish();
  return path;
}

// One stage's per-batch latency histogram in milliseconds.
nlohmann::json stage_json(const LatencyHistogram& t) {
  const double n = static_cast<double>(std::max<int64_t>(1, t.count()));
  return {{"p50_ms", t.quantile(0.5) * 1e3},
          {"p90_ms", t.quantile(0.9) * 1e3},
          {"p99_ms", t.quantile(0.99) * 1e3},
          {"max_ms", t.quantile(1.0) * 1e3},
          {"mean_ms", t.sum() / n * 1e3}};
}

// One layer's figures, per measured batch like the point's.
nlohmann::json layer_json(const BenchLayerResult& l, const BenchResult& r) {
  const double nb = static_cast<double>(r.batches);
  nlohmann::json j = {{"name", l.name},
                      {"host_budget_bytes", l.host_budget_bytes},
                      {"host_capacity_records", l.capacity_slots},
                      {"requested_per_batch", static_cast<double>(l.requested()) / nb},
                      {"unique_per_batch", static_cast<double>(l.unique()) / nb},
                      {"hit_rate", l.hit_rate},
                      {"misses_per_batch", static_cast<double>(l.misses()) / nb},
                      {"bytes_read_per_batch", static_cast<double>(l.bytes_read()) / nb}};
  if (l.oracle_hit_rate >= 0) {
    j["cold_run_hit_rate"] = l.achieved_hit_rate_all;
    j["belady_hit_rate"] = l.oracle_hit_rate;
  }
  if (r.device_memory) {
    j["device_budget_bytes"] = l.vram_budget_bytes;
    j["device_capacity_records"] = l.device_capacity_slots;
    j["device_hit_rate"] = l.device_hit_rate;
    j["device_misses_per_batch"] = static_cast<double>(l.metrics.counter("device.misses")) / nb;
    if (l.device_oracle_hit_rate >= 0) {
      j["device_cold_run_hit_rate"] = l.device_hit_rate_all;
      j["device_belady_hit_rate"] = l.device_oracle_hit_rate;
    }
  }
  return j;
}

// "48 GiB", or split over the layers: "48 GiB = 2 x 24 GiB".
std::string budget_text(uint64_t bytes, size_t layers) {
  if (layers <= 1) return format_bytes(bytes);
  return format_bytes(bytes) + " = " + std::to_string(layers) + " x " +
         format_bytes(bytes / layers);
}

// a / b, or 0 when either is not a figure.
double ratio(double a, double b) {
  return a > 0 && b > 0 ? a / b : 0.0;
}

// The GPU peers (runtime/bench/device_peers.h) beside ours: each peer's tokens/s as a ratio of ours
// all-resident, and the fused kernel's bytes/s as a fraction of the calibrated HBM bandwidth.
nlohmann::json device_peers_json(const BenchResult& r, const nlohmann::json& calib) {
  const DevicePeerResult& d = r.device_peers;
  const double resident = d.resident_tokens_per_second;
  nlohmann::json peers = nlohmann::json::object();
  const std::tuple<const char*, double, const std::string*> each[] = {
      {"resident", resident, &d.resident_skipped},
      {"einsum", d.einsum_tokens_per_second, &d.einsum_skipped},
      {"managed", d.managed_tokens_per_second, &d.managed_skipped}};
  for (const auto& [name, tps, skipped] : each) {
    nlohmann::json one = nlohmann::json::object();
    if (tps > 0) {
      one["tokens_per_second"] = tps;
      one["tiered_over_it"] = ratio(r.tokens_per_second, tps);
      if (std::string(name) != "resident" && resident > 0) one["over_resident"] = tps / resident;
    }
    if (!skipped->empty()) one["skipped"] = *skipped;
    if (!one.empty()) peers[name] = one;
  }
  if (d.einsum_max_error >= 0) peers["einsum"]["max_error_vs_resident"] = d.einsum_max_error;
  if (resident > 0) {
    const double nb = static_cast<double>(r.batches);
    peers["resident"]["route_ms_per_batch"] = d.route_seconds / nb * 1e3;
    peers["resident"]["host_io_ms_per_batch"] = d.host_io_seconds / nb * 1e3;
  }
  if (d.expert_kernel_seconds > 0) {
    const double nb = static_cast<double>(r.batches);
    const double bps = static_cast<double>(d.expert_kernel_bytes) / d.expert_kernel_seconds;
    nlohmann::json k = {{"ms_per_batch", d.expert_kernel_seconds / nb * 1e3},
                        {"bytes_per_batch", static_cast<double>(d.expert_kernel_bytes) / nb},
                        {"gb_per_second", bps / 1e9}};
    if (calib.contains("hbm_bandwidth")) {
      k["hbm_fraction"] = bps / calib["hbm_bandwidth"].get<double>();
    }
    peers["expert_kernel"] = k;
  }
  return peers;
}

// Look-ahead and cross-layer prediction, and the bound of issue 17: a batch is no faster than the
// slower of its all-resident compute and its disk reads at the calibrated IOPS (both from this
// run); the disk's utilization is its reads over what the calibrated IOPS could do in the time.
nlohmann::json lookahead_json(const Point& p, const nlohmann::json& calib) {
  const BenchResult& r = p.result;
  const double nb = static_cast<double>(r.batches);
  nlohmann::json j = {
      {"depth", r.lookahead},
      {"cross_layer", r.cross_layer},
      {"prefetched_per_batch", static_cast<double>(r.metrics.counter("host.prefetched")) / nb},
      {"records_read_per_batch", static_cast<double>(r.records_read()) / nb},
      {"stall_ms_per_batch", r.latency("stall").sum() / nb * 1e3}};
  if (r.predicted_of > 0) {
    j["cross_layer_recall"] = r.recall();
    j["cross_layer_precision"] =
        r.predicted > 0 ? static_cast<double>(r.predicted_used) / r.predicted : 0.0;
  }
  if (calib.contains("disk_iops_ours") && r.seconds > 0) {
    const double iops = calib["disk_iops_ours"].get<double>();
    const double disk_s = static_cast<double>(r.records_read()) / nb / iops;
    j["disk_utilization"] = static_cast<double>(r.records_read()) / (iops * r.seconds);
    j["disk_ms_per_batch_at_calibrated_iops"] = disk_s * 1e3;
    if (r.resident_tokens_per_second > 0) {
      const double resident_s = static_cast<double>(p.batch) / r.resident_tokens_per_second;
      const double bound_s = std::max(resident_s, disk_s);
      const double bound_tps = static_cast<double>(p.batch) / bound_s;
      j["resident_ms_per_batch"] = resident_s * 1e3;
      j["bound_tokens_per_second"] = bound_tps;
      j["bound_over_resident"] = bound_tps / r.resident_tokens_per_second;
      j["tokens_per_second_over_bound"] = r.tokens_per_second / bound_tps;
    }
  }
  return j;
}

// Host -> device copies' bytes per second over the run's measured batches (0 without copies).
double h2d_bytes_per_second(const Metrics& m) {
  const double s = m.real("device.copy_seconds");
  return s > 0 ? static_cast<double>(m.counter("device.bytes_copied")) / s : 0.0;
}

// Record bytes the expert kernels read per second of their time.
double compute_bytes_per_second(const Metrics& m) {
  const double s = m.real("expert_seconds");
  return s > 0 ? static_cast<double>(m.counter("record_bytes_used")) / s : 0.0;
}

nlohmann::json point_json(const Point& p, const nlohmann::json& calib) {
  const BenchResult& r = p.result;
  const Metrics& m = r.metrics;
  const double nb = static_cast<double>(r.batches);
  nlohmann::json j = {
      {"experts", p.experts},
      {"batch", p.batch},
      {"workload", p.workload.name()},
      {"host_budget_bytes", p.host_bytes},
      {"host_budget_share", static_cast<double>(p.host_bytes) / static_cast<double>(r.table_bytes)},
      {"record_dtype", r.record_dtype},
      {"record_bytes", r.record_bytes},
      {"record_stride", r.record_stride},
      {"table_bytes", r.table_bytes},
      {"host_capacity_records", r.capacity_slots},
      {"engine", r.engine},
      {"direct_io", r.direct_io},
      {"batches", r.batches},
      {"tokens_per_second", r.tokens_per_second},
      {"resident_tokens_per_second", r.resident_tokens_per_second},
      {"requested_per_batch", static_cast<double>(r.requested()) / nb},
      {"unique_per_batch", static_cast<double>(r.unique()) / nb},
      {"host_hit_rate", r.hit_rate},
      {"misses_per_batch", static_cast<double>(r.misses()) / nb},
      {"bytes_read_per_batch", static_cast<double>(r.bytes_read()) / nb},
      {"disk_iops", r.iops},
      {"compute_record_gb_per_second", compute_bytes_per_second(m) / 1e9},
      {"stages",
       {{"route", stage_json(r.latency("route"))},
        {"resolve", stage_json(r.latency("resolve"))},
        {"disk", stage_json(r.latency("disk"))},
        {"compute", stage_json(r.latency("compute"))},
        {"stall", stage_json(r.latency("stall"))},
        {"batch", stage_json(r.latency("batch"))}}},
      // Everything counted over the measured batches, as the Python side's last_stats names it,
      // with the per-batch latency histograms in seconds.
      {"metrics", m.to_json()},
  };
  j["lookahead"] = lookahead_json(p, calib);
  // The figures above are the run's over every layer (budgets: totals, split evenly).
  j["layer_count"] = r.layers.size();
  j["layers"] = nlohmann::json::array();
  for (const BenchLayerResult& l : r.layers) j["layers"].push_back(layer_json(l, r));
  if (!r.resident_skipped.empty()) j["resident_skipped"] = r.resident_skipped;
  j["backend"] = r.backend;
  if (r.device_memory) {
    j["device"] = {
        {"vram_budget_bytes", p.vram_bytes},
        {"capacity_records", r.device_capacity_slots},
        {"hit_rate", r.device_hit_rate},
        {"misses_per_batch", static_cast<double>(m.counter("device.misses")) / nb},
        {"h2d_bytes_per_batch", static_cast<double>(m.counter("device.bytes_copied")) / nb},
        {"h2d_gb_per_second", h2d_bytes_per_second(m) / 1e9},
        {"pinned", m.counter("device.pageable_batches") == 0},
        {"transfer", stage_json(r.latency("transfer"))},
        {"h2d_method", std::string(h2d_method_name(r.h2d_method))},
        {"cpu_misses_per_batch", static_cast<double>(m.counter("device.cpu_misses")) / nb},
        {"cpu_seconds_per_batch", m.real("device.cpu_seconds") / nb},
    };
    // Every method's figures over the whole run (warm-up included: --h2d auto tries them there).
    nlohmann::json methods = nlohmann::json::array();
    for (const H2dMethodTotals& t : r.h2d_methods) {
      methods.push_back({{"method", std::string(h2d_method_name(t.method))},
                         {"batches", t.batches},
                         {"record_bytes", t.bytes},
                         {"seconds", t.seconds},
                         {"gb_per_second", t.seconds > 0 ? t.bytes / t.seconds / 1e9 : 0.0}});
    }
    j["device"]["h2d_methods"] = methods;
    if (r.device_oracle_hit_rate >= 0) {
      j["device"]["cold_run_hit_rate"] = r.device_hit_rate_all;
      j["device"]["belady_hit_rate"] = r.device_oracle_hit_rate;
    }
    nlohmann::json peers = device_peers_json(r, calib);
    if (!peers.empty()) j["device"]["peers"] = std::move(peers);
  }
  if (r.oracle_hit_rate >= 0) {
    j["cold_run_hit_rate"] = r.achieved_hit_rate_all;
    j["belady_hit_rate"] = r.oracle_hit_rate;
  }
  return j;
}

// The GPU peers' lines (runtime/bench/device_peers.h), each figure beside ours or its limit.
void print_device_peers(const BenchResult& r, const nlohmann::json& calib) {
  const DevicePeerResult& d = r.device_peers;
  const double resident = d.resident_tokens_per_second;
  const char* label = "  device peers  ";
  const char* indent = "                ";
  auto line = [&](const char* name, double tps, const std::string& skipped, bool vs_resident) {
    if (tps > 0) {
      std::printf("%s%-26s %12.0f tokens/s (tiered = %.2f of it", label, name, tps,
                  ratio(r.tokens_per_second, tps));
      if (vs_resident && resident > 0) {
        std::printf("; it = %.2f of ours all-resident", tps / resident);
      }
      std::printf(")\n");
      label = indent;
    } else if (!skipped.empty()) {
      std::printf("%s%-26s skipped: %s\n", label, name, skipped.c_str());
      label = indent;
    }
  };
  if (resident == 0 && d.einsum_tokens_per_second == 0 && d.managed_tokens_per_second == 0 &&
      !d.resident_skipped.empty() && d.resident_skipped == d.einsum_skipped &&
      d.resident_skipped == d.managed_skipped) {
    std::printf("%sskipped: %s\n", label, d.resident_skipped.c_str());  // one reason for all
    return;
  }
  line("ours all-resident (direct)", resident, d.resident_skipped, false);
  if (resident > 0) {
    const double nb = static_cast<double>(r.batches);
    std::printf(
        "%s  x and y in device memory; of a batch's %.3f ms, norm + routing %.3f ms "
        "(host copies of x, routing and y around it: %.3f ms, not counted)\n",
        indent, static_cast<double>(r.tokens) / nb / resident * 1e3, d.route_seconds / nb * 1e3,
        d.host_io_seconds / nb * 1e3);
  }
  line("bf16 gather + einsum", d.einsum_tokens_per_second, d.einsum_skipped, true);
  if (d.einsum_max_error >= 0) {
    std::printf("%s  its output within %.2g of ours (max |diff| / max |y|, first batch)\n", indent,
                d.einsum_max_error);
  }
  line("managed memory (cold)", d.managed_tokens_per_second, d.managed_skipped, true);
  if (d.expert_kernel_seconds > 0) {
    const double nb = static_cast<double>(r.batches);
    const double bps = static_cast<double>(d.expert_kernel_bytes) / d.expert_kernel_seconds;
    std::printf("  expert kernel %9.3f ms/batch, %s/batch touched at least: %s",
                d.expert_kernel_seconds / nb * 1e3,
                format_bytes(static_cast<uint64_t>(static_cast<double>(d.expert_kernel_bytes) / nb))
                    .c_str(),
                format_rate(bps).c_str());
    if (calib.contains("hbm_bandwidth")) {
      const double hbm = calib["hbm_bandwidth"].get<double>();
      std::printf(" (%.2f of the calibrated HBM %s)", bps / hbm, format_rate(hbm).c_str());
    }
    std::printf("\n");
  }
}

void print_point(const Point& p, const nlohmann::json& calib) {
  const BenchResult& r = p.result;
  const PeerConfig& c = r.config;
  const size_t nl = r.layers.size();
  const std::string layers =
      nl > 1 ? str_printf(" x %zu layers", nl) : std::string();  // budgets split evenly
  const std::string tables =
      nl > 1 ? str_printf("tables %zu x %s", nl, format_bytes(r.table_bytes / nl).c_str())
             : "table " + format_bytes(r.table_bytes);
  std::printf(
      "\nexperts %s%s (D=%lld h=%lld k=%lld dk=%lld, %s records of %s, %s), batch %lld, "
      "%s, host %s (%.1f%% of the %s, %s records), %s%s\n",
      with_commas(p.experts).c_str(), layers.c_str(), (long long)c.dim, (long long)c.heads,
      (long long)c.topk, (long long)c.dim_key, r.record_dtype.c_str(),
      format_bytes(r.record_stride).c_str(), tables.c_str(), (long long)p.batch,
      p.workload.name().c_str(), budget_text(p.host_bytes, nl).c_str(),
      100.0 * static_cast<double>(p.host_bytes) / static_cast<double>(r.table_bytes),
      nl > 1 ? "tables" : "table", with_commas(r.capacity_slots).c_str(), r.engine.c_str(),
      r.direct_io ? " O_DIRECT" : "");
  std::printf("  tokens/s      %12.0f", r.tokens_per_second);
  if (r.resident_tokens_per_second > 0) {
    std::printf("   all-resident %.0f (tiered = %.2f of it)", r.resident_tokens_per_second,
                r.tokens_per_second / r.resident_tokens_per_second);
  } else if (!r.resident_skipped.empty()) {
    std::printf("   (all-resident run skipped: %s)", r.resident_skipped.c_str());
  }
  std::printf("\n");
  const double nb = static_cast<double>(r.batches);
  std::printf("  experts/batch %12.0f requested, %.0f unique (%.2f selections per expert)\n",
              static_cast<double>(r.requested()) / nb, static_cast<double>(r.unique()) / nb,
              static_cast<double>(r.requested()) / std::max<double>(1, r.unique()));
  if (r.device_memory) {
    std::printf(
        "  device        %s: %.1f%% hit of unique experts (warm), %s/batch copied host -> "
        "device at %s%s\n",
        p.vram_bytes > 0 ? ("tier " + budget_text(p.vram_bytes, nl) + " (" +
                            with_commas(r.device_capacity_slots) + " records)")
                               .c_str()
                         : "no tier (--vram), every record copied",
        100 * r.device_hit_rate,
        format_bytes(static_cast<uint64_t>(
                         static_cast<double>(r.metrics.counter("device.bytes_copied")) / nb))
            .c_str(),
        format_rate(h2d_bytes_per_second(r.metrics)).c_str(),
        r.metrics.counter("device.pageable_batches") == 0 ? "" : " (pageable: pinning failed)");
    if (calib.contains("h2d_bandwidth") && h2d_bytes_per_second(r.metrics) > 0) {
      const double h2d = calib["h2d_bandwidth"].get<double>();
      std::printf("                copies at %.2f of the calibrated H2D %s",
                  h2d_bytes_per_second(r.metrics) / h2d, format_rate(h2d).c_str());
      if (calib.contains("h2d_gather_bandwidth")) {
        std::printf(" (an SM-driven gather of these records: %s)",
                    format_rate(calib["h2d_gather_bandwidth"].get<double>()).c_str());
      }
      std::printf("\n");
    }
    std::string methods;
    for (const H2dMethodTotals& t : r.h2d_methods) {
      if (t.batches == 0) continue;
      methods += str_printf("%s%s %s (%lld batches)", methods.empty() ? "" : ", ",
                            std::string(h2d_method_name(t.method)).c_str(),
                            format_rate(t.seconds > 0 ? t.bytes / t.seconds : 0.0).c_str(),
                            (long long)t.batches);
    }
    if (!methods.empty()) {
      std::printf("                records by method: %s; kept: %s\n", methods.c_str(),
                  std::string(h2d_method_name(r.h2d_method)).c_str());
    }
    if (r.device_oracle_hit_rate >= 0) {
      std::printf(
          "                from cold %.1f%% vs Belady's %.1f%% (%.2f of the optimum)\n",
          100 * r.device_hit_rate_all, 100 * r.device_oracle_hit_rate,
          r.device_oracle_hit_rate > 0 ? r.device_hit_rate_all / r.device_oracle_hit_rate : 0.0);
    }
  }
  if (r.device_memory) print_device_peers(r, calib);
  std::printf("  host tier     %11.1f%% hit of unique experts (warm)", 100 * r.hit_rate);
  if (r.oracle_hit_rate >= 0) {
    std::printf("; from cold %.1f%% vs Belady's %.1f%% (%.2f of the optimum)",
                100 * r.achieved_hit_rate_all, 100 * r.oracle_hit_rate,
                r.oracle_hit_rate > 0 ? r.achieved_hit_rate_all / r.oracle_hit_rate : 0.0);
  }
  std::printf("\n");
  if (nl > 1) {
    for (const BenchLayerResult& l : r.layers) {
      std::printf("    %-12s host %5.1f%% hit, %.0f unique/batch", l.name.c_str(), 100 * l.hit_rate,
                  static_cast<double>(l.unique()) / nb);
      if (l.oracle_hit_rate >= 0) {
        std::printf("; from cold %.1f%% vs Belady's %.1f%%", 100 * l.achieved_hit_rate_all,
                    100 * l.oracle_hit_rate);
      }
      if (r.device_memory) {
        std::printf("; device %.1f%% hit", 100 * l.device_hit_rate);
        if (l.device_oracle_hit_rate >= 0) {
          std::printf(" (from cold %.1f%% vs Belady's %.1f%%)", 100 * l.device_hit_rate_all,
                      100 * l.device_oracle_hit_rate);
        }
      }
      std::printf("\n");
    }
  }
  std::printf("  disk          %12.0f misses/batch, %s/batch read, %.0f IOPS while busy",
              static_cast<double>(r.misses()) / nb,
              format_bytes(static_cast<uint64_t>(static_cast<double>(r.bytes_read()) / nb)).c_str(),
              r.iops);
  if (calib.contains("disk_iops_ours")) {
    std::printf(" (calibrated: ours %.0f", calib["disk_iops_ours"].get<double>());
    if (calib.contains("disk_iops_fio")) {
      std::printf(", fio %.0f", calib["disk_iops_fio"].get<double>());
    }
    std::printf(")");
  }
  std::printf("\n");
  const double gbs = compute_bytes_per_second(r.metrics);
  std::printf("  compute       %12s of records read by the expert kernels",
              format_rate(gbs).c_str());
  if (calib.contains("host_read_bandwidth")) {
    const double bw = calib["host_read_bandwidth"].get<double>();
    std::printf(" (%.2f of the host's %s)", gbs / bw, format_rate(bw).c_str());
  }
  {
    const nlohmann::json la = lookahead_json(p, calib);
    std::printf("\n  look-ahead    %12d batches%s: %.0f records/batch read ahead, %.0f read in all",
                r.lookahead, r.cross_layer ? " + cross-layer prediction" : "",
                la["prefetched_per_batch"].get<double>(),
                la["records_read_per_batch"].get<double>());
    if (la.contains("cross_layer_recall")) {
      std::printf("; prediction recall %.3f, precision %.3f",
                  la["cross_layer_recall"].get<double>(),
                  la["cross_layer_precision"].get<double>());
    }
    if (la.contains("disk_utilization")) {
      std::printf("; disk %.2f utilized", la["disk_utilization"].get<double>());
    }
    if (la.contains("bound_tokens_per_second")) {
      std::printf(
          "\n  bound         %12.0f tokens/s (max of all-resident %.1f ms and disk %.1f ms per "
          "batch; %.2f of all-resident); tiered = %.2f of the bound",
          la["bound_tokens_per_second"].get<double>(), la["resident_ms_per_batch"].get<double>(),
          la["disk_ms_per_batch_at_calibrated_iops"].get<double>(),
          la["bound_over_resident"].get<double>(),
          la["tokens_per_second_over_bound"].get<double>());
    }
  }
  std::printf("\n  stage ms            p50      p90      p99      max\n");
  for (const char* name : {"route", "resolve", "disk", "compute", "stall", "batch"}) {
    const LatencyHistogram t = r.latency(name);
    std::printf("    %-10s %9.2f %8.2f %8.2f %8.2f\n", name, t.quantile(0.5) * 1e3,
                t.quantile(0.9) * 1e3, t.quantile(0.99) * 1e3, t.quantile(1.0) * 1e3);
  }
}

// Runs the benchmark of `a`. The --json document goes to `json` when given, else to stdout
// (with --json).
int run_bench_command(const BenchArgs& a, const GlobalOptions& global, nlohmann::json* json) {
  const bool talk = !global.json && !global.quiet;
  auto fail = [](const Status& s) { return report_error("bench", s); };
  // The device first, before any store is written.
  Result<DeviceChoice> device = choose_device(a.device, a.vram, "cpu", a.h2d, a.cpu_misses);
  if (!device.ok()) return fail(device.status());
  Result<DType> dtype = parse_dtype(a.quant);
  if (!dtype.ok()) return fail(dtype.status());
  if (a.layers > 1 && a.dim_out > 0 && a.dim_out != a.dim) {
    return fail(Status::invalid_argument(str_printf(
        "--layers %lld stacks the layers on the residual stream (layer l + 1 reads x + y of "
        "layer l): --dim-out %lld must equal --dim %lld",
        (long long)a.layers, (long long)a.dim_out, (long long)a.dim)));
  }

  std::vector<int64_t> experts, batches;
  for (const auto& s : split_list(a.experts)) {
    Result<int64_t> v = parse_count("--experts", s, kMaxExperts);
    if (!v.ok()) return fail(v.status());
    const auto n = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(*v))));
    if (n * n != *v) {
      return fail(Status::invalid_argument(str_printf(
          "--experts %s = %lld is not a square (N = n_keys^2); try %lld or %lld", s.c_str(),
          (long long)*v, (long long)(n * n), (long long)((n + 1) * (n + 1)))));
    }
    experts.push_back(*v);
  }
  for (const auto& s : split_list(a.batch)) {
    Result<int64_t> v = parse_count("--batch", s, kMaxBatchTokens);
    if (!v.ok()) return fail(v.status());
    batches.push_back(*v);
  }
  std::vector<BenchWorkload> workloads;
  for (const auto& s : split_list(a.routing)) {
    Result<BenchWorkload> w = BenchWorkload::parse(s);
    if (!w.ok()) return fail(w.status());
    workloads.push_back(*w);
  }
  // Host budgets, parsed once: a size, or a share of each table (resolved per table below).
  struct HostBudget {
    std::string text;
    uint64_t bytes = 0;  // a size, or
    double share = 0;    // a share of the table
    uint64_t for_table(uint64_t table_bytes) const {
      return share > 0 ? static_cast<uint64_t>(share * static_cast<double>(table_bytes)) : bytes;
    }
  };
  std::vector<int> lookaheads;
  for (const auto& v : split_list(a.lookahead)) {
    char* end = nullptr;
    const long d = std::strtol(v.c_str(), &end, 10);
    if (*end != '\0' || d < 0 || d > kMaxLookahead) {
      return fail(Status::invalid_argument(
          str_printf("--lookahead %s: expected batch counts from 0 to %d, e.g. 0,2", v.c_str(),
                     kMaxLookahead)));
    }
    lookaheads.push_back(static_cast<int>(d));
  }
  std::vector<bool> cross_layers;
  for (const auto& v : split_list(a.cross_layer)) {
    if (v != "0" && v != "1") {
      return fail(Status::invalid_argument("--cross-layer " + v + ": expected 0, 1 or 0,1"));
    }
    cross_layers.push_back(v == "1");
  }
  std::vector<HostBudget> hosts;
  for (const std::string& h : split_list(a.host)) {
    HostBudget budget{h};
    if (h.back() == '%') {
      char* end = nullptr;
      budget.share = std::strtod(h.c_str(), &end) / 100.0;
      if (end != h.c_str() + h.size() - 1 || !(budget.share > 0 && budget.share <= 1)) {
        return fail(Status::invalid_argument("--host " + h + ": a share must be in (0%, 100%]"));
      }
    } else if (Result<uint64_t> b = parse_bytes(h); b.ok() && *b > 0) {
      budget.bytes = *b;
    } else {
      return fail(Status::invalid_argument(
          "--host " + h + ": expected a size such as 2GiB or a share of the table such as 10%"));
    }
    hosts.push_back(budget);
  }
  if (experts.empty() || batches.empty() || workloads.empty() || hosts.empty()) {
    return fail(Status::invalid_argument("--experts, --batch, --routing and --host need a value"));
  }

  // Where the stores live: --store (kept, reused by later runs) or a scratch folder.
  std::string dir = a.store;
  bool scratch = false;
  if (dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp != nullptr ? tmp : "/var/tmp") + "/trove-bench-XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) {
      return fail(Status::from_errno("creating a scratch folder " + templ, errno));
    }
    dir = templ;
    scratch = true;
  } else {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return fail(Status::io_error("--store " + dir + ": " + ec.message()));
  }
  struct Cleanup {
    std::string dir;
    bool active;
    ~Cleanup() {
      std::error_code ec;
      if (active) std::filesystem::remove_all(dir, ec);
    }
  } cleanup{dir, scratch};

  const TieredSourceOptions tier = tier_options(a.tier, 0);  // budgets per point below
  const RecordReaderOptions& io = tier.io;

  nlohmann::json calib = nlohmann::json::object();
  // One machine limit: "calibrating <label> ..." first, then its figure under calib[key], or a
  // warning saying why it is missing (the run goes on without that comparison).
  auto calibrate = [&](const char* label, const char* key,
                       const std::function<Result<double>()>& measure) {
    if (talk) {
      std::printf("calibrating %s ...\n", label);
      std::fflush(stdout);
    }
    Result<double> r = measure();
    if (r.ok()) {
      calib[key] = *r;
    } else if (talk) {
      std::fprintf(stderr, "trove bench: warning: %s\n", r.status().to_string().c_str());
    }
  };
  if (!a.no_calibrate) {
    // 1 GiB is well past any last-level cache; a quick calibration makes do with 256 MiB.
    const uint64_t bw_bytes = a.calibrate_seconds >= 0.5 ? uint64_t{1} << 30 : uint64_t{256} << 20;
    const double seconds = a.calibrate_seconds / 2;
    calibrate("host memory bandwidth", "host_read_bandwidth",
              [&] { return measure_host_read_bandwidth(bw_bytes, a.threads, seconds); });
    if (peer_backend_traits(device->backend).device_memory) {
      calibrate("host -> device bandwidth", "h2d_bandwidth",
                [&] { return measure_h2d_bandwidth(bw_bytes, seconds); });
      // The SM-driven ceiling at this run's record size (the --h2d gather method's).
      const Result<RecordLayout> rl =
          RecordLayout::make(*dtype, a.dim, a.dim_out > 0 ? a.dim_out : a.dim);
      calibrate("host -> device bandwidth of an SM-driven gather", "h2d_gather_bandwidth", [&] {
        return rl.ok() ? measure_h2d_gather_bandwidth(bw_bytes, rl->record_bytes, seconds)
                       : Result<double>(rl.status());
      });
      if (calib.contains("h2d_gather_bandwidth"))
        calib["h2d_gather_record_bytes"] = rl->record_bytes;
      // The fused expert kernel's limit (SPEC §8: H100 HBM3 3.35 TB/s): read + write bytes/s.
      calibrate("device memory bandwidth", "hbm_bandwidth",
                [&] { return measure_hbm_bandwidth(bw_bytes, seconds); });
    }
  }

  std::vector<Point> points;
  for (int64_t n : experts) {
    PeerConfig c;
    c.dim = a.dim;
    c.dim_out = a.dim_out > 0 ? a.dim_out : a.dim;
    c.heads = a.heads;
    c.n_keys = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
    c.dim_key = a.dim_key;
    c.topk = a.topk;
    c.topk_per_half = a.topk_per_half > 0 ? a.topk_per_half : a.topk;
    c.activation = Activation::kSilu;
    c.gate = Gate::kRelu;
    Result<std::string> path = ensure_store(a, dir, n, c, *dtype, talk);
    if (!path.ok()) return fail(path.status());

    // The disk's limit at this record size and queue depth: our reader alone, and fio.
    Result<StoreReader> store = StoreReader::open(*path);
    if (!store.ok()) return fail(store.status());
    const StoreLayerInfo& table = store->layers()[0];
    // A share of --host is a share of the tables of every layer run.
    const uint64_t tables_bytes = table.table.bytes * static_cast<uint64_t>(a.layers);
    nlohmann::json disk = nlohmann::json::object();
    if (!a.no_calibrate) {
      Result<DiskCalibration> ours = measure_disk_iops(
          *path, table.table.offset, table.table.bytes, static_cast<uint32_t>(table.table.stride),
          table.table.stride, a.tier.queue_depth, io.engine, a.calibrate_seconds);
      if (ours.ok()) {
        disk["disk_iops_ours"] = ours->iops;
        disk["disk_ours"] = {{"iops", ours->iops},
                             {"engine", ours->engine},
                             {"direct_io", ours->direct_io},
                             {"queue_depth", ours->queue_depth},
                             {"block_bytes", table.table.stride},
                             {"direct_alignment", ours->direct_alignment},
                             {"read_amplification", ours->read_amplification},
                             {"latency_p50_us", ours->latency_p50_us},
                             {"latency_p99_us", ours->latency_p99_us}};
      } else if (talk) {
        std::printf("  (disk calibration failed: %s)\n", ours.status().to_string().c_str());
      }
      if (!a.no_fio) {
        // fio makes the requests our reader makes: each record's extent at our O_DIRECT
        // alignment, at offsets aligned alike (runtime/bench/calibrate.h: FioOptions).
        FioOptions fo;
        fo.direct = true;
        if (ours.ok() && ours->direct_io) fo.alignment = ours->direct_alignment;
        fo.record_stride = table.table.stride;
        Result<FioResult> fio = run_fio_randread(*path, table.table.offset, table.table.bytes,
                                                 static_cast<uint32_t>(table.table.stride),
                                                 a.tier.queue_depth, fo, a.calibrate_seconds);
        if (fio.ok()) {
          disk["disk_iops_fio"] = fio->iops;
          disk["disk_fio"] = {{"iops", fio->iops},
                              {"engine", fio->engine},
                              {"block_bytes", fio->block_bytes},
                              {"block_split", fio->block_split},
                              {"command", fio->command_line},
                              {"latency_p50_us", fio->clat_p50_us},
                              {"latency_p99_us", fio->clat_p99_us}};
          if (disk.contains("disk_iops_ours") && fio->iops > 0) {
            disk["ours_over_fio"] = disk["disk_iops_ours"].get<double>() / fio->iops;
          }
        } else if (talk) {
          std::printf("  (fio peer skipped: %s)\n", fio.status().message().c_str());
        }
      }
      if (talk && disk.contains("disk_iops_ours")) {
        std::printf("disk limit at %s reads, queue depth %d: ours %.0f IOPS (%s%s)",
                    format_bytes(table.table.stride).c_str(), a.tier.queue_depth,
                    disk["disk_iops_ours"].get<double>(),
                    disk["disk_ours"]["engine"].get<std::string>().c_str(),
                    disk["disk_ours"]["direct_io"].get<bool>() ? ", O_DIRECT" : ", page cache");
        if (disk.contains("disk_iops_fio")) {
          const std::string split = disk["disk_fio"]["block_split"].get<std::string>();
          std::printf(", fio %.0f IOPS on the same requests (%s) (ours = %.2f of fio)",
                      disk["disk_iops_fio"].get<double>(),
                      split.empty()
                          ? format_bytes(disk["disk_fio"]["block_bytes"].get<uint64_t>()).c_str()
                          : split.c_str(),
                      disk["ours_over_fio"].get<double>());
        }
        std::printf("\n");
        std::fflush(stdout);
      }
    }
    // This table's disk figures replace the previous table's, so a calibration that failed
    // here never shows another table's numbers beside this one's points.
    for (const char* key :
         {"disk_iops_ours", "disk_ours", "disk_iops_fio", "disk_fio", "ours_over_fio"}) {
      calib.erase(key);
    }
    for (auto it = disk.begin(); it != disk.end(); ++it) calib[it.key()] = it.value();

    for (int64_t batch : batches) {
      for (const BenchWorkload& w : workloads) {
        for (const HostBudget& h : hosts) {
          for (int depth : lookaheads) {
            for (bool cross : cross_layers) {
              Point p;
              p.lookahead = depth;
              p.cross_layer = cross;
              p.experts = n;
              p.batch = batch;
              p.workload = w;
              p.host = h.text;
              p.host_bytes = h.for_table(tables_bytes);
              BenchOptions o;
              o.store = *path;
              o.layers = a.layers;
              o.workload = w;
              o.batch = batch;
              o.batches = a.batches;
              o.warmup_batches = a.warmup;
              o.host_budget_bytes = p.host_bytes;
              o.policy = tier.policy;
              o.io = io;
              o.resident_baseline = !a.no_resident;
              o.threads = a.threads;
              o.backend = device->backend;
              o.vram_budget_bytes = device->vram_budget_bytes;
              o.h2d = device->h2d;
              o.cpu_misses = a.cpu_misses;
              p.vram_bytes = device->vram_budget_bytes;
              o.seed = a.seed;
              o.lookahead = depth;
              o.cross_layer = cross;
              std::unique_ptr<ProgressBar> bar;
              if (talk) {
                bar = std::make_unique<ProgressBar>(
                    str_printf("N=%s batch=%lld %s host=%s", with_commas(n).c_str(),
                               (long long)batch, w.name().c_str(), h.text.c_str()),
                    static_cast<uint64_t>(a.warmup + a.batches));
                o.progress = [&bar](int64_t done, int64_t) {
                  bar->update(static_cast<uint64_t>(done));
                };
              }
              Result<BenchResult> r = run_bench(o);
              if (bar) bar->finish();
              if (!r.ok()) return fail(r.status());
              p.result = std::move(r).value();
              p.disk = disk;
              if (talk) {
                print_point(p, calib);
                std::fflush(stdout);
              }
              points.push_back(std::move(p));
            }
          }
        }
      }
    }
  }

  // The sweep: tokens/s against whichever of experts, batch and host budget took several values.
  if (!a.plot.empty() && points.size() > 1) {
    PlotSpec plot;
    plot.title = "trove bench: " + workloads[0].name();
    plot.y_label = "tokens/s";
    auto x_of = [&](const Point& p) -> double {
      if (experts.size() > 1) return static_cast<double>(p.experts);
      if (batches.size() > 1) return static_cast<double>(p.batch);
      return static_cast<double>(p.host_bytes) / static_cast<double>(p.result.table_bytes) * 100;
    };
    plot.x_label = experts.size() > 1   ? "experts"
                   : batches.size() > 1 ? "batch (tokens)"
                                        : "host budget (% of table)";
    plot.log_x = experts.size() > 1 || batches.size() > 1;
    // One pair of curves (tiered, all-resident) per combination of the other swept values, so
    // a two-way sweep draws a family of curves rather than a zigzag.
    auto series_of = [&](const Point& p) {
      std::string name = p.workload.name();
      if (experts.size() > 1 && batches.size() > 1) name += " batch " + std::to_string(p.batch);
      if ((experts.size() > 1 || batches.size() > 1) && hosts.size() > 1) name += " host " + p.host;
      return name;
    };
    std::vector<std::string> names;
    for (const Point& p : points) {
      if (std::find(names.begin(), names.end(), series_of(p)) == names.end()) {
        names.push_back(series_of(p));
      }
    }
    for (const std::string& name : names) {
      PlotSeries tiered{"tiered " + name, {}, {}}, resident{"all-resident " + name, {}, {}};
      for (const Point& p : points) {
        if (series_of(p) != name) continue;
        tiered.x.push_back(x_of(p));
        tiered.y.push_back(p.result.tokens_per_second);
        if (p.result.resident_tokens_per_second > 0) {
          resident.x.push_back(x_of(p));
          resident.y.push_back(p.result.resident_tokens_per_second);
        }
      }
      plot.series.push_back(tiered);
      if (!resident.x.empty()) plot.series.push_back(resident);
    }
    const Status s = write_plot_png(a.plot, plot);
    if (!s.ok()) return fail(s);
    if (talk) std::printf("\nplot: %s\n", a.plot.c_str());
  } else if (!a.plot.empty() && talk) {
    std::printf(
        "\n(no plot: --plot draws a sweep; give several values to --experts, --batch or "
        "--host)\n");
  }

  nlohmann::json j = {{"calibration", calib}, {"points", nlohmann::json::array()}};
  for (const Point& p : points) {
    j["points"].push_back(point_json(p, calib));
    j["points"].back()["disk_calibration"] = p.disk;  // the table's own (calibration: the last)
  }
  if (!a.plot.empty() && points.size() > 1) j["plot"] = a.plot;
  if (json != nullptr) {
    *json = std::move(j);
  } else if (global.json) {
    print_json(j);
  }
  return kExitOk;
}

}  // namespace

int run_demo_bench(const std::string& dir, const std::string& experts, int64_t dim,
                   const GlobalOptions& global, nlohmann::json* json) {
  BenchArgs a;
  a.experts = experts;
  a.dim = dim;
  a.heads = 4;
  a.topk = 8;
  a.dim_key = 32;
  a.host = "10%";
  a.routing = "zipf:1.09";
  a.store = dir;
  a.batches = 24;
  a.warmup = 8;
  a.calibrate_seconds = 1.0;
  // The largest power-of-two batch (up to 512 tokens) whose worst case, every selection a
  // different expert, fits the 10% budget.
  Result<int64_t> n = parse_count("--bench-experts", experts, kMaxExperts);
  if (!n.ok()) return report_error("demo", n.status());
  int64_t batch = 512;
  while (batch > 1 && batch * a.heads * a.topk > *n / 10) batch /= 2;
  a.batch = std::to_string(batch);
  if (!global.json && !global.quiet) {
    std::printf(
        "\n7. trove bench --experts %s --dim %lld --dim-key 32 --batch %lld --routing zipf:1.09 "
        "--host 10%% --store %s\n   (the layer from disk through a host budget of a tenth of its "
        "table)\n",
        experts.c_str(), static_cast<long long>(dim), static_cast<long long>(batch), dir.c_str());
    std::fflush(stdout);
  }
  return run_bench_command(a, global, json);
}

void add_bench(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "bench",
      "Benchmark a PEER layer over the tiered store: a synthetic table of --experts records in\n"
      "--store, run batch after batch through a --host budget with routing from --routing, with\n"
      "per-tier hit rates, bytes, IOPS and per-stage latency percentiles, each beside the limit\n"
      "measured in the same run (host memory bandwidth; disk IOPS of our reader and of fio at\n"
      "the record size and queue depth), the all-resident run and Belady's optimal hit rate.\n"
      "With --device cuda, also H2D and HBM bandwidth and the GPU peers on the same batches:\n"
      "ours all-resident, a bf16 gather + einsum table, managed memory, and the expert kernel's\n"
      "bytes/s against HBM.\n"
      "--experts, --batch, --host and --routing take comma lists: the run sweeps their product.\n"
      "--layers N stacks N such layers on the residual stream (each reads x + y of the one\n"
      "before); --host and --vram are then the run's totals, split evenly over the layers.\n"
      "Example: trove bench --experts 4M --dim 2048 --heads 4 --topk 8 --routing zipf:1.09 \\\n"
      "           --batch 2048 --host 2GiB --store /nvme/bench\n"
      "Two layers under a 16 GiB device tier (8 GiB each):\n"
      "  trove bench --device cuda --experts 4M --dim 2048 --layers 2 --quant int4 \\\n"
      "           --routing zipf:1.09 --vram 16GiB --host 48GiB --store /nvme/bench");
  auto a = std::make_shared<BenchArgs>();
  cmd->add_option("--experts", a->experts,
                  "Experts N (a square: 1M, 4M, 262144, ...); a list sweeps")
      ->capture_default_str();
  // Negative sizes are refused here: 0 means "the default" for --dim-out and --topk-per-half,
  // and a negative value would otherwise pass for it.
  cmd->add_option("--dim", a->dim, "Model dimension D")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--dim-out", a->dim_out, "Output dimension (default: D)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--heads", a->heads, "Heads h")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--topk", a->topk, "Experts per head k")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--topk-per-half", a->topk_per_half, "Sub-keys per half k' (default: k)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--dim-key", a->dim_key, "Sub-key dimension")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--quant", a->quant, "Record dtype: int4, int8, bf16, f16 or f32")
      ->check(CLI::IsMember({"int4", "int8", "bf16", "f16", "f32"}))
      ->capture_default_str();
  cmd->add_option("--routing", a->routing,
                  "Workload: uniform, zipf:A, pk (product-key routing of gaussian tokens) or\n"
                  "trace:FILE (a `trove forward --dump-routing` file); a list sweeps")
      ->capture_default_str();
  cmd->add_option("--batch", a->batch, "Tokens per batch; a list sweeps")->capture_default_str();
  cmd->add_option("--host", a->host,
                  "Host budget for records: a size (2GiB) or a share of the table (10%); a list\n"
                  "sweeps. With --layers N: the total of the N layers' tables, N x (budget / N)")
      ->capture_default_str();
  cmd->add_option(
         "--lookahead", a->lookahead,
         "Batches the first layer routes and prefetches ahead of the one computing, their\n"
         "missing records read while it computes (0: none); a list (0,2) sweeps on the\n"
         "same batches")
      ->capture_default_str();
  cmd->add_option("--cross-layer", a->cross_layer,
                  "1: with --routing pk and --layers > 1, each later layer's router runs on the\n"
                  "input of the layer before, and what it picks is read while that layer\n"
                  "computes (recall reported); 0,1 sweeps")
      ->capture_default_str();
  cmd->add_option("--layers", a->layers,
                  "PEER layers stacked on the residual stream (bench, bench.1, ...), each with\n"
                  "its own table, tiers and routing stream (needs --dim-out = --dim); --host and\n"
                  "--vram are split evenly over them; tokens/s counts a token once through all")
      ->check(CLI::Range(int64_t{1}, int64_t{1024}))
      ->capture_default_str();
  add_tier_flags(cmd, &a->tier);
  cmd->add_option("--device", a->device,
                  "cpu, or cuda: the layer on the CUDA device, records through a device tier\n"
                  "of --vram bytes above the host tier (without --vram: copied per batch)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--vram", a->vram,
                  "With --device cuda: the device tier's budget (e.g. 16GiB); with --layers N,\n"
                  "the total, N x (budget / N)")
      ->check(valid_bytes);
  add_h2d_flag(cmd, &a->h2d);
  add_cpu_misses_flag(cmd, &a->cpu_misses);
  cmd->add_option(
      "--store", a->store,
      "Folder for the synthetic stores (kept and reused by later runs; put it on the\n"
      "disk to measure). Default: a scratch folder in $TMPDIR (else /var/tmp), removed afterwards");
  cmd->add_option("--batches", a->batches, "Measured batches per point")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20))
      ->capture_default_str();
  cmd->add_option("--warmup", a->warmup, "Batches run before measuring (the host tier fills)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20))
      ->capture_default_str();
  cmd->add_option("--threads", a->threads, "Compute threads (0: all cores)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--calibrate-seconds", a->calibrate_seconds,
                  "Seconds for each calibration (host bandwidth, our disk IOPS, fio)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_flag("--no-resident", a->no_resident,
                "Skip the all-resident comparison run (and, with --device cuda, the GPU peers)");
  cmd->add_flag("--no-calibrate", a->no_calibrate, "Skip the calibrations (and fio)");
  cmd->add_flag("--no-fio", a->no_fio, "Skip the fio peer");
  cmd->add_option("--plot", a->plot, "Write the sweep's tokens/s curve to this PNG file");
  cmd->add_option("--seed", a->seed, "Workload seed")->capture_default_str();
  cmd->callback([a, &global] { global.exit_code = run_bench_command(*a, global, nullptr); });
}

}  // namespace trove::cli
