// In-place updates of a .trove store: each commit turns generation g into g + 1 by rewriting
// only what changed (record strides, their checksum entries, dense tensors, the manifest,
// trailer and header), through a redo journal beside the store so that a crash at any moment
// leaves either generation g or g + 1 (SPEC §4, §7). The journal's format and the recovery
// rules are specified in storage/FORMAT.md, "Generations".
//
// Usage (the trainer's write-back at a checkpoint):
//   TROVE_ASSIGN_OR_RETURN(StoreUpdate u, StoreUpdate::begin(path));
//   TROVE_RETURN_IF_ERROR(u.put_records("layers.19.peer", dirty_ids, dirty_strides));
//   TROVE_RETURN_IF_ERROR(u.put_dense("layers.19.peer", "keys", keys));
//   TROVE_RETURN_IF_ERROR(u.set_layer_info("layers.19.peer", info));
//   TROVE_ASSIGN_OR_RETURN(uint64_t generation, u.commit());
//
// commit() = write the journal, fsync it, fsync the folder (the commit point), write the
// changes into the store, truncate it to its new size, fsync it, remove the journal, fsync the
// folder. StoreReader::open replays a committed journal left by a crash before it reads the
// store (or fails, saying what to run, when it cannot write the store); recover_store does the
// same explicitly.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include <nlohmann/json.hpp>

#include "base/status.h"
#include "storage/store_lock.h"

namespace trove {

// How an update and its recovery change the file system: every call that writes, syncs,
// truncates, creates or removes goes through here (reads do not). The default runs the real
// syscalls; tests derive from it to crash at the N-th call and to drop what was not synced
// (CrashingStoreUpdateOps in tests/fault_injection.h). Calls come from one thread at a time.
class StoreUpdateOps {
 public:
  StoreUpdateOps() = default;
  virtual ~StoreUpdateOps() = default;
  StoreUpdateOps(const StoreUpdateOps&) = delete;
  StoreUpdateOps& operator=(const StoreUpdateOps&) = delete;

  // open(2): the descriptor, or -errno.
  virtual int open(const std::string& path, int flags, mode_t mode);
  // One pwrite(2): the bytes written (the caller continues a short write), or -errno.
  virtual int64_t write_at(int fd, const uint8_t* buf, size_t len, uint64_t offset);
  // ftruncate(2), fsync(2), unlink(2), and fsync of the folder `dir`: 0 or -errno.
  virtual int truncate(int fd, uint64_t size);
  virtual int sync(int fd);
  virtual int unlink(const std::string& path);
  virtual int sync_dir(const std::string& dir);
};

struct StoreUpdateOptions {
  // Null: the real syscalls.
  std::shared_ptr<StoreUpdateOps> ops;
  // The store's writer lock, held by the caller for longer than this update (a training run
  // that commits many generations). Null: the update takes the lock itself, from begin() until
  // commit() returns.
  const StoreLock* lock = nullptr;
  // The journal is written in pieces of at most this many bytes (>= 64).
  uint64_t journal_buffer_bytes = uint64_t{1} << 20;
};

// What one commit wrote.
struct StoreUpdateStats {
  uint64_t records = 0;        // record strides replaced
  uint64_t dense_tensors = 0;  // dense tensors replaced
  uint64_t writes = 0;         // extents in the journal (neighbouring changes share one)
  uint64_t journal_bytes = 0;  // the journal's size
  uint64_t applied_bytes = 0;  // bytes written into the store
  uint64_t file_size_before = 0;
  uint64_t file_size_after = 0;
};

// The journal of the store at `path`: "<path>.journal", beside the file `path` resolves to
// (symbolic links followed, so every name of the store finds the same journal).
std::string store_journal_path(const std::string& path);

// One new generation of an existing store, built up in memory and then committed. Move-only;
// one thread at a time.
// From begin() until commit() returns or the object is destroyed, it holds the store's writer
// lock (or uses the StoreLock in its options): a second writer fails at once ("busy"). The
// commit writes the store only once every reader pinned to generation g has closed
// (storage/store_lock.h); readers never see a torn or mixed generation.
//
// Bad input (an unknown layer or tensor, an id out of range or repeated, a wrong byte count)
// is a Status naming the layer, tensor, id and sizes; that call stages nothing, and the update
// stays usable. Until the journal is committed the store is untouched, and an update destroyed
// without commit() leaves it as it was.
//
// Readers opened before commit() pin generation g: the commit waits for those of other
// processes to close; those of this process have their generation replaced (their reads fail
// with Aborted, "reopen") since the commit cannot wait for its own process.
class StoreUpdate {
 public:
  StoreUpdate(StoreUpdate&&) noexcept;
  StoreUpdate& operator=(StoreUpdate&&) noexcept;
  StoreUpdate(const StoreUpdate&) = delete;
  StoreUpdate& operator=(const StoreUpdate&) = delete;
  ~StoreUpdate();

  // Opens the store read-write, takes its lock (Aborted, "retry", when another update holds
  // it), replays or removes a journal left by a crash, and validates the store as
  // StoreReader::open does.
  static Result<StoreUpdate> begin(const std::string& path, StoreUpdateOptions options = {});

  // Replaces records `ids` of `layer` with whole strides: `strides` holds ids.size() *
  // table.stride bytes, in the order of `ids`. Ids may come in any order but not twice in one
  // call; a later call for the same id replaces what an earlier one staged.
  Status put_records(const std::string& layer, std::span<const int64_t> ids,
                     std::span<const uint8_t> strides);
  // Replaces dense tensor `name` of `layer`; `values` has as many elements as it has.
  Status put_dense(const std::string& layer, const std::string& name,
                   std::span<const float> values);
  // Replace the layer's `info` and the store's provenance (limited in depth as StoreWriter's).
  Status set_layer_info(const std::string& layer, nlohmann::json info);
  Status set_provenance(nlohmann::json provenance);

  // Writes generation g + 1 and returns its number. Ends the update (every later call fails)
  // and releases the lock. An error before the commit point leaves generation g (the journal is
  // removed); an error after it (the message says so) leaves the committed journal for the next
  // StoreReader::open or recover_store to replay. Failing to remove the journal or to sync the
  // folder after the store itself is synced is logged, not returned: the generation is durable,
  // and a journal that comes back is replayed harmlessly.
  Result<uint64_t> commit();

  const std::string& path() const;
  // Generation g, the one this update starts from.
  uint64_t base_generation() const;
  // What the last commit() wrote (zeros before it).
  const StoreUpdateStats& stats() const;

 private:
  struct Impl;
  explicit StoreUpdate(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Brings the store at `path` to a whole generation after a crash. With no journal: OK. A
// journal that is incomplete or fails its checksum (a crash before the commit point) is removed
// and generation g stands; when a live writer holds the writer lock (an update in progress, a
// training run) the journal is its own and is left alone, without waiting. A committed journal
// whose target is this store, at generation g or already at g + 1 (possibly torn by an interrupted
// replay), is replayed (idempotent) and removed. Errors: a committed journal written for another
// store or generation (Corruption, naming both; both files are left as they are), one that needs
// write access this process lacks (naming the journal and what to run), I/O errors.
// StoreReader::open calls this first. A replay waits for the readers pinned to generation g
// (storage/store_lock.h).
Status recover_store(const std::string& path, StoreUpdateOptions options = {});

// For a reader that has pinned the store open at `fd` (found at `path`): whether a committed
// journal lies beside it that no live writer is applying, i.e. a writer crashed after its
// commit point and the bytes may be torn. The reader then unpins and runs recover_store.
Result<bool> store_needs_recovery(const std::string& path, int fd);

}  // namespace trove
