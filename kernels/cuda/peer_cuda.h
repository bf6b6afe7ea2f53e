// The PEER layer's forward pass on a CUDA device (SPEC §2, §6): the four steps of
// kernels/cpu/peer.h (norm, query, route, experts), each in two forms:
//
//   host form    host pointers in and out, as the CPU functions take them: the inputs are
//                copied to the device, computed there, the results copied back, and the call
//                waits. For tests, tools and a first integration.
//   device form  (*_device) every pointer is device memory, parameters included; the work is
//                queued on the context's stream and the call returns without waiting. What the
//                runtime's device tier will call: routing results stay on the device and the
//                fused expert kernel reads records where the tier keeps them.
//
// The CUDA work per step (launch shapes and traffic in each .cu file's comments):
//   norm     one block per token (rms, fp64 sum of squares as the oracle) or a device copy
//   query    one cuBLAS SGEMM (full fp32, no TF32) and a bias kernel
//   route    sub-key scores by cuBLAS (per half for shared keys, batched over (head, half)
//            otherwise), then per (token, head) a block that selects each half's top-k' and the
//            top-k of the k'^2 sums by radix select on (score, -id) keys, so ties go to the
//            lower index / lower expert id exactly as kernels/cpu/ref/peer_ref.cc; gates with
//            gates_ref's math (double, one rounding)
//   experts  one fused kernel, one block per token: each slot's down row is dequantized on the
//            fly and dotted with xhat, gate * activation applied, and the up row accumulated
//            into y in registers; no [T, h, k, D] intermediate.
// Results match the _ref oracles within the tolerances of tests/cuda_peer_test.cc (fp32
// accumulation in other orders); they do not vary between runs (no atomics on sums).
//
// Arguments are checked first, in both forms, before any device work: a bad shape, a null
// pointer, a layout that does not fit the config, an unknown dtype each give a Status naming
// the argument and its value. `config` need not be filled: each call works on a validated copy
// (PeerConfig::validate_and_fill), so dim_out = 0 and topk_per_half = 0 mean dim and topk.
// Limits of this path beyond PeerConfig's (kNotSupported, naming the value): n_keys <= 65536
// (expert ids fit 32 bits in the routing keys), topk and topk_per_half <= 1024,
// heads * topk <= 4096 slots per token, tokens <= 2^31 - 1.
//
// A context is used by one thread at a time; calls on it run in order on its stream. This
// header carries no CUDA type and is plain C++17 (.cu files include it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"

namespace trove {

class CudaEvent;  // kernels/cuda/cuda_memory.h

namespace cuda {}  // namespace cuda

// The routing of T tokens in device memory: three [T, h, k] arrays in PeerRouting's order
// (best first per (token, head)).
struct PeerDeviceRouting {
  int64_t* ids = nullptr;
  float* scores = nullptr;
  float* gates = nullptr;
};

class CudaPeerContext {
 public:
  // An empty context (also what a moved-from one is): it has no device. Every call still
  // checks its arguments, then fails with kInvalidArgument "empty CudaPeerContext".
  CudaPeerContext();
  ~CudaPeerContext();
  CudaPeerContext(CudaPeerContext&& other) noexcept;
  CudaPeerContext& operator=(CudaPeerContext&& other) noexcept;
  CudaPeerContext(const CudaPeerContext&) = delete;
  CudaPeerContext& operator=(const CudaPeerContext&) = delete;

  // A context on the calling thread's current CUDA device: a non-blocking stream, a cuBLAS
  // handle bound to it and scratch memory that grows to the largest call. kNotSupported
  // "no CUDA device is available (...)" when there is no driver or no device.
  static Result<CudaPeerContext> create();

  bool has_device() const { return impl_ != nullptr; }

  // ---- host form: host pointers, synchronous -----------------------------------------------
  // Same shapes as kernels/cpu/peer.h. x and xhat may be the same array.

