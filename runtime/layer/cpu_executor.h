// The cpu executor (runtime/layer/peer_executor.h): the PEER layer's SIMD + threaded kernels
// (kernels/cpu/peer.h). Its expert pass overlaps the expert source's fetch: wave 1 runs on the
// records that are here while the tiers read the rest, a wave per landing group as each lands
// (TieredSourceOptions::landing_groups), the last on the rest (runtime/tiers/tiered_source.h
// has the timeline; the result does not depend on which records
// came late, kernels/cpu/peer.h: peer_experts_resume).
#pragma once

#include <memory>

#include "kernels/peer.h"

namespace trove {

class PeerExecutor;

// PeerLayerOptions::cpu.
struct CpuExecutorOptions {
  // The expert stage's down-row dots on int8/int4 records (kernels/cpu/peer.h). kInt8 quantizes
  // each token's xhat to int8 for integer dot products: faster where compute bounds the stage,
  // outside the fp32 parity tolerances, hence off by default.
  ExpertDot expert_dot = ExpertDot::kFloat;
  // The router's query projection and sub-key scores (kernels/peer.h): kBf16 rounds their
  // operands to bf16 (vdpbf16ps on CPUs with AVX512_BF16): faster, may select other experts where
  // scores are within bf16's rounding of each other, hence off by default. The backward recomputes
  // q in fp32 (the routing it is given is whichever the forward chose).
  RoutingPrecision routing_precision = RoutingPrecision::kF32;
};

// `threads`: 0 for all cores.
std::unique_ptr<PeerExecutor> make_cpu_executor(const PeerConfig& config, int threads,
                                                const CpuExecutorOptions& options);

}  // namespace trove
