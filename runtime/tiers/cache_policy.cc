#include "runtime/tiers/cache_policy.h"

#include <algorithm>
#include <array>
#include <bit>
#include <string>
#include <vector>

#include "base/check.h"

namespace trove {

const char* eviction_policy_name(EvictionPolicy policy) {
  switch (policy) {
    case EvictionPolicy::kLru:
      return "lru";
    case EvictionPolicy::kClock:
      return "clock";
    case EvictionPolicy::kFrequency:
      return "frequency";
  }
  return "?";
}

Result<EvictionPolicy> parse_eviction_policy(std::string_view name) {
  for (EvictionPolicy p :
       {EvictionPolicy::kLru, EvictionPolicy::kClock, EvictionPolicy::kFrequency}) {
    if (name == eviction_policy_name(p)) return p;
  }
  return Status::invalid_argument("unknown eviction policy '" + std::string(name) +
                                  "': expected lru, clock or frequency");
}

namespace {

// Doubly linked lists threaded through two arrays: nodes [0, nodes) are slots, nodes
// [nodes, nodes + lists) are the lists' sentinels. A slot is on at most one list; every
// operation is O(1) and nothing is allocated after construction.
class SlotLists {
 public:
  SlotLists(int32_t nodes, int32_t lists)
      : nodes_(nodes),
        prev_(static_cast<size_t>(nodes) + lists, -1),
        next_(static_cast<size_t>(nodes) + lists, -1) {
    for (int32_t l = 0; l < lists; ++l) prev_[sentinel(l)] = next_[sentinel(l)] = sentinel(l);
  }

  bool linked(int32_t slot) const { return next_[slot] >= 0; }
  void prefetch(int32_t slot) const {
    __builtin_prefetch(&prev_[static_cast<size_t>(slot)], 1);
    __builtin_prefetch(&next_[static_cast<size_t>(slot)], 1);
  }
  bool empty(int32_t list) const { return next_[sentinel(list)] == sentinel(list); }
  // REQUIRES: !empty(list).
  int32_t front(int32_t list) const { return next_[sentinel(list)]; }

  // REQUIRES: !linked(slot).
  void push_back(int32_t list, int32_t slot) {
    const int32_t s = sentinel(list);
    const int32_t last = prev_[s];
    next_[last] = slot;
    prev_[slot] = last;
    next_[slot] = s;
    prev_[s] = slot;
  }
  // REQUIRES: linked(slot).
  void unlink(int32_t slot) {
    next_[prev_[slot]] = next_[slot];
    prev_[next_[slot]] = prev_[slot];
    prev_[slot] = next_[slot] = -1;
  }

 private:
  int32_t sentinel(int32_t list) const { return nodes_ + list; }

  int32_t nodes_;
  std::vector<int32_t> prev_;
  std::vector<int32_t> next_;
};

// LRU as LevelDB's Cache keeps it: unleased entries on one list, least recently released at
// the front; a leased entry is off the list, and its recency is the moment its last lease
// ends (its use is over then, not when the batch asked for it).
class LruPolicy final : public ReplacementPolicy {
 public:
  explicit LruPolicy(int32_t capacity) : lists_(capacity, 1) {}

  EvictionPolicy kind() const override { return EvictionPolicy::kLru; }
  void on_insert(int32_t, int64_t) override {}
  void on_hit(int32_t, int64_t) override {}
  void on_pin(int32_t slot) override { lists_.unlink(slot); }
  void on_unpin(int32_t slot) override { lists_.push_back(0, slot); }
  void prefetch(int32_t slot, int64_t) const override { lists_.prefetch(slot); }
  int32_t pick_victim() override { return lists_.empty(0) ? -1 : lists_.front(0); }
  void on_evict(int32_t slot) override {
    if (lists_.linked(slot)) lists_.unlink(slot);
  }

 private:
  SlotLists lists_;
};

// CLOCK (second chance): a hand sweeps the slots in order; an unleased entry with its
// reference bit set loses the bit and is passed over, the first one found clear is the victim.
// Inserts and hits set the bit. Leased slots stay in the ring and are stepped over; the hand
// finds a victim within two sweeps whenever there is an unleased entry (counted, so a ring with
// none answers -1 at once).
class ClockPolicy final : public ReplacementPolicy {
 public:
  explicit ClockPolicy(int32_t capacity)
      : state_(static_cast<size_t>(capacity), kEmpty), referenced_(static_cast<size_t>(capacity)) {}

