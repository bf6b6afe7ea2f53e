#include "runtime/layer/cpu_executor.h"

#include <algorithm>
#include <optional>
#include <vector>

#include "base/check.h"
#include "base/stopwatch.h"
#include "kernels/cpu/peer.h"
#include "runtime/layer/expert_batch.h"
#include "runtime/layer/peer_executor.h"

namespace trove {

namespace {

class CpuExecutor final : public PeerExecutor {
 public:
  CpuExecutor(const PeerConfig& config, int threads, const CpuExecutorOptions& options)
      : config_(config), threads_(threads), options_(options) {}

  std::string_view name() const override { return "cpu"; }
  Status check_batch(int64_t, const std::string&) const override { return Status::ok_status(); }
  void params_changed() override { router_weights_.reset(); }

  Status route(const PeerDenseParams& params, const float* x, int64_t T,
               PeerRouting* routing) override {
    const PeerRouterParams p = router_params(params);
    xhat_.resize(static_cast<size_t>(T * config_.dim));
    peer_norm(config_, p.norm_weight, x, T, xhat_.data(), threads_);
    if (routing == nullptr) return Status::ok_status();
    q_.resize(static_cast<size_t>(T * config_.query_rows()));
    const RoutingPrecision precision = options_.routing_precision;
    if (!router_weights_) {
      router_weights_ = peer_prepare_router(config_, p, precision, threads_);
    }
    const PeerRouterWeights* weights = router_weights_ ? &*router_weights_ : nullptr;
    peer_query(config_, p, xhat_.data(), T, q_.data(), threads_, precision, weights);
    peer_route(config_, p, q_.data(), T, routing, threads_, precision, weights);
    return Status::ok_status();
  }

  // Wave 1 on the records that are here, then one wave per landing group, the last on the rest.
  Status experts(const PeerRouting& r, ExpertSource& source, float* y,
                 PeerBatchStats* stats) override {
    Stopwatch start;
    batch_.dedupe(r, config_.num_experts());
    ExpertLease lease(source);
    TROVE_RETURN_IF_ERROR(lease.begin(batch_.unique_ids, batch_.unique_records));
    const double acquire_seconds = start.seconds();
    start.restart();
    const RecordLayout& layout = source.layout();
    const bool pending = std::find(batch_.unique_records.begin(), batch_.unique_records.end(),
                                   nullptr) != batch_.unique_records.end();
    if (!pending) {
      TROVE_RETURN_IF_ERROR(lease.finish(batch_.unique_records));
      batch_.point_slots();
      if (r.tokens > 0) {
        peer_experts(config_, layout, xhat_.data(), r, batch_.slot_records.data(), y, threads_,
                     options_.expert_dot);
      }
    } else {
      batch_.point_slots();
      progress_.reset(r.tokens, r.heads * r.topk);
      peer_experts_resume(config_, layout, xhat_.data(), r, batch_.slot_records.data(), y,
                          &progress_, threads_, options_.expert_dot);
      // Each group of the disk's reads as it lands (a source reading in landing groups), then
      // the rest.
      for (;;) {
        landed_.clear();
        TROVE_RETURN_IF_ERROR(lease.wait_landed(batch_.unique_records, &landed_));
        if (landed_.empty()) break;
        batch_.point_slots();
        peer_experts_resume(config_, layout, xhat_.data(), r, batch_.slot_records.data(), y,
                            &progress_, threads_, options_.expert_dot);
      }
      TROVE_RETURN_IF_ERROR(lease.finish(batch_.unique_records));
      batch_.point_slots();
      peer_experts_resume(config_, layout, xhat_.data(), r, batch_.slot_records.data(), y,
                          &progress_, threads_, options_.expert_dot);
      TROVE_CHECK(progress_.done());
    }
    if (stats != nullptr) {
      report_host_batch(r, batch_, source, acquire_seconds, start.seconds(), stats);
    }
    return Status::ok_status();
  }

  Status backward(const PeerDenseParams& params, ExpertSource& source, const float* x, int64_t T,
                  const float* dy, PeerRouting* routing, PeerGrads* grads) override {
    TROVE_RETURN_IF_ERROR(route(params, x, T, routing));
    batch_.dedupe(*routing, config_.num_experts());
    ExpertLease lease(source);
    TROVE_RETURN_IF_ERROR(lease.all(batch_));
    peer_backward(config_, router_params(params), source.layout(), x, T, *routing,
                  batch_.slot_records.data(), dy, grads, threads_);
    return Status::ok_status();
  }

  std::span<const int64_t> last_experts() const override { return batch_.unique_ids; }

 private:
  const PeerConfig config_;
  const int threads_;
  const CpuExecutorOptions options_;
  // Scratch reused across batches.
  std::vector<float> xhat_, q_;
  ExpertBatch batch_;
  PeerExpertProgress progress_;
  // The router's weights prepared for options_.routing_precision (int8 codes, bf16 or fp32
  // panels):
  // made at the first route() after construction or params_changed().
  std::optional<PeerRouterWeights> router_weights_;
  std::vector<uint32_t> landed_;
};

}  // namespace

std::unique_ptr<PeerExecutor> make_cpu_executor(const PeerConfig& config, int threads,
                                                const CpuExecutorOptions& options) {
  return std::make_unique<CpuExecutor>(config, threads, options);
}

}  // namespace trove
