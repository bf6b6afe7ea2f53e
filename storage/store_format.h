// The .trove store's fixed-size on-disk structures and layout constants. storage/FORMAT.md is
// the prose specification; this header is its executable half (every offset in FORMAT.md's
// tables is a static_assert below). The API lives in storage/store.h.
//
// Byte order: every integer in the file is little-endian. trove builds only on little-endian
// hosts (static_assert below), so the structs are copied to and from disk with memcpy; the
// header's endian_check field lets a reader recognise a file written byte-swapped.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include <nlohmann/json.hpp>

#include "base/status.h"

namespace trove {

static_assert(std::endian::native == std::endian::little,
              "the .trove format is little-endian and trove copies its structs with memcpy");

// ---- layout constants -----------------------------------------------------------------------

inline constexpr uint64_t kStoreHeaderBytes = 4096;
inline constexpr uint64_t kStoreTrailerBytes = 64;
// Record tables and checksum arrays start at multiples of this (O_DIRECT-readable).
inline constexpr uint64_t kStoreTableAlignment = 4096;
inline constexpr uint64_t kStoreChecksumsAlignment = 4096;
// Dense tensors start at multiples of this (cache line; SIMD loads straight from a mapping).
inline constexpr uint64_t kStoreDenseAlignment = 64;
// Record strides are multiples of this.
inline constexpr uint64_t kStoreStrideAlignment = 64;

// "TROVE\0\r\n": the NUL stops C-string handling, CR LF catches text-mode newline mangling.
inline constexpr char kStoreMagic[8] = {'T', 'R', 'O', 'V', 'E', '\0', '\r', '\n'};
inline constexpr char kStoreTrailerMagic[8] = {'T', 'R', 'O', 'V', 'E', 'E', 'N', 'D'};
// Written as a little-endian u32: bytes 04 03 02 01. Read back byte-swapped on a file written
// by a big-endian writer.
inline constexpr uint32_t kStoreEndianCheck = 0x01020304u;

// ---- header: 4096 bytes at offset 0 ---------------------------------------------------------

#pragma pack(push, 1)
struct StoreHeader {
  char magic[8];             // kStoreMagic
  uint16_t version_major;    // kStoreVersionMajor
  uint16_t version_minor;    // kStoreVersionMinor
  uint32_t endian_check;     // kStoreEndianCheck
  uint64_t file_size;        // total bytes, trailer included
  uint64_t manifest_offset;  // absolute offset of the manifest JSON
  uint64_t manifest_bytes;   // its length
  uint64_t manifest_xxh3;    // XXH3-64 (seed 0) of the manifest bytes
  uint64_t generation;       // 1 for a freshly written store
  uint64_t flags;            // incompatible-feature bits; 0 in format 1.0
  uint64_t header_xxh3;      // XXH3-64 of the 64 bytes above
};
#pragma pack(pop)
// Bytes [sizeof(StoreHeader), kStoreHeaderBytes) are zero padding.

static_assert(sizeof(StoreHeader) == 72);
static_assert(offsetof(StoreHeader, magic) == 0);
static_assert(offsetof(StoreHeader, version_major) == 8);
static_assert(offsetof(StoreHeader, version_minor) == 10);
static_assert(offsetof(StoreHeader, endian_check) == 12);
static_assert(offsetof(StoreHeader, file_size) == 16);
static_assert(offsetof(StoreHeader, manifest_offset) == 24);
static_assert(offsetof(StoreHeader, manifest_bytes) == 32);
static_assert(offsetof(StoreHeader, manifest_xxh3) == 40);
static_assert(offsetof(StoreHeader, generation) == 48);
static_assert(offsetof(StoreHeader, flags) == 56);
static_assert(offsetof(StoreHeader, header_xxh3) == 64);

// ---- trailer: 64 bytes at file_size - 64 ----------------------------------------------------

#pragma pack(push, 1)
struct StoreTrailer {
  char magic[8];  // kStoreTrailerMagic
  uint16_t version_major;
  uint16_t version_minor;
  uint32_t endian_check;
  uint64_t file_size;
  uint64_t manifest_offset;
  uint64_t manifest_bytes;
  uint64_t manifest_xxh3;
  uint64_t generation;
  uint64_t trailer_xxh3;  // XXH3-64 of the 56 bytes above
};
#pragma pack(pop)

static_assert(sizeof(StoreTrailer) == kStoreTrailerBytes);
static_assert(offsetof(StoreTrailer, magic) == 0);
static_assert(offsetof(StoreTrailer, version_major) == 8);
static_assert(offsetof(StoreTrailer, version_minor) == 10);
static_assert(offsetof(StoreTrailer, endian_check) == 12);
static_assert(offsetof(StoreTrailer, file_size) == 16);
static_assert(offsetof(StoreTrailer, manifest_offset) == 24);
static_assert(offsetof(StoreTrailer, manifest_bytes) == 32);
static_assert(offsetof(StoreTrailer, manifest_xxh3) == 40);
static_assert(offsetof(StoreTrailer, generation) == 48);
static_assert(offsetof(StoreTrailer, trailer_xxh3) == 56);

// ---- update journal: <store path>.journal (see "Generations" in FORMAT.md) -------------------

// A generation's identity. The manifest lists every region with its checksum (record tables
// through their checksum arrays) and all padding is zero, so two valid files with the same
// identity hold the same bytes (up to XXH3 collisions).
struct StoreIdentity {
  uint64_t file_size = 0;
  uint64_t generation = 0;
  uint64_t manifest_xxh3 = 0;
  bool operator==(const StoreIdentity&) const = default;
};

inline constexpr char kStoreJournalMagic[8] = {'T', 'R', 'O', 'V', 'E', 'J', 'N', 'L'};
inline constexpr char kStoreJournalCommitMagic[8] = {'T', 'R', 'O', 'V', 'E', 'J', 'N', 'D'};
inline constexpr uint16_t kStoreJournalVersionMajor = 1;
inline constexpr uint16_t kStoreJournalVersionMinor = 0;

#pragma pack(push, 1)
// At journal offset 0.
struct StoreJournalHeader {
  char magic[8];  // kStoreJournalMagic
  uint16_t version_major;
  uint16_t version_minor;
  uint32_t endian_check;  // kStoreEndianCheck
  // Generation g, the store the writes apply to.
  uint64_t target_file_size;
  uint64_t target_generation;
  uint64_t target_manifest_xxh3;
  // Generation g + 1, the store they produce.
  uint64_t new_file_size;
  uint64_t new_generation;
  uint64_t new_manifest_xxh3;
  uint64_t write_count;  // StoreJournalWrite records that follow
};
// Each write: this, then `bytes` bytes to put at store offset `offset`. No padding.
struct StoreJournalWrite {
  uint64_t offset;
  uint64_t bytes;
};
// The last 32 bytes of a committed journal.
struct StoreJournalCommit {
  char magic[8];           // kStoreJournalCommitMagic
  uint64_t journal_bytes;  // the journal's length, this record included
  uint64_t write_count;    // equal to the header's
  uint64_t journal_xxh3;   // XXH3-64 of journal bytes [0, journal_bytes - 8)
};
#pragma pack(pop)

static_assert(sizeof(StoreJournalHeader) == 72);
static_assert(offsetof(StoreJournalHeader, magic) == 0);
static_assert(offsetof(StoreJournalHeader, version_major) == 8);
static_assert(offsetof(StoreJournalHeader, version_minor) == 10);
static_assert(offsetof(StoreJournalHeader, endian_check) == 12);
static_assert(offsetof(StoreJournalHeader, target_file_size) == 16);
static_assert(offsetof(StoreJournalHeader, target_generation) == 24);
static_assert(offsetof(StoreJournalHeader, target_manifest_xxh3) == 32);
static_assert(offsetof(StoreJournalHeader, new_file_size) == 40);
static_assert(offsetof(StoreJournalHeader, new_generation) == 48);
static_assert(offsetof(StoreJournalHeader, new_manifest_xxh3) == 56);
static_assert(offsetof(StoreJournalHeader, write_count) == 64);
static_assert(sizeof(StoreJournalWrite) == 16);
static_assert(offsetof(StoreJournalWrite, offset) == 0);
static_assert(offsetof(StoreJournalWrite, bytes) == 8);
static_assert(sizeof(StoreJournalCommit) == 32);
static_assert(offsetof(StoreJournalCommit, magic) == 0);
static_assert(offsetof(StoreJournalCommit, journal_bytes) == 8);
static_assert(offsetof(StoreJournalCommit, write_count) == 16);
static_assert(offsetof(StoreJournalCommit, journal_xxh3) == 24);

// ---- encoding -------------------------------------------------------------------------------

// The XXH3 a header or trailer must carry: over every byte before its checksum field.
uint64_t store_header_checksum(const StoreHeader& header);
uint64_t store_trailer_checksum(const StoreTrailer& trailer);

// A 1.0 header for these fields with header_xxh3 filled in (magic, version, endian set).
StoreHeader make_store_header(uint64_t file_size, uint64_t manifest_offset, uint64_t manifest_bytes,
                              uint64_t manifest_xxh3, uint64_t generation);
// The trailer matching `header`, trailer_xxh3 filled in.
StoreTrailer make_store_trailer(const StoreHeader& header);

// The full 4096-byte header block: `header` followed by zero padding.
void encode_store_header(const StoreHeader& header, std::span<uint8_t, kStoreHeaderBytes> out);
// Copies the struct out of the first sizeof(StoreHeader) bytes; checks nothing.
StoreHeader decode_store_header(std::span<const uint8_t> bytes);
void encode_store_trailer(const StoreTrailer& trailer, std::span<uint8_t, kStoreTrailerBytes> out);
StoreTrailer decode_store_trailer(std::span<const uint8_t> bytes);

// ---- manifest text ----------------------------------------------------------------------------

// The manifest's text form of `j` (indent 1, members sorted). Strings that are not valid UTF-8
// are written with U+FFFD in place of each bad byte sequence rather than failing a pack that may
// have run for an hour (see FORMAT.md); never throws.
std::string store_manifest_text(const nlohmann::json& j);

// Nesting levels around provenance and around a layer's info in the manifest:
// {"provenance": ...} and {"layers": [{"info": ...}]}.
inline constexpr int kStoreProvenanceLevels = 1;
inline constexpr int kStoreInfoLevels = 3;

// Refuses (invalid_argument, "<what> nests too deeply ...") a value that would make the manifest
// deeper than readers accept (kMaxJsonDepth) when nested `enclosing_levels` deep, so that no
// writer produces a store that StoreReader::open rejects.
Status check_store_json_depth(const nlohmann::json& j, int enclosing_levels,
                              const std::string& what);

// ---- messages ---------------------------------------------------------------------------------

// For printf's %llu: uint64_t is unsigned long on LP64 Linux, which %llu does not accept.
constexpr unsigned long long ull(uint64_t v) {
  return static_cast<unsigned long long>(v);
}

// ---- alignment and read amplification ---------------------------------------------------------

constexpr uint64_t store_align_down(uint64_t x, uint64_t a) {
  return x / a * a;
}
// REQUIRES: x + a - 1 does not overflow (offsets inside a validated file never come close).
constexpr uint64_t store_align_up(uint64_t x, uint64_t a) {
  return (x + a - 1) / a * a;
}

// The O_DIRECT extent [begin, end) that covers record bytes [offset, offset + bytes): whole
// kDirectAlignment blocks.
struct StoreDirectSpan {
  uint64_t begin = 0;
  uint64_t end = 0;
  uint64_t bytes() const { return end - begin; }
};
StoreDirectSpan store_direct_span(uint64_t offset, uint64_t bytes);

}  // namespace trove
