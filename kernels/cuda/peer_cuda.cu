// CudaPeerContext (kernels/cuda/peer_cuda.h): argument checks, scratch and staging buffers, and
// the host and device forms of the four PEER forward steps over the launchers of
// peer_route.cuh and peer_experts.cuh.
//
// Every entry point checks all of its arguments before it looks at the device, so the checks
// run (and are tested) on machines without a GPU, through an empty context.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/numeric.h"
#include "kernels/cuda/blas.cuh"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/peer_checks.cuh"
#include "kernels/cuda/peer_cuda.h"
#include "kernels/cuda/peer_experts.cuh"
#include "kernels/cuda/peer_route.cuh"

namespace trove {

namespace cuda {

// kernels/cuda/peer_checks.cuh.
Status invalid(const char* fn, const std::string& what) {
  return Status::invalid_argument(std::string(fn) + ": " + what);
}

Result<PeerConfig> filled_config(const char* fn, const PeerConfig& config) {
  PeerConfig c = config;
  const Status s = c.validate_and_fill();
  if (!s.ok()) return s.with_context(fn);
  return c;
}

Status check_layout(const char* fn, const PeerConfig& c, const RecordLayout& l) {
  switch (l.dtype) {
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16:
    case DType::kI8:
    case DType::kI4:
      break;
    default:
      return invalid(fn, "layout.dtype " + std::to_string(static_cast<int>(l.dtype)) +
                             " is not a record dtype (f32, f16, bf16, int8, int4)");
  }
  if (l.width != 1) {
    return Status::not_supported(std::string(fn) + ": layout.width " + std::to_string(l.width) +
                                 ": expert_width m > 1 is not supported yet");
  }
  if (l.dim != c.dim || l.dim_out != c.dim_out) {
    return invalid(fn, "layout is for dim " + std::to_string(l.dim) + ", dim_out " +
                           std::to_string(l.dim_out) + " but the config has dim " +
                           std::to_string(c.dim) + ", dim_out " + std::to_string(c.dim_out));
  }
  Result<RecordLayout> want = RecordLayout::make(l.dtype, l.dim, l.dim_out, 1);
  if (!want.ok()) return want.status().with_context(fn);
  if (l.down_scales_offset != want->down_scales_offset ||
      l.up_scales_offset != want->up_scales_offset ||
      l.down_codes_offset != want->down_codes_offset ||
      l.up_codes_offset != want->up_codes_offset || l.record_bytes != want->record_bytes) {
    return invalid(fn, "layout offsets or record_bytes (" + std::to_string(l.record_bytes) +
                           ") differ from RecordLayout::make(" + std::string(dtype_name(l.dtype)) +
                           ", " + std::to_string(l.dim) + ", " + std::to_string(l.dim_out) +
                           ") (record_bytes " + std::to_string(want->record_bytes) + ")");
  }
  if (l.stride < l.record_bytes || l.stride % 16 != 0) {
    return invalid(fn, "layout.stride " + std::to_string(static_cast<int64_t>(l.stride)) +
                           " must be a multiple of 16 and at least record_bytes " +
                           std::to_string(static_cast<int64_t>(l.record_bytes)));
  }
  return Status::ok_status();
}

}  // namespace cuda

namespace {

using cuda::check_layout;
using cuda::filled_config;
using cuda::invalid;

// cuBLAS dimensions and grid sizes are ints.
constexpr int64_t kMaxInt = 2147483647;
// Routing keys hold an expert id in 32 bits (kernels/cuda/peer_route.cu): n^2 <= 2^32.
constexpr int64_t kMaxCudaKeys = 65536;
// The selection kernel sorts k' and k keys in shared memory.
constexpr int64_t kMaxCudaTopk = 1024;
// The expert kernel keeps one float per slot of a token in shared memory.
constexpr int64_t kMaxSlotsPerToken = 4096;
// route_device's sub-score scratch: tokens are processed in tiles of at most this many floats
// (64 MiB), or one token when a single token needs more.
constexpr int64_t kSubScoreScratchFloats = int64_t{16} << 20;

std::string str(int64_t v) {
  return std::to_string(v);
}

Status unsupported(const char* fn, const std::string& what) {
  return Status::not_supported(std::string(fn) + ": " + what + " (a limit of the CUDA path)");
}

Status check_tokens(const char* fn, int64_t tokens) {
  if (tokens < 0 || tokens > kMaxInt) {
    return invalid(fn, "tokens must be in [0, " + str(kMaxInt) + "] (got " + str(tokens) + ")");
  }
  return Status::ok_status();
}

// Pointers may be null only when nothing is read or written (tokens == 0).
Status check_pointer(const char* fn, const char* name, const void* p, int64_t tokens) {
  if (p == nullptr && tokens > 0) {
    return invalid(fn, std::string(name) + " is null (tokens " + str(tokens) + ")");
  }
  return Status::ok_status();
}

Status check_norm_args(const char* fn, const PeerConfig& c, const float* norm_weight,
                       const float* x, int64_t tokens, const float* xhat) {
  TROVE_RETURN_IF_ERROR(check_tokens(fn, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "x", x, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "xhat", xhat, tokens));
  if (c.input_norm == InputNorm::kRms) {
    TROVE_RETURN_IF_ERROR(check_pointer(fn, "norm_weight (input_norm rms)", norm_weight, tokens));
  }
  return Status::ok_status();
}

Status check_query_args(const char* fn, const PeerConfig& c, const PeerRouterParams& p,
                        const float* xhat, int64_t tokens, const float* q) {
  TROVE_RETURN_IF_ERROR(check_tokens(fn, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "xhat", xhat, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "q", q, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "params.query_weight", p.query_weight, tokens));
  if (c.query_bias) {
    TROVE_RETURN_IF_ERROR(
        check_pointer(fn, "params.query_bias (config.query_bias is set)", p.query_bias, tokens));
  } else if (p.query_bias != nullptr) {
    return invalid(fn, "params.query_bias is set but config.query_bias is false");
  }
  if (c.query_rows() > kMaxInt) {
    return unsupported(fn,
                       "heads * 2 * dim_key = " + str(c.query_rows()) + " exceeds " + str(kMaxInt));
  }
  return Status::ok_status();
}

Status check_route_limits(const char* fn, const PeerConfig& c) {
  if (c.n_keys > kMaxCudaKeys) {
    return unsupported(fn, "n_keys " + str(c.n_keys) + " exceeds " + str(kMaxCudaKeys) +
                               " (expert ids must fit 32 bits)");
  }
  if (c.topk_per_half > kMaxCudaTopk) {
    return unsupported(fn,
                       "topk_per_half " + str(c.topk_per_half) + " exceeds " + str(kMaxCudaTopk));
  }
  if (c.topk > kMaxCudaTopk) {
    return unsupported(fn, "topk " + str(c.topk) + " exceeds " + str(kMaxCudaTopk));
  }
  if (c.query_rows() > kMaxInt) {
    return unsupported(fn,
                       "heads * 2 * dim_key = " + str(c.query_rows()) + " exceeds " + str(kMaxInt));
  }
  if (2 * c.heads * c.n_keys > kMaxInt) {
    return unsupported(fn, "heads * 2 * n_keys = " + str(2 * c.heads * c.n_keys) +
                               " sub-scores per token exceed " + str(kMaxInt));
  }
  return Status::ok_status();
}

Status check_route_args(const char* fn, const PeerConfig& c, const PeerRouterParams& p,
                        const float* q, int64_t tokens) {
  TROVE_RETURN_IF_ERROR(check_tokens(fn, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "q", q, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "params.keys", p.keys, tokens));
  return check_route_limits(fn, c);
}

// `records_name`: what the records argument is called in this entry point.
Status check_experts_args(const char* fn, const PeerConfig& c, const RecordLayout& layout,
                          const float* xhat, int64_t tokens, const void* gates,
                          const char* records_name, const void* records, const float* y) {
  TROVE_RETURN_IF_ERROR(check_layout(fn, c, layout));
  TROVE_RETURN_IF_ERROR(check_tokens(fn, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "xhat", xhat, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "gates", gates, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, records_name, records, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(fn, "y", y, tokens));
  if (c.heads * c.topk > kMaxSlotsPerToken) {
    return unsupported(fn, "heads * topk = " + str(c.heads * c.topk) + " slots per token exceed " +
                               str(kMaxSlotsPerToken));
  }
  return Status::ok_status();
}

Status check_routing(const char* fn, const PeerConfig& c, const PeerRouting& r) {
  if (r.heads != c.heads || r.topk != c.topk) {
    return invalid(fn, "routing is for heads " + str(r.heads) + ", topk " + str(r.topk) +
                           " but the config has heads " + str(c.heads) + ", topk " + str(c.topk));
  }
  TROVE_RETURN_IF_ERROR(check_tokens(fn, r.tokens));
  const auto slots = static_cast<size_t>(r.tokens * c.heads * c.topk);
  if (r.ids.size() != slots || r.gates.size() != slots) {
    return invalid(fn, "routing has " + str(static_cast<int64_t>(r.ids.size())) + " ids and " +
                           str(static_cast<int64_t>(r.gates.size())) + " gates for tokens " +
                           str(r.tokens) + " * heads * topk = " + str(static_cast<int64_t>(slots)) +
                           " slots");
  }
  return Status::ok_status();
}

Status empty_context(const char* fn) {
  return invalid(fn,
                 "empty CudaPeerContext (default-constructed or moved from); make one with "
                 "CudaPeerContext::create()");
}

cuda::ExpertPass expert_pass(const PeerConfig& c, const RecordLayout& l, int64_t tokens) {
  cuda::ExpertPass p;
  p.dtype = l.dtype;
  p.activation = c.activation;
  p.tokens = tokens;
  p.dim = c.dim;
  p.dim_out = c.dim_out;
  p.slots = c.heads * c.topk;
  p.down_scales_offset = l.down_scales_offset;
  p.up_scales_offset = l.up_scales_offset;
  p.down_codes_offset = l.down_codes_offset;
  p.up_codes_offset = l.up_codes_offset;
  return p;
}

}  // namespace

struct CudaPeerContext::Impl {
  Impl(cuda::Stream s, cuda::BlasHandle b) : stream(std::move(s)), blas(std::move(b)) {}

