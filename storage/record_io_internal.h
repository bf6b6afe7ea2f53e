// Internals shared by RecordReader's engines (storage/record_io.cc: the reader and the pread
// pool; storage/record_io_uring.cc: io_uring). Not part of the API.
//
// Both engines run the same per-request state machine (Core::on_result) and delivery
// (Core::deliver), so the error rules, retries and verification are identical by
// construction; they differ only in how a request reaches the kernel.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "base/numeric.h"
#include "base/status.h"
#include "storage/file.h"
#include "storage/record_io.h"

namespace trove::record_io {

using Clock = std::chrono::steady_clock;

inline uint64_t elapsed_ns(Clock::time_point since) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - since).count());
}

// A heap buffer aligned for O_DIRECT; move-only, freed on destruction.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Rounds `bytes` up to `alignment` (a power of two >= kDirectAlignment), which is also the
  // alignment of data(). Fails only when memory is exhausted.
  static Result<AlignedBuffer> allocate(uint64_t bytes, uint64_t alignment = kDirectAlignment);
  uint8_t* data() const { return data_.get(); }
  uint64_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const;
  };
  std::unique_ptr<uint8_t, Free> data_;
  uint64_t size_ = 0;
};

// Request latencies in log2 buckets with 4 linear sub-buckets (each value is reported as its
// bucket's midpoint: within 12.5%). Lock-free; adds from any thread.
class LatencyHistogram {
 public:
  void add(uint64_t ns);
  // The q-quantile (0 < q < 1) in microseconds; 0 when empty.
  double quantile_us(double q) const;

 private:
  static constexpr int kBuckets = 256;
  std::atomic<uint64_t> counts_[kBuckets] = {};
};

// The cumulative counters behind RecordReaderStats; relaxed atomics, updated from I/O threads.
struct StatsCounters {
  std::atomic<uint64_t> batches{0}, reads{0}, requests{0}, bytes_read{0}, bytes_useful{0};
  std::atomic<uint64_t> eagain_retries{0}, short_read_retries{0}, checksum_failures{0};
  std::atomic<uint64_t> io_errors{0}, submit_calls{0}, alignment_fallbacks{0};
  std::atomic<uint32_t> max_in_flight{0};
  std::atomic<uint64_t> latency_ns{0};  // summed over requests
  std::atomic<uint64_t> busy_ns{0}, verify_ns{0};
  LatencyHistogram latency;

  // A request was issued with `in_flight` requests (itself included) now outstanding.
  void note_issue(uint32_t in_flight);
  // A request completed `ns` after it was issued.
  void note_completion(uint64_t ns);
  RecordReaderStats snapshot() const;
};

// One started batch. The engine's I/O thread(s) work on it; the caller waits on `cv`.
struct Batch {
  std::span<const RecordRead> reads;
  uint64_t max_extent = 0;          // the largest extent of any read (bounce slot size)
  Clock::time_point started;        // when start() was called
  std::atomic<size_t> next{0};      // pread: the next read a worker takes
  std::atomic<bool> failed{false};  // set with first_error: issue no more reads
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;   // guarded by mu
  Status first_error;  // guarded by mu
};

// A record's read in progress: file bytes [begin, begin + len) land in a bounce buffer; the
// request is complete once [begin, begin + needed) has arrived (an aligned extent may run past
// the end of the file).
struct ExtentRead {
  size_t index = 0;     // into Batch::reads
  uint64_t begin = 0;   // file offset of the extent (a multiple of `align` with O_DIRECT)
  uint64_t len = 0;     // extent bytes = the bounce bytes used
  uint64_t needed = 0;  // record end - begin
  uint64_t done = 0;    // bytes [begin, begin + done) have arrived; aligned with O_DIRECT
  uint64_t align = 1;   // the O_DIRECT alignment the extent was cut at; 1 when buffered
  int stalled = 0;      // consecutive short reads that brought no whole block
  int again = 0;        // consecutive EAGAIN or EINTR results
};

// What a request's result asks for next.
enum class Step {
  kComplete,  // [begin, begin + needed) has arrived: deliver it
  kReissue,   // read [begin + done, begin + len) again (EAGAIN, EINTR, short read)
  kFailed,    // the batch has failed (recorded in it)
};

// The O_DIRECT alignment of a file and how it was found (RecordReader::direct_alignment()).
struct DirectAlignment {
  uint32_t bytes = static_cast<uint32_t>(kDirectAlignment);
  const char* source = "default";
};

// The largest alignment the reader accepts from the kernel or the options.
inline constexpr uint32_t kMaxDirectAlignment = uint32_t{1} << 20;

// The file's O_DIRECT alignment, from the first source that answers: statx(STATX_DIOALIGN),
// BLKSSZGET on the device node of the file's st_dev, that device's logical_block_size in
// sysfs, a 512-byte probe read at offset 512 into a buffer at a 512-byte (not 4096) boundary;
// else kDirectAlignment. Values below 512 are raised to 512. REQUIRES: fd open with O_DIRECT.
DirectAlignment detect_direct_alignment(int fd);

