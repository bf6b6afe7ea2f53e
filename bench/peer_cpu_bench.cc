// One stored PEER layer on the CPU, stage by stage, beside the machine's streaming read
// bandwidth measured in the same process: the trove half of bench/cpu_vs_torch.py, which runs
// the background's PyTorch module on the same weights and tokens in the same run.
//
//   peer_cpu_bench STORE LAYER INPUT.safetensors [--repeats R] [--threads N] [--y-out FILE]
//                  [--modes NAME,NAME...]
//
// INPUT holds 'x' [T, D]. Each mode (ExpertDot::kFloat, and kInt8 on int8/int4 records; each with
// fp32 and with bf16 routing, RoutingPrecision) runs R + 1 forward passes of the whole batch
// through PeerLayer (the first warms the mapped table and oneDNN's kernels and is not counted); the
// fastest pass counts, and its stages (route, acquire, experts) are reported. The expert stage's
// record bytes / expert seconds is compared with measure_host_read_bandwidth over 1 GiB and
// with measure_host_record_read_bandwidth (the same number of records of the layer's stride read
// at random from a table of its size, nothing computed: the stage's own ceiling), all three on
// the same threads (runtime/bench/calibrate.h). Errors of y against the oracle (the _ref
// kernels, double accumulation) on the same routing: relative Frobenius norm and max |error| / max
// |y|. --y-out writes y of kFloat as safetensors 'y', for the driver's check that trove and PyTorch
// compute the same layer. The bf16-routing modes also report the fraction of fp32 routing's
// selected experts they select (routing_agreement_vs_f32) and, with the float dot, y's error
// against fp32 routing's y. --modes runs only the named modes (for a profiler; the comparisons
// with fp32 routing need "float" among them). Prints one JSON object.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/thread_pool.h"
#include "kernels/cpu/quant.h"
#include "runtime/bench/calibrate.h"
#include "runtime/layer/peer_layer.h"
#include "storage/safetensors.h"
#include "storage/store.h"

namespace trove {
namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "peer_cpu_bench: %s\n", what.c_str());
  std::exit(1);
}

template <typename T>
T value_or_die(Result<T> r, const std::string& what) {
  if (!r.ok()) die(what + ": " + r.status().to_string());
  return std::move(*r);
}

void ok_or_die(const Status& s, const std::string& what) {
  if (!s.ok()) die(what + ": " + s.to_string());
}

struct Errors {
  double rel_fro = 0, max_rel = 0;
};

Errors errors(const std::vector<float>& got, const std::vector<float>& want) {
  double err2 = 0, ref2 = 0, max_err = 0, max_ref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = static_cast<double>(got[i]) - want[i];
    err2 += e * e;
    ref2 += static_cast<double>(want[i]) * want[i];
    max_err = std::max(max_err, std::abs(e));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(want[i])));
  }
  return {ref2 > 0 ? std::sqrt(err2 / ref2) : 0.0, max_ref > 0 ? max_err / max_ref : 0.0};
}