  cuda::Stream stream;
  cuda::BlasHandle blas;  // bound to `stream`
  // The device form's scratch: route_device's sub-scores [tile, h, 2, n].
  cuda::DeviceBuffer<float> sub_scores;
  // The host form's staging, each grown to the largest call.
  struct Staging {
    cuda::DeviceBuffer<float> x, xhat, q, weight, bias, keys, gamma, scores, gates, y;
    cuda::DeviceBuffer<int64_t> ids;
    cuda::DeviceBuffer<uint8_t> slab;
    cuda::DeviceBuffer<const uint8_t*> record_ptrs;
  } staged;

  cudaStream_t s() const { return stream.get(); }

  // Grows `buffer` to hold `count` elements. Work queued earlier may still read the old buffer,
  // so the stream is drained before it is freed.
  template <typename T>
  Status reserve(cuda::DeviceBuffer<T>* buffer, size_t count) {
    if (buffer->size() >= count) return Status::ok_status();
    TROVE_RETURN_IF_ERROR(stream.synchronize());
    buffer->reset();
    TROVE_ASSIGN_OR_RETURN(*buffer, cuda::DeviceBuffer<T>::allocate(count));
    return Status::ok_status();
  }

  template <typename T>
  Status upload(cuda::DeviceBuffer<T>* buffer, const T* host, size_t count) {
    TROVE_RETURN_IF_ERROR(reserve(buffer, count));
    if (count == 0) return Status::ok_status();
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(buffer->get(), host, count * sizeof(T), cudaMemcpyHostToDevice, s()));
    return Status::ok_status();
  }