// The file and the rules both engines share.
class Core {
 public:
  // `alignment` is ignored unless `direct`.
  Core(File file, bool direct, DirectAlignment alignment, const RecordReaderOptions& options);

  const std::string& path() const { return file_.path(); }
  int fd() const { return file_.fd(); }
  bool direct() const { return direct_; }
  // The alignment extents are cut at now: the file's, or kDirectAlignment after a fallback;
  // 0 when buffered.
  uint32_t alignment() const { return direct_ ? alignment_.load(std::memory_order_relaxed) : 0; }
  const char* alignment_source() const;
  // The largest alignment extents may ever be cut at, max(alignment(), kDirectAlignment): bounce
  // slots are sized and aligned for it.
  uint64_t max_alignment() const { return max_alignment_; }
  FileOps* file_ops() const { return file_ops_.get(); }
  StatsCounters& stats() { return stats_; }
  const StatsCounters& stats() const { return stats_; }

  // The extent read for record `r` (at `index` in the batch), at the current alignment.
  // REQUIRES: r was checked by check_request.
  ExtentRead extent_of(size_t index, const RecordRead& r) const;
  // The bounce bytes record `r` may need: its extent at max_alignment(), so a fallback to
  // kDirectAlignment in the middle of a batch never outgrows a slot.
  uint64_t extent_bytes(const RecordRead& r) const;
  // invalid_argument naming the record when it cannot be read (no bytes, no dest, offsets
  // past 2^64).
  Status check_request(const RecordRead& r) const;

  // Bytes the next request for `x` asks for: the rest of the extent, at most
  // kMaxRequestBytes.
  static uint64_t request_bytes(const ExtentRead& x);
  // Acts on `res` (bytes read, or -errno) for the request of request_bytes(x) bytes at
  // x.begin + x.done. Updates x (done; or the whole extent, recut at kDirectAlignment when
  // EINVAL refused a smaller alignment), the stats and, on failure, the batch.
  Step on_result(Batch& batch, ExtentRead& x, int64_t res);
  // Verifies the record in `extent` (x.len bounce bytes holding file bytes from x.begin) and
  // copies it to its dest. A mismatch fails the batch and leaves dest alone.
  void deliver(Batch& batch, const ExtentRead& x, const uint8_t* extent);
  // Records `s` as the batch's error when it is the first; issue no more reads.
  void fail(Batch& batch, Status s);
  // "<path>: expert <id> at offset <offset> (<bytes> bytes)".
  std::string describe(const RecordRead& r) const;
  // Marks the batch done and wakes wait(). The engine's last touch of the batch.
  void finish_batch(Batch& batch);

 private:
  Status truncated(const RecordRead& r) const;

  // EINVAL for `x` cut at a smaller alignment than kDirectAlignment: switches the reader to
  // kDirectAlignment (logged once) and recuts x there.
  void fall_back_to_page_alignment(ExtentRead& x, const RecordRead& r);
  static ExtentRead cut_extent(size_t index, const RecordRead& r, uint64_t align);

  File file_;
  bool direct_ = false;
  std::atomic<uint32_t> alignment_{0};
  const char* initial_source_ = "buffered";
  std::atomic<bool> fell_back_{false};
  uint64_t max_alignment_ = kDirectAlignment;
  bool verify_ = true;
  std::shared_ptr<FileOps> file_ops_;
  StatsCounters stats_;
};

// The part that differs: how requests reach the kernel. One thread at a time calls reserve
// and begin (the reader's caller); the engine's own threads do the I/O.
class Engine {
 public:
  Engine() = default;
  virtual ~Engine() = default;  // REQUIRES: no batch in flight
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  virtual const char* name() const = 0;
  // Makes bounce room for extents of up to `extent_bytes`. REQUIRES: no batch in flight.
  virtual Status reserve(uint64_t extent_bytes) = 0;
  // Starts `batch` on the I/O thread(s) and returns; calls Core::finish_batch at the end.
  // REQUIRES: batch->reads non-empty, every read checked, reserve(batch->max_extent) done.
  virtual void begin(Batch* batch) = 0;
};

// io_uring, or Status::not_supported when the kernel (or FileOps::io_uring_setup_fault)
// refuses a ring.
Result<std::unique_ptr<Engine>> make_uring_engine(Core& core, const RecordReaderOptions& options);
std::unique_ptr<Engine> make_pread_engine(Core& core, const RecordReaderOptions& options);

// The most one request asks for (io_uring lengths are 32-bit; Linux reads stop at 2 GiB).
inline constexpr uint64_t kMaxRequestBytes = uint64_t{1} << 30;

// Bounce bytes a fresh engine reserves (a record of up to 4 KiB + 1 straddles two blocks).
inline constexpr uint64_t kInitialExtentBytes = 2 * kDirectAlignment;

}  // namespace trove::record_io
