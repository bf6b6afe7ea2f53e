#include "storage/file.h"

#include <dirent.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "base/strings.h"

namespace trove {

namespace {

std::string dir_of(const std::string& path) {
  std::vector<char> buf(path.begin(), path.end());
  buf.push_back('\0');
  return dirname(buf.data());
}

std::string base_of(const std::string& path) {
  std::vector<char> buf(path.begin(), path.end());
  buf.push_back('\0');
  return basename(buf.data());
}

Status fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return Status::from_errno("opening " + dir, err);
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return Status::from_errno(dir, err);
  return {};
}

// ".<name>.tmp-": the start of every temporary name for destination `name`.
std::string temp_prefix(const std::string& name) {
  return "." + name + ".tmp-";
}

// A fresh "<dir>/.<name>.tmp-<pid>-<n>". One counter for the whole process, so no two writers
// in it (named fallback or O_TMPFILE being linked) ever pick the same name.
std::string next_temp_path(const std::string& dir, const std::string& name) {
  static std::atomic<int> counter{0};
  return str_printf("%s/%s%d-%d", dir.c_str(), temp_prefix(name).c_str(),
                    static_cast<int>(::getpid()), counter.fetch_add(1));
}

// The pid in a temporary's name "<prefix><pid>-<n>", or 0 when `entry` is not exactly that
// shape (another destination's temporary, such as ".a.tmp-1-0.tmp-<pid>-<n>" for dest
// "a.tmp-1-0", shares the prefix of dest "a" but not the shape).
long temp_owner_pid(const std::string& entry, const std::string& prefix) {
  if (entry.rfind(prefix, 0) != 0) return 0;
  const char* p = entry.c_str() + prefix.size();
  auto digits = [](const char* q) {
    const char* start = q;
    while (*q >= '0' && *q <= '9') ++q;
    return q == start ? nullptr : q;
  };
  const char* pid_end = digits(p);
  if (pid_end == nullptr || *pid_end != '-') return 0;
  const char* n_end = digits(pid_end + 1);
  if (n_end == nullptr || *n_end != '\0') return 0;
  return std::strtol(p, nullptr, 10);
}

// Removes ".<name>.tmp-<pid>-<n>" files left in `dir` by writers of `name` whose process is
// gone: killed before it renamed its named temporary, or between linking its O_TMPFILE and
// renaming it. A live process's temporaries (this one's included) are left alone.
void remove_stale_temporaries(const std::string& dir, const std::string& name) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  const std::string prefix = temp_prefix(name);
  while (struct dirent* e = ::readdir(d)) {
    const std::string entry = e->d_name;
    const long pid = temp_owner_pid(entry, prefix);
    if (pid <= 0 || pid > std::numeric_limits<pid_t>::max()) continue;
    if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
      ::unlink((dir + "/" + entry).c_str());
    }
  }
  ::closedir(d);
}

}  // namespace

// ---- File ------------------------------------------------------------------------------------

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}
File::File(File&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)) {}
File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
  }
  return *this;
}

Result<File> File::open_read(const std::string& path, bool direct) {
  int flags = O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0);
  int fd = ::open(path.c_str(), flags);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return Status::not_found(path + ": no such file");
    if (direct && err == EINVAL) {
      return Status::not_supported(path + ": the filesystem does not support O_DIRECT");
    }
    return Status::from_errno("opening " + path, err);
  }
  return File(fd, path);
}

Result<uint64_t> File::size() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    return Status::from_errno("stat of " + path_, err);
  }
  return static_cast<uint64_t>(st.st_size);
}