  template <typename T>
  Status download(T* host, const cuda::DeviceBuffer<T>& buffer, size_t count) {
    if (count == 0) return Status::ok_status();
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host, buffer.get(), count * sizeof(T), cudaMemcpyDeviceToHost, s()));
    return Status::ok_status();
  }

  // Waits for the stream also when queuing failed part-way: host staging and device buffers
  // must outlive every copy already queued. The first error wins.
  Status finish(const Status& queued) {
    const Status finished = stream.synchronize();
    return queued.ok() ? finished : queued;
  }

  // ---- the steps on device pointers, arguments checked by the caller ------------------------

  Status norm(const PeerConfig& c, const float* gamma, const float* x_in, int64_t tokens,
              float* out) {
    if (tokens == 0) return Status::ok_status();
    if (c.input_norm == InputNorm::kNone) {
      if (out != x_in) {
        TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out, x_in, sz(tokens * c.dim) * sizeof(float),
                                                   cudaMemcpyDeviceToDevice, s()));
      }
      return Status::ok_status();
    }
    return cuda::launch_rms_norm(x_in, gamma, tokens, c.dim, c.norm_eps, out, s());
  }

  Status query(const PeerConfig& c, const float* w, const float* b, const float* xhat_in,
               int64_t tokens, float* q_out) {
    if (tokens == 0) return Status::ok_status();
    return cuda::query_projection(blas.get(), w, c.query_bias ? b : nullptr, xhat_in, tokens, c.dim,
                                  c.query_rows(), q_out, s());
  }

  Status route(const PeerConfig& c, const float* key_table, const float* q_in, int64_t tokens,
               const PeerDeviceRouting& r) {
    if (tokens == 0) return Status::ok_status();
    cuda::RouteShape shape;
    shape.heads = c.heads;
    shape.n_keys = c.n_keys;
    shape.dim_key = c.dim_key;
    shape.topk = c.topk;
    shape.topk_per_half = c.topk_per_half;
    shape.shared_keys = c.shared_keys;
    shape.gate = c.gate;
    const int64_t per_token = c.heads * 2 * c.n_keys;  // <= 2^31 - 1 (checked)
    // Tiles keep the scratch bounded; tile * h is a cuBLAS column count and a grid size.
    int64_t tile = std::max<int64_t>(1, kSubScoreScratchFloats / per_token);
    tile = std::min({tile, tokens, kMaxInt / c.heads});
    TROVE_RETURN_IF_ERROR(reserve(&sub_scores, sz(tile * per_token)));
    const int64_t rows = c.query_rows();
    const int64_t k = c.topk;
    for (int64_t t0 = 0; t0 < tokens; t0 += tile) {
      const int64_t tt = std::min(tile, tokens - t0);
      TROVE_RETURN_IF_ERROR(cuda::sub_key_scores(blas.get(), q_in + t0 * rows, key_table, tt, shape,
                                                 sub_scores.get()));
      const int64_t out = t0 * c.heads * k;
      TROVE_RETURN_IF_ERROR(cuda::launch_route_select(sub_scores.get(), tt, shape, r.ids + out,
                                                      r.scores + out, r.gates + out, s()));
    }
    return Status::ok_status();
  }
};

