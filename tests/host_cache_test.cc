// The host tier's residency cache: each policy's choices on hand-built sequences, leases,
// the budget errors, aborted fills, slot memory, metrics, concurrent batches, and the offline
// simulator against Belady's optimum and exhaustive search.
#include "runtime/tiers/expert_cache.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "runtime/bench/cache_sim.h"
#include "runtime/tiers/cache_policy.h"

namespace trove {
namespace {

constexpr EvictionPolicy kAllPolicies[] = {EvictionPolicy::kLru, EvictionPolicy::kClock,
                                           EvictionPolicy::kFrequency};

// A cache of `slots` slots of 40-byte records (64-byte stride) over `num_experts` ids.
std::unique_ptr<ExpertCache> make_cache(int64_t slots, EvictionPolicy policy,
                                        int64_t num_experts = 1000) {
  ExpertCacheOptions o;
  o.budget_bytes = static_cast<uint64_t>(slots) * 64;
  o.slot_bytes = 40;
  o.num_experts = num_experts;
  o.policy = policy;
  auto cache = ExpertCache::create(o);
  EXPECT_TRUE(cache.ok()) << cache.status().to_string();
  EXPECT_EQ((*cache)->capacity_slots(), std::min(slots, num_experts));
  return std::move(cache).value();
}

// A record's content, derived from its id: its first 8 bytes are the id.
void write_record(uint8_t* slot, size_t bytes, int64_t id) {
  std::memcpy(slot, &id, sizeof(id));
  for (size_t b = sizeof(id); b < bytes; ++b) slot[b] = static_cast<uint8_t>(id * 31 + b);
}
bool holds_record(const uint8_t* slot, size_t bytes, int64_t id) {
  int64_t stored;
  std::memcpy(&stored, slot, sizeof(stored));
  if (stored != id) return false;
  for (size_t b = sizeof(id); b < bytes; ++b) {
    if (slot[b] != static_cast<uint8_t>(id * 31 + b)) return false;
  }
  return true;
}

// One batch start to end (admit, fill the misses, commit, check, release); returns its misses.
std::vector<int64_t> run_batch(ExpertCache& cache, const std::vector<int64_t>& ids) {
  CacheBatch batch;
  Status s = cache.admit(ids, &batch);
  EXPECT_TRUE(s.ok()) << s.to_string();
  if (!s.ok()) return {};
  const size_t bytes = cache.options().slot_bytes;
  std::vector<int64_t> misses;
  for (const uint32_t i : batch.miss_index) {
    write_record(batch.slots[i], bytes, ids[i]);
    misses.push_back(ids[i]);
  }
  cache.commit_fills(ids, batch);
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_TRUE(holds_record(batch.slots[i], bytes, ids[i])) << "expert " << ids[i];
  }
  cache.release(ids);
  return misses;
}

std::vector<int64_t> resident(const ExpertCache& cache, int64_t num_experts) {
  std::vector<int64_t> ids;
  for (int64_t id = 0; id < num_experts; ++id) {
    if (cache.contains(id)) ids.push_back(id);
  }
  return ids;
}

using Ids = std::vector<int64_t>;

// ---- policies on hand-built sequences --------------------------------------------------------

TEST(ExpertCache, FirstAccessMissesLaterAccessesHitTheSameSlot) {
  auto cache = make_cache(8, EvictionPolicy::kLru);
  EXPECT_EQ(run_batch(*cache, {3, 5, 8}), (Ids{3, 5, 8}));
  CacheBatch batch;
  ASSERT_TRUE(cache->admit(Ids{3, 4, 8}, &batch).ok());
  EXPECT_EQ(batch.miss_index, (std::vector<uint32_t>{1}));
  EXPECT_TRUE(holds_record(batch.slots[0], 40, 3));
  EXPECT_TRUE(holds_record(batch.slots[2], 40, 8));
  write_record(batch.slots[1], 40, 4);
  cache->commit_fills(Ids{3, 4, 8}, batch);
  cache->release(Ids{3, 4, 8});
  const CacheMetrics m = cache->metrics();
  EXPECT_EQ(m.hits, 2);
  EXPECT_EQ(m.misses, 4);
  EXPECT_EQ(m.evictions, 0);
}

TEST(ExpertCache, LruEvictsTheLeastRecentlyReleasedEntry) {
  auto cache = make_cache(3, EvictionPolicy::kLru);
  for (int64_t id : {1, 2, 3}) run_batch(*cache, {id});
  EXPECT_TRUE(run_batch(*cache, {1}).empty());  // 1 is now the most recent
  run_batch(*cache, {4});                       // evicts 2
  EXPECT_EQ(resident(*cache, 10), (Ids{1, 3, 4}));
  run_batch(*cache, {5});  // evicts 3
  EXPECT_EQ(resident(*cache, 10), (Ids{1, 4, 5}));
  EXPECT_EQ(cache->metrics().evictions, 2);
  // admit() names what it evicted (the device's residency mirror depends on it), also when the
  // fills are then aborted; a batch of hits evicts nothing.
  CacheBatch batch;
  ASSERT_TRUE(cache->admit(Ids{1, 6, 7}, &batch).ok());
  EXPECT_EQ(batch.evicted, (Ids{4, 5}));
  cache->abort_fills(Ids{1, 6, 7}, batch);
  EXPECT_EQ(resident(*cache, 10), (Ids{1}));
  ASSERT_TRUE(cache->admit(Ids{1}, &batch).ok());
  EXPECT_TRUE(batch.evicted.empty());
  cache->commit_fills(Ids{1}, batch);
  cache->release(Ids{1});
}

TEST(ExpertCache, ClockGivesAReferencedEntryOneSecondChance) {
  auto cache = make_cache(3, EvictionPolicy::kClock);
  for (int64_t id : {1, 2, 3}) run_batch(*cache, {id});  // slots 0, 1, 2, all referenced
  run_batch(*cache, {4});  // the hand clears every bit and comes back to slot 0: evicts 1
  EXPECT_EQ(resident(*cache, 10), (Ids{2, 3, 4}));
  EXPECT_TRUE(run_batch(*cache, {2}).empty());  // 2 referenced again
  run_batch(*cache, {5});                       // hand at slot 1: spares 2, evicts 3
  EXPECT_EQ(resident(*cache, 10), (Ids{2, 4, 5}));
  // 2 has had its chance; 4 (bit set when inserted) gets its own. LRU would evict 4 here.
  run_batch(*cache, {6});
  EXPECT_EQ(resident(*cache, 10), (Ids{4, 5, 6}));
}

TEST(ExpertCache, FrequencyKeepsHotExpertsThatAScanEvictsUnderLru) {
  for (EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kFrequency}) {
    SCOPED_TRACE(eviction_policy_name(policy));
    auto cache = make_cache(4, policy);
    for (int round = 0; round < 3; ++round) run_batch(*cache, {0, 1});
    for (int64_t id = 100; id < 110; ++id) run_batch(*cache, {id});  // a scan of cold experts
    const Ids expected =
        policy == EvictionPolicy::kLru ? Ids{106, 107, 108, 109} : Ids{0, 1, 108, 109};
    EXPECT_EQ(resident(*cache, 200), expected);
  }
}

