// The cuda executor (runtime/layer/peer_executor.h): the PEER layer's kernels on the current CUDA
// device. It owns a CudaPeerContext (kernels/cuda/peer_cuda.h), the router parameters and batch
// buffers in device memory, the pinned staging memory, and the device tier T0 (an ExpertCache
// whose slots are device memory, so residency, leases and eviction are the host tier's code).
//
// One forward batch. Routing first (host syncs: the ids come back for dedupe and T0):
//
//   copy stream   x ─┐                        ┌─ ids, gates
//   ctx stream       └─ norm ─ query ─ route ─┘
//
// then the host dedupes, admits the unique experts to T0 (hits need nothing), leases T0's
// misses from the source (the host tier, T1, which reads its own misses from disk), and runs
// the transfer and the expert kernel as a pipeline of C chunks of tokens (CudaExecutorOptions::
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
// All hits, no host round trip for the ids: forward() tries this path when the last batch had no
// misses in T0. It looks the routing's ids up in a table of N device addresses
// (T0's residency mirrored on the device, kept in step after every batch from the evictions
// and fills; kernels/cuda/residency.h) and reads back one count; when it is 0 the expert
// kernel is queued at once on the addresses found, the routing is copied back while it runs,
// and the host's dedupe and T0 bookkeeping (the policy sees the hits) overlap it:
//
//   ctx stream    norm ─ query ─ route ─ lookup ─┬─────────────── experts ─┐
//   copy stream                      miss count ─┴─ ids, gates ─┐          └─ y
//   host                                        0? ─────────────┴─ dedupe, T0 hits ─ wait y
//
// Otherwise the batch continues as above, having lost one lookup and one 4-byte copy. A routing
// given on the host (route() without a routing, then experts()) always takes the path above.
// backward() routes on the device as forward() does and runs the CUDA backward
// (kernels/cuda/peer_cuda_backward.h) on the records leased from the source.
//
// Records on disk. The source's lease on T0's misses is taken in two halves (ExpertSource::
// begin_acquire, finish_acquire): when some of them are still on disk, the batch runs in waves
// instead of the pipeline above, so the device never waits on the disk before it starts:
//
//   host     begin: host-tier misses, pack ┐          finish (disk lands), pack ┐
//   disk           ████ reads of the misses on disk ████┘                      │
//   copies               tables 1 + records ─►e1                 tables 2 + records ─►e2 ─ y
//   ctx                    wait e1: slots [0, first not here) │ wait e2: the rest ─┘
//
// Each wave gives every token the slots from where it stopped to its first slot whose record
// is not on the device (runtime/layer/expert_waves.h), and the ranged kernel continues the
// token's fp32 sum from y, so y is the same bits whatever was resident or late. With
// cpu_misses, misses in host memory that the cost model gives to the CPU are summed there
// (kernels/cpu/peer.h: peer_experts_partial) while the device computes, and added to y at the
// end; on the device their slots read a zero record with a zero gate.
//
// batch and gather need records in pinned, mapped memory (a host tier from
// make_pinned_slot_memory()); any other source is moved by slab. H2dMethod::kAuto gives each
// method that applies two batches with misses, then keeps the one with the most bytes per
// second of copy-stream time. The kernel reads every record through its slot's pointer
// (experts_device), so the output is the same bits whichever method moved the records.
//
// This header carries no CUDA type. In a build without CUDA, make_cuda_executor() fails with
// kNotSupported ("built without CUDA") and make_pinned_slot_memory() returns null.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "runtime/tiers/expert_cache.h"
#include "runtime/tiers/expert_source.h"

