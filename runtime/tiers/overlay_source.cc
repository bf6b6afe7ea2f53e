#include "runtime/tiers/overlay_source.h"

#include <algorithm>
#include <cstring>

namespace trove {

const uint8_t* RecordOverlay::find(int64_t id) const {
  auto it = index_.find(id);
  return it == index_.end() ? nullptr : &data_[it->second * stride_];
}

uint8_t* RecordOverlay::put(int64_t id) {
  auto [it, added] = index_.try_emplace(id, index_.size());
  if (added) data_.resize(data_.size() + stride_, 0);
  return &data_[it->second * stride_];
}

std::vector<int64_t> RecordOverlay::sorted_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(index_.size());
  for (const auto& [id, at] : index_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

void RecordOverlay::clear() {
  index_.clear();
  data_.clear();
  data_.shrink_to_fit();
}

OverlayExpertSource::OverlayExpertSource(std::unique_ptr<ExpertSource> base,
                                         const RecordOverlay* overlay)
    : base_(std::move(base)), overlay_(overlay) {}

std::string OverlayExpertSource::describe() const {
  return base_->describe() + " with " + std::to_string(overlay_->size()) +
         " records changed in memory";
}

void OverlayExpertSource::split(std::span<const int64_t> ids, std::span<const uint8_t*> records) {
  base_ids_.clear();
  base_at_.clear();
  for (size_t i = 0; i < ids.size(); ++i) {
    records[i] = overlay_->find(ids[i]);
    if (records[i] == nullptr) {
      base_ids_.push_back(ids[i]);
      base_at_.push_back(i);
    }
  }
  base_recs_.assign(base_ids_.size(), nullptr);
}

Status OverlayExpertSource::acquire(std::span<const int64_t> ids,
                                    std::span<const uint8_t*> records) {
  split(ids, records);
  TROVE_RETURN_IF_ERROR(base_->acquire(base_ids_, base_recs_));
  for (size_t j = 0; j < base_ids_.size(); ++j) records[base_at_[j]] = base_recs_[j];
  return Status::ok_status();
}

Status OverlayExpertSource::begin_acquire(std::span<const int64_t> ids,
                                          std::span<const uint8_t*> records) {
  split(ids, records);
  TROVE_RETURN_IF_ERROR(base_->begin_acquire(base_ids_, base_recs_));
  for (size_t j = 0; j < base_ids_.size(); ++j) records[base_at_[j]] = base_recs_[j];
  return Status::ok_status();
}

Status OverlayExpertSource::finish_acquire(std::span<const int64_t>,
                                           std::span<const uint8_t*> records) {
  TROVE_RETURN_IF_ERROR(base_->finish_acquire(base_ids_, base_recs_));
  for (size_t j = 0; j < base_ids_.size(); ++j) records[base_at_[j]] = base_recs_[j];
  return Status::ok_status();
}

void OverlayExpertSource::release(std::span<const int64_t>) {
  base_->release(base_ids_);
}

}  // namespace trove