TEST(ExpertCache, FrequencyRemembersAnEvictedHotExpert) {
  for (EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kFrequency}) {
    SCOPED_TRACE(eviction_policy_name(policy));
    auto cache = make_cache(2, policy);
    for (int round = 0; round < 4; ++round) run_batch(*cache, {7});
    run_batch(*cache, {8, 9});  // needs both slots: 7 must go
    EXPECT_FALSE(cache->contains(7));
    run_batch(*cache, {7});
    run_batch(*cache, {10});
    run_batch(*cache, {11});
    // LRU judges 7 by its last use only; the frequency policy by its history.
    EXPECT_EQ(cache->contains(7), policy == EvictionPolicy::kFrequency);
  }
}

TEST(ExpertCache, FrequencyAgesOutAnExpertNoLongerAskedFor) {
  auto cache = make_cache(2, EvictionPolicy::kFrequency);  // aging window: 64 accesses
  for (int round = 0; round < 5; ++round) run_batch(*cache, {0});
  int64_t next = 100;
  for (int i = 0; i < 30; ++i) run_batch(*cache, {next++});
  EXPECT_TRUE(cache->contains(0)) << "within one window a count of 5 beats a scan";
  for (int i = 0; i < 400; ++i) run_batch(*cache, {next++});
  EXPECT_FALSE(cache->contains(0)) << "halved every window, the old count must fade";
}

TEST(ReplacementPolicy, NoPolicyPicksALeasedSlot) {
  for (EvictionPolicy kind : kAllPolicies) {
    SCOPED_TRACE(eviction_policy_name(kind));
    auto policy = make_replacement_policy(kind, 5, 50);
    for (int32_t s = 0; s < 5; ++s) {
      policy->on_insert(s, 10 + s);
      policy->on_unpin(s);
    }
    policy->on_hit(2, 12);
    policy->on_pin(2);
    policy->on_hit(4, 14);
    policy->on_pin(4);
    std::vector<int32_t> victims;
    for (int32_t v; (v = policy->pick_victim()) >= 0;) {
      victims.push_back(v);
      policy->on_evict(v);
    }
    std::sort(victims.begin(), victims.end());
    EXPECT_EQ(victims, (std::vector<int32_t>{0, 1, 3}));
    policy->on_unpin(4);
    EXPECT_EQ(policy->pick_victim(), 4);
  }
}

