// CudaEinsumPeer (kernels/cuda/peer_einsum.h): the background implementation's gather + einsum
// expert step on bf16 tables.
//
// Per tile of tt tokens (S = h*k slots per token), on the context's stream:
//
//   to_bf16        xb [tt, D]            = bf16(xhat)
//   gather         down [tt, S, D]       = U[ids],  up [tt, S, D_out] = V[ids]     (one launch)
//   GEMM 1         z [tt, S] (fp32)      = down[t] (S x D) . xb[t]     tt batched products
//   act_gate       w [tt, S] (bf16)      = bf16(gate * act(z))         as the fused kernel's math
//   GEMM 2         y [tt, D_out] (fp32)  = up[t]^T (D_out x S) . w[t]  tt batched products
//
// cuBLAS is column-major: a row-major [S, D] block is a D x S column-major matrix with leading
// dimension D, so GEMM 1 is op(A) = A^T with A that block, and GEMM 2 is op(A) = A with A the
// [S, D_out] block read as D_out x S. Products with n = 1 are what torch's einsum lowers these to
// (bmm of [tt, S, D] by [tt, D, 1]).
//
// bf16 values are handled as their 16-bit patterns (uint16_t) and converted with the same
// round-to-nearest-even bit arithmetic as base/half.h's fp32_to_bf16, so the tables equal the CPU
// dequantizer's values rounded by that function, bit for bit (tests/cuda_peers_test.cc).
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "base/numeric.h"
#include "kernels/cuda/blas.cuh"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/peer_checks.cuh"
#include "kernels/cuda/peer_einsum.h"
#include "kernels/cuda/record_element.cuh"
#include "kernels/quant.h"

