// Launchers for the fused PEER expert pass (SPEC §2 step 6, §6): per (token, head, k) slot,
// gather the record, dequantize on the fly, dot with xhat, activation, gate, accumulate the up
// row into y[token], with no [T, h, k, D] intermediate. Device pointers in and out; the work is
// queued on `stream` and not waited for. Arguments are the caller's to check
// (kernels/cuda/peer_cuda.cu does).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "base/dtype.h"
#include "base/status.h"
#include "kernels/peer_config.h"

namespace trove::cuda {

// One call's shapes and the record layout's offsets (kernels/record.h, width 1).
struct ExpertPass {
  DType dtype = DType::kI4;
  Activation activation = Activation::kRelu;
  int64_t tokens = 0;
  int64_t dim = 0;      // D
  int64_t dim_out = 0;  // D_out
  int64_t slots = 0;    // per token, h * k
  uint64_t down_scales_offset = 0;
  uint64_t up_scales_offset = 0;
  uint64_t down_codes_offset = 0;
  uint64_t up_codes_offset = 0;
};

// Dynamic shared memory of one block (bytes): the staged xhat chunk and one float per slot.
size_t expert_pass_smem_bytes(const ExpertPass& pass);

// y [T, D_out] = sum over the token's slots s of gates[s] * act(<u_s, xhat>) * v_s, the record
// of slot s (s in [0, T*slots)) at records[s].
// REQUIRES: 1 <= tokens <= 2^31 - 1, 1 <= slots <= 4096, dim and dim_out in [1, 2^20], every
// record at least 4-byte aligned (16 for full-width loads of 16-byte aligned sections),
// layout offsets of RecordLayout::make.
Status launch_peer_experts(const ExpertPass& pass, const float* xhat, const float* gates,
                           const uint8_t* const* records, float* y, cudaStream_t stream);

// The ranged pass: token t computes only its slots [ranges[2t], ranges[2t + 1]) (relative to
// the token), continuing the fp32 sum y[t] holds when the range does not start at 0, so passes
// over consecutive ranges of every slot give launch_peer_experts' bits (the records a pass does
// not cover are not read and may be null). runtime/layer/expert_waves.h plans the ranges.
// REQUIRES: as above; 0 <= begin <= end <= slots per token; y[t] from the previous pass of the
// token when begin > 0.
Status launch_peer_experts_ranged(const ExpertPass& pass, const float* xhat, const float* gates,
                                  const uint8_t* const* records, const int32_t* ranges, float* y,
                                  cudaStream_t stream);

// As launch_peer_experts with the record of slot s at table + record_index[s] * stride.
Status launch_peer_experts_indexed(const ExpertPass& pass, const float* xhat, const float* gates,
                                   const uint8_t* table, const int64_t* record_index,
                                   uint64_t stride, float* y, cudaStream_t stream);

}  // namespace trove::cuda