TEST(ReplacementPolicy, NamesRoundTrip) {
  for (EvictionPolicy p : kAllPolicies) {
    auto parsed = parse_eviction_policy(eviction_policy_name(p));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, p);
  }
  auto bad = parse_eviction_policy("arc");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("lru, clock or frequency"), std::string::npos);
}

// ---- leases and budgets ----------------------------------------------------------------------

TEST(ExpertCache, LeasedEntriesAreNeverEvicted) {
  for (EvictionPolicy policy : kAllPolicies) {
    SCOPED_TRACE(eviction_policy_name(policy));
    auto cache = make_cache(4, policy);
    run_batch(*cache, {20, 21});  // unleased, evictable
    const Ids held = {1, 2, 3, 4};
    CacheBatch batch;
    ASSERT_TRUE(cache->admit(held, &batch).ok());  // evicts 20 and 21
    for (const uint32_t i : batch.miss_index) write_record(batch.slots[i], 40, held[i]);
    cache->commit_fills(held, batch);

    const CacheMetrics before = cache->metrics();
    CacheBatch next;
    Status s = cache->admit(Ids{5}, &next);
    EXPECT_EQ(s.code(), Status::Code::kResourceExhausted);
    EXPECT_NE(s.message().find("batches in flight lease 4 other slots"), std::string::npos)
        << s.message();
    CacheMetrics after = cache->metrics();
    EXPECT_EQ(after.rejected_batches, before.rejected_batches + 1);
    after.rejected_batches = before.rejected_batches;
    EXPECT_EQ(std::memcmp(&after, &before, sizeof(after)), 0) << "a rejected batch changes state";
    EXPECT_EQ(resident(*cache, 100), held);
    for (size_t i = 0; i < held.size(); ++i) EXPECT_TRUE(holds_record(batch.slots[i], 40, held[i]));

    // A batch of held experts only needs no new slot.
    EXPECT_TRUE(run_batch(*cache, {2, 3}).empty());
    cache->release(held);
    EXPECT_EQ(run_batch(*cache, {5}), (Ids{5}));
    EXPECT_EQ(cache->metrics().leased_slots, 0);
  }
}

TEST(ExpertCache, OverlappingBatchesEachHoldALease) {
  auto cache = make_cache(3, EvictionPolicy::kLru);
  CacheBatch a, b, c;
  ASSERT_TRUE(cache->admit(Ids{1, 2}, &a).ok());
  cache->commit_fills(Ids{1, 2}, a);
  ASSERT_TRUE(cache->admit(Ids{2, 3}, &b).ok());
  EXPECT_EQ(b.slots[0], a.slots[1]);
  cache->commit_fills(Ids{2, 3}, b);
  cache->release(Ids{1, 2});
  EXPECT_EQ(cache->metrics().leased_slots, 2);  // 2 and 3, still held by b
  EXPECT_EQ(cache->admit(Ids{4, 5}, &c).code(), Status::Code::kResourceExhausted);
  cache->release(Ids{2, 3});
  EXPECT_TRUE(cache->admit(Ids{4, 5}, &c).ok());
  cache->abort_fills(Ids{4, 5}, c);
}

// A SlotMemory that hands out host memory and records every call, as the device tier's
// cudaMalloc-backed one would be called.
class RecordingSlotMemory final : public SlotMemory {
 public:
  ~RecordingSlotMemory() override {
    for (const auto& [p, bytes] : live) std::free(p);
  }
  Result<uint8_t*> allocate(size_t bytes) override {
    if (fail_next) return Status::resource_exhausted("out of pretend device memory");
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
    live[p] = bytes;
    ++allocations;
    return p;
  }
  void release(uint8_t* data, size_t bytes) override {
    EXPECT_EQ(live.at(data), bytes);
    live.erase(data);
    std::free(data);
  }
  bool fail_next = false;
  int allocations = 0;
  std::map<uint8_t*, size_t> live;
};

