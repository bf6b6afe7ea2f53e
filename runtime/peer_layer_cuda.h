// CudaPeerRunner: PeerLayer's kCuda backend (internal to runtime/peer_layer.cc). It owns a
// CudaPeerContext (kernels/cuda/peer_cuda.h), the router parameters and batch buffers in device
// memory, the pinned staging slab, and the device tier T0 (an ExpertCache whose slots are
// device memory, so residency, leases and eviction are the host tier's code).
//
// One forward batch (host syncs keep the copy stream and the context's stream in order; they
// do not overlap yet):
//
//   copy stream   x ─┐                        ┌─ ids, gates ─┐            ┌─ slab ─┐      ┌─ y
//   ctx stream       └─ norm ─ query ─ route ─┘              │            │        └─ experts
//   host                                                     └─ dedupe, ─┘
//                                                               T0 admit, lease misses from
//                                                               the source, pack into slab
//
// The slab is ONE transfer per batch, never one per expert:
//   without T0  [unique records at the layout's stride][per-slot record index][gates]
//               one cudaMemcpyAsync; the expert kernel reads the records by index
//               (experts_device_indexed)
//   with T0     [missed records][per-slot device record pointers][gates]
//               one cudaMemcpyBatchAsync scattering each missed record into its device slot
//               and the tables into place; hits need no copy; the kernel reads through the
//               pointers (experts_device)
// Only T0's misses are leased from the source (the host tier sees T0's miss stream).
//
// This header carries no CUDA type. In a build without CUDA, create() fails with kNotSupported
// and nothing else is reachable.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "runtime/expert_source.h"
#include "runtime/peer_layer.h"

namespace trove {

class CudaPeerRunner {
 public:
  // A runner on the current CUDA device for layers of `config` whose records have `layout`.
  // With options.vram_budget_bytes > 0 the device tier is allocated now (errors name --vram).
  static Result<std::unique_ptr<CudaPeerRunner>> create(const PeerConfig& config,
                                                        const RecordLayout& layout,
                                                        const PeerLayerOptions& options);
  ~CudaPeerRunner();
  CudaPeerRunner(const CudaPeerRunner&) = delete;
  CudaPeerRunner& operator=(const CudaPeerRunner&) = delete;

  // OK when the device tier (if any) holds `max_unique` records; else resource_exhausted naming
  // --vram and the batch (`what`).
  Status check_batch(int64_t max_unique, const std::string& what) const;

  // The router parameters changed: upload them again before the next batch.
  void mark_params_changed();

  // x [T, D] (host) -> xhat on the device; with `routing`, also query and route there and the
  // routing copied back into *routing.
  Status route(const PeerDenseParams& params, const float* x, int64_t tokens, PeerRouting* routing);
  // The expert pass over `routing` (host) into y [T, D_out] (host), on the xhat of the last
  // route(). unique_ids ascending; slot_index[s] is slot s's index in unique_ids.
  Status experts(const PeerRouting& routing, std::span<const int64_t> unique_ids,
                 std::span<const int32_t> slot_index, ExpertSource& source, float* y,
                 DeviceTransferStats* stats);

 private:
  struct Impl;
  explicit CudaPeerRunner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace trove
