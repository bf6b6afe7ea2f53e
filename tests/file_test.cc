// storage/file: the atomic writer's all-or-nothing contract (checked by listing the folder),
// and the read side's errors naming the path and offset.
#include "storage/file.h"
#include "tests/test_util.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace trove {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

using testing::ScratchDir;

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::span<const uint8_t> bytes_of(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

using Names = std::vector<std::string>;

mode_t mode_of(const std::string& path) {
  struct stat st;
  TROVE_CHECK(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

// The pid of a process that has exited (and been reaped), for a stale temporary's name.
pid_t dead_pid() {
  const pid_t child = ::fork();
  TROVE_CHECK(child >= 0);
  if (child == 0) ::_exit(0);
  int status = 0;
  TROVE_CHECK(::waitpid(child, &status, 0) == child);
  return child;
}

const AtomicFileWriterOptions kNamedTemporary = {.use_tmpfile = false};

// ---- AtomicFileWriter ------------------------------------------------------------------------

TEST(AtomicFileWriter, CommitMakesTheFileAppearWithTheBytes) {
  ScratchDir dir;
  const std::string dest = dir.file("out.bin");
  auto w = AtomicFileWriter::create(dest);
  ASSERT_TRUE(w.ok()) << w.status().to_string();
  EXPECT_EQ(w->dest(), dest);
  ASSERT_TRUE(w->append(bytes_of("hello")).ok());
  ASSERT_TRUE(w->append_zeros(3).ok());
  ASSERT_TRUE(w->append(bytes_of("!")).ok());
  EXPECT_EQ(w->offset(), 9u);
  EXPECT_FALSE(file_exists(dest)) << "nothing appears before commit";
  ASSERT_TRUE(w->commit().ok());
  EXPECT_EQ(read_text(dest), std::string("hello\0\0\0!", 9));
  EXPECT_EQ(dir.list(), Names{"out.bin"});
}

TEST(AtomicFileWriter, CommitReplacesAnExistingFile) {
  ScratchDir dir;
  const std::string dest = dir.file("f");
  write_text(dest, "old contents, longer than the new");
  ASSERT_TRUE(write_file_atomic(dest, bytes_of("new")).ok());
  EXPECT_EQ(read_text(dest), "new");
  EXPECT_EQ(dir.list(), Names{"f"});
}

TEST(AtomicFileWriter, AbandonedWriterLeavesThePreviousFileAndNoStrays) {
  ScratchDir dir;
  const std::string dest = dir.file("f");
  write_text(dest, "old");
  {
    auto w = AtomicFileWriter::create(dest);
    ASSERT_TRUE(w.ok()) << w.status().to_string();
    ASSERT_TRUE(w->append(bytes_of("new bytes that must never be seen")).ok());
  }  // destroyed without commit
  EXPECT_EQ(read_text(dest), "old");
  EXPECT_EQ(dir.list(), Names{"f"});

  {
    auto w = AtomicFileWriter::create(dir.file("never"));
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE(w->append(bytes_of("x")).ok());
  }
  EXPECT_FALSE(file_exists(dir.file("never")));
  EXPECT_EQ(dir.list(), Names{"f"});
}

TEST(AtomicFileWriter, MovedWriterCommitsOnceAndTheSourceIsInert) {
  ScratchDir dir;
  auto w = AtomicFileWriter::create(dir.file("m"));
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE(w->append(bytes_of("abc")).ok());
  AtomicFileWriter moved = std::move(*w);
  EXPECT_EQ(moved.offset(), 3u);
  ASSERT_TRUE(moved.commit().ok());
  EXPECT_EQ(read_text(dir.file("m")), "abc");
  EXPECT_EQ(dir.list(), Names{"m"});
}

TEST(AtomicFileWriter, WriteAtAfterAppendPatchesAndExtends) {
  ScratchDir dir;
  const std::string dest = dir.file("h");
  auto w = AtomicFileWriter::create(dest);
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE(w->append_zeros(4).ok());  // header placeholder
  ASSERT_TRUE(w->append(bytes_of("payload")).ok());
  ASSERT_TRUE(w->write_at(0, bytes_of("HDR:")).ok());
  EXPECT_EQ(w->offset(), 11u) << "write_at does not move the append offset";
  ASSERT_TRUE(w->write_at(13, bytes_of("T")).ok());  // past the end: a hole of zeros
  ASSERT_TRUE(w->commit().ok());
  EXPECT_EQ(read_text(dest), std::string("HDR:payload\0\0T", 14));
}

// The named ".<name>.tmp-<pid>-<n>" path, used where the filesystem lacks O_TMPFILE.
TEST(AtomicFileWriter, NamedTemporaryFallbackCommitsAndLeavesNoStrays) {
  ScratchDir dir;
  const std::string dest = dir.file("out.bin");
  write_text(dest, "old");
  auto w = AtomicFileWriter::create(dest, kNamedTemporary);
  ASSERT_TRUE(w.ok()) << w.status().to_string();
  ASSERT_TRUE(w->append(bytes_of("new")).ok());
  const Names during = dir.list();
  ASSERT_EQ(during.size(), 2u);
  EXPECT_THAT(during[0], ::testing::StartsWith(".out.bin.tmp-" + std::to_string(::getpid()) + "-"));
  EXPECT_EQ(during[1], "out.bin");
  EXPECT_EQ(read_text(dest), "old");
  ASSERT_TRUE(w->commit().ok());
  EXPECT_EQ(read_text(dest), "new");
  EXPECT_EQ(dir.list(), Names{"out.bin"});
}

TEST(AtomicFileWriter, AbandonedNamedTemporaryIsRemoved) {
  ScratchDir dir;
  const std::string dest = dir.file("f");
  write_text(dest, "old");
  {
    auto w = AtomicFileWriter::create(dest, kNamedTemporary);
    ASSERT_TRUE(w.ok()) << w.status().to_string();
    ASSERT_TRUE(w->append(bytes_of("new bytes that must never be seen")).ok());
    EXPECT_EQ(dir.list().size(), 2u);
  }  // destroyed without commit
  EXPECT_EQ(read_text(dest), "old");
  EXPECT_EQ(dir.list(), Names{"f"});
}

// What a SIGKILLed writer leaves is removed by the next writer of the same destination; what
// belongs to a live process or to another destination is not.
TEST(AtomicFileWriter, StaleTemporaryOfADeadProcessIsRemovedByTheNextCreate) {
  ScratchDir dir;
  const std::string dead = std::to_string(dead_pid());
  const std::string live = std::to_string(::getpid());
  const Names leftovers = {
      ".f.tmp-" + dead + "-0",          // removed: f's, process gone
      ".f.tmp-" + dead + "-17",         // removed
      ".f.tmp-" + live + "-999999",     // kept: a live process may still commit it
      ".f.tmp-" + dead + "-0.tmp-1-0",  // kept: dest "f.tmp-<dead>-0"'s, not f's
      ".f.tmp-" + dead + "-x",          // kept: not the shape of a temporary
      ".g.tmp-" + dead + "-0",          // kept: another destination's
  };
  for (const std::string& name : leftovers) write_text(dir.file(name), "partial");
  for (const AtomicFileWriterOptions& options : {AtomicFileWriterOptions{}, kNamedTemporary}) {
    auto w = AtomicFileWriter::create(dir.file("f"), options);
    ASSERT_TRUE(w.ok()) << w.status().to_string();
    ASSERT_TRUE(w->append(bytes_of("x")).ok());
    ASSERT_TRUE(w->commit().ok());
    Names want = {leftovers[2], leftovers[3], leftovers[4], leftovers[5], "f"};
    std::sort(want.begin(), want.end());
    EXPECT_EQ(dir.list(), want);
    for (const std::string& name : {leftovers[0], leftovers[1]}) write_text(dir.file(name), "p");
  }
}

TEST(AtomicFileWriter, ReplacingAFileKeepsItsPermissionBits) {
  ScratchDir dir;
  const std::string dest = dir.file("f");
  for (const AtomicFileWriterOptions& options : {AtomicFileWriterOptions{}, kNamedTemporary}) {
    for (mode_t mode : {mode_t{0600}, mode_t{0755}, mode_t{0640}}) {
      SCOPED_TRACE(::testing::Message() << (options.use_tmpfile ? "O_TMPFILE" : "named")
                                        << ", mode " << std::oct << mode);
      write_text(dest, "old");
      ASSERT_EQ(::chmod(dest.c_str(), mode), 0);
      auto w = AtomicFileWriter::create(dest, options);
      ASSERT_TRUE(w.ok()) << w.status().to_string();
      ASSERT_TRUE(w->append(bytes_of("new")).ok());
      ASSERT_TRUE(w->commit().ok());
      EXPECT_EQ(read_text(dest), "new");
      EXPECT_EQ(mode_of(dest), mode);
    }
  }
}

TEST(AtomicFileWriter, NewFileGets0644LessTheUmask) {
  ScratchDir dir;
  struct UmaskGuard {
    mode_t saved = ::umask(027);
    ~UmaskGuard() { ::umask(saved); }
  } umask_027;
  for (const AtomicFileWriterOptions& options : {AtomicFileWriterOptions{}, kNamedTemporary}) {
    const std::string dest = dir.file(options.use_tmpfile ? "tmpfile" : "named");
    auto w = AtomicFileWriter::create(dest, options);
    ASSERT_TRUE(w.ok()) << w.status().to_string();
    ASSERT_TRUE(w->commit().ok());
    EXPECT_EQ(mode_of(dest), mode_t{0640}) << dest;
  }
}

// Once the rename is done the destination names the new file: an error from the folder fsync
// must say so rather than read like a failed write that left the old file in place.
TEST(AtomicFileWriter, FolderFsyncFailureAfterTheRenameSaysTheFileWasReplaced) {
  ScratchDir dir;
  const std::string dest = dir.file("f");
  write_text(dest, "old");
  for (const AtomicFileWriterOptions& base : {AtomicFileWriterOptions{}, kNamedTemporary}) {
    std::string synced_folder;
    AtomicFileWriterOptions options = base;
    options.sync_folder = [&synced_folder](const std::string& folder) {
      synced_folder = folder;
      return Status::from_errno(folder, EIO);
    };
    auto w = AtomicFileWriter::create(dest, options);
    ASSERT_TRUE(w.ok()) << w.status().to_string();
    ASSERT_TRUE(w->append(bytes_of("new")).ok());
    const Status st = w->commit();
    EXPECT_EQ(st.code(), Status::Code::kIOError) << st.to_string();
    EXPECT_EQ(st.message(), dest + " was replaced, but fsync of its folder failed: " + dir.path() +
                                ": " + std::strerror(EIO) +
                                "; the replacement may not survive a power loss");
    EXPECT_EQ(synced_folder, dir.path());
    EXPECT_EQ(read_text(dest), "new");
    EXPECT_EQ(dir.list(), Names{"f"});
    write_text(dest, "old");
  }
}

TEST(AtomicFileWriter, DestinationThatIsAFolderIsAClearError) {
  ScratchDir dir;
  std::filesystem::create_directory(dir.file("sub"));
  const Status st = AtomicFileWriter::create(dir.file("sub")).status();
  EXPECT_TRUE(st.is_invalid_argument()) << st.to_string();
  EXPECT_THAT(st.message(), AllOf(HasSubstr(dir.file("sub")), HasSubstr("folder")));
  EXPECT_EQ(dir.list(), Names{"sub"});
}

TEST(AtomicFileWriter, MissingFolderIsNotFound) {
  ScratchDir dir;
  const std::string dest = dir.file("no/such/folder/out.bin");
  const Status st = AtomicFileWriter::create(dest).status();
  EXPECT_TRUE(st.is_not_found()) << st.to_string();
  EXPECT_THAT(st.message(), HasSubstr(dir.file("no/such/folder")));
  EXPECT_TRUE(AtomicFileWriter::create("").status().is_invalid_argument());
  const Status named = AtomicFileWriter::create(dest, kNamedTemporary).status();
  EXPECT_TRUE(named.is_not_found()) << named.to_string();
  EXPECT_THAT(named.message(), HasSubstr(dir.file("no/such/folder")));
}

// ---- File --------------------------------------------------------------------------------------

TEST(File, OpenReadOfAMissingPathIsNotFound) {
  ScratchDir dir;
  const Status st = File::open_read(dir.file("missing")).status();
  EXPECT_TRUE(st.is_not_found()) << st.to_string();
  EXPECT_THAT(st.message(), HasSubstr(dir.file("missing")));
}

TEST(File, ReadExactReadsTheRange) {
  ScratchDir dir;
  write_text(dir.file("r"), "0123456789");
  auto f = File::open_read(dir.file("r"));
  ASSERT_TRUE(f.ok());
  EXPECT_TRUE(f->is_open());
  EXPECT_EQ(f->path(), dir.file("r"));
  auto size = f->size();
  ASSERT_TRUE(size.ok());
  EXPECT_EQ(*size, 10u);
  std::vector<uint8_t> buf(4);
  ASSERT_TRUE(f->read_exact(3, buf).ok());
  EXPECT_EQ(std::string(buf.begin(), buf.end()), "3456");
  ASSERT_TRUE(f->read_exact(10, std::span<uint8_t>()).ok()) << "an empty read at the end is fine";
}

TEST(File, ReadExactPastTheEndIsCorruptionNamingPathAndOffset) {
  ScratchDir dir;
  write_text(dir.file("short"), "0123456789");
  auto f = File::open_read(dir.file("short"));
  ASSERT_TRUE(f.ok());
  std::vector<uint8_t> buf(8);
  const Status st = f->read_exact(6, buf);
  EXPECT_TRUE(st.is_corruption()) << st.to_string();
  EXPECT_THAT(st.message(),
              AllOf(HasSubstr(dir.file("short")), HasSubstr("offset 6"), HasSubstr("truncated")));
  EXPECT_TRUE(f->read_exact(100, buf).is_corruption());
}

TEST(File, IsSameFileComparesTheFilesNotThePaths) {
  ScratchDir dir;
  write_text(dir.file("a"), "first");
  auto first = File::open_read(dir.file("a"));
  auto again = File::open_read(dir.file("a"));
  ASSERT_TRUE(first.ok() && again.ok());
  Result<bool> same = first->is_same_file(*again);
  ASSERT_TRUE(same.ok()) << same.status().to_string();
  EXPECT_TRUE(*same);

  write_text(dir.file("b"), "second");
  ASSERT_EQ(::rename(dir.file("b").c_str(), dir.file("a").c_str()), 0);
  auto after_rename = File::open_read(dir.file("a"));
  ASSERT_TRUE(after_rename.ok());
  same = first->is_same_file(*after_rename);
  ASSERT_TRUE(same.ok()) << same.status().to_string();
  EXPECT_FALSE(*same) << "same path, different file";
}

TEST(File, MoveTransfersTheDescriptor) {
  ScratchDir dir;
  write_text(dir.file("m"), "x");
  auto f = File::open_read(dir.file("m"));
  ASSERT_TRUE(f.ok());
  const int fd = f->fd();
  File moved = std::move(*f);
  EXPECT_EQ(moved.fd(), fd);
  EXPECT_FALSE(f->is_open());
  File assigned;
  assigned = std::move(moved);
  EXPECT_EQ(assigned.fd(), fd);
  EXPECT_FALSE(moved.is_open());
}

// ---- MappedFile
// ----------------------------------------------------------------------------------

TEST(MappedFile, EmptyFileMapsToAnEmptySpan) {
  ScratchDir dir;
  write_text(dir.file("empty"), "");
  auto m = MappedFile::open(dir.file("empty"));
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  EXPECT_EQ(m->size(), 0u);
  EXPECT_TRUE(m->bytes().empty());
  EXPECT_EQ(m->path(), dir.file("empty"));
}

TEST(MappedFile, MapsTheBytesAndSurvivesAMove) {
  ScratchDir dir;
  write_text(dir.file("m"), "mapped bytes");
  auto m = MappedFile::open(dir.file("m"));
  ASSERT_TRUE(m.ok());
  const uint8_t* data = m->data();
  MappedFile moved = std::move(*m);
  EXPECT_EQ(moved.data(), data) << "the mapping does not move";
  EXPECT_EQ(std::string(moved.bytes().begin(), moved.bytes().end()), "mapped bytes");
  EXPECT_TRUE(m->bytes().empty());
}

// A file renamed over the path after it was opened does not change what map() shows.
TEST(MappedFile, MapShowsTheOpenFileNotWhatThePathNamesNow) {
  ScratchDir dir;
  write_text(dir.file("m"), "validated bytes");
  auto file = File::open_read(dir.file("m"));
  ASSERT_TRUE(file.ok());
  write_text(dir.file("other"), "someone else's bytes");
  ASSERT_EQ(::rename(dir.file("other").c_str(), dir.file("m").c_str()), 0);

  auto m = MappedFile::map(*file);
  ASSERT_TRUE(m.ok()) << m.status().to_string();
  EXPECT_EQ(std::string(m->bytes().begin(), m->bytes().end()), "validated bytes");
  EXPECT_EQ(m->path(), dir.file("m"));
  *file = File();  // the mapping outlives the descriptor
  EXPECT_EQ(std::string(m->bytes().begin(), m->bytes().end()), "validated bytes");
  auto by_path = MappedFile::open(dir.file("m"));
  ASSERT_TRUE(by_path.ok());
  EXPECT_EQ(std::string(by_path->bytes().begin(), by_path->bytes().end()), "someone else's bytes");
}

TEST(MappedFile, MissingFileIsNotFound) {
  ScratchDir dir;
  const Status st = MappedFile::open(dir.file("absent")).status();
  EXPECT_TRUE(st.is_not_found()) << st.to_string();
  EXPECT_THAT(st.message(), HasSubstr(dir.file("absent")));
}

}  // namespace
}  // namespace trove