namespace trove {

namespace {

using cuda::check_layout;
using cuda::filled_config;
using cuda::invalid;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride loops beyond
// Staging for create(): records are uploaded and dequantized this many bytes at a time.
constexpr int64_t kStagingBytes = int64_t{64} << 20;
// Gathered rows per tile: tokens are processed in tiles whose [tt, S, D + D_out] bf16 rows fit.
constexpr int64_t kGatherScratchBytes = int64_t{1} << 30;
// cuBLAS batch counts and dimensions are ints; tiles stay well inside.
constexpr int64_t kMaxTileTokens = 65535;
constexpr int64_t kMaxInt = 2147483647;

std::string str(int64_t v) {
  return std::to_string(v);
}

unsigned int grid_for(int64_t work) {
  return static_cast<unsigned int>(
      std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

// ---- device helpers ---------------------------------------------------------------------------

// base/half.h's fp32_to_bf16: round to nearest even; NaN stays a quiet NaN.
__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// ---- kernels ----------------------------------------------------------------------------------

// out[r * n + e] = bf16(element e of row (scales_offset, codes_offset) of record r), r < count.
// Launch: 1-D grid-stride over count * n. Traffic: the rows' codes and scales, 2 bytes out each.
template <DType kType>
__global__ void records_to_bf16_kernel(const uint8_t* records, uint64_t stride, int64_t count,
                                       int64_t n, uint64_t scales_offset, uint64_t codes_offset,
                                       uint16_t* out) {
  const int64_t total = count * n;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t r = i / n;
    const int64_t e = i - r * n;
    const uint8_t* record = records + static_cast<uint64_t>(r) * stride;
    out[i] = float_to_bf16_bits(
        cuda::row_element<kType>(record + scales_offset, record + codes_offset, e));
  }
}

// records_to_bf16_kernel for a record dtype (check_layout has vetted it).
Status launch_records_to_bf16(DType dtype, const uint8_t* records, uint64_t stride, int64_t count,
                              int64_t n, uint64_t scales_offset, uint64_t codes_offset,
                              uint16_t* out, cudaStream_t stream) {
  const unsigned int grid = grid_for(count * n);
  switch (dtype) {
    case DType::kF32:
      records_to_bf16_kernel<DType::kF32><<<grid, kThreads, 0, stream>>>(
          records, stride, count, n, scales_offset, codes_offset, out);
      break;
    case DType::kF16:
      records_to_bf16_kernel<DType::kF16><<<grid, kThreads, 0, stream>>>(
          records, stride, count, n, scales_offset, codes_offset, out);
      break;
    case DType::kBF16:
      records_to_bf16_kernel<DType::kBF16><<<grid, kThreads, 0, stream>>>(
          records, stride, count, n, scales_offset, codes_offset, out);
      break;
    case DType::kI8:
      records_to_bf16_kernel<DType::kI8><<<grid, kThreads, 0, stream>>>(
          records, stride, count, n, scales_offset, codes_offset, out);
      break;
    case DType::kI4:
      records_to_bf16_kernel<DType::kI4><<<grid, kThreads, 0, stream>>>(
          records, stride, count, n, scales_offset, codes_offset, out);
      break;
    default:
      return invalid("CudaEinsumPeer::create",
                     "record dtype " + std::string(dtype_name(dtype)) + " is not supported");
  }
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

// out[i] = bf16(in[i]), i < n. 1-D grid-stride.
__global__ void to_bf16_kernel(const float* in, int64_t n, uint16_t* out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    out[i] = float_to_bf16_bits(in[i]);
  }
}

// Copies `elems` bf16 values from src to dst with the block's threads: 16-byte vectors when both
// rows are 16-byte aligned (row lengths a multiple of 8), else element by element.
__device__ __forceinline__ void copy_row(const uint16_t* src, uint16_t* dst, int64_t elems,
                                         bool vectors) {
  if (vectors) {
    const auto* s = reinterpret_cast<const uint4*>(src);
    auto* d = reinterpret_cast<uint4*>(dst);
    for (int64_t v = threadIdx.x; v < elems / 8; v += blockDim.x) d[v] = s[v];
  } else {
    for (int64_t e = threadIdx.x; e < elems; e += blockDim.x) dst[e] = src[e];
  }
}

// The nn.Embedding gathers: row r (< rows, r = t * S + s) of down/up = U/V[ids[r]].
// Launch: a 1-D grid of blocks striding over the rows. Traffic: 2 (D + D_out) bytes read and
// written per row.
__global__ void gather_kernel(const uint16_t* table_down, const uint16_t* table_up, int64_t dim,
                              int64_t dim_out, const int64_t* ids, int64_t rows, uint16_t* down,
                              uint16_t* up) {
  const bool down_vectors = dim % 8 == 0;
  const bool up_vectors = dim_out % 8 == 0;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t id = ids[r];
    copy_row(table_down + id * dim, down + r * dim, dim, down_vectors);
    copy_row(table_up + id * dim_out, up + r * dim_out, dim_out, up_vectors);
  }
}

// w[i] = bf16(gate[i] * act(z[i])), the fused kernel's formula (activation in double).
__global__ void act_gate_kernel(const float* z, const float* gates, int64_t n,
                                Activation activation, uint16_t* w) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const double a = activation_ref(activation, static_cast<double>(z[i]));
    w[i] = float_to_bf16_bits(static_cast<float>(static_cast<double>(gates[i]) * a));
  }
}

// ---- checks -----------------------------------------------------------------------------------

Status empty_peer(const char* fn) {
  return invalid(fn,
                 "empty CudaEinsumPeer (default-constructed or moved from); make one with "
                 "CudaEinsumPeer::create()");
}

}  // namespace

struct CudaEinsumPeer::Impl {
  PeerConfig config;  // validated and filled
  int64_t experts = 0;
  cuda::DeviceBuffer<uint16_t> table_down;  // [N, D] bf16
  cuda::DeviceBuffer<uint16_t> table_up;    // [N, D_out] bf16
  cuda::BlasHandle blas;                    // bound to the caller's stream per call

  // Per-tile scratch, grown to the largest tile; the host form's staging.
  cuda::DeviceBuffer<uint16_t> xb, down, up, w;
  cuda::DeviceBuffer<float> z;
  struct Staging {
    cuda::DeviceBuffer<float> xhat, gates, y;
    cuda::DeviceBuffer<int64_t> ids;
  } staged;

  explicit Impl(cuda::BlasHandle b) : blas(std::move(b)) {}

  int64_t slots() const { return config.heads * config.topk; }

  // Tokens per tile: the gathered rows of a tile fit kGatherScratchBytes (at least one token).
  int64_t tile_tokens(int64_t tokens) const {
    const int64_t per_token = slots() * (config.dim + config.dim_out) * 2;
    return std::clamp<int64_t>(kGatherScratchBytes / per_token, 1,
                               std::min(tokens, kMaxTileTokens));
  }

