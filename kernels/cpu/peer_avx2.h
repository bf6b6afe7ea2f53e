// Internal to the optimized CPU PEER layer (kernels/cpu/peer.cc): the inner loops it
// dispatches to, AVX2 (+FMA/F16C) versions here and portable scalar versions in peer.cc. Plain
// C++ with no intrinsics, so any translation unit may include it; only peer_avx2.cc is compiled
// for AVX2.
//
// A coded row is one down or up row of a record (kernels/record.h): `codes` of n elements of
// dtype t and, for int8/int4, the row's quant_groups(n) fp16 scales at `scales` (no alignment
// needed). Per 32-element group the kernels sum code * x in fp32 and multiply the group's
// partial by its scale; a row's zero-padded last group never reads x or writes y past n.
#pragma once

#include <cstdint>

#include "base/dtype.h"

namespace trove::peer_internal {

// The inner loops of one CPU path.
struct PeerKernels {
  // sum_i row[i] * x[i].
  float (*coded_dot)(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n,
                     const float* x);
  // y[i] += alpha * row[i].
  void (*coded_axpy)(DType t, const uint8_t* scales, const uint8_t* codes, int64_t n, float alpha,
                     float* y);
  // y[i] += alpha * x[i].
  void (*axpy)(float alpha, const float* x, int64_t n, float* y);
};

}  // namespace trove::peer_internal

namespace trove::avx2 {

// REQUIRES: the CPU supports AVX2, FMA and F16C.
const peer_internal::PeerKernels& peer_kernels();

}  // namespace trove::avx2
