// RecordReader: the disk tier's batched record reader. Reads a batch of records (each a byte
// extent of one store file with its expected XXH3-64) into caller memory with deep-queue
// io_uring (O_DIRECT, registered bounce buffers) or, where the kernel refuses io_uring, a pool
// of pread threads. Every record is verified before it reaches its destination.
//
// storage knows offsets and checksums, not tiers: runtime's T2 tier turns expert ids into
// RecordReads (offset = table.offset + id * stride, bytes = stride, xxh3 =
// StoreReader::record_checksum) and owns the destination memory.
//
// Threading. start() hands the batch to the reader's own I/O thread(s) and returns at once, so
// the caller computes (e.g. on resident experts) while reads are in flight; wait() blocks
// until every read has completed and been verified and copied:
//
//   caller      start(reads)─┐ returns           compute on resident experts ...   wait()──┐ OK
//   I/O thread               └─ queue QD reads ─┬─ reap: verify, copy to dest, refill ─ ...─┘ done
//   kernel/NVMe                                 └─ ████ ≤ queue_depth reads in flight ████
//
// io_uring engine: one I/O thread owns the ring; it keeps the submission queue full (each
// completion is verified, copied and its slot refilled, and each refill submitted at once), so
// the device sees a steady queue_depth. pread engine: pread_threads workers each take the next
// record, pread it into their own bounce buffer, verify and copy it.
//
// LevelDB's Env/fault_injection is the model for the FileOps seam: tests swap in
// FaultyFileOps (tests/fault_injection.h) to turn reads into EIO, EAGAIN, short reads,
// flipped bytes or a slow disk, for both engines.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "base/status.h"

namespace trove {

// One record to read.
struct RecordRead {
  int64_t id = 0;           // expert id, for error messages only
  uint64_t offset = 0;      // absolute file offset of the record (any alignment)
  uint32_t bytes = 0;       // record extent (the table stride), > 0
  uint8_t* dest = nullptr;  // where the record goes (any alignment); `bytes` writable bytes
  uint64_t xxh3 = 0;        // expected XXH3-64 (seed 0) of the extent, checked when verifying
};

// How the reader reaches the file. The default forwards to the real syscalls; tests derive
// from it to inject faults (tests/fault_injection.h). Methods may be called from several
// I/O threads at once.
class FileOps {
 public:
  FileOps() = default;
  virtual ~FileOps() = default;
  FileOps(const FileOps&) = delete;
  FileOps& operator=(const FileOps&) = delete;

  // pread engine: one pread(2) of up to `len` bytes at `offset` into `buf`. Returns the bytes
  // read (0 at end of file) or -errno.
  virtual int64_t read_at(int fd, uint8_t* buf, size_t len, uint64_t offset);

  // io_uring engine: sees every completion of a read of up to `len` bytes at `offset` into
  // `buf` before the reader does; returns the result the reader acts on (`res` itself by
  // default). May return a negative errno, a shorter positive count, alter buf[0, res) or
  // sleep (a slow disk: this delays the I/O thread, so completions are handled later).
  // REQUIRES of overrides: a positive return is at most `res`.
  virtual int on_complete(uint64_t offset, uint8_t* buf, size_t len, int res);

  // Consulted when a reader sets up io_uring: a negative errno makes the setup fail as if the
  // kernel refused it (ENOSYS, EPERM in containers), to test the fallback. 0: no fault.
  virtual int io_uring_setup_fault() { return 0; }
};

struct RecordReaderOptions {
  enum class Engine {
    kAuto,     // io_uring when the kernel allows it, else the pread pool (logged once)
    kIoUring,  // io_uring or an error from open()
    kPread,    // the pread pool
  };
  Engine engine = Engine::kAuto;
  // io_uring: submission queue depth = the most reads in flight at once (>= 1). The bounce
  // memory is about queue_depth * (largest aligned extent), capped by max_bounce_bytes.
  int queue_depth = 64;
  // io_uring: reads queued before one io_uring_enter hands them to the kernel, in [1,
  // queue_depth]. 1 (fio's default, iodepth_batch_submit=1): each read goes out as soon as it
  // is prepared, one syscall each. Larger values save syscalls (about 2 us of CPU per read)
  // but the kernel passes each group to the device at once (a block plug); on a virtio disk
  // that made every read wait for its group: at queue depth 16, 0.29 ms per read at the
  // device instead of 0.21, and 42K IOPS instead of fio's 52K.
  int submit_batch = 1;
  // pread: worker threads = the most reads in flight at once (>= 1).
  int pread_threads = 8;
  // Open with O_DIRECT and read each record as its enclosing extent aligned to the file's
  // direct-I/O alignment (RecordReader::direct_alignment()). Falls back to buffered reads of
  // the exact record bytes where the filesystem refuses O_DIRECT (tmpfs), with a debug log.
  bool direct_io = true;
  // The O_DIRECT alignment (offsets, lengths and buffers), in bytes. 0: the file's own, found
  // at open: statx(STATX_DIOALIGN) (Linux >= 6.1), else the logical block size of the device
  // holding the file (BLKSSZGET on its node, or sysfs), else 512 if a probe read at 512
  // succeeds, else kDirectAlignment. Otherwise a power of two in [512, 1 MiB] to use instead.
  // Whichever it is, a read the kernel refuses with EINVAL at an alignment below
  // kDirectAlignment switches the reader to kDirectAlignment for good (debug log) and is
  // reissued; bytes read at the smaller alignment before that were read correctly and stand.
  uint32_t direct_alignment = 0;
  // Check every record's XXH3-64 against RecordRead::xxh3 before copying it to dest.
  bool verify = true;
  // The io_uring engine keeps fewer than queue_depth reads in flight when queue_depth bounce
  // slots of the batch's largest extent would exceed this (at least one read is in flight).
  uint64_t max_bounce_bytes = uint64_t{64} << 20;
  // Test seam; null: the real syscalls.
  std::shared_ptr<FileOps> file_ops;
};

// Cumulative over the reader's life. IOPS, amplification and queue depth are derived below.
struct RecordReaderStats {
  uint64_t batches = 0;             // start() calls with at least one read
  uint64_t reads = 0;               // records delivered (verified and copied)
  uint64_t requests = 0;            // read requests issued (SQEs or preads), retries included
  uint64_t bytes_read = 0;          // bytes the file returned, aligned extents and retries included
  uint64_t bytes_useful = 0;        // record bytes delivered
  uint64_t eagain_retries = 0;      // requests reissued after EAGAIN or EINTR
  uint64_t short_read_retries = 0;  // requests reissued for the rest of a short read
  uint64_t checksum_failures = 0;
  uint64_t io_errors = 0;            // reads failed by the OS, truncation or a stalled short read
  uint64_t alignment_fallbacks = 0;  // reads refused (EINVAL) below kDirectAlignment, reissued
  uint64_t submit_calls = 0;         // io_uring_submit calls (one syscall each); 0 for pread
  uint32_t max_in_flight = 0;        // the most requests ever in flight at once
  double mean_in_flight = 0;         // requests in flight on average while busy (Little's law)
  double busy_seconds = 0;           // wall time from each start() to its last completion, summed
  double verify_seconds = 0;         // time spent computing checksums (the cost of verify)
  // Per request, from issue to completion (log-bucketed: within ~19%).
  double latency_p50_us = 0;
  double latency_p90_us = 0;
  double latency_p99_us = 0;

