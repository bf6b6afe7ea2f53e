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
//
// CrashingStoreUpdateOps (below) does the same for the writes of StoreUpdate and
// recover_store: a crash at the N-th call, then the loss of what was not synced.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "storage/record_io.h"
#include "storage/store_update.h"

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

// CrashingStoreUpdateOps: a StoreUpdateOps that "kills the process" before its N-th call
// (that call and every later one fail with EIO and do nothing), then, like LevelDB's
// FaultInjectionTestEnv, drops what no fsync made durable, as a power loss would:
//
//   - a write or truncate of a file not followed by an fsync of that file;
//   - the creation or removal of a name not followed by an fsync of its folder (a created file
//     vanishes, data and all; a removed one comes back with the bytes it had).
//
//   auto ops = std::make_shared<CrashingStoreUpdateOps>();
//   ops->crash_at(k);
//   { auto u = StoreUpdate::begin(path, {ops}); ... u->commit(); }   // fails at call k
//   ops->lose_unsynced(CrashingStoreUpdateOps::Loss::kAll);           // the power goes
//
// sync and sync_dir are recorded, not run: what they make durable is what lose_unsynced keeps
// (and crash sweeps of hundreds of updates stay fast). Single-threaded, like the updates it
// serves.
class CrashingStoreUpdateOps : public StoreUpdateOps {
 public:
  enum class Loss {
    kNone,    // everything written reached the disk
    kAll,     // nothing unsynced did
    kRandom,  // each unsynced change independently, with probability 1/2
  };

  // Call n (from 1) and all later ones fail with -EIO. 0: never.
  void crash_at(uint64_t n) { crash_at_ = n; }
  uint64_t calls() const { return calls_; }
  bool crashed() const { return crash_at_ > 0 && calls_ >= crash_at_; }
  // One line per call, crashed ones included: "open P", "write P", "truncate P", "sync P",
  // "unlink P", "sync_dir D".
  const std::vector<std::string>& trace() const { return trace_; }

  // Undoes, newest first, the changes no later sync made durable (all, none or a seeded random
  // choice of them), straight on the file system. Call after the crash, with the descriptors
  // of the update closed.
  void lose_unsynced(Loss loss, uint64_t seed = 0) {
    std::mt19937_64 rng(seed);
    for (auto it = undo_.rbegin(); it != undo_.rend(); ++it) {
      if (it->synced || loss == Loss::kNone) continue;
      if (loss == Loss::kRandom && (rng() & 1) == 0) continue;
      revert(*it);
    }
    undo_.clear();
  }

