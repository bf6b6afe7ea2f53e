// A small persistent pool of worker threads for data-parallel loops whose results must not
// depend on the thread count or on scheduling.
//
// parallel_for splits [0, n) into a fixed set of contiguous chunks that depends only on n and
// the requested thread count, never on which worker runs which chunk or when. A kernel that
// writes each output element from exactly one chunk, in a fixed order inside the chunk, is
// therefore deterministic; a kernel that also makes each element's arithmetic independent of
// where chunk boundaries fall is bit-identical for any thread count.
//
// Workers are started on first use and reused; the calling thread runs chunks too. A
// parallel_for issued from inside a chunk (nested) runs its chunks inline on that thread, and
// concurrent callers from different threads take turns, so neither can deadlock.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace trove {

// The thread count `threads` stands for: itself when > 0, else the hardware concurrency
// (at least 1).
int resolve_thread_count(int threads);

class ThreadPool {
 public:
  ThreadPool() = default;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Calls fn(begin, end) for chunk c = [c * n / m, (c + 1) * n / m) of m = min(n, threads)
  // chunks (threads 0: hardware concurrency), and returns when all have run. Chunks run on
  // the caller and on up to m - 1 workers; a worker that cannot be started (std::system_error)
  // leaves its chunks to the others: slower, same result.
  // REQUIRES: fn does not throw.
  void parallel_for(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn);

  // The process-wide pool the kernels share.
  static ThreadPool& shared();

 private:
  void ensure_workers(int count);  // REQUIRES: mutex_ held
  void worker_loop();
  // Runs chunks of the current job until none is left; mutex_ held on entry and exit.
  void run_chunks(std::unique_lock<std::mutex>& lock);

  std::mutex caller_mutex_;  // one job at a time
  std::mutex mutex_;         // guards everything below
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t chunks_ = 0;
  int64_t next_chunk_ = 0;
  int64_t done_chunks_ = 0;
};

// ThreadPool::shared().parallel_for(n, threads, fn).
void parallel_for(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace trove
