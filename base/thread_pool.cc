#include "base/thread_pool.h"

#include <algorithm>
#include <system_error>

namespace trove {

namespace {

// True on a thread while it runs a chunk: a nested parallel_for then runs inline.
thread_local bool t_in_chunk = false;

// Chunk c of m over [0, n): balanced, and a function of (n, m, c) only.
int64_t chunk_begin(int64_t n, int64_t m, int64_t c) {
  return c * n / m;
}

}  // namespace

int resolve_thread_count(int threads) {
  if (threads > 0) return threads;
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& w : workers_) w.join();
}

ThreadPool& ThreadPool::shared() {
  static ThreadPool pool;
  return pool;
}

void ThreadPool::ensure_workers(int count) {
  while (static_cast<int>(workers_.size()) < count) {
    try {
      workers_.emplace_back([this] { worker_loop(); });
    } catch (const std::system_error&) {
      return;  // fewer workers: the caller and the others run the remaining chunks
    }
  }
}

void ThreadPool::run_chunks(std::unique_lock<std::mutex>& lock) {
  while (next_chunk_ < chunks_) {
    const int64_t c = next_chunk_++;
    const int64_t n = n_, m = chunks_;
    const std::function<void(int64_t, int64_t)>* fn = fn_;
    lock.unlock();
    t_in_chunk = true;
    (*fn)(chunk_begin(n, m, c), chunk_begin(n, m, c + 1));
    t_in_chunk = false;
    lock.lock();
    if (++done_chunks_ == chunks_) done_cv_.notify_all();
  }
}

void ThreadPool::worker_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  uint64_t seen = generation_;
  for (;;) {
    work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    run_chunks(lock);
  }
}

void ThreadPool::parallel_for(int64_t n, int threads,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t m = std::min<int64_t>(n, resolve_thread_count(threads));
  if (m == 1 || t_in_chunk) {
    // Same chunks, run in order on this thread.
    for (int64_t c = 0; c < m; ++c) fn(chunk_begin(n, m, c), chunk_begin(n, m, c + 1));
    return;
  }
  std::lock_guard<std::mutex> caller(caller_mutex_);
  std::unique_lock<std::mutex> lock(mutex_);
  ensure_workers(static_cast<int>(m - 1));
  fn_ = &fn;
  n_ = n;
  chunks_ = m;
  next_chunk_ = 0;
  done_chunks_ = 0;
  ++generation_;
  work_cv_.notify_all();
  run_chunks(lock);
  done_cv_.wait(lock, [&] { return done_chunks_ == chunks_; });
  fn_ = nullptr;
}

void parallel_for(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn) {
  ThreadPool::shared().parallel_for(n, threads, fn);
}

}  // namespace trove
