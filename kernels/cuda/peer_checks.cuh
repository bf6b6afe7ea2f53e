// Argument checks shared by the CUDA PEER entry points (kernels/cuda/peer_cuda.cu, which defines
// them, and kernels/cuda/peer_einsum.cu). Host code; included only by .cu files.
#pragma once

#include <string>

#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"

namespace trove::cuda {

// invalid_argument "<fn>: <what>".
Status invalid(const char* fn, const std::string& what);
// A validated copy of `config` with its defaults filled in; errors name `fn`.
Result<PeerConfig> filled_config(const char* fn, const PeerConfig& config);
// `l` is a width-1 record layout of a known dtype for config's dim and dim_out, with
// RecordLayout::make's offsets and a stride that is a multiple of 16 and at least record_bytes.
Status check_layout(const char* fn, const PeerConfig& c, const RecordLayout& l);

}  // namespace trove::cuda
