// pack -> store -> unpack, end to end through the runtime API: exactness of float formats,
// bit-exactness of int8/int4 against the _ref oracles, layouts, errors, inspect.
#include "runtime/convert/pack.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include <gtest/gtest.h>

#include "base/half.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "runtime/bench/synthetic.h"
#include "runtime/convert/inspect.h"
#include "runtime/layer/peer_config_json.h"
#include "runtime/layer/store_layer.h"
#include "storage/store.h"
#include "storage/store_update.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using testing::ScratchDir;

PeerConfig small_config() {
  PeerConfig c;
  c.dim = 72;  // not a multiple of 32: records pad the last group
  c.dim_out = 40;
  c.heads = 3;
  c.n_keys = 9;  // N = 81
  c.dim_key = 6;
  c.topk = 4;
  c.activation = Activation::kSilu;
  c.gate = Gate::kRelu;
  return c;
}

SyntheticCheckpoint make_spec(ImportLayout layout, StDType dtype,
                              std::vector<std::string> prefixes = {"blk.0.peer"}) {
  SyntheticCheckpoint spec;
  spec.layout = layout;
  spec.prefixes = std::move(prefixes);
  spec.config = small_config();
  spec.dtype = dtype;
  spec.seed = 7;
  return spec;
}

PackOptions pack_options(const std::string& in, const std::string& out, ImportLayout layout,
                         DType dtype, std::vector<std::string> prefixes = {"blk.0.peer"}) {
  PackOptions opt;
  opt.inputs = {in};
  opt.output = out;
  opt.layout = layout;
  opt.dtype = dtype;
  for (auto& p : prefixes) opt.layers.push_back({p, p});
  opt.threads = 2;
  return opt;
}

std::vector<uint8_t> tensor_bytes(const SafetensorsFile& f, const std::string& name) {
  const StTensorView* t = f.find(name);
  EXPECT_NE(t, nullptr) << name;
  if (t == nullptr) return {};
  return {t->bytes.begin(), t->bytes.end()};
}

struct FloatCase {
  StDType st;
  DType dtype;
};

class FloatRoundTrip : public ::testing::TestWithParam<FloatCase> {};

TEST_P(FloatRoundTrip, UnpackReturnsTheSourceBytesExactly) {
  const FloatCase c = GetParam();
  ScratchDir dir;
  ASSERT_TRUE(
      write_synthetic_checkpoint(dir.file("in.safetensors"), make_spec(ImportLayout::kTrove, c.st))
          .ok());
  auto packed = pack_store(
      pack_options(dir.file("in.safetensors"), dir.file("m.trove"), ImportLayout::kTrove, c.dtype));
  ASSERT_TRUE(packed.ok()) << packed.status().to_string();
  EXPECT_EQ(packed->layers[0].down_error.max_abs, 0.0);
  EXPECT_EQ(packed->layers[0].up_error.max_abs, 0.0);

  UnpackOptions un;
  un.input = dir.file("m.trove");
  un.output = dir.file("back.safetensors");
  un.dtype = c.st;
  auto unpacked = unpack_store(un);
  ASSERT_TRUE(unpacked.ok()) << unpacked.status().to_string();

  auto src = SafetensorsFile::open(dir.file("in.safetensors"));
  auto back = SafetensorsFile::open(dir.file("back.safetensors"));
  ASSERT_TRUE(src.ok() && back.ok());
  for (const char* name : {"down", "up"}) {
    const std::string full = std::string("blk.0.peer.") + name;
    EXPECT_EQ(tensor_bytes(*src, full), tensor_bytes(*back, full)) << full;
  }
  // Dense tensors come back as fp32 holding exactly the source values.
  for (const char* name : {"query.weight", "keys"}) {
    const std::string full = std::string("blk.0.peer.") + name;
    auto a = src->read_f32(full);
    auto b = back->read_f32(full);
    ASSERT_TRUE(a.ok() && b.ok()) << full;
    EXPECT_EQ(*a, *b) << full;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, FloatRoundTrip,
                         ::testing::Values(FloatCase{StDType::kF32, DType::kF32},
                                           FloatCase{StDType::kBF16, DType::kBF16},
                                           FloatCase{StDType::kF16, DType::kF16},
                                           FloatCase{StDType::kBF16, DType::kF32}));

// The reconstruction a user unpacks equals quantize_ref -> dequantize_ref of each source row,
// bit for bit, computed here row by row without the record code.
void expect_matches_ref(DType dtype, const std::vector<float>& src, const std::vector<float>& got,
                        int64_t rows, int64_t len) {
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(len)));
  std::vector<uint8_t> codes(row_code_bytes(dtype, len));
  std::vector<float> want(static_cast<size_t>(len));
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src.data() + r * len;
    if (dtype == DType::kI8) {
      quantize_row_int8_ref(x, len, scales.data(), reinterpret_cast<int8_t*>(codes.data()));
      dequantize_row_int8_ref(scales.data(), reinterpret_cast<int8_t*>(codes.data()), len,
                              want.data());
    } else {
      quantize_row_int4_ref(x, len, scales.data(), codes.data());
      dequantize_row_int4_ref(scales.data(), codes.data(), len, want.data());
    }
    ASSERT_EQ(0, std::memcmp(want.data(), got.data() + r * len, sizeof(float) * len))
        << "row " << r;
  }
}

