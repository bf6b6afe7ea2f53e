// Calibration: what this machine's memory and disk can do, measured the way the tiers use
// them, for `trove bench` to print next to trove's own figures (a benchmark reports its
// figure beside its physical limit).
//
//   host read bandwidth  the ceiling for work streaming over resident records (T1)
//   disk IOPS (ours)     RecordReader, the disk tier's reader, on random record-sized reads
//   disk IOPS (fio)      the same block size, queue depth and region read by fio, the raw
//                        disk's figure without trove in the way
//
// Comparing ours with fio: give both the same region, queue depth and requests. Under O_DIRECT
// our reader reads each record of B bytes as its enclosing extent aligned to the file's
// direct-I/O alignment A (DiskCalibration::direct_alignment: 512 on most disks, 4096 on 4Kn
// ones), one request per record. Whichever way the two are asked:
//
//   block = stride = a multiple of 4096   identical requests (one block each) for any A: the
//                                         fair comparison of the two engines, and the one to
//                                         judge "ours / fio" by
//   records of B at stride S              FioOptions{.alignment = A, .record_stride = S}: fio
//                                         reads the extent sizes our reader reads, in the same
//                                         proportions (--bssplit), at offsets aligned alike
//   the old form (bool direct)            fio reads B rounded up to 4096: the same request
//                                         count but not the same bytes once A < 4096 or
//                                         records straddle pages
//
// Both report requests per second; DiskCalibration::read_amplification says how many bytes
// ours moved per record byte.
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"
#include "storage/file.h"
#include "storage/record_io.h"

