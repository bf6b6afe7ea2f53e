// FaultyFileOps: a FileOps (storage/record_io.h) that makes reads fail the ways disks do, for
// tests of RecordReader and of the tiers above it. LevelDB's db/fault_injection_test.cc is the
// model: the real syscalls run, then their results are damaged.
//
// Every read is numbered from 1 in the order it reaches the object: a pread call (pread
// engine) or an io_uring completion (io_uring engine), retries included. Faults combine; each
// is applied in the order listed in inject(). Thread-safe.
//
//   auto faults = std::make_shared<FaultyFileOps>();
//   faults->fail_offset(record_offset);          // EIO for any read covering that byte
//   options.file_ops = faults;
#pragma once

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "storage/record_io.h"

namespace trove {

class FaultyFileOps : public FileOps {
 public:
  // Read number `n` (from 1) fails with -err.
  void fail_nth_read(uint64_t n, int err = EIO) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_nth_.push_back({n, err});
  }
  // Every read whose range [offset, offset + len) covers file byte `offset` fails with -err
  // (a bad sector: retrying does not help).
  void fail_offset(uint64_t offset, int err = EIO) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_offsets_.push_back({offset, err});
  }
  // Every k-th read fails with -EAGAIN (the reader must reissue it).
  void eagain_every(uint64_t k) {
    std::lock_guard<std::mutex> lock(mu_);
    eagain_every_ = k;
  }
  // Every k-th read returns half of what it read (rounded down; a 1-byte read stays whole).
  // The next read at the offset of a shortened read is left whole, so a reader that retries
  // always gets on, unless `retries_too`: then retries are counted like any read (with k = 1,
  // a device that keeps returning partial blocks).
  void short_read_every(uint64_t k, bool retries_too = false) {
    std::lock_guard<std::mutex> lock(mu_);
    short_every_ = k;
    short_retries_too_ = retries_too;
  }
  // Every read that returns file byte `offset` returns it with its bits inverted.
  void flip_byte(uint64_t offset) {
    std::lock_guard<std::mutex> lock(mu_);
    flips_.push_back(offset);
  }
  // Every read whose offset, length or buffer address is not a multiple of `align` fails with
  // -EINVAL, as O_DIRECT does on a device whose logical blocks are `align` bytes.
  void refuse_unaligned(uint64_t align) {
    std::lock_guard<std::mutex> lock(mu_);
    refuse_unaligned_ = align;
  }
  // Each read takes `delay` longer (outside the lock: concurrent reads overlap).
  void delay_each_read(std::chrono::microseconds delay) {
    std::lock_guard<std::mutex> lock(mu_);
    delay_ = delay;
  }

  uint64_t reads_seen() const {
    std::lock_guard<std::mutex> lock(mu_);
    return reads_;
  }
  uint64_t faults_injected() const {
    std::lock_guard<std::mutex> lock(mu_);
    return injected_;
  }

  int64_t read_at(int fd, uint8_t* buf, size_t len, uint64_t offset) override {
    return inject(offset, buf, len, FileOps::read_at(fd, buf, len, offset));
  }
  int on_complete(uint64_t offset, uint8_t* buf, size_t len, int res) override {
    return static_cast<int>(inject(offset, buf, len, res));
  }

  // Applies the faults to the result `res` of read number reads_seen() + 1, of up to `len`
  // bytes at `offset` into `buf`: delay, then the first matching of refuse_unaligned,
  // fail_nth_read, fail_offset, eagain_every; else short_read_every, then flip_byte.
  int64_t inject(uint64_t offset, uint8_t* buf, size_t len, int64_t res) {
    std::chrono::microseconds delay{0};
    {
      std::lock_guard<std::mutex> lock(mu_);
      delay = delay_;
      const uint64_t n = ++reads_;
      res = apply(n, offset, buf, len, res);
    }
    if (delay.count() > 0) std::this_thread::sleep_for(delay);
    return res;
  }

 private:
  struct Fail {
    uint64_t key;  // read number or file offset
    int err;
  };

  // REQUIRES: mu_ held.
  int64_t apply(uint64_t n, uint64_t offset, uint8_t* buf, size_t len, int64_t res) {
    if (refuse_unaligned_ > 0 && (offset % refuse_unaligned_ != 0 || len % refuse_unaligned_ != 0 ||
                                  reinterpret_cast<uintptr_t>(buf) % refuse_unaligned_ != 0)) {
      return injected(-EINVAL);
    }
    for (const Fail& f : fail_nth_) {
      if (f.key == n) return injected(-f.err);
    }
    for (const Fail& f : fail_offsets_) {
      if (f.key >= offset && f.key - offset < len) return injected(-f.err);
    }
    if (eagain_every_ > 0 && n % eagain_every_ == 0) return injected(-EAGAIN);
    if (res <= 0) return res;
    const bool retry_of_shortened = shortened_.erase(offset) > 0;
    if (short_every_ > 0 && n % short_every_ == 0 && res > 1 &&
        (short_retries_too_ || !retry_of_shortened)) {
      if (!short_retries_too_) shortened_.insert(offset);
      res = injected(res / 2);
    }
    for (uint64_t at : flips_) {
      if (at >= offset && at - offset < static_cast<uint64_t>(res)) {
        buf[at - offset] ^= 0xff;
        ++injected_;
      }
    }
    return res;
  }

  int64_t injected(int64_t res) {
    ++injected_;
    return res;
  }

  mutable std::mutex mu_;
  uint64_t reads_ = 0;
  uint64_t injected_ = 0;
  std::vector<Fail> fail_nth_;
  std::vector<Fail> fail_offsets_;
  std::vector<uint64_t> flips_;
  uint64_t eagain_every_ = 0;
  uint64_t short_every_ = 0;
  uint64_t refuse_unaligned_ = 0;
  bool short_retries_too_ = false;
  std::set<uint64_t> shortened_;  // offsets of shortened reads whose retry is left whole
  std::chrono::microseconds delay_{0};
};

}  // namespace trove