  EvictionPolicy kind() const override { return EvictionPolicy::kClock; }
  void on_insert(int32_t slot, int64_t) override {
    state_[slot] = kLeased;
    referenced_[slot] = 1;
  }
  void on_hit(int32_t slot, int64_t) override { referenced_[slot] = 1; }
  void on_pin(int32_t slot) override {
    state_[slot] = kLeased;
    --candidates_;
  }
  void on_unpin(int32_t slot) override {
    state_[slot] = kCandidate;
    ++candidates_;
  }
  void prefetch(int32_t slot, int64_t) const override {
    __builtin_prefetch(&state_[static_cast<size_t>(slot)], 1);
    __builtin_prefetch(&referenced_[static_cast<size_t>(slot)], 1);
  }
  int32_t pick_victim() override {
    if (candidates_ == 0) return -1;
    const auto n = static_cast<int32_t>(state_.size());
    for (;;) {
      const int32_t slot = hand_;
      hand_ = hand_ + 1 == n ? 0 : hand_ + 1;
      if (state_[slot] != kCandidate) continue;
      if (referenced_[slot]) {
        referenced_[slot] = 0;
        continue;
      }
      return slot;
    }
  }
  void on_evict(int32_t slot) override {
    if (state_[slot] == kCandidate) --candidates_;
    state_[slot] = kEmpty;
    referenced_[slot] = 0;
  }

 private:
  enum : uint8_t { kEmpty, kLeased, kCandidate };
  std::vector<uint8_t> state_;
  std::vector<uint8_t> referenced_;
  int32_t hand_ = 0;
  int64_t candidates_ = 0;
};

// Frequency-aware: evict the unleased entry whose expert was asked for least often lately,
// the least recently released among equals.
//
// Why this one. PEER routing is skewed and its popularity changes slowly (it follows the
// learned keys), so the best fixed-size set to hold is close to "the most popular experts"
// (what LFU converges to under independent references), and what matters is judging an
// expert by more than its time in the cache. Two ideas from TinyLFU (Einziger et al.) do that:
// the access history outlives residency, so an evicted hot expert comes back with its count
// and is not the next victim; and counts are halved every window of accesses so the history follows
// drift and a once-hot expert cannot squat. TinyLFU keeps the history in a count-min sketch
// because keys are arbitrary; expert ids are dense, so here it is exact: one 32-bit word per
// expert (an 8-bit saturating count and the 24-bit epoch it was last aged to, aged lazily on
// access). TinyLFU's admission filter is left out because a tier cannot refuse a miss: the
// batch needs the record resident while it computes. A newly inserted expert with a low count
// is simply the first victim once its batch is done, which is what admission would achieve.
// CLOCK with a small counter (GCLOCK) would forget everything on eviction, which is exactly
// when a skewed workload needs the memory.
//
// Structure: unleased entries sit on one list per count value (256), each in release order;
// pick_victim takes the front of the lowest non-empty list (a 256-bit occupancy mask); every
// operation is O(1). Aging re-files each unleased entry once per window of
// kAgingWindowPerSlot * capacity accesses, O(1) amortized per access.
class FrequencyPolicy final : public ReplacementPolicy {
 public:
  // Counts are halved every kAgingWindowPerSlot * capacity accesses. TinyLFU uses 10; on
  // zipf:1.09 (1M experts, 10% resident, 256 batches of 2048x32 ids) 10 gives a hit rate of
  // 0.635, 20 0.642, 40 and never 0.644: experts at the edge of the resident set are asked
  // for once in ~50 batches, so a short window cannot tell them apart. 32 keeps nearly all of
  // that and still forgets a shifted popularity after ~32 capacities' worth of accesses.
  static constexpr int64_t kAgingWindowPerSlot = 32;

  FrequencyPolicy(int32_t capacity, int64_t num_experts)
      : history_(static_cast<size_t>(num_experts), 0),
        slot_id_(static_cast<size_t>(capacity), -1),
        slot_count_(static_cast<size_t>(capacity), 0),
        lists_(capacity, kCounts),
        window_(std::max<int64_t>(kAgingWindowPerSlot * capacity, 64)) {}

