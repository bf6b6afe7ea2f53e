// The locks that keep writers and readers of one .trove store apart (storage/FORMAT.md,
// "Readers and writers"):
//
//   writer lock   flock(LOCK_EX) on the store file: one writer at a time. StoreUpdate takes it
//                 for one commit, or uses a StoreLock its caller holds for a whole run (the
//                 trainer); a second writer is refused at once ("busy").
//   reader pin    an open file description (OFD) lock, shared, on one byte far past the end of
//                 any store (kStoreGenerationLockByte): a StoreReader holds it from open until
//                 it is destroyed, so the generation it validated cannot change under it.
//   turnstile     an OFD lock on the byte after it: a commit holds it exclusive while it waits
//                 for the pinned readers to close, so that new readers queue behind the commit
//                 instead of starving it.
//
//   reader open:   turnstile SH ─▶ generation SH ─▶ turnstile unlock ··· (reads) ··· close
//   commit apply:  turnstile EX ─▶ generation EX (waits for readers) ─▶ write, fsync,
//                  remove the journal ─▶ unlock both
//
// The byte-range locks and flock are independent on a local file system (Linux), and the
// locks sit past any file's end, so no data byte is covered. Readers of older trove builds take
// no pin; see FORMAT.md.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>

#include "base/status.h"

namespace trove {

inline constexpr uint64_t kStoreGenerationLockByte = (uint64_t{1} << 62);
inline constexpr uint64_t kStoreTurnstileLockByte = kStoreGenerationLockByte + 1;

// The writer lock of one store, held for as long as the object lives. Move-only.
class StoreLock {
 public:
  StoreLock() = default;
  ~StoreLock();
  StoreLock(StoreLock&& other) noexcept;
  StoreLock& operator=(StoreLock&& other) noexcept;
  StoreLock(const StoreLock&) = delete;
  StoreLock& operator=(const StoreLock&) = delete;

  // Opens the store at `path` read-write and takes its writer lock without waiting. Another
  // writer holding it (an update, a training run, a recovery) is Status::aborted, "busy".
  static Result<StoreLock> acquire(const std::string& path);
  // Takes the writer lock of the file open at `fd` (the lock owns `fd` from here, also on
  // error). For a file no one else can see yet, such as a store before its rename.
  static Result<StoreLock> adopt(int fd, const std::string& path);

  bool held() const { return fd_ >= 0; }
  const std::string& path() const { return path_; }
  // The read-write descriptor that holds the lock.
  int fd() const { return fd_; }
  // Whether the lock is on the file that `fd` is open on (device and inode).
  Result<bool> covers(int fd) const;

 private:
  StoreLock(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_ = -1;
  std::string path_;
};

// An OFD lock on one byte of the file open at `fd`: F_RDLCK, F_WRLCK or F_UNLCK. Without
// `wait`, a conflict is -EAGAIN. 0 or -errno.
int store_byte_lock(int fd, short type, uint64_t byte, bool wait);

// Waits for the OFD lock `type` on `byte`, logging once (naming `what`) when the wait passes two
// seconds. OK, or the errno of a failing fcntl.
Status store_byte_lock_waiting(int fd, short type, uint64_t byte, const std::string& what);

struct StorePinState;  // store_lock.cc
struct StoreGate;      // store_lock.cc

// A reader's pin on the generation of the store open at `fd` (see above): the turnstile passed
// and the generation byte locked shared; released on destruction (and when `fd` closes).
// While this process already pins the same file the turnstile is skipped: a commit waiting for
// this process's first pin would otherwise block its second forever.
//
// A commit made by this same process cannot wait for this process's own readers (it would wait
// for itself); it replaces their generation instead: it waits for their reads in progress
// (begin_read), drops their pins, and from then on begin_read is Status::aborted, "reopen".
// Move-only.
class StorePin {
 public:
  StorePin();
  ~StorePin();
  StorePin(StorePin&& other) noexcept;
  StorePin& operator=(StorePin&& other) noexcept;
  StorePin(const StorePin&) = delete;
  StorePin& operator=(const StorePin&) = delete;

  // REQUIRES: `fd` is open for reading and outlives the pin.
  static Result<StorePin> take(int fd, const std::string& path);
  void release();

  // Holds off this process's commits of the file until `*read` is released; Aborted (naming
  // `path`) when one already replaced the pinned generation. OK at once without a pin.
  Status begin_read(std::shared_lock<std::shared_mutex>* read, const std::string& path) const;

 private:
  std::shared_ptr<StorePinState> state_;
  std::shared_ptr<StoreGate> gate_;
};

// Exclusive access for writing generation g + 1 into the store open read-write at `fd`: this
// process's own pins of the file replaced (see StorePin), then the turnstile and the generation
// byte locked exclusive, waiting for other processes' pinned readers to close. Released on
// destruction. Move-only.
class StoreApplyLock {
 public:
  StoreApplyLock() = default;
  ~StoreApplyLock();
  StoreApplyLock(StoreApplyLock&& other) noexcept;
  StoreApplyLock& operator=(StoreApplyLock&& other) noexcept;
  StoreApplyLock(const StoreApplyLock&) = delete;
  StoreApplyLock& operator=(const StoreApplyLock&) = delete;

  static Result<StoreApplyLock> take(int fd, const std::string& path);

 private:
  void release();
  int fd_ = -1;
  std::shared_ptr<StoreGate> gate_;
  std::unique_lock<std::shared_mutex> local_;  // this process's readers held off
};

}  // namespace trove
