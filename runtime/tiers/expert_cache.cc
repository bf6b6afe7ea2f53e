#include "runtime/tiers/expert_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <climits>

#include "base/bytes.h"
#include "base/check.h"
#include "base/strings.h"

namespace trove {

namespace {

// The most bytes of slots per allocation: io_uring refuses to register a larger buffer, and
// pinning (cudaHostRegister) in such pieces keeps each call short.
constexpr uint64_t kMaxBlockBytes = uint64_t{1} << 30;

}  // namespace

// One block of host slots: anonymous memory, huge pages advised (slots are touched at random:
// huge pages spare the TLB; advice only, failure is fine).
Result<uint8_t*> allocate_host_block(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return Status::from_errno("mmap", errno);
  if (bytes >= (size_t{2} << 20)) (void)madvise(p, bytes, MADV_HUGEPAGE);
  return static_cast<uint8_t*>(p);
}

void free_host_block(uint8_t* data, size_t bytes) {
  munmap(data, bytes);
}

Result<std::unique_ptr<ExpertCache>> ExpertCache::create(const ExpertCacheOptions& options) {
  const std::string& tier = options.tier_name;
  if (options.slot_bytes == 0) {
    return Status::invalid_argument("the " + tier + " tier's record size is 0 bytes");
  }
  if (options.num_experts < 1 || options.num_experts > INT32_MAX) {
    return Status::invalid_argument(
        str_printf("the %s tier cannot index %lld experts: expected 1 to %d", tier.c_str(),
                   static_cast<long long>(options.num_experts), INT32_MAX));
  }
  const size_t align = options.slot_alignment;
  if (align == 0 || (align & (align - 1)) != 0 || align > 4096) {
    return Status::invalid_argument(
        str_printf("slot alignment %zu is not a power of two from 1 to 4096", align));
  }
  if (options.slot_bytes > SIZE_MAX - align) {
    return Status::invalid_argument(
        str_printf("record size %zu bytes overflows when aligned", options.slot_bytes));
  }
  const size_t stride = (options.slot_bytes + align - 1) / align * align;
  if (options.budget_bytes < stride) {
    return Status::invalid_argument(
        str_printf("the %s budget %s cannot hold one record of %s bytes: raise %s", tier.c_str(),
                   format_bytes(options.budget_bytes).c_str(),
                   with_commas(static_cast<int64_t>(stride)).c_str(), options.budget_flag.c_str()));
  }
  // No more slots than experts (the rest could never be used), and slot numbers fit in int32.
  const uint64_t slots =
      std::min<uint64_t>({options.budget_bytes / stride, static_cast<uint64_t>(options.num_experts),
                          static_cast<uint64_t>(INT32_MAX - 1)});
  std::unique_ptr<ExpertCache> cache(new ExpertCache(options, stride, static_cast<int32_t>(slots)));

  const uint64_t per_block = std::clamp<uint64_t>(kMaxBlockBytes / stride, 1, slots);
  cache->slots_per_block_ = static_cast<int32_t>(per_block);
  for (uint64_t first = 0; first < slots; first += per_block) {
    const size_t bytes = static_cast<size_t>(std::min(per_block, slots - first) * stride);
    Result<uint8_t*> p =
        options.memory != nullptr ? options.memory->allocate(bytes) : allocate_host_block(bytes);
    if (!p.ok()) {
      return Status::resource_exhausted(str_printf(
          "allocating %s for the %s tier (budget %s): %s", format_bytes(bytes).c_str(),
          tier.c_str(), format_bytes(options.budget_bytes).c_str(), p.status().message().c_str()));
    }
    TROVE_CHECK_MSG(reinterpret_cast<uintptr_t>(*p) % align == 0,
                    "the %s tier's slot memory returned %p, not %zu-byte aligned", tier.c_str(),
                    static_cast<void*>(*p), align);
    cache->blocks_.emplace_back(*p, bytes);
  }
  return cache;
}

ExpertCache::ExpertCache(const ExpertCacheOptions& options, size_t stride, int32_t capacity)
    : options_(options),
      stride_(stride),
      capacity_(capacity),
      policy_(make_replacement_policy(options.policy, capacity, options.num_experts)),
      slot_of_(static_cast<size_t>(options.num_experts), -1),
      id_of_(static_cast<size_t>(capacity), -1),
      leases_(static_cast<size_t>(capacity), 0),
      state_(static_cast<size_t>(capacity), SlotState::kFree) {
  free_slots_.reserve(static_cast<size_t>(capacity));
  for (int32_t s = capacity - 1; s >= 0; --s) free_slots_.push_back(s);
  metrics_.capacity_slots = capacity;
  metrics_.slot_bytes = options.slot_bytes;
}

ExpertCache::~ExpertCache() {
  for (std::span<uint8_t> block : blocks_) {
    if (options_.memory != nullptr) {
      options_.memory->release(block.data(), block.size());
    } else {
      free_host_block(block.data(), block.size());
    }
  }
}

Status ExpertCache::check_ids(std::span<const int64_t> ids) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= options_.num_experts) {
      return Status::invalid_argument(str_printf(
          "expert id %lld at position %zu is outside [0, %lld)", static_cast<long long>(ids[i]), i,
          static_cast<long long>(options_.num_experts)));
    }
    if (i > 0 && ids[i] <= ids[i - 1]) {
      return Status::invalid_argument(
          str_printf("expert ids must be unique and ascending: %lld follows %lld at position %zu",
                     static_cast<long long>(ids[i]), static_cast<long long>(ids[i - 1]), i));
    }
  }
  return Status::ok_status();
}