class QuantRoundTrip : public ::testing::TestWithParam<DType> {};

TEST_P(QuantRoundTrip, UnpackEqualsRefDequantizationBitForBit) {
  const DType dtype = GetParam();
  ScratchDir dir;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"),
                                         make_spec(ImportLayout::kMikeybeez, StDType::kBF16))
                  .ok());
  auto packed = pack_store(pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                        ImportLayout::kMikeybeez, dtype));
  ASSERT_TRUE(packed.ok()) << packed.status().to_string();
  UnpackOptions un;
  un.input = dir.file("m.trove");
  un.output = dir.file("back.safetensors");
  ASSERT_TRUE(unpack_store(un).ok());

  auto src = SafetensorsFile::open(dir.file("in.safetensors"));
  auto back = SafetensorsFile::open(dir.file("back.safetensors"));
  ASSERT_TRUE(src.ok() && back.ok());
  const PeerConfig c = small_config();
  auto down_src = src->read_f32("blk.0.peer.expert_down.weight");
  auto up_src = src->read_f32("blk.0.peer.expert_up.weight");
  auto down = back->read_f32("blk.0.peer.down");
  auto up = back->read_f32("blk.0.peer.up");
  ASSERT_TRUE(down_src.ok() && up_src.ok() && down.ok() && up.ok());
  expect_matches_ref(dtype, *down_src, *down, c.num_experts(), c.dim);
  expect_matches_ref(dtype, *up_src, *up, c.num_experts(), c.dim_out);

  // The error pack reports is the error of what unpack returns.
  QuantError e;
  e.add(down_src->data(), down->data(), static_cast<int64_t>(down->size()));
  EXPECT_DOUBLE_EQ(e.rmse(), packed->layers[0].down_error.rmse());
  EXPECT_GT(e.rmse(), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, QuantRoundTrip, ::testing::Values(DType::kI8, DType::kI4));

TEST(Pack, RmseOnGaussianExpertsIsWithinFivePercentOfSpec) {
  ScratchDir dir;
  SyntheticCheckpoint spec = make_spec(ImportLayout::kTrove, StDType::kF32);
  spec.config.dim = 256;
  spec.config.dim_out = 256;
  spec.config.n_keys = 32;  // 1024 experts x 512 values
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"), spec).ok());
  struct {
    DType dtype;
    double expected;
  } cases[] = {{DType::kI8, 0.0054}, {DType::kI4, 0.086}};
  for (const auto& c : cases) {
    auto packed = pack_store(pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                          ImportLayout::kTrove, c.dtype));
    ASSERT_TRUE(packed.ok()) << packed.status().to_string();
    const double rmse = packed->layers[0].down_error.rmse();
    EXPECT_NEAR(rmse, c.expected, 0.05 * c.expected) << dtype_name(c.dtype);
  }
}

