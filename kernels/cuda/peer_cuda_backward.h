// The PEER layer's backward pass on a CUDA device (SPEC §2, §6): the gradients of sum(dy * y)
// that kernels/cpu/ref/peer_ref.h's peer_backward_ref and kernels/cpu/peer.h's peer_backward
// compute, from the forward's x and routing and the upstream dy. Results match the oracle
// within the tolerances written in tests/cuda_peer_backward_test.cc (fp32 accumulation in
// another order: warp-tree dot products, cuBLAS GEMMs; double where the CPU path uses double).
//
// The expert tables' gradients stay row-sparse, one row per unique expert in ascending id
// order, as PeerGrads says; no [N, D] buffer exists anywhere. They are aggregated by sorting
// (expert id, slot) pairs (a stable radix sort) and summing each expert's segment of slots in
// slot order - no atomics, so a hot expert costs a longer segment, never contention - and the
// sub-key gradients the same way by key row.
//
// This header carries no CUDA types and includes no CUDA header; it is plain C++17 because .cu
// files include it.
#pragma once

#include <cstdint>

#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"

namespace trove {

// Host pointers in and out, shapes as peer_backward_ref: x [T, D], dy [T, D_out],
// routing [T, h, k] (from the forward on this x), records[slot] the layout.stride bytes of
// expert routing.ids[slot] (any dtype of kernels/record.h, width 1). The distinct records are
// copied to the device once each, the gradients computed there and copied back into `grads`
// (every field resized; d_query_bias empty without a bias, d_norm_weight empty without
// input_norm rms).
//
// Unlike the CPU functions, which TROVE_CHECK their REQUIRES, every input is checked and a bad
// one is an error naming the field and value: the config (validate_and_fill must accept it,
// which also means expert_width 1, and leave it unchanged), the layout (dims, width 1, dtype),
// the routing shape, every expert id in [0, n_keys^2), null pointers, and sizes a launch cannot
// index (more than 2^31 - 1 slots, tokens or rows). Then, for a non-empty batch, kNotSupported
// "no CUDA device is available ..." when there is no device; any CUDA or cuBLAS failure names
// its call. T == 0 gives the oracle's result (empty dx and expert rows, zero dense gradients)
// with no device work.
Status cuda_peer_backward(const PeerConfig& config, const PeerRouterParams& params,
                          const RecordLayout& layout, const float* x, int64_t T,
                          const PeerRouting& routing, const uint8_t* const* records,
                          const float* dy, PeerGrads* grads);

}  // namespace trove
