// RecordReader: the API, the rules both engines share (Core) and the pread engine. The
// io_uring engine is in storage/record_io_uring.cc.
#include "storage/record_io.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "base/log.h"
#include "base/strings.h"
#include "storage/record_io_internal.h"
#include "storage/store_format.h"

namespace trove {

namespace {

int64_t sys_pread(int fd, uint8_t* buf, size_t len, uint64_t offset) {
  const ssize_t n = ::pread(fd, buf, len, static_cast<off_t>(offset));
  return n >= 0 ? static_cast<int64_t>(n) : -static_cast<int64_t>(errno);
}

}  // namespace

// ---- FileOps --------------------------------------------------------------------------------

int64_t FileOps::read_at(int fd, uint8_t* buf, size_t len, uint64_t offset) {
  return sys_pread(fd, buf, len, offset);
}

int FileOps::on_complete(uint64_t /*offset*/, uint8_t* /*buf*/, size_t /*len*/, int res) {
  return res;
}

namespace record_io {

namespace {

// Short reads in a row that bring no whole block before the read is given up: a device that
// keeps returning partial blocks of a file that is long enough.
constexpr int kMaxStalledShortReads = 8;
// EAGAIN/EINTR in a row before a read is given up: a transient condition clears long before.
constexpr int kMaxAgainInARow = 1000;

// The smallest alignment used: no block device has smaller logical blocks.
constexpr uint32_t kMinDirectAlignment = 512;

bool is_power_of_two(uint64_t x) {
  return x != 0 && (x & (x - 1)) == 0;
}

// `bytes` raised to kMinDirectAlignment, or 0 when it is no usable alignment.
uint32_t usable_alignment(uint64_t bytes) {
  if (!is_power_of_two(bytes) || bytes > kMaxDirectAlignment) return 0;
  return std::max(static_cast<uint32_t>(bytes), kMinDirectAlignment);
}

// The logical block size of block device `dev` from BLKSSZGET on its node (udev's
// /dev/block/M:m link), or 0 where the node is missing or not ours to open (containers).
uint32_t blkszget_of(dev_t dev) {
  char node[64];
  std::snprintf(node, sizeof node, "/dev/block/%u:%u", major(dev), minor(dev));
  const int fd = ::open(node, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return 0;
  int bytes = 0;
  const int rc = ::ioctl(fd, BLKSSZGET, &bytes);
  ::close(fd);
  return rc == 0 && bytes > 0 ? usable_alignment(static_cast<uint64_t>(bytes)) : 0;
}

// The same from sysfs: queue/logical_block_size of the device or, for a partition, of the
// whole disk above it. 0 when unreadable.
uint32_t sysfs_logical_block_size(dev_t dev) {
  for (const char* rel : {"queue/logical_block_size", "../queue/logical_block_size"}) {
    char file[96];
    std::snprintf(file, sizeof file, "/sys/dev/block/%u:%u/%s", major(dev), minor(dev), rel);
    std::FILE* f = std::fopen(file, "re");
    if (f == nullptr) continue;
    unsigned long long bytes = 0;
    const int n = std::fscanf(f, "%llu", &bytes);
    std::fclose(f);
    if (n == 1) return usable_alignment(bytes);
  }
  return 0;
}

}  // namespace

DirectAlignment detect_direct_alignment(int fd) {
#ifdef STATX_DIOALIGN
  struct statx sx {};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
      (sx.stx_mask & STATX_DIOALIGN) != 0 && sx.stx_dio_offset_align != 0) {
    // Offsets, lengths and buffers all at the larger of the two, so a buffer offset by a
    // multiple of the offset alignment is still aligned for memory.
    const uint32_t bytes =
        usable_alignment(std::max(sx.stx_dio_offset_align, sx.stx_dio_mem_align));
    if (bytes != 0) return {bytes, "statx"};
  }
#endif
  struct stat st;
  if (::fstat(fd, &st) == 0 && major(st.st_dev) != 0) {  // major 0: no block device (btrfs)
    if (const uint32_t bytes = blkszget_of(st.st_dev)) return {bytes, "BLKSSZGET"};
    if (const uint32_t bytes = sysfs_logical_block_size(st.st_dev)) return {bytes, "sysfs"};
  }
  // Nothing to ask: try a 512-byte read at offset 512 into memory aligned to 512 but not
  // 1024. Only a read that returns bytes is proof; EINVAL, EOF or anything else is not.
  Result<AlignedBuffer> buf = AlignedBuffer::allocate(kDirectAlignment);
  if (buf.ok() && ::pread(fd, buf->data() + kMinDirectAlignment, kMinDirectAlignment,
                          kMinDirectAlignment) > 0) {
    return {kMinDirectAlignment, "probe"};
  }
  return {};
}

// ---- AlignedBuffer --------------------------------------------------------------------------

void AlignedBuffer::Free::operator()(uint8_t* p) const {
  std::free(p);
}

Result<AlignedBuffer> AlignedBuffer::allocate(uint64_t bytes, uint64_t alignment) {
  const uint64_t rounded = std::max(align_up(bytes, alignment), alignment);
  AlignedBuffer b;
  b.data_.reset(static_cast<uint8_t*>(std::aligned_alloc(alignment, rounded)));
  if (b.data_ == nullptr) {
    return Status::resource_exhausted(
        str_printf("allocating %llu bytes of aligned read buffers failed", ull(rounded)));
  }
  b.size_ = rounded;
  return b;
}

// ---- LatencyHistogram -----------------------------------------------------------------------

// Bucket of ns: values below 4 have their own; from 4 on, bucket 4 * log2(ns) + the next two
// bits below the leading one.
void LatencyHistogram::add(uint64_t ns) {
  int index = static_cast<int>(ns);
  if (ns >= 4) {
    const int log2 = 63 - __builtin_clzll(ns);
    index = 4 * log2 + static_cast<int>((ns >> (log2 - 2)) & 3);
  }
  counts_[index].fetch_add(1, std::memory_order_relaxed);
}

double LatencyHistogram::quantile_us(double q) const {
  uint64_t counts[kBuckets];
  uint64_t total = 0;
  for (int i = 0; i < kBuckets; ++i) {
    counts[i] = counts_[i].load(std::memory_order_relaxed);
    total += counts[i];
  }
  if (total == 0) return 0;
  const uint64_t rank = std::min<uint64_t>(total - 1, static_cast<uint64_t>(q * total));
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += counts[i];
    if (seen > rank) {
      if (i < 4) return i / 1000.0;
      const int log2 = i / 4;
      const double lo =
          static_cast<double>(uint64_t{4 + static_cast<uint64_t>(i % 4)} << (log2 - 2));
      const double width = static_cast<double>(uint64_t{1} << (log2 - 2));
      return (lo + width / 2) / 1000.0;
    }
  }
  return 0;
}

// ---- StatsCounters --------------------------------------------------------------------------

void StatsCounters::note_issue(uint32_t in_flight) {
  requests.fetch_add(1, std::memory_order_relaxed);
  uint32_t seen = max_in_flight.load(std::memory_order_relaxed);
  while (in_flight > seen &&
         !max_in_flight.compare_exchange_weak(seen, in_flight, std::memory_order_relaxed)) {
  }
}

void StatsCounters::note_completion(uint64_t ns) {
  latency.add(ns);
  latency_ns.fetch_add(ns, std::memory_order_relaxed);
}

RecordReaderStats StatsCounters::snapshot() const {
  auto get = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  RecordReaderStats s;
  s.batches = get(batches);
  s.reads = get(reads);
  s.requests = get(requests);
  s.bytes_read = get(bytes_read);
  s.bytes_useful = get(bytes_useful);
  s.eagain_retries = get(eagain_retries);
  s.short_read_retries = get(short_read_retries);
  s.checksum_failures = get(checksum_failures);
  s.io_errors = get(io_errors);
  s.alignment_fallbacks = get(alignment_fallbacks);
  s.submit_calls = get(submit_calls);
  s.max_in_flight = max_in_flight.load(std::memory_order_relaxed);
  s.busy_seconds = static_cast<double>(get(busy_ns)) * 1e-9;
  // Little's law: requests in flight on average = total request time / elapsed time.
  const uint64_t busy = get(busy_ns);
  s.mean_in_flight =
      busy > 0 ? static_cast<double>(get(latency_ns)) / static_cast<double>(busy) : 0;
  s.verify_seconds = static_cast<double>(get(verify_ns)) * 1e-9;
  s.latency_p50_us = latency.quantile_us(0.50);
  s.latency_p90_us = latency.quantile_us(0.90);
  s.latency_p99_us = latency.quantile_us(0.99);
  return s;
}

// ---- Core -----------------------------------------------------------------------------------

Core::Core(File file, bool direct, DirectAlignment alignment, const RecordReaderOptions& options)
    : file_(std::move(file)),
      direct_(direct),
      alignment_(direct ? alignment.bytes : 0),
      initial_source_(direct ? alignment.source : "buffered"),
      max_alignment_(direct ? std::max<uint64_t>(alignment.bytes, kDirectAlignment)
                            : kDirectAlignment),
      verify_(options.verify),
      file_ops_(options.file_ops) {
  TROVE_CHECK(!direct_ ||
              (is_power_of_two(alignment.bytes) && alignment.bytes <= kMaxDirectAlignment));
}

const char* Core::alignment_source() const {
  return fell_back_.load(std::memory_order_relaxed) ? "fallback" : initial_source_;
}

std::string Core::describe(const RecordRead& r) const {
  return str_printf("%s: expert %lld at offset %llu (%u bytes)", path().c_str(),
                    static_cast<long long>(r.id), ull(r.offset), r.bytes);
}

Status Core::check_request(const RecordRead& r) const {
  if (r.bytes == 0) return Status::invalid_argument(describe(r) + ": a record has no bytes");
  if (r.dest == nullptr) return Status::invalid_argument(describe(r) + ": dest is null");
  // The aligned extent's end must not wrap.
  if (r.offset > UINT64_MAX - r.bytes - 2 * kMaxDirectAlignment) {
    return Status::invalid_argument(describe(r) + ": the extent runs past 2^64");
  }
  return {};
}

uint64_t Core::extent_bytes(const RecordRead& r) const {
  if (!direct_) return r.bytes;
  return align_up(r.offset + r.bytes, max_alignment_) - align_down(r.offset, max_alignment_);
}

ExtentRead Core::extent_of(size_t index, const RecordRead& r) const {
  return cut_extent(index, r, direct_ ? alignment_.load(std::memory_order_relaxed) : 1);
}

ExtentRead Core::cut_extent(size_t index, const RecordRead& r, uint64_t align) {
  ExtentRead x;
  x.index = index;
  x.align = align;
  x.begin = align_down(r.offset, align);
  x.len = align_up(r.offset + r.bytes, align) - x.begin;
  x.needed = r.offset + r.bytes - x.begin;
  return x;
}

void Core::fall_back_to_page_alignment(ExtentRead& x, const RecordRead& r) {
  stats_.alignment_fallbacks.fetch_add(1, std::memory_order_relaxed);
  // Every read in flight at the smaller alignment may get here; the first one switches.
  uint32_t was = static_cast<uint32_t>(x.align);
  if (alignment_.compare_exchange_strong(was, static_cast<uint32_t>(kDirectAlignment),
                                         std::memory_order_relaxed)) {
    fell_back_.store(true, std::memory_order_relaxed);
    TROVE_LOG_DEBUG(
        "%s: an O_DIRECT read at %llu-byte alignment was refused (EINVAL); reading "
        "at %llu-byte alignment from now on",
        path().c_str(), ull(x.align), ull(kDirectAlignment));
  }
  x = cut_extent(x.index, r, kDirectAlignment);
}

Status Core::truncated(const RecordRead& r) const {
  struct stat st;
  if (::fstat(fd(), &st) == 0 && static_cast<uint64_t>(st.st_size) < r.offset + r.bytes) {
    return Status::corruption(describe(r) + str_printf(": truncated: the file ends at offset %llu",
                                                       ull(static_cast<uint64_t>(st.st_size))));
  }
  return Status::corruption(describe(r) + ": truncated: the read ended before the record did");
}

void Core::fail(Batch& batch, Status s) {
  std::lock_guard<std::mutex> lock(batch.mu);
  if (batch.first_error.ok()) batch.first_error = std::move(s);
  batch.failed.store(true, std::memory_order_relaxed);
}

uint64_t Core::request_bytes(const ExtentRead& x) {
  return std::min(x.len - x.done, kMaxRequestBytes);
}

Step Core::on_result(Batch& batch, ExtentRead& x, int64_t res) {
  const RecordRead& r = batch.reads[x.index];
  if (res == -EAGAIN || res == -EINTR) {
    stats_.eagain_retries.fetch_add(1, std::memory_order_relaxed);
    if (++x.again < kMaxAgainInARow) return Step::kReissue;
    stats_.io_errors.fetch_add(1, std::memory_order_relaxed);
    fail(batch, Status::from_errno(describe(r) + str_printf(": %d retries in a row", x.again),
                                   static_cast<int>(-res)));
    return Step::kFailed;
  }
  x.again = 0;
  // A kernel or device that wants more alignment than statx or the block size said: once per
  // extent, recut at the page size and read again from its start.
  if (res == -EINVAL && direct_ && x.align < kDirectAlignment) {
    fall_back_to_page_alignment(x, r);
    return Step::kReissue;
  }
  if (res < 0) {
    stats_.io_errors.fetch_add(1, std::memory_order_relaxed);
    fail(batch, Status::from_errno(describe(r), static_cast<int>(-res)));
    return Step::kFailed;
  }
  const uint64_t requested = request_bytes(x);
  TROVE_CHECK_MSG(static_cast<uint64_t>(res) <= requested,
                  "a read returned %lld bytes for a %llu-byte request", static_cast<long long>(res),
                  ull(requested));
  stats_.bytes_read.fetch_add(static_cast<uint64_t>(res), std::memory_order_relaxed);
  if (res == 0) {  // end of file before the record's end
    stats_.io_errors.fetch_add(1, std::memory_order_relaxed);
    fail(batch, truncated(r));
    return Step::kFailed;
  }
  uint64_t next = x.done + static_cast<uint64_t>(res);
  if (next >= x.needed) {
    x.done = next;
    return Step::kComplete;
  }
  if (static_cast<uint64_t>(res) == requested) {  // a full request of a huge extent: go on
    x.done = next;
    return Step::kReissue;
  }
  // A short read: ask again for the rest. O_DIRECT resumes only at a block boundary.
  stats_.short_read_retries.fetch_add(1, std::memory_order_relaxed);
  if (direct_) next = align_down(next, x.align);
  if (next > x.done) {
    x.done = next;
    x.stalled = 0;
    return Step::kReissue;
  }
  // Not one whole block arrived: the end of the file inside the record, or a device handing
  // out partial blocks. Which one the file size tells.
  struct stat st;
  if (::fstat(fd(), &st) == 0 && static_cast<uint64_t>(st.st_size) < r.offset + r.bytes) {
    stats_.io_errors.fetch_add(1, std::memory_order_relaxed);
    fail(batch, truncated(r));
    return Step::kFailed;
  }
  if (++x.stalled > kMaxStalledShortReads) {
    stats_.io_errors.fetch_add(1, std::memory_order_relaxed);
    fail(batch, Status::io_error(describe(r) + str_printf(": %d short reads in a row at offset "
                                                          "%llu brought no whole block",
                                                          x.stalled, ull(x.begin + x.done))));
    return Step::kFailed;
  }
  return Step::kReissue;
}

void Core::deliver(Batch& batch, const ExtentRead& x, const uint8_t* extent) {
  const RecordRead& r = batch.reads[x.index];
  const uint8_t* src = extent + (r.offset - x.begin);
  if (verify_) {
    const Clock::time_point t0 = Clock::now();
    const uint64_t computed = XXH3_64bits(src, r.bytes);  // = store_checksum
    stats_.verify_ns.fetch_add(elapsed_ns(t0), std::memory_order_relaxed);
    if (computed != r.xxh3) {
      stats_.checksum_failures.fetch_add(1, std::memory_order_relaxed);
      fail(batch,
           Status::corruption(describe(r) + str_printf(": checksum mismatch (expected 0x%016llx, "
                                                       "computed 0x%016llx)",
                                                       ull(r.xxh3), ull(computed))));
      return;
    }
  }
  std::memcpy(r.dest, src, r.bytes);
  stats_.reads.fetch_add(1, std::memory_order_relaxed);
  stats_.bytes_useful.fetch_add(r.bytes, std::memory_order_relaxed);
}

void Core::finish_batch(Batch& batch) {
  stats_.busy_ns.fetch_add(elapsed_ns(batch.started), std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(batch.mu);
  batch.done = true;
  // Notified under the lock: wait() cannot see `done` and destroy the batch before this
  // returns.
  batch.cv.notify_all();
}

// ---- the pread engine -----------------------------------------------------------------------

namespace {

// `threads` workers, parked between batches. Each batch wakes min(threads, reads) of them;
// each takes the next unread record (Batch::next), preads its extent into the worker's own
// bounce buffer until complete, delivers it and takes the next. The last worker to run out of
// records finishes the batch.
class PreadEngine final : public Engine {
 public:
  PreadEngine(Core& core, int threads) : core_(core), buffers_(static_cast<size_t>(threads)) {
    workers_.reserve(static_cast<size_t>(threads));
    for (int w = 0; w < threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }
  ~PreadEngine() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  const char* name() const override { return "pread"; }

  Status reserve(uint64_t extent_bytes) override {
    for (AlignedBuffer& b : buffers_) {
      if (b.size() < extent_bytes) {
        TROVE_ASSIGN_OR_RETURN(b, AlignedBuffer::allocate(extent_bytes, core_.max_alignment()));
      }
    }
    return {};
  }

  void begin(Batch* batch) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch_ = batch;
      active_ = static_cast<int>(std::min(workers_.size(), batch->reads.size()));
      left_.store(active_, std::memory_order_relaxed);
      ++generation_;
    }
    cv_.notify_all();
  }

 private:
  void worker_loop(int w) {
    pthread_setname_np(pthread_self(), "trove-pread");
    uint64_t seen = 0;
    for (;;) {
      Batch* batch = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (w >= active_) continue;
        batch = batch_;
      }
      run(*batch, buffers_[static_cast<size_t>(w)].data());
      if (left_.fetch_sub(1, std::memory_order_acq_rel) == 1) core_.finish_batch(*batch);
    }
  }

  void run(Batch& batch, uint8_t* buf) {
    FileOps* ops = core_.file_ops();
    StatsCounters& stats = core_.stats();
    while (!batch.failed.load(std::memory_order_relaxed)) {
      const size_t i = batch.next.fetch_add(1, std::memory_order_relaxed);
      if (i >= batch.reads.size()) return;
      ExtentRead x = core_.extent_of(i, batch.reads[i]);
      for (;;) {
        const uint32_t in_flight = in_flight_.fetch_add(1, std::memory_order_relaxed) + 1;
        stats.note_issue(in_flight);
        const Clock::time_point t0 = Clock::now();
        uint8_t* dst = buf + x.done;
        const size_t len = Core::request_bytes(x);
        const uint64_t offset = x.begin + x.done;
        const int64_t res = ops != nullptr ? ops->read_at(core_.fd(), dst, len, offset)
                                           : sys_pread(core_.fd(), dst, len, offset);
        stats.note_completion(elapsed_ns(t0));
        in_flight_.fetch_sub(1, std::memory_order_relaxed);
        const Step step = core_.on_result(batch, x, res);
        if (step == Step::kComplete) core_.deliver(batch, x, buf);
        if (step != Step::kReissue || batch.failed.load(std::memory_order_relaxed)) break;
      }
    }
  }

  Core& core_;
  std::vector<AlignedBuffer> buffers_;  // one per worker; grown by reserve between batches
  std::vector<std::thread> workers_;
  std::atomic<uint32_t> in_flight_{0};
  std::atomic<int> left_{0};  // workers of the current batch still running
  std::mutex mu_;             // guards the fields below
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t generation_ = 0;  // bumped per batch
  Batch* batch_ = nullptr;
  int active_ = 0;  // workers [0, active_) take part in the current batch
};

}  // namespace

