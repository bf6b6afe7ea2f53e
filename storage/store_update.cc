// StoreUpdate and recover_store: a new generation of a store written in place through a
// physical redo journal (storage/FORMAT.md, "Generations").
//
//   commit():  journal ──fsync──▶ folder ──fsync──▶ COMMIT POINT ──▶ replay ──▶ unlink
//                                                                      │
//   recover_store / StoreReader::open (after a crash) ─────────────────┘ same replay
//
// The apply step of commit() is the replay recovery runs: it reads the journal back and
// copies its writes into the store, so the path a crash depends on runs on every commit.
#include "storage/store_update.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "base/log.h"
#include "base/strings.h"
#include "storage/store.h"
#include "storage/store_format.h"
#include "storage/store_lock.h"

namespace trove {

// ---- StoreUpdateOps: the real syscalls ------------------------------------------------------

int StoreUpdateOps::open(const std::string& path, int flags, mode_t mode) {
  while (true) {
    const int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
    if (fd >= 0) return fd;
    if (errno != EINTR) return -errno;
  }
}

int64_t StoreUpdateOps::write_at(int fd, const uint8_t* buf, size_t len, uint64_t offset) {
  const ssize_t n = ::pwrite(fd, buf, len, static_cast<off_t>(offset));
  return n < 0 ? -errno : n;
}

int StoreUpdateOps::truncate(int fd, uint64_t size) {
  return ::ftruncate(fd, static_cast<off_t>(size)) == 0 ? 0 : -errno;
}

int StoreUpdateOps::sync(int fd) {
  return ::fsync(fd) == 0 ? 0 : -errno;
}

int StoreUpdateOps::unlink(const std::string& path) {
  return ::unlink(path.c_str()) == 0 ? 0 : -errno;
}

int StoreUpdateOps::sync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -errno;
  const int rc = ::fsync(fd) == 0 ? 0 : -errno;
  ::close(fd);
  return rc;
}

std::string store_journal_path(const std::string& path) {
  char* real = ::realpath(path.c_str(), nullptr);
  std::string resolved = real != nullptr ? real : path;
  std::free(real);
  return resolved + ".journal";
}

namespace {

using nlohmann::json;

// Journal bytes are verified and copied in pieces of this size.
constexpr uint64_t kCopyChunkBytes = uint64_t{1} << 20;

std::string hex(uint64_t v) {
  return str_printf("0x%016llx", ull(v));
}

std::string dir_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string describe(const StoreIdentity& id) {
  return str_printf("generation %llu, %llu bytes, manifest %s", ull(id.generation),
                    ull(id.file_size), hex(id.manifest_xxh3).c_str());
}

// A descriptor closed on destruction (closing also drops a flock taken through it).
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

Result<uint64_t> file_size_of(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    return Status::from_errno("stat of " + path, err);
  }
  return static_cast<uint64_t>(st.st_size);
}

Status read_exact(int fd, const std::string& path, uint8_t* dst, uint64_t len, uint64_t offset) {
  uint64_t done = 0;
  while (done < len) {
    const ssize_t n = ::pread(fd, dst + done, len - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      return Status::from_errno(
          str_printf("%s: read of %llu bytes at offset %llu", path.c_str(), ull(len), ull(offset)),
          err);
    }
    if (n == 0) {
      return Status::corruption(
          str_printf("%s: truncated: read of %llu bytes at offset %llu ends "
                     "past the end of the file",
                     path.c_str(), ull(len), ull(offset)));
    }
    done += static_cast<uint64_t>(n);
  }
  return {};
}