namespace trove {

// Bytes per second of a streaming read (a sum of 64-bit words, vectorized) over `bytes` of
// host memory by `threads` threads (0: every core), each summing a contiguous slice. The
// buffer is allocated and written once before timing (pages are faulted in on the threads
// that read them); then whole passes are timed until at least `min_seconds` have passed (and
// at least two passes ran), and the best pass counts. Use a buffer several times the last
// level cache, or this measures the cache. Errors: invalid_argument for bytes < 4096,
// threads < 0 or a negative/non-finite min_seconds; resource_exhausted when the buffer
// cannot be allocated.
Result<double> measure_host_read_bandwidth(uint64_t bytes, int threads, double min_seconds);

// Bytes per second of reading whole records at random host addresses, as the CPU expert stage
// reads them, and nothing else: its ceiling, where measure_host_read_bandwidth is the memory's.
// A table of `records` records `stride` bytes apart (allocate_host_block's memory, huge pages
// advised, written once), `picks` uniformly random record indices
// (a fixed seed) split over `threads` (0: every core); each thread sums its records' lines in
// pick order while it prefetches the record two picks ahead a few lines at a time between its
// own reads (a record's lines prefetched in one burst stall the core on its fill buffers). Whole
// passes are timed until `min_seconds` have passed (at least two), the best counting; bytes are
// picks * stride, repeats included. Errors: invalid_argument for a stride that is not a positive
// multiple of 64, records or picks < 1, threads < 0 or a negative/non-finite min_seconds;
// resource_exhausted when the table cannot be allocated.
Result<double> measure_host_record_read_bandwidth(uint64_t stride, uint64_t records, uint64_t picks,
                                                  int threads, double min_seconds);

// Bytes per second of host -> device copies on the current CUDA device: `bytes` of pinned host
// memory copied to device memory by one cudaMemcpyAsync per pass, timed by CUDA events, passes
// until `min_seconds` have passed (at least two), the best counting. The ceiling for the device
// tier's misses (SPEC §8: H2D bandwidth). Errors: invalid_argument as for
// measure_host_read_bandwidth; kNotSupported without a device or without CUDA in the build;
// a failed pin is an error here (a pageable figure is not the limit).
Result<double> measure_h2d_bandwidth(uint64_t bytes, double min_seconds);

// The same ceiling for an SM-driven gather (the --h2d gather method): records of
// `record_bytes` in `bytes` of pinned, mapped host memory, all of them per pass in a shuffled
// order, moved into device memory by one CudaCopyStream::gather_async kernel, timed by events.
// Each record moves as the tiers move it: its 16-byte-aligned stride, 16 bytes per load;
// passes until `min_seconds` (at least two), the best counting. Errors: as for
// measure_h2d_bandwidth; record_bytes 0 or above bytes / 2 is invalid_argument.
Result<double> measure_h2d_gather_bandwidth(uint64_t bytes, uint64_t record_bytes,
                                            double min_seconds);

// Bytes per second of device memory (HBM) on the current CUDA device: one device-to-device
// cudaMemcpyAsync of `bytes` between two device buffers per pass, timed by CUDA events, passes
// until `min_seconds` have passed (at least two), the best counting. A copy reads `bytes` and
// writes `bytes`, and both count (2 * bytes per pass, as CUDA's bandwidthTest counts), so the
// figure is comparable with kernels' read + write traffic (SPEC §8: H100 HBM3 3.35 TB/s).
// Use buffers far past the L2 (hundreds of MiB). Errors: invalid_argument as for
// measure_host_read_bandwidth; kNotSupported without a device or without CUDA in the build;
// kResourceExhausted when the 2 * bytes do not fit the device.
Result<double> measure_hbm_bandwidth(uint64_t bytes, double min_seconds);

// Bytes per second of a durable sequential write in folder `dir`: `bytes` written to a new
// temporary file (".trove-write-calibration-<pid>") in 1 MiB pieces, fdatasync'd, timed from
// the first write to the sync's return; the file is removed. The ceiling for checkpoints that
// write changed records back (trove train). Errors: invalid_argument for bytes < 1 MiB;
// the folder's I/O errors, naming it.
Result<double> measure_disk_write_bandwidth(const std::string& dir, uint64_t bytes);

struct DiskCalibration {
  double iops = 0;                // records delivered per second of wall time
  double mb_per_s = 0;            // record bytes delivered per second, in 10^6 bytes
  double latency_p50_us = 0;      // per request, issue to completion (from the reader's
  double latency_p99_us = 0;      //   log-bucketed histogram: approximate)
  std::string engine;             // "io_uring" or "pread" (what kAuto chose)
  bool direct_io = false;         // O_DIRECT; false where the filesystem refused it (tmpfs): then
                                  // the page cache answered and the figures are not the disk's
  uint64_t reads = 0;             // records read
  double seconds = 0;             // wall time measured
  int queue_depth = 0;            // asked for (io_uring SQ depth, or pread threads)
  uint32_t max_in_flight = 0;     // reached (the io_uring engine caps it by its bounce memory)
  double mean_in_flight = 0;      // while busy (Little's law)
  double read_amplification = 0;  // bytes the device returned per record byte (>= 1)
  uint32_t direct_alignment = 0;  // the O_DIRECT alignment the reader used (0 when buffered)
  std::string alignment_source;   // where it came from (RecordReader::direct_alignment_source)
  size_t batch_reads = 0;         // reads per RecordReader batch
};

// Random-read IOPS of trove's RecordReader (verify off, direct_io on) on `path`: records of
// `block_bytes` at offsets region_offset + k * stride, k uniform over the records that fit in
// [region_offset, region_offset + region_bytes) (as expert ids index a table), with
// `queue_depth` reads in flight (the io_uring queue depth, or that many pread threads), for
// about `seconds`, at the file's own O_DIRECT alignment. Reads go in batches of 256 x
// queue_depth records (at least 1024; destinations capped at 64 MiB), and the next batch is
// drawn while one is in flight, so the device sees a steady queue but for the drain at each
// batch's end (under 1% of the time where the cap does not bite). The last batch runs to its
// end, so a measurement may last up to one batch longer than `seconds`.
// Seeded: the same arguments read the same offsets. Errors: not_found naming a missing path;
// invalid_argument for a region outside the file or too small for one block, block_bytes 0
// or over 1 GiB, stride 0, queue_depth < 1, seconds <= 0 or over a day; not_supported for
// kIoUring where the kernel refuses io_uring; the reader's I/O errors.
Result<DiskCalibration> measure_disk_iops(const std::string& path, uint64_t region_offset,
                                          uint64_t region_bytes, uint32_t block_bytes,
                                          uint64_t stride, int queue_depth,
                                          RecordReaderOptions::Engine engine, double seconds);

struct FioResult {
  double iops = 0;
  double bw_mb_per_s = 0;    // 10^6 bytes per second
  double clat_p50_us = 0;    // completion latency percentiles as fio reports them: from
  double clat_p99_us = 0;    //   submission to completion, so a little below our issue-to-
                             //   completion latencies for the same device time
  uint64_t ios = 0;          // reads fio completed
  double seconds = 0;        // fio's runtime
  std::string engine;        // "io_uring", "libaio" or "psync" (psync: one read at a time
                             // whatever queue_depth says)
  uint32_t block_bytes = 0;  // what fio read (rounded up to the alignment when direct); the
                             // smallest size of a mix
  std::string block_split;   // the mix of sizes when there is one: fio's --bssplit value
  uint64_t offset = 0;       // the region fio read (aligned inward when direct)
  uint64_t size = 0;
  std::string command_line;  // the exact command, shell-quoted, for reports
};

// How run_fio_randread shapes its requests.
struct FioOptions {
  bool direct = true;  // --direct=1
  // When direct: fio's block sizes are rounded up to this and its offsets are multiples of it.
  // A power of two >= 512; pass DiskCalibration::direct_alignment to match our reader.
  uint32_t alignment = static_cast<uint32_t>(kDirectAlignment);
  // When direct and > 0: the region holds records of block_bytes at this stride from
  // region_offset, and fio reads what RecordReader reads for them: each record's extent
  // aligned to `alignment` (--bs, or --bssplit in whole percents where records straddle
  // alignment boundaries), at offsets aligned as those extents' are (--blockalign where that
  // is not fio's default, the smallest block). 1152-byte records at 4096: "4096/75:8192/25";
  // at 512: --bs=1536 --blockalign=512; 4096 at 4096 for any alignment: --bs=4096, the old
  // command. 0: block_bytes rounded up to the alignment.
  uint64_t record_stride = 0;
};

// Runs `fio` (found on PATH) for a random-read job on the region: --readonly --rw=randread
// --bs (or --bssplit) [--blockalign] --iodepth --direct --offset --size --time_based
// --runtime --numjobs=1 --output-format=json, with ioengine io_uring, falling back to libaio
// and then psync when fio fails with one (not built in, refused by the kernel). When direct,
// the region is narrowed inward to the alignment. fio runs without a shell (posix_spawn), in
// its own process group, which is killed if it overruns `seconds` by more than a minute.
// Errors: not_found "fio not found on PATH: ..." when there is none, not_found naming a
// missing path, invalid_argument as for measure_disk_iops (and for a region with no aligned
// block when direct, or an alignment that is no power of two >= 512), io_error naming the
// command and the tail of fio's stderr when every engine failed or its output is not the JSON
// expected.
Result<FioResult> run_fio_randread(const std::string& path, uint64_t region_offset,
                                   uint64_t region_bytes, uint32_t block_bytes, int queue_depth,
                                   const FioOptions& options, double seconds);

// The same with FioOptions{.direct = direct}: blocks of block_bytes rounded up to 4096.
Result<FioResult> run_fio_randread(const std::string& path, uint64_t region_offset,
                                   uint64_t region_bytes, uint32_t block_bytes, int queue_depth,
                                   bool direct, double seconds);

}  // namespace trove
