#include "runtime/layer/expert_batch.h"

#include <algorithm>

#include "base/check.h"

namespace trove {

void ExpertBatch::dedupe(const PeerRouting& r, int64_t num_experts) {
  const size_t words = static_cast<size_t>((num_experts + 63) / 64);
  if (present.size() != words) {
    present.assign(words, 0);
    touched.assign((words + 63) / 64, 0);
    rank_base.assign(words, 0);
  }
  for (const int64_t id : r.ids) {
    const auto w = static_cast<size_t>(id >> 6);
    present[w] |= uint64_t{1} << (id & 63);
    touched[w >> 6] |= uint64_t{1} << (w & 63);
  }
  unique_ids.clear();
  int32_t count = 0;
  for (size_t t = 0; t < touched.size(); ++t) {
    for (uint64_t summary = touched[t]; summary != 0; summary &= summary - 1) {
      const size_t w = t * 64 + static_cast<size_t>(__builtin_ctzll(summary));
      rank_base[w] = count;
      for (uint64_t bits = present[w]; bits != 0; bits &= bits - 1) {
        unique_ids.push_back(static_cast<int64_t>(w * 64) + __builtin_ctzll(bits));
        ++count;
      }
    }
    touched[t] = 0;
  }
  slot_index.resize(r.ids.size());
  for (size_t s = 0; s < r.ids.size(); ++s) {
    const int64_t id = r.ids[s];
    const auto w = static_cast<size_t>(id >> 6);
    const uint64_t below = present[w] & ((uint64_t{1} << (id & 63)) - 1);
    slot_index[s] = rank_base[w] + __builtin_popcountll(below);
  }
  for (const int64_t id : unique_ids) present[static_cast<size_t>(id >> 6)] = 0;
  unique_records.resize(unique_ids.size());
  slot_records.resize(r.ids.size());
}

void ExpertBatch::point_slots() {
  for (size_t s = 0; s < slot_records.size(); ++s) {
    slot_records[s] = unique_records[static_cast<size_t>(slot_index[s])];
  }
}

ExpertLease::~ExpertLease() {
  if (held_) source_.release(ids_);
}

Status ExpertLease::begin(std::span<const int64_t> ids, std::span<const uint8_t*> records) {
  TROVE_CHECK(!held_);
  TROVE_RETURN_IF_ERROR(source_.begin_acquire(ids, records));
  ids_ = ids;
  held_ = true;
  return Status::ok_status();
}

Status ExpertLease::finish(std::span<const uint8_t*> records) {
  TROVE_CHECK(held_);
  Status s = source_.finish_acquire(ids_, records);
  if (!s.ok()) held_ = false;
  return s;
}

Status ExpertLease::wait_landed(std::span<const uint8_t*> records, std::vector<uint32_t>* landed) {
  TROVE_CHECK(held_);
  Status s = source_.wait_landed(ids_, records, landed);
  if (!s.ok()) held_ = false;
  return s;
}

Status ExpertLease::all(ExpertBatch& b) {
  TROVE_RETURN_IF_ERROR(begin(b.unique_ids, b.unique_records));
  TROVE_RETURN_IF_ERROR(finish(b.unique_records));
  b.point_slots();
  return Status::ok_status();
}

PeerRouterParams router_params(const PeerDenseParams& params) {
  PeerRouterParams p;
  p.query_weight = params.query_weight.data();
  p.query_bias = params.query_bias.empty() ? nullptr : params.query_bias.data();
  p.keys = params.keys.data();
  p.norm_weight = params.norm_weight.empty() ? nullptr : params.norm_weight.data();
  return p;
}

void count_batch(const PeerRouting& r, const ExpertBatch& b, uint64_t record_bytes,
                 PeerBatchStats* stats) {
  stats->tokens = r.tokens;
  stats->slots = static_cast<int64_t>(r.ids.size());
  stats->unique_experts = static_cast<int64_t>(b.unique_ids.size());
  stats->record_bytes_used = record_bytes * r.ids.size();
  stats->record_bytes_unique = record_bytes * b.unique_ids.size();
}

void report_host_batch(const PeerRouting& r, const ExpertBatch& b, const ExpertSource& source,
                       double acquire_seconds, double seconds, PeerBatchStats* stats) {
  count_batch(r, b, source.layout().record_bytes, stats);
  stats->fetch = source.last_fetch();
  stats->acquire_seconds = acquire_seconds;
  stats->expert_seconds = std::max(0.0, seconds - stats->fetch.stall_seconds);
}

}  // namespace trove