Status write_all(StoreUpdateOps& ops, int fd, const std::string& path, const uint8_t* data,
                 uint64_t len, uint64_t offset) {
  while (len > 0) {
    const int64_t n = ops.write_at(fd, data, len, offset);
    if (n == -EINTR) continue;
    if (n < 0) {
      return Status::from_errno(
          str_printf("%s: write of %llu bytes at offset %llu", path.c_str(), ull(len), ull(offset)),
          static_cast<int>(-n));
    }
    if (n == 0) {
      return Status::io_error(
          str_printf("%s: write at offset %llu wrote nothing", path.c_str(), ull(offset)));
    }
    data += n;
    len -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

Status op_status(int rc, const std::string& what) {
  if (rc >= 0) return {};
  return Status::from_errno(what, -rc);
}

// flock that retries EINTR: 0 or -errno.
int lock_file(int fd, int operation) {
  while (true) {
    if (::flock(fd, operation) == 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

// ---- reading a journal ------------------------------------------------------------------------

struct JournalCheck {
  enum class State { kAbsent, kUncommitted, kCommitted };
  State state = State::kAbsent;
  std::string why;  // kUncommitted: what is missing (for the log)
  StoreJournalHeader header{};
  uint64_t bytes = 0;
};

JournalCheck uncommitted(std::string why) {
  JournalCheck j;
  j.state = JournalCheck::State::kUncommitted;
  j.why = std::move(why);
  return j;
}

// Checks the journal open at `fd`: its commit record and checksum decide whether it was
// committed; a committed one must then be well formed (header, and every write inside the new
// file). A committed journal that is malformed is an error, not "uncommitted": the store may
// already be torn by its replay, so it can be neither replayed nor dropped.
Result<JournalCheck> check_journal(int fd, const std::string& jpath) {
  TROVE_ASSIGN_OR_RETURN(uint64_t size, file_size_of(fd, jpath));
  constexpr uint64_t kFixed = sizeof(StoreJournalHeader) + sizeof(StoreJournalCommit);
  if (size < kFixed) {
    return uncommitted(str_printf("%llu bytes, too short for a committed journal", ull(size)));
  }
  StoreJournalCommit commit;
  TROVE_RETURN_IF_ERROR(read_exact(fd, jpath, reinterpret_cast<uint8_t*>(&commit), sizeof(commit),
                                   size - sizeof(commit)));
  if (std::memcmp(commit.magic, kStoreJournalCommitMagic, sizeof(commit.magic)) != 0) {
    return uncommitted("no commit record at its end");
  }
  if (commit.journal_bytes != size) {
    return uncommitted(str_printf("its commit record says %llu bytes, the file has %llu",
                                  ull(commit.journal_bytes), ull(size)));
  }
  XXH3_state_t* state = XXH3_createState();
  TROVE_CHECK(state != nullptr);
  XXH3_64bits_reset(state);
  std::vector<uint8_t> chunk(std::min(kCopyChunkBytes, size));
  const uint64_t hashed = size - sizeof(uint64_t);
  Status read_status;
  for (uint64_t pos = 0; pos < hashed && read_status.ok();) {
    const uint64_t n = std::min<uint64_t>(chunk.size(), hashed - pos);
    read_status = read_exact(fd, jpath, chunk.data(), n, pos);
    XXH3_64bits_update(state, chunk.data(), n);
    pos += n;
  }
  const uint64_t computed = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  TROVE_RETURN_IF_ERROR(read_status);
  if (computed != commit.journal_xxh3) {
    return uncommitted(str_printf("checksum mismatch (stored %s, computed %s)",
                                  hex(commit.journal_xxh3).c_str(), hex(computed).c_str()));
  }

  JournalCheck j;
  j.state = JournalCheck::State::kCommitted;
  j.bytes = size;
  StoreJournalHeader& h = j.header;
  TROVE_RETURN_IF_ERROR(read_exact(fd, jpath, reinterpret_cast<uint8_t*>(&h), sizeof(h), 0));
  auto malformed = [&](const std::string& what) {
    return Status::corruption(jpath + ": committed update journal is malformed: " + what +
                              "; it cannot be replayed, and the store may be torn");
  };
  if (std::memcmp(h.magic, kStoreJournalMagic, sizeof(h.magic)) != 0) {
    return malformed("it does not start with the magic \"TROVEJNL\"");
  }
  if (h.version_major != kStoreJournalVersionMajor) {
    return Status::not_supported(str_printf(
        "%s: update journal format %u.x is not supported (this build reads %u.x); replay it with "
        "the trove that wrote it",
        jpath.c_str(), h.version_major, kStoreJournalVersionMajor));
  }
  if (h.endian_check != kStoreEndianCheck) return malformed("endian_check is wrong");
  if (h.write_count != commit.write_count) {
    return malformed(str_printf("header write_count = %llu, commit record write_count = %llu",
                                ull(h.write_count), ull(commit.write_count)));
  }
  if (h.target_generation == 0 || h.new_generation != h.target_generation + 1) {
    return malformed(str_printf("generation %llu -> %llu is not one step", ull(h.target_generation),
                                ull(h.new_generation)));
  }
  if (h.new_file_size < kStoreHeaderBytes + kStoreTrailerBytes) {
    return malformed(str_printf("new_file_size = %llu is too small", ull(h.new_file_size)));
  }
  const uint64_t writes_end = size - sizeof(StoreJournalCommit);
  uint64_t pos = sizeof(StoreJournalHeader);
  uint64_t furthest = 0;  // the end of the write that reaches furthest into the new file
  uint64_t written = 0;   // bytes of all writes
  for (uint64_t i = 0; i < h.write_count; ++i) {
    StoreJournalWrite w;
    if (writes_end - pos < sizeof(w)) {
      return malformed(
          str_printf("write %llu of %llu runs past the commit record", ull(i), ull(h.write_count)));
    }
    TROVE_RETURN_IF_ERROR(read_exact(fd, jpath, reinterpret_cast<uint8_t*>(&w), sizeof(w), pos));
    pos += sizeof(w);
    uint64_t end = 0;
    if (__builtin_add_overflow(w.offset, w.bytes, &end) || end > h.new_file_size ||
        w.bytes > writes_end - pos) {
      return malformed(
          str_printf("write %llu (%llu bytes at offset %llu) lies outside the new "
                     "file (%llu bytes) or the journal",
                     ull(i), ull(w.bytes), ull(w.offset), ull(h.new_file_size)));
    }
    pos += w.bytes;
    furthest = std::max(furthest, end);
    written += w.bytes;  // <= the journal's size: no overflow
  }
  if (pos != writes_end) {
    return malformed(str_printf("%llu bytes between the last write and the commit record",
                                ull(writes_end - pos)));
  }
  // Generation g + 1 ends with its trailer, which the journal writes (with the manifest), so its
  // size is where the furthest write ends. A larger new_file_size would make the replay grow
  // the store to a size nothing in the journal fills (a 1 TiB sparse file that no longer opens).
  if (furthest != h.new_file_size) {
    return malformed(str_printf(
        "new_file_size = %llu, but its writes end at %llu (generation %llu ends with the "
        "trailer the journal writes)",
        ull(h.new_file_size), ull(furthest), ull(h.new_generation)));
  }
  // Regions never move, so the file grows only by what the journal writes past its old end: a
  // few bytes written far past it would leave a vast hole.
  if (h.new_file_size > h.target_file_size && h.new_file_size - h.target_file_size > written) {
    return malformed(str_printf(
        "new_file_size = %llu grows generation %llu's %llu bytes by more than the %llu bytes "
        "the journal writes",
        ull(h.new_file_size), ull(h.target_generation), ull(h.target_file_size), ull(written)));
  }
  return j;
}

// Opens and checks the journal at `jpath`; kAbsent when there is none.
Result<JournalCheck> read_journal(const std::string& jpath, UniqueFd* out_fd) {
  UniqueFd fd(::open(jpath.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    const int err = errno;
    if (err == ENOENT) return JournalCheck{};
    return Status::from_errno(
        "reading the update journal " + jpath + " (the store cannot be read safely without it)",
        err);
  }
  TROVE_ASSIGN_OR_RETURN(JournalCheck j, check_journal(fd.get(), jpath));
  if (out_fd != nullptr) *out_fd = std::move(fd);
  return j;
}

// ---- matching a journal to its store ----------------------------------------------------------

bool header_identity(std::span<const uint8_t> bytes, StoreIdentity* id) {
  if (bytes.size() < sizeof(StoreHeader)) return false;
  const StoreHeader h = decode_store_header(bytes);
  if (std::memcmp(h.magic, kStoreMagic, sizeof(h.magic)) != 0 ||
      store_header_checksum(h) != h.header_xxh3) {
    return false;
  }
  *id = {h.file_size, h.generation, h.manifest_xxh3};
  return true;
}

// Whether the trailer a file of identity `want` has at want.file_size - 64 is there.
Result<bool> has_trailer_of(int fd, const std::string& path, uint64_t actual_size,
                            const StoreIdentity& want) {
  if (want.file_size < kStoreTrailerBytes || actual_size < want.file_size) return false;
  uint8_t bytes[kStoreTrailerBytes];
  TROVE_RETURN_IF_ERROR(
      read_exact(fd, path, bytes, sizeof(bytes), want.file_size - kStoreTrailerBytes));
  const StoreTrailer t = decode_store_trailer(bytes);
  return std::memcmp(t.magic, kStoreTrailerMagic, sizeof(t.magic)) == 0 &&
         store_trailer_checksum(t) == t.trailer_xxh3 &&
         StoreIdentity{t.file_size, t.generation, t.manifest_xxh3} == want;
}

// OK when the store open at `fd` is the journal's: its header names generation g (the target:
// untouched, or torn by a replay that had not reached the header) or g + 1 (replayed up to the
// header, perhaps without the sync). The replay is idempotent, so either is replayed. A header
// that is itself torn falls back to the trailers at either generation's end.
Status check_journal_target(int fd, const std::string& path, const std::string& jpath,
                            const StoreJournalHeader& jh) {
  const StoreIdentity target{jh.target_file_size, jh.target_generation, jh.target_manifest_xxh3};
  const StoreIdentity next{jh.new_file_size, jh.new_generation, jh.new_manifest_xxh3};
  TROVE_ASSIGN_OR_RETURN(uint64_t size, file_size_of(fd, path));
  std::vector<uint8_t> header(std::min<uint64_t>(size, sizeof(StoreHeader)));
  TROVE_RETURN_IF_ERROR(read_exact(fd, path, header.data(), header.size(), 0));
  StoreIdentity have;
  std::string found;
  if (header_identity(header, &have)) {
    if (have == target || have == next) return {};
    found = describe(have);
  } else {
    for (const StoreIdentity& want : {target, next}) {
      TROVE_ASSIGN_OR_RETURN(bool match, has_trailer_of(fd, path, size, want));
      if (match) return {};
    }
    found = "a damaged header and neither generation's trailer";
  }
  return Status::corruption(str_printf(
      "%s: the committed update journal %s was written for another store or generation (it "
      "turns %s into %s; the store has %s); neither file was changed. Remove %s if %s is the "
      "store to keep",
      path.c_str(), jpath.c_str(), describe(target).c_str(), describe(next).c_str(), found.c_str(),
      jpath.c_str(), path.c_str()));
}

// ---- replay -----------------------------------------------------------------------------------

// Copies every write of the committed journal `j` (open at `jfd`) into the store open at
// `store_fd`, truncates it to the new size and fsyncs it. Idempotent.
Status replay_journal(StoreUpdateOps& ops, int store_fd, const std::string& path, int jfd,
                      const std::string& jpath, const JournalCheck& j) {
  std::vector<uint8_t> chunk(kCopyChunkBytes);
  uint64_t pos = sizeof(StoreJournalHeader);
  for (uint64_t i = 0; i < j.header.write_count; ++i) {
    StoreJournalWrite w;
    TROVE_RETURN_IF_ERROR(read_exact(jfd, jpath, reinterpret_cast<uint8_t*>(&w), sizeof(w), pos));
    pos += sizeof(w);
    for (uint64_t done = 0; done < w.bytes;) {
      const uint64_t n = std::min<uint64_t>(chunk.size(), w.bytes - done);
      TROVE_RETURN_IF_ERROR(read_exact(jfd, jpath, chunk.data(), n, pos + done));
      TROVE_RETURN_IF_ERROR(write_all(ops, store_fd, path, chunk.data(), n, w.offset + done));
      done += n;
    }
    pos += w.bytes;
  }
  TROVE_RETURN_IF_ERROR(op_status(
      ops.truncate(store_fd, j.header.new_file_size),
      str_printf("%s: truncating to %llu bytes", path.c_str(), ull(j.header.new_file_size))));
  return op_status(ops.sync(store_fd), "fsync of " + path);
}

// Removes the journal once the store no longer needs it. Failures are logged: a journal that
// stays (or comes back because the folder was not synced) is either uncommitted or replayed
// again, harmlessly.
void remove_journal(StoreUpdateOps& ops, const std::string& jpath) {
  const int rc = ops.unlink(jpath);
  if (rc < 0 && rc != -ENOENT) {
    TROVE_LOG_WARN("%s: removing the update journal failed: %s", jpath.c_str(), std::strerror(-rc));
    return;
  }
  const int sync_rc = ops.sync_dir(dir_of(jpath));
  if (sync_rc < 0) {
    TROVE_LOG_WARN("%s: fsync of the folder after removing the update journal failed: %s",
                   jpath.c_str(), std::strerror(-sync_rc));
  }
}

// Recovery with the store's lock held through `store_fd` (opened read-write when `writable`).
Status recover_locked(StoreUpdateOps& ops, const std::string& path, const std::string& jpath,
                      int store_fd, bool writable) {
  UniqueFd jfd;
  TROVE_ASSIGN_OR_RETURN(JournalCheck j, read_journal(jpath, &jfd));
  switch (j.state) {
    case JournalCheck::State::kAbsent:
      return {};
    case JournalCheck::State::kUncommitted:
      // A crash before the commit point: the store was never touched.
      TROVE_LOG_INFO("%s: removing an uncommitted update journal (%s); generation as stored",
                     jpath.c_str(), j.why.c_str());
      remove_journal(ops, jpath);
      return {};
    case JournalCheck::State::kCommitted:
      break;
  }
  TROVE_RETURN_IF_ERROR(check_journal_target(store_fd, path, jpath, j.header));
  if (!writable) {
    return Status::io_error(str_printf(
        "%s: generation %llu is committed in the update journal %s but not yet written into the "
        "store, and this process cannot write the store to finish it; run `trove verify %s` as a "
        "user who can write the store and its folder (opening the store with write access "
        "replays the journal)",
        path.c_str(), ull(j.header.new_generation), jpath.c_str(), path.c_str()));
  }
  // Readers pinned to generation g (opened before the crash) are reading it; the replay waits
  // for them, and readers arriving meanwhile queue behind it.
  TROVE_ASSIGN_OR_RETURN(StoreApplyLock apply, StoreApplyLock::take(store_fd, path));
  TROVE_RETURN_IF_ERROR(replay_journal(ops, store_fd, path, jfd.get(), jpath, j));
  TROVE_LOG_INFO("%s: replayed the update journal %s (generation %llu)", path.c_str(),
                 jpath.c_str(), ull(j.header.new_generation));
  remove_journal(ops, jpath);
  return {};
}

std::shared_ptr<StoreUpdateOps> ops_of(const StoreUpdateOptions& options) {
  return options.ops != nullptr ? options.ops : std::make_shared<StoreUpdateOps>();
}

// ---- writing a journal ------------------------------------------------------------------------

// Appends to the journal through a buffer, hashing everything it writes.
class JournalWriter {
 public:
  JournalWriter(StoreUpdateOps& ops, int fd, std::string path, uint64_t buffer_bytes)
      : ops_(ops), fd_(fd), path_(std::move(path)), state_(XXH3_createState()) {
    TROVE_CHECK(state_ != nullptr);
    XXH3_64bits_reset(state_);
    buffer_.reserve(std::max<uint64_t>(buffer_bytes, 64));
  }
  ~JournalWriter() { XXH3_freeState(state_); }
  JournalWriter(const JournalWriter&) = delete;
  JournalWriter& operator=(const JournalWriter&) = delete;

  uint64_t offset() const { return offset_ + buffer_.size(); }

  Status append(std::span<const uint8_t> bytes, bool hashed = true) {
    if (hashed) XXH3_64bits_update(state_, bytes.data(), bytes.size());
    while (!bytes.empty()) {
      const size_t n = std::min(bytes.size(), buffer_.capacity() - buffer_.size());
      buffer_.insert(buffer_.end(), bytes.begin(), bytes.begin() + n);
      bytes = bytes.subspan(n);
      if (buffer_.size() == buffer_.capacity()) TROVE_RETURN_IF_ERROR(flush());
    }
    return {};
  }
  template <typename T>
  Status append_struct(const T& value) {
    return append({reinterpret_cast<const uint8_t*>(&value), sizeof(value)});
  }

  // Appends the commit record (its checksum covers everything before it) and flushes.
  Status finish(uint64_t write_count) {
    StoreJournalCommit commit;
    std::memcpy(commit.magic, kStoreJournalCommitMagic, sizeof(commit.magic));
    commit.journal_bytes = offset() + sizeof(commit);
    commit.write_count = write_count;
    TROVE_RETURN_IF_ERROR(append(
        {reinterpret_cast<const uint8_t*>(&commit), offsetof(StoreJournalCommit, journal_xxh3)}));
    commit.journal_xxh3 = XXH3_64bits_digest(state_);
    TROVE_RETURN_IF_ERROR(append(
        {reinterpret_cast<const uint8_t*>(&commit.journal_xxh3), sizeof(commit.journal_xxh3)},
        /*hashed=*/false));
    return flush();
  }

 private:
  Status flush() {
    TROVE_RETURN_IF_ERROR(write_all(ops_, fd_, path_, buffer_.data(), buffer_.size(), offset_));
    offset_ += buffer_.size();
    buffer_.clear();
    return {};
  }

  StoreUpdateOps& ops_;
  int fd_;
  std::string path_;
  XXH3_state_t* state_;
  std::vector<uint8_t> buffer_;
  uint64_t offset_ = 0;  // bytes written to the file
};

// One write of the journal: `pieces` laid end to end at `offset`.
struct Extent {
  uint64_t offset = 0;
  uint64_t bytes = 0;
  std::vector<std::span<const uint8_t>> pieces;

  uint64_t end() const { return offset + bytes; }
  void add(std::span<const uint8_t> piece) {
    pieces.push_back(piece);
    bytes += piece.size();
  }
};

std::span<const uint8_t> as_bytes(const std::vector<uint64_t>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(uint64_t)};
}

// What put_* staged for one layer.
struct LayerChanges {
  std::map<int64_t, size_t> slot_of;           // expert id -> slot in `records`, in id order
  std::vector<uint8_t> records;                // slots of table.stride bytes
  std::map<size_t, std::vector<float>> dense;  // index in StoreLayerInfo::dense -> values
  std::optional<json> info;
};

}  // namespace

// ---- StoreUpdate ------------------------------------------------------------------------------

struct StoreUpdate::Impl {
  std::string path;
  std::string jpath;
  StoreUpdateOptions options;
  std::shared_ptr<StoreUpdateOps> ops;
  UniqueFd fd;  // read-write, holding the exclusive flock
  mode_t mode = 0644;
  std::optional<StoreReader> store;   // generation g
  StoreHeader header_g{};             // generation g's header, as read through `fd`
  StoreIdentity base;                 // and its identity
  std::vector<LayerChanges> changes;  // parallel to store->layers()
  std::optional<json> provenance;
  bool ended = false;
  StoreUpdateStats stats;

  Status misuse(const char* op, const std::string& what) const {
    return Status::invalid_argument(str_printf("%s: %s: %s", path.c_str(), op, what.c_str()));
  }

  Status usable(const char* op) const {
    if (ended) return misuse(op, "the update has ended (commit was called)");
    return {};
  }

  Result<size_t> find_layer(const char* op, const std::string& name) const {
    const std::vector<StoreLayerInfo>& layers = store->layers();
    std::string names;
    for (size_t i = 0; i < layers.size(); ++i) {
      if (layers[i].name == name) return i;
      names += (i == 0 ? "'" : ", '") + layers[i].name + "'";
    }
    return Status::not_found(str_printf("%s: %s: no layer named '%s' (the store has %s)",
                                        path.c_str(), op, name.c_str(), names.c_str()));
  }

  // The bytes just past the last region other than the manifest: where generation g + 1's
  // manifest goes (the manifest's own offset, in every file StoreWriter lays out).
  uint64_t regions_end() const {
    uint64_t end = kStoreHeaderBytes;
    const json& layers = store->manifest()["layers"];
    for (size_t li = 0; li < store->layers().size(); ++li) {
      const StoreLayerInfo& l = store->layers()[li];
      end = std::max(end, l.table.offset + l.table.bytes);
      const json& sums = layers[li]["table"]["checksums"];
      end = std::max(end, sums["offset"].get<uint64_t>() + sums["bytes"].get<uint64_t>());
      for (const StoreDenseInfo& d : l.dense) end = std::max(end, d.offset + d.bytes);
    }
    return end;
  }

  Result<uint64_t> commit();
};

StoreUpdate::StoreUpdate(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StoreUpdate::StoreUpdate(StoreUpdate&&) noexcept = default;
StoreUpdate& StoreUpdate::operator=(StoreUpdate&&) noexcept = default;
StoreUpdate::~StoreUpdate() = default;

Result<StoreUpdate> StoreUpdate::begin(const std::string& path, StoreUpdateOptions options) {
  if (path.empty()) return Status::invalid_argument("store path is empty");
  auto impl = std::make_unique<Impl>();
  Impl& u = *impl;
  u.path = path;
  u.jpath = store_journal_path(path);
  u.ops = ops_of(options);
  u.options = std::move(options);

  const int fd = u.ops->open(path, O_RDWR, 0);
  if (fd < 0) {
    if (fd == -ENOENT) return Status::not_found(path + ": no such file");
    return Status::from_errno("opening " + path + " to update it", -fd);
  }
  u.fd = UniqueFd(fd);
  if (u.options.lock != nullptr) {
    // The caller holds the writer lock for longer than this update (a training run).
    TROVE_ASSIGN_OR_RETURN(bool covers, u.options.lock->covers(fd));
    if (!covers) {
      return Status::invalid_argument(path + ": the writer lock given (taken on " +
                                      u.options.lock->path() + ") is not on this file");
    }
  } else {
    const int lock_rc = lock_file(fd, LOCK_EX | LOCK_NB);
    if (lock_rc == -EWOULDBLOCK) {
      return Status::aborted(path +
                             ": busy: another writer of this store (an update, a training run "
                             "or a recovery) holds its lock; retry when it is done");
    }
    TROVE_RETURN_IF_ERROR(op_status(lock_rc, "locking " + path));
  }
  struct stat st;
  if (::fstat(fd, &st) == 0) u.mode = st.st_mode & 0777;

  TROVE_RETURN_IF_ERROR(recover_locked(*u.ops, path, u.jpath, fd, /*writable=*/true));
  // A journal that recovery could not remove would stop this update's own (and, committed,
  // block the reader below on the lock held here).
  if (::access(u.jpath.c_str(), F_OK) == 0) {
    return Status::io_error(path + ": its update journal " + u.jpath +
                            " could not be removed; updating a store needs write access to its "
                            "folder");
  }
  StoreOpenOptions open_options;
  open_options.direct_io = false;  // the update reads the manifest and checksums only
  // This update holds the writer lock: nothing else changes the store while it reads it (and a
  // pin of its own would make its commit wait for itself).
  open_options.pin_generation = false;
  TROVE_ASSIGN_OR_RETURN(StoreReader store, StoreReader::open(path, open_options));
  // The reader opened `path` again; make sure it reached the file this descriptor holds
  // locked. Equal identities mean equal bytes (see StoreIdentity).
  TROVE_ASSIGN_OR_RETURN(uint64_t size, file_size_of(fd, path));
  std::vector<uint8_t> header(std::min<uint64_t>(size, sizeof(StoreHeader)));
  TROVE_RETURN_IF_ERROR(read_exact(fd, path, header.data(), header.size(), 0));
  u.base = {store.file_size(), store.generation(), store.manifest_xxh3()};
  StoreIdentity locked;
  if (!header_identity(header, &locked) || !(locked == u.base) || size != u.base.file_size) {
    return Status::aborted(path + ": changed while being opened for update; retry");
  }
  u.header_g = decode_store_header(header);
  if (u.base.generation == UINT64_MAX) {
    return Status::out_of_range(path + ": generation is at its maximum");
  }
  u.changes.resize(store.layers().size());
  u.store = std::move(store);
  return StoreUpdate(std::move(impl));
}

Status StoreUpdate::put_records(const std::string& layer, std::span<const int64_t> ids,
                                std::span<const uint8_t> strides) {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreUpdate");
  Impl& u = *impl_;
  const char* op = "put_records";
  TROVE_RETURN_IF_ERROR(u.usable(op));
  TROVE_ASSIGN_OR_RETURN(size_t li, u.find_layer(op, layer));
  const StoreTableInfo& t = u.store->layers()[li].table;
  if (strides.size() / t.stride != ids.size() || strides.size() % t.stride != 0) {
    return u.misuse(op, str_printf("layer '%s': %zu bytes given for %zu records of %llu bytes "
                                   "(%llu needed: whole strides)",
                                   layer.c_str(), strides.size(), ids.size(), ull(t.stride),
                                   ull(ids.size() * t.stride)));
  }
  for (int64_t id : ids) {
    if (id < 0 || static_cast<uint64_t>(id) >= t.count) {
      return Status::out_of_range(
          str_printf("%s: %s: layer '%s': expert %lld is out of range (the table has %llu "
                     "experts)",
                     u.path.c_str(), op, layer.c_str(), static_cast<long long>(id), ull(t.count)));
    }
  }
  std::vector<int64_t> sorted(ids.begin(), ids.end());
  std::sort(sorted.begin(), sorted.end());
  const auto repeat = std::adjacent_find(sorted.begin(), sorted.end());
  if (repeat != sorted.end()) {
    return u.misuse(op, str_printf("layer '%s': expert %lld appears more than once in one call",
                                   layer.c_str(), static_cast<long long>(*repeat)));
  }
  LayerChanges& c = u.changes[li];
  for (size_t i = 0; i < ids.size(); ++i) {
    auto [it, inserted] = c.slot_of.try_emplace(ids[i], c.records.size() / t.stride);
    if (inserted) c.records.resize(c.records.size() + t.stride);
    std::memcpy(c.records.data() + it->second * t.stride, strides.data() + i * t.stride, t.stride);
  }
  return {};
}

Status StoreUpdate::put_dense(const std::string& layer, const std::string& name,
                              std::span<const float> values) {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreUpdate");
  Impl& u = *impl_;
  const char* op = "put_dense";
  TROVE_RETURN_IF_ERROR(u.usable(op));
  TROVE_ASSIGN_OR_RETURN(size_t li, u.find_layer(op, layer));
  const std::vector<StoreDenseInfo>& dense = u.store->layers()[li].dense;
  size_t k = 0;
  while (k < dense.size() && dense[k].name != name) ++k;
  if (k == dense.size()) {
    return Status::not_found(str_printf("%s: %s: layer '%s' has no dense tensor named '%s'",
                                        u.path.c_str(), op, layer.c_str(), name.c_str()));
  }
  const uint64_t elements = dense[k].bytes / sizeof(float);
  if (values.size() != elements) {
    std::string shape;
    for (int64_t dim : dense[k].shape) shape += (shape.empty() ? "" : ", ") + std::to_string(dim);
    return u.misuse(
        op, str_printf("layer '%s' tensor '%s' has %llu elements (shape [%s]); %zu given",
                       layer.c_str(), name.c_str(), ull(elements), shape.c_str(), values.size()));
  }
  u.changes[li].dense[k].assign(values.begin(), values.end());
  return {};
}

Status StoreUpdate::set_layer_info(const std::string& layer, nlohmann::json info) {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreUpdate");
  Impl& u = *impl_;
  const char* op = "set_layer_info";
  TROVE_RETURN_IF_ERROR(u.usable(op));
  TROVE_ASSIGN_OR_RETURN(size_t li, u.find_layer(op, layer));
  TROVE_RETURN_IF_ERROR(
      check_store_json_depth(info, kStoreInfoLevels, u.path + ": layer '" + layer + "' info"));
  u.changes[li].info = std::move(info);
  return {};
}

Status StoreUpdate::set_provenance(nlohmann::json provenance) {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreUpdate");
  Impl& u = *impl_;
  TROVE_RETURN_IF_ERROR(u.usable("set_provenance"));
  TROVE_RETURN_IF_ERROR(
      check_store_json_depth(provenance, kStoreProvenanceLevels, u.path + ": provenance"));
  u.provenance = std::move(provenance);
  return {};
}

Result<uint64_t> StoreUpdate::commit() {
  TROVE_CHECK_MSG(impl_ != nullptr, "use of a moved-from StoreUpdate");
  Impl& u = *impl_;
  TROVE_RETURN_IF_ERROR(u.usable("commit"));
  u.ended = true;
  Result<uint64_t> result = u.commit();
  // Whatever happened, the update is over: drop the lock and what was staged.
  u.fd.reset();
  u.store.reset();
  u.changes.clear();
  return result;
}

Result<uint64_t> StoreUpdate::Impl::commit() {
  const StoreReader& g = *store;
  const uint64_t generation = base.generation + 1;
  json manifest = g.manifest();
  manifest["generation"] = generation;
  if (provenance) manifest["provenance"] = std::move(*provenance);

  // Every write generation g + 1 needs, in file order within each kind; the header last.
  std::vector<Extent> extents;
  std::deque<std::vector<uint8_t>> owned;  // bytes the extents point into (stable addresses)
  stats = {};
  stats.file_size_before = base.file_size;

  // Record strides: neighbouring ids share one write.
  for (size_t li = 0; li < changes.size(); ++li) {
    const StoreTableInfo& t = g.layers()[li].table;
    const LayerChanges& c = changes[li];
    for (const auto& [id, slot] : c.slot_of) {
      const uint64_t offset = t.offset + static_cast<uint64_t>(id) * t.stride;
      if (extents.empty() || extents.back().end() != offset) extents.push_back({offset, 0, {}});
      extents.back().add({c.records.data() + slot * t.stride, t.stride});
      ++stats.records;
    }
  }
  // Their checksums: the layer's array with the changed entries replaced. Runs of changed
  // entries with gaps of at most one entry share a write (an entry costs less than a write's
  // 16-byte header).
  for (size_t li = 0; li < changes.size(); ++li) {
    const LayerChanges& c = changes[li];
    if (c.slot_of.empty()) continue;
    const StoreLayerInfo& layer = g.layers()[li];
    const uint64_t stride = layer.table.stride;
    std::vector<uint64_t> sums(layer.table.count);
    for (uint64_t i = 0; i < sums.size(); ++i) {
      sums[i] = g.record_checksum(layer, static_cast<int64_t>(i));
    }
    for (const auto& [id, slot] : c.slot_of) {
      sums[static_cast<size_t>(id)] = store_checksum({c.records.data() + slot * stride, stride});
    }
    json& sums_json = manifest["layers"][li]["table"]["checksums"];
    sums_json["xxh3"] = store_checksum(as_bytes(sums));
    const uint64_t array_offset = sums_json["offset"].get<uint64_t>();
    owned.emplace_back(as_bytes(sums).begin(), as_bytes(sums).end());
    const std::vector<uint8_t>& bytes = owned.back();
    auto it = c.slot_of.begin();
    while (it != c.slot_of.end()) {
      const uint64_t first = static_cast<uint64_t>(it->first);
      uint64_t last = first;
      for (++it; it != c.slot_of.end() && static_cast<uint64_t>(it->first) - last <= 2; ++it) {
        last = static_cast<uint64_t>(it->first);
      }
      Extent e{array_offset + first * sizeof(uint64_t), 0, {}};
      e.add(std::span<const uint8_t>(bytes).subspan(first * sizeof(uint64_t),
                                                    (last - first + 1) * sizeof(uint64_t)));
      extents.push_back(std::move(e));
    }
  }
  // Dense tensors.
  for (size_t li = 0; li < changes.size(); ++li) {
    for (const auto& [k, values] : changes[li].dense) {
      const StoreDenseInfo& d = g.layers()[li].dense[k];
      std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(values.data()), d.bytes);
      manifest["layers"][li]["dense"][k]["xxh3"] = store_checksum(bytes);
      if (!bytes.empty()) {
        extents.push_back({d.offset, 0, {}});
        extents.back().add(bytes);
      }
      ++stats.dense_tensors;
    }
    if (changes[li].info) manifest["layers"][li]["info"] = std::move(*changes[li].info);
  }

  // The manifest, rewritten where it is (just past the last region), then the trailer; the file
  // grows or shrinks with it.
  const std::string text = store_manifest_text(manifest);
  // set_layer_info and set_provenance checked the parts; the whole must agree.
  TROVE_CHECK(json_nesting_depth(text) <= kMaxJsonDepth);
  const std::span<const uint8_t> text_bytes(reinterpret_cast<const uint8_t*>(text.data()),
                                            text.size());
  const uint64_t manifest_offset = regions_end();
  const uint64_t file_size = manifest_offset + text.size() + kStoreTrailerBytes;
  const StoreHeader header = make_store_header(file_size, manifest_offset, text.size(),
                                               store_checksum(text_bytes), generation);
  // In a file laid out by another writer the old manifest may start before the new one; its
  // bytes there become padding, which must be zero.
  const uint64_t old_manifest_offset = header_g.manifest_offset;
  const uint64_t old_manifest_bytes = header_g.manifest_bytes;
  if (old_manifest_offset < manifest_offset) {
    const uint64_t end = std::min(old_manifest_offset + old_manifest_bytes, manifest_offset);
    owned.emplace_back(end - old_manifest_offset, uint8_t{0});
    extents.push_back({old_manifest_offset, 0, {}});
    extents.back().add(owned.back());
  }
  owned.emplace_back(text_bytes.begin(), text_bytes.end());
  owned.back().resize(text.size() + kStoreTrailerBytes);
  encode_store_trailer(make_store_trailer(header),
                       std::span<uint8_t, kStoreTrailerBytes>(owned.back().data() + text.size(),
                                                              kStoreTrailerBytes));
  extents.push_back({manifest_offset, 0, {}});
  extents.back().add(owned.back());
  owned.emplace_back(reinterpret_cast<const uint8_t*>(&header),
                     reinterpret_cast<const uint8_t*>(&header) + sizeof(header));
  extents.push_back({0, 0, {}});
  extents.back().add(owned.back());

  // ---- the journal, up to the commit point ----
  StoreJournalHeader jh;
  std::memset(&jh, 0, sizeof(jh));
  std::memcpy(jh.magic, kStoreJournalMagic, sizeof(jh.magic));
  jh.version_major = kStoreJournalVersionMajor;
  jh.version_minor = kStoreJournalVersionMinor;
  jh.endian_check = kStoreEndianCheck;
  jh.target_file_size = base.file_size;
  jh.target_generation = base.generation;
  jh.target_manifest_xxh3 = base.manifest_xxh3;
  jh.new_file_size = file_size;
  jh.new_generation = generation;
  jh.new_manifest_xxh3 = header.manifest_xxh3;
  jh.write_count = extents.size();

  const int jfd_rc = ops->open(jpath, O_RDWR | O_CREAT | O_EXCL, 0600);
  if (jfd_rc < 0) {
    return Status::from_errno(
        path + ": creating the update journal " + jpath + " (the store is unchanged)", -jfd_rc);
  }
  UniqueFd jfd(jfd_rc);
  // Readers need to read it as they read the store.
  if (::fchmod(jfd.get(), mode) != 0) {
    TROVE_LOG_DEBUG("%s: fchmod failed: %s", jpath.c_str(), std::strerror(errno));
  }
  auto abandon = [&](const Status& s) -> Status {
    stats = {};
    const int rc = ops->unlink(jpath);
    if (rc < 0 && rc != -ENOENT) {
      return s.with_context(str_printf(
          "%s: generation %llu was not committed, and removing its unfinished journal %s failed "
          "(%s): the store is unchanged unless the next open finds that journal complete",
          path.c_str(), ull(generation), jpath.c_str(), std::strerror(-rc)));
    }
    return s.with_context(
        str_printf("%s: generation %llu was not committed (the store is unchanged)", path.c_str(),
                   ull(generation)));
  };
  {
    JournalWriter w(*ops, jfd.get(), jpath, options.journal_buffer_bytes);
    Status s = w.append_struct(jh);
    for (size_t i = 0; i < extents.size() && s.ok(); ++i) {
      const Extent& e = extents[i];
      stats.applied_bytes += e.bytes;
      s = w.append_struct(StoreJournalWrite{e.offset, e.bytes});
      for (size_t p = 0; p < e.pieces.size() && s.ok(); ++p) s = w.append(e.pieces[p]);
    }
    if (s.ok()) s = w.finish(extents.size());
    if (s.ok()) stats.journal_bytes = w.offset();
    if (s.ok()) s = op_status(ops->sync(jfd.get()), "fsync of " + jpath);
    if (s.ok()) s = op_status(ops->sync_dir(dir_of(jpath)), "fsync of the folder of " + jpath);
    if (!s.ok()) return abandon(s);
  }
  // COMMIT POINT: the journal is durable under its name. From here a crash, or an error below,
  // ends in generation g + 1 once the journal is replayed.
  stats.writes = extents.size();
  stats.file_size_after = file_size;
  auto committed = [&](const Status& s) -> Status {
    return s.with_context(str_printf(
        "%s: generation %llu is committed in %s but writing it into the store failed; the next "
        "StoreReader::open or recover_store replays it",
        path.c_str(), ull(generation), jpath.c_str()));
  };
  // Readers pinned to generation g keep reading it until they close; then g + 1 is written
  // while new readers wait at the turnstile (FORMAT.md, "Readers and writers").
  Result<StoreApplyLock> apply = StoreApplyLock::take(fd.get(), path);
  if (!apply.ok()) return committed(apply.status());
  Result<JournalCheck> check = check_journal(jfd.get(), jpath);
  if (!check.ok()) return committed(check.status());
  if (check->state != JournalCheck::State::kCommitted) {
    return committed(Status::io_error(jpath + " reads back uncommitted: " + check->why));
  }
  const Status replayed = replay_journal(*ops, fd.get(), path, jfd.get(), jpath, *check);
  if (!replayed.ok()) return committed(replayed);
  jfd.reset();
  remove_journal(*ops, jpath);
  return generation;
}

const std::string& StoreUpdate::path() const {
  return impl_->path;
}
uint64_t StoreUpdate::base_generation() const {
  return impl_->base.generation;
}
const StoreUpdateStats& StoreUpdate::stats() const {
  return impl_->stats;
}

// ---- recover_store ----------------------------------------------------------------------------

Status recover_store(const std::string& path, StoreUpdateOptions options) {
  const std::string jpath = store_journal_path(path);
  struct stat st;
  if (::lstat(jpath.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT) return {};
    return Status::from_errno("looking for the update journal " + jpath, err);
  }
  std::shared_ptr<StoreUpdateOps> ops = ops_of(options);
  bool writable = true;
  int fd = ops->open(path, O_RDWR, 0);
  if (fd == -EACCES || fd == -EROFS || fd == -EPERM) {
    writable = false;
    fd = ops->open(path, O_RDONLY, 0);
  }
  if (fd == -ENOENT) {
    return Status::not_found(path + ": no such file (but its update journal " + jpath + " exists)");
  }
  if (fd < 0) return Status::from_errno("opening " + path, -fd);
  UniqueFd store_fd(fd);
  const int lock_rc = lock_file(fd, LOCK_EX | LOCK_NB);
  if (lock_rc == -EWOULDBLOCK) {
    // A live writer holds the lock (an update, a training run, another recovery): its journal
    // is its own, and it writes the store only under the apply lock, which a reader's pin
    // excludes. Never wait for the writer lock: a training run holds it for hours.
    return {};
  }
  TROVE_RETURN_IF_ERROR(op_status(lock_rc, "locking " + path));
  return recover_locked(*ops, path, jpath, fd, writable);
}

Result<bool> store_needs_recovery(const std::string& path, int fd) {
  const std::string jpath = store_journal_path(path);
  struct stat st;
  if (::lstat(jpath.c_str(), &st) != 0) {
    const int err = errno;
    if (err == ENOENT) return false;
    return Status::from_errno("looking for the update journal " + jpath, err);
  }
  const int lock_rc = lock_file(fd, LOCK_EX | LOCK_NB);
  if (lock_rc == -EWOULDBLOCK) return false;  // a live writer's journal
  TROVE_RETURN_IF_ERROR(op_status(lock_rc, "locking " + path));
  Result<JournalCheck> j = read_journal(jpath, nullptr);
  lock_file(fd, LOCK_UN);
  if (!j.ok()) return j.status();
  return j->state == JournalCheck::State::kCommitted;
}

}  // namespace trove
