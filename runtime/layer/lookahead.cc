#include "runtime/layer/lookahead.h"

#include <deque>

#include "base/stopwatch.h"
#include "base/strings.h"

namespace trove {

namespace {

// A batch loaded and routed ahead of its turn.
struct Ahead {
  std::vector<float> x;
  int64_t tokens = 0;
  PeerRouting routing;
  double route_seconds = 0;
};

Status run(PeerLayer& layer, int64_t batches, int depth, const LookaheadInput& input,
           const LookaheadOutput& output) {
  const int64_t dim_out = layer.config().dim_out;
  std::vector<float> y;
  PeerBatchStats stats;
  if (depth == 0) {
    std::vector<float> x;
    PeerRouting routing;
    for (int64_t b = 0; b < batches; ++b) {
      int64_t n = 0;
      TROVE_RETURN_IF_ERROR(input(b, &x, &n));
      y.resize(static_cast<size_t>(n * dim_out));
      stats = PeerBatchStats();
      TROVE_RETURN_IF_ERROR(layer.forward(x, n, y, &routing, &stats));
      TROVE_RETURN_IF_ERROR(output(b, y, routing, stats));
    }
    return Status::ok_status();
  }
  std::deque<Ahead> ahead;
  std::vector<Ahead> spare;  // their buffers, reused
  int64_t next = 0;          // the next batch to load
  for (int64_t b = 0; b < batches; ++b) {
    // Batch b itself is prefetched too (the first one only waits for it): the source consumes
    // one prefetch per batch, in order.
    for (; next < batches && next <= b + depth; ++next) {
      Ahead a;
      if (!spare.empty()) {
        a = std::move(spare.back());
        spare.pop_back();
      }
      TROVE_RETURN_IF_ERROR(input(next, &a.x, &a.tokens));
      const Stopwatch start;
      TROVE_RETURN_IF_ERROR(layer.route(a.x, a.tokens, &a.routing));
      a.route_seconds = start.seconds();
      layer.prefetch(a.routing);
      ahead.push_back(std::move(a));
    }
    Ahead& a = ahead.front();
    y.resize(static_cast<size_t>(a.tokens * dim_out));
    stats = PeerBatchStats();
    TROVE_RETURN_IF_ERROR(layer.forward_routed(a.x, a.tokens, a.routing, y, &stats));
    stats.route_seconds += a.route_seconds;
    TROVE_RETURN_IF_ERROR(output(b, y, a.routing, stats));
    spare.push_back(std::move(a));
    ahead.pop_front();
  }
  return Status::ok_status();
}

}  // namespace

Status forward_with_lookahead(PeerLayer& layer, int64_t batches, int depth,
                              const LookaheadInput& input, const LookaheadOutput& output) {
  if (depth < 0 || depth > kMaxLookahead) {
    return Status::invalid_argument(
        str_printf("look-ahead %d: expected 0 (off) to %d batches", depth, kMaxLookahead));
  }
  Status s = run(layer, batches, depth, input, output);
  // After an error, batches prefetched and never run must not be taken for the next ones.
  if (!s.ok()) layer.experts().drop_prefetches();
  return s;
}

}  // namespace trove
