// Device discovery and the CUDA-error-to-Status plumbing (device.cuh).
//
// Nothing here may abort: trove runs CPU-only on machines without a driver or GPU, and asks
// cuda_device_count() before choosing a backend, so every CUDA failure becomes 0 or a Status.
#include <cstring>
#include <string>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/device.cuh"

namespace trove::cuda {

namespace {

// __FILE__ from the build is an absolute path; keep the part from the source tree's
// top-level folder ("kernels/cuda/dequant.cu") so messages stay short.
const char* source_path(const char* file) {
  const char* in_tree = std::strstr(file, "kernels/");
  return in_tree != nullptr ? in_tree : file;
}

std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

}  // namespace

Status cuda_error_status(cudaError_t err, const char* call, const char* file, int line) {
  (void)cudaGetLastError();  // clear the slot; sticky errors stay sticky regardless
  std::string msg = std::string(call) + " failed at " + source_path(file) + ":" +
                    std::to_string(line) + ": " + describe(err);
  switch (err) {
    case cudaErrorMemoryAllocation:
      return Status::resource_exhausted(std::move(msg));
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorNoKernelImageForDevice:
      return Status::not_supported(std::move(msg));
    default:
      return Status::io_error(std::move(msg));
  }
}

Status require_cuda_device() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return Status::not_supported(
        "no CUDA device is available (cudaGetDeviceCount: " + describe(err) + ")");
  }
  if (count == 0) {
    return Status::not_supported(
        "no CUDA device is available (cudaGetDeviceCount reports 0 devices)");
  }
  return Status::ok_status();
}

Result<Stream> Stream::create() {
  Stream stream;
  TROVE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream.stream_, cudaStreamNonBlocking));
  return Result<Stream>(std::move(stream));
}

Stream::~Stream() {
  // As for cudaFree: a failure here can only mean a broken context, reported elsewhere.
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
}

Stream& Stream::operator=(Stream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

Status Stream::synchronize() const {
  TROVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return Status::ok_status();
}

}  // namespace trove::cuda

namespace trove {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

Result<std::string> cuda_device_name(int device) {
  const int count = cuda_device_count();
  if (device < 0 || device >= count) {
    return Status::invalid_argument("CUDA device " + std::to_string(device) +
                                    " does not exist (this machine has " + std::to_string(count) +
                                    " CUDA devices)");
  }
  cudaDeviceProp prop;
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  return std::string(prop.name);
}

}  // namespace trove
