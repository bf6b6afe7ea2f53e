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