  // Grows `buffer`; work queued earlier on `stream` may still read the old one.
  template <typename T>
  Status reserve(cuda::DeviceBuffer<T>* buffer, size_t count, cudaStream_t stream) {
    if (buffer->size() >= count) return Status::ok_status();
    TROVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    buffer->reset();
    TROVE_ASSIGN_OR_RETURN(*buffer, cuda::DeviceBuffer<T>::allocate(count));
    return Status::ok_status();
  }

  Status forward(cudaStream_t stream, const float* xhat, int64_t tokens, const float* gates,
                 const int64_t* ids, float* y) {
    const PeerConfig& c = config;
    const int64_t S = slots();
    const int64_t tile = tile_tokens(tokens);
    TROVE_RETURN_IF_ERROR(reserve(&xb, sz(tile * c.dim), stream));
    TROVE_RETURN_IF_ERROR(reserve(&down, sz(tile * S * c.dim), stream));
    TROVE_RETURN_IF_ERROR(reserve(&up, sz(tile * S * c.dim_out), stream));
    TROVE_RETURN_IF_ERROR(reserve(&z, sz(tile * S), stream));
    TROVE_RETURN_IF_ERROR(reserve(&w, sz(tile * S), stream));
    TROVE_CUBLAS_RETURN_IF_ERROR(cublasSetStream(blas.get(), stream));
    const float one = 1.0f, zero = 0.0f;
    for (int64_t t0 = 0; t0 < tokens; t0 += tile) {
      const int64_t tt = std::min(tile, tokens - t0);
      const int64_t rows = tt * S;
      to_bf16_kernel<<<grid_for(tt * c.dim), kThreads, 0, stream>>>(xhat + t0 * c.dim, tt * c.dim,
                                                                    xb.get());
      TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      gather_kernel<<<static_cast<unsigned int>(std::min(rows, kMaxBlocks * 4)), 128, 0, stream>>>(
          table_down.get(), table_up.get(), c.dim, c.dim_out, ids + t0 * S, rows, down.get(),
          up.get());
      TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      // z[t] (S) = down[t]^T-as-stored (S x D) . xb[t]
      TROVE_CUBLAS_RETURN_IF_ERROR(cublasGemmStridedBatchedEx(
          blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(S), 1, static_cast<int>(c.dim),
          &one, down.get(), CUDA_R_16BF, static_cast<int>(c.dim), S * c.dim, xb.get(), CUDA_R_16BF,
          static_cast<int>(c.dim), c.dim, &zero, z.get(), CUDA_R_32F, static_cast<int>(S), S,
          static_cast<int>(tt), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      act_gate_kernel<<<grid_for(rows), kThreads, 0, stream>>>(z.get(), gates + t0 * S, rows,
                                                               c.activation, w.get());
      TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      // y[t] (D_out) = up[t] read as D_out x S . w[t]
      TROVE_CUBLAS_RETURN_IF_ERROR(cublasGemmStridedBatchedEx(
          blas.get(), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(c.dim_out), 1, static_cast<int>(S),
          &one, up.get(), CUDA_R_16BF, static_cast<int>(c.dim_out), S * c.dim_out, w.get(),
          CUDA_R_16BF, static_cast<int>(S), S, &zero, y + t0 * c.dim_out, CUDA_R_32F,
          static_cast<int>(c.dim_out), c.dim_out, static_cast<int>(tt), CUBLAS_COMPUTE_32F,
          CUBLAS_GEMM_DEFAULT));
    }
    return Status::ok_status();
  }
};

CudaEinsumPeer::CudaEinsumPeer() = default;
CudaEinsumPeer::~CudaEinsumPeer() = default;
CudaEinsumPeer::CudaEinsumPeer(CudaEinsumPeer&& other) noexcept = default;
CudaEinsumPeer& CudaEinsumPeer::operator=(CudaEinsumPeer&& other) noexcept = default;
CudaEinsumPeer::CudaEinsumPeer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

uint64_t CudaEinsumPeer::table_bytes(const PeerConfig& config, int64_t experts) {
  const int64_t dim_out = config.dim_out > 0 ? config.dim_out : config.dim;
  return 2 * static_cast<uint64_t>(experts) * static_cast<uint64_t>(config.dim + dim_out);
}

int64_t CudaEinsumPeer::experts() const {
  return impl_ == nullptr ? 0 : impl_->experts;
}

Result<CudaEinsumPeer> CudaEinsumPeer::create(const PeerConfig& config, const RecordLayout& layout,
                                              const uint8_t* records, int64_t experts) {
  constexpr const char* kFn = "CudaEinsumPeer::create";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(check_layout(kFn, c, layout));
  if (experts < 1) return invalid(kFn, "experts must be >= 1 (got " + str(experts) + ")");
  if (records == nullptr) return invalid(kFn, "records is null (experts " + str(experts) + ")");
  if (c.heads * c.topk > kMaxInt || c.dim > kMaxInt || c.dim_out > kMaxInt) {
    return Status::not_supported(std::string(kFn) + ": heads * topk " + str(c.heads * c.topk) +
                                 ", dim or dim_out exceed cuBLAS's int dimensions");
  }
  TROVE_RETURN_IF_ERROR(cuda::require_cuda_device().with_context(kFn));
  TROVE_ASSIGN_OR_RETURN(cuda::BlasHandle blas,
                         cuda::BlasHandle::create(nullptr, CUBLAS_DEFAULT_MATH));
  auto impl = std::make_unique<Impl>(std::move(blas));
  impl->config = c;
  impl->experts = experts;
  const std::string what = " for the bf16 tables of " + str(experts) + " experts (" +
                           str(static_cast<int64_t>(table_bytes(c, experts))) + " bytes)";
  Result<cuda::DeviceBuffer<uint16_t>> down =
      cuda::DeviceBuffer<uint16_t>::allocate(sz(experts * c.dim));
  if (!down.ok()) return down.status().with_context(kFn + what);
  impl->table_down = std::move(*down);
  Result<cuda::DeviceBuffer<uint16_t>> up =
      cuda::DeviceBuffer<uint16_t>::allocate(sz(experts * c.dim_out));
  if (!up.ok()) return up.status().with_context(kFn + what);
  impl->table_up = std::move(*up);

  // Upload and dequantize a staging slab of records at a time.
  TROVE_ASSIGN_OR_RETURN(cuda::Stream stream, cuda::Stream::create());
  const auto stride = static_cast<int64_t>(layout.stride);
  const int64_t chunk = std::clamp<int64_t>(kStagingBytes / stride, 1, experts);
  TROVE_ASSIGN_OR_RETURN(cuda::DeviceBuffer<uint8_t> staging,
                         cuda::DeviceBuffer<uint8_t>::allocate(sz(chunk * stride)));
  for (int64_t first = 0; first < experts; first += chunk) {
    const int64_t count = std::min(chunk, experts - first);
    TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging.get(), records + first * stride,
                                               sz(count * stride), cudaMemcpyHostToDevice,
                                               stream.get()));
    TROVE_RETURN_IF_ERROR(launch_records_to_bf16(
        layout.dtype, staging.get(), layout.stride, count, c.dim, layout.down_scales_offset,
        layout.down_codes_offset, impl->table_down.get() + first * c.dim, stream.get()));
    TROVE_RETURN_IF_ERROR(launch_records_to_bf16(
        layout.dtype, staging.get(), layout.stride, count, c.dim_out, layout.up_scales_offset,
        layout.up_codes_offset, impl->table_up.get() + first * c.dim_out, stream.get()));
    // The next chunk's upload overwrites the staging slab: wait for this one's kernels.
    TROVE_RETURN_IF_ERROR(stream.synchronize().with_context(kFn));
  }
  return Result<CudaEinsumPeer>(CudaEinsumPeer(std::move(impl)));
}

