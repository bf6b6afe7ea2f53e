// CudaPeerRunner: PeerLayer's kCuda backend (internal to runtime/layer/peer_layer.cc). It owns a
// CudaPeerContext (kernels/cuda/peer_cuda.h), the router parameters and batch buffers in device
// memory, the pinned staging memory, and the device tier T0 (an ExpertCache whose slots are
// device memory, so residency, leases and eviction are the host tier's code).
//
// One forward batch. Routing first (host syncs: the ids come back for dedupe and T0):
//
//   copy stream   x ─┐                        ┌─ ids, gates
//   ctx stream       └─ norm ─ query ─ route ─┘
//
// then the host dedupes, admits the unique experts to T0 (hits need nothing), leases T0's
// misses from the source (the host tier, T1, which reads its own misses from disk), and runs
// the transfer and the expert kernel as a pipeline of C chunks of tokens (PeerLayerOptions::
// pipeline_chunks). Each miss belongs to the first chunk whose tokens use it; chunk c's kernel
// waits (event) for chunk c's copies only, so it overlaps chunk c + 1's copies, and with the
// slab method the host packs chunk c + 1 while chunk c is copied:
//
//   host          tables │ pack 0 │ pack 1 │ pack 2 │                       (slab method only)
//   copy stream          │ tables+0 ─►e0 │ 1 ─►e1 │ 2 ─►e2 │             ┌─ y
//   ctx stream                      │ wait e0, experts 0 │ e1, experts 1 │ e2, experts 2 ─┘
//
// Tables: per slot the device address of its record (a T0 slot, or the batch's device slab
// without T0) and the gates; with the gather method also each miss's source and destination.
// They are one copy per batch; every chunk's records are ONE operation, never one per record:
//   slab    the host copies the records into pinned staging, then one cudaMemcpyAsync (no T0:
//           the chunk's records are contiguous in the device slab) or one cudaMemcpyBatchAsync
//           scattering them into their T0 slots
//   batch   one cudaMemcpyBatchAsync straight from the host tier's pinned slots
//   gather  one kernel (CudaCopyStream::gather_async) whose warps read the host tier's pinned
//           slots through the mapping: SM-driven, no copy engine
// All hits, no host round trip for the ids: forward() tries route_resident() when the last
// batch had no misses in T0. It looks the routing's ids up in a table of N device addresses
// (T0's residency mirrored on the device, kept in step after every batch from the evictions
// and fills; kernels/cuda/residency.h) and reads back one count; when it is 0 the expert
// kernel is queued at once on the addresses found, the routing is copied back while it runs,
// and the host's dedupe and T0 bookkeeping (the policy sees the hits) overlap it:
//
//   ctx stream    norm ─ query ─ route ─ lookup ─┬─────────────── experts ─┐
//   copy stream                      miss count ─┴─ ids, gates ─┐          └─ y
//   host                                        0? ─────────────┴─ dedupe, T0 hits ─ wait y
//
// Otherwise the batch continues as above (experts()), having lost one lookup and one 4-byte
// copy. forward_routed() (the routing given on the host) always takes the path above.
//
// batch and gather need records in pinned, mapped memory (a host tier from
// make_pinned_slot_memory()); any other source is moved by slab. H2dMethod::kAuto gives each
// method that applies two batches with misses, then keeps the one with the most bytes per
// second of copy-stream time. The kernel reads every record through its slot's pointer
// (experts_device), so the output is the same bits whichever method moved the records.
//
// This header carries no CUDA type. In a build without CUDA, create() fails with kNotSupported
// and nothing else is reachable; make_pinned_slot_memory() returns null.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/tiers/expert_cache.h"
#include "runtime/tiers/expert_source.h"

namespace trove {

// Host-tier slot memory that is pinned and mapped for the current CUDA device: each block (at
// most 1 GiB, ExpertCache's unit) is anonymous memory registered on its own (chunked
// registration, so one refused block does not unpin the rest). A block the driver refuses to
// pin stays pageable, with one warning; its records then move by the slab method. Null in a
// build without CUDA.
std::shared_ptr<SlotMemory> make_pinned_slot_memory();

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
  // forward()'s route(): when the device tier holds every expert the routing chose (looked up on
  // the device) also queues the expert pass and sets *computed; the routing is copied back
  // either way. After *computed, call finish_resident() (it copies y back); else experts() as
  // after route().
  Status route_resident(const PeerDenseParams& params, const float* x, int64_t tokens,
                        PeerRouting* routing, bool* computed);
  // The T0 bookkeeping of an all-hit batch (unique_ids as for experts()) while its kernel runs,
  // then y [T, D_out] (host) once it is done.
  Status finish_resident(const PeerRouting& routing, std::span<const int64_t> unique_ids, float* y,
                         DeviceTransferStats* stats);
  // The expert pass over `routing` (host) into y [T, D_out] (host), on the xhat of the last
  // route(). unique_ids ascending; slot_index[s] is slot s's index in unique_ids.
  Status experts(const PeerRouting& routing, std::span<const int64_t> unique_ids,
                 std::span<const int32_t> slot_index, ExpertSource& source, float* y,
                 DeviceTransferStats* stats);

  // See PeerLayer::h2d_totals / h2d_method.
  std::vector<H2dMethodTotals> h2d_totals() const;
  H2dMethod h2d_method() const;

 private:
  struct Impl;
  explicit CudaPeerRunner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace trove
