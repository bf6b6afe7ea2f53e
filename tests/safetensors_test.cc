// safetensors: round trips through the writer and reader, the writer's output checked by hand
// against the format, and one hostile file per validation rule (each asserting the code and
// that the message names the offending tensor or field), plus a seeded mutation fuzz loop.
#include "storage/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>

#include "base/half.h"
#include "base/strings.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

using testing::ScratchDir;

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

template <typename T>
std::vector<uint8_t> as_bytes(const std::vector<T>& v) {
  std::vector<uint8_t> out(v.size() * sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// An image: 8-byte LE length, the header text as given (no padding), then `data`.
std::vector<uint8_t> make_image(const std::string& header, const std::vector<uint8_t>& data = {}) {
  // Sized up front: GCC 12 warns (falsely, -Warray-bounds) on vector::insert here.
  std::vector<uint8_t> out(8 + header.size() + data.size());
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  if (!header.empty()) std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

Status parse_status(const std::vector<uint8_t>& image) {
  return SafetensorsFile::parse(image, "hostile.safetensors").status();
}

// The tensors every round-trip test writes: every dtype, a scalar, zero-sized tensors and
// sizes that leave later tensors unaligned.
struct Sample {
  std::vector<float> f32 = {1.5f, -2.25f, 0.0f, 3e-8f, 65504.0f, -1e30f};
  std::vector<uint16_t> f16 = {fp32_to_fp16(1.0f), fp32_to_fp16(-0.5f), fp32_to_fp16(1e-6f),
                               fp32_to_fp16(65504.0f), fp32_to_fp16(-3.0f)};
  std::vector<uint16_t> bf16 = {fp32_to_bf16(3.0f), fp32_to_bf16(-1e20f), fp32_to_bf16(0.1f)};
  std::vector<int8_t> i8 = {-128, -1, 0, 1, 2, 3, 127};
  std::vector<uint8_t> u8 = {200};
  std::vector<int32_t> i32 = {};
  std::vector<int64_t> i64 = {-(int64_t{1} << 40), 7};
  std::vector<uint8_t> b_f32 = as_bytes(f32), b_f16 = as_bytes(f16), b_bf16 = as_bytes(bf16),
                       b_i8 = as_bytes(i8), b_u8 = u8, b_i32 = as_bytes(i32), b_i64 = as_bytes(i64);

  std::vector<StTensorOut> tensors() const {
    // Deliberately not in name order: the file keeps this order.
    return {
        {"model.w_f32", StDType::kF32, {2, 3}, b_f32, nullptr},
        {"f16", StDType::kF16, {5}, b_f16, nullptr},
        {"bf16.col", StDType::kBF16, {3, 1}, b_bf16, nullptr},
        {"i8", StDType::kI8, {7}, b_i8, nullptr},
        {"scalar_u8", StDType::kU8, {}, b_u8, nullptr},
        {"empty_i32", StDType::kI32, {0, 4}, b_i32, nullptr},
        {"i64", StDType::kI64, {2}, b_i64, nullptr},
        {"empty_f32", StDType::kF32, {3, 0, 2}, {}, nullptr},
    };
  }
  std::map<std::string, std::string> metadata() const {
    return {{"format", "pt"}, {"trove.config", "{\"dim\": 64}"}, {"empty", ""}};
  }
};

// ---- round trips ----------------------------------------------------------------------------

TEST(SafetensorsRoundTrip, EveryDtypeScalarEmptyAndMetadataSurvive) {
  ScratchDir dir;
  const Sample s;
  const std::string path = dir.file("rt.safetensors");
  ASSERT_TRUE(write_safetensors(path, s.tensors(), s.metadata()).ok());

  auto file = SafetensorsFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status().to_string();
  EXPECT_EQ(file->path(), path);
  EXPECT_EQ(file->metadata(), s.metadata());
  const auto expected = s.tensors();
  ASSERT_EQ(file->tensors().size(), expected.size());
  // tensors() is in data order, which is the order given to the writer.
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_EQ(file->tensors()[i].name, expected[i].name);
  for (const StTensorOut& want : expected) {
    const StTensorView* got = file->find(want.name);
    ASSERT_NE(got, nullptr) << want.name;
    EXPECT_EQ(got->dtype, want.dtype) << want.name;
    EXPECT_EQ(got->shape, want.shape) << want.name;
    EXPECT_TRUE(
        std::equal(got->bytes.begin(), got->bytes.end(), want.data.begin(), want.data.end()))
        << want.name;
  }
  EXPECT_EQ(file->find("scalar_u8")->numel(), 1);
  EXPECT_EQ(file->find("empty_i32")->numel(), 0);
  EXPECT_EQ(file->find("model.w_f32")->numel(), 6);
  EXPECT_EQ(file->find("absent"), nullptr);
  EXPECT_EQ(file->file_size(), std::filesystem::file_size(path));
}

TEST(SafetensorsRoundTrip, ReadF32ConvertsFloatDtypes) {
  ScratchDir dir;
  const Sample s;
  const std::string path = dir.file("f.safetensors");
  ASSERT_TRUE(write_safetensors(path, s.tensors(), {}).ok());
  auto file = SafetensorsFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status().to_string();
  EXPECT_TRUE(file->metadata().empty());

  auto f32 = file->read_f32("model.w_f32");
  ASSERT_TRUE(f32.ok());
  EXPECT_EQ(*f32, s.f32);
  auto f16 = file->read_f32("f16");
  ASSERT_TRUE(f16.ok());
  ASSERT_EQ(f16->size(), s.f16.size());
  for (size_t i = 0; i < s.f16.size(); ++i) EXPECT_EQ((*f16)[i], fp16_to_fp32(s.f16[i]));
  EXPECT_EQ((*f16)[0], 1.0f);
  EXPECT_EQ((*f16)[3], 65504.0f);
  auto bf16 = file->read_f32("bf16.col");
  ASSERT_TRUE(bf16.ok());
  EXPECT_EQ((*bf16)[0], 3.0f);
  EXPECT_EQ((*bf16)[2], bf16_to_fp32(fp32_to_bf16(0.1f)));
  auto empty = file->read_f32("empty_f32");
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());

  const Status not_float = file->read_f32("i8").status();
  EXPECT_TRUE(not_float.is_invalid_argument());
  EXPECT_THAT(not_float.message(), AllOf(HasSubstr("'i8'"), HasSubstr("I8")));
  const Status missing = file->read_f32("nope").status();
  EXPECT_TRUE(missing.is_not_found());
  EXPECT_THAT(missing.message(), AllOf(HasSubstr(path), HasSubstr("'nope'")));
}

// A 1 TiB I8 tensor (a sparse file, mapped, never read): read_f32 refuses the dtype before
// it would allocate 4 TiB of floats (which threw std::bad_alloc, or under ASan aborted).
TEST(SafetensorsRoundTrip, ReadF32RefusesOtherDtypesBeforeAllocating) {
  ScratchDir dir;
  const std::string path = dir.file("huge_i8.safetensors");
  const uint64_t n = uint64_t{1} << 40;
  std::string header =
      str_printf(R"({"w": {"dtype": "I8", "shape": [%llu], "data_offsets": [0, %llu]}})",
                 static_cast<unsigned long long>(n), static_cast<unsigned long long>(n));
  header.append((8 - header.size() % 8) % 8, ' ');
  const std::vector<uint8_t> image = make_image(header);  // the data is the sparse tail
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(image.data()),
             static_cast<std::streamsize>(image.size()));
  if (::truncate(path.c_str(), static_cast<off_t>(8 + header.size() + n)) != 0) {
    GTEST_SKIP() << "the temporary folder's filesystem cannot hold a 1 TiB sparse file";
  }
  auto file = SafetensorsFile::open(path);
  ASSERT_TRUE(file.ok()) << file.status().to_string();
  ASSERT_EQ(file->find("w")->bytes.size(), n);
  const Status st = file->read_f32("w").status();
  EXPECT_TRUE(st.is_invalid_argument()) << st.to_string();
  EXPECT_THAT(st.message(), AllOf(HasSubstr(path), HasSubstr("tensor 'w' is I8")));
}

TEST(SafetensorsRoundTrip, FillCallbackWritesTheSameBytesAsData) {
  ScratchDir dir;
  const Sample s;
  // A tensor larger than one fill chunk (4 MiB) and not a multiple of it.
  std::vector<float> big(1048579 + 3);
  std::mt19937 rng(7);
  for (float& v : big) v = std::uniform_real_distribution<float>(-1, 1)(rng);
  const std::vector<uint8_t> big_bytes = as_bytes(big);

  std::vector<StTensorOut> with_data = s.tensors();
  with_data.push_back({"big", StDType::kF32, {static_cast<int64_t>(big.size())}, big_bytes, {}});
  ASSERT_TRUE(write_safetensors(dir.file("data.st"), with_data, s.metadata()).ok());

  std::vector<StTensorOut> with_fill = with_data;
  std::vector<std::pair<std::string, uint64_t>> calls;
  uint64_t max_chunk = 0;
  for (StTensorOut& t : with_fill) {
    const std::span<const uint8_t> src = t.data;
    const std::string name = t.name;
    t.data = {};
    t.fill = [src, name, &calls, &max_chunk](uint64_t offset, std::span<uint8_t> chunk) {
      calls.emplace_back(name, offset);
      max_chunk = std::max<uint64_t>(max_chunk, chunk.size());
      if (offset + chunk.size() > src.size()) return Status::out_of_range("fill past the end");
      std::memcpy(chunk.data(), src.data() + offset, chunk.size());
      return Status();
    };
  }
  ASSERT_TRUE(write_safetensors(dir.file("fill.st"), with_fill, s.metadata()).ok());
  EXPECT_EQ(read_all(dir.file("data.st")), read_all(dir.file("fill.st")));

  // Chunks are consecutive and bounded; empty tensors are never asked for bytes.
  std::vector<uint64_t> big_offsets;
  for (const auto& [name, offset] : calls) {
    EXPECT_NE(name, "empty_i32");
    EXPECT_NE(name, "empty_f32");
    if (name == "big") big_offsets.push_back(offset);
  }
  EXPECT_EQ(big_offsets, (std::vector<uint64_t>{0, 4u << 20}));
  EXPECT_LE(max_chunk, uint64_t{4} << 20);
}

TEST(SafetensorsRoundTrip, WritingTwiceGivesIdenticalBytes) {
  ScratchDir dir;
  const Sample s;
  ASSERT_TRUE(write_safetensors(dir.file("a"), s.tensors(), s.metadata()).ok());
  ASSERT_TRUE(write_safetensors(dir.file("b"), s.tensors(), s.metadata()).ok());
  EXPECT_EQ(read_all(dir.file("a")), read_all(dir.file("b")));
}

TEST(SafetensorsRoundTrip, EmptyFileListIsValid) {
  ScratchDir dir;
  ASSERT_TRUE(write_safetensors(dir.file("e"), {}, {}).ok());
  auto file = SafetensorsFile::open(dir.file("e"));
  ASSERT_TRUE(file.ok()) << file.status().to_string();
  EXPECT_TRUE(file->tensors().empty());
}

// The writer's output checked against the format by hand, without our reader: 8-byte LE
// length, space-padded JSON, offsets contiguous from 0 to the end of the file (the reference
// reader rejects gaps and trailing bytes).
TEST(SafetensorsFormat, WriterOutputFollowsTheReferenceLayout) {
  ScratchDir dir;
  const Sample s;
  const std::string path = dir.file("std.safetensors");
  ASSERT_TRUE(write_safetensors(path, s.tensors(), s.metadata()).ok());
  const std::vector<uint8_t> bytes = read_all(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<size_t>(i)];
  ASSERT_LE(8 + n, bytes.size());
  EXPECT_EQ((8 + n) % 8, 0u) << "data section must start 8-byte aligned";
  const std::string text(bytes.begin() + 8, bytes.begin() + 8 + static_cast<ptrdiff_t>(n));
  ASSERT_EQ(text.front(), '{');
  const size_t close = text.rfind('}');
  ASSERT_NE(close, std::string::npos);
  EXPECT_LT(text.size() - close - 1, 8u);
  for (size_t i = close + 1; i < text.size(); ++i) EXPECT_EQ(text[i], ' ') << "padding byte " << i;

  const nlohmann::json header = nlohmann::json::parse(text);
  ASSERT_TRUE(header.is_object());
  ASSERT_TRUE(header.contains("__metadata__"));
  EXPECT_EQ(header["__metadata__"]["format"], "pt");
  EXPECT_EQ(header["__metadata__"]["trove.config"], "{\"dim\": 64}");

  const uint64_t data_start = 8 + n;
  uint64_t expected_begin = 0;
  for (const StTensorOut& t : s.tensors()) {  // given order = data order
    ASSERT_TRUE(header.contains(t.name)) << t.name;
    const auto& e = header[t.name];
    EXPECT_EQ(e["dtype"].get<std::string>(), st_dtype_name(t.dtype)) << t.name;
    EXPECT_EQ(e["shape"].get<std::vector<int64_t>>(), t.shape) << t.name;
    const auto offsets = e["data_offsets"].get<std::vector<uint64_t>>();
    ASSERT_EQ(offsets.size(), 2u);
    EXPECT_EQ(offsets[0], expected_begin) << t.name;
    EXPECT_EQ(offsets[1] - offsets[0], t.data.size()) << t.name;
    EXPECT_TRUE(std::equal(t.data.begin(), t.data.end(),
                           bytes.begin() + static_cast<ptrdiff_t>(data_start + offsets[0])))
        << t.name;
    expected_begin = offsets[1];
  }
  EXPECT_EQ(data_start + expected_begin, bytes.size()) << "no trailing bytes";
  EXPECT_EQ(header.size(), s.tensors().size() + 1);
}

// ---- writer argument checks ------------------------------------------------------------------

TEST(SafetensorsWriter, RejectsBadArgumentsWithoutCreatingTheFile) {
  ScratchDir dir;
  const std::string path = dir.file("bad.safetensors");
  const std::vector<uint8_t> eight(8);
  const auto fill = [](uint64_t, std::span<uint8_t>) { return Status(); };
  struct Case {
    std::vector<StTensorOut> tensors;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {{{"w", StDType::kF32, {2}, eight, {}}, {"w", StDType::kF32, {2}, eight, {}}}, "'w'"},
      {{{"__metadata__", StDType::kU8, {8}, eight, {}}}, "__metadata__"},
      {{{"short", StDType::kF32, {3}, eight, {}}}, "'short'"},
      {{{"neg", StDType::kU8, {-8}, eight, {}}}, "'neg'"},
      {{{"both", StDType::kU8, {8}, eight, fill}}, "'both'"},
      {{{"huge", StDType::kI64, {int64_t{1} << 62, 4}, {}, fill}}, "'huge'"},
  };
  for (const Case& c : cases) {
    const Status st = write_safetensors(path, c.tensors, {});
    EXPECT_TRUE(st.is_invalid_argument()) << st.to_string();
    EXPECT_THAT(st.message(), HasSubstr(c.needle));
    EXPECT_FALSE(std::filesystem::exists(path));
  }
}

TEST(SafetensorsWriter, FillErrorAbandonsTheFile) {
  ScratchDir dir;
  const std::string path = dir.file("f.safetensors");
  std::vector<StTensorOut> tensors = {
      {"t", StDType::kU8, {16}, {}, [](uint64_t, std::span<uint8_t>) {
         return Status::io_error("disk on fire");
       }}};
  const Status st = write_safetensors(path, tensors, {});
  EXPECT_TRUE(st.is_io_error());
  EXPECT_THAT(st.message(), AllOf(HasSubstr("'t'"), HasSubstr("disk on fire")));
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(SafetensorsWriter, InvalidUtf8NameIsAnError) {
  ScratchDir dir;
  const std::vector<uint8_t> one(1);
  const Status st = write_safetensors(dir.file("u"), {{"bad\xff", StDType::kU8, {1}, one, {}}}, {});
  EXPECT_TRUE(st.is_invalid_argument()) << st.to_string();
}

// ---- hostile files ----------------------------------------------------------------------------

void expect_corrupt(const std::vector<uint8_t>& image, const std::vector<std::string>& needles,
                    Status::Code code = Status::Code::kCorruption) {
  const Status st = parse_status(image);
  EXPECT_EQ(st.code(), code) << st.to_string();
  EXPECT_THAT(st.message(), HasSubstr("hostile.safetensors"));
  for (const std::string& needle : needles) EXPECT_THAT(st.message(), HasSubstr(needle));
}

std::vector<uint8_t> valid_image() {
  ScratchDir dir;
  const Sample s;
  TROVE_CHECK(write_safetensors(dir.file("v"), s.tensors(), s.metadata()).ok());
  return read_all(dir.file("v"));
}

TEST(SafetensorsHostile, FileShorterThanTheLengthField) {
  expect_corrupt({}, {"8-byte"});
  expect_corrupt({1, 2, 3, 4, 5}, {"5 bytes", "8-byte"});
}

TEST(SafetensorsHostile, HeaderCut) {
  const std::vector<uint8_t> image = valid_image();
  const std::vector<uint8_t> cut(image.begin(), image.begin() + 40);
  expect_corrupt(cut, {"absurd header length", "truncated"});
}

TEST(SafetensorsHostile, DataCut) {
  ScratchDir dir;
  const std::vector<uint8_t> a(16), b(3);
  ASSERT_TRUE(write_safetensors(dir.file("v"),
                                {{"a", StDType::kF32, {4}, a, {}}, {"b", StDType::kU8, {3}, b, {}}},
                                {})
                  .ok());
  std::vector<uint8_t> image = read_all(dir.file("v"));
  image = std::vector<uint8_t>(image.begin(), image.end() - 2);
  expect_corrupt(image, {"tensor 'b'", "data_offsets [16, 19]", "truncated"});
}

TEST(SafetensorsHostile, AbsurdHeaderLength) {
  std::vector<uint8_t> image = make_image("{}");
  const uint64_t huge = uint64_t{1} << 63;
  std::memcpy(image.data(), &huge, 8);
  expect_corrupt(image, {"absurd header length 9223372036854775808"});
  const uint64_t just_past = 3;  // "{}" is 2 bytes
  std::memcpy(image.data(), &just_past, 8);
  expect_corrupt(image, {"absurd header length 3", "only 2 bytes"});
  const uint64_t over_limit = SafetensorsFile::kMaxHeaderBytes + 1;
  std::memcpy(image.data(), &over_limit, 8);
  expect_corrupt(image, {"absurd header length", "limit"});
}

TEST(SafetensorsHostile, InvalidJson) {
  expect_corrupt(make_image("{\"w\": {\"dtype\": "), {"not valid JSON"});
  expect_corrupt(make_image("{} trailing"), {"not valid JSON"});
  expect_corrupt(make_image("{\"\xff\": 1}"), {"not valid JSON"});
  expect_corrupt(make_image(""), {"not valid JSON"});
}

TEST(SafetensorsHostile, NonObjectJson) {
  expect_corrupt(make_image("[1, 2]"), {"array", "not a JSON object"});
  expect_corrupt(make_image("\"str\""), {"not a JSON object"});
  expect_corrupt(make_image("{\"w\": 5}"), {"tensor 'w'", "5", "not an object"});
}

TEST(SafetensorsHostile, MissingOrMistypedFields) {
  const std::vector<uint8_t> d(4);
  expect_corrupt(make_image(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", d),
                 {"tensor 'w'", "missing \"dtype\""});
  expect_corrupt(make_image(R"({"w": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}})", d),
                 {"tensor 'w'", "\"dtype\" is 3"});
  expect_corrupt(make_image(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", d),
                 {"tensor 'w'", "missing \"shape\""});
  expect_corrupt(make_image(R"({"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}})", d),
                 {"tensor 'w'", "\"shape\" is 1"});
  expect_corrupt(make_image(R"({"w": {"dtype": "F32", "shape": [1]}})", d),
                 {"tensor 'w'", "missing \"data_offsets\""});
  expect_corrupt(make_image(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", d),
                 {"tensor 'w'", "data_offsets", "1 elements"});
  expect_corrupt(
      make_image(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}})", d),
      {"tensor 'w'", "data_offsets end", "\"4\""});
}

TEST(SafetensorsHostile, UnknownDtype) {
  const std::vector<uint8_t> d(8);
  expect_corrupt(make_image(R"({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}})", d),
                 {"tensor 'w'", "Q7", "accepted: F32, F16, BF16"});
  // A real safetensors dtype trove does not read is "not supported", not corruption.
  expect_corrupt(make_image(R"({"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", d),
                 {"tensor 'w'", "F64", "accepted"}, Status::Code::kNotSupported);
}

TEST(SafetensorsHostile, NegativeOrNonIntegerDim) {
  const std::vector<uint8_t> d(8);
  expect_corrupt(
      make_image(R"({"w": {"dtype": "U8", "shape": [2, -3], "data_offsets": [0, 6]}})", d),
      {"tensor 'w'", "shape dim 1", "-3"});
  expect_corrupt(make_image(R"({"w": {"dtype": "U8", "shape": [2.5], "data_offsets": [0, 2]}})", d),
                 {"tensor 'w'", "shape dim 0", "2.5"});
  expect_corrupt(
      make_image(
          R"({"w": {"dtype": "U8", "shape": [9223372036854775808], "data_offsets": [0, 2]}})", d),
      {"tensor 'w'", "9223372036854775808"});
}

TEST(SafetensorsHostile, ShapeOverflow) {
  const std::vector<uint8_t> d(8);
  expect_corrupt(
      make_image(
          R"({"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 8]}})",
          d),
      {"tensor 'w'", "[1099511627776, 1099511627776]", "overflows"});
  // numel fits, numel * 8 does not.
  expect_corrupt(
      make_image(
          R"({"w": {"dtype": "I64", "shape": [4611686018427387904], "data_offsets": [0, 8]}})", d),
      {"tensor 'w'", "overflows"});
}

