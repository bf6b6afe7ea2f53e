// Metrics: one type for what a run counted and how long its steps took, for every command and
// the Python side: counters (integer counts and summed reals) and latency histograms, added up
// with += and written with to_json. A dotted name nests: "host.hits" is {"host": {"hits": n}}.
//
//   Metrics m;
//   m.count("tokens", T);
//   m.add("host.disk_seconds", s.disk_seconds);
//   m.observe("route", route_seconds);       // a histogram: one sample per call
//   total += m;
//   total.to_json();  // {"host": {"disk_seconds": ..}, "route": {"count": .., "p50": ..}, ..}
//
// Not thread-safe; one Metrics per thread, summed at the end.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace trove {

// Samples of one latency (seconds). Exact percentiles: the samples are kept (a run's batches
// number thousands, not millions).
class LatencyHistogram {
 public:
  void observe(double seconds) { samples_.push_back(seconds); }
  LatencyHistogram& operator+=(const LatencyHistogram& o);

  int64_t count() const { return static_cast<int64_t>(samples_.size()); }
  double sum() const;
  // The q-th quantile (q in [0, 1]) by the nearest rank; 0 without samples.
  double quantile(double q) const;
  // {"count", "sum", "mean", "p50", "p90", "p99", "max"}.
  nlohmann::json to_json() const;

 private:
  std::vector<double> samples_;
};

class Metrics {
 public:
  // Counters: created at 0 by the first call. A name is an integer or a real counter, not both
  // (TROVE_CHECK), nor also a histogram.
  void count(std::string_view name, int64_t n = 1);
  void add(std::string_view name, double v);
  void observe(std::string_view name, double seconds);

  int64_t counter(std::string_view name) const;                    // 0 when never counted
  double real(std::string_view name) const;                        // 0 when never added
  const LatencyHistogram* histogram(std::string_view name) const;  // null when never observed

  // Counters add, histograms merge their samples.
  Metrics& operator+=(const Metrics& o);

  // One object; each dotted name nested; a histogram as LatencyHistogram::to_json.
  nlohmann::json to_json() const;

 private:
  std::map<std::string, int64_t, std::less<>> counts_;
  std::map<std::string, double, std::less<>> reals_;
  std::map<std::string, LatencyHistogram, std::less<>> histograms_;
};

}  // namespace trove
