// The optimized CPU PEER layer: the steps of kernels/cpu/ref/peer_ref.h with threads over
// tokens. The query projection and the sub-key scores are GEMMs: on the SIMD paths trove's own
// fixed-order fp32 and exact int8 kernels, elsewhere a BLAS (kernels/cpu/blas.h, oneDNN) on
// fixed blocks of tokens; the expert stage runs SIMD dot
// products and axpys straight on the int4/int8/bf16/f16 codes of a record (per-group fp16
// scales applied to the group's partial sum; no dequantized copy of a record), with AVX2
// (+FMA/F16C), AVX-VNNI or AVX-512 VNNI as the CPU has them (kernels/cpu/quant.h's CpuPath
// chooses, so tests can force each path), portable scalar code otherwise.
//
// Results match the _ref oracle within the tolerances written in tests/peer_parity_test.cc
// (fp32 accumulation in a different order), and do not depend on the thread count: each
// output row is computed by one thread in a fixed order, nor on the batch a token is in.
//
// Same shapes and REQUIRES as the _ref functions. `threads`: 0 means hardware concurrency.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/peer_kernels.h"
#include "kernels/peer.h"
#include "kernels/record.h"

namespace trove {

void peer_norm(const PeerConfig& config, const float* norm_weight, const float* x, int64_t T,
               float* xhat, int threads = 0);

// The router's weights in the form a RoutingPrecision computes with, made once for as long as
// they do not change (the CPU executor remakes them after a trainer's step): kInt8's per-row
// codes and scales of W_q and of the key tables (kernels/peer.h's rule); kBf16's column panels
// of both for the AVX512_BF16 kernel where it runs; nothing for kF32. Making them costs 0.3 ms
// (int8) and 0.7 ms (bf16) for a 2048 x 512 W_q: most of a one-token call. kF32 on the AVX2
// and AVX-512 paths: both packed for their fixed-order GEMM.
struct PeerRouterWeights {
  RoutingPrecision precision = RoutingPrecision::kF32;
  std::vector<int8_t> query_codes, key_codes;   // kInt8: [h*2*dk, D], [hk*2*n, dk]
  std::vector<float> query_scales, key_scales;  // kInt8: one per row of each
  std::vector<int32_t> query_code_offsets;      // kInt8: 128 * each W_q row's code sum
  // kInt8 where the CPU path has int8_scores: each key table packed for it.
  std::vector<peer_internal::Int8Panels> key_panels_int8;
  std::vector<uint32_t> query_panels;             // kBf16 kernel: W_q packed (peer.cc)
  std::vector<std::vector<uint32_t>> key_panels;  // kBf16 kernel: each key table packed
  // kF32 where the CPU path has its fixed-order GEMM (AVX2, AVX-512): W_q and each key table packed
  // for it (kernels/cpu/peer_kernels.h's pack_f32_panels).
  std::vector<float> query_panels_f32;
  std::vector<std::vector<float>> key_panels_f32;
};
PeerRouterWeights peer_prepare_router(const PeerConfig& config, const PeerRouterParams& params,
                                      RoutingPrecision precision, int threads = 0);

// `precision` (kernels/peer.h): kBf16 rounds the operands of the query projection and of the
// sub-key scores to bf16 and sums the products in fp32, as peer_query_ref / peer_route_ref with
// kBf16 do in double. Its results too are independent of the thread count and of the batch.
// `weights`: peer_prepare_router's for these params and precision, or nullptr to make them in
// the call; the same bits either way.
void peer_query(const PeerConfig& config, const PeerRouterParams& params, const float* xhat,
                int64_t T, float* q, int threads = 0,
                RoutingPrecision precision = RoutingPrecision::kF32,
                const PeerRouterWeights* weights = nullptr);

void peer_route(const PeerConfig& config, const PeerRouterParams& params, const float* q, int64_t T,
                PeerRouting* routing, int threads = 0,
                RoutingPrecision precision = RoutingPrecision::kF32,
                const PeerRouterWeights* weights = nullptr);

void peer_experts(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                  const PeerRouting& routing, const uint8_t* const* records, float* y,
                  int threads = 0, ExpertDot dot = ExpertDot::kFloat);

// The expert pass in waves, for records that arrive while it runs (runtime's tiered source
// computes on resident experts while the disk reads the rest). records[slot] == nullptr means
// "not here yet". Each call continues every token from where the previous call stopped: it
// accumulates the token's slots in order up to its first slot not ready, and computes the
// gated activation of every ready slot beyond it for later (the down-row dot is half of a
// slot's work). With ExpertDot::kInt8 on int8/int4 records a token's up rows are one integer
// sum over all its slots, so the token is accumulated in the call where its last record is ready
// (its earlier records must still be given). Once every record has been ready in some call, y
// equals peer_experts()'s bit for bit: the same operations in the same order, whatever the waves.
struct PeerExpertProgress {
  std::vector<int32_t> next_slot;  // per token: its first slot not yet accumulated into y
  std::vector<float> ga;           // per slot: gate * activation, once computed
  std::vector<uint8_t> has_ga;     // per slot: whether ga is computed
  int64_t pending_tokens = 0;      // after a call: tokens not finished