TEST(SafetensorsHostile, SizeMismatch) {
  const std::vector<uint8_t> d(16);
  expect_corrupt(make_image(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", d),
                 {"tensor 'w'", "needs 12 bytes", "[0, 8]", "hold 8"});
}

TEST(SafetensorsHostile, BeginAfterEnd) {
  const std::vector<uint8_t> d(16);
  expect_corrupt(make_image(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", d),
                 {"tensor 'w'", "[8, 4]", "begin after end"});
}

TEST(SafetensorsHostile, EndBeyondData) {
  const std::vector<uint8_t> d(8);
  expect_corrupt(make_image(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", d),
                 {"tensor 'w'", "[0, 16]", "8-byte data section"});
  expect_corrupt(
      make_image(
          R"({"w": {"dtype": "U8", "shape": [0], "data_offsets": [18446744073709551615, 18446744073709551615]}})",
          d),
      {"tensor 'w'", "data_offsets begin", "18446744073709551615"});
}

TEST(SafetensorsHostile, OverlappingTensors) {
  const std::vector<uint8_t> d(16);
  expect_corrupt(make_image(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                            d),
                 {"'a' [0, 8)", "'b' [4, 12)", "overlap"});
  // Two names for the same bytes.
  expect_corrupt(make_image(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}})",
                            d),
                 {"'a'", "'b'", "overlap"});
}

