// PeerExecutor: one backend of the PEER layer (runtime/layer/peer_layer.h), the way faiss and
// ggml put their backends behind one interface. The layer owns the config, the router parameters
// and the expert source and checks every input; the executor owns the flow of a batch on its
// backend (its kernels, its scratch, and for cuda the device memory and the device tier):
//
//   PeerLayer::forward ── executor.forward ── route (norm, query, top-k) ── experts (dedupe,
//                                             lease from the tiers, expert kernels) ── y
//
// Three implementations, each in its own file: ref (runtime/layer/ref_executor.h: the oracle
// kernels), cpu (runtime/layer/cpu_executor.h: SIMD + threads, the expert pass overlapping the
// tiers' fetch) and cuda (runtime/layer/cuda_executor.h: the kernels on a CUDA device behind a
// device tier). make_peer_executor() is the one place that chooses among them: nothing outside
// the executors asks which backend runs. Results are bit-identical to the kernels each one calls.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/metrics.h"
#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "runtime/layer/cuda_executor.h"
#include "runtime/tiers/expert_cache.h"
#include "runtime/tiers/expert_source.h"

namespace trove {

struct PeerLayerOptions;

enum class PeerBackend : uint8_t {
  kCpu,   // kernels/cpu/peer.h: SIMD + threads
  kRef,   // kernels/cpu/ref/peer_ref.h: the oracle (slow; for checking)
  kCuda,  // kernels/cuda/peer_cuda.h on the current CUDA device (runtime/layer/cuda_executor.h)
};
std::string_view peer_backend_name(PeerBackend b);  // "cpu" "ref" "cuda"
Result<PeerBackend> parse_peer_backend(std::string_view s);

// OK when layers of backend `b` can be made on this machine. kCuda: kNotSupported "no CUDA
// device is available (<why>)" without a usable device, or "trove was built without CUDA ..."
// in a build without the CUDA backend. Cheap; for tools to refuse before any work.
Status check_backend_available(PeerBackend b);

// What the executors of a backend hold besides the host tiers: what the bench, the
// calibrations and the reports ask instead of which backend runs.
struct ExecutorTraits {
  // Records move to a memory of the executor's own (a device tier, host -> device copies):
  // PeerBatchStats::device, h2d_totals() and h2d_method() carry figures, and the device's
  // limits (H2D and HBM bandwidth) and its peers (runtime/bench/device_peers.h) apply.
  bool device_memory = false;
  // An all-resident run (set_resident_options): unmeasured passes over the batches before the
  // measured one (cuda: 1, which fills the device tier).
  int resident_fill_passes = 0;
};
ExecutorTraits peer_backend_traits(PeerBackend b);

// Router parameters, canonical arrangement (runtime/convert/layouts.h), owned.
struct PeerDenseParams {
  std::vector<float> query_weight;  // [h*2*dk, D]
  std::vector<float> query_bias;    // [h*2*dk] or empty
  std::vector<float> keys;          // [hk, 2, n, dk]
  std::vector<float> norm_weight;   // [D] or empty
};

// What one forward() did, for reports and benchmarks.
struct PeerBatchStats {
  int64_t tokens = 0;
  int64_t slots = 0;                 // T * h * k expert uses
  int64_t unique_experts = 0;        // distinct experts among them
  uint64_t record_bytes_used = 0;    // slots * record bytes: what the expert kernels read
  uint64_t record_bytes_unique = 0;  // unique * record bytes
  double route_seconds = 0;          // norm, query, sub-key scores, top-k, gates
  double acquire_seconds = 0;        // dedupe and leasing from the source
  double expert_seconds = 0;   // the expert kernels (both waves, see runtime/tiers/tiered_source.h)
  ExpertFetchStats fetch;      // what the source did (tiers: hits, misses, disk, stall)
  DeviceTransferStats device;  // executors with a device tier (cuda); zero otherwise
};

// One batch's stats as metrics (base/metrics.h): tokens, slots, unique_experts, the record bytes
// and stage seconds, "host.*" (what the source did) and "device.*" (the device transfers), the
// names the Python side's last_stats and the reports read.
Metrics batch_metrics(const PeerBatchStats& s);

class PeerExecutor {
 public:
  PeerExecutor() = default;
  PeerExecutor(const PeerExecutor&) = delete;
  PeerExecutor& operator=(const PeerExecutor&) = delete;
  virtual ~PeerExecutor() = default;

  // For reports: "cpu", "ref", "cuda".
  virtual std::string_view name() const = 0;

  // OK when what the executor holds itself (cuda: the device tier) takes a batch that selects up
  // to `max_unique` distinct experts; else resource_exhausted naming the budget and `what`.
  virtual Status check_batch(int64_t max_unique, const std::string& what) const = 0;

  // The router parameters changed in place (the trainer's step): copies of them are stale.
  virtual void params_changed() = 0;

  // x [T, D] (host) -> x-hat kept for the next experts(); with `routing`, also the query and
  // the top-k, written into *routing (host). Without, the routing is the caller's (a replayed
  // or look-ahead one). REQUIRES: x finite, T >= 0 (the layer checks).
  virtual Status route(const PeerDenseParams& params, const float* x, int64_t T,
                       PeerRouting* routing) = 0;

  // The expert pass over `routing` (host; ids in [0, N)) on the x-hat of the last route(): the
  // distinct experts leased from `source` for the pass, y [T, D_out] (host). `stats` when given.
  virtual Status experts(const PeerRouting& routing, ExpertSource& source, float* y,
                         PeerBatchStats* stats) = 0;

  // route() then experts(), which an executor may overlap (cuda: an all-hit batch's expert pass
  // is queued before its routing is back on the host). Sets stats->route_seconds.
  virtual Status forward(const PeerDenseParams& params, const float* x, int64_t T,
                         ExpertSource& source, PeerRouting* routing, float* y,
                         PeerBatchStats* stats);

  // Gradients of sum(dy * y) at x (the routing recomputed from x into *routing), dy [T, D_out].
  virtual Status backward(const PeerDenseParams& params, ExpertSource& source, const float* x,
                          int64_t T, const float* dy, PeerRouting* routing, PeerGrads* grads) = 0;

  // The distinct experts of the last expert pass or backward, ascending (valid until the next).
  virtual std::span<const int64_t> last_experts() const = 0;

  // Executors that copy records to a device: what each method moved so far (slab, batch,
  // gather) and the method batches use now (kAuto while still trying). Others: empty, kAuto.
  virtual std::vector<H2dMethodTotals> h2d_totals() const { return {}; }
  virtual H2dMethod h2d_method() const { return H2dMethod::kAuto; }
};

// The executor options.backend names for layers of `config` whose records have `layout`, with
// that backend's options (options.cpu, options.cuda). Errors: a backend this machine lacks
// (check_backend_available), options of another backend that would be ignored (a device budget
// without cuda), options out of range.
Result<std::unique_ptr<PeerExecutor>> make_peer_executor(const PeerConfig& config,
                                                         const RecordLayout& layout,
                                                         const PeerLayerOptions& options);

// `options` made all-resident for a layer whose table is `table_bytes`, over a source that holds
// it in memory: where the executor has a memory of its own, the whole table in it (cuda: a
// device tier of table_bytes). Other options are left as they are.
void set_resident_options(uint64_t table_bytes, PeerLayerOptions* options);

// The host tier's slot memory the executor options.backend names wants (cuda: pinned and mapped,
// so that the device tier fills straight from it); null for plain memory.
std::shared_ptr<SlotMemory> executor_host_memory(const PeerLayerOptions& options);

}  // namespace trove