namespace trove {

class PeerExecutor;

// How the records a batch misses in the device tier reach the device (SPEC §5). Each is one
// operation per pipeline chunk, never one per record.
enum class H2dMethod {
  kAuto,    // the first batches with misses try each method that applies; then the fastest
  kSlab,    // the host packs the records into a pinned staging slab; one cudaMemcpyAsync (no
            // device tier) or one cudaMemcpyBatchAsync scattering it into the device slots
  kBatch,   // one cudaMemcpyBatchAsync straight from the host tier's pinned slots (no host copy)
  kGather,  // one kernel whose SMs read the host tier's pinned slots through the mapping
};
std::string_view h2d_method_name(H2dMethod m);  // "auto" "slab" "batch" "gather"
Result<H2dMethod> parse_h2d_method(std::string_view s);

// What one H2D method moved over the layer's batches so far (records only, no tables).
struct H2dMethodTotals {
  H2dMethod method = H2dMethod::kSlab;
  int64_t batches = 0;
  uint64_t bytes = 0;
  double seconds = 0;  // copy stream time from the first record copy to the last, by events
};

// What making a batch's records visible to the device cost.
struct DeviceTransferStats {
  int64_t hits = 0;           // unique experts already in the device tier (no copy)
  int64_t misses = 0;         // unique experts copied from the host (all of them without T0)
  uint64_t bytes_copied = 0;  // host -> device, records and tables
  double copy_seconds = 0;    // those copies, between CUDA events on the copy stream
  bool pinned = true;         // the staging slab was pinned (false: the pageable fallback)
  H2dMethod method = H2dMethod::kSlab;  // how the misses moved
  int chunks = 0;                       // pipeline chunks
  // The flow in waves (records on disk when the batch began, or misses computed on the CPU):
  // the waves run (0: the chunked pipeline), and the expert kernels of the first wave queued
  // before the disk's records landed.
  int waves = 0;
  int64_t early_slots = 0;  // (token, expert) slots the first wave computed
  // CudaExecutorOptions::cpu_misses: the device-tier misses computed on the CPU from the host
  // tier (not copied; not in misses), their (token, expert) slots and the CPU's time on them.
  int64_t cpu_misses = 0;
  int64_t cpu_slots = 0;
  double cpu_seconds = 0;
};

// PeerLayerOptions::cuda.
struct CudaExecutorOptions {
  // The device tier's (T0's) byte budget (--vram). 0: no device tier; each batch's records are
  // copied to the device afresh (one staging slab per batch).
  uint64_t vram_budget_bytes = 0;
  EvictionPolicy vram_policy = EvictionPolicy::kFrequency;
  // kBatch and kGather need the records in pinned, mapped host memory (a host tier opened with
  // executor_host_memory()); a batch whose records are not falls back to kSlab.
  H2dMethod h2d = H2dMethod::kAuto;
  // A batch's transfer and expert kernel run in this many chunks of tokens, chunk c's kernel
  // overlapping chunk c + 1's transfer. 0: one per 256 tokens, 1 to 4.
  int pipeline_chunks = 0;
  // Misses computed where they are (Fiddler's placement): a device-tier miss whose record is in
  // the host tier may be computed on the CPU (kernels/cpu/peer.h: peer_experts_partial) instead
  // of being copied, chosen per batch from the rates measured in the run (H2D bytes/s, the
  // CPU's and the device's (token, expert) contributions/s; runtime/layer/expert_waves.h:
  // choose_cpu_misses). y is then the device's sum plus the CPU's, added in fp32: within the
  // forward tolerance of the all-resident y, not bit-identical to it (the largest error seen in
  // tests/peer_parity_test.cc is 1.2e-7 of max|y|). Off by default: y is then bit-identical to
  // the all-resident y whatever was resident.
  bool cpu_misses = false;
  int cpu_threads = 0;  // threads of the CPU's share; 0: all cores
};

// OK when a CUDA device is usable; else kNotSupported saying why (no device, or a build without
// CUDA and how to get one).
Status cuda_executor_available();

// The executor on the current CUDA device for layers of `config` whose records have `layout`.
// With options.vram_budget_bytes > 0 the device tier is allocated now (errors name --vram).
Result<std::unique_ptr<PeerExecutor>> make_cuda_executor(const PeerConfig& config,
                                                         const RecordLayout& layout,
                                                         const CudaExecutorOptions& options);

// Host-tier slot memory that is pinned and mapped for the current CUDA device: each block (at
// most 1 GiB, ExpertCache's unit) is anonymous memory registered on its own (chunked
// registration, so one refused block does not unpin the rest). A block the driver refuses to
// pin stays pageable, with one warning; its records then move by the slab method. Null in a
// build without CUDA.
std::shared_ptr<SlotMemory> make_pinned_slot_memory();

}  // namespace trove
