// StoreLock, StorePin, StoreApplyLock: see storage/store_lock.h and FORMAT.md, "Readers and
// writers".
#include "storage/store_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "base/log.h"
#include "base/strings.h"

namespace trove {

struct StorePinState {
  int fd = -1;
  bool replaced = false;  // guarded by the gate's mutex
};

struct StoreGate {
  std::shared_mutex mu;  // reads shared, this process's commits exclusive
  std::mutex pins_mu;    // guards pins
  std::vector<std::shared_ptr<StorePinState>> pins;

  bool pinned() {
    std::lock_guard<std::mutex> lock(pins_mu);
    return !pins.empty();
  }
};

namespace {

int flock_retrying(int fd, int operation) {
  while (true) {
    if (::flock(fd, operation) == 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

// This process's pins, by file (a gate per file): a second pin of a file skips the turnstile,
// and a commit of this process replaces the generation of its own pins instead of waiting for
// them.
class PinRegistry {
 public:
  static PinRegistry& get() {
    static PinRegistry* registry = new PinRegistry();  // never destroyed: used from destructors
    return *registry;
  }
  // The gate of the file, created on first use.
  std::shared_ptr<StoreGate> gate(dev_t dev, ino_t ino) {
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<StoreGate>& g = gates_[{dev, ino}];
    if (g == nullptr) g = std::make_shared<StoreGate>();
    return g;
  }

 private:
  std::mutex mu_;
  std::map<std::pair<dev_t, ino_t>, std::shared_ptr<StoreGate>> gates_;
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

StorePin::StorePin() = default;

StorePin::~StorePin() {
  release();
}

StorePin::StorePin(StorePin&& other) noexcept
    : state_(std::move(other.state_)), gate_(std::move(other.gate_)) {}

StorePin& StorePin::operator=(StorePin&& other) noexcept {
  if (this != &other) {
    release();
    state_ = std::move(other.state_);
    gate_ = std::move(other.gate_);
  }
  return *this;
}

void StorePin::release() {
  if (state_ == nullptr) return;
  // Unlocking twice (after a commit of this process dropped the pin) is harmless.
  store_byte_lock(state_->fd, F_UNLCK, kStoreGenerationLockByte, /*wait=*/false);
  {
    std::lock_guard<std::mutex> lock(gate_->pins_mu);
    auto& pins = gate_->pins;
    pins.erase(std::remove(pins.begin(), pins.end(), state_), pins.end());
  }
  state_.reset();
  gate_.reset();
}

Status StorePin::begin_read(std::shared_lock<std::shared_mutex>* read,
                            const std::string& path) const {
  if (state_ == nullptr) return {};
  *read = std::shared_lock<std::shared_mutex>(gate_->mu);
  if (state_->replaced) {
    read->unlock();
    return Status::aborted(path +
                           ": this process committed a new generation of the store after this "
                           "reader opened it; reopen the store to read it");
  }
  return {};
}

Result<StorePin> StorePin::take(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    return Status::from_errno("stat of " + path, err);
  }
  std::shared_ptr<StoreGate> gate = PinRegistry::get().gate(st.st_dev, st.st_ino);
  // Held until the pin is registered: a commit of this process either replaces it or starts
  // after it, never waits for it.
  std::shared_lock<std::shared_mutex> local(gate->mu);
  const bool second = gate->pinned();
  const std::string waiting =
      path + ": an update of this store is being written; reading starts once it is done";
  if (!second) {
    TROVE_RETURN_IF_ERROR(store_byte_lock_waiting(fd, F_RDLCK, kStoreTurnstileLockByte, waiting));
  }
  const Status pinned = store_byte_lock_waiting(fd, F_RDLCK, kStoreGenerationLockByte, waiting);
  if (!second) store_byte_lock(fd, F_UNLCK, kStoreTurnstileLockByte, /*wait=*/false);
  TROVE_RETURN_IF_ERROR(pinned);
  StorePin pin;
  pin.state_ = std::make_shared<StorePinState>();
  pin.state_->fd = fd;
  pin.gate_ = std::move(gate);
  std::lock_guard<std::mutex> lock(pin.gate_->pins_mu);
  pin.gate_->pins.push_back(pin.state_);
  return pin;
}

// ---- StoreApplyLock ---------------------------------------------------------------------------

void StoreApplyLock::release() {
  if (fd_ >= 0) {
    store_byte_lock(fd_, F_UNLCK, kStoreGenerationLockByte, /*wait=*/false);
    store_byte_lock(fd_, F_UNLCK, kStoreTurnstileLockByte, /*wait=*/false);
  }
  fd_ = -1;
  if (local_.owns_lock()) local_.unlock();
  local_ = {};
  gate_.reset();
}

StoreApplyLock::~StoreApplyLock() {
  release();
}

StoreApplyLock::StoreApplyLock(StoreApplyLock&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      gate_(std::move(other.gate_)),
      local_(std::move(other.local_)) {}

StoreApplyLock& StoreApplyLock::operator=(StoreApplyLock&& other) noexcept {
  if (this != &other) {
    release();
    fd_ = std::exchange(other.fd_, -1);
    gate_ = std::move(other.gate_);
    local_ = std::move(other.local_);
  }
  return *this;
}

Result<StoreApplyLock> StoreApplyLock::take(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    return Status::from_errno("stat of " + path, err);
  }
  StoreApplyLock lock;
  // This process's own readers: their reads in progress finish, then their generation is
  // replaced (a commit cannot wait for its own process to close them).
  lock.gate_ = PinRegistry::get().gate(st.st_dev, st.st_ino);
  lock.local_ = std::unique_lock<std::shared_mutex>(lock.gate_->mu);
  {
    std::lock_guard<std::mutex> pins(lock.gate_->pins_mu);
    for (const std::shared_ptr<StorePinState>& pin : lock.gate_->pins) {
      if (pin->replaced) continue;
      pin->replaced = true;
      store_byte_lock(pin->fd, F_UNLCK, kStoreGenerationLockByte, /*wait=*/false);
    }
  }
  TROVE_RETURN_IF_ERROR(
      store_byte_lock_waiting(fd, F_WRLCK, kStoreTurnstileLockByte,
                              path + ": another process is writing a generation of this store"));
  lock.fd_ = fd;  // from here release() unlocks
  TROVE_RETURN_IF_ERROR(store_byte_lock_waiting(
      fd, F_WRLCK, kStoreGenerationLockByte,
      path + ": the new generation is committed; writing it into the store waits for the readers "
             "that have the store open to close it"));
  return lock;
}

}  // namespace trove