Result<bool> File::is_same_file(const File& other) const {
  struct stat a;
  struct stat b;
  if (::fstat(fd_, &a) != 0) {
    const int err = errno;
    return Status::from_errno("stat of " + path_, err);
  }
  if (::fstat(other.fd_, &b) != 0) {
    const int err = errno;
    return Status::from_errno("stat of " + other.path_, err);
  }
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

Status File::read_exact(uint64_t offset, std::span<uint8_t> dst) const {
  size_t done = 0;
  while (done < dst.size()) {
    ssize_t n =
        ::pread(fd_, dst.data() + done, dst.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      return Status::from_errno(str_printf("%s: read of %zu bytes at offset %llu", path_.c_str(),
                                           dst.size(), static_cast<unsigned long long>(offset)),
                                err);
    }
    if (n == 0) {
      return Status::corruption(str_printf(
          "%s: truncated: read of %zu bytes at offset %llu ends past the end of the file",
          path_.c_str(), dst.size(), static_cast<unsigned long long>(offset)));
    }
    done += static_cast<size_t>(n);
  }
  return {};
}

// ---- MappedFile ------------------------------------------------------------------------------

MappedFile::~MappedFile() {
  if (data_ != nullptr && size_ > 0) ::munmap(const_cast<uint8_t*>(data_), size_);
}
MappedFile::MappedFile(MappedFile&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      path_(std::move(other.path_)) {}
MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr && size_ > 0) ::munmap(const_cast<uint8_t*>(data_), size_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    path_ = std::move(other.path_);
  }
  return *this;
}

Result<MappedFile> MappedFile::open(const std::string& path) {
  TROVE_ASSIGN_OR_RETURN(File file, File::open_read(path));
  return map(file);
}

Result<MappedFile> MappedFile::map(const File& file) {
  TROVE_CHECK_MSG(file.is_open(), "MappedFile::map of a closed File");
  TROVE_ASSIGN_OR_RETURN(uint64_t size, file.size());
  MappedFile m;
  m.path_ = file.path();
  m.size_ = size;
  if (size == 0) return m;
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, file.fd(), 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return Status::from_errno("mmap of " + file.path(), err);
  }
  m.data_ = static_cast<const uint8_t*>(p);
  return m;
}

// ---- AtomicFileWriter ------------------------------------------------------------------------

AtomicFileWriter::~AtomicFileWriter() {
  abandon();
}

