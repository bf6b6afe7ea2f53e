#include "runtime/layer/peer_executor.h"

#include <algorithm>

#include "base/stopwatch.h"
#include "base/strings.h"
#include "runtime/layer/cpu_executor.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/ref_executor.h"

namespace trove {

std::string_view peer_backend_name(PeerBackend b) {
  switch (b) {
    case PeerBackend::kRef:
      return "ref";
    case PeerBackend::kCuda:
      return "cuda";
    case PeerBackend::kCpu:
      break;
  }
  return "cpu";
}

Result<PeerBackend> parse_peer_backend(std::string_view s) {
  if (s == "cpu") return PeerBackend::kCpu;
  if (s == "ref") return PeerBackend::kRef;
  if (s == "cuda") return PeerBackend::kCuda;
  return Status::invalid_argument("unknown backend '" + clip(s) + "' (expected cpu, ref or cuda)");
}

Status check_backend_available(PeerBackend b) {
  return b == PeerBackend::kCuda ? cuda_executor_available() : Status::ok_status();
}

Metrics batch_metrics(const PeerBatchStats& s) {
  Metrics m;
  m.count("tokens", s.tokens);
  m.count("slots", s.slots);
  m.count("unique_experts", s.unique_experts);
  m.count("record_bytes_used", static_cast<int64_t>(s.record_bytes_used));
  m.count("record_bytes_unique", static_cast<int64_t>(s.record_bytes_unique));
  m.add("route_seconds", s.route_seconds);
  m.add("acquire_seconds", s.acquire_seconds);
  m.add("expert_seconds", s.expert_seconds);
  m.count("host.hits", s.fetch.hits);
  m.count("host.misses", s.fetch.misses);
  m.count("host.bytes_read", static_cast<int64_t>(s.fetch.bytes_read));
  m.add("host.resolve_seconds", s.fetch.resolve_seconds);
  m.add("host.disk_seconds", s.fetch.disk_seconds);
  m.add("host.stall_seconds", s.fetch.stall_seconds);
  m.count("host.prefetched", s.fetch.prefetched);
  m.add("host.prefetch_wait_seconds", s.fetch.prefetch_wait_seconds);
  m.count("host.prefetch_reads", s.fetch.prefetch_reads);
  m.count("device.hits", s.device.hits);
  m.count("device.misses", s.device.misses);
  m.count("device.bytes_copied", static_cast<int64_t>(s.device.bytes_copied));
  m.add("device.copy_seconds", s.device.copy_seconds);
  m.count("device.pageable_batches", s.device.pinned ? 0 : 1);  // copies not all pinned
  m.count("device.cpu_misses", s.device.cpu_misses);
  m.count("device.cpu_slots", s.device.cpu_slots);
  m.add("device.cpu_seconds", s.device.cpu_seconds);
  return m;
}

Status PeerExecutor::forward(const PeerDenseParams& params, const float* x, int64_t T,
                             ExpertSource& source, PeerRouting* routing, float* y,
                             PeerBatchStats* stats) {
  Stopwatch start;
  TROVE_RETURN_IF_ERROR(route(params, x, T, routing));
  const double route_seconds = start.seconds();
  TROVE_RETURN_IF_ERROR(experts(*routing, source, y, stats));
  if (stats != nullptr) stats->route_seconds = route_seconds;
  return Status::ok_status();
}

ExecutorTraits peer_backend_traits(PeerBackend b) {
  ExecutorTraits t;
  if (b == PeerBackend::kCuda) {
    t.device_memory = true;
    t.resident_fill_passes = 1;
  }
  return t;
}

void set_resident_options(uint64_t table_bytes, PeerLayerOptions* options) {
  if (options->backend == PeerBackend::kCuda) options->cuda.vram_budget_bytes = table_bytes;
}

Result<std::unique_ptr<PeerExecutor>> make_peer_executor(const PeerConfig& config,
                                                         const RecordLayout& layout,
                                                         const PeerLayerOptions& options) {
  if (options.cuda.pipeline_chunks < 0 || options.cuda.pipeline_chunks > 64) {
    return Status::invalid_argument(
        str_printf("pipeline chunks must be 0 (auto) to 64, got %d", options.cuda.pipeline_chunks));
  }
  if (options.threads < 0) {
    return Status::invalid_argument(str_printf("threads must be >= 0, got %d", options.threads));
  }
  switch (options.backend) {
    case PeerBackend::kCuda: {
      TROVE_RETURN_IF_ERROR(cuda_executor_available());
      auto cuda = make_cuda_executor(config, layout, options.cuda);
      if (!cuda.ok()) return cuda.status().with_context("PEER layer on the cuda backend");
      return cuda;
    }
    case PeerBackend::kCpu:
    case PeerBackend::kRef:
      break;
  }
  if (options.cuda.vram_budget_bytes > 0) {
    return Status::invalid_argument(
        str_printf("a device budget (vram %llu bytes) needs the cuda backend, not %s",
                   static_cast<unsigned long long>(options.cuda.vram_budget_bytes),
                   std::string(peer_backend_name(options.backend)).c_str()));
  }
  if (options.backend == PeerBackend::kRef) return make_ref_executor(config);
  // kInt8's integer sums hold k * 127 * 64 in int32 (kernels/cpu/blas.h: gemm_nt_int8).
  constexpr int64_t kMaxInt8K = ((int64_t{1} << 31) - 1) / (127 * 64);
  if (options.cpu.routing_precision == RoutingPrecision::kInt8 &&
      std::max(config.dim, config.dim_key) > kMaxInt8K) {
    return Status::invalid_argument(str_printf(
        "int8 routing sums D = %lld (dk = %lld) products in int32; it takes D and dk up to %lld "
        "(use f32 or bf16 routing)",
        static_cast<long long>(config.dim), static_cast<long long>(config.dim_key),
        static_cast<long long>(kMaxInt8K)));
  }
  return make_cpu_executor(config, options.threads, options.cpu);
}

std::shared_ptr<SlotMemory> executor_host_memory(const PeerLayerOptions& options) {
  return options.backend == PeerBackend::kCuda ? make_pinned_slot_memory() : nullptr;
}

}  // namespace trove
