// Replacement policies for a residency tier (runtime/tiers/expert_cache.h): which resident expert
// gives up its slot when a batch needs room. A policy sees only slots and expert ids; the cache
// owns the index, the leases and the memory, and drives a policy through the calls below under
// its lock. Adding a policy is one class here plus one enum value.
//
// Leases follow LevelDB's Cache: an entry in use (leased) is kept out of the policy's candidate
// structures (on_pin) and re-enters them when its last lease ends (on_unpin), so pick_victim
// never walks over in-use entries in the list-based policies and never returns one in any.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "base/status.h"

namespace trove {

enum class EvictionPolicy : uint8_t {
  // Least recently used, recency taken when the last lease ends (LevelDB's Cache).
  kLru,
  // CLOCK: one reference bit per slot, a hand that clears bits and evicts the first clear one
  // (second chance). LRU's hit rate at a fraction of its bookkeeping.
  kClock,
  // LFU over an access history that outlives residency, aged by halving; see
  // FrequencyPolicy in cache_policy.cc for why this and not CLOCK-with-counters or TinyLFU.
  kFrequency,
};

// "lru", "clock", "frequency".
const char* eviction_policy_name(EvictionPolicy policy);
// The inverse of eviction_policy_name; an unknown name is invalid_argument listing the known.
Result<EvictionPolicy> parse_eviction_policy(std::string_view name);

// The calls a cache makes, per slot s in [0, capacity):
//   on_insert(s, id)   a miss: s now holds `id`, leased (no on_pin).
//   on_hit(s, id)      a batch asked for the entry in s (leased or not); then on_pin if it was
//                      unleased.
//   on_pin(s)          lease count 0 -> 1: s is no candidate until on_unpin.
//   on_unpin(s)        lease count -> 0: s is a candidate again.
//   pick_victim()      an unleased entry's slot, or -1 when every entry is leased; the cache
//                      then calls on_evict on it.
//   on_evict(s)        the entry leaves: a victim, or a leased entry whose fill was aborted.
// An access is one batch asking for an id, however many of its tokens chose it.
class ReplacementPolicy {
 public:
  ReplacementPolicy() = default;
  ReplacementPolicy(const ReplacementPolicy&) = delete;
  ReplacementPolicy& operator=(const ReplacementPolicy&) = delete;
  virtual ~ReplacementPolicy() = default;

  virtual EvictionPolicy kind() const = 0;
  virtual void on_insert(int32_t slot, int64_t id) = 0;
  virtual void on_hit(int32_t slot, int64_t id) = 0;
  virtual void on_pin(int32_t slot) = 0;
  virtual void on_unpin(int32_t slot) = 0;
  virtual int32_t pick_victim() = 0;
  virtual void on_evict(int32_t slot) = 0;
  // A hint, no effect on the policy: the state on_hit/on_pin/on_unpin of (slot, id) will touch
  // is about to be used (the tier prefetches a few entries ahead of its loops over a batch; a
  // batch's slots are scattered, so each touch is otherwise a cache miss).
  virtual void prefetch(int32_t /*slot*/, int64_t /*id*/) const {}
};

// A policy for `capacity_slots` slots holding ids in [0, num_experts).
// REQUIRES: 1 <= capacity_slots < INT32_MAX, num_experts >= 1.
std::unique_ptr<ReplacementPolicy> make_replacement_policy(EvictionPolicy policy,
                                                           int32_t capacity_slots,
                                                           int64_t num_experts);

}  // namespace trove
