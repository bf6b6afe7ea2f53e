// The scheduling of the cuda executor's expert pass in waves (runtime/layer/cuda_executor.h),
// in plain C++ so that it is tested without a device. Records reach the device at different
// times: the device tier's hits are there, the host tier's hits are copied at once, the disk's
// misses when they land. Each wave computes, per token, the slots from where the token stopped
// up to its first slot whose record is not on the device yet, and the kernel resumes the
// token's fp32 sum from y (kernels/cuda/peer_experts.cuh: the ranged pass). Every output
// element is then the same sum in the same order (slot 0, 1, ... of its token) whatever arrived
// when, so the result is bit-identical to the all-resident pass: the accumulation order is
// fixed by the routing, never by arrival (the CPU's peer_experts_resume, kernels/cpu/peer.h,
// keeps the same rule).
//
//   records       device tier hits + host tier hits ──────────┐ disk misses land ──┐
//   wave 1        token t: slots [0, first slot not here)     │                    │
//   wave 2        token t: slots [where it stopped, S)   ◄────┴────────────────────┘
//
// choose_cpu_misses (below) is the other half of the plan: which device-tier misses the CPU
// computes from the host tier instead of copying them (CudaExecutorOptions::cpu_misses).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace trove {

class SlotWaves {
 public:
  // A batch of `tokens` tokens with `slots_per_token` slots each, nothing computed.
  // REQUIRES: tokens >= 0, 1 <= slots_per_token <= 2^31 - 1.
  void reset(int64_t tokens, int64_t slots_per_token);

  // The next wave: ranges[2t], ranges[2t + 1] = [begin, end) of token t's slots (relative to the
  // token) it computes, begin where the token stopped, end at its first slot s whose record is
  // not ready (ready[slot_index[t * S + s]] == 0), or S. A token already done, or blocked at its
  // next slot, gets an empty range. Returns the slots the wave computes.
  // REQUIRES: slot_index.size() == tokens * S, each in [0, ready.size()); ranges.size() ==
  // 2 * tokens. A slot once ready stays ready.
  int64_t next(std::span<const int32_t> slot_index, std::span<const uint8_t> ready,
               std::span<int32_t> ranges);

  // Tokens not yet through all their slots.
  int64_t pending_tokens() const { return pending_; }
  bool done() const { return pending_ == 0; }
  int64_t tokens() const { return static_cast<int64_t>(next_slot_.size()); }

 private:
  std::vector<int32_t> next_slot_;  // per token: its first slot not computed
  int32_t slots_per_token_ = 1;
  int64_t pending_ = 0;
};

// What running an expert contribution where it is costs, as measured in the run (rates of 0:
// not measured yet).
struct MissCostRates {
  double h2d_bytes_per_second = 0;     // host -> device record copies
  double cpu_slots_per_second = 0;     // (token, expert) contributions computed on the CPU
  double device_slots_per_second = 0;  // (token, expert) contributions computed on the device
};

// Which of a batch's device-tier misses to compute on the CPU from the host tier instead of
// copying them to the device (Fiddler's placement, per batch). Miss i is used by uses[i] slots;
// the device computes `device_slots` other slots in any case. The model: the CPU's share runs
// beside the device's, and the batch takes the longer of
//   cpu(C)    = uses(C) / cpu_rate
//   device(C) = (misses not in C) * record_bytes / h2d_rate + (device_slots + uses(not C)) /
//               device_rate
// (copies and kernels counted one after the other: the copies of a wave precede its kernel).
// Moving a miss costs the same bytes whatever its uses, and computing it on the CPU costs its
// uses, so the best C of each size is the misses with the fewest uses: the function takes the
// k fewest-used (ties: lower index first) for the k that minimizes the longer time (ties: the
// smaller k). Returns the indices chosen, ascending.
// Before cpu_rate is measured (0) while the other two are: the min(probe, misses) fewest-used,
// so the CPU's rate gets measured. Any other rate 0: none.
// REQUIRES: rates >= 0, uses >= 1, device_slots >= 0.
std::vector<uint32_t> choose_cpu_misses(std::span<const int32_t> uses, uint64_t record_bytes,
                                        int64_t device_slots, const MissCostRates& rates,
                                        int64_t probe = 16);

}  // namespace trove