std::unique_ptr<Engine> make_pread_engine(Core& core, const RecordReaderOptions& options) {
  return std::make_unique<PreadEngine>(core, options.pread_threads);
}

}  // namespace record_io

// ---- RecordReader ---------------------------------------------------------------------------

using record_io::Batch;
using record_io::Core;
using record_io::Engine;

struct RecordReader::Impl {
  // Destroyed in reverse: the batch (none in flight by then), the engine (joins its threads,
  // closes its ring), then the core (closes the file).
  std::unique_ptr<Core> core;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Batch> batch;  // the batch in flight, from start() until wait()
};

RecordReader::RecordReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

RecordReader::~RecordReader() {
  (void)wait();
}

Result<std::unique_ptr<RecordReader>> RecordReader::open(const std::string& path,
                                                         RecordReaderOptions options) {
  using Choice = RecordReaderOptions::Engine;
  if (options.queue_depth < 1 || options.queue_depth > 32768) {
    return Status::invalid_argument(str_printf("%s: queue_depth = %d is outside [1, 32768]",
                                               path.c_str(), options.queue_depth));
  }
  if (options.submit_batch < 1 || options.submit_batch > options.queue_depth) {
    return Status::invalid_argument(str_printf("%s: submit_batch = %d is outside [1, %d]",
                                               path.c_str(), options.submit_batch,
                                               options.queue_depth));
  }
  if (options.pread_threads < 1 || options.pread_threads > 1024) {
    return Status::invalid_argument(str_printf("%s: pread_threads = %d is outside [1, 1024]",
                                               path.c_str(), options.pread_threads));
  }
  if (options.direct_alignment != 0 &&
      record_io::usable_alignment(options.direct_alignment) != options.direct_alignment) {
    return Status::invalid_argument(
        str_printf("%s: direct_alignment = %u is not a power of two in [512, %u]", path.c_str(),
                   options.direct_alignment, record_io::kMaxDirectAlignment));
  }
  bool direct = options.direct_io;
  Result<File> file = File::open_read(path, direct);
  if (!file.ok() && direct && file.status().code() == Status::Code::kNotSupported) {
    TROVE_LOG_DEBUG("%s: O_DIRECT refused by the filesystem; records are read buffered",
                    path.c_str());
    direct = false;
    file = File::open_read(path, false);
  }
  if (!file.ok()) return file.status();

  record_io::DirectAlignment alignment;
  if (direct) {
    alignment = options.direct_alignment != 0
                    ? record_io::DirectAlignment{options.direct_alignment, "option"}
                    : record_io::detect_direct_alignment(file->fd());
  }
  auto impl = std::make_unique<Impl>();
  impl->core = std::make_unique<Core>(std::move(file).value(), direct, alignment, options);
  static std::once_flag logged;
  if (options.engine != Choice::kPread) {
    Result<std::unique_ptr<record_io::Engine>> uring =
        record_io::make_uring_engine(*impl->core, options);
    if (uring.ok()) {
      impl->engine = std::move(uring).value();
      std::call_once(logged, [&] {
        TROVE_LOG_INFO("record reads use io_uring (queue depth %d%s)", options.queue_depth,
                       direct ? str_printf(", O_DIRECT at %u-byte alignment from %s",
                                           impl->core->alignment(), alignment.source)
                                    .c_str()
                              : "");
      });
    } else if (options.engine == Choice::kIoUring ||
               uring.status().code() != Status::Code::kNotSupported) {
      return uring.status();
    } else {
      std::call_once(logged, [&] {
        TROVE_LOG_INFO("record reads use a pool of %d pread threads: %s", options.pread_threads,
                       uring.status().message().c_str());
      });
    }
  }
  if (impl->engine == nullptr) impl->engine = record_io::make_pread_engine(*impl->core, options);
  TROVE_RETURN_IF_ERROR(impl->engine->reserve(record_io::kInitialExtentBytes));
  return std::unique_ptr<RecordReader>(new RecordReader(std::move(impl)));
}

