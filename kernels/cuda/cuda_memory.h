// Host-side CUDA resources for the runtime (SPEC §5, STYLE.md rule 4): device memory, pinned
// host memory (with the fallback to pageable memory SPEC §5 asks for), registration of memory
// allocated elsewhere, a copy stream and events. Each is a move-only owner.
//
// This header carries no CUDA type and includes no CUDA header, so runtime/ code can use it
// while its public headers stay CUDA-free; it exists only in builds with TROVE_HAVE_CUDA.
// Everything works on the calling thread's current device. No function throws or aborts: a
// machine without a driver or device gets a Status (kNotSupported "no CUDA device is
// available (...)" from the first call that needs one).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "base/status.h"

namespace trove {

// OK when a CUDA device is usable; else kNotSupported "no CUDA device is available (<the CUDA
// runtime's reason>)".
Status cuda_device_available();

// `bytes` of device memory (cudaMalloc, so 256-byte aligned). Empty when bytes == 0.
class CudaDeviceMemory {
 public:
  CudaDeviceMemory() = default;
  static Result<CudaDeviceMemory> allocate(size_t bytes);
  ~CudaDeviceMemory();
  CudaDeviceMemory(CudaDeviceMemory&& other) noexcept;
  CudaDeviceMemory& operator=(CudaDeviceMemory&& other) noexcept;
  CudaDeviceMemory(const CudaDeviceMemory&) = delete;
  CudaDeviceMemory& operator=(const CudaDeviceMemory&) = delete;

  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  void reset();

 private:
  uint8_t* data_ = nullptr;
  size_t bytes_ = 0;
};

// `bytes` of managed (unified) memory (cudaMallocManaged, attached globally): one address that
// the host and the device both use, its pages moved on demand to whichever touches them (no
// prefetch or advice is given). For the bench's managed-memory peer (runtime/bench/device_peers.h);
// the tiers never use it. A device without concurrent managed access cannot let the host touch
// the memory while a kernel may be running: synchronize first. Empty when bytes == 0.
// Errors: kResourceExhausted when the allocation fails, kNotSupported without a device.
class CudaManagedMemory {
 public:
  CudaManagedMemory() = default;
  static Result<CudaManagedMemory> allocate(size_t bytes);
  ~CudaManagedMemory();
  CudaManagedMemory(CudaManagedMemory&& other) noexcept;
  CudaManagedMemory& operator=(CudaManagedMemory&& other) noexcept;
  CudaManagedMemory(const CudaManagedMemory&) = delete;
  CudaManagedMemory& operator=(const CudaManagedMemory&) = delete;

  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  void reset();

 private:
  uint8_t* data_ = nullptr;
  size_t bytes_ = 0;
};

// `bytes` of host memory for staging transfers, page-aligned. Pinned and mapped (cudaHostAlloc,
// portable: every device may read it, by DMA or from kernels at device_data()) when the driver
// allows; when pinning fails (no device, a locked-memory limit, out of pinned memory) the
// buffer is ordinary pageable memory and a warning naming the size and the CUDA error is logged
// (the first time in the process; copies from it still work, at pageable speed and
// synchronously). pinned() tells which the buffer is.
// kResourceExhausted only when no memory at all can be had.
class PinnedHostBuffer {
 public:
  PinnedHostBuffer() = default;
  static Result<PinnedHostBuffer> allocate(size_t bytes);
  ~PinnedHostBuffer();
  PinnedHostBuffer(PinnedHostBuffer&& other) noexcept;
  PinnedHostBuffer& operator=(PinnedHostBuffer&& other) noexcept;
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;

  uint8_t* data() const { return data_; }
  // Where kernels read the buffer (the same bytes through the mapping); null when pageable.
  uint8_t* device_data() const { return device_data_; }
  size_t bytes() const { return bytes_; }
  bool pinned() const { return pinned_; }
  void reset();

 private:
  uint8_t* data_ = nullptr;
  uint8_t* device_data_ = nullptr;
  size_t bytes_ = 0;
  bool pinned_ = false;
};

// Pins and maps memory allocated elsewhere (cudaHostRegister, portable and mapped), e.g. one
// block of the host tier's slots, until destroyed: copies from it are DMA, and kernels read it
// at device_data(). Registration failing is not an error: registered() is false, a warning
// naming the range and the CUDA error is logged (the first time in the process), and the memory
// stays usable as pageable memory.
class HostRegistration {
 public:
  HostRegistration() = default;
  static HostRegistration register_range(void* data, size_t bytes);
  ~HostRegistration();
  HostRegistration(HostRegistration&& other) noexcept;
  HostRegistration& operator=(HostRegistration&& other) noexcept;
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;

