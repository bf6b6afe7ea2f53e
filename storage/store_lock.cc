// StoreLock, StorePin, StoreApplyLock: see storage/store_lock.h and FORMAT.md, "Readers and
// writers".
#include "storage/store_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "base/log.h"
#include "base/strings.h"

namespace trove {

namespace {

int flock_retrying(int fd, int operation) {
  while (true) {
    if (::flock(fd, operation) == 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

// This process's pins, by file: a second pin of a file skips the turnstile, and a commit or a
// recovery refuses to wait for a pin of its own process.
class PinRegistry {
 public:
  static PinRegistry& get() {
    static PinRegistry* registry = new PinRegistry();  // never destroyed: used from destructors
    return *registry;
  }
  void add(dev_t dev, ino_t ino) {
    std::lock_guard<std::mutex> lock(mu_);
    ++pins_[{dev, ino}];
  }
  void remove(dev_t dev, ino_t ino) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pins_.find({dev, ino});
    if (it != pins_.end() && --it->second == 0) pins_.erase(it);
  }
  bool has(dev_t dev, ino_t ino) const {
    std::lock_guard<std::mutex> lock(mu_);
    return pins_.count({dev, ino}) > 0;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::pair<dev_t, ino_t>, int> pins_;
};

}  // namespace

// ---- byte locks -------------------------------------------------------------------------------

int store_byte_lock(int fd, short type, uint64_t byte, bool wait) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(byte);
  fl.l_len = 1;
  while (true) {
    if (::fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl) == 0) return 0;
    const int err = errno;
    if (err == EINTR) continue;
    return err == EACCES ? -EAGAIN : -err;
  }
}

Status store_byte_lock_waiting(int fd, short type, uint64_t byte, const std::string& what) {
  // Polled rather than F_OFD_SETLKW so the wait can be reported; the turnstile, not the order
  // of waiters, is what keeps a commit from starving.
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  auto pause = std::chrono::microseconds(200);
  bool logged = false;
  while (true) {
    const int rc = store_byte_lock(fd, type, byte, /*wait=*/false);
    if (rc == 0) return {};
    if (rc != -EAGAIN) return Status::from_errno("locking " + what, -rc);
    if (!logged && Clock::now() - start > std::chrono::seconds(2)) {
      TROVE_LOG_INFO("%s", ("waiting: " + what).c_str());
      logged = true;
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(20000));
  }
}

// ---- StoreLock --------------------------------------------------------------------------------

StoreLock::~StoreLock() {
  if (fd_ >= 0) ::close(fd_);  // closing drops the flock
}

StoreLock::StoreLock(StoreLock&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)) {}

StoreLock& StoreLock::operator=(StoreLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
  }
  return *this;
}

Result<StoreLock> StoreLock::acquire(const std::string& path) {
  if (path.empty()) return Status::invalid_argument("store path is empty");
  int fd = -1;
  while (true) {
    fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd >= 0 || errno != EINTR) break;
  }
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return Status::not_found(path + ": no such file");
    return Status::from_errno("opening " + path + " to write it", err);
  }
  return adopt(fd, path);
}

Result<StoreLock> StoreLock::adopt(int fd, const std::string& path) {
  StoreLock lock(fd, path);
  const int rc = flock_retrying(fd, LOCK_EX | LOCK_NB);
  if (rc == -EWOULDBLOCK) {
    return Status::aborted(path +
                           ": busy: another writer of this store (an update, a training run or "
                           "a recovery) holds its lock; retry when it is done");
  }
  if (rc < 0) return Status::from_errno("locking " + path, -rc);
  return lock;
}

Result<bool> StoreLock::covers(int fd) const {
  struct stat a, b;
  if (fd_ < 0) return false;
  if (::fstat(fd_, &a) != 0 || ::fstat(fd, &b) != 0) {
    const int err = errno;
    return Status::from_errno("stat of " + path_, err);
  }
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

// ---- StorePin ---------------------------------------------------------------------------------

StorePin::~StorePin() {
  release();
}

StorePin::StorePin(StorePin&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), dev_(other.dev_), ino_(other.ino_) {}

StorePin& StorePin::operator=(StorePin&& other) noexcept {
  if (this != &other) {
    release();
    fd_ = std::exchange(other.fd_, -1);
    dev_ = other.dev_;
    ino_ = other.ino_;
  }
  return *this;
}

void StorePin::release() {
  if (fd_ < 0) return;
  store_byte_lock(fd_, F_UNLCK, kStoreGenerationLockByte, /*wait=*/false);
  PinRegistry::get().remove(dev_, ino_);
  fd_ = -1;
}

bool store_pinned_by_this_process(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return false;
  return PinRegistry::get().has(st.st_dev, st.st_ino);
}

Result<StorePin> StorePin::take(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    return Status::from_errno("stat of " + path, err);
  }
  const bool second = PinRegistry::get().has(st.st_dev, st.st_ino);
  if (!second) {
    TROVE_RETURN_IF_ERROR(store_byte_lock_waiting(
        fd, F_RDLCK, kStoreTurnstileLockByte,
        path + ": an update of this store is being written; reading starts once it is done"));
  }
  const Status pinned = store_byte_lock_waiting(
      fd, F_RDLCK, kStoreGenerationLockByte,
      path + ": an update of this store is being written; reading starts once it is done");
  if (!second) store_byte_lock(fd, F_UNLCK, kStoreTurnstileLockByte, /*wait=*/false);
  TROVE_RETURN_IF_ERROR(pinned);
  StorePin pin;
  pin.fd_ = fd;
  pin.dev_ = st.st_dev;
  pin.ino_ = st.st_ino;
  PinRegistry::get().add(st.st_dev, st.st_ino);
  return pin;
}

// ---- StoreApplyLock ---------------------------------------------------------------------------

StoreApplyLock::~StoreApplyLock() {
  if (fd_ < 0) return;
  store_byte_lock(fd_, F_UNLCK, kStoreGenerationLockByte, /*wait=*/false);
  store_byte_lock(fd_, F_UNLCK, kStoreTurnstileLockByte, /*wait=*/false);
}

StoreApplyLock::StoreApplyLock(StoreApplyLock&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)) {}

StoreApplyLock& StoreApplyLock::operator=(StoreApplyLock&& other) noexcept {
  if (this != &other) {
    StoreApplyLock old(std::move(*this));
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

Result<StoreApplyLock> StoreApplyLock::take(int fd, const std::string& path) {
  if (store_pinned_by_this_process(fd)) {
    return Status::invalid_argument(
        path +
        ": this process has the store open for reading (a StoreReader pins its generation), so "
        "writing a new generation would wait for itself; close the reader, or open it with "
        "StoreOpenOptions::pin_generation = false while this process holds the writer lock");
  }
  StoreApplyLock lock;
  TROVE_RETURN_IF_ERROR(
      store_byte_lock_waiting(fd, F_WRLCK, kStoreTurnstileLockByte,
                              path + ": another process is writing a generation of this store"));
  lock.fd_ = fd;  // from here the destructor unlocks
  TROVE_RETURN_IF_ERROR(store_byte_lock_waiting(
      fd, F_WRLCK, kStoreGenerationLockByte,
      path + ": the new generation is committed; writing it into the store waits for the readers "
             "that have the store open to close it"));
  return lock;
}

}  // namespace trove
