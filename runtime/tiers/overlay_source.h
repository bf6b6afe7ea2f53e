// Records changed in memory over a source that still holds the old ones: the trainer's dirty
// records between checkpoints. A RecordOverlay holds copies of some records by expert id; an
// OverlayExpertSource hands out the overlay's copy of an expert when there is one and the base
// source's record otherwise, so a PEER layer computes on the trained records while the store
// (mapped or tiered) still holds the last committed generation.
//
//   RecordOverlay dirty(layout.stride);
//   auto source = std::make_unique<OverlayExpertSource>(std::move(base), &dirty);
//   std::memcpy(dirty.put(id), updated, layout.stride);   // between batches
//   ... commit dirty.sorted_ids() to the store, then dirty.clear() and reset_base(new base)
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/tiers/expert_source.h"

namespace trove {

class RecordOverlay {
 public:
  explicit RecordOverlay(size_t stride) : stride_(stride) {}

  // The copy of expert `id`, or nullptr.
  const uint8_t* find(int64_t id) const;
  // The copy of expert `id` to write into; a new one (zeroed) when there is none. Pointers from
  // find() and put() stay valid until the next put() of a new id or clear().
  uint8_t* put(int64_t id);
  // The ids held, ascending.
  std::vector<int64_t> sorted_ids() const;
  size_t size() const { return index_.size(); }
  size_t stride() const { return stride_; }
  // Memory held for the copies (what the buffer has reserved, not only what is used).
  uint64_t bytes() const { return static_cast<uint64_t>(data_.capacity()); }
  void clear();

 private:
  size_t stride_;
  std::unordered_map<int64_t, size_t> index_;  // id -> record number in data_
  std::vector<uint8_t> data_;
};

class OverlayExpertSource final : public ExpertSource {
 public:
  // REQUIRES: `overlay` outlives the source and its stride is base->layout().stride; it does
  // not change between a batch's acquire and release.
  OverlayExpertSource(std::unique_ptr<ExpertSource> base, const RecordOverlay* overlay);

  // Replaces the base (after the overlay's records were committed to a new generation).
  // REQUIRES: nothing acquired; the same layout and number of experts.
  void reset_base(std::unique_ptr<ExpertSource> base) { base_ = std::move(base); }
  ExpertSource& base() { return *base_; }

  const RecordLayout& layout() const override { return base_->layout(); }
  int64_t num_experts() const override { return base_->num_experts(); }
  std::string describe() const override;
  Status acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override;
  void release(std::span<const int64_t> ids) override;
  Status begin_acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override;
  Status finish_acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override;
  Status check_batch(int64_t max_unique, const std::string& what) const override {
    return base_->check_batch(max_unique, what);
  }
  ExpertFetchStats last_fetch() const override { return base_->last_fetch(); }

 private:
  // Splits ids into the overlay's (records set) and the base's (base_ids_, base_at_).
  void split(std::span<const int64_t> ids, std::span<const uint8_t*> records);

  std::unique_ptr<ExpertSource> base_;
  const RecordOverlay* overlay_;
  std::vector<int64_t> base_ids_;          // the batch's ids the base serves, ascending
  std::vector<size_t> base_at_;            // their positions in the caller's ids
  std::vector<const uint8_t*> base_recs_;  // the base's pointers for them
};

}  // namespace trove
