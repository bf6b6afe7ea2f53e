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
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::from_errno("opening folder " + dir, errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return Status::from_errno("fsync of folder " + dir, err);
  return {};
}

// Removes ".<name>.tmp-<pid>-<n>" files left in `dir` by writers of `name` whose process is
// gone (killed in the instant between naming the new file and renaming it).
void remove_stale_temporaries(const std::string& dir, const std::string& name) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  const std::string prefix = "." + name + ".tmp-";
  while (struct dirent* e = ::readdir(d)) {
    const std::string entry = e->d_name;
    if (entry.rfind(prefix, 0) != 0) continue;
    const long pid = std::strtol(entry.c_str() + prefix.size(), nullptr, 10);
    if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
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
  if (::fstat(fd_, &st) != 0) return Status::from_errno("stat of " + path_, errno);
  return static_cast<uint64_t>(st.st_size);
}

Status File::read_exact(uint64_t offset, std::span<uint8_t> dst) const {
  size_t done = 0;
  while (done < dst.size()) {
    ssize_t n =
        ::pread(fd_, dst.data() + done, dst.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::from_errno(str_printf("%s: read of %zu bytes at offset %llu", path_.c_str(),
                                           dst.size(), static_cast<unsigned long long>(offset)),
                                errno);
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
  TROVE_ASSIGN_OR_RETURN(uint64_t size, file.size());
  MappedFile m;
  m.path_ = path;
  m.size_ = size;
  if (size == 0) return m;
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, file.fd(), 0);
  if (p == MAP_FAILED) return Status::from_errno("mmap of " + path, errno);
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
      committed_(other.committed_) {
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

Result<AtomicFileWriter> AtomicFileWriter::create(const std::string& dest) {
  if (dest.empty()) return Status::invalid_argument("output path is empty");
  struct stat st;
  if (::stat(dest.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    return Status::invalid_argument(dest + " is a folder; give a file name for the output");
  }
  const std::string dir = dir_of(dest);
  remove_stale_temporaries(dir, base_of(dest));
  AtomicFileWriter w;
  w.dest_ = dest;
  // An unnamed file vanishes by itself if the process dies before commit: no stray temp.
  w.fd_ = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
  if (w.fd_ < 0) {
    if (errno == ENOENT) return Status::not_found("output folder " + dir + " does not exist");
    if (errno == EACCES || errno == EROFS) return Status::from_errno("writing into " + dir, errno);
    static std::atomic<int> counter{0};
    w.temp_path_ = str_printf("%s/.%s.tmp-%d-%d", dir.c_str(), base_of(dest).c_str(),
                              static_cast<int>(::getpid()), counter.fetch_add(1));
    w.fd_ = ::open(w.temp_path_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
    if (w.fd_ < 0) {
      const int err = errno;
      w.temp_path_.clear();
      return Status::from_errno("creating a temporary file in " + dir, err);
    }
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
      if (errno == EINTR) continue;
      const int err = errno;
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
  if (::fsync(fd_) != 0) {
    const int err = errno;
    abandon();
    return Status::from_errno("fsync of the new " + dest_, err);
  }
  const std::string dir = dir_of(dest_);
  if (temp_path_.empty()) {
    // Give the unnamed file a temporary name, then rename it over dest (linkat cannot replace).
    static std::atomic<int> counter{0};
    std::string named = str_printf("%s/.%s.tmp-%d-%d", dir.c_str(), base_of(dest_).c_str(),
                                   static_cast<int>(::getpid()), counter.fetch_add(1));
    std::string proc = str_printf("/proc/self/fd/%d", fd_);
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
  return fsync_dir(dir);
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
