// CUDA plumbing shared by every .cu file: CUDA errors as Status, and move-only RAII owners of
// device memory and streams (STYLE.md rule 4). Included only by .cu files, never by a public
// header (kernels/cuda/cuda_backend.h is the public face).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "base/status.h"

namespace trove::cuda {

// The Status for a failed CUDA call: "<call> failed at <file>:<line>: <cudaErrorName>
// (<description>)". Clears the runtime's last-error slot, so a recoverable error (say an
// allocation failure) is not reported again by the next unrelated cudaGetLastError().
// Codes: out of memory -> kResourceExhausted; no driver, no device or no kernel image for
// this GPU -> kNotSupported; anything else -> kIOError (the device said no).
Status cuda_error_status(cudaError_t err, const char* call, const char* file, int line);

// OK when a CUDA device is usable; otherwise kNotSupported "no CUDA device is available
// (<why>)".
Status require_cuda_device();

}  // namespace trove::cuda

// Evaluates a CUDA runtime call; on failure returns its Status from the enclosing function
// (which must return Status or Result<T>).
#define TROVE_CUDA_RETURN_IF_ERROR(call)                                                   \
  do {                                                                                     \
    const cudaError_t trove_cuda_err_ = (call);                                            \
    if (trove_cuda_err_ != cudaSuccess)                                                    \
      return ::trove::cuda::cuda_error_status(trove_cuda_err_, #call, __FILE__, __LINE__); \
  } while (0)

namespace trove::cuda {

// Owns `size()` elements of T in device memory (cudaMalloc/cudaFree). Move-only. An empty
// buffer (size 0) holds no allocation and a null pointer.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;

  static Result<DeviceBuffer> allocate(size_t count) {
    DeviceBuffer buffer;
    if (count > SIZE_MAX / sizeof(T)) {
      return Status::resource_exhausted("device buffer of " + std::to_string(count) +
                                        " elements overflows size_t");
    }
    if (count > 0) {
      void* ptr = nullptr;
      TROVE_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr, count * sizeof(T)));
      buffer.ptr_ = static_cast<T*>(ptr);
      buffer.size_ = count;
    }
    // Explicit: Result's by-value constructor is not an implicit-move target in C++17.
    return Result<DeviceBuffer>(std::move(buffer));
  }

  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : ptr_(std::exchange(other.ptr_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      ptr_ = std::exchange(other.ptr_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return size_; }
  size_t bytes() const { return size_ * sizeof(T); }

  // Frees the memory. cudaFree's error is dropped: it can only report a broken context,
  // which the next checked call reports anyway.
  void reset() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }

 private:
  T* ptr_ = nullptr;
  size_t size_ = 0;
};

// Owns a non-blocking CUDA stream (no implicit sync with the legacy default stream). Move-only.
class Stream {
 public:
  static Result<Stream> create();

  ~Stream();
  Stream(Stream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}
  Stream& operator=(Stream&& other) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  cudaStream_t get() const { return stream_; }
  // Waits for all work queued on the stream; reports the first asynchronous error.
  Status synchronize() const;

 private:
  Stream() = default;
  cudaStream_t stream_ = nullptr;
};

}  // namespace trove::cuda