  EvictionPolicy kind() const override { return EvictionPolicy::kFrequency; }
  void on_insert(int32_t slot, int64_t id) override {
    slot_id_[slot] = id;
    touch(id);
  }
  void on_hit(int32_t, int64_t id) override { touch(id); }
  void on_pin(int32_t slot) override { unlink(slot); }
  void on_unpin(int32_t slot) override { file(slot, aged_count(slot_id_[slot])); }
  void prefetch(int32_t slot, int64_t id) const override {
    __builtin_prefetch(&history_[static_cast<size_t>(id)], 1);
    __builtin_prefetch(&slot_id_[static_cast<size_t>(slot)], 0);
    __builtin_prefetch(&slot_count_[static_cast<size_t>(slot)], 1);
    lists_.prefetch(slot);
  }
  int32_t pick_victim() override {
    for (size_t w = 0; w < occupied_.size(); ++w) {
      if (occupied_[w] != 0) {
        const auto count = static_cast<int32_t>(w * 64 + std::countr_zero(occupied_[w]));
        return lists_.front(count);
      }
    }
    return -1;
  }
  void on_evict(int32_t slot) override {
    if (lists_.linked(slot)) unlink(slot);
    slot_id_[slot] = -1;
  }

 private:
  static constexpr int32_t kCounts = 256;  // 8-bit counts
  static constexpr uint32_t kEpochMask = (1u << 24) - 1;

  // The count of `id` aged to the current epoch. Epochs compare modulo 2^24: an expert
  // unseen for 2^24 epochs may keep a stale count, which costs a few misses, never
  // correctness.
  uint32_t aged_count(int64_t id) const {
    const uint32_t h = history_[id];
    const uint32_t behind = (epoch_ - (h >> 8)) & kEpochMask;
    return behind >= 8 ? 0 : (h & 0xff) >> behind;
  }

  void touch(int64_t id) {
    const uint32_t count = std::min<uint32_t>(aged_count(id) + 1, kCounts - 1);
    history_[id] = (epoch_ << 8) | count;
    if (++accesses_ >= window_) age();
  }

  // Halves every count: the new epoch does it lazily for the history; unleased entries are
  // re-filed now so that each still sits on the list of its aged count. Going up through the
  // counts, list c moves to c / 2, which has already been emptied, so nothing moves twice.
  void age() {
    accesses_ = 0;
    epoch_ = (epoch_ + 1) & kEpochMask;
    for (int32_t c = 1; c < kCounts; ++c) {
      while (!lists_.empty(c)) {
        const int32_t slot = lists_.front(c);
        unlink(slot);
        file(slot, static_cast<uint32_t>(c) / 2);
      }
    }
  }

  void file(int32_t slot, uint32_t count) {
    lists_.push_back(static_cast<int32_t>(count), slot);
    slot_count_[slot] = static_cast<uint8_t>(count);
    occupied_[count / 64] |= uint64_t{1} << (count % 64);
  }
  void unlink(int32_t slot) {
    lists_.unlink(slot);
    const uint32_t count = slot_count_[slot];
    if (lists_.empty(static_cast<int32_t>(count))) {
      occupied_[count / 64] &= ~(uint64_t{1} << (count % 64));
    }
  }

  std::vector<uint32_t> history_;    // per expert: epoch << 8 | count
  std::vector<int64_t> slot_id_;     // per slot: the expert held, -1 when empty
  std::vector<uint8_t> slot_count_;  // per unleased slot: the list it is on
  SlotLists lists_;
  std::array<uint64_t, kCounts / 64> occupied_{};
  uint32_t epoch_ = 0;
  int64_t accesses_ = 0;
  int64_t window_;
};

}  // namespace

std::unique_ptr<ReplacementPolicy> make_replacement_policy(EvictionPolicy policy,
                                                           int32_t capacity_slots,
                                                           int64_t num_experts) {
  TROVE_CHECK(capacity_slots >= 1 && capacity_slots < INT32_MAX && num_experts >= 1);
  switch (policy) {
    case EvictionPolicy::kLru:
      return std::make_unique<LruPolicy>(capacity_slots);
    case EvictionPolicy::kClock:
      return std::make_unique<ClockPolicy>(capacity_slots);
    case EvictionPolicy::kFrequency:
      return std::make_unique<FrequencyPolicy>(capacity_slots, num_experts);
  }
  TROVE_CHECK_MSG(false, "unknown eviction policy %d", static_cast<int>(policy));
  return nullptr;
}

}  // namespace trove
