// runtime/overlay_source: changed records in memory over a source that still holds the old
// ones. The overlay's copy wins, the base serves the rest, in both acquire forms; release and
// reset_base reach the base.
#include "runtime/tiers/overlay_source.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

namespace trove {
namespace {

// A base that records what it was asked for.
class CountingSource final : public ExpertSource {
 public:
  CountingSource(const RecordLayout& layout, int64_t n, uint8_t fill)
      : layout_(layout), records_(static_cast<size_t>(n) * layout.stride, fill) {}
  const RecordLayout& layout() const override { return layout_; }
  int64_t num_experts() const override {
    return static_cast<int64_t>(records_.size() / layout_.stride);
  }
  std::string describe() const override { return "counting"; }
  Status acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override {
    asked.assign(ids.begin(), ids.end());
    for (size_t i = 0; i < ids.size(); ++i) {
      records[i] = &records_[static_cast<size_t>(ids[i]) * layout_.stride];
    }
    return Status::ok_status();
  }
  void release(std::span<const int64_t> ids) override { released.assign(ids.begin(), ids.end()); }

  std::vector<int64_t> asked, released;

 private:
  RecordLayout layout_;
  std::vector<uint8_t> records_;
};

TEST(OverlaySource, OverlayCopiesWinAndTheBaseServesTheRest) {
  auto layout = RecordLayout::make(DType::kI4, 40, 24, 1);
  ASSERT_TRUE(layout.ok());
  RecordOverlay dirty(layout->stride);
  auto base = std::make_unique<CountingSource>(*layout, 10, 0x11);
  CountingSource* b = base.get();
  OverlayExpertSource source(std::move(base), &dirty);
  std::memset(dirty.put(7), 0x77, layout->stride);
  std::memset(dirty.put(2), 0x22, layout->stride);
  EXPECT_EQ(dirty.size(), 2u);
  EXPECT_EQ(dirty.sorted_ids(), (std::vector<int64_t>{2, 7}));
  EXPECT_GE(dirty.bytes(), 2 * layout->stride);
  EXPECT_EQ(dirty.put(7)[0], 0x77);  // put of an id held returns its copy

  const std::vector<int64_t> ids = {1, 2, 5, 7, 9};
  for (bool two_halves : {false, true}) {
    std::vector<const uint8_t*> recs(ids.size());
    if (two_halves) {
      ASSERT_TRUE(source.begin_acquire(ids, recs).ok());
      ASSERT_TRUE(source.finish_acquire(ids, recs).ok());
    } else {
      ASSERT_TRUE(source.acquire(ids, recs).ok());
    }
    EXPECT_EQ(b->asked, (std::vector<int64_t>{1, 5, 9}));
    const uint8_t want[] = {0x11, 0x22, 0x11, 0x77, 0x11};
    for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(recs[i][0], want[i]) << ids[i];
    source.release(ids);
    EXPECT_EQ(b->released, (std::vector<int64_t>{1, 5, 9}));
  }
  // Cleared: everything from the (new) base.
  dirty.clear();
  source.reset_base(std::make_unique<CountingSource>(*layout, 10, 0x33));
  std::vector<const uint8_t*> recs(ids.size());
  ASSERT_TRUE(source.acquire(ids, recs).ok());
  for (const uint8_t* r : recs) EXPECT_EQ(r[0], 0x33);
  source.release(ids);
  EXPECT_EQ(source.num_experts(), 10);
}

}  // namespace
}  // namespace trove