  int open(const std::string& path, int flags, mode_t mode) override {
    if (dead("open " + path)) return -EIO;
    const bool existed = ::access(path.c_str(), F_OK) == 0;
    const int fd = StoreUpdateOps::open(path, flags, mode);
    if (fd >= 0) {
      paths_[fd] = path;
      if (!existed && (flags & O_CREAT) != 0) undo_.push_back({Kind::kCreate, path});
    }
    return fd;
  }
  int64_t write_at(int fd, const uint8_t* buf, size_t len, uint64_t offset) override {
    const std::string& path = paths_[fd];
    if (dead("write " + path)) return -EIO;
    Undo u{Kind::kWrite, path};
    u.offset = offset;
    u.size = size_of(fd);
    u.length = len;
    if (offset < u.size) u.bytes = read_range(fd, offset, std::min<uint64_t>(len, u.size - offset));
    const int64_t n = StoreUpdateOps::write_at(fd, buf, len, offset);
    if (n > 0) {
      u.length = static_cast<uint64_t>(n);
      u.bytes.resize(std::min<uint64_t>(u.bytes.size(), u.length));
      undo_.push_back(std::move(u));
    }
    return n;
  }
  int truncate(int fd, uint64_t size) override {
    const std::string& path = paths_[fd];
    if (dead("truncate " + path)) return -EIO;
    Undo u{Kind::kTruncate, path};
    u.size = size_of(fd);
    u.offset = size;
    if (size < u.size) u.bytes = read_range(fd, size, u.size - size);
    const int rc = StoreUpdateOps::truncate(fd, size);
    if (rc == 0) undo_.push_back(std::move(u));
    return rc;
  }
  int sync(int fd) override {
    const std::string& path = paths_[fd];
    if (dead("sync " + path)) return -EIO;
    for (Undo& u : undo_) {
      if (u.path == path && (u.kind == Kind::kWrite || u.kind == Kind::kTruncate)) {
        u.synced = true;
      }
    }
    return 0;
  }
  int unlink(const std::string& path) override {
    if (dead("unlink " + path)) return -EIO;
    Undo u{Kind::kUnlink, path};
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      u.bytes = read_range(fd, 0, size_of(fd));
      ::close(fd);
    }
    const int rc = StoreUpdateOps::unlink(path);
    if (rc == 0) undo_.push_back(std::move(u));
    return rc;
  }
  int sync_dir(const std::string& dir) override {
    if (dead("sync_dir " + dir)) return -EIO;
    for (Undo& u : undo_) {
      if ((u.kind == Kind::kCreate || u.kind == Kind::kUnlink) && parent_of(u.path) == dir) {
        u.synced = true;
      }
    }
    return 0;
  }

 private:
  enum class Kind { kWrite, kTruncate, kCreate, kUnlink };
  struct Undo {
    Kind kind;
    std::string path;
    uint64_t offset = 0;         // kWrite: where; kTruncate: the new size
    uint64_t length = 0;         // kWrite: bytes written
    uint64_t size = 0;           // kWrite, kTruncate: the file's size before
    std::vector<uint8_t> bytes;  // what was there before (kUnlink: the whole file)
    bool synced = false;
  };

  bool dead(std::string what) {
    ++calls_;
    trace_.push_back(std::move(what));
    return crashed();
  }

  static std::string parent_of(const std::string& path) {
    const size_t slash = path.rfind('/');
    if (slash == std::string::npos) return ".";
    return slash == 0 ? "/" : path.substr(0, slash);
  }
  static uint64_t size_of(int fd) {
    struct stat st;
    return ::fstat(fd, &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  }
  static std::vector<uint8_t> read_range(int fd, uint64_t offset, uint64_t len) {
    std::vector<uint8_t> out(len);
    uint64_t done = 0;
    while (done < len) {
      const ssize_t n =
          ::pread(fd, out.data() + done, len - done, static_cast<off_t>(offset + done));
      if (n <= 0) break;
      done += static_cast<uint64_t>(n);
    }
    out.resize(done);
    return out;
  }
  static void write_range(int fd, uint64_t offset, const std::vector<uint8_t>& bytes) {
    uint64_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n =
          ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
      if (n <= 0) break;
      done += static_cast<uint64_t>(n);
    }
  }

  static void set_size(int fd, uint64_t size) {
    [[maybe_unused]] const int rc = ::ftruncate(fd, static_cast<off_t>(size));
  }

  static void revert(const Undo& u) {
    if (u.kind == Kind::kCreate) {
      ::unlink(u.path.c_str());
      return;
    }
    if (u.kind == Kind::kUnlink) {
      const int fd = ::open(u.path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
      if (fd >= 0) {
        write_range(fd, 0, u.bytes);
        ::close(fd);
      }
      return;
    }
    const int fd = ::open(u.path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return;  // the file itself is gone (its creation was lost)
    const uint64_t now = size_of(fd);
    if (u.kind == Kind::kWrite) {
      // Bytes a later surviving truncate cut off stay cut.
      const uint64_t end = std::min(u.offset + u.length, now);
      if (u.offset < end) {
        write_range(fd, u.offset,
                    {u.bytes.begin(), u.bytes.begin() + static_cast<ptrdiff_t>(std::min(
                                                            u.bytes.size(), end - u.offset))});
      }
      if (end > u.size) {
        // The write extended the file: the extension is lost. At the end of the file it goes;
        // under a later write that survived, it reads as the zeros of a hole.
        const uint64_t from = std::max(u.offset, u.size);
        if (now == u.offset + u.length) {
          set_size(fd, u.size);
        } else {
          write_range(fd, from, std::vector<uint8_t>(end - from, 0));
        }
      }
    } else if (u.offset < u.size) {  // a truncate that shrank the file: the cut bytes come back
      write_range(fd, u.offset, u.bytes);
    } else if (now == u.offset) {  // one that grew it
      set_size(fd, u.size);
    }
    ::close(fd);
  }

  uint64_t crash_at_ = 0;
  uint64_t calls_ = 0;
  std::vector<std::string> trace_;
  std::map<int, std::string> paths_;  // descriptors opened through open()
  std::vector<Undo> undo_;
};

}  // namespace trove