TEST(ExpertCache, SlotsLiveInTheSlotMemoryTheOptionsGiveWithTheSameBookkeeping) {
  auto memory = std::make_shared<RecordingSlotMemory>();
  {
    ExpertCacheOptions o;
    o.budget_bytes = 8 * 64;
    o.slot_bytes = 40;
    o.num_experts = 100;
    o.policy = EvictionPolicy::kLru;
    o.tier_name = "device";
    o.budget_flag = "--vram";
    o.memory = memory;
    auto cache = ExpertCache::create(o);
    ASSERT_TRUE(cache.ok()) << cache.status().to_string();
    EXPECT_EQ(memory->allocations, 1);
    ASSERT_EQ((*cache)->blocks().size(), 1u);
    EXPECT_EQ(memory->live.count((*cache)->blocks()[0].data()), 1u);
    // Slots are inside the given memory; hits and evictions as for the host tier.
    EXPECT_EQ(run_batch(**cache, {1, 2, 3}), (Ids{1, 2, 3}));
    EXPECT_EQ(run_batch(**cache, {1, 2, 3}), (Ids{}));
    CacheBatch batch;
    ASSERT_TRUE((*cache)->admit(Ids{1}, &batch).ok());
    EXPECT_GE(batch.slots[0], (*cache)->blocks()[0].data());
    EXPECT_LT(batch.slots[0], (*cache)->blocks()[0].data() + (*cache)->blocks()[0].size());
    (*cache)->commit_fills(Ids{1}, batch);
    (*cache)->release(Ids{1});
    // A batch larger than the tier names its budget flag.
    Ids big(9);
    for (int64_t i = 0; i < 9; ++i) big[static_cast<size_t>(i)] = 10 + i;
    const Status s = (*cache)->admit(big, &batch);
    EXPECT_EQ(s.code(), Status::Code::kResourceExhausted);
    EXPECT_NE(s.message().find("--vram"), std::string::npos) << s.to_string();
  }
  EXPECT_TRUE(memory->live.empty()) << "a block was not released";
  // An allocation failure is the tier's error, naming the tier.
  memory->fail_next = true;
  ExpertCacheOptions o;
  o.budget_bytes = 1 << 20;
  o.slot_bytes = 64;
  o.num_experts = 100;
  o.tier_name = "device";
  o.memory = memory;
  auto failed = ExpertCache::create(o);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), Status::Code::kResourceExhausted);
  EXPECT_NE(failed.status().message().find("device tier"), std::string::npos)
      << failed.status().to_string();
  EXPECT_NE(failed.status().message().find("out of pretend device memory"), std::string::npos);
}

TEST(ExpertCache, BatchLargerThanTheBudgetIsAClearError) {
  ExpertCacheOptions o;
  o.budget_bytes = 64ull << 20;
  o.slot_bytes = 2304;
  o.num_experts = 100000;
  auto cache = ExpertCache::create(o);
  ASSERT_TRUE(cache.ok()) << cache.status().to_string();
  EXPECT_EQ((*cache)->capacity_slots(), 29127);  // 64 MiB / 2,304
  Ids ids(41000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i) * 2;
  CacheBatch batch;
  Status s = (*cache)->admit(ids, &batch);
  EXPECT_EQ(s.code(), Status::Code::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "the host budget 64 MiB holds 29,127 records of 2,304 bytes; this batch needs 41,000 "
            "unique experts: raise --host or lower --batch");
  EXPECT_EQ((*cache)->metrics().resident, 0);
  EXPECT_EQ((*cache)->metrics().unique, 0);
}

TEST(ExpertCache, CreateRejectsABudgetBelowOneSlotAndBadSizes) {
  ExpertCacheOptions o;
  o.budget_bytes = 1900;
  o.slot_bytes = 2304;
  o.num_experts = 10;
  auto small = ExpertCache::create(o);
  ASSERT_FALSE(small.ok());
  EXPECT_EQ(small.status().message(),
            "the host budget 1.86 KiB cannot hold one record of 2,304 bytes: raise --host");

  o.budget_bytes = 1 << 20;
  for (size_t bad_align : {size_t{0}, size_t{48}, size_t{8192}}) {
    o.slot_alignment = bad_align;
    EXPECT_TRUE(ExpertCache::create(o).status().is_invalid_argument()) << bad_align;
  }
  o.slot_alignment = 64;
  o.slot_bytes = SIZE_MAX - 10;
  EXPECT_TRUE(ExpertCache::create(o).status().is_invalid_argument());
  o.slot_bytes = 0;
  EXPECT_TRUE(ExpertCache::create(o).status().is_invalid_argument());
  o.slot_bytes = 64;
  o.num_experts = 0;
  EXPECT_TRUE(ExpertCache::create(o).status().is_invalid_argument());

  // A budget larger than every expert needs only N slots.
  o.num_experts = 1;
  auto one = ExpertCache::create(o);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ((*one)->capacity_slots(), 1);
  EXPECT_EQ(run_batch(**one, {0}), (Ids{0}));
  EXPECT_TRUE(run_batch(**one, {0}).empty());
}