int run(int argc, char** argv) {
  if (argc < 4) {
    die("usage: peer_cpu_bench STORE LAYER INPUT.safetensors [--repeats R] [--threads N] "
        "[--y-out FILE] [--modes NAME,NAME...]");
  }
  const std::string store_path = argv[1], layer_name = argv[2], input_path = argv[3];
  int repeats = 5, threads = 0;
  std::string y_out, only_modes;
  for (int i = 4; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--repeats") {
      repeats = std::atoi(argv[i + 1]);
    } else if (flag == "--threads") {
      threads = std::atoi(argv[i + 1]);
    } else if (flag == "--y-out") {
      y_out = argv[i + 1];
    } else if (flag == "--modes") {
      only_modes = "," + std::string(argv[i + 1]) + ",";
    } else {
      die("unknown flag " + flag);
    }
  }
  const StoreReader store = value_or_die(StoreReader::open(store_path), store_path);
  const SafetensorsFile input = value_or_die(SafetensorsFile::open(input_path), input_path);
  const std::vector<float> x = value_or_die(input.read_f32("x"), input_path);

  PeerLayerOptions options;
  options.threads = threads;
  PeerLayer layer = value_or_die(PeerLayer::open(store, layer_name, options), layer_name);
  const PeerConfig config = layer.config();
  const RecordLayout layout = layer.record_layout();
  const int64_t T = static_cast<int64_t>(x.size()) / config.dim;
  if (T * config.dim != static_cast<int64_t>(x.size())) die("x is not [T, D]");

  nlohmann::json report = {
      {"store", store_path},
      {"layer", layer_name},
      {"tokens", T},
      {"dim", config.dim},
      {"experts", config.num_experts()},
      {"record_dtype", std::string(dtype_name(layout.dtype))},
      {"record_bytes", layout.record_bytes},
      {"threads", resolve_thread_count(threads)},
      {"cpu_path", cpu_path_name(active_cpu_path())},
  };

  // The oracle's y on its own routing, which the modes then replay.
  PeerLayerOptions ref_options = options;
  ref_options.backend = PeerBackend::kRef;
  PeerLayer ref_layer =
      value_or_die(PeerLayer::open(store, layer_name, ref_options), layer_name + " (ref)");
  std::vector<float> y_ref(static_cast<size_t>(T * config.dim_out));
  PeerRouting ref_routing;
  ok_or_die(ref_layer.forward(x, T, y_ref, &ref_routing), "ref forward");

  struct Mode {
    const char* name;
    ExpertDot dot;
    RoutingPrecision routing;
  };
  std::vector<Mode> modes = {{"float", ExpertDot::kFloat, RoutingPrecision::kF32}};
  if (dtype_is_quantized(layout.dtype)) {
    modes.push_back({"int8", ExpertDot::kInt8, RoutingPrecision::kF32});
  }
  modes.push_back({"bf16_routing", ExpertDot::kFloat, RoutingPrecision::kBf16});
  if (dtype_is_quantized(layout.dtype)) {
    modes.push_back({"int8_bf16_routing", ExpertDot::kInt8, RoutingPrecision::kBf16});
  }
  modes.push_back({"int8_routing", ExpertDot::kFloat, RoutingPrecision::kInt8});
  if (dtype_is_quantized(layout.dtype)) {
    modes.push_back({"int8_int8_routing", ExpertDot::kInt8, RoutingPrecision::kInt8});
  }
  if (!only_modes.empty()) {
    std::erase_if(modes, [&](const Mode& m) {
      return only_modes.find("," + std::string(m.name) + ",") == std::string::npos;
    });
    if (modes.empty()) die("--modes names none of this store's modes");
  }
  // The fp32-routing mode's routing and y, which the bf16-routing modes are compared with.
  PeerRouting f32_routing;
  std::vector<float> f32_y;
  for (const Mode& mode : modes) {
    options.cpu.expert_dot = mode.dot;
    options.cpu.routing_precision = mode.routing;
    layer = value_or_die(PeerLayer::open(store, layer_name, options), layer_name);
    std::vector<float> y(static_cast<size_t>(T * config.dim_out));
    PeerRouting routing;
    PeerBatchStats best;
    double best_seconds = 1e30;
    for (int r = 0; r <= repeats; ++r) {
      PeerBatchStats stats;
      const auto start = std::chrono::steady_clock::now();
      ok_or_die(layer.forward(x, T, y, r == 0 ? &routing : nullptr, &stats), "forward");
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (r > 0 && seconds < best_seconds) {
        best_seconds = seconds;
        best = stats;
      }
    }
    std::vector<float> y_routed(y.size());
    ok_or_die(layer.forward_routed(x, T, ref_routing, y_routed), "forward_routed");
    const Errors e = errors(y_routed, y_ref);
    const char* name = mode.name;
    if (mode.dot == ExpertDot::kFloat && mode.routing == RoutingPrecision::kF32) {
      f32_routing = routing;
      f32_y = y;
    }
    report["modes"][name] = {
        {"seconds", best_seconds},
        {"tokens_per_second", static_cast<double>(T) / best_seconds},
        {"route_seconds", best.route_seconds},
        {"acquire_seconds", best.acquire_seconds},
        {"expert_seconds", best.expert_seconds},
        {"route_share", best.route_seconds / best_seconds},
        {"record_bytes_used", best.record_bytes_used},
        {"unique_experts", best.unique_experts},
        {"expert_bytes_per_second",
         static_cast<double>(best.record_bytes_used) / std::max(best.expert_seconds, 1e-12)},
        {"y_rel_fro_vs_oracle", e.rel_fro},
        {"y_max_rel_vs_oracle", e.max_rel},
    };
    if (mode.routing != RoutingPrecision::kF32 && !f32_routing.ids.empty()) {
      // Of the experts fp32 routing selects for each (token, head), the fraction this routing
      // selects too; y of the whole forward against fp32 routing's (same expert dot only).
      int64_t kept = 0;
      const int64_t k = config.topk;
      for (size_t base = 0; base < routing.ids.size(); base += static_cast<size_t>(k)) {
        for (int64_t s = 0; s < k; ++s) {
          const int64_t id = f32_routing.ids[base + static_cast<size_t>(s)];
          for (int64_t u = 0; u < k; ++u) kept += routing.ids[base + static_cast<size_t>(u)] == id;
        }
      }
      report["modes"][name]["routing_agreement_vs_f32"] =
          static_cast<double>(kept) / static_cast<double>(routing.ids.size());
      if (mode.dot == ExpertDot::kFloat) {
        report["modes"][name]["y_rel_fro_vs_f32_routing"] = errors(y, f32_y).rel_fro;
      }
    }
    if (mode.dot == ExpertDot::kFloat && mode.routing == RoutingPrecision::kF32 && !y_out.empty()) {
      const std::vector<int64_t> shape = {T, config.dim_out};
      ok_or_die(
          write_safetensors(y_out,
                            {{"y", StDType::kF32, shape,
                              std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(y.data()),
                                                       y.size() * sizeof(float)),
                              nullptr}},
                            {}),
          y_out);
    }
  }
  // Streaming read bandwidth last, on the same threads: its 1 GiB does not evict the table
  // between the passes above.
  report["stream_read_bytes_per_second"] =
      value_or_die(measure_host_read_bandwidth(uint64_t{1} << 30, threads, 1.0), "read bandwidth");
  // The expert stage's own ceiling: a table of this layer's size read as whole records at random,
  // one per (token, head, slot), with nothing computed.
  report["record_read_bytes_per_second"] =
      value_or_die(measure_host_record_read_bandwidth(
                       layout.stride, static_cast<uint64_t>(config.num_experts()),
                       static_cast<uint64_t>(T * config.heads * config.topk), threads, 1.0),
                   "record read bandwidth");
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}

}  // namespace
}  // namespace trove

int main(int argc, char** argv) {
  return trove::run(argc, argv);
}
