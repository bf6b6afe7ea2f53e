#include "base/metrics.h"

#include <algorithm>
#include <cmath>

#include "base/check.h"

namespace trove {

namespace {

// j at the dotted path `name`, the objects on the way created.
nlohmann::json& at_path(nlohmann::json& j, std::string_view name) {
  nlohmann::json* node = &j;
  for (;;) {
    const size_t dot = name.find('.');
    const std::string key(name.substr(0, dot));
    if (dot == std::string_view::npos) return (*node)[key];
    nlohmann::json& child = (*node)[key];
    TROVE_CHECK_MSG(child.is_null() || child.is_object(),
                    "metric %.*s: '%s' is a value and a group", static_cast<int>(name.size()),
                    name.data(), key.c_str());
    node = &child;
    name.remove_prefix(dot + 1);
  }
}

}  // namespace

LatencyHistogram& LatencyHistogram::operator+=(const LatencyHistogram& o) {
  samples_.insert(samples_.end(), o.samples_.begin(), o.samples_.end());
  return *this;
}

double LatencyHistogram::sum() const {
  double s = 0;
  for (double v : samples_) s += v;
  return s;
}

double LatencyHistogram::quantile(double q) const {
  if (samples_.empty()) return 0;
  std::vector<double> sorted = samples_;
  std::sort(sorted.begin(), sorted.end());
  const double rank = std::ceil(std::clamp(q, 0.0, 1.0) * static_cast<double>(sorted.size()));
  const size_t i = rank < 1 ? 0 : static_cast<size_t>(rank) - 1;
  return sorted[std::min(i, sorted.size() - 1)];
}

nlohmann::json LatencyHistogram::to_json() const {
  const int64_t n = count();
  return {{"count", n},
          {"sum", sum()},
          {"mean", n > 0 ? sum() / static_cast<double>(n) : 0.0},
          {"p50", quantile(0.5)},
          {"p90", quantile(0.9)},
          {"p99", quantile(0.99)},
          {"max", quantile(1.0)}};
}

void Metrics::count(std::string_view name, int64_t n) {
  TROVE_CHECK(!reals_.contains(name) && !histograms_.contains(name));
  auto it = counts_.find(name);
  if (it == counts_.end()) it = counts_.emplace(std::string(name), 0).first;
  it->second += n;
}

void Metrics::add(std::string_view name, double v) {
  TROVE_CHECK(!counts_.contains(name) && !histograms_.contains(name));
  auto it = reals_.find(name);
  if (it == reals_.end()) it = reals_.emplace(std::string(name), 0.0).first;
  it->second += v;
}

void Metrics::observe(std::string_view name, double seconds) {
  TROVE_CHECK(!counts_.contains(name) && !reals_.contains(name));
  auto it = histograms_.find(name);
  if (it == histograms_.end())
    it = histograms_.emplace(std::string(name), LatencyHistogram{}).first;
  it->second.observe(seconds);
}

int64_t Metrics::counter(std::string_view name) const {
  auto it = counts_.find(name);
  return it == counts_.end() ? 0 : it->second;
}

double Metrics::real(std::string_view name) const {
  auto it = reals_.find(name);
  return it == reals_.end() ? 0.0 : it->second;
}

const LatencyHistogram* Metrics::histogram(std::string_view name) const {
  auto it = histograms_.find(name);
  return it == histograms_.end() ? nullptr : &it->second;
}

Metrics& Metrics::operator+=(const Metrics& o) {
  for (const auto& [name, n] : o.counts_) count(name, n);
  for (const auto& [name, v] : o.reals_) add(name, v);
  for (const auto& [name, h] : o.histograms_) {
    TROVE_CHECK(!counts_.contains(name) && !reals_.contains(name));
    histograms_[name] += h;
  }
  return *this;
}

nlohmann::json Metrics::to_json() const {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [name, n] : counts_) at_path(j, name) = n;
  for (const auto& [name, v] : reals_) at_path(j, name) = v;
  for (const auto& [name, h] : histograms_) at_path(j, name) = h.to_json();
  return j;
}

}  // namespace trove