Status ExpertCache::capacity_error(int64_t batch_unique, int64_t needed_now,
                                   int64_t leased_by_others, int64_t shared) const {
  std::string records = with_commas(static_cast<int64_t>(options_.slot_bytes)) + " bytes";
  if (stride_ != options_.slot_bytes) {
    records += " in " + with_commas(static_cast<int64_t>(stride_)) + "-byte slots";
  }
  std::string msg = str_printf(
      "the %s budget %s holds %s records of %s; this batch needs %s unique experts",
      options_.tier_name.c_str(), format_bytes(options_.budget_bytes).c_str(),
      with_commas(capacity_).c_str(), records.c_str(), with_commas(batch_unique).c_str());
  if (batch_unique > capacity_) {
    return Status::resource_exhausted(msg + ": raise " + options_.budget_flag +
                                      " or lower --batch");
  }
  // The batch fits on its own; batches in flight hold the rest.
  return Status::resource_exhausted(
      msg +
      str_printf(" and batches in flight lease %s other slots (%s slots needed, %s in the budget): "
                 "raise %s, lower --batch or overlap fewer batches",
                 with_commas(leased_by_others - shared).c_str(), with_commas(needed_now).c_str(),
                 with_commas(capacity_).c_str(), options_.budget_flag.c_str()));
}

void ExpertCache::pin(int32_t slot) {
  if (leases_[slot]++ == 0) {
    policy_->on_pin(slot);
    metrics_.peak_leased_slots = std::max(metrics_.peak_leased_slots, ++metrics_.leased_slots);
  }
}

void ExpertCache::unpin(int32_t slot) {
  TROVE_CHECK_MSG(leases_[slot] > 0, "slot %d released more often than leased", slot);
  if (--leases_[slot] == 0) {
    policy_->on_unpin(slot);
    --metrics_.leased_slots;
  }
}

void ExpertCache::drop_filling(int32_t slot) {
  TROVE_CHECK(state_[slot] == SlotState::kFilling && leases_[slot] == 1);
  policy_->on_evict(slot);
  slot_of_[id_of_[slot]] = -1;
  id_of_[slot] = -1;
  leases_[slot] = 0;
  state_[slot] = SlotState::kFree;
  free_slots_.push_back(slot);
  --metrics_.leased_slots;
  --metrics_.resident;
  ++metrics_.fills_aborted;
}

