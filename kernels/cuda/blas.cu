// cuBLAS errors as Status and the handle owner (blas.cuh).
#include <cstring>
#include <string>

#include "kernels/cuda/blas.cuh"

namespace trove::cuda {

namespace {

// As device.cu: keep the path from the source tree's "kernels/" on.
const char* source_path(const char* file) {
  const char* in_tree = std::strstr(file, "kernels/");
  return in_tree != nullptr ? in_tree : file;
}

}  // namespace

Status cublas_error_status(cublasStatus_t status, const char* call, const char* file, int line) {
  std::string msg = std::string(call) + " failed at " + source_path(file) + ":" +
                    std::to_string(line) + ": " + cublasGetStatusName(status) + " (" +
                    cublasGetStatusString(status) + ")";
  switch (status) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return Status::resource_exhausted(std::move(msg));
    case CUBLAS_STATUS_NOT_INITIALIZED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return Status::not_supported(std::move(msg));
    default:
      return Status::io_error(std::move(msg));
  }
}

Result<BlasHandle> BlasHandle::create(cudaStream_t stream, cublasMath_t math) {
  BlasHandle handle;
  TROVE_CUBLAS_RETURN_IF_ERROR(cublasCreate(&handle.handle_));
  TROVE_CUBLAS_RETURN_IF_ERROR(cublasSetStream(handle.handle_, stream));
  TROVE_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(handle.handle_, math));
  return Result<BlasHandle>(std::move(handle));
}

BlasHandle::~BlasHandle() {
  // As for cudaFree: a failure can only mean a broken context, reported by the next call.
  if (handle_ != nullptr) (void)cublasDestroy(handle_);
}

BlasHandle& BlasHandle::operator=(BlasHandle&& other) noexcept {
  if (this != &other) {
    if (handle_ != nullptr) (void)cublasDestroy(handle_);
    handle_ = std::exchange(other.handle_, nullptr);
  }
  return *this;
}

}  // namespace trove::cuda