TEST(ExpertCache, RejectsIdsNotUniqueAscendingAndInRange) {
  auto cache = make_cache(8, EvictionPolicy::kLru, 10);
  CacheBatch batch;
  EXPECT_TRUE(cache->admit(Ids{1, 1}, &batch).is_invalid_argument());
  EXPECT_TRUE(cache->admit(Ids{2, 1}, &batch).is_invalid_argument());
  EXPECT_TRUE(cache->admit(Ids{-1}, &batch).is_invalid_argument());
  Status s = cache->admit(Ids{3, 10}, &batch);
  EXPECT_EQ(s.message(), "expert id 10 at position 1 is outside [0, 10)");
  EXPECT_EQ(cache->metrics().resident, 0);
  // An empty batch is fine and changes nothing.
  EXPECT_TRUE(cache->admit(Ids{}, &batch).ok());
  EXPECT_TRUE(batch.slots.empty() && batch.miss_index.empty());
  cache->commit_fills(Ids{}, batch);
  cache->release(Ids{});
  EXPECT_EQ(cache->metrics().unique, 0);
}

TEST(ExpertCache, AbortedFillLeavesNoEntry) {
  auto cache = make_cache(3, EvictionPolicy::kFrequency);
  run_batch(*cache, {1});
  CacheBatch batch;
  ASSERT_TRUE(cache->admit(Ids{1, 2, 3}, &batch).ok());
  EXPECT_EQ(batch.miss_index, (std::vector<uint32_t>{1, 2}));
  write_record(batch.slots[1], 40, 2);  // the fill of 3 "fails"
  cache->abort_fills(Ids{1, 2, 3}, batch);
  EXPECT_TRUE(cache->contains(1));
  EXPECT_FALSE(cache->contains(2));
  EXPECT_FALSE(cache->contains(3));
  CacheMetrics m = cache->metrics();
  EXPECT_EQ(m.leased_slots, 0);
  EXPECT_EQ(m.resident, 1);
  EXPECT_EQ(m.fills_aborted, 2);
  EXPECT_EQ(m.fills_committed, 1);
  // The dropped experts miss again and the freed slots serve them; 1 was unleased by the abort.
  EXPECT_EQ(run_batch(*cache, {2, 3}), (Ids{2, 3}));
  EXPECT_EQ(run_batch(*cache, {4}), (Ids{4}));
  EXPECT_EQ(cache->metrics().evictions, 1);
}

// ---- memory ----------------------------------------------------------------------------------

TEST(ExpertCache, SlotsAreAlignedAndDisjoint) {
  struct Case {
    size_t slot_bytes, alignment;
  };
  for (const Case c : {Case{40, 64}, Case{2304, 64}, Case{2304, 4096}, Case{100, 1},
                       Case{4100, 4096}, Case{1, 8}}) {
    SCOPED_TRACE(::testing::Message() << c.slot_bytes << " bytes, alignment " << c.alignment);
    ExpertCacheOptions o;
    o.slot_bytes = c.slot_bytes;
    o.slot_alignment = c.alignment;
    o.num_experts = 200;
    const size_t stride = (c.slot_bytes + c.alignment - 1) / c.alignment * c.alignment;
    o.budget_bytes = 37 * stride + stride - 1;  // 37 whole slots
    auto cache = ExpertCache::create(o);
    ASSERT_TRUE(cache.ok()) << cache.status().to_string();
    ASSERT_EQ((*cache)->capacity_slots(), 37);
    EXPECT_EQ((*cache)->slot_stride(), stride);
    Ids ids(37);
    for (int64_t i = 0; i < 37; ++i) ids[i] = 3 * i + 1;
    CacheBatch batch;
    ASSERT_TRUE((*cache)->admit(ids, &batch).ok());
    ASSERT_EQ(batch.miss_index.size(), 37u);
    for (size_t i = 0; i < ids.size(); ++i) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(batch.slots[i]) % c.alignment, 0u);
      std::memset(batch.slots[i], static_cast<int>(i + 1), c.slot_bytes);
    }
    for (size_t i = 0; i < ids.size(); ++i) {  // no write reached another slot
      for (size_t b = 0; b < c.slot_bytes; ++b) ASSERT_EQ(size_t{batch.slots[i][b]}, i + 1);
    }
    std::vector<uint8_t*> sorted = batch.slots;
    std::sort(sorted.begin(), sorted.end());
    for (size_t i = 0; i + 1 < sorted.size(); ++i) {
      EXPECT_LE(sorted[i] + c.slot_bytes, sorted[i + 1]);
    }
    (*cache)->abort_fills(ids, batch);
  }
}

