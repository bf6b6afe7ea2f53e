// Files: RAII descriptors, read-only maps, and the atomic writer every store and export goes
// through. LevelDB's Env is the model: small classes, copying deleted, errors as Status
// naming the path and offset.
#pragma once

#include <sys/types.h>

#include <cstdint>
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

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  std::string path_;
};

// Writes a new file that appears at `dest` only when commit() succeeds, replacing what was
// there in one rename. Until then the bytes live in an unnamed O_TMPFILE in dest's folder
// (or, where the filesystem lacks O_TMPFILE, a hidden ".<name>.tmp-<pid>-<n>" removed on
// failure). commit() = fsync(file) + link under a temporary name + rename + fsync(folder). A
// crash at any moment leaves either the old `dest` or the new one; an abandoned writer
// (destroyed without commit) removes its temporary. A process killed in the instant between
// naming and renaming leaves a named temporary; the next writer of the same dest removes it.
class AtomicFileWriter {
 public:
  AtomicFileWriter() = default;
  ~AtomicFileWriter();
  AtomicFileWriter(AtomicFileWriter&& other) noexcept;
  AtomicFileWriter& operator=(AtomicFileWriter&& other) noexcept;
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  static Result<AtomicFileWriter> create(const std::string& dest);

  // Appends at the current end.
  Status append(std::span<const uint8_t> data);
  // Appends `n` zero bytes (padding).
  Status append_zeros(uint64_t n);
  // Writes at an absolute offset (e.g. a header filled in last). May extend the file.
  Status write_at(uint64_t offset, std::span<const uint8_t> data);
  // Bytes appended so far (the offset of the next append).
  uint64_t offset() const { return offset_; }
  const std::string& dest() const { return dest_; }

  // REQUIRES: not yet committed. After an error the writer is abandoned.
  Status commit();

 private:
  void abandon();
  int fd_ = -1;
  std::string dest_;
  std::string temp_path_;  // non-empty when a named temporary is in use
  uint64_t offset_ = 0;
  bool committed_ = false;
};

// Writes `data` to `path` atomically (AtomicFileWriter in one call).
Status write_file_atomic(const std::string& path, std::span<const uint8_t> data);

bool file_exists(const std::string& path);

}  // namespace trove