TEST(Pack, SeveralLayersWithRenamesGoIntoOneStore) {
  ScratchDir dir;
  ASSERT_TRUE(write_synthetic_checkpoint(
                  dir.file("in.safetensors"),
                  make_spec(ImportLayout::kLucidrains, StDType::kF16, {"l.19.peer", "l.21.peer"}))
                  .ok());
  PackOptions opt = pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                 ImportLayout::kLucidrains, DType::kI8, {});
  opt.layers = {{"l.19.peer", "first"}, {"l.21.peer", "second"}};
  opt.overrides.topk = 4;  // lucidrains files do not record k; its default k' = 16 exceeds n = 9
  auto packed = pack_store(opt);
  ASSERT_TRUE(packed.ok()) << packed.status().to_string();
  auto store = StoreReader::open(dir.file("m.trove"));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  ASSERT_EQ(store->layers().size(), 2u);
  EXPECT_EQ(store->layers()[0].name, "first");
  EXPECT_EQ(store->layers()[1].name, "second");
  auto faults = store->verify();
  ASSERT_TRUE(faults.ok());
  EXPECT_TRUE(faults->empty());

  // The lucidrains query rows (half, head, j) were rearranged into canonical (head, half, j).
  auto q = store->read_dense(store->layers()[1], "query.weight");
  ASSERT_TRUE(q.ok());
  const PeerConfig c = small_config();
  for (int64_t i = 0; i < static_cast<int64_t>(q->size()); i += 17) {
    const float want = fp16_to_fp32(fp32_to_fp16(
        synthetic_value(7, "l.21.peer", "query.weight", static_cast<uint64_t>(i), 0.02f)));
    ASSERT_EQ((*q)[static_cast<size_t>(i)], want) << "element " << i;
  }
  EXPECT_EQ(q->size(), static_cast<size_t>(c.query_rows() * c.dim));
}

TEST(Pack, NanInAnExpertIsAnErrorNamingTensorAndRowAndKeepsTheOldStore) {
  ScratchDir dir;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"),
                                         make_spec(ImportLayout::kTrove, StDType::kF32))
                  .ok());
  ASSERT_TRUE(pack_store(pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                      ImportLayout::kTrove, DType::kI4))
                  .ok());
  const std::vector<uint8_t> before = testing::read_all(dir.file("m.trove"));

  // Poison row 5 of the down table in a copy of the checkpoint.
  auto src = SafetensorsFile::open(dir.file("in.safetensors"));
  ASSERT_TRUE(src.ok());
  const StTensorView* down = src->find("blk.0.peer.down");
  ASSERT_NE(down, nullptr);
  std::vector<uint8_t> image = testing::read_all(dir.file("in.safetensors"));
  // Locate the tensor's data in the file image by its bytes (unique for random data).
  const std::vector<uint8_t> needle(down->bytes.begin(), down->bytes.begin() + 64);
  auto it = std::search(image.begin(), image.end(), needle.begin(), needle.end());
  ASSERT_NE(it, image.end());
  const float nan = std::nanf("");
  std::memcpy(&*it + (5 * small_config().dim + 3) * sizeof(float), &nan, sizeof(float));
  testing::write_all(dir.file("bad.safetensors"), image);

  auto r = pack_store(pack_options(dir.file("bad.safetensors"), dir.file("m.trove"),
                                   ImportLayout::kTrove, DType::kI4));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("blk.0.peer.down"), std::string::npos)
      << r.status().message();
  EXPECT_NE(r.status().message().find("row 5"), std::string::npos) << r.status().message();
  EXPECT_EQ(before, testing::read_all(dir.file("m.trove")));
  EXPECT_EQ(dir.list(), (std::vector<std::string>{"bad.safetensors", "in.safetensors", "m.trove"}));
}