TEST(SafetensorsHostile, MetadataMustBeAnObjectOfStrings) {
  expect_corrupt(make_image(R"({"__metadata__": {"ok": "yes", "n": 1}})"),
                 {"__metadata__", "'n'", "1", "must be strings"});
  expect_corrupt(make_image(R"({"__metadata__": {"nested": {"a": "b"}}})"),
                 {"__metadata__", "'nested'", "an object"});
  expect_corrupt(make_image(R"({"__metadata__": ["a"]})"), {"__metadata__", "array"});
}

TEST(SafetensorsHostile, DuplicateKeys) {
  const std::vector<uint8_t> d(8);
  expect_corrupt(make_image(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                            d),
                 {"'w' twice"});
  expect_corrupt(
      make_image(R"({"w": {"dtype": "F32", "dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})",
                 d),
      {"'dtype' twice"});
}

TEST(SafetensorsHostile, DeepNestingNeitherRecursesNorDumps) {
  const int depth = 100000;
  expect_corrupt(make_image(std::string(depth, '[') + std::string(depth, ']')),
                 {"not a JSON object"});
  std::string nested;
  for (int i = 0; i < depth; ++i) nested += "{\"a\":";
  nested += "1";
  nested += std::string(depth, '}');
  expect_corrupt(make_image("{\"w\": {\"dtype\": " + nested + "}}"),
                 {"tensor 'w'", "\"dtype\" is an object"});
}