CudaPeerContext::CudaPeerContext() = default;
CudaPeerContext::~CudaPeerContext() = default;
CudaPeerContext::CudaPeerContext(CudaPeerContext&& other) noexcept = default;
CudaPeerContext& CudaPeerContext::operator=(CudaPeerContext&& other) noexcept = default;
CudaPeerContext::CudaPeerContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<CudaPeerContext> CudaPeerContext::create() {
  TROVE_RETURN_IF_ERROR(cuda::require_cuda_device().with_context("CudaPeerContext::create"));
  TROVE_ASSIGN_OR_RETURN(cuda::Stream stream, cuda::Stream::create());
  TROVE_ASSIGN_OR_RETURN(cuda::BlasHandle blas,
                         cuda::BlasHandle::create(stream.get(), CUBLAS_DEFAULT_MATH));
  return Result<CudaPeerContext>(
      CudaPeerContext(std::make_unique<Impl>(std::move(stream), std::move(blas))));
}

Status CudaPeerContext::copy_async(void* dst, const void* src, size_t bytes) {
  constexpr const char* kFn = "CudaPeerContext::copy_async";
  if (bytes > 0 && (dst == nullptr || src == nullptr)) {
    return invalid(kFn, std::string(dst == nullptr ? "dst" : "src") + " is null (bytes " +
                            str(static_cast<int64_t>(bytes)) + ")");
  }
  if (impl_ == nullptr) return empty_context(kFn);
  if (bytes == 0) return Status::ok_status();
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, impl_->s()));
  return Status::ok_status();
}