TEST(Pack, NonFiniteRouterIsRefusedNamingTensorAndIndexBeforeAnyFile) {
  ScratchDir dir;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"),
                                         make_spec(ImportLayout::kTrove, StDType::kF32))
                  .ok());
  const PeerConfig c = small_config();
  struct Case {
    const char* tensor;
    size_t flat;
    float value;
    const char* expected;
  };
  // keys [3, 2, 9, 6]: flat 10 is [0, 0, 1, 4].
  const Case cases[] = {
      {"query.weight", 2 * 72 + 7, std::nanf(""),
       "tensor query.weight [36, 72], element [2, 7] (flat index 151) is nan"},
      {"keys", 10, INFINITY,
       "tensor keys [3, 2, 9, 6], element [0, 0, 1, 4] (flat index 10) is inf"},
      {"keys", 3 * 2 * 9 * 6 - 1, -INFINITY, "element [2, 1, 8, 5] (flat index 323) is -inf"},
  };
  ASSERT_EQ(c.query_rows(), 36);
  for (const Case& k : cases) {
    SCOPED_TRACE(k.expected);
    auto src = SafetensorsFile::open(dir.file("in.safetensors"));
    ASSERT_TRUE(src.ok());
    const StTensorView* t = src->find(std::string("blk.0.peer.") + k.tensor);
    ASSERT_NE(t, nullptr);
    std::vector<uint8_t> image = testing::read_all(dir.file("in.safetensors"));
    // Locate the tensor's data in the file image by its bytes (unique for random data).
    const std::vector<uint8_t> needle(t->bytes.begin(), t->bytes.begin() + 64);
    auto it = std::search(image.begin(), image.end(), needle.begin(), needle.end());
    ASSERT_NE(it, image.end());
    std::memcpy(&*it + k.flat * sizeof(float), &k.value, sizeof(float));
    testing::write_all(dir.file("bad.safetensors"), image);
    auto r = pack_store(pack_options(dir.file("bad.safetensors"), dir.file("m.trove"),
                                     ImportLayout::kTrove, DType::kI4));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(r.status().is_invalid_argument());
    EXPECT_NE(r.status().message().find(k.expected), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find("layer blk.0.peer"), std::string::npos);
    EXPECT_FALSE(file_exists(dir.file("m.trove")));
  }
}

TEST(StoredLayer, DeclaredRecordLayoutFieldsMustBeWhatTheDecoderImplements) {
  ScratchDir dir;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"),
                                         make_spec(ImportLayout::kTrove, StDType::kF32))
                  .ok());
  ASSERT_TRUE(pack_store(pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                      ImportLayout::kTrove, DType::kI4))
                  .ok());
  nlohmann::json info;
  {
    auto store = StoreReader::open(dir.file("m.trove"));
    ASSERT_TRUE(store.ok());
    info = store->layers()[0].info;
    ASSERT_TRUE(load_stored_layer(*store, "blk.0.peer").ok());
  }
  struct Case {
    const char* field;
    nlohmann::json value;
    Status::Code code;
    const char* expected;
  };
  const Case cases[] = {
      {"group", 64, Status::Code::kNotSupported, "info.record.group = 64, but this build decodes"},
      {"nibble_order", "msb_first", Status::Code::kNotSupported,
       "info.record.nibble_order = \"msb_first\", but this build decodes int4 records with "
       "nibble_order = \"ggml_q4_0\""},
      {"scale_dtype", "bf16", Status::Code::kNotSupported, "info.record.scale_dtype = \"bf16\""},
      {"down_scales_offset", 8, Status::Code::kNotSupported, "info.record.down_scales_offset = 8"},
      {"up_scales_offset", 0, Status::Code::kNotSupported, "info.record.up_scales_offset = 0"},
      {"down_codes_offset", 1, Status::Code::kNotSupported, "info.record.down_codes_offset = 1"},
      {"up_codes_offset", 2, Status::Code::kNotSupported, "info.record.up_codes_offset = 2"},
      {"code_order", "row_major", Status::Code::kNotSupported,
       "info.record.code_order is a record layout field this build does not know"},
      {"group", "32", Status::Code::kCorruption, "info.record.group = \"32\" is not a number"},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.field);
    // The same store with one field of its info changed (through an update: checksums valid).
    std::filesystem::copy_file(dir.file("m.trove"), dir.file("edited.trove"),
                               std::filesystem::copy_options::overwrite_existing);
    nlohmann::json edited = info;
    edited["record"][k.field] = k.value;
    {
      auto u = StoreUpdate::begin(dir.file("edited.trove"));
      ASSERT_TRUE(u.ok());
      ASSERT_TRUE(u->set_layer_info("blk.0.peer", edited).ok());
      ASSERT_TRUE(u->commit().ok());
    }
    auto store = StoreReader::open(dir.file("edited.trove"));
    ASSERT_TRUE(store.ok());
    auto layer = load_stored_layer(*store, "blk.0.peer");
    ASSERT_FALSE(layer.ok());
    EXPECT_EQ(layer.status().code(), k.code) << layer.status().to_string();
    EXPECT_NE(layer.status().message().find(k.expected), std::string::npos)
        << layer.status().message();
    EXPECT_NE(layer.status().message().find("layer blk.0.peer"), std::string::npos);
  }
  // A field declared for a dtype that has none: group on an f32 table.
  ASSERT_TRUE(pack_store(pack_options(dir.file("in.safetensors"), dir.file("f.trove"),
                                      ImportLayout::kTrove, DType::kF32))
                  .ok());
  {
    auto store = StoreReader::open(dir.file("f.trove"));
    ASSERT_TRUE(store.ok());
    info = store->layers()[0].info;
  }
  info["record"]["group"] = 32;
  {
    auto u = StoreUpdate::begin(dir.file("f.trove"));
    ASSERT_TRUE(u.ok());
    ASSERT_TRUE(u->set_layer_info("blk.0.peer", info).ok());
    ASSERT_TRUE(u->commit().ok());
  }
  auto store = StoreReader::open(dir.file("f.trove"));
  ASSERT_TRUE(store.ok());
  const Status s = load_stored_layer(*store, "blk.0.peer").status();
  EXPECT_EQ(s.code(), Status::Code::kNotSupported) << s.to_string();
  EXPECT_NE(s.message().find("f32 records have no such field"), std::string::npos) << s.message();
}