  // xhat [T, D] = x, or rms-norm(x) * gamma. norm_weight: [D] when input_norm = rms, else
  // ignored (may be null).
  Status norm(const PeerConfig& config, const float* norm_weight, const float* x, int64_t tokens,
              float* xhat);
  // q [T, h*2*dk] = W_q xhat (+ b_q). params.query_bias must be set iff config.query_bias;
  // params.keys and params.norm_weight are not read.
  Status query(const PeerConfig& config, const PeerRouterParams& params, const float* xhat,
               int64_t tokens, float* q);
  // Sub-key scores, per-half top-k', k'^2 merge, final top-k and gates of q [T, h*2*dk].
  // `routing` is resized to [T, h, k]. Only params.keys is read.
  Status route(const PeerConfig& config, const PeerRouterParams& params, const float* q,
               int64_t tokens, PeerRouting* routing);
  // y [T, D_out] = sum over heads and slots of gate * act(<u, xhat>) * v. records[slot] is a
  // host pointer to the record of routing.ids[slot] (layout.record_bytes are read; any
  // alignment); the distinct records are gathered once into one device slab.
  Status experts(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                 const PeerRouting& routing, const uint8_t* const* records, float* y);

  // ---- device form: device pointers, queued on the context's stream ------------------------
  // Same arguments as the host form, all in device memory. Returns once the work is queued;
  // errors raised while it runs surface at synchronize(). Scratch growth (the first call at a
  // new largest size) waits for the stream before freeing the old scratch.

  Status norm_device(const PeerConfig& config, const float* norm_weight, const float* x,
                     int64_t tokens, float* xhat);
  Status query_device(const PeerConfig& config, const PeerRouterParams& params, const float* xhat,
                      int64_t tokens, float* q);
  // Writes the [T, h, k] arrays of `routing`. Uses sub-score scratch of at most ~64 MiB (tokens
  // are processed in tiles that fit) or one token's worth when that is larger.
  Status route_device(const PeerConfig& config, const PeerRouterParams& params, const float* q,
                      int64_t tokens, const PeerDeviceRouting& routing);
  // The fused expert pass with the record of slot s at records[s] ([T*h*k] device pointers to
  // device memory). gates: [T, h, k] as route_device writes them.
  // REQUIRES: every record 16-byte aligned (the device tier's slots are stride-aligned; a
  // record's sections at any even offset are read with the widest aligned loads that fit).
  Status experts_device(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                        int64_t tokens, const float* gates, const uint8_t* const* records,
                        float* y);
  // experts_device over part of each token's slots: token t computes its slots [ranges[2t],
  // ranges[2t + 1]) and continues the sum y[t] holds when the range does not start at 0, so
  // calls over consecutive ranges that cover every slot give experts_device's bits, however the
  // slots were split (runtime/layer/expert_waves.h). Slots outside a call's ranges are not read
  // (their records may be null). ranges: [T, 2] int32 in device memory.
  Status experts_device_ranged(const PeerConfig& config, const RecordLayout& layout,
                               const float* xhat, int64_t tokens, const float* gates,
                               const uint8_t* const* records, const int32_t* ranges, float* y);
  // As experts_device with the record of slot s at table + record_index[s] * layout.stride:
  // an all-resident table indexed by the routing ids, or a slot pool indexed by slot numbers.
  // REQUIRES: table 16-byte aligned; every record_index[s] within the table.
  Status experts_device_indexed(const PeerConfig& config, const RecordLayout& layout,
                                const float* xhat, int64_t tokens, const float* gates,
                                const uint8_t* table, const int64_t* record_index, float* y);

  // Stream order with other streams (runtime/layer/cuda_executor.h's pipeline): work queued after
  // wait() starts once `event` is reached; record() marks the point of the work queued so far.
  Status wait(const CudaEvent& event);
  Status record(CudaEvent& event);

  // Queues a copy of `bytes` from src to dst on the context's stream, in order with the
  // device-form calls around it (cudaMemcpyDefault: either side may be host or device memory,
  // unified addressing tells which). For a caller that stages its own inputs and outputs (the
  // bench's device peers, runtime/bench/device_peers.h). bytes == 0 queues nothing.
  // REQUIRES: both ranges stay valid until the copy completes (synchronize()).
  Status copy_async(void* dst, const void* src, size_t bytes);

  // Waits for every call queued so far; returns the first error raised while they ran.
  Status synchronize();
  // The cudaStream_t the calls queue on, for kernels queued beside them (kernels/cuda/
  // residency.h); null for an empty context.
  void* native_stream() const;

 private:
  struct Impl;
  explicit CudaPeerContext(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace trove