Status CudaPeerContext::synchronize() {
  if (impl_ == nullptr) return empty_context("CudaPeerContext::synchronize");
  return impl_->stream.synchronize();
}

void* CudaPeerContext::native_stream() const {
  return impl_ != nullptr ? impl_->s() : nullptr;
}

Status CudaPeerContext::wait(const CudaEvent& event) {
  if (impl_ == nullptr) return empty_context("CudaPeerContext::wait");
  if (event.native_handle() == nullptr) return Status::invalid_argument("empty CudaEvent");
  TROVE_CUDA_RETURN_IF_ERROR(
      cudaStreamWaitEvent(impl_->s(), static_cast<cudaEvent_t>(event.native_handle()), 0));
  return Status::ok_status();
}

Status CudaPeerContext::record(CudaEvent& event) {
  if (impl_ == nullptr) return empty_context("CudaPeerContext::record");
  return event.record_native(impl_->s());
}

// ---- host form -------------------------------------------------------------------------------

Status CudaPeerContext::norm(const PeerConfig& config, const float* norm_weight, const float* x,
                             int64_t tokens, float* xhat) {
  constexpr const char* kFn = "CudaPeerContext::norm";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(check_norm_args(kFn, c, norm_weight, x, tokens, xhat));
  if (impl_ == nullptr) return empty_context(kFn);
  if (tokens == 0) return Status::ok_status();
  Impl& im = *impl_;
  const size_t n = sz(tokens * c.dim);
  const bool rms = c.input_norm == InputNorm::kRms;
  const Status queued = [&]() -> Status {
    TROVE_RETURN_IF_ERROR(im.upload(&im.staged.x, x, n));
    if (rms) TROVE_RETURN_IF_ERROR(im.upload(&im.staged.gamma, norm_weight, sz(c.dim)));
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.xhat, n));
    TROVE_RETURN_IF_ERROR(
        im.norm(c, im.staged.gamma.get(), im.staged.x.get(), tokens, im.staged.xhat.get()));
    return im.download(xhat, im.staged.xhat, n);
  }();
  return im.finish(queued);
}

Status CudaPeerContext::query(const PeerConfig& config, const PeerRouterParams& params,
                              const float* xhat, int64_t tokens, float* q) {
  constexpr const char* kFn = "CudaPeerContext::query";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(check_query_args(kFn, c, params, xhat, tokens, q));
  if (impl_ == nullptr) return empty_context(kFn);
  if (tokens == 0) return Status::ok_status();
  Impl& im = *impl_;
  const int64_t rows = c.query_rows();
  const Status queued = [&]() -> Status {
    TROVE_RETURN_IF_ERROR(im.upload(&im.staged.xhat, xhat, sz(tokens * c.dim)));
    TROVE_RETURN_IF_ERROR(im.upload(&im.staged.weight, params.query_weight, sz(rows * c.dim)));
    if (c.query_bias)
      TROVE_RETURN_IF_ERROR(im.upload(&im.staged.bias, params.query_bias, sz(rows)));
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.q, sz(tokens * rows)));
    TROVE_RETURN_IF_ERROR(im.query(c, im.staged.weight.get(), im.staged.bias.get(),
                                   im.staged.xhat.get(), tokens, im.staged.q.get()));
    return im.download(q, im.staged.q, sz(tokens * rows));
  }();
  return im.finish(queued);
}