// How far ahead of its loops over a batch's ids the cache prefetches: far enough to hide a
// DRAM miss behind the work of the ids between (a batch's slots and policy state are scattered
// over arrays of N entries), near enough that the lines are still cached when reached.
constexpr size_t kPrefetchAhead = 16;

void ExpertCache::prefetch_entry(std::span<const int64_t> ids, size_t i) const {
  if (i + kPrefetchAhead < ids.size()) {
    const int64_t id = ids[i + kPrefetchAhead];
    if (id >= 0 && id < options_.num_experts)
      __builtin_prefetch(&slot_of_[static_cast<size_t>(id)], 0);
  }
  // Half as far ahead: that id's slot number was prefetched above a few iterations ago.
  const size_t j = i + kPrefetchAhead / 2;
  if (j < ids.size() && ids[j] >= 0 && ids[j] < options_.num_experts) {
    const int32_t slot = slot_of_[static_cast<size_t>(ids[j])];
    if (slot >= 0) {
      __builtin_prefetch(&state_[static_cast<size_t>(slot)], 0);
      __builtin_prefetch(&leases_[static_cast<size_t>(slot)], 1);
      policy_->prefetch(slot, ids[j]);
    }
  }
}

Status ExpertCache::admit(std::span<const int64_t> ids, CacheBatch* batch) {
  TROVE_RETURN_IF_ERROR(check_ids(ids));
  // Sized outside the lock.
  batch->slots.assign(ids.size(), nullptr);
  batch->miss_index.clear();
  batch->miss_index.reserve(ids.size());
  batch->evicted.clear();

  std::unique_lock<std::mutex> lock(mutex_);
  // Classify without changing anything; a fill in progress means wait and look again.
  int64_t misses = 0;
  int64_t unleased_hits = 0;
  int64_t leased_hits = 0;
  for (;;) {
    misses = unleased_hits = leased_hits = 0;
    bool filling = false;
    for (size_t i = 0; i < ids.size(); ++i) {
      prefetch_entry(ids, i);
      const int32_t slot = slot_of_[ids[i]];
      if (slot < 0) {
        ++misses;
      } else if (state_[slot] == SlotState::kFilling) {
        filling = true;
        break;
      } else if (leases_[slot] == 0) {
        ++unleased_hits;
      } else {
        ++leased_hits;
      }
    }
    if (!filling) break;
    ++metrics_.fill_waits;
    ++waiters_;
    fill_done_.wait(lock);
    --waiters_;
  }
  // Misses take free slots or evict unleased entries; this batch's own hits are about to be
  // leased, so what is left for misses is capacity - leased now - unleased hits.
  const int64_t needed = misses + unleased_hits + metrics_.leased_slots;
  if (needed > capacity_) {
    ++metrics_.rejected_batches;
    return capacity_error(static_cast<int64_t>(ids.size()), needed, metrics_.leased_slots,
                          leased_hits);
  }

  // Hits first: once leased they cannot be picked as victims for the misses.
  for (size_t i = 0; i < ids.size(); ++i) {
    prefetch_entry(ids, i);
    const int32_t slot = slot_of_[ids[i]];
    if (slot < 0) {
      batch->miss_index.push_back(static_cast<uint32_t>(i));
      continue;
    }
    policy_->on_hit(slot, ids[i]);
    pin(slot);
    batch->slots[i] = slot_address(slot);
  }
  for (const uint32_t i : batch->miss_index) {
    int32_t slot;
    if (!free_slots_.empty()) {
      slot = free_slots_.back();
      free_slots_.pop_back();
    } else {
      slot = policy_->pick_victim();
      TROVE_CHECK_MSG(slot >= 0 && state_[slot] == SlotState::kValid && leases_[slot] == 0,
                      "policy %s picked slot %d, which is not an unleased entry",
                      eviction_policy_name(options_.policy), slot);
      policy_->on_evict(slot);
      slot_of_[id_of_[slot]] = -1;
      batch->evicted.push_back(id_of_[slot]);
      ++metrics_.evictions;
      --metrics_.resident;
    }
    slot_of_[ids[i]] = slot;
    id_of_[slot] = ids[i];
    state_[slot] = SlotState::kFilling;
    leases_[slot] = 1;
    policy_->on_insert(slot, ids[i]);
    metrics_.peak_leased_slots = std::max(metrics_.peak_leased_slots, ++metrics_.leased_slots);
    ++metrics_.resident;
    batch->slots[i] = slot_address(slot);
  }
  ++metrics_.batches;
  metrics_.unique += static_cast<int64_t>(ids.size());
  metrics_.misses += misses;
  metrics_.hits += static_cast<int64_t>(ids.size()) - misses;
  return Status::ok_status();
}

