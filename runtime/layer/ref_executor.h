// The ref executor (runtime/layer/peer_executor.h): the PEER layer on the plain oracle kernels
// (kernels/cpu/ref/peer_ref.h), one thread, every record in hand before the expert pass. Slow;
// for checking the other executors.
#pragma once

#include <memory>

#include "kernels/peer.h"

namespace trove {

class PeerExecutor;

std::unique_ptr<PeerExecutor> make_ref_executor(const PeerConfig& config);

}  // namespace trove