  bool registered() const { return data_ != nullptr; }
  size_t bytes() const { return bytes_; }
  // The range's address for kernels (the host address itself where the device can use host
  // pointers for registered memory); null unless registered.
  uint8_t* device_data() const { return device_data_; }

 private:
  void* data_ = nullptr;  // null unless registered
  uint8_t* device_data_ = nullptr;
  size_t bytes_ = 0;
};

class CudaEvent;

// A non-blocking CUDA stream for copies. Copies on it are ordered among themselves, not with
// other streams: the caller synchronizes (or records events) before another stream reads what
// it copied.
class CudaCopyStream {
 public:
  CudaCopyStream() = default;  // empty: every call fails with kInvalidArgument
  static Result<CudaCopyStream> create();
  ~CudaCopyStream();
  CudaCopyStream(CudaCopyStream&& other) noexcept;
  CudaCopyStream& operator=(CudaCopyStream&& other) noexcept;
  CudaCopyStream(const CudaCopyStream&) = delete;
  CudaCopyStream& operator=(const CudaCopyStream&) = delete;

  // Queues one copy of `bytes` from src to dst; either may be host (pinned or pageable) or
  // device memory (cudaMemcpyDefault: unified addressing tells which).
  // REQUIRES: both ranges stay valid until the copy completes (synchronize()).
  Status copy_async(void* dst, const void* src, size_t bytes);
  // Queues `count` copies dsts[i] <- srcs[i] (sizes[i] bytes) as ONE batched operation
  // (cudaMemcpyBatchAsync): one call however many records, not one memcpy each. The copies of a
  // batch run in any order, so no two may overlap. count == 0 queues nothing.
  // REQUIRES: as for copy_async, for every range.
  Status copy_batch_async(void* const* dsts, const void* const* srcs, const size_t* sizes,
                          size_t count);
  // Queues ONE kernel that copies `count` records of `bytes_each` bytes, dsts[i] <- srcs[i], with
  // the device's SMs (an SM-driven gather) instead of its copy engines: a source may be mapped
  // pinned host memory (read over the bus at the kernel's loads, e.g. HostRegistration's
  // device_data()) or device memory. dsts and srcs are arrays of `count` pointers that the
  // DEVICE reads: device memory or mapped pinned memory (device addresses). 16-byte loads and
  // stores when bytes_each is a multiple of 16, byte by byte otherwise.
  // REQUIRES: no two destinations overlap; the ranges stay valid until the kernel completes;
  // with bytes_each % 16 == 0, every pointer 16-byte aligned (slots, slabs and staging are).
  Status gather_async(void* const* dsts, const void* const* srcs, size_t bytes_each, size_t count);
  // Work queued on this stream after the call waits for `event`'s point in its own stream.
  Status wait(const CudaEvent& event);
  // Waits for every copy queued so far; the first asynchronous error, naming the call.
  Status synchronize();
  // The cudaStream_t, for code that queues its own work on this stream (.cu files only).
  void* native_handle() const { return stream_; }

 private:
  friend class CudaEvent;
  void* stream_ = nullptr;  // cudaStream_t
};

// A CUDA event with timing, recorded on a CudaCopyStream.
class CudaEvent {
 public:
  CudaEvent() = default;
  static Result<CudaEvent> create();
  ~CudaEvent();
  CudaEvent(CudaEvent&& other) noexcept;
  CudaEvent& operator=(CudaEvent&& other) noexcept;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  // Marks the point in `stream`'s work queued so far.
  Status record(const CudaCopyStream& stream);
  // The same on a raw cudaStream_t (e.g. CudaPeerContext's stream).
  Status record_native(void* stream);
  // The cudaEvent_t (.cu files only).
  void* native_handle() const { return event_; }
  Status synchronize();
  // Seconds between two completed events (both recorded and reached).
  static Result<double> elapsed_seconds(const CudaEvent& start, const CudaEvent& end);

 private:
  friend class CudaCopyStream;
  void* event_ = nullptr;  // cudaEvent_t
};

}  // namespace trove
