#include "runtime/layer/ref_executor.h"

#include <algorithm>
#include <vector>

#include "base/stopwatch.h"
#include "kernels/cpu/ref/peer_ref.h"
#include "runtime/layer/expert_batch.h"
#include "runtime/layer/peer_executor.h"

namespace trove {

namespace {

class RefExecutor final : public PeerExecutor {
 public:
  explicit RefExecutor(const PeerConfig& config) : config_(config) {}

  std::string_view name() const override { return "ref"; }
  Status check_batch(int64_t, const std::string&) const override { return Status::ok_status(); }
  void params_changed() override {}

  Status route(const PeerDenseParams& params, const float* x, int64_t T,
               PeerRouting* routing) override {
    const PeerRouterParams p = router_params(params);
    xhat_.resize(static_cast<size_t>(T * config_.dim));
    peer_norm_ref(config_, p.norm_weight, x, T, xhat_.data());
    if (routing == nullptr) return Status::ok_status();
    q_.resize(static_cast<size_t>(T * config_.query_rows()));
    peer_query_ref(config_, p, xhat_.data(), T, q_.data());
    peer_route_ref(config_, p, q_.data(), T, routing);
    return Status::ok_status();
  }

  // Every record in hand first, then the oracle over the whole batch.
  Status experts(const PeerRouting& r, ExpertSource& source, float* y,
                 PeerBatchStats* stats) override {
    Stopwatch start;
    batch_.dedupe(r, config_.num_experts());
    ExpertLease lease(source);
    TROVE_RETURN_IF_ERROR(lease.begin(batch_.unique_ids, batch_.unique_records));
    const double acquire_seconds = start.seconds();
    start.restart();
    TROVE_RETURN_IF_ERROR(lease.finish(batch_.unique_records));
    batch_.point_slots();
    const RecordLayout& layout = source.layout();
    if (r.tokens > 0) {
      peer_experts_ref(config_, layout, xhat_.data(), r, batch_.slot_records.data(), y);
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
    peer_backward_ref(config_, router_params(params), source.layout(), x, T, *routing,
                      batch_.slot_records.data(), dy, grads);
    return Status::ok_status();
  }

  std::span<const int64_t> last_experts() const override { return batch_.unique_ids; }

 private:
  const PeerConfig config_;
  std::vector<float> xhat_, q_;
  ExpertBatch batch_;
};

}  // namespace

std::unique_ptr<PeerExecutor> make_ref_executor(const PeerConfig& config) {
  return std::make_unique<RefExecutor>(config);
}

}  // namespace trove