Status CudaEinsumPeer::forward_device(CudaPeerContext& context, const float* xhat, int64_t tokens,
                                      const PeerDeviceRouting& routing, float* y) {
  constexpr const char* kFn = "CudaEinsumPeer::forward_device";
  if (tokens < 0 || tokens > kMaxInt) {
    return invalid(kFn, "tokens must be in [0, " + str(kMaxInt) + "] (got " + str(tokens) + ")");
  }
  if (tokens > 0) {
    const std::pair<const char*, const void*> pointers[] = {
        {"xhat", xhat}, {"routing.ids", routing.ids}, {"routing.gates", routing.gates}, {"y", y}};
    for (const auto& [name, p] : pointers) {
      if (p == nullptr)
        return invalid(kFn, std::string(name) + " is null (tokens " + str(tokens) + ")");
    }
  }
  if (impl_ == nullptr) return empty_peer(kFn);
  if (!context.has_device()) return invalid(kFn, "the CudaPeerContext is empty");
  if (tokens == 0) return Status::ok_status();
  return impl_->forward(static_cast<cudaStream_t>(context.native_stream()), xhat, tokens,
                        routing.gates, routing.ids, y);
}

Status CudaEinsumPeer::forward(CudaPeerContext& context, const float* xhat,
                               const PeerRouting& routing, float* y) {
  constexpr const char* kFn = "CudaEinsumPeer::forward";
  if (impl_ == nullptr) return empty_peer(kFn);
  const PeerConfig& c = impl_->config;
  const int64_t tokens = routing.tokens;
  if (routing.heads != c.heads || routing.topk != c.topk || tokens < 0 ||
      routing.ids.size() != sz(tokens * c.heads * c.topk) ||
      routing.gates.size() != routing.ids.size()) {
    return invalid(
        kFn, "routing of " + str(tokens) + " tokens x heads " + str(routing.heads) + " x topk " +
                 str(routing.topk) + " with " + str(static_cast<int64_t>(routing.ids.size())) +
                 " ids does not fit the peer's heads " + str(c.heads) + ", topk " + str(c.topk));
  }
  for (size_t s = 0; s < routing.ids.size(); ++s) {
    if (routing.ids[s] < 0 || routing.ids[s] >= impl_->experts) {
      return invalid(kFn, "routing.ids[" + std::to_string(s) + "] = " + str(routing.ids[s]) +
                              " is not an expert of the table (" + str(impl_->experts) + ")");
    }
  }
  if (tokens > 0 && (xhat == nullptr || y == nullptr)) {
    return invalid(
        kFn, std::string(xhat == nullptr ? "xhat" : "y") + " is null (tokens " + str(tokens) + ")");
  }
  if (!context.has_device()) return invalid(kFn, "the CudaPeerContext is empty");
  if (tokens == 0) return Status::ok_status();
  Impl& im = *impl_;
  const cudaStream_t stream = static_cast<cudaStream_t>(context.native_stream());
  const size_t slots = routing.ids.size();
  const Status queued = [&]() -> Status {
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.xhat, sz(tokens * c.dim), stream));
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.gates, slots, stream));
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.ids, slots, stream));
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.y, sz(tokens * c.dim_out), stream));
    TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(im.staged.xhat.get(), xhat,
                                               sz(tokens * c.dim) * sizeof(float),
                                               cudaMemcpyHostToDevice, stream));
    TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(im.staged.gates.get(), routing.gates.data(),
                                               slots * sizeof(float), cudaMemcpyHostToDevice,
                                               stream));
    TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(im.staged.ids.get(), routing.ids.data(),
                                               slots * sizeof(int64_t), cudaMemcpyHostToDevice,
                                               stream));
    TROVE_RETURN_IF_ERROR(im.forward(stream, im.staged.xhat.get(), tokens, im.staged.gates.get(),
                                     im.staged.ids.get(), im.staged.y.get()));
    TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(y, im.staged.y.get(),
                                               sz(tokens * c.dim_out) * sizeof(float),
                                               cudaMemcpyDeviceToHost, stream));
    return Status::ok_status();
  }();
  // Host arrays must outlive every copy already queued, also when queuing failed part-way.
  const Status finished = context.synchronize();
  return queued.ok() ? finished : queued;
}

Status CudaEinsumPeer::download_tables(std::vector<uint16_t>* down,
                                       std::vector<uint16_t>* up) const {
  constexpr const char* kFn = "CudaEinsumPeer::download_tables";
  if (down == nullptr || up == nullptr) return invalid(kFn, "down or up is null");
  if (impl_ == nullptr) return empty_peer(kFn);
  down->resize(impl_->table_down.size());
  up->resize(impl_->table_up.size());
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpy(down->data(), impl_->table_down.get(),
                                        impl_->table_down.bytes(), cudaMemcpyDeviceToHost));
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpy(up->data(), impl_->table_up.get(), impl_->table_up.bytes(),
                                        cudaMemcpyDeviceToHost));
  return Status::ok_status();
}

}  // namespace trove
