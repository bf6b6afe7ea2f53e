// The owners of kernels/cuda/cuda_memory.h. Plain host code (no kernels); a .cu file so that it
// is built with the rest of the CUDA backend and only there.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <utility>

#include "base/log.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/device.cuh"

namespace trove {

namespace {

constexpr size_t kPageBytes = 4096;

cudaStream_t as_stream(void* s) {
  return static_cast<cudaStream_t>(s);
}
cudaEvent_t as_event(void* e) {
  return static_cast<cudaEvent_t>(e);
}

Status empty(const char* what) {
  return Status::invalid_argument(std::string("empty ") + what);
}

}  // namespace

Status cuda_device_available() {
  return cuda::require_cuda_device();
}

// ---- CudaDeviceMemory ---------------------------------------------------------------------------

Result<CudaDeviceMemory> CudaDeviceMemory::allocate(size_t bytes) {
  CudaDeviceMemory m;
  if (bytes == 0) return Result<CudaDeviceMemory>(std::move(m));
  TROVE_RETURN_IF_ERROR(cuda::require_cuda_device());
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    return cuda::cuda_error_status(err, "cudaMalloc", __FILE__, __LINE__)
        .with_context("allocating " + std::to_string(bytes) + " bytes of device memory");
  }
  m.data_ = static_cast<uint8_t*>(p);
  m.bytes_ = bytes;
  return Result<CudaDeviceMemory>(std::move(m));
}

