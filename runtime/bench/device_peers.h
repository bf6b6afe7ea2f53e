// The GPU peers of `trove bench --device cuda` (SPEC §8: "peers measured in the same run on the
// same work"): the bench's measured batches, with the same inputs and routing as its tiered run,
// computed three other ways on the device:
//
//   resident  ours, all-resident: the packed table as stored (int4/int8/bf16 records) in one
//             device allocation; the fused expert kernel reads it indexed by the routing ids
//             directly (CudaPeerContext::experts_device_indexed): no host round trip, no dedupe,
//             no tier. The expert kernel alone is also timed by CUDA events, for the HBM roofline.
//   einsum    how the background implementation runs PEER: bf16 U and V tables dequantized once
//             from the records, a gather of the [T, h*k, D] and [T, h*k, D_out] rows and two
//             batched bf16 GEMMs (kernels/cuda/peer_einsum.h).
//   managed   the packed table in managed (unified) memory written by the host, no prefetch or
//             advice, so pages migrate to the device on first touch; the fused kernel as in
//             resident. Measured from cold over the batches: its first touches are the cost.
//
// One batch, every peer, all on the context's stream with one wait at the end:
//
//   host    x -> pinned ─┐                 timed (CUDA events)                     ┌─ pinned -> y
//   stream               H2D x [H2D ids, gates] | norm [query, route] EXPERTS | D2H y
//                        (synthetic workloads bring their routing; pk routes on the device)
//
// EXPERTS is the fused kernel (resident, managed) or gather + GEMMs + act * gate + GEMM (einsum);
// every other stage is the same code for the three. Each peer runs the batches once, in order,
// after its table is built (building is not timed); tokens/s = tokens / the sum of the batches'
// layer times: from x in device memory to y in device memory, as the layer runs inside a model
// on the GPU (and as the background's PyTorch module is timed). The host copies of x, the given
// routing and y are timed apart (host_io_seconds): they would otherwise dominate (16 MiB each
// way at D = 2048, T = 2048, through one host thread's memcpy).
//
// A peer whose table does not fit (device memory for resident and einsum, host memory for
// managed) is skipped with the reason in its `*_skipped` field; that is not an error.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "runtime/layer/peer_layer.h"

namespace trove {

// The input of one measured batch.
struct DevicePeerBatch {
  const float* x = nullptr;              // [T, D], host memory
  const PeerRouting* routing = nullptr;  // [T, h, k]; null: route x on the device (pk)
};

// Hands out batch `index` (0, 1, ..., batches - 1, in order, once per peer). The pointers stay
// valid until the next call.
using DevicePeerBatchSource = std::function<Status(int64_t index, DevicePeerBatch* batch)>;

struct DevicePeerOptions {
  PeerConfig config;
  RecordLayout layout;
  std::span<const uint8_t> table;  // the N records at layout.stride, host memory (the store's map)
  const PeerDenseParams* params = nullptr;  // router and norm parameters (host, fp32)
  int64_t batch = 0;                        // tokens per batch
  int64_t batches = 0;
  DevicePeerBatchSource source;
  bool resident = true;
  bool einsum = true;
  bool managed = true;
  // Called after each measured batch (outside its timing) with the peer's name ("resident",
  // "einsum", "managed"), the batch index and its output y [T, D_out], which stays valid until
  // the next batch. For tests; may be empty.
  std::function<void(const char* peer, int64_t index, std::span<const float> y)> on_output;
};

struct DevicePeerResult {
  // tokens/s of each peer over the same batches; 0 when not run, with the reason in *_skipped
  // when it was asked for but did not fit.
  double resident_tokens_per_second = 0;
  double einsum_tokens_per_second = 0;
  double managed_tokens_per_second = 0;
  std::string resident_skipped, einsum_skipped, managed_skipped;
  // The einsum peer's output against resident's on the first batch: max |difference| / max |y|
  // (-1: not compared). A bf16 computation lands near 2^-8.
  double einsum_max_error = -1;
  // Resident's batches, summed: the norm + query + routing part of the layer time (near 0 when
  // the workload brings its routing), and the host copies around the timed part (wall).
  double route_seconds = 0;
  double host_io_seconds = 0;
  // The fused int4/int8/bf16 kernel alone in the resident peer, summed over the batches: seconds
  // by CUDA events and the bytes it must move (expert_kernel_bytes per batch).
  double expert_kernel_seconds = 0;
  uint64_t expert_kernel_bytes = 0;
};

// The least traffic the fused expert kernel must have for one batch of `tokens`, with
// `distinct_records` distinct experts among its T*h*k slots:
//   records  distinct_records * record_bytes read once (a record used by several slots is read
//            again by each, but those reads can hit L2; stride padding is not read)
//   xhat     T * D * 4 read;  gates T*h*k * 4 and record indexes T*h*k * 8 read
//   y        T * D_out * 4 written
// Achieved GB/s = this / the kernel's time, so the HBM fraction is a lower bound of how busy the
// memory was. config must be filled (dim_out set).
uint64_t expert_kernel_bytes(const PeerConfig& config, const RecordLayout& layout, int64_t tokens,
                             int64_t distinct_records);

// Runs the peers asked for in `options` on the current CUDA device. Errors: kInvalidArgument
// naming the field for an empty table, a table that is not N records at the stride, missing
// params or source, batch or batches < 1 (checked first, on any machine); kNotSupported in a
// build without CUDA or without a device; the source's errors; CUDA failures other than a table
// that does not fit.
Result<DevicePeerResult> run_device_peers(const DevicePeerOptions& options);

}  // namespace trove
