// safetensors files (https://huggingface.co/docs/safetensors): an 8-byte little-endian
// header length N, N bytes of JSON {"name": {"dtype", "shape", "data_offsets": [b, e]}, ...,
// "__metadata__": {str: str}}, then the data. Offsets are relative to the data section.
//
// The reader maps the file and validates the header before handing out a single tensor, so a
// hostile file gives a Status, never a crash or a huge allocation:
//   - N at most kMaxHeaderBytes (100 MB, as the reference implementation) and within the file;
//   - the JSON parses, is an object, every entry has a known dtype, a shape of non-negative
//     integers whose element count times the dtype size does not overflow and equals e - b;
//   - 0 <= b <= e <= data size; tensors do not overlap;
//   - __metadata__ is an object of strings.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "base/dtype.h"
#include "base/status.h"
#include "storage/file.h"

namespace trove {

// The safetensors dtypes trove reads and writes. Others (F64, I64, ...) are reported by name
// in an error that says which tensor has them.
enum class StDType : uint8_t { kF32, kF16, kBF16, kI8, kU8, kI32, kI64 };

const char* st_dtype_name(StDType t);  // "F32", "F16", "BF16", "I8", "U8", "I32", "I64"
size_t st_dtype_size(StDType t);
bool st_dtype_is_float(StDType t);  // F32, F16, BF16
// The trove DType of a float safetensors dtype. REQUIRES: st_dtype_is_float(t).
DType st_float_dtype(StDType t);

struct StTensorView {
  std::string name;
  StDType dtype;
  std::vector<int64_t> shape;
  std::span<const uint8_t> bytes;  // points into the mapped file

  int64_t numel() const;
};

class SafetensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100u << 20;

  static Result<SafetensorsFile> open(const std::string& path);
  // Parses an in-memory image (tests, and files already read). The span must outlive the object.
  static Result<SafetensorsFile> parse(std::span<const uint8_t> image, std::string name);

  const std::string& path() const { return path_; }
  // Tensors in file order (by data offset).
  const std::vector<StTensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return image_.size(); }

  // nullptr when absent.
  const StTensorView* find(const std::string& name) const;

  // The tensor converted to fp32 (F32, F16, BF16 sources; other dtypes are an error naming
  // the tensor). Not found is Status::not_found naming the file and the tensor.
  Result<std::vector<float>> read_f32(const std::string& name) const;

 private:
  std::string path_;
  MappedFile map_;
  std::span<const uint8_t> image_;
  std::vector<StTensorView> tensors_;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, size_t> index_;
};

// One tensor to write: either `data` holds numel * st_dtype_size(dtype) bytes, little-endian,
// or `fill` produces them in consecutive chunks (for tensors too large to hold in memory):
// fill(offset, chunk) writes bytes [offset, offset + chunk.size()) of the tensor into chunk.
struct StTensorOut {
  std::string name;
  StDType dtype;
  std::vector<int64_t> shape;
  std::span<const uint8_t> data;
  std::function<Status(uint64_t offset, std::span<uint8_t> chunk)> fill;
};

// Converts rows [first, first + count) of a 2-D F32/F16/BF16 tensor (an expert table) to fp32
// into `out` ([count, row_len]), straight from the mapped file. Errors name the tensor.
Status read_rows_f32(const StTensorView& table, int64_t first, int64_t count, float* out);

// Writes a safetensors file atomically (AtomicFileWriter): header padded with spaces to a
// multiple of 8 bytes so the data section starts 8-byte aligned, then the tensors in the given
// order with no gaps between them (the reference reader rejects gaps and trailing bytes, so a
// tensor is aligned only as far as the sizes before it allow). Names must be unique and
// not "__metadata__"; data sizes must match shapes (Status::invalid_argument otherwise).
Status write_safetensors(const std::string& path, const std::vector<StTensorOut>& tensors,
                         const std::map<std::string, std::string>& metadata);

}  // namespace trove