Status CudaPeerContext::route(const PeerConfig& config, const PeerRouterParams& params,
                              const float* q, int64_t tokens, PeerRouting* routing) {
  constexpr const char* kFn = "CudaPeerContext::route";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(check_route_args(kFn, c, params, q, tokens));
  if (routing == nullptr) return invalid(kFn, "routing is null");
  if (impl_ == nullptr) return empty_context(kFn);
  routing->resize(tokens, c.heads, c.topk);
  if (tokens == 0) return Status::ok_status();
  Impl& im = *impl_;
  const size_t slots = routing->slots();
  const Status queued = [&]() -> Status {
    TROVE_RETURN_IF_ERROR(im.upload(&im.staged.q, q, sz(tokens * c.query_rows())));
    TROVE_RETURN_IF_ERROR(
        im.upload(&im.staged.keys, params.keys, sz(c.key_heads() * 2 * c.n_keys * c.dim_key)));
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.ids, slots));
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.scores, slots));
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.gates, slots));
    PeerDeviceRouting r;
    r.ids = im.staged.ids.get();
    r.scores = im.staged.scores.get();
    r.gates = im.staged.gates.get();
    TROVE_RETURN_IF_ERROR(im.route(c, im.staged.keys.get(), im.staged.q.get(), tokens, r));
    TROVE_RETURN_IF_ERROR(im.download(routing->ids.data(), im.staged.ids, slots));
    TROVE_RETURN_IF_ERROR(im.download(routing->scores.data(), im.staged.scores, slots));
    return im.download(routing->gates.data(), im.staged.gates, slots);
  }();
  return im.finish(queued);
}

Status CudaPeerContext::experts(const PeerConfig& config, const RecordLayout& layout,
                                const float* xhat, const PeerRouting& routing,
                                const uint8_t* const* records, float* y) {
  constexpr const char* kFn = "CudaPeerContext::experts";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(check_routing(kFn, c, routing));
  const int64_t tokens = routing.tokens;
  TROVE_RETURN_IF_ERROR(check_experts_args(kFn, c, layout, xhat, tokens, routing.gates.data(),
                                           "records", records, y));
  const size_t slots = routing.slots();
  for (size_t s = 0; s < slots; ++s) {
    if (records[s] == nullptr) {
      return invalid(
          kFn, "records[" + std::to_string(s) + "] is null (expert " + str(routing.ids[s]) + ")");
    }
  }
  if (impl_ == nullptr) return empty_context(kFn);
  if (tokens == 0) return Status::ok_status();
  Impl& im = *impl_;

  // The distinct records, once each, into one slab at the layout's stride (64-byte aligned:
  // cudaMalloc aligns to 256 and the stride is a multiple of 64).
  std::unordered_map<const uint8_t*, size_t> index_of;
  std::vector<size_t> slot_record(slots);
  std::vector<const uint8_t*> distinct;
  for (size_t s = 0; s < slots; ++s) {
    const auto [it, inserted] = index_of.try_emplace(records[s], distinct.size());
    if (inserted) distinct.push_back(records[s]);
    slot_record[s] = it->second;
  }
  std::vector<uint8_t> host_slab(distinct.size() * layout.stride, 0);
  for (size_t u = 0; u < distinct.size(); ++u) {
    std::memcpy(host_slab.data() + u * layout.stride, distinct[u], layout.record_bytes);
  }
  std::vector<const uint8_t*> slot_ptrs(slots);
  const Status queued = [&]() -> Status {
    TROVE_RETURN_IF_ERROR(im.upload(&im.staged.slab, host_slab.data(), host_slab.size()));
    for (size_t s = 0; s < slots; ++s) {
      slot_ptrs[s] = im.staged.slab.get() + slot_record[s] * layout.stride;
    }
    TROVE_RETURN_IF_ERROR(im.upload(&im.staged.record_ptrs, slot_ptrs.data(), slots));
    TROVE_RETURN_IF_ERROR(im.upload(&im.staged.xhat, xhat, sz(tokens * c.dim)));
    TROVE_RETURN_IF_ERROR(im.upload(&im.staged.gates, routing.gates.data(), slots));
    TROVE_RETURN_IF_ERROR(im.reserve(&im.staged.y, sz(tokens * c.dim_out)));
    TROVE_RETURN_IF_ERROR(cuda::launch_peer_experts(
        expert_pass(c, layout, tokens), im.staged.xhat.get(), im.staged.gates.get(),
        im.staged.record_ptrs.get(), im.staged.y.get(), im.s()));
    return im.download(y, im.staged.y, sz(tokens * c.dim_out));
  }();
  return im.finish(queued);
}

