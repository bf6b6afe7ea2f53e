// The benchmark behind `trove bench` (SPEC §8): N PEER layers of a synthetic store run batch
// after batch over the tiered store (host budget over the store file), with the routing drawn
// from a workload, every stage of every batch timed, and the same batches run all-resident and
// through the optimal offline policy (Belady) for comparison.
//
// Layers are stacked as in a transformer's residual stream: layer l + 1 reads x + y of layer l,
// so its pk routing sees real inputs. Each layer has its own tiers, each an even share of the
// run's budgets, and its own routing stream (its own seed; trace: the same trace for each).
//
// Workloads:
//   uniform     ids uniform over [0, N)
//   zipf:A      ids by popularity rank r with P(r) ~ 1/(r+1)^A, ranks scattered over the table
//               (a hot expert is not next to the next-hottest on disk)
//   pk          the layer's own product-key routing of gaussian tokens
//   trace:FILE  the routing in a `trove forward --dump-routing` file, batch after batch
// Gates are the softmax of gaussian scores for synthetic ids (their values do not change the
// cost) and the router's own for pk and trace.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/dtype.h"
#include "base/metrics.h"
#include "base/status.h"
#include "kernels/peer_config.h"
#include "runtime/bench/device_peers.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/tiers/cache_policy.h"
#include "storage/record_io.h"

namespace trove {

struct BenchWorkload {
  enum class Kind { kUniform, kZipf, kProductKey, kTrace };
  Kind kind = Kind::kZipf;
  double exponent = 1.09;  // zipf
  std::string trace;       // trace: the routing file

  // "uniform", "zipf:1.09", "pk", "trace:r.safetensors"; errors list the forms.
  static Result<BenchWorkload> parse(const std::string& text);
  std::string name() const;
};

// The name of the benchmark's layer `index`: "bench", then "bench.1", "bench.2", ... (so a
// store written before layers were counted is a one-layer bench store).
std::string bench_layer_name(int64_t index);

// A synthetic store for benchmarks: `layers` layers (bench_layer_name(0), ...) of `config`, each
// with random records of `dtype` and a gaussian router of its own (layer 0's seed is `seed`, so
// it is the layer a one-layer store of the same seed holds), written atomically. Records are
// distinct (each has its own bytes and checksum) but cheap to make: a pool of packed experts
// with each copy's codes varied by its id. `progress` gets (records written, records in all
// layers).
Status write_bench_store(const std::string& path, const PeerConfig& config, DType dtype,
                         uint64_t seed, const std::function<void(int64_t, int64_t)>& progress,
                         int64_t layers = 1);

struct BenchOptions {
  std::string store;   // written by write_bench_store (layers "bench", "bench.1", ...)
  int64_t layers = 1;  // run through the store's first `layers` bench layers
  BenchWorkload workload;
  int64_t batch = 2048;        // tokens per batch
  int64_t batches = 32;        // measured
  int64_t warmup_batches = 8;  // run first, not measured (the host tier fills)
  // The run's budgets (this and vram_budget_bytes), split evenly over the layers: each layer
  // has its own tiers of budget / layers.
  uint64_t host_budget_bytes = 0;
  EvictionPolicy policy = EvictionPolicy::kFrequency;
  RecordReaderOptions io;
  bool resident_baseline = true;  // also run the same batches with the table in memory
  bool oracle = true;             // Belady's hit rate on the same batches
  int threads = 0;
  // Any backend (ref works too, slowly). With an executor that has a device memory
  // (ExecutorTraits::device_memory: cuda), vram_budget_bytes > 0 adds its device tier above the
  // host tier (one per layer), with the host tier's eviction policy.
  PeerBackend backend = PeerBackend::kCpu;
  uint64_t vram_budget_bytes = 0;
  H2dMethod h2d = H2dMethod::kAuto;
  bool cpu_misses = false;  // CudaExecutorOptions::cpu_misses
  uint64_t seed = 1;
  // Look-ahead (runtime/layer/lookahead.h): each layer whose routing is known before its input
  // (every layer of a synthetic or trace workload; the first of pk) routes batches b+1..b+N and
  // prefetches their experts before batch b runs. 0: none.
  int lookahead = 0;
  // Cross-layer prediction (pk, layers > 1): before layer l runs, layer l + 1's router runs on
  // layer l's input and layer l + 1 prefetches the experts it picks, read while layer l computes.
  bool cross_layer = false;
  std::function<void(int64_t, int64_t)> progress;  // (batches done, batches in all)
};

// One layer of the run: its figures over the measured batches (the cold-run and Belady rates
// over every batch, as BenchResult's).
// A bench's counters (base/metrics.h), and the ones its report reads by name.
struct BenchCounts {
  Metrics metrics;
  int64_t requested() const { return metrics.counter("slots"); }
  int64_t unique() const { return metrics.counter("unique_experts"); }
  int64_t hits() const { return metrics.counter("host.hits"); }
  int64_t misses() const { return metrics.counter("host.misses"); }
  uint64_t bytes_read() const { return static_cast<uint64_t>(metrics.counter("host.bytes_read")); }
};

struct BenchLayerResult : BenchCounts {
  std::string name;
  uint64_t host_budget_bytes = 0;  // its share of the run's
  uint64_t vram_budget_bytes = 0;
  int64_t capacity_slots = 0;
  int64_t device_capacity_slots = 0;
  // metrics: its batch_metrics summed over the measured batches (BenchResult::metrics' names,
  // without the latency histograms).
  double hit_rate = 0;
  double device_hit_rate = 0;
  double oracle_hit_rate = -1;  // the host tier's, or with a device tier the device's
  double achieved_hit_rate_all = -1;
  double device_oracle_hit_rate = -1;
  double device_hit_rate_all = -1;
};

// Figures of the whole run: counts and per-batch times are sums over the layers, rates are
// their ratios (Belady's: its hits over all layers / their unique experts), and tokens count a
// token once however many layers it passed.
struct BenchResult : BenchCounts {
  PeerConfig config;
  std::string record_dtype;
  uint64_t record_bytes = 0;
  uint64_t record_stride = 0;
  uint64_t table_bytes = 0;    // all layers'
  int64_t capacity_slots = 0;  // the host tiers' records
  std::string engine;          // io_uring or pread
  bool direct_io = false;
  std::vector<BenchLayerResult> layers;  // one per layer, in order

