// The device tier's residency on the device (runtime/layer/cuda_executor.h, the all-hit path): a
// table of N device record addresses, one per expert, null where the expert is not resident.
// Looking the routing's ids up there on the device tells whether a batch is all hits without
// copying its ids to the host first; when it is, the expert kernel runs on the addresses found.
//
// Both functions queue one kernel on `stream` (a cudaStream_t, e.g.
// CudaPeerContext::native_stream()) and return; every pointer is device memory. Arguments are
// checked first (invalid_argument naming the value). This header carries no CUDA type.
#pragma once

#include <cstdint>

#include "base/status.h"

namespace trove {

// pointers[s] = table[ids[s]] for s < slots, and *misses = the number of slots whose entry is
// null or whose id is outside [0, n) (their pointer is null). *misses is zeroed first.
Status resolve_resident_async(const uint8_t* const* table, int64_t n, const int64_t* ids,
                              int64_t slots, const uint8_t** pointers, uint32_t* misses,
                              void* stream);

// table[ids[i]] = values[i] for i < count. REQUIRES: ids unique and in [0, n).
Status scatter_resident_async(const uint8_t** table, int64_t n, const int64_t* ids,
                              const uint8_t* const* values, int64_t count, void* stream);

}  // namespace trove