TEST(Pack, MissingPrefixIsNotFoundAndWritesNothing) {
  ScratchDir dir;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"),
                                         make_spec(ImportLayout::kMikeybeez, StDType::kBF16))
                  .ok());
  auto r = pack_store(pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                   ImportLayout::kMikeybeez, DType::kI4, {"blk.9.peer"}));
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_not_found()) << r.status().to_string();
  EXPECT_NE(r.status().message().find("blk.9.peer"), std::string::npos);
  EXPECT_EQ(dir.list(), std::vector<std::string>{"in.safetensors"});
}

TEST(Pack, RecordsAndStatisticsDoNotDependOnTheThreadCount) {
  ScratchDir dir;
  SyntheticCheckpoint spec = make_spec(ImportLayout::kTrove, StDType::kBF16);
  spec.config.n_keys = 23;  // 529 experts: several 64-expert blocks and a ragged last one
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"), spec).ok());
  std::vector<std::vector<uint8_t>> tables;
  std::vector<double> rmse;
  for (int threads : {1, 3}) {
    PackOptions opt = pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                   ImportLayout::kTrove, DType::kI4);
    opt.threads = threads;
    auto packed = pack_store(opt);
    ASSERT_TRUE(packed.ok()) << packed.status().to_string();
    rmse.push_back(packed->layers[0].down_error.rmse());
    auto store = StoreReader::open(dir.file("m.trove"));
    ASSERT_TRUE(store.ok());
    auto table = store->mapped_records(store->layers()[0]);
    tables.emplace_back(table.begin(), table.end());
  }
  EXPECT_EQ(tables[0], tables[1]);
  EXPECT_EQ(rmse[0], rmse[1]);  // exactly: the same sums in the same order
}

TEST(Unpack, ADamagedRecordIsAnErrorNamingTheExpertAndWritesNothing) {
  ScratchDir dir;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"),
                                         make_spec(ImportLayout::kTrove, StDType::kF32))
                  .ok());
  ASSERT_TRUE(pack_store(pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                      ImportLayout::kTrove, DType::kI8))
                  .ok());
  StoreTableInfo table;
  {
    auto store = StoreReader::open(dir.file("m.trove"));
    ASSERT_TRUE(store.ok());
    table = store->layers()[0].table;
  }
  // The last byte of expert 70's up codes: only the up table's rows read it.
  std::vector<uint8_t> bytes = testing::read_all(dir.file("m.trove"));
  bytes[table.offset + 70 * table.stride + table.record_bytes - 1] ^= 0x01;
  testing::write_all(dir.file("m.trove"), bytes);

  UnpackOptions un;
  un.input = dir.file("m.trove");
  un.output = dir.file("back.safetensors");
  auto r = unpack_store(un);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_corruption()) << r.status().to_string();
  EXPECT_NE(r.status().message().find("expert 70"), std::string::npos) << r.status().message();
  EXPECT_FALSE(file_exists(dir.file("back.safetensors")));
}