// ---- device form -----------------------------------------------------------------------------

Status CudaPeerContext::norm_device(const PeerConfig& config, const float* norm_weight,
                                    const float* x, int64_t tokens, float* xhat) {
  constexpr const char* kFn = "CudaPeerContext::norm_device";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(check_norm_args(kFn, c, norm_weight, x, tokens, xhat));
  if (impl_ == nullptr) return empty_context(kFn);
  return impl_->norm(c, norm_weight, x, tokens, xhat);
}

Status CudaPeerContext::query_device(const PeerConfig& config, const PeerRouterParams& params,
                                     const float* xhat, int64_t tokens, float* q) {
  constexpr const char* kFn = "CudaPeerContext::query_device";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(check_query_args(kFn, c, params, xhat, tokens, q));
  if (impl_ == nullptr) return empty_context(kFn);
  return impl_->query(c, params.query_weight, params.query_bias, xhat, tokens, q);
}

Status CudaPeerContext::route_device(const PeerConfig& config, const PeerRouterParams& params,
                                     const float* q, int64_t tokens,
                                     const PeerDeviceRouting& routing) {
  constexpr const char* kFn = "CudaPeerContext::route_device";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(check_route_args(kFn, c, params, q, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(kFn, "routing.ids", routing.ids, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(kFn, "routing.scores", routing.scores, tokens));
  TROVE_RETURN_IF_ERROR(check_pointer(kFn, "routing.gates", routing.gates, tokens));
  if (impl_ == nullptr) return empty_context(kFn);
  return impl_->route(c, params.keys, q, tokens, routing);
}

Status CudaPeerContext::experts_device(const PeerConfig& config, const RecordLayout& layout,
                                       const float* xhat, int64_t tokens, const float* gates,
                                       const uint8_t* const* records, float* y) {
  constexpr const char* kFn = "CudaPeerContext::experts_device";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(
      check_experts_args(kFn, c, layout, xhat, tokens, gates, "records", records, y));
  if (impl_ == nullptr) return empty_context(kFn);
  if (tokens == 0) return Status::ok_status();
  return cuda::launch_peer_experts(expert_pass(c, layout, tokens), xhat, gates, records, y,
                                   impl_->s());
}

Status CudaPeerContext::experts_device_ranged(const PeerConfig& config, const RecordLayout& layout,
                                              const float* xhat, int64_t tokens, const float* gates,
                                              const uint8_t* const* records, const int32_t* ranges,
                                              float* y) {
  constexpr const char* kFn = "CudaPeerContext::experts_device_ranged";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(
      check_experts_args(kFn, c, layout, xhat, tokens, gates, "records", records, y));
  TROVE_RETURN_IF_ERROR(check_pointer(kFn, "ranges", ranges, tokens));
  if (impl_ == nullptr) return empty_context(kFn);
  if (tokens == 0) return Status::ok_status();
  return cuda::launch_peer_experts_ranged(expert_pass(c, layout, tokens), xhat, gates, records,
                                          ranges, y, impl_->s());
}

Status CudaPeerContext::experts_device_indexed(const PeerConfig& config, const RecordLayout& layout,
                                               const float* xhat, int64_t tokens,
                                               const float* gates, const uint8_t* table,
                                               const int64_t* record_index, float* y) {
  constexpr const char* kFn = "CudaPeerContext::experts_device_indexed";
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, filled_config(kFn, config));
  TROVE_RETURN_IF_ERROR(check_experts_args(kFn, c, layout, xhat, tokens, gates, "table", table, y));
  TROVE_RETURN_IF_ERROR(check_pointer(kFn, "record_index", record_index, tokens));
  if (impl_ == nullptr) return empty_context(kFn);
  if (tokens == 0) return Status::ok_status();
  return cuda::launch_peer_experts_indexed(expert_pass(c, layout, tokens), xhat, gates, table,
                                           record_index, layout.stride, y, impl_->s());
}

}  // namespace trove