TEST(SafetensorsHostile, OpenOfMissingOrEmptyFile) {
  ScratchDir dir;
  const Status missing = SafetensorsFile::open(dir.file("nope")).status();
  EXPECT_TRUE(missing.is_not_found()) << missing.to_string();
  EXPECT_THAT(missing.message(), HasSubstr(dir.file("nope")));
  { std::ofstream(dir.file("empty")); }
  const Status empty = SafetensorsFile::open(dir.file("empty")).status();
  EXPECT_TRUE(empty.is_corruption()) << empty.to_string();
  EXPECT_THAT(empty.message(), AllOf(HasSubstr(dir.file("empty")), HasSubstr("0 bytes")));
}

// The tensors must tile the data section, as the format says and its reference reader
// enforces: bytes inserted before a tensor (a hole: the later tensors would be read shifted if
// offsets were recomputed, and silently padded if not) and bytes after the last tensor are
// refused, naming the tensor and the extent. Empty tensors cover nothing and may point anywhere;
// extra keys in an entry are allowed.
TEST(SafetensorsStrict, HolesAndTrailingBytesAreRefusedEmptyTensorsAndExtraKeysAreNot) {
  std::vector<uint8_t> d(20);
  for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<uint8_t>(i);
  const std::vector<uint8_t> tiled = make_image(
      R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4], "extra": [1]},
          "e": {"dtype": "F32", "shape": [0], "data_offsets": [9, 9]},
          "b": {"dtype": "I32", "shape": [4], "data_offsets": [4, 20]}}   )",
      d);
  auto file = SafetensorsFile::parse(tiled, "tiled");
  ASSERT_TRUE(file.ok()) << file.status().to_string();
  ASSERT_EQ(file->tensors().size(), 3u);
  EXPECT_EQ(file->find("b")->bytes[0], 4);
  EXPECT_EQ(file->find("e")->bytes.size(), 0u);

  // Four bytes inserted before 'b': a hole at [4, 8).
  std::vector<uint8_t> d2(24, 0);
  expect_corrupt(make_image(R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                "b": {"dtype": "I32", "shape": [4], "data_offsets": [8, 24]}})",
                            d2),
                 {"data bytes [4, 8) belong to no tensor", "hole before tensor 'b' [8, 24)"});
  // A hole before the first tensor.
  expect_corrupt(make_image(R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}})",
                            std::vector<uint8_t>(8)),
                 {"data bytes [0, 4) belong to no tensor", "tensor 'a'"});
  // Trailing bytes after the last tensor.
  expect_corrupt(make_image(R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})",
                            std::vector<uint8_t>(7)),
                 {"3 trailing bytes", "the tensors end at data byte 4 but the data section has 7"});
  // A data section with no tensor at all.
  expect_corrupt(make_image(R"({})", std::vector<uint8_t>(5)), {"5 trailing bytes"});
}