TEST(ExpertCache, LargeBudgetsComeInBlocksOfAtMostOneGiB) {
  ExpertCacheOptions o;
  o.slot_bytes = 4096;
  o.slot_alignment = 4096;
  o.num_experts = 1 << 20;
  o.budget_bytes = 3ull << 29;  // 1.5 GiB, not touched: mmap reserves lazily
  auto cache = ExpertCache::create(o);
  ASSERT_TRUE(cache.ok()) << cache.status().to_string();
  const auto& blocks = (*cache)->blocks();
  ASSERT_EQ(blocks.size(), 2u);
  EXPECT_EQ(blocks[0].size(), 1ull << 30);
  EXPECT_EQ(blocks[1].size(), 1ull << 29);
  for (const auto& block : blocks) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(block.data()) % 4096, 0u);
  }
  // Slot 262,144 (the first of block 1) goes to the 262,145th miss.
  Ids ids(262145);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i);
  CacheBatch batch;
  ASSERT_TRUE((*cache)->admit(ids, &batch).ok());
  EXPECT_EQ(batch.slots[0], blocks[0].data());
  EXPECT_EQ(batch.slots[262143], blocks[0].data() + (1ull << 30) - 4096);
  EXPECT_EQ(batch.slots[262144], blocks[1].data());
  (*cache)->abort_fills(ids, batch);
}

// ---- metrics ---------------------------------------------------------------------------------

TEST(ExpertCache, MetricsAddUp) {
  for (EvictionPolicy policy : kAllPolicies) {
    SCOPED_TRACE(eviction_policy_name(policy));
    auto cache = make_cache(150, policy, 2000);
    const auto trace = zipf_trace(2000, 1.0, 60, 120, 7);
    std::mt19937 rng(11);
    int64_t requested = 0, unique = 0, hits = 0, committed = 0, aborted = 0;
    for (const Ids& draws : trace) {
      Ids ids = draws;
      std::sort(ids.begin(), ids.end());
      ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
      cache->report_requested(static_cast<int64_t>(draws.size()));
      requested += static_cast<int64_t>(draws.size());
      CacheBatch batch;
      ASSERT_TRUE(cache->admit(ids, &batch).ok());
      unique += static_cast<int64_t>(ids.size());
      hits += static_cast<int64_t>(ids.size() - batch.miss_index.size());
      if (rng() % 5 == 0) {
        cache->abort_fills(ids, batch);
        aborted += static_cast<int64_t>(batch.miss_index.size());
      } else {
        cache->commit_fills(ids, batch);
        cache->release(ids);
        committed += static_cast<int64_t>(batch.miss_index.size());
      }
    }
    const CacheMetrics m = cache->metrics();
    EXPECT_EQ(m.batches, 60);
    EXPECT_EQ(m.requested, requested);
    EXPECT_EQ(m.unique, unique);
    EXPECT_EQ(m.hits, hits);
    EXPECT_EQ(m.hits + m.misses, m.unique);
    EXPECT_EQ(m.fills_committed, committed);
    EXPECT_EQ(m.fills_aborted, aborted);
    EXPECT_EQ(m.misses, m.fills_committed + m.fills_aborted);
    EXPECT_EQ(m.bytes_filled, static_cast<uint64_t>(committed) * 40);
    EXPECT_EQ(m.resident, m.fills_committed - m.evictions);
    EXPECT_EQ(m.resident, static_cast<int64_t>(resident(*cache, 2000).size()));
    EXPECT_EQ(m.leased_slots, 0);
    EXPECT_GT(m.evictions, 0);
    EXPECT_LE(m.peak_leased_slots, m.capacity_slots);
    EXPECT_GE(m.peak_leased_slots, 60);
    EXPECT_GT(m.hit_rate(), 0.2);
    EXPECT_EQ(m.rejected_batches, 0);
    EXPECT_EQ(m.fill_waits, 0);
  }
}

// ---- concurrency -----------------------------------------------------------------------------

