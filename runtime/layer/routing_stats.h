// Statistics of the experts a layer selects (`trove forward --stats`), as the PEER paper
// reports them: expert usage (the fraction of all experts selected at least once), unevenness
// (KL divergence of the selection distribution from uniform, in nats; 0 is perfectly even,
// log N is everything on one expert), and unique experts per batch (what a cache must hold).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/peer.h"

namespace trove {

class RoutingStats {
 public:
  explicit RoutingStats(int64_t num_experts);

  // One batch's routing.
  void add(const PeerRouting& routing);

  int64_t num_experts() const { return static_cast<int64_t>(counts_.size()); }
  int64_t tokens() const { return tokens_; }
  int64_t selections() const { return selections_; }  // tokens * h * k
  int64_t batches() const { return static_cast<int64_t>(unique_per_batch_.size()); }
  int64_t experts_used() const { return used_; }
  double usage() const;            // experts_used / N
  double kl_from_uniform() const;  // sum_e p_e log(p_e N), p_e = count_e / selections
  const std::vector<int64_t>& unique_per_batch() const { return unique_per_batch_; }
  // Share of all selections taken by the most selected expert.
  double max_share() const;

 private:
  std::vector<uint32_t> counts_;
  int64_t tokens_ = 0;
  int64_t selections_ = 0;
  int64_t used_ = 0;
  std::vector<int64_t> unique_per_batch_;
  std::vector<int64_t> scratch_;
};

}  // namespace trove