  int64_t batches = 0;  // measured
  int64_t tokens = 0;
  double seconds = 0;  // wall time of the measured batches
  double tokens_per_second = 0;
  // metrics: the measured batches, summed over the layers and the batches: each layer's
  // batch_metrics ("slots": expert selections, "unique_experts", record bytes, stage seconds,
  // "host.*": the host tiers' hits, misses, bytes read, disk and stall seconds, look-ahead reads;
  // "device.*": the device tiers and the host -> device copies), and the per-batch latency
  // histograms (seconds, all layers' summed per batch) "latency.batch" (wall time),
  // "latency.route", "latency.resolve", "latency.disk", "latency.compute", "latency.stall"
  // (prefetch waits included) and "latency.transfer" (host -> device copies).

  // Records read from disk: the misses and what the look-ahead's prefetches read, used or not.
  int64_t records_read() const {
    return metrics.counter("host.misses") + metrics.counter("host.prefetch_reads");
  }
  // "latency.<stage>"; an empty histogram when the run has none.
  LatencyHistogram latency(const std::string& stage) const {
    const LatencyHistogram* h = metrics.histogram("latency." + stage);
    return h != nullptr ? *h : LatencyHistogram{};
  }
  double hit_rate = 0;  // hits / unique
  // Over every batch from a cold tier (warm-up included): Belady's hit rate and the policy's,
  // side by side (-1: not run). With a device tier these are the device tier's (the host tier
  // then sees only its misses, a stream the trace does not hold), and the host's are -1.
  double oracle_hit_rate = -1;
  double achieved_hit_rate_all = -1;
  double iops = 0;  // records_read() / the disk's busy time
  // Look-ahead and cross-layer prediction (over the measured batches; the reads in metrics),
  // and for the prediction: predicted ∩ used over used, summed over the layers it ran for.
  int lookahead = 0;
  bool cross_layer = false;
  int64_t predicted_used = 0;  // predicted ∩ used
  int64_t predicted_of = 0;    // used, of the layers predicted
  int64_t predicted = 0;       // predicted (distinct), for precision
  double recall() const {
    return predicted_of > 0 ? static_cast<double>(predicted_used) / predicted_of : -1;
  }

  // The all-resident run of the same batches (0: not run), with the executor's resident
  // options (set_resident_options: on a device, the whole table in the device tier, filled by
  // the executor's unmeasured passes over the batches first).
  double resident_tokens_per_second = 0;
  std::string resident_skipped;  // why it was not run, when asked for (e.g. tables too large)

  // The executor's name ("cpu", "cuda", ...) and whether it has a device memory
  // (ExecutorTraits::device_memory); with one, the device tier (zeros without one) and the host
  // -> device transfers.
  std::string backend = "cpu";
  bool device_memory = false;
  int64_t device_capacity_slots = 0;
  double device_hit_rate = 0;          // device.hits / unique
  double device_oracle_hit_rate = -1;  // see oracle_hit_rate
  double device_hit_rate_all = -1;
  // Records moved by each H2D method over the whole run (warm-up included, where --h2d auto
  // tries them), and the method kept at the end.
  std::vector<H2dMethodTotals> h2d_methods;
  H2dMethod h2d_method = H2dMethod::kAuto;

  // With a device memory and the resident baseline: the GPU peers on the same measured batches
  // (runtime/bench/device_peers.h): ours all-resident indexed by the routing directly, bf16 gather
  // + einsum, managed memory, and the fused kernel's own time and bytes for the HBM roofline. One
  // layer only: with layers > 1 every peer is skipped, saying so.
  DevicePeerResult device_peers;
};

// Runs the benchmark: warm-up batches, then `batches` measured ones over the tiered store, then
// (when asked) the same measured batches all-resident, and with an executor that has a device
// memory through the GPU peers.
// Errors: a store with fewer bench layers than asked (naming the store), layers > 1 with
// dim_out != dim (no residual stream), a budget share below one batch's working set (before any
// work, naming the layer), a trace that does not fit the layers.
Result<BenchResult> run_bench(const BenchOptions& options);

}  // namespace trove
