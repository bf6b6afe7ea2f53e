#include "runtime/layer/routing_stats.h"

#include <algorithm>
#include <cmath>

namespace trove {

RoutingStats::RoutingStats(int64_t num_experts) : counts_(static_cast<size_t>(num_experts), 0) {}

void RoutingStats::add(const PeerRouting& routing) {
  tokens_ += routing.tokens;
  selections_ += static_cast<int64_t>(routing.ids.size());
  for (int64_t id : routing.ids) {
    uint32_t& c = counts_[static_cast<size_t>(id)];
    if (c == 0) ++used_;
    c = c == UINT32_MAX ? c : c + 1;
  }
  scratch_ = routing.ids;
  std::sort(scratch_.begin(), scratch_.end());
  unique_per_batch_.push_back(std::unique(scratch_.begin(), scratch_.end()) - scratch_.begin());
}

double RoutingStats::usage() const {
  return counts_.empty() ? 0.0 : static_cast<double>(used_) / static_cast<double>(counts_.size());
}

double RoutingStats::kl_from_uniform() const {
  if (selections_ == 0) return 0.0;
  const double total = static_cast<double>(selections_);
  const double n = static_cast<double>(counts_.size());
  double kl = 0;
  for (uint32_t c : counts_) {
    if (c == 0) continue;
    const double p = c / total;
    kl += p * std::log(p * n);
  }
  return std::max(kl, 0.0);
}

double RoutingStats::max_share() const {
  if (selections_ == 0) return 0.0;
  return *std::max_element(counts_.begin(), counts_.end()) / static_cast<double>(selections_);
}

}  // namespace trove
