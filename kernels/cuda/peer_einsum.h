// The PEER expert step the way the background implementation runs it, as a peer for benchmarks
// (SPEC §8: "an all-resident bf16 table with a gather + einsum forward") and a cross-check of the
// fused kernel (kernels/cuda/peer_experts.cu). Its PyTorch form is
//
//   down = U[ids]                                  nn.Embedding gather  [T, h*k, D]   bf16
//   up   = V[ids]                                  nn.Embedding gather  [T, h*k, D_out] bf16
//   z    = einsum('t s d, t d -> t s', down, xhat)
//   w    = gate * act(z)
//   y    = einsum('t s, t s e -> t e', w, up)
//
// and here: U [N, D] and V [N, D_out] are bf16 device arrays dequantized once from the store's
// records (one rounding of the exact dequantized value to bf16, ties to even); per call a
// gather kernel materializes the [T, h*k, D] and [T, h*k, D_out] rows, xhat is rounded to bf16,
// cuBLAS cublasGemmStridedBatchedEx (bf16 in, fp32 compute, fp32 out) does each einsum as T
// batched products, and one kernel turns z into w = bf16(gate * act(z)) between them. The
// intermediates cost 2 (D + D_out) bytes per slot written and read again: the traffic the fused
// kernel exists to avoid, and what this peer measures.
//
// Precision: bf16 carries 8 significant bits, so U, V, xhat and w are each within 2^-9 relative
// of the fp32 values, and y differs from the fp32 oracle (kernels/cpu/ref/peer_ref.h) by about
// 2^-8 of sum |w v| per element (tests/cuda_peers_test.cc writes the tolerance down).
//
// Tokens are processed in tiles whose gathered rows fit about 1 GiB of scratch. This header
// carries no CUDA type and is plain C++17.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "base/status.h"
#include "kernels/cuda/peer_cuda.h"
#include "kernels/peer.h"
#include "kernels/record.h"

namespace trove {

class CudaEinsumPeer {
 public:
  CudaEinsumPeer();  // empty: every call checks its arguments, then fails (kInvalidArgument)
  ~CudaEinsumPeer();
  CudaEinsumPeer(CudaEinsumPeer&& other) noexcept;
  CudaEinsumPeer& operator=(CudaEinsumPeer&& other) noexcept;
  CudaEinsumPeer(const CudaEinsumPeer&) = delete;
  CudaEinsumPeer& operator=(const CudaEinsumPeer&) = delete;

  // Device bytes of the two bf16 tables of `experts` experts: 2 (D + D_out) each.
  static uint64_t table_bytes(const PeerConfig& config, int64_t experts);

  // Dequantizes `experts` records (host memory, layout.stride apart, expert id order; any dtype
  // a record may have) into the bf16 tables on the current device, through a device staging slab
  // of at most 64 MiB. Errors, naming the value: a config that does not validate, a layout that
  // is not RecordLayout::make's for the config's dims, width > 1, experts < 1, null records;
  // kResourceExhausted when the tables do not fit the device; kNotSupported without a device.
  static Result<CudaEinsumPeer> create(const PeerConfig& config, const RecordLayout& layout,
                                       const uint8_t* records, int64_t experts);

  bool has_device() const { return impl_ != nullptr; }
  int64_t experts() const;

  // y [T, D_out] from xhat [T, D] and the routing's ids and gates ([T, h, k]), all device memory,
  // queued on `context`'s stream after whatever it holds (so routing by route_device feeds it
  // directly); returns without waiting. routing.scores is not read.
  // REQUIRES: every id in [0, experts()).
  Status forward_device(CudaPeerContext& context, const float* xhat, int64_t tokens,
                        const PeerDeviceRouting& routing, float* y);

  // Host form, for tests: host arrays in and out, synchronous. Ids are checked against
  // experts() (an error names the slot and the id).
  Status forward(CudaPeerContext& context, const float* xhat, const PeerRouting& routing, float* y);

  // The bf16 tables' bits back on the host: down [N, D], up [N, D_out] (tests).
  Status download_tables(std::vector<uint16_t>* down, std::vector<uint16_t>* up) const;

 private:
  struct Impl;
  explicit CudaEinsumPeer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace trove
