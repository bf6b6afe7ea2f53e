// One element of a record's row on the device, dequantized exactly as the _ref dequantizers do
// (kernels/quant.h's layout: fp16 scales per group of kQuantGroup, then the codes). Shared by the
// kernels that read records element by element (kernels/cuda/peer_backward.cu,
// kernels/cuda/peer_einsum.cu); the fused forward decodes 16 bytes at a time instead
// (kernels/cuda/peer_experts.cu). Included only by .cu files.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "base/dtype.h"
#include "kernels/quant.h"

namespace trove::cuda {

// Element i of a row, dequantized exactly as the _ref dequantizers do (q · d is exact in fp32;
// fp16/bf16 widen exactly).
// REQUIRES: codes 4-byte aligned for f32, 2-byte for f16/bf16; scales 2-byte aligned.
template <DType kType>
__device__ __forceinline__ float row_element(const uint8_t* scales, const uint8_t* codes,
                                             int64_t i) {
  if constexpr (kType == DType::kF32) {
    return reinterpret_cast<const float*>(codes)[i];
  } else if constexpr (kType == DType::kF16) {
    return __half2float(__ushort_as_half(reinterpret_cast<const uint16_t*>(codes)[i]));
  } else if constexpr (kType == DType::kBF16) {
    return __uint_as_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(codes)[i])
                           << 16);
  } else {
    const int64_t group = i / kQuantGroup;
    const float d =
        __half2float(__ushort_as_half(reinterpret_cast<const uint16_t*>(scales)[group]));
    if constexpr (kType == DType::kI8) {
      return __fmul_rn(static_cast<float>(reinterpret_cast<const int8_t*>(codes)[i]), d);
    } else {
      static_assert(kType == DType::kI4);
      // ggml Q4_0 order: element j (< 16) of a group is the low nibble of byte j, j + 16 the
      // high nibble; each stored as q + 8.
      const int j = static_cast<int>(i % kQuantGroup);
      const unsigned byte = codes[group * (kQuantGroup / 2) + (j % (kQuantGroup / 2))];
      const unsigned nibble = j < kQuantGroup / 2 ? (byte & 0xFu) : (byte >> 4);
      return __fmul_rn(static_cast<float>(static_cast<int>(nibble) - 8), d);
    }
  }
}

}  // namespace trove::cuda
