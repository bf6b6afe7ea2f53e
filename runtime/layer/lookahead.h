// Look-ahead across batches (issue 17): a driver that runs a PEER layer over a stream of batches
// routes batches b+1..b+depth and tells the layer's expert source which experts they will use
// (PeerLayer::prefetch) before batch b computes, so a tiered source reads their misses while b
// computes instead of when they begin (runtime/tiers/tiered_source.h has the timeline):
//
//   batch b      route b+depth, prefetch ─ forward_routed(b): consume b's prefetch, compute
//   disk              ██████ reads of b+1 .. b+depth (issued earlier) ██████
//
// Each batch is routed once, ahead, and run by forward_routed() with that routing: y equals
// forward()'s bit for bit, at any depth. Depth 0 is plain forward(), one batch after another.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "base/status.h"
#include "kernels/peer.h"
#include "runtime/layer/peer_layer.h"

namespace trove {

// Batch b's input: x [tokens, D] into *x (resized by the callee), tokens into *tokens.
using LookaheadInput = std::function<Status(int64_t b, std::vector<float>* x, int64_t* tokens)>;
// Batch b's output y [tokens, D_out], its routing and what it cost (stats.route_seconds is its
// routing's, done ahead).
using LookaheadOutput = std::function<Status(
    int64_t b, std::span<const float> y, const PeerRouting& routing, const PeerBatchStats& stats)>;

// Runs `layer` over batches 0 .. batches - 1 in order, with `depth` batches of look-ahead.
// Errors: depth < 0 or > kMaxLookahead (invalid_argument), and whatever input, the layer or
// output return (the first; prefetches still pending are dropped).
constexpr int kMaxLookahead = 8;
Status forward_with_lookahead(PeerLayer& layer, int64_t batches, int depth,
                              const LookaheadInput& input, const LookaheadOutput& output);

}  // namespace trove