  double iops() const { return busy_seconds > 0 ? static_cast<double>(reads) / busy_seconds : 0; }
  // Bytes read per useful byte: >= 1 with O_DIRECT, where each record costs its extent aligned
  // to RecordReader::direct_alignment() (a 1152-byte record: 1536 bytes at 512, 4096 or 8192
  // at 4096); 1 when buffered.
  double read_amplification() const {
    return bytes_useful > 0 ? static_cast<double>(bytes_read) / static_cast<double>(bytes_useful)
                            : 0;
  }
};

// Reads records from one file, opened read-only. Not copyable; owns its descriptor, I/O
// thread(s), io_uring ring and (registered) bounce buffers, all released on destruction.
//
// One batch at a time: start(), then wait(). Methods are called from one thread at a time,
// except stats(), which may be called from any thread at any time.
class RecordReader {
 public:
  ~RecordReader();  // waits for a batch still in flight
  RecordReader(const RecordReader&) = delete;
  RecordReader& operator=(const RecordReader&) = delete;

  // Opens `path` read-only and sets up the engine. kIoUring where the kernel refuses io_uring
  // is Status::not_supported saying so; kAuto then uses the pread pool.
  static Result<std::unique_ptr<RecordReader>> open(const std::string& path,
                                                    RecordReaderOptions options = {});

  // Begins reading `reads` and returns without waiting for the disk. Requests are checked
  // first (bytes > 0, dest set, extent inside 64-bit offsets): a bad one is
  // Status::invalid_argument and nothing is started.
  // REQUIRES: no batch in flight (wait() returned since the last start()). `reads` and every
  // dest stay valid, and the caller leaves the dests alone, until wait() returns.
  Status start(std::span<const RecordRead> reads);

  // Blocks until every read of the batch has completed (or, after the first failure, every
  // read already issued has; the rest are not issued). Returns OK or the first error:
  //   "<path>: expert 1234 at offset 8192 (2304 bytes): Input/output error"   (IOError)
  //   "<path>: expert 1234 at offset 8192 (2304 bytes): checksum mismatch ..." (Corruption)
  //   "<path>: expert 1234 at offset 8192 (2304 bytes): truncated: ..."       (Corruption)
  // A dest is written only with its record's whole, verified bytes; on error the dests of
  // failed or unissued reads are left as they were. Nothing is ever zero-filled. Without a
  // batch in flight, returns OK at once.
  Status wait();

  // start() + wait().
  Status read(std::span<const RecordRead> reads);

  const std::string& path() const;
  // "io_uring" or "pread".
  const char* engine_name() const;
  // Whether the file is read with O_DIRECT (false where the filesystem refused it).
  bool direct_io() const;
  // The alignment O_DIRECT reads use now (RecordReaderOptions::direct_alignment): a power of
  // two, the file's own unless the kernel refused it (then kDirectAlignment); 0 when buffered.
  uint32_t direct_alignment() const;
  // Where direct_alignment() came from: "statx", "BLKSSZGET", "sysfs", "probe", "default"
  // (nothing answered: kDirectAlignment), "option" (RecordReaderOptions), "fallback" (the
  // kernel refused the smaller one) or "buffered".
  const char* direct_alignment_source() const;
  RecordReaderStats stats() const;

 private:
  struct Impl;
  explicit RecordReader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace trove