void ExpertCache::commit_fills(std::span<const int64_t> ids, const CacheBatch& batch) {
  TROVE_CHECK(batch.slots.size() == ids.size());
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const uint32_t i : batch.miss_index) {
      const int32_t slot = slot_of_[ids[i]];
      TROVE_CHECK_MSG(
          slot >= 0 && state_[slot] == SlotState::kFilling && slot_address(slot) == batch.slots[i],
          "commit_fills: expert %lld is not a fill of this batch", static_cast<long long>(ids[i]));
      state_[slot] = SlotState::kValid;
    }
    const auto n = static_cast<int64_t>(batch.miss_index.size());
    metrics_.fills_committed += n;
    metrics_.bytes_filled += static_cast<uint64_t>(n) * options_.slot_bytes;
    wake = waiters_ > 0 && n > 0;
  }
  if (wake) fill_done_.notify_all();
}

void ExpertCache::abort_fills(std::span<const int64_t> ids, const CacheBatch& batch) {
  TROVE_CHECK(batch.slots.size() == ids.size());
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t next_miss = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      const int32_t slot = slot_of_[ids[i]];
      TROVE_CHECK_MSG(slot >= 0 && slot_address(slot) == batch.slots[i],
                      "abort_fills: expert %lld is not leased by this batch",
                      static_cast<long long>(ids[i]));
      if (next_miss < batch.miss_index.size() && batch.miss_index[next_miss] == i) {
        ++next_miss;
        drop_filling(slot);
      } else {
        TROVE_CHECK(state_[slot] == SlotState::kValid);
        unpin(slot);
      }
    }
    wake = waiters_ > 0 && !batch.miss_index.empty();
  }
  if (wake) fill_done_.notify_all();
}

void ExpertCache::release(std::span<const int64_t> ids) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t id = ids[i];
    TROVE_CHECK_MSG(id >= 0 && id < options_.num_experts, "release: expert id %lld out of range",
                    static_cast<long long>(id));
    prefetch_entry(ids, i);
    const int32_t slot = slot_of_[id];
    TROVE_CHECK_MSG(slot >= 0 && state_[slot] == SlotState::kValid,
                    "release: expert %lld is not a committed entry (%s)",
                    static_cast<long long>(id),
                    slot < 0 ? "absent" : "still filling: commit_fills or abort_fills first");
    unpin(slot);
  }
}

void ExpertCache::report_requested(int64_t selections) {
  std::lock_guard<std::mutex> lock(mutex_);
  metrics_.requested += selections;
}

bool ExpertCache::contains(int64_t id) const {
  if (id < 0 || id >= options_.num_experts) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  const int32_t slot = slot_of_[id];
  return slot >= 0 && state_[slot] == SlotState::kValid;
}

CacheMetrics ExpertCache::metrics() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return metrics_;
}

}  // namespace trove
