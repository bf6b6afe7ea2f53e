// PeerLayer: one PEER layer (SPEC §2) ready to run on the CPU or a CUDA device: its config, its
// router parameters (fp32, always resident), an ExpertSource for its records and the executor
// that runs it (runtime/layer/peer_executor.h: ref, cpu or cuda, chosen once from the options by
// make_peer_executor). The layer checks its inputs and hands the batch to the executor, which
// routes it, dedupes the selected experts, leases them from the source, runs the expert kernels
// on the record pointers and releases them; backward() returns the gradients of every parameter,
// the expert tables' as row-sparse rows per unique expert.
//
//   auto store = StoreReader::open("model.trove");
//   auto layer = PeerLayer::open(*store, "model.layers.19.mlp.peer");
//   layer->forward(x, T, y);                 // x [T, D] fp32, y [T, D_out]
//
// Non-finite inputs are rejected (Status::invalid_argument naming the token and element):
// routing by NaN scores is undefined, and a silent NaN output would hide the fault upstream.
// An empty batch (T = 0) is valid and produces nothing. A PeerLayer is not thread-safe; run one
// batch at a time per layer.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "runtime/layer/cpu_executor.h"
#include "runtime/layer/cuda_executor.h"
#include "runtime/layer/peer_executor.h"
#include "runtime/tiers/cache_policy.h"
#include "runtime/tiers/expert_source.h"
#include "runtime/tiers/tiered_source.h"
#include "storage/store.h"

namespace trove {

// OK when every value of `v` (rows of `row_len`) is finite; else Status::invalid_argument
// "<what>: token <first_row + row>, element <col> is nan; ...".
Status check_finite_rows(const char* what, std::span<const float> v, int64_t row_len,
                         int64_t first_row = 0);

struct PeerLayerOptions {
  PeerBackend backend = PeerBackend::kCpu;  // which executor runs the layer
  int threads = 0;                          // host threads; 0: all cores
  bool verify_checksums = true;             // verify each record read from a store the first time
  // open(): with a host budget, records come through a TieredExpertSource (host tier over the
  // store file, runtime/tiers/tiered_source.h); without, each record is read (checked I/O) the
  // first time it is used and kept (ResidentStoreExpertSource).
  std::optional<TieredSourceOptions> tiers;
  CpuExecutorOptions cpu;    // kCpu's (runtime/layer/cpu_executor.h)
  CudaExecutorOptions cuda;  // kCuda's (runtime/layer/cuda_executor.h); others refuse a budget
};

class PeerLayer {
 public:
  PeerLayer(PeerLayer&&) noexcept;
  PeerLayer& operator=(PeerLayer&&) noexcept;
  PeerLayer(const PeerLayer&) = delete;
  PeerLayer& operator=(const PeerLayer&) = delete;
  ~PeerLayer();

  // Layer `name` of `store` (which must outlive the layer): config and record layout from the
  // manifest, router parameters read and verified, records through a ResidentStoreExpertSource.
  // A missing layer is Status::not_found listing the store's layers.
  static Result<PeerLayer> open(const StoreReader& store, const std::string& name,
                                PeerLayerOptions options = {});
  // From tensors in memory. `config` is validated (and its defaults filled); every tensor's size
  // and the source's layout are checked against it, errors naming the tensor.
  static Result<PeerLayer> create(PeerConfig config, PeerDenseParams params,
                                  std::unique_ptr<ExpertSource> experts,
                                  PeerLayerOptions options = {});

  const PeerConfig& config() const;
  const RecordLayout& record_layout() const;
  const PeerDenseParams& params() const;
  // The router parameters to change in place between batches (the trainer's Adam step). The
  // sizes must stay as they are. (The executor refreshes its copies, if any, at the next batch.)
  PeerDenseParams& mutable_params();
  ExpertSource& experts();
  const PeerLayerOptions& options() const;

  // The executor that runs the layer (for its reports: name, h2d_totals, h2d_method).
  const PeerExecutor& executor() const;

  // The executor's H2D transfer report (PeerExecutor::h2d_totals / h2d_method).
  std::vector<H2dMethodTotals> h2d_totals() const;
  H2dMethod h2d_method() const;

  // OK when batches of up to `tokens` tokens fit the expert source and the executor (a device
  // tier: each batch can select tokens * h * k distinct experts); else the source's or the
  // executor's error, before any work.
  Status check_batch(int64_t tokens) const;

  // y [T, D_out] for x [T, D] (row-major fp32). `routing`, when given, receives the routing;
  // `stats`, when given, what the batch cost. Errors: sizes that disagree with T and the
  // config, non-finite inputs, and whatever the expert source reports.
  Status forward(std::span<const float> x, int64_t T, std::span<float> y,
                 PeerRouting* routing = nullptr, PeerBatchStats* stats = nullptr);

  // forward() with the routing given instead of computed (benchmarks replay synthetic or
  // recorded routings through the same expert path): `routing` must hold T tokens of h x k
  // ids in [0, N) and finite gates. x is still normalized (the experts read x-hat).
  Status forward_routed(std::span<const float> x, int64_t T, const PeerRouting& routing,
                        std::span<float> y, PeerBatchStats* stats = nullptr);

  // Look-ahead (runtime/layer/lookahead.h): the routing forward() computes for x (the
  // executor's route), without the experts; forward_routed(x, T, routing) then gives forward()'s
  // y bit for bit. Errors: as forward()'s for x.
  Status route(std::span<const float> x, int64_t T, PeerRouting* routing);
  // Tells the expert source the distinct experts of `routing`, a batch to come
  // (ExpertSource::prefetch: the source reads ahead what it lacks). Never fails.
  // REQUIRES: the routing's ids in [0, N) (as route() gives).
  void prefetch(const PeerRouting& routing);

  // The distinct experts the last forward() used, ascending (valid until the next call).
  std::span<const int64_t> last_experts() const;

  // Gradients of sum(dy * y) at x (routing recomputed from x). dy is [T, D_out].
  Status backward(std::span<const float> x, int64_t T, std::span<const float> dy, PeerGrads* grads);

 private:
  struct Impl;
  explicit PeerLayer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace trove
