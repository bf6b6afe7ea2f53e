// RecordReader's io_uring engine (liburing; examples/io_uring-cp.c is the model): a fixed
// queue depth, the bounce slot's index in user_data, negative errno in cqe->res, requeue on
// EAGAIN and short reads.
//
// One I/O thread owns the ring. Per batch:
//
//   I/O thread:  fill: take a free slot per unread record, prep READ_FIXED of its aligned
//                extent into the slot (user_data = slot)            ─┐
//                submit_and_wait(1)  ──────────── one syscall ───────┤ until every record is
//                reap every CQE: on_result → deliver (XXH3, memcpy   │ delivered, or the batch
//                to dest) and free the slot, or reissue the rest    ─┘ failed and drained
//   kernel:      ≤ slots reads in flight, refilled as soon as their completions are reaped
//
// Bounce memory: `slots` fixed-size slots in one 4096-aligned allocation, registered with
// io_uring_register_buffers (buffer index 0) so reads skip per-request page pinning. Where
// registration is refused (RLIMIT_MEMLOCK) reads use the same memory unregistered.
#include <liburing.h>
#include <pthread.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "base/log.h"
#include "base/strings.h"
#include "storage/record_io_internal.h"

namespace trove::record_io {

namespace {

class UringEngine final : public Engine {
 public:
  UringEngine(Core& core, int queue_depth, uint64_t max_bounce_bytes)
      : core_(core), queue_depth_(queue_depth), max_bounce_bytes_(max_bounce_bytes) {}

  // Sets up the ring (entries = queue_depth) and starts the I/O thread.
  Status init() {
    int rc = 0;
    if (FileOps* ops = core_.file_ops()) rc = ops->io_uring_setup_fault();
    if (rc == 0) rc = io_uring_queue_init(static_cast<unsigned>(queue_depth_), &ring_, 0);
    if (rc < 0) {
      return Status::not_supported(
          str_printf("%s: io_uring is unavailable (io_uring_queue_init: %s; disabled by the "
                     "kernel, seccomp or /proc/sys/kernel/io_uring_disabled?); use the pread "
                     "engine",
                     core_.path().c_str(), std::strerror(-rc)));
    }
    ring_open_ = true;
    thread_ = std::thread([this] { thread_loop(); });
    return {};
  }

  ~UringEngine() override {
    if (thread_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
      }
      cv_.notify_all();
      thread_.join();
    }
    // Exiting the ring cancels and waits out anything the kernel still holds (only after a
    // failed submit), so the bounce memory is freed after it.
    if (ring_open_) io_uring_queue_exit(&ring_);
  }

  const char* name() const override { return "io_uring"; }

  Status reserve(uint64_t extent_bytes) override {
    // A broken ring may still write into the bounce memory: keep it until queue_exit.
    if (!broken_.ok()) return broken_;
    if (extent_bytes <= slot_bytes_) return {};
    const uint64_t slot_bytes = align_up(extent_bytes, core_.max_alignment());
    const uint64_t slots = std::clamp<uint64_t>(max_bounce_bytes_ / slot_bytes, 1,
                                                static_cast<uint64_t>(queue_depth_));
    if (registered_) {
      io_uring_unregister_buffers(&ring_);
      registered_ = false;
    }
    bounce_ = AlignedBuffer();
    slot_bytes_ = 0;
    TROVE_ASSIGN_OR_RETURN(bounce_,
                           AlignedBuffer::allocate(slots * slot_bytes, core_.max_alignment()));
    slot_bytes_ = slot_bytes;
    slots_.assign(slots, Slot{});
    iovec iov{bounce_.data(), bounce_.size()};
    const int rc = io_uring_register_buffers(&ring_, &iov, 1);
    registered_ = rc == 0;
    if (rc < 0) {
      static std::once_flag logged;
      std::call_once(logged, [&] {
        TROVE_LOG_DEBUG(
            "%s: io_uring_register_buffers of %llu bytes failed (%s); reading into "
            "unregistered bounce buffers",
            core_.path().c_str(), static_cast<unsigned long long>(bounce_.size()),
            std::strerror(-rc));
      });
    }
    return {};
  }