TEST(Pack, DuplicateLayerNamesAreRejected) {
  ScratchDir dir;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"),
                                         make_spec(ImportLayout::kTrove, StDType::kF32))
                  .ok());
  PackOptions opt = pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                 ImportLayout::kTrove, DType::kI4, {"blk.0.peer", "blk.0.peer"});
  auto r = pack_store(opt);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("given twice"), std::string::npos);
}

TEST(Inspect, ReportsLayersReadAmplificationAndTierSplit) {
  ScratchDir dir;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"),
                                         make_spec(ImportLayout::kTrove, StDType::kBF16))
                  .ok());
  PackOptions opt = pack_options(dir.file("in.safetensors"), dir.file("m.trove"),
                                 ImportLayout::kTrove, DType::kI4);
  ASSERT_TRUE(pack_store(opt).ok());
  auto store = StoreReader::open(dir.file("m.trove"));
  ASSERT_TRUE(store.ok());
  const uint64_t table = store->layers()[0].table.bytes;
  auto j = inspect_store(*store, TierBudgets{table / 4, table / 2});
  ASSERT_TRUE(j.ok()) << j.status().to_string();
  const auto& l = (*j)["layers"][0];
  EXPECT_EQ(l["name"], "blk.0.peer");
  EXPECT_EQ(l["dtype"], "int4");
  EXPECT_EQ(l["experts"], 81);
  EXPECT_EQ(l["config"]["topk"], 4);
  EXPECT_EQ(l["stride"].get<uint64_t>() % 64, 0u);
  EXPECT_GE(l["read_amplification"]["4096"].get<double>(), 1.0);
  EXPECT_GE(l["read_amplification"]["4096"].get<double>(),
            l["read_amplification"]["512"].get<double>());
  EXPECT_EQ((*j)["tiers"]["vram"]["bytes"], table / 4);
  EXPECT_EQ((*j)["tiers"]["host"]["bytes"], table / 2);
  EXPECT_EQ((*j)["tiers"]["disk"]["bytes"], table - table / 4 - table / 2);
  EXPECT_EQ((*j)["provenance"]["layout"], "trove");
  const std::string text = render_inspect(*j);
  EXPECT_NE(text.find("blk.0.peer"), std::string::npos);
  EXPECT_NE(text.find("read amp."), std::string::npos);
}

}  // namespace
}  // namespace trove

namespace trove {
namespace {

// A store written directly with StoreWriter, so a test can give it any layer info: what a
// damaged or hand-edited (but checksum-valid) store looks like to the runtime.
struct HandMadeStore {
  PeerConfig config;
  nlohmann::json info;
  nlohmann::json provenance = {{"tool", "test"}};
  std::vector<int64_t> keys_shape;

  HandMadeStore() {
    config.dim = 40;
    config.heads = 2;
    config.n_keys = 3;
    config.dim_key = 4;
    config.topk = 2;
    EXPECT_TRUE(config.validate_and_fill().ok());
    info = {{"config", peer_config_to_json(config)},
            {"record", {{"dtype", "int8"}, {"dim", 40}, {"dim_out", 40}, {"width", 1}}}};
    keys_shape = {2, 2, 3, 4};
  }