CudaDeviceMemory::~CudaDeviceMemory() {
  reset();
}
CudaDeviceMemory::CudaDeviceMemory(CudaDeviceMemory&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
CudaDeviceMemory& CudaDeviceMemory::operator=(CudaDeviceMemory&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}
void CudaDeviceMemory::reset() {
  // cudaFree's error can only report a broken context, which the next checked call reports.
  if (data_ != nullptr) (void)cudaFree(data_);
  data_ = nullptr;
  bytes_ = 0;
}

// ---- CudaManagedMemory --------------------------------------------------------------------------

Result<CudaManagedMemory> CudaManagedMemory::allocate(size_t bytes) {
  CudaManagedMemory m;
  if (bytes == 0) return Result<CudaManagedMemory>(std::move(m));
  TROVE_RETURN_IF_ERROR(cuda::require_cuda_device());
  void* p = nullptr;
  const cudaError_t err = cudaMallocManaged(&p, bytes, cudaMemAttachGlobal);
  if (err != cudaSuccess) {
    return cuda::cuda_error_status(err, "cudaMallocManaged", __FILE__, __LINE__)
        .with_context("allocating " + std::to_string(bytes) + " bytes of managed memory");
  }
  m.data_ = static_cast<uint8_t*>(p);
  m.bytes_ = bytes;
  return Result<CudaManagedMemory>(std::move(m));
}

CudaManagedMemory::~CudaManagedMemory() {
  reset();
}
CudaManagedMemory::CudaManagedMemory(CudaManagedMemory&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
CudaManagedMemory& CudaManagedMemory::operator=(CudaManagedMemory&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}
void CudaManagedMemory::reset() {
  if (data_ != nullptr) (void)cudaFree(data_);
  data_ = nullptr;
  bytes_ = 0;
}

// ---- PinnedHostBuffer ---------------------------------------------------------------------------

Result<PinnedHostBuffer> PinnedHostBuffer::allocate(size_t bytes) {
  PinnedHostBuffer b;
  if (bytes == 0) return Result<PinnedHostBuffer>(std::move(b));
  void* p = nullptr;
  const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
  if (err == cudaSuccess) {
    void* device = nullptr;
    const cudaError_t mapped = cudaHostGetDevicePointer(&device, p, 0);
    b.data_ = static_cast<uint8_t*>(p);
    // Unmapped (an old device without unified addressing): still pinned for DMA.
    b.device_data_ = mapped == cudaSuccess ? static_cast<uint8_t*>(device) : nullptr;
    if (mapped != cudaSuccess) (void)cudaGetLastError();
    b.bytes_ = bytes;
    b.pinned_ = true;
    return Result<PinnedHostBuffer>(std::move(b));
  }
  const Status why = cuda::cuda_error_status(err, "cudaHostAlloc", __FILE__, __LINE__);
  const size_t rounded = (bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
  p = std::aligned_alloc(kPageBytes, rounded);
  if (p == nullptr) {
    return Status::resource_exhausted("allocating " + std::to_string(bytes) +
                                      " bytes of host staging memory: pinned failed (" +
                                      why.message() + ") and so did pageable");
  }
  // Once per process: a staging buffer that grows would otherwise repeat it at every size.
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true)) {
    TROVE_LOG_WARN(
        "pinning %zu bytes of host staging memory failed (%s); using pageable memory (transfers "
        "are slower and synchronous; warned once)",
        bytes, why.message().c_str());
  }
  b.data_ = static_cast<uint8_t*>(p);
  b.bytes_ = bytes;
  b.pinned_ = false;
  return Result<PinnedHostBuffer>(std::move(b));
}

PinnedHostBuffer::~PinnedHostBuffer() {
  reset();
}
PinnedHostBuffer::PinnedHostBuffer(PinnedHostBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      device_data_(std::exchange(other.device_data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)),
      pinned_(std::exchange(other.pinned_, false)) {}
PinnedHostBuffer& PinnedHostBuffer::operator=(PinnedHostBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    device_data_ = std::exchange(other.device_data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    pinned_ = std::exchange(other.pinned_, false);
  }
  return *this;
}
void PinnedHostBuffer::reset() {
  if (data_ != nullptr) {
    if (pinned_) {
      (void)cudaFreeHost(data_);
    } else {
      std::free(data_);
    }
  }
  data_ = nullptr;
  device_data_ = nullptr;
  bytes_ = 0;
  pinned_ = false;
}

// ---- HostRegistration ---------------------------------------------------------------------------

HostRegistration HostRegistration::register_range(void* data, size_t bytes) {
  HostRegistration r;
  if (data == nullptr || bytes == 0) return r;
  cudaError_t err =
      cudaHostRegister(data, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  void* device = nullptr;
  if (err == cudaSuccess) {
    err = cudaHostGetDevicePointer(&device, data, 0);
    if (err != cudaSuccess) (void)cudaHostUnregister(data);
  }
  if (err != cudaSuccess) {
    const Status why = cuda::cuda_error_status(err, "cudaHostRegister", __FILE__, __LINE__);
    // Once per process: a tier registers one block per GiB.
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      TROVE_LOG_WARN(
          "pinning %zu bytes of host memory at %p failed (%s); it stays pageable (copies from it "
          "are slower, kernels cannot read it; warned once)",
          bytes, data, why.message().c_str());
    }
    return r;
  }
  r.data_ = data;
  r.device_data_ = static_cast<uint8_t*>(device);
  r.bytes_ = bytes;
  return r;
}

HostRegistration::~HostRegistration() {
  if (data_ != nullptr) (void)cudaHostUnregister(data_);
}
HostRegistration::HostRegistration(HostRegistration&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      device_data_(std::exchange(other.device_data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)) {}
HostRegistration& HostRegistration::operator=(HostRegistration&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) (void)cudaHostUnregister(data_);
    data_ = std::exchange(other.data_, nullptr);
    device_data_ = std::exchange(other.device_data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

// ---- CudaCopyStream -----------------------------------------------------------------------------

Result<CudaCopyStream> CudaCopyStream::create() {
  TROVE_RETURN_IF_ERROR(cuda::require_cuda_device());
  CudaCopyStream s;
  cudaStream_t stream = nullptr;
  TROVE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  s.stream_ = stream;
  return Result<CudaCopyStream>(std::move(s));
}

CudaCopyStream::~CudaCopyStream() {
  if (stream_ != nullptr) (void)cudaStreamDestroy(as_stream(stream_));
}
CudaCopyStream::CudaCopyStream(CudaCopyStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}
CudaCopyStream& CudaCopyStream::operator=(CudaCopyStream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) (void)cudaStreamDestroy(as_stream(stream_));
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

Status CudaCopyStream::copy_async(void* dst, const void* src, size_t bytes) {
  if (stream_ == nullptr) return empty("CudaCopyStream");
  if (bytes == 0) return Status::ok_status();
  TROVE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, as_stream(stream_)));
  return Status::ok_status();
}

Status CudaCopyStream::copy_batch_async(void* const* dsts, const void* const* srcs,
                                        const size_t* sizes, size_t count) {
  if (stream_ == nullptr) return empty("CudaCopyStream");
  if (count == 0) return Status::ok_status();
  // One attribute for every copy: sources are read in stream order (the staging slab was
  // written by the host before the call; nothing else writes it meanwhile).
  cudaMemcpyAttributes attrs = {};
  attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  size_t first = 0;
  TROVE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyBatchAsync(dsts, srcs, sizes, count, &attrs, &first, 1, as_stream(stream_)));
  return Status::ok_status();
}

namespace {

// One warp per record, grid-stride over records: lane i moves words i, i + 32, ... of the
// record, so a warp's loads of one record are consecutive (coalesced over the bus for mapped
// host memory). Word is uint4 (16 bytes) when every address and the size allow, else a byte.
template <typename Word>
__global__ void gather_records_kernel(void* const* dsts, const void* const* srcs, size_t words,
                                      size_t count) {
  const size_t warp = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const size_t warps = static_cast<size_t>(gridDim.x) * blockDim.x / 32;
  const unsigned lane = threadIdx.x % 32;
  for (size_t r = warp; r < count; r += warps) {
    const Word* src = static_cast<const Word*>(srcs[r]);
    Word* dst = static_cast<Word*>(dsts[r]);
    for (size_t w = lane; w < words; w += 32) dst[w] = src[w];
  }
}

constexpr int kGatherThreads = 256;
constexpr size_t kMaxGatherBlocks = 4096;

}  // namespace

Status CudaCopyStream::gather_async(void* const* dsts, const void* const* srcs, size_t bytes_each,
                                    size_t count) {
  if (stream_ == nullptr) return empty("CudaCopyStream");
  if (count == 0 || bytes_each == 0) return Status::ok_status();
  if (dsts == nullptr || srcs == nullptr) {
    return Status::invalid_argument("gather_async: null pointer array");
  }
  const size_t warps_per_block = kGatherThreads / 32;
  const size_t blocks = std::min(kMaxGatherBlocks, (count + warps_per_block - 1) / warps_per_block);
  if (bytes_each % 16 == 0) {
    gather_records_kernel<uint4>
        <<<static_cast<unsigned>(blocks), kGatherThreads, 0, as_stream(stream_)>>>(
            dsts, srcs, bytes_each / 16, count);
  } else {
    gather_records_kernel<uint8_t>
        <<<static_cast<unsigned>(blocks), kGatherThreads, 0, as_stream(stream_)>>>(
            dsts, srcs, bytes_each, count);
  }
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

Status CudaCopyStream::wait(const CudaEvent& event) {
  if (stream_ == nullptr) return empty("CudaCopyStream");
  if (event.event_ == nullptr) return empty("CudaEvent");
  TROVE_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(as_stream(stream_), as_event(event.event_), 0));
  return Status::ok_status();
}

Status CudaCopyStream::synchronize() {
  if (stream_ == nullptr) return empty("CudaCopyStream");
  TROVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(as_stream(stream_)));
  return Status::ok_status();
}