  // Before the first wave of a batch of `tokens` tokens with `slots_per_token` slots each.
  void reset(int64_t tokens, int64_t slots_per_token);
  bool done() const { return pending_tokens == 0; }
};

// REQUIRES: as for peer_experts; `progress` reset for this routing before the first call, y
// untouched by the caller between calls (a token's row is zeroed by its first call), the same
// `dot` in every call.
void peer_experts_resume(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                         const PeerRouting& routing, const uint8_t* const* records, float* y,
                         PeerExpertProgress* progress, int threads = 0,
                         ExpertDot dot = ExpertDot::kFloat);

// A chosen part of the expert pass: y_part [T, D_out] = sum over token t's slots s with
// selected[t * S + s] != 0, in slot order, of gate * act(<u, xhat>) * v (with ExpertDot::kInt8,
// the selected slots as the token's whole set); a token with none gets a zero row. Only the
// selected slots' records are read (the others may be null). For the cuda executor's misses
// computed on the CPU from the host tier (runtime/layer/cuda_executor.h); with every slot selected,
// y_part equals peer_experts()'s bit for bit. REQUIRES: as for peer_experts; selected has T * h * k
// entries.
void peer_experts_partial(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                          const PeerRouting& routing, const uint8_t* const* records,
                          const uint8_t* selected, float* y_part, int threads = 0,
                          ExpertDot dot = ExpertDot::kFloat);

void peer_backward(const PeerConfig& config, const PeerRouterParams& params,
                   const RecordLayout& layout, const float* x, int64_t T,
                   const PeerRouting& routing, const uint8_t* const* records, const float* dy,
                   PeerGrads* grads, int threads = 0);

// <u, x> for the down row of one record, and y += alpha * v for its up row, on the codes
// (exposed for the benchmarks and the parity tests; width 1).
float record_down_dot(const RecordLayout& layout, const uint8_t* record, const float* x);
// <u, x> as ExpertDot::kInt8 takes it: x quantized per 32-group to int8, the integer dot on an
// int8/int4 record's codes (the float dot where kInt8 falls back to it).
float record_down_dot_int8(const RecordLayout& layout, const uint8_t* record, const float* x);
void record_up_axpy(const RecordLayout& layout, const uint8_t* record, float alpha, float* y);
// The down-row dots of records[0..count) against one x as peer_experts computes a token's
// slots, several rows interleaved: out[r] has the bits of record_down_dot (dot = kFloat) or
// record_down_dot_int8 (kInt8) for records[r].
void record_down_dots(const RecordLayout& layout, const uint8_t* const* records, int64_t count,
                      const float* x, float* out, ExpertDot dot = ExpertDot::kFloat);
// One token's up rows as peer_experts sums them with ExpertDot::kInt8: y[0..D_out) = the sum over
// records[0..count) of ga[r] * up row, by the integer rule of kernels/peer.h (y written whole);
// false, with y untouched, where that rule sends the token to the float axpys.
bool record_up_int(const RecordLayout& layout, const uint8_t* const* records, const float* ga,
                   int64_t count, float* y);

}  // namespace trove