Status RecordReader::start(std::span<const RecordRead> reads) {
  Impl& r = *impl_;
  TROVE_CHECK_MSG(r.batch == nullptr, "RecordReader::start while a batch is in flight (%s)",
                  r.core->path().c_str());
  if (reads.empty()) return {};
  uint64_t max_extent = 0;
  for (const RecordRead& read : reads) {
    TROVE_RETURN_IF_ERROR(r.core->check_request(read));
    max_extent = std::max(max_extent, r.core->extent_bytes(read));
  }
  TROVE_RETURN_IF_ERROR(r.engine->reserve(max_extent));
  auto batch = std::make_unique<Batch>();
  batch->reads = reads;
  batch->max_extent = max_extent;
  batch->started = record_io::Clock::now();
  r.core->stats().batches.fetch_add(1, std::memory_order_relaxed);
  r.batch = std::move(batch);
  r.engine->begin(r.batch.get());
  return {};
}

Status RecordReader::wait() {
  Impl& r = *impl_;
  if (r.batch == nullptr) return {};
  Status result;
  {
    std::unique_lock<std::mutex> lock(r.batch->mu);
    r.batch->cv.wait(lock, [&] { return r.batch->done; });
    result = std::move(r.batch->first_error);
  }
  r.batch.reset();
  return result;
}

Status RecordReader::read(std::span<const RecordRead> reads) {
  TROVE_RETURN_IF_ERROR(start(reads));
  return wait();
}

const std::string& RecordReader::path() const {
  return impl_->core->path();
}
const char* RecordReader::engine_name() const {
  return impl_->engine->name();
}
bool RecordReader::direct_io() const {
  return impl_->core->direct();
}
uint32_t RecordReader::direct_alignment() const {
  return impl_->core->alignment();
}
const char* RecordReader::direct_alignment_source() const {
  return impl_->core->alignment_source();
}
RecordReaderStats RecordReader::stats() const {
  return impl_->core->stats().snapshot();
}

}  // namespace trove