// ---- fuzz --------------------------------------------------------------------------------------

// Touches every byte a parsed file hands out, so ASan sees any view that leaves the image.
uint64_t touch_everything(const SafetensorsFile& file) {
  uint64_t sum = 0;
  for (const StTensorView& t : file.tensors()) {
    for (uint8_t b : t.bytes) sum += b;
    sum += static_cast<uint64_t>(t.numel());
    if (t.dtype == StDType::kF32 || t.dtype == StDType::kF16 || t.dtype == StDType::kBF16) {
      auto f = file.read_f32(t.name);
      if (f.ok()) sum += f->size();
    }
  }
  for (const auto& [k, v] : file.metadata()) sum += k.size() + v.size();
  return sum;
}

TEST(SafetensorsFuzz, MutatedFilesNeverCrash) {
  const std::vector<uint8_t> base = valid_image();
  uint64_t header_len = 0;
  std::memcpy(&header_len, base.data(), 8);
  std::mt19937_64 rng(20240607);
  int parsed_ok = 0;
  int rejected = 0;
  uint64_t sink = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::vector<uint8_t> img = base;
    const int kind = static_cast<int>(rng() % 4);
    if (kind == 0) {
      // Truncate anywhere; copy so the allocation ends exactly at the new size.
      const size_t len = rng() % (img.size() + 1);
      img = std::vector<uint8_t>(base.begin(), base.begin() + static_cast<ptrdiff_t>(len));
    } else {
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips; ++f) {
        // Mostly the header, where the parsing happens; sometimes the length field.
        size_t pos = (rng() % 8 == 0) ? rng() % 8 : 8 + rng() % header_len;
        if (kind == 1) {
          img[pos] ^= static_cast<uint8_t>(1u << (rng() % 8));
        } else if (kind == 2) {
          img[pos] = static_cast<uint8_t>(rng());
        } else {
          static const char kTokens[] = "0123456789-.,:[]{}\"e ";
          img[pos] = static_cast<uint8_t>(kTokens[rng() % (sizeof(kTokens) - 1)]);
        }
      }
    }
    auto file = SafetensorsFile::parse(img, "fuzz");
    if (file.ok()) {
      ++parsed_ok;
      sink += touch_everything(*file);
    } else {
      ++rejected;
      EXPECT_FALSE(file.status().message().empty());
    }
  }
  EXPECT_GT(rejected, 1000);
  EXPECT_GT(parsed_ok, 0);  // flips inside strings or data keep the file valid
  EXPECT_GT(sink, 0u);
}

}  // namespace
}  // namespace trove
