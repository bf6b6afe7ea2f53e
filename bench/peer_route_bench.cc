// The CPU router alone: the query projection (peer_query) and the route step (peer_route: sub-key
// scores, top-k' per half, merge of the halves, gates) on gaussian weights and tokens, with the
// router weights prepared once as the CPU executor does. Best of R passes each; the query's rate
// counts its 2 T D (h 2 dk) operations. For comparing kernels of the routing step without a store.
//
//   peer_route_bench [--dim D] [--keys n] [--heads h] [--dim-key dk] [--topk k] [--tokens T]
//                    [--routing f32|bf16|int8] [--repeats R] [--threads N]
//
// Defaults: D 2048, n 512 (262K experts), h 4, dk 64, k 8, T 2048, f32, R 10, all cores. Prints
// one JSON object.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/random.h"
#include "base/thread_pool.h"
#include "kernels/cpu/peer.h"
#include "kernels/cpu/quant.h"

namespace trove {
namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "peer_route_bench: %s\n", what.c_str());
  std::exit(1);
}

int64_t positive(const char* flag, const char* value) {
  const long long v = std::atoll(value);
  if (v <= 0) die(std::string(flag) + " must be a positive integer, not '" + value + "'");
  return v;
}

int run(int argc, char** argv) {
  PeerConfig c;
  c.dim = 2048;
  c.n_keys = 512;
  c.heads = 4;
  c.dim_key = 64;
  c.topk = 8;
  c.activation = Activation::kSilu;
  c.gate = Gate::kRelu;
  int64_t T = 2048, repeats = 10, threads = 0;
  std::string routing = "f32";
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) die(flag + " needs a value");
    const char* v = argv[i + 1];
    if (flag == "--dim") {
      c.dim = positive(argv[i], v);
    } else if (flag == "--keys") {
      c.n_keys = positive(argv[i], v);
    } else if (flag == "--heads") {
      c.heads = positive(argv[i], v);
    } else if (flag == "--dim-key") {
      c.dim_key = positive(argv[i], v);
    } else if (flag == "--topk") {
      c.topk = positive(argv[i], v);
    } else if (flag == "--tokens") {
      T = positive(argv[i], v);
    } else if (flag == "--repeats") {
      repeats = positive(argv[i], v);
    } else if (flag == "--threads") {
      threads = std::atoll(v);
      if (threads < 0) die("--threads must be >= 0 (0: every core)");
    } else if (flag == "--routing") {
      routing = v;
    } else {
      die("unknown flag " + flag);
    }
  }
  RoutingPrecision precision;
  if (routing == "f32") {
    precision = RoutingPrecision::kF32;
  } else if (routing == "bf16") {
    precision = RoutingPrecision::kBf16;
  } else if (routing == "int8") {
    precision = RoutingPrecision::kInt8;
  } else {
    die("--routing must be f32, bf16 or int8, not '" + routing + "'");
  }
  const Status valid = c.validate_and_fill();
  if (!valid.ok()) die(valid.to_string());

  std::vector<float> query_weight(static_cast<size_t>(c.query_rows() * c.dim));
  std::vector<float> keys(static_cast<size_t>(c.key_heads() * 2 * c.n_keys * c.dim_key));
  std::vector<float> x(static_cast<size_t>(T * c.dim)), q(static_cast<size_t>(T * c.query_rows()));
  fill_gaussian(query_weight, 1.0 / std::sqrt(static_cast<double>(c.dim)), 1);
  fill_gaussian(keys, 1.0, 2);
  fill_gaussian(x, 1.0, 3);
  PeerRouterParams params;
  params.query_weight = query_weight.data();
  params.keys = keys.data();
  const int workers = static_cast<int>(threads);
  const PeerRouterWeights weights = peer_prepare_router(c, params, precision, workers);

  using Clock = std::chrono::steady_clock;
  const auto seconds = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  double query_best = 1e30, route_best = 1e30;
  PeerRouting r;
  for (int64_t pass = 0; pass <= repeats; ++pass) {  // pass 0 warms up
    const Clock::time_point t0 = Clock::now();
    peer_query(c, params, x.data(), T, q.data(), workers, precision, &weights);
    const Clock::time_point t1 = Clock::now();
    peer_route(c, params, q.data(), T, &r, workers, precision, &weights);
    const Clock::time_point t2 = Clock::now();
    if (pass == 0) continue;
    query_best = std::min(query_best, seconds(t0, t1));
    route_best = std::min(route_best, seconds(t1, t2));
  }
  const double query_ops = 2.0 * static_cast<double>(T * c.dim * c.query_rows());
  const double score_ops = 2.0 * static_cast<double>(T * c.heads * 2 * c.n_keys * c.dim_key);
  const nlohmann::json report = {
      {"dim", c.dim},
      {"keys", c.n_keys},
      {"experts", c.num_experts()},
      {"heads", c.heads},
      {"dim_key", c.dim_key},
      {"topk", c.topk},
      {"tokens", T},
      {"routing", routing},
      {"threads", resolve_thread_count(workers)},
      {"cpu_path", cpu_path_name(active_cpu_path())},
      {"query_seconds", query_best},
      {"query_ops_per_second", query_ops / query_best},
      {"route_seconds", route_best},
      {"score_ops", score_ops},
  };
  std::printf("%s\n", report.dump(2).c_str());
  return 0;
}

}  // namespace
}  // namespace trove

int main(int argc, char** argv) {
  return trove::run(argc, argv);
}
