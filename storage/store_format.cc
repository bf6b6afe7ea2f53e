#include "storage/store_format.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "base/strings.h"
#include "storage/file.h"
#include "storage/store.h"

namespace trove {

uint64_t store_checksum(std::span<const uint8_t> bytes) {
  return XXH3_64bits(bytes.data(), bytes.size());
}

uint64_t store_header_checksum(const StoreHeader& header) {
  return XXH3_64bits(&header, offsetof(StoreHeader, header_xxh3));
}

uint64_t store_trailer_checksum(const StoreTrailer& trailer) {
  return XXH3_64bits(&trailer, offsetof(StoreTrailer, trailer_xxh3));
}

StoreHeader make_store_header(uint64_t file_size, uint64_t manifest_offset, uint64_t manifest_bytes,
                              uint64_t manifest_xxh3, uint64_t generation) {
  StoreHeader h;
  std::memset(&h, 0, sizeof(h));
  std::memcpy(h.magic, kStoreMagic, sizeof(h.magic));
  h.version_major = kStoreVersionMajor;
  h.version_minor = kStoreVersionMinor;
  h.endian_check = kStoreEndianCheck;
  h.file_size = file_size;
  h.manifest_offset = manifest_offset;
  h.manifest_bytes = manifest_bytes;
  h.manifest_xxh3 = manifest_xxh3;
  h.generation = generation;
  h.flags = 0;
  h.header_xxh3 = store_header_checksum(h);
  return h;
}

StoreTrailer make_store_trailer(const StoreHeader& header) {
  StoreTrailer t;
  std::memset(&t, 0, sizeof(t));
  std::memcpy(t.magic, kStoreTrailerMagic, sizeof(t.magic));
  t.version_major = header.version_major;
  t.version_minor = header.version_minor;
  t.endian_check = header.endian_check;
  t.file_size = header.file_size;
  t.manifest_offset = header.manifest_offset;
  t.manifest_bytes = header.manifest_bytes;
  t.manifest_xxh3 = header.manifest_xxh3;
  t.generation = header.generation;
  t.trailer_xxh3 = store_trailer_checksum(t);
  return t;
}

void encode_store_header(const StoreHeader& header, std::span<uint8_t, kStoreHeaderBytes> out) {
  std::fill(out.begin(), out.end(), uint8_t{0});
  std::memcpy(out.data(), &header, sizeof(header));
}

StoreHeader decode_store_header(std::span<const uint8_t> bytes) {
  TROVE_CHECK(bytes.size() >= sizeof(StoreHeader));
  StoreHeader h;
  std::memcpy(&h, bytes.data(), sizeof(h));
  return h;
}

void encode_store_trailer(const StoreTrailer& trailer, std::span<uint8_t, kStoreTrailerBytes> out) {
  std::memcpy(out.data(), &trailer, sizeof(trailer));
}

StoreTrailer decode_store_trailer(std::span<const uint8_t> bytes) {
  TROVE_CHECK(bytes.size() >= sizeof(StoreTrailer));
  StoreTrailer t;
  std::memcpy(&t, bytes.data(), sizeof(t));
  return t;
}

std::string store_manifest_text(const nlohmann::json& j) {
  return j.dump(1, ' ', false, nlohmann::json::error_handler_t::replace);
}

Status check_store_json_depth(const nlohmann::json& j, int enclosing_levels,
                              const std::string& what) {
  const int depth = enclosing_levels + json_nesting_depth(store_manifest_text(j));
  if (depth > kMaxJsonDepth) {
    return Status::invalid_argument(
        str_printf("%s nests too deeply: the manifest would be %d levels deep; readers accept %d",
                   what.c_str(), depth, kMaxJsonDepth));
  }
  return {};
}

StoreDirectSpan store_direct_span(uint64_t offset, uint64_t bytes) {
  return {store_align_down(offset, kDirectAlignment),
          store_align_up(offset + bytes, kDirectAlignment)};
}

}  // namespace trove