  void begin(Batch* batch) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch_ = batch;
    }
    cv_.notify_all();
  }

 private:
  struct Slot {
    ExtentRead x;
    Clock::time_point issued;
  };

  uint8_t* slot_data(size_t s) const { return bounce_.data() + s * slot_bytes_; }

  void thread_loop() {
    pthread_setname_np(pthread_self(), "trove-uring");
    for (;;) {
      Batch* batch = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || batch_ != nullptr; });
        if (batch_ == nullptr) return;  // stop_ with nothing to do
        batch = std::exchange(batch_, nullptr);
      }
      run(*batch);
      core_.finish_batch(*batch);
    }
  }

  // Queues a read of the rest of slot s's extent. Never fails: at most one SQE per slot is
  // outstanding and the ring has at least as many entries as there are slots.
  void issue(size_t s) {
    Slot& slot = slots_[s];
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    TROVE_CHECK_MSG(sqe != nullptr, "io_uring submission queue full with %u reads in flight",
                    in_flight_);
    uint8_t* buf = slot_data(s) + slot.x.done;
    const auto len = static_cast<unsigned>(Core::request_bytes(slot.x));
    const uint64_t offset = slot.x.begin + slot.x.done;
    if (registered_) {
      io_uring_prep_read_fixed(sqe, core_.fd(), buf, len, offset, 0);
    } else {
      io_uring_prep_read(sqe, core_.fd(), buf, len, offset);
    }
    io_uring_sqe_set_data64(sqe, s);
    slot.issued = Clock::now();
    ++in_flight_;
    core_.stats().note_issue(in_flight_);
  }

  void run(Batch& batch) {
    if (!broken_.ok()) {
      core_.fail(batch, broken_);
      return;
    }
    StatsCounters& stats = core_.stats();
    FileOps* ops = core_.file_ops();
    std::vector<size_t> free_slots(slots_.size());
    for (size_t s = 0; s < free_slots.size(); ++s) free_slots[s] = free_slots.size() - 1 - s;
    size_t next = 0;
    for (;;) {
      while (!batch.failed.load(std::memory_order_relaxed) && next < batch.reads.size() &&
             !free_slots.empty()) {
        const size_t s = free_slots.back();
        free_slots.pop_back();
        slots_[s].x = core_.extent_of(next, batch.reads[next]);
        ++next;
        issue(s);
      }
      if (in_flight_ == 0) return;

      const int rc = io_uring_submit_and_wait(&ring_, 1);
      stats.submit_calls.fetch_add(1, std::memory_order_relaxed);
      if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
        // The ring itself failed; what it holds is unknowable. Reads are not retried on it:
        // this and every later batch fail, and the destructor's queue_exit reclaims it.
        broken_ =
            Status::io_error(str_printf("%s: io_uring_submit failed: %s; the reader is "
                                        "unusable",
                                        core_.path().c_str(), std::strerror(-rc)));
        core_.fail(batch, broken_);
        return;
      }

      unsigned head = 0;
      unsigned reaped = 0;
      io_uring_cqe* cqe = nullptr;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        ++reaped;
        const auto s = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
        Slot& slot = slots_[s];
        stats.note_completion(elapsed_ns(slot.issued));
        --in_flight_;
        int res = cqe->res;
        if (ops != nullptr) {
          res = ops->on_complete(slot.x.begin + slot.x.done, slot_data(s) + slot.x.done,
                                 Core::request_bytes(slot.x), res);
        }
        const Step step = core_.on_result(batch, slot.x, res);
        if (step == Step::kComplete) core_.deliver(batch, slot.x, slot_data(s));
        if (step == Step::kReissue && !batch.failed.load(std::memory_order_relaxed)) {
          issue(s);
        } else {
          free_slots.push_back(s);
        }
      }
      io_uring_cq_advance(&ring_, reaped);
    }
  }

  Core& core_;
  const int queue_depth_;
  const uint64_t max_bounce_bytes_;
  io_uring ring_{};
  bool ring_open_ = false;
  // Owned by the caller's thread between batches (reserve) and by the I/O thread during one.
  AlignedBuffer bounce_;
  uint64_t slot_bytes_ = 0;
  bool registered_ = false;
  std::vector<Slot> slots_;
  // I/O thread only, except broken_, which reserve reads between batches.
  unsigned in_flight_ = 0;
  Status broken_;
  std::thread thread_;
  std::mutex mu_;  // guards the fields below
  std::condition_variable cv_;
  bool stop_ = false;
  Batch* batch_ = nullptr;  // handed over by begin, taken by the I/O thread
};

}  // namespace

Result<std::unique_ptr<Engine>> make_uring_engine(Core& core, const RecordReaderOptions& options) {
  auto engine = std::make_unique<UringEngine>(core, options.queue_depth, options.max_bounce_bytes);
  TROVE_RETURN_IF_ERROR(engine->init());
  return std::unique_ptr<Engine>(std::move(engine));
}

}  // namespace trove::record_io