  Status write(const std::string& path) const {
    auto record = RecordLayout::make(DType::kI8, 40, 40);
    if (!record.ok()) return record.status();
    auto w = StoreWriter::create(path, provenance);
    if (!w.ok()) return w.status();
    StoreTableSpec table{"int8", 9, record->record_bytes, record->stride};
    TROVE_RETURN_IF_ERROR(w->begin_layer("L", info, table));
    std::vector<uint8_t> records(9 * record->stride, 0);
    TROVE_RETURN_IF_ERROR(w->append_records(records));
    std::vector<float> q(static_cast<size_t>(config.query_rows() * config.dim), 0.5f);
    TROVE_RETURN_IF_ERROR(w->add_dense("query.weight", {config.query_rows(), config.dim}, q));
    int64_t keys = 1;
    for (int64_t d : keys_shape) keys *= d;
    std::vector<float> k(static_cast<size_t>(keys), 0.25f);
    TROVE_RETURN_IF_ERROR(w->add_dense("keys", keys_shape, k));
    TROVE_RETURN_IF_ERROR(w->end_layer());
    return w->finish();
  }
};

TEST(StoredLayer, AHandMadeValidStoreLoads) {
  ScratchDir dir;
  ASSERT_TRUE(HandMadeStore().write(dir.file("s.trove")).ok());
  auto store = StoreReader::open(dir.file("s.trove"));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto layer = load_stored_layer(*store, "L");
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  EXPECT_EQ(layer->record.stride, store->layers()[0].table.stride);
}

TEST(StoredLayer, RecordWidthDisagreeingWithConfigIsCorruptionAndUnpackRefuses) {
  ScratchDir dir;
  HandMadeStore h;
  h.info["record"]["width"] = 2;  // records of two rows each, config says one
  // Keep the table consistent with the record it claims, so only the config check can catch it.
  h.info["record"]["dim"] = 20;
  h.info["record"]["dim_out"] = 20;
  ASSERT_TRUE(RecordLayout::make(DType::kI8, 20, 20, 2)->record_bytes ==
              RecordLayout::make(DType::kI8, 40, 40, 1)->record_bytes);
  ASSERT_TRUE(h.write(dir.file("s.trove")).ok());
  auto store = StoreReader::open(dir.file("s.trove"));
  ASSERT_TRUE(store.ok());
  auto layer = load_stored_layer(*store, "L");
  ASSERT_FALSE(layer.ok());
  EXPECT_TRUE(layer.status().is_corruption()) << layer.status().to_string();

  UnpackOptions un;
  un.input = dir.file("s.trove");
  un.output = dir.file("out.safetensors");
  EXPECT_FALSE(unpack_store(un).ok());
  EXPECT_FALSE(file_exists(dir.file("out.safetensors")));
}

TEST(StoredLayer, DenseShapeDisagreeingWithConfigIsCorruptionNamingTheTensor) {
  ScratchDir dir;
  HandMadeStore h;
  h.keys_shape = {2, 2, 4, 4};  // n = 4 keys, config says 3
  ASSERT_TRUE(h.write(dir.file("s.trove")).ok());
  auto store = StoreReader::open(dir.file("s.trove"));
  ASSERT_TRUE(store.ok());
  auto layer = load_stored_layer(*store, "L");
  ASSERT_FALSE(layer.ok());
  EXPECT_TRUE(layer.status().is_corruption());
  EXPECT_NE(layer.status().message().find("'keys' has shape [2, 2, 4, 4]"), std::string::npos)
      << layer.status().message();
}

TEST(StoredLayer, UnparsableConfigIsCorruption) {
  ScratchDir dir;
  HandMadeStore h;
  h.info["config"]["activation"] = "swish";
  ASSERT_TRUE(h.write(dir.file("s.trove")).ok());
  auto store = StoreReader::open(dir.file("s.trove"));
  ASSERT_TRUE(store.ok());
  auto layer = load_stored_layer(*store, "L");
  ASSERT_FALSE(layer.ok());
  EXPECT_TRUE(layer.status().is_corruption()) << layer.status().to_string();
  EXPECT_NE(layer.status().message().find("swish"), std::string::npos);
}

TEST(Inspect, MalformedProvenanceSourceAndErrorsAreShownAsUnknownNotFatal) {
  ScratchDir dir;
  HandMadeStore h;
  h.provenance = {{"tool", 7}, {"created", nullptr}, {"sources", 3}, {"layout", {1, 2}}};
  h.info["source"] = "not an object";
  h.info["quant_error"] = {{"down", 5}, {"up", {{"rmse", "x"}}}};
  ASSERT_TRUE(h.write(dir.file("s.trove")).ok());
  auto store = StoreReader::open(dir.file("s.trove"));
  ASSERT_TRUE(store.ok());
  auto j = inspect_store(*store, TierBudgets{});
  ASSERT_TRUE(j.ok()) << j.status().to_string();
  EXPECT_EQ((*j)["provenance"]["tool"], "?");
  EXPECT_TRUE((*j)["provenance"]["sources"].empty());
  EXPECT_EQ((*j)["layers"][0]["source"]["file"], "?");
  EXPECT_EQ((*j)["layers"][0]["quant_error"]["up"]["rmse"], -1.0);
  const std::string text = render_inspect(*j);  // must not throw
  EXPECT_NE(text.find("written by ? on ?"), std::string::npos) << text;
}

}  // namespace
}  // namespace trove
