// The oracle of the PEER layer (SPEC §2): every step written as plainly as possible, one token
// at a time, accumulating in double and rounding once to fp32 where a result is stored. The
// optimized CPU path (kernels/cpu/peer.h) and the CUDA path are tested against these.
//
// Shapes follow kernels/peer.h. `records` holds one pointer per routing slot, [T, h, k] in the
// order of routing.ids: records[(t*h + head)*k + s] points at the layout.stride bytes of
// expert routing.ids[...] (any dtype of kernels/record.h; width 1). Records are dequantized
// with the _ref dequantizers.
//
// REQUIRES (all functions): `config` validated (PeerConfig::validate_and_fill), width 1,
// buffers of the stated sizes, finite inputs. Callers (runtime/layer/peer_layer.h) check these and
// return a Status; kernels only TROVE_CHECK them.
#pragma once

#include <cstdint>

#include "kernels/peer.h"
#include "kernels/record.h"

namespace trove {

// Step 1: xhat [T, D] = x, or rms-norm(x) * gamma.
void peer_norm_ref(const PeerConfig& config, const float* norm_weight, const float* x, int64_t T,
                   float* xhat);

// Step 2: q [T, h*2*dk] = W_q xhat (+ b_q). RoutingPrecision::kBf16: W_q and xhat rounded to
// bf16 (round to nearest even) before the product; b_q is not rounded. kInt8: both quantized
// per row and multiplied in integers, then scaled (kernels/peer.h).
void peer_query_ref(const PeerConfig& config, const PeerRouterParams& params, const float* xhat,
                    int64_t T, float* q, RoutingPrecision precision = RoutingPrecision::kF32);

// Step 4, per half: the indices of the kp largest of s[0..n), best first; ties: lower index
// first (a stable sort). REQUIRES: 1 <= kp <= n, s finite.
void top_indices_ref(const float* s, int64_t n, int64_t kp, int64_t* out);

// Step 5: the k best of the kp^2 sums s0[top0[a]] + s1[top1[b]], best first; ties: lower id
// top0[a] * n + top1[b] first (all sums sorted). REQUIRES: 1 <= k <= kp^2, the sums not NaN.
void merge_top_ref(const float* s0, const float* s1, const int64_t* top0, const int64_t* top1,
                   int64_t kp, int64_t n, int64_t k, int64_t* ids, float* scores);

// Steps 3-5: sub-key scores, per-half top-k', k'^2 merge, final top-k and gates.
// `routing` is resized to [T, h, k]. RoutingPrecision::kBf16: q and the keys rounded to bf16
// before the sub-key scores (kInt8: quantized per row, kernels/peer.h); everything after them as
// in kF32.
void peer_route_ref(const PeerConfig& config, const PeerRouterParams& params, const float* q,
                    int64_t T, PeerRouting* routing,
                    RoutingPrecision precision = RoutingPrecision::kF32);

// Step 6: y [T, D_out] = sum over heads and slots of g * act(<u, xhat>) * v.
void peer_experts_ref(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                      const PeerRouting& routing, const uint8_t* const* records, float* y);

// Gradients of sum(dy * y) for the forward pass on x with the given routing (as produced by
// peer_route_ref from the same x; the selection is piecewise constant, so gradients flow
// through the selected scores only). dy is [T, D_out]. Every field of `grads` is resized.
void peer_backward_ref(const PeerConfig& config, const PeerRouterParams& params,
                       const RecordLayout& layout, const float* x, int64_t T,
                       const PeerRouting& routing, const uint8_t* const* records, const float* dy,
                       PeerGrads* grads);

}  // namespace trove