TEST(ExpertCache, ABatchWaitsForAnotherBatchsFillThenHits) {
  for (bool commit : {true, false}) {
    SCOPED_TRACE(commit ? "commit" : "abort");
    auto cache = make_cache(4, EvictionPolicy::kClock);
    CacheBatch first;
    ASSERT_TRUE(cache->admit(Ids{7, 8}, &first).ok());
    std::atomic<bool> admitted{false};
    CacheBatch second;
    std::thread other([&] {
      EXPECT_TRUE(cache->admit(Ids{7}, &second).ok());
      admitted = true;
    });
    // Wait until the other admit is blocked on the fill (bounded: a hang fails, not hangs).
    for (int i = 0; i < 5000 && cache->metrics().fill_waits == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_GE(cache->metrics().fill_waits, 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    EXPECT_FALSE(admitted.load()) << "admitted while expert 7 was still being filled";
    write_record(first.slots[0], 40, 7);
    write_record(first.slots[1], 40, 8);
    if (commit) {
      cache->commit_fills(Ids{7, 8}, first);
      cache->release(Ids{7, 8});
    } else {
      cache->abort_fills(Ids{7, 8}, first);
    }
    other.join();
    EXPECT_EQ(second.miss_index.size(), commit ? 0u : 1u);
    if (commit) {
      EXPECT_TRUE(holds_record(second.slots[0], 40, 7));
    }
    cache->abort_fills(Ids{7}, second);
    EXPECT_GE(cache->metrics().fill_waits, 1);
  }
}

// Four threads run random zipf batches through one cache (admit, write each miss's id into its
// slot, commit, check every slot holds its expert, release; one batch in ten aborts instead)
// with the budget barely above four batches, so slots turn over constantly. Run it under
// ThreadSanitizer too (-DTROVE_SANITIZE=thread).
class ExpertCacheConcurrency : public ::testing::TestWithParam<EvictionPolicy> {};

TEST_P(ExpertCacheConcurrency, ThreadsOnlyEverSeeTheirExpertsRecords) {
  constexpr int kThreads = 4;
  constexpr int64_t kExperts = 3000;
  constexpr int64_t kDraws = 48;  // at most 48 unique per batch
  auto cache = make_cache(kThreads * kDraws + 20, GetParam(), kExperts);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(170);
  std::atomic<int64_t> bad{0}, batches{0}, errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ZipfSampler zipf(kExperts, 0.9, 1000 + t);
      std::mt19937 rng(t);
      CacheBatch batch;
      Ids ids;
      while (std::chrono::steady_clock::now() < deadline) {
        ids.clear();
        for (int64_t d = 0; d < kDraws; ++d) ids.push_back(zipf.next());
        std::sort(ids.begin(), ids.end());
        ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
        Status s = cache->admit(ids, &batch);
        if (!s.ok()) {
          ++errors;
          continue;
        }
        size_t m = 0;
        for (size_t i = 0; i < ids.size(); ++i) {
          if (m < batch.miss_index.size() && batch.miss_index[m] == i) {
            ++m;
            write_record(batch.slots[i], 40, ids[i]);
          } else if (!holds_record(batch.slots[i], 40, ids[i])) {
            ++bad;  // a hit must be valid the moment admit returns
          }
        }
        if (rng() % 10 == 0) {
          cache->abort_fills(ids, batch);
          continue;
        }
        cache->commit_fills(ids, batch);
        for (size_t i = 0; i < ids.size(); ++i) {
          if (!holds_record(batch.slots[i], 40, ids[i])) ++bad;
        }
        cache->release(ids);
        ++batches;
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(batches.load(), 40);
  const CacheMetrics m = cache->metrics();
  EXPECT_EQ(m.leased_slots, 0);
  EXPECT_EQ(m.hits + m.misses, m.unique);
  EXPECT_EQ(m.misses, m.fills_committed + m.fills_aborted);
  EXPECT_GT(m.evictions, 0);
}

INSTANTIATE_TEST_SUITE_P(Policies, ExpertCacheConcurrency, ::testing::ValuesIn(kAllPolicies),
                         [](const auto& p) { return eviction_policy_name(p.param); });

// ---- simulation ------------------------------------------------------------------------------

TEST(CacheSim, SimulateCountsLikeTheCache) {
  // LRU over 3 slots; batches are deduplicated.
  const std::vector<Ids> trace = {{1, 2, 2}, {3}, {1, 1}, {4}, {2, 5}};
  auto r = simulate(trace, 3, EvictionPolicy::kLru);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->requests, 7);
  EXPECT_EQ(r->hits, 1);  // only 1 in batch 2; 2 was evicted by 4
  EXPECT_EQ(r->evictions, 3);
  auto opt = simulate_belady(trace, 3);
  ASSERT_TRUE(opt.ok());
  EXPECT_EQ(opt->hits, 2);  // keep 1 and 2, let 3 go for 4
}

TEST(CacheSim, ABatchAboveCapacityIsAnError) {
  const std::vector<Ids> trace = {{1}, {1, 2, 3}};
  for (EvictionPolicy p : kAllPolicies) {
    auto r = simulate(trace, 2, p);
    EXPECT_EQ(r.status().code(), Status::Code::kResourceExhausted);
    EXPECT_NE(r.status().message().find("batch 1"), std::string::npos);
  }
  EXPECT_EQ(simulate_belady(trace, 2).status().code(), Status::Code::kResourceExhausted);
  EXPECT_TRUE(simulate_belady({{-3}}, 2).status().is_invalid_argument());
  EXPECT_TRUE(simulate(trace, 0, EvictionPolicy::kLru).status().is_invalid_argument());
}

TEST(CacheSim, BeladyIsAtLeastEveryPolicyOnZipfTraces) {
  for (double exponent : {0.8, 1.09, 1.2}) {
    for (uint64_t seed : {1, 2, 3}) {
      const auto trace = zipf_trace(5000, exponent, 40, 300, seed);
      for (int64_t capacity : {300, 777, 2000}) {
        auto opt = simulate_belady(trace, capacity);
        ASSERT_TRUE(opt.ok()) << opt.status().to_string();
        for (EvictionPolicy p : kAllPolicies) {
          auto r = simulate(trace, capacity, p);
          ASSERT_TRUE(r.ok()) << r.status().to_string();
          EXPECT_EQ(r->requests, opt->requests);
          EXPECT_GE(opt->hits, r->hits) << eviction_policy_name(p) << " zipf:" << exponent
                                        << " seed " << seed << " capacity " << capacity;
        }
      }
    }
  }
}

// The fewest misses any demand-filling tier of `capacity` can have: every choice of which
// residents to keep at every batch, memoized on (batch, resident set). Ids below 8.
int64_t brute_force_min_misses(const std::vector<uint32_t>& batches, int capacity) {
  std::map<std::pair<size_t, uint32_t>, int64_t> memo;
  auto best = [&](auto&& self, size_t t, uint32_t resident_set) -> int64_t {
    if (t == batches.size()) return 0;
    const auto key = std::make_pair(t, resident_set);
    if (auto it = memo.find(key); it != memo.end()) return it->second;
    const uint32_t need = batches[t];
    const int64_t misses = std::popcount(need & ~resident_set);
    const uint32_t keepable = resident_set & ~need;
    int64_t result = INT64_MAX;
    for (uint32_t keep = keepable;; keep = (keep - 1) & keepable) {  // every subset
      if (std::popcount(keep | need) <= capacity) {
        result = std::min(result, misses + self(self, t + 1, keep | need));
      }
      if (keep == 0) break;
    }
    memo[key] = result;
    return result;
  };
  return best(best, 0, 0);
}

TEST(CacheSim, BeladyEqualsTheBruteForceOptimumOnTinyTraces) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 300; ++trial) {
    const int capacity = 1 + static_cast<int>(rng() % 4);
    const int num_ids = capacity + 1 + static_cast<int>(rng() % 4);
    std::vector<uint32_t> masks;
    std::vector<Ids> trace;
    for (int b = 0, n = 4 + static_cast<int>(rng() % 7); b < n; ++b) {
      uint32_t mask = 0;
      for (int k = 0, picks = 1 + static_cast<int>(rng() % capacity); k < picks; ++k) {
        mask |= 1u << (rng() % num_ids);
      }
      Ids ids;
      for (int id = 0; id < num_ids; ++id) {
        if (mask >> id & 1) ids.push_back(id);
      }
      masks.push_back(mask);
      trace.push_back(ids);
    }
    auto opt = simulate_belady(trace, capacity);
    ASSERT_TRUE(opt.ok());
    ASSERT_EQ(opt->misses, brute_force_min_misses(masks, capacity)) << "trial " << trial;
  }
}

TEST(ZipfSampler, FollowsItsDistributionAndItsSeed) {
  constexpr double kExponent = 1.09;
  ZipfSampler zipf(1000, kExponent, 42);
  std::vector<int64_t> counts(1000);
  constexpr int kDraws = 200000;
  for (int i = 0; i < kDraws; ++i) ++counts[zipf.next()];
  double norm = 0;
  for (int r = 1; r <= 1000; ++r) norm += std::pow(r, -kExponent);
  for (int r : {0, 1, 9, 99}) {
    const double expected = kDraws * std::pow(r + 1, -kExponent) / norm;
    EXPECT_NEAR(counts[r], expected, 5 * std::sqrt(expected) + 1) << "rank " << r;
  }
  ZipfSampler a(500, 1.2, 9), b(500, 1.2, 9);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(a.next(), b.next());
}

}  // namespace
}  // namespace trove
