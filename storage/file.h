// Files: RAII descriptors, read-only maps, and the atomic writer every store and export goes
// through. LevelDB's Env is the model: small classes, copying deleted, errors as Status
// naming the path and offset.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "base/status.h"

namespace trove {

// An open file descriptor; closed on destruction. Move-only.
class File {
 public:
  File() = default;
  ~File();
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // Opens `path` read-only. With `direct`, also opens with O_DIRECT (reads must then be
  // aligned; see kDirectAlignment). Not found is Status::not_found naming the path.
  static Result<File> open_read(const std::string& path, bool direct = false);

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  bool is_open() const { return fd_ >= 0; }

  Result<uint64_t> size() const;
  // Whether `other` is open on the same file (device and inode) as this one. Reopening a path
  // can reach a different file when something renamed another over it in between.
  Result<bool> is_same_file(const File& other) const;
  // Reads exactly dst.size() bytes at `offset`, retrying on EINTR and short reads. A read
  // that hits end of file is Status::corruption ("truncated") naming path, offset and length.
  Status read_exact(uint64_t offset, std::span<uint8_t> dst) const;

 private:
  File(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_ = -1;
  std::string path_;
};

// O_DIRECT alignment trove uses for offsets, lengths and buffers (the common page size; the
// device's logical block size is 512 or 4096 and this covers both).
inline constexpr uint64_t kDirectAlignment = 4096;

// A read-only, private mapping of a whole file. Empty files map to an empty span.
class MappedFile {
 public:
  MappedFile() = default;
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  static Result<MappedFile> open(const std::string& path);
  // Maps the file `file` is open on, whatever its path names now. The mapping outlives `file`.
  // REQUIRES: file.is_open().
  static Result<MappedFile> map(const File& file);

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  std::string path_;
};

struct AtomicFileWriterOptions {
  // Hold the bytes in an unnamed O_TMPFILE. False uses the named ".<name>.tmp-<pid>-<n>"
  // temporary from the start, as on filesystems without O_TMPFILE (tests force that path).
  bool use_tmpfile = true;
  // Test seam: replaces the fsync of dest's folder in commit() (given the folder's path), so
  // a test can make it fail. Empty: the real fsync.
  std::function<Status(const std::string& folder)> sync_folder;
};

// Writes a new file that appears at `dest` only when commit() succeeds, replacing what was
// there in one rename. Until then the bytes live in an unnamed O_TMPFILE in dest's folder or,
// where the filesystem lacks O_TMPFILE, in a hidden ".<name>.tmp-<pid>-<n>" there.
// commit() = fsync(file) + (O_TMPFILE: link under such a name) + rename + fsync(folder).
//
// After a crash at any moment `dest` names either the complete old file (or nothing) or the
// complete new one. What else a killed process can leave behind:
//   - O_TMPFILE: nothing, except when killed in the instant between the link and the rename;
//   - named temporary: ".<name>.tmp-<pid>-<n>" when killed at any moment before the rename.
// Such a leftover stays until the next AtomicFileWriter for the same dest is created, which
// removes every one whose process is gone. A writer destroyed without commit (an abandoned
// one, including after a failed call) removes its temporary itself.
//
// The new file gets the permission bits (rwx, not setuid/setgid/sticky) of the file it
// replaces; a file that did not exist gets 0644 less the umask.
class AtomicFileWriter {
 public:
  AtomicFileWriter() = default;
  ~AtomicFileWriter();
  AtomicFileWriter(AtomicFileWriter&& other) noexcept;
  AtomicFileWriter& operator=(AtomicFileWriter&& other) noexcept;
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  static Result<AtomicFileWriter> create(const std::string& dest,
                                         AtomicFileWriterOptions options = {});

  // Appends at the current end.
  Status append(std::span<const uint8_t> data);
  // Appends `n` zero bytes (padding).
  Status append_zeros(uint64_t n);
  // Writes at an absolute offset (e.g. a header filled in last). May extend the file.
  Status write_at(uint64_t offset, std::span<const uint8_t> data);
  // Bytes appended so far (the offset of the next append).
  uint64_t offset() const { return offset_; }
  const std::string& dest() const { return dest_; }
  // The new file's descriptor (read-write), for a lock taken on it before commit() publishes it.
  // REQUIRES: not yet committed or abandoned.
  int fd() const { return fd_; }

  // REQUIRES: not yet committed. After an error the writer is abandoned, and `dest` still
  // names the previous file, except when only the final fsync of the folder failed: then
  // `dest` already names the new file (the error says so) but the rename may not survive a
  // power loss.
  Status commit();

 private:
  void abandon();
  int fd_ = -1;
  std::string dest_;
  std::string temp_path_;  // non-empty when a named temporary is in use
  uint64_t offset_ = 0;
  bool committed_ = false;
  std::function<Status(const std::string& folder)> sync_folder_;
};

// Writes `data` to `path` atomically (AtomicFileWriter in one call).
Status write_file_atomic(const std::string& path, std::span<const uint8_t> data);

bool file_exists(const std::string& path);

}  // namespace trove