AtomicFileWriter::AtomicFileWriter(AtomicFileWriter&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      dest_(std::move(other.dest_)),
      temp_path_(std::move(other.temp_path_)),
      offset_(other.offset_),
      committed_(other.committed_),
      sync_folder_(std::move(other.sync_folder_)) {
  other.temp_path_.clear();
}

AtomicFileWriter& AtomicFileWriter::operator=(AtomicFileWriter&& other) noexcept {
  if (this != &other) {
    abandon();
    fd_ = std::exchange(other.fd_, -1);
    dest_ = std::move(other.dest_);
    temp_path_ = std::move(other.temp_path_);
    other.temp_path_.clear();
    offset_ = other.offset_;
    committed_ = other.committed_;
    sync_folder_ = std::move(other.sync_folder_);
  }
  return *this;
}

void AtomicFileWriter::abandon() {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (!temp_path_.empty() && !committed_) ::unlink(temp_path_.c_str());
  temp_path_.clear();
}

Result<AtomicFileWriter> AtomicFileWriter::create(const std::string& dest,
                                                  AtomicFileWriterOptions options) {
  if (dest.empty()) return Status::invalid_argument("output path is empty");
  struct stat st;
  if (::stat(dest.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    return Status::invalid_argument(dest + " is a folder; give a file name for the output");
  }
  const std::string dir = dir_of(dest);
  const std::string name = base_of(dest);
  remove_stale_temporaries(dir, name);
  AtomicFileWriter w;
  w.dest_ = dest;
  w.sync_folder_ = std::move(options.sync_folder);
  auto folder_error = [&dir](int err) -> Status {
    if (err == ENOENT) return Status::not_found("output folder " + dir + " does not exist");
    return Status::from_errno("writing into " + dir, err);
  };
  if (options.use_tmpfile) {
    // An unnamed file vanishes by itself if the process dies before commit: no stray temp.
    w.fd_ = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
    if (w.fd_ >= 0) return w;
    const int err = errno;
    if (err == ENOENT || err == EACCES || err == EROFS) return folder_error(err);
    // Anything else (EOPNOTSUPP, EISDIR or EINVAL from a filesystem or kernel without
    // O_TMPFILE): fall back to a named temporary.
  }
  w.temp_path_ = next_temp_path(dir, name);
  w.fd_ = ::open(w.temp_path_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
  if (w.fd_ < 0) {
    const int err = errno;
    w.temp_path_.clear();
    if (err == ENOENT || err == EACCES || err == EROFS) return folder_error(err);
    return Status::from_errno("creating a temporary file in " + dir, err);
  }
  return w;
}

Status AtomicFileWriter::write_at(uint64_t offset, std::span<const uint8_t> data) {
  TROVE_CHECK(fd_ >= 0 && !committed_);
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n =
        ::pwrite(fd_, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      abandon();
      return Status::from_errno(str_printf("writing %s at offset %llu", dest_.c_str(),
                                           static_cast<unsigned long long>(offset + done)),
                                err);
    }
    done += static_cast<size_t>(n);
  }
  return {};
}

Status AtomicFileWriter::append(std::span<const uint8_t> data) {
  TROVE_RETURN_IF_ERROR(write_at(offset_, data));
  offset_ += data.size();
  return {};
}

Status AtomicFileWriter::append_zeros(uint64_t n) {
  static const std::vector<uint8_t> kZeros(1 << 16, 0);
  while (n > 0) {
    const uint64_t chunk = n < kZeros.size() ? n : kZeros.size();
    TROVE_RETURN_IF_ERROR(append({kZeros.data(), static_cast<size_t>(chunk)}));
    n -= chunk;
  }
  return {};
}

Status AtomicFileWriter::commit() {
  TROVE_CHECK_MSG(fd_ >= 0 && !committed_, "commit() on an abandoned or committed writer");
  // Replacing a file keeps its permission bits (the new file was created 0644 less umask).
  struct stat old;
  if (::stat(dest_.c_str(), &old) == 0 && S_ISREG(old.st_mode) &&
      ::fchmod(fd_, old.st_mode & 0777) != 0) {
    const int err = errno;
    abandon();
    return Status::from_errno("giving the new " + dest_ + " the permissions of the old", err);
  }
  if (::fsync(fd_) != 0) {
    const int err = errno;
    abandon();
    return Status::from_errno("fsync of the new " + dest_, err);
  }
  const std::string dir = dir_of(dest_);
  if (temp_path_.empty()) {
    // Give the unnamed file a temporary name, then rename it over dest (linkat cannot replace).
    const std::string named = next_temp_path(dir, base_of(dest_));
    const std::string proc = str_printf("/proc/self/fd/%d", fd_);
    if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, named.c_str(), AT_SYMLINK_FOLLOW) != 0) {
      const int err = errno;
      abandon();
      return Status::from_errno("naming the new " + dest_, err);
    }
    temp_path_ = named;
  }
  if (::rename(temp_path_.c_str(), dest_.c_str()) != 0) {
    const int err = errno;
    abandon();
    return Status::from_errno("renaming the new file over " + dest_, err);
  }
  committed_ = true;
  temp_path_.clear();
  ::close(fd_);
  fd_ = -1;
  // From here on dest names the new file whatever happens: an error must not suggest that the
  // old one is still there.
  const Status synced = sync_folder_ ? sync_folder_(dir) : fsync_dir(dir);
  if (!synced.ok()) {
    return Status::io_error(dest_ + " was replaced, but fsync of its folder failed: " +
                            synced.message() + "; the replacement may not survive a power loss");
  }
  return {};
}

Status write_file_atomic(const std::string& path, std::span<const uint8_t> data) {
  TROVE_ASSIGN_OR_RETURN(AtomicFileWriter w, AtomicFileWriter::create(path));
  TROVE_RETURN_IF_ERROR(w.append(data));
  return w.commit();
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

}  // namespace trove
