// The stream of a CudaPeerContext, for .cu files whose work must run in order with the
// context's device-form calls (kernels/cuda/peer_einsum.cu queues its gathers and GEMMs behind the
// context's routing, with no synchronization between them). Included only by .cu files.
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/peer_cuda.h"

namespace trove::cuda {

struct PeerContextAccess {
  // REQUIRES: context.has_device().
  static cudaStream_t stream(const CudaPeerContext& context);
};

}  // namespace trove::cuda
