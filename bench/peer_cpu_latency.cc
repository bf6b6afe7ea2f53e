// Per-call latency of one stored PEER layer on the CPU at small batches (decoding), per routing
// precision, with the records resident: each batch size runs the same tokens --calls times after
// one warm-up call, so the records are read once and the figure is the layer's own work.
//
//   peer_cpu_latency STORE LAYER [--calls N] [--threads N] [--dot float|int8]
//
// Prints one JSON object: {"latency_us": {"f32": {"1": us, ...}, "bf16": ..., "int8": ...}}, the
// best call of each.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/random.h"
#include "runtime/layer/peer_layer.h"
#include "storage/store.h"

namespace trove {
namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "peer_cpu_latency: %s\n", what.c_str());
  std::exit(1);
}

int run(int argc, char** argv) {
  if (argc < 3)
    die("usage: peer_cpu_latency STORE LAYER [--calls N] [--threads N] [--dot float|int8]");
  int calls = 30, threads = 2;
  ExpertDot dot = ExpertDot::kInt8;
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--calls") {
      calls = std::atoi(value.c_str());
    } else if (flag == "--threads") {
      threads = std::atoi(value.c_str());
    } else if (flag == "--dot" && (value == "float" || value == "int8")) {
      dot = value == "float" ? ExpertDot::kFloat : ExpertDot::kInt8;
    } else {
      die("unknown flag or value: " + flag + " " + value);
    }
  }
  if (calls < 1) die("--calls must be >= 1");
  Result<StoreReader> store = StoreReader::open(argv[1]);
  if (!store.ok()) die(store.status().to_string());
  nlohmann::json report;
  const struct {
    const char* name;
    RoutingPrecision precision;
  } modes[] = {{"f32", RoutingPrecision::kF32},
               {"bf16", RoutingPrecision::kBf16},
               {"int8", RoutingPrecision::kInt8}};
  for (const auto& mode : modes) {
    PeerLayerOptions options{PeerBackend::kCpu, threads};
    options.cpu.routing_precision = mode.precision;
    options.cpu.expert_dot = dot;
    Result<PeerLayer> layer = PeerLayer::open(*store, argv[2], options);
    if (!layer.ok()) die(layer.status().to_string());
    const int64_t D = layer->config().dim, D_out = layer->config().dim_out;
    for (const int64_t T : {1, 4, 16, 64}) {
      std::vector<float> x(static_cast<size_t>(T * D)), y(static_cast<size_t>(T * D_out));
      fill_gaussian(x, 1.0, 5);
      double best = 1e30;
      for (int i = 0; i <= calls; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        const Status s = layer->forward(x, T, y);
        const double us =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
                .count();
        if (!s.ok()) die(s.to_string());
        if (i > 0) best = std::min(best, us);  // call 0 reads the records
      }
      report["latency_us"][mode.name][std::to_string(T)] = best;
    }
  }
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}

}  // namespace
}  // namespace trove

int main(int argc, char** argv) {
  return trove::run(argc, argv);
}
