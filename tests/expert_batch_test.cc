// ExpertBatch::dedupe (runtime/layer/expert_batch.h) against a plain std::set / binary search
// oracle: ascending unique ids and each slot's index, at expert counts below, at and across the
// bitmap's 64- and 4096-expert boundaries, with the first and last ids, repeats, an empty batch
// and one call after another on the same batch (its bitmaps must be clean between calls).
#include "runtime/layer/expert_batch.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <vector>

namespace trove {
namespace {

PeerRouting routing_of(const std::vector<int64_t>& ids) {
  PeerRouting r;
  r.resize(static_cast<int64_t>(ids.size()), 1, 1);
  r.ids = ids;
  return r;
}

void expect_dedupe(ExpertBatch& b, const std::vector<int64_t>& ids, int64_t n) {
  b.dedupe(routing_of(ids), n);
  const std::set<int64_t> unique(ids.begin(), ids.end());
  const std::vector<int64_t> want(unique.begin(), unique.end());
  ASSERT_EQ(b.unique_ids, want) << "n " << n << ", " << ids.size() << " slots";
  ASSERT_EQ(b.slot_index.size(), ids.size());
  for (size_t s = 0; s < ids.size(); ++s) {
    const auto at = std::lower_bound(want.begin(), want.end(), ids[s]) - want.begin();
    ASSERT_EQ(b.slot_index[s], at) << "n " << n << ", slot " << s << ", id " << ids[s];
  }
  EXPECT_EQ(b.unique_records.size(), want.size());
  EXPECT_EQ(b.slot_records.size(), ids.size());
}

TEST(ExpertBatch, DedupeGivesAscendingUniqueIdsAndEachSlotsIndex) {
  std::mt19937_64 rng(7);
  for (int64_t n : {1, 2, 63, 64, 65, 4095, 4096, 4097, 262144, 1048579}) {
    ExpertBatch b;
    for (int64_t slots : {0, 1, 5, 64, 1000, 20000}) {
      std::vector<int64_t> ids(static_cast<size_t>(slots));
      for (auto& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
      if (slots >= 5) {
        ids[0] = n - 1;
        ids[1] = 0;
        ids[2] = n - 1;
        ids[3] = std::min<int64_t>(63, n - 1);
        ids[4] = std::min<int64_t>(64, n - 1);
      }
      expect_dedupe(b, ids, n);
    }
    // A batch with few distinct experts after one with many: nothing of the first stays marked.
    expect_dedupe(b, {n / 2, n / 2, n / 2}, n);
    expect_dedupe(b, {}, n);
  }
}

TEST(ExpertBatch, EveryExpertOnceComesOutInOrder) {
  const int64_t n = 9000;
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = n - 1 - i;
  ExpertBatch b;
  expect_dedupe(b, ids, n);
}

}  // namespace
}  // namespace trove