// ---- CudaEvent ----------------------------------------------------------------------------------

Result<CudaEvent> CudaEvent::create() {
  TROVE_RETURN_IF_ERROR(cuda::require_cuda_device());
  CudaEvent e;
  cudaEvent_t event = nullptr;
  TROVE_CUDA_RETURN_IF_ERROR(cudaEventCreate(&event));
  e.event_ = event;
  return Result<CudaEvent>(std::move(e));
}

CudaEvent::~CudaEvent() {
  if (event_ != nullptr) (void)cudaEventDestroy(as_event(event_));
}
CudaEvent::CudaEvent(CudaEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
CudaEvent& CudaEvent::operator=(CudaEvent&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr) (void)cudaEventDestroy(as_event(event_));
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

Status CudaEvent::record(const CudaCopyStream& stream) {
  if (event_ == nullptr) return empty("CudaEvent");
  if (stream.stream_ == nullptr) return empty("CudaCopyStream");
  TROVE_CUDA_RETURN_IF_ERROR(cudaEventRecord(as_event(event_), as_stream(stream.stream_)));
  return Status::ok_status();
}

Status CudaEvent::record_native(void* stream) {
  if (event_ == nullptr) return empty("CudaEvent");
  if (stream == nullptr) return Status::invalid_argument("CudaEvent::record_native: null stream");
  TROVE_CUDA_RETURN_IF_ERROR(cudaEventRecord(as_event(event_), as_stream(stream)));
  return Status::ok_status();
}

Status CudaEvent::synchronize() {
  if (event_ == nullptr) return empty("CudaEvent");
  TROVE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(as_event(event_)));
  return Status::ok_status();
}

Result<double> CudaEvent::elapsed_seconds(const CudaEvent& start, const CudaEvent& end) {
  if (start.event_ == nullptr || end.event_ == nullptr) return empty("CudaEvent");
  float ms = 0;
  TROVE_CUDA_RETURN_IF_ERROR(
      cudaEventElapsedTime(&ms, as_event(start.event_), as_event(end.event_)));
  return static_cast<double>(ms) / 1e3;
}

}  // namespace trove
