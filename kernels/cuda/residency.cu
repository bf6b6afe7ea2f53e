// kernels/cuda/residency.h: one thread per slot (or per update), grid-stride. The lookups are
// 8-byte gathers from a table of N pointers (32 MiB at 4M experts): random, so the kernel is
// latency-bound, a few microseconds for a batch's tens of thousands of slots.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "kernels/cuda/device.cuh"
#include "kernels/cuda/residency.h"

namespace trove {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;

unsigned blocks_for(int64_t count) {
  return static_cast<unsigned>(std::min<int64_t>(kMaxBlocks, (count + kThreads - 1) / kThreads));
}

__global__ void resolve_kernel(const uint8_t* const* table, int64_t n, const int64_t* ids,
                               int64_t slots, const uint8_t** pointers, uint32_t* misses) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < slots;
       s += stride) {
    const int64_t id = ids[s];
    const uint8_t* p = id >= 0 && id < n ? table[id] : nullptr;
    pointers[s] = p;
    if (p == nullptr) atomicAdd(misses, 1u);
  }
}

__global__ void scatter_kernel(const uint8_t** table, const int64_t* ids,
                               const uint8_t* const* values, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    table[ids[i]] = values[i];
  }
}

Status invalid(const char* fn, const std::string& what) {
  return Status::invalid_argument(std::string(fn) + ": " + what);
}

}  // namespace

Status resolve_resident_async(const uint8_t* const* table, int64_t n, const int64_t* ids,
                              int64_t slots, const uint8_t** pointers, uint32_t* misses,
                              void* stream) {
  constexpr const char* kFn = "resolve_resident_async";
  if (n < 1 || slots < 0) {
    return invalid(kFn, "table of " + std::to_string(n) + " experts, " + std::to_string(slots) +
                            " slots (expected >= 1 and >= 0)");
  }
  if (table == nullptr || misses == nullptr ||
      (slots > 0 && (ids == nullptr || pointers == nullptr))) {
    return invalid(kFn, "null table, ids, pointers or miss counter");
  }
  if (stream == nullptr) return invalid(kFn, "null stream");
  auto s = static_cast<cudaStream_t>(stream);
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(misses, 0, sizeof(uint32_t), s));
  if (slots == 0) return Status::ok_status();
  resolve_kernel<<<blocks_for(slots), kThreads, 0, s>>>(table, n, ids, slots, pointers, misses);
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

Status scatter_resident_async(const uint8_t** table, int64_t n, const int64_t* ids,
                              const uint8_t* const* values, int64_t count, void* stream) {
  constexpr const char* kFn = "scatter_resident_async";
  if (n < 1 || count < 0 || count > n) {
    return invalid(
        kFn, std::to_string(count) + " updates of a table of " + std::to_string(n) + " experts");
  }
  if (count == 0) return Status::ok_status();
  if (table == nullptr || ids == nullptr || values == nullptr) {
    return invalid(kFn, "null table, ids or values");
  }
  if (stream == nullptr) return invalid(kFn, "null stream");
  scatter_kernel<<<blocks_for(count), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      table, ids, values, count);
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

}  // namespace trove
