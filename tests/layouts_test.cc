// Checkpoint import (runtime/convert/layouts.h) and the PEER config it produces
// (kernels/peer_config.h, runtime/layer/peer_config_json.h).
//
// Each layout is verified the way SPEC §2 asks: the test builds one small layer in canonical
// form, writes it in the layout's own arrangement with explicit index loops (independent of
// layouts.cc), imports it, and requires every canonical tensor back bit for bit.
#include "runtime/convert/layouts.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/half.h"
#include "runtime/layer/peer_config_json.h"

namespace trove {
namespace {

using ::testing::HasSubstr;

// ---- the layer, canonical ----------------------------------------------------------------------

// Sizes chosen to be small, distinct and not powers of two, so a transposed index shows.
struct Dims {
  int64_t dim = 40;
  int64_t dim_out = 24;
  int64_t heads = 3;
  int64_t key_heads = 3;  // 1 for shared keys
  int64_t n_keys = 5;
  int64_t dim_key = 6;
  bool query_bias = true;
  bool norm = true;

  int64_t num_experts() const { return n_keys * n_keys; }
  int64_t query_rows() const { return heads * 2 * dim_key; }
};

struct CanonicalLayer {
  Dims d;
  std::vector<float> query_weight;  // [h*2*dk, D], rows (head, half, j)
  std::vector<float> query_bias;    // [h*2*dk] or empty
  std::vector<float> keys;          // [hk, 2, n, dk]
  std::vector<float> norm;          // [D] or empty (gamma as trove stores it)
  std::vector<float> down;          // [N, D]
  std::vector<float> up;            // [N, D_out]
};

// Rounds through the source dtype, so the values the test writes are exactly representable and
// the import must return them bit for bit.
float representable(float v, StDType dtype) {
  switch (dtype) {
    case StDType::kF16:
      return fp16_to_fp32(fp32_to_fp16(v));
    case StDType::kBF16:
      return bf16_to_fp32(fp32_to_bf16(v));
    default:
      return v;
  }
}

std::vector<float> random_values(std::mt19937& rng, int64_t count, StDType dtype) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = representable(dist(rng), dtype);
  return v;
}

CanonicalLayer make_layer(const Dims& d, uint32_t seed, StDType dtype = StDType::kF32) {
  std::mt19937 rng(seed);
  CanonicalLayer l;
  l.d = d;
  l.query_weight = random_values(rng, d.query_rows() * d.dim, dtype);
  if (d.query_bias) l.query_bias = random_values(rng, d.query_rows(), dtype);
  l.keys = random_values(rng, d.key_heads * 2 * d.n_keys * d.dim_key, dtype);
  if (d.norm) l.norm = random_values(rng, d.dim, dtype);
  l.down = random_values(rng, d.num_experts() * d.dim, dtype);
  l.up = random_values(rng, d.num_experts() * d.dim_out, dtype);
  return l;
}

// ---- writing safetensors in each layout's arrangement ------------------------------------------

struct TensorSpec {
  std::string name;
  StDType dtype;
  std::vector<int64_t> shape;
  std::vector<float> values;  // encoded into dtype on write (I8: truncated)
};

std::vector<uint8_t> encode(const std::vector<float>& values, StDType dtype) {
  std::vector<uint8_t> bytes;
  for (float v : values) {
    uint8_t b[4];
    size_t n = 0;
    switch (dtype) {
      case StDType::kF32:
        std::memcpy(b, &v, 4);
        n = 4;
        break;
      case StDType::kF16: {
        uint16_t h = fp32_to_fp16(v);
        std::memcpy(b, &h, 2);
        n = 2;
        break;
      }
      case StDType::kBF16: {
        uint16_t h = fp32_to_bf16(v);
        std::memcpy(b, &h, 2);
        n = 2;
        break;
      }
      case StDType::kI8:
        b[0] = static_cast<uint8_t>(static_cast<int8_t>(v * 100.0f));
        n = 1;
        break;
      default:
        ADD_FAILURE() << "test encodes only F32, F16, BF16, I8";
    }
    bytes.insert(bytes.end(), b, b + n);
  }
  return bytes;
}

Status write_specs(const std::string& path, const std::vector<TensorSpec>& specs,
                   const std::map<std::string, std::string>& metadata = {}) {
  std::vector<std::vector<uint8_t>> buffers;
  buffers.reserve(specs.size());
  std::vector<StTensorOut> out;
  for (const TensorSpec& s : specs) {
    buffers.push_back(encode(s.values, s.dtype));
    StTensorOut t;
    t.name = s.name;
    t.dtype = s.dtype;
    t.shape = s.shape;
    t.data = buffers.back();
    out.push_back(std::move(t));
  }
  return write_safetensors(path, out, metadata);
}

std::string join(const std::string& prefix, const std::string& suffix) {
  return prefix.empty() ? suffix : prefix + "." + suffix;
}

std::vector<TensorSpec> trove_specs(const CanonicalLayer& l, const std::string& p,
                                    StDType dt = StDType::kF32) {
  const Dims& d = l.d;
  std::vector<TensorSpec> s;
  s.push_back({join(p, "query.weight"), dt, {d.query_rows(), d.dim}, l.query_weight});
  if (d.query_bias) s.push_back({join(p, "query.bias"), dt, {d.query_rows()}, l.query_bias});
  s.push_back({join(p, "keys"), dt, {d.key_heads, 2, d.n_keys, d.dim_key}, l.keys});
  s.push_back({join(p, "down"), dt, {d.num_experts(), d.dim}, l.down});
  s.push_back({join(p, "up"), dt, {d.num_experts(), d.dim_out}, l.up});
  if (d.norm) s.push_back({join(p, "norm.weight"), dt, {d.dim}, l.norm});
  return s;
}

// Keys [hk][2][n][dk] -> [hk][n][2][dk], as mikeybeez and lucidrains store them.
std::vector<float> keys_head_n_half(const CanonicalLayer& l) {
  const Dims& d = l.d;
  std::vector<float> out(l.keys.size());
  for (int64_t hh = 0; hh < d.key_heads; ++hh)
    for (int64_t c = 0; c < 2; ++c)
      for (int64_t i = 0; i < d.n_keys; ++i)
        for (int64_t j = 0; j < d.dim_key; ++j)
          out[((hh * d.n_keys + i) * 2 + c) * d.dim_key + j] =
              l.keys[((hh * 2 + c) * d.n_keys + i) * d.dim_key + j];
  return out;
}

std::vector<TensorSpec> mikeybeez_specs(const CanonicalLayer& l, const std::string& p,
                                        StDType dt = StDType::kF32) {
  const Dims& d = l.d;
  std::vector<TensorSpec> s;
  s.push_back({join(p, "to_queries.weight"), dt, {d.query_rows(), d.dim}, l.query_weight});
  if (d.query_bias) s.push_back({join(p, "to_queries.bias"), dt, {d.query_rows()}, l.query_bias});
  s.push_back({join(p, "keys"), dt, {d.heads, d.n_keys, 2, d.dim_key}, keys_head_n_half(l)});
  s.push_back({join(p, "expert_down.weight"), dt, {d.num_experts(), d.dim}, l.down});
  s.push_back({join(p, "expert_up.weight"), dt, {d.num_experts(), d.dim_out}, l.up});
  return s;
}

// lucidrains' query rows are (half, head, j): source row (half*h + head)*dk + j holds
// canonical row (head*2 + half)*dk + j. Its norm stores gamma with the +1 applied at run time,
// so the source holds l.norm and the import must give l.norm + 1.
std::vector<TensorSpec> lucidrains_specs(const CanonicalLayer& l, const std::string& p,
                                         bool sequential_name, StDType dt = StDType::kF32) {
  const Dims& d = l.d;
  std::vector<float> qw(l.query_weight.size());
  std::vector<float> qb(l.query_bias.size());
  for (int64_t head = 0; head < d.heads; ++head)
    for (int64_t half = 0; half < 2; ++half)
      for (int64_t j = 0; j < d.dim_key; ++j) {
        const int64_t src_row = (half * d.heads + head) * d.dim_key + j;
        const int64_t canon_row = (head * 2 + half) * d.dim_key + j;
        for (int64_t col = 0; col < d.dim; ++col)
          qw[src_row * d.dim + col] = l.query_weight[canon_row * d.dim + col];
        if (d.query_bias) qb[src_row] = l.query_bias[canon_row];
      }
  const std::string q = sequential_name ? "to_queries.0." : "to_queries.";
  std::vector<TensorSpec> s;
  s.push_back({join(p, q + "weight"), dt, {d.query_rows(), d.dim}, qw});
  if (d.query_bias) s.push_back({join(p, q + "bias"), dt, {d.query_rows()}, qb});
  s.push_back({join(p, "keys"), dt, {d.heads, d.n_keys, 2, d.dim_key}, keys_head_n_half(l)});
  s.push_back({join(p, "weight_down_embed.weight"), dt, {d.num_experts(), d.dim}, l.down});
  s.push_back({join(p, "weight_up_embed.weight"), dt, {d.num_experts(), d.dim_out}, l.up});
  if (d.norm) s.push_back({join(p, "norm.gamma"), dt, {d.dim}, l.norm});
  return s;
}

TensorSpec* find_spec(std::vector<TensorSpec>& specs, const std::string& name) {
  for (TensorSpec& s : specs) {
    if (s.name == name) return &s;
  }
  ADD_FAILURE() << "no spec " << name;
  return nullptr;
}

// Replaces a spec's shape with random values of the new shape.
void reshape_spec(std::vector<TensorSpec>& specs, const std::string& name,
                  std::vector<int64_t> shape) {
  TensorSpec* s = find_spec(specs, name);
  ASSERT_NE(s, nullptr);
  int64_t numel = 1;
  for (int64_t x : shape) numel *= x;
  std::mt19937 rng(99);
  s->shape = std::move(shape);
  s->values = random_values(rng, numel, StDType::kF32);
}

// ---- the fixture -------------------------------------------------------------------------------

class LayoutsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ =
        std::filesystem::path(::testing::TempDir()) / (std::string("layouts_test_") + info->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Writes `specs` to `name` and opens it; the file lives as long as the fixture.
  const SafetensorsFile* write_and_open(const std::string& name,
                                        const std::vector<TensorSpec>& specs,
                                        const std::map<std::string, std::string>& metadata = {}) {
    Status s = write_specs(path(name), specs, metadata);
    EXPECT_TRUE(s.ok()) << s.to_string();
    Result<SafetensorsFile> f = SafetensorsFile::open(path(name));
    EXPECT_TRUE(f.ok()) << f.status().to_string();
    if (!f.ok()) return nullptr;
    files_.push_back(std::make_unique<SafetensorsFile>(std::move(f).value()));
    return files_.back().get();
  }

  Result<ImportedLayer> import_one(const std::string& name, const std::vector<TensorSpec>& specs,
                                   ImportLayout layout, const std::string& prefix,
                                   const ImportOverrides& overrides = {},
                                   const std::map<std::string, std::string>& metadata = {}) {
    const SafetensorsFile* f = write_and_open(name, specs, metadata);
    if (f == nullptr) return Status::invalid_argument("test setup failed");
    return import_layer({f}, layout, prefix, overrides);
  }

  std::filesystem::path dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
};

std::vector<float> read_all_rows(const StTensorView* table) {
  EXPECT_NE(table, nullptr);
  if (table == nullptr || table->shape.size() != 2) return {};
  std::vector<float> out(static_cast<size_t>(table->shape[0] * table->shape[1]));
  Status s = read_rows_f32(*table, 0, table->shape[0], out.data());
  EXPECT_TRUE(s.ok()) << s.to_string();
  return out;
}

// Every canonical tensor of `got` equals `want` exactly; `want_norm` is the canonical gamma.
void expect_canonical(const ImportedLayer& got, const CanonicalLayer& want,
                      const std::vector<float>& want_norm) {
  const Dims& d = want.d;
  EXPECT_EQ(got.config.dim, d.dim);
  EXPECT_EQ(got.config.dim_out, d.dim_out);
  EXPECT_EQ(got.config.heads, d.heads);
  EXPECT_EQ(got.config.key_heads(), d.key_heads);
  EXPECT_EQ(got.config.n_keys, d.n_keys);
  EXPECT_EQ(got.config.dim_key, d.dim_key);
  EXPECT_EQ(got.config.query_bias, d.query_bias);
  EXPECT_EQ(got.config.expert_width, 1);
  EXPECT_EQ(got.query_weight, want.query_weight);
  EXPECT_EQ(got.query_bias, want.query_bias);
  EXPECT_EQ(got.keys, want.keys);
  EXPECT_EQ(got.norm_weight, want_norm);
  EXPECT_EQ(read_all_rows(got.down), want.down);
  EXPECT_EQ(read_all_rows(got.up), want.up);
}

PeerConfig trove_config(const Dims& d) {
  PeerConfig c;
  c.dim = d.dim;
  c.dim_out = d.dim_out;
  c.heads = d.heads;
  c.n_keys = d.n_keys;
  c.dim_key = d.dim_key;
  c.topk = 4;
  c.topk_per_half = 3;
  c.activation = Activation::kGeluTanh;
  c.gate = Gate::kSigmoid;
  c.input_norm = d.norm ? InputNorm::kRms : InputNorm::kNone;
  c.norm_eps = 1e-5f;
  c.shared_keys = d.key_heads == 1;
  c.query_bias = d.query_bias;
  return c;
}

std::map<std::string, std::string> trove_metadata(const std::string& prefix, const PeerConfig& c) {
  return {{trove_layout_config_key(prefix), peer_config_to_json(c).dump()}};
}

// ---- PeerConfig --------------------------------------------------------------------------------

PeerConfig valid_config() {
  PeerConfig c;
  c.dim = 40;
  c.heads = 3;
  c.n_keys = 5;
  c.dim_key = 6;
  c.topk = 4;
  return c;
}

TEST(PeerConfigTest, ValidateFillsDimOutAndTopkPerHalf) {
  PeerConfig c = valid_config();
  ASSERT_TRUE(c.validate_and_fill().ok());
  EXPECT_EQ(c.dim_out, 40);
  EXPECT_EQ(c.topk_per_half, 4);
  EXPECT_EQ(c.num_experts(), 25);
  EXPECT_EQ(c.query_rows(), 36);
  EXPECT_EQ(c.key_heads(), 3);
  c.shared_keys = true;
  EXPECT_EQ(c.key_heads(), 1);
}

TEST(PeerConfigTest, ValidationErrorsNameTheFieldAndValue) {
  struct Case {
    const char* what;
    void (*mutate)(PeerConfig&);
    const char* expect;
  };
  const Case cases[] = {
      {"dim 0", [](PeerConfig& c) { c.dim = 0; }, "dim must be >= 1, got 0"},
      {"dim_out -2", [](PeerConfig& c) { c.dim_out = -2; }, "dim_out must be >= 1, got -2"},
      {"heads 0", [](PeerConfig& c) { c.heads = 0; }, "heads must be >= 1, got 0"},
      {"n_keys 0", [](PeerConfig& c) { c.n_keys = 0; }, "n_keys must be >= 1, got 0"},
      {"dim_key -1", [](PeerConfig& c) { c.dim_key = -1; }, "dim_key must be >= 1, got -1"},
      {"topk -3", [](PeerConfig& c) { c.topk = -3; }, "topk must be >= 1, got -3"},
      {"expert_width 0", [](PeerConfig& c) { c.expert_width = 0; },
       "expert_width must be >= 1, got 0"},
      {"topk_per_half > n", [](PeerConfig& c) { c.topk_per_half = 6; },
       "topk_per_half 6 must be <= n_keys 5"},
      {"topk_per_half > N", [](PeerConfig& c) { c.topk_per_half = 30; },
       "topk_per_half 30 must be <= n_keys 5"},
      {"topk > N",
       [](PeerConfig& c) {
         c.topk = 26;
         c.topk_per_half = 5;
       },
       "topk 26 must be <= topk_per_half^2 = 25"},
      {"topk > k'^2",
       [](PeerConfig& c) {
         c.topk_per_half = 2;
         c.topk = 5;
       },
       "topk 5 must be <= topk_per_half^2 = 4"},
      {"n too big", [](PeerConfig& c) { c.n_keys = (int64_t{1} << 20) + 1; }, "n_keys 1048577"},
      {"n overflowing", [](PeerConfig& c) { c.n_keys = int64_t{1} << 40; }, "above the limit"},
      {"eps 0 with rms",
       [](PeerConfig& c) {
         c.input_norm = InputNorm::kRms;
         c.norm_eps = 0.0f;
       },
       "norm_eps"},
  };
  for (const Case& tc : cases) {
    PeerConfig c = valid_config();
    tc.mutate(c);
    Status s = c.validate_and_fill();
    EXPECT_TRUE(s.is_invalid_argument()) << tc.what << ": " << s.to_string();
    EXPECT_THAT(s.message(), HasSubstr(tc.expect)) << tc.what;
  }
}

TEST(PeerConfigTest, ExpertWidthAboveOneIsNotSupportedYet) {
  PeerConfig c = valid_config();
  c.expert_width = 2;
  Status s = c.validate_and_fill();
  EXPECT_EQ(s.code(), Status::Code::kNotSupported);
  EXPECT_THAT(s.message(), HasSubstr("expert_width m > 1 is not supported yet"));
}

TEST(PeerConfigTest, EpsIsOnlyCheckedWithRmsNorm) {
  PeerConfig c = valid_config();
  c.norm_eps = 0.0f;
  EXPECT_TRUE(c.validate_and_fill().ok());
}

TEST(PeerConfigTest, TopkEqualToNAndToKPrimeSquaredIsValid) {
  PeerConfig c = valid_config();
  c.topk_per_half = 5;
  c.topk = 25;
  EXPECT_TRUE(c.validate_and_fill().ok());
  PeerConfig one = valid_config();
  one.n_keys = 1;
  one.topk = 1;
  EXPECT_TRUE(one.validate_and_fill().ok());
}

TEST(PeerConfigTest, EnumNamesRoundTripAndParseErrorsListAcceptedValues) {
  for (Activation a :
       {Activation::kRelu, Activation::kGelu, Activation::kGeluTanh, Activation::kSilu}) {
    Result<Activation> r = parse_activation(activation_name(a));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, a);
  }
  for (Gate g : {Gate::kSoftmax, Gate::kRelu, Gate::kSigmoid}) {
    Result<Gate> r = parse_gate(gate_name(g));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, g);
  }
  for (InputNorm n : {InputNorm::kNone, InputNorm::kRms}) {
    Result<InputNorm> r = parse_input_norm(input_norm_name(n));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, n);
  }
  EXPECT_EQ(activation_name(Activation::kGeluTanh), "gelu_tanh");
  EXPECT_THAT(parse_activation("swish").status().message(),
              HasSubstr("'swish' (accepted: relu, gelu, gelu_tanh, silu)"));
  EXPECT_THAT(parse_gate("tanh").status().message(),
              HasSubstr("'tanh' (accepted: softmax, relu, sigmoid)"));
  EXPECT_THAT(parse_input_norm("layer").status().message(),
              HasSubstr("'layer' (accepted: none, rms)"));
}

// ---- PeerConfig JSON ---------------------------------------------------------------------------

TEST(PeerConfigJsonTest, RoundTripsEveryField) {
  PeerConfig c = trove_config(Dims{});
  c.shared_keys = true;
  ASSERT_TRUE(c.validate_and_fill().ok());
  nlohmann::json j = peer_config_to_json(c);
  EXPECT_EQ(j.size(), 14u);
  EXPECT_EQ(j["activation"], "gelu_tanh");
  EXPECT_EQ(j["norm_eps"].get<double>(), 1e-5);  // the short decimal, not 9.99999974e-06
  Result<PeerConfig> back = peer_config_from_json(nlohmann::json::parse(j.dump()));
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_EQ(peer_config_to_json(*back), j);
  EXPECT_EQ(back->norm_eps, c.norm_eps);
  EXPECT_EQ(back->topk_per_half, 3);
  EXPECT_TRUE(back->shared_keys);
  EXPECT_TRUE(back->query_bias);
}

TEST(PeerConfigJsonTest, MissingOptionalFieldsTakeDefaults) {
  auto j = nlohmann::json::parse(R"({"dim": 40, "n_keys": 5, "dim_key": 6, "topk": 4})");
  Result<PeerConfig> c = peer_config_from_json(j);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->dim_out, 40);
  EXPECT_EQ(c->heads, 1);
  EXPECT_EQ(c->topk_per_half, 4);
  EXPECT_EQ(c->activation, Activation::kRelu);
  EXPECT_EQ(c->gate, Gate::kSoftmax);
  EXPECT_EQ(c->input_norm, InputNorm::kNone);
  EXPECT_FALSE(c->shared_keys);
}

TEST(PeerConfigJsonTest, ErrorsNameTheField) {
  const std::string base = R"("dim": 40, "n_keys": 5, "dim_key": 6, "topk": 4)";
  struct Case {
    std::string json;
    const char* expect;
  };
  const Case cases[] = {
      {"{" + base + R"(, "topk_per_hlaf": 3})", "unknown field 'topk_per_hlaf'"},
      {"{" + base + R"(, "heads": "3"})", "'heads' must be an integer, got string"},
      {"{" + base + R"(, "dim_out": 2.5})", "'dim_out' must be an integer"},
      {"{" + base + R"(, "shared_keys": 1})", "'shared_keys' must be a boolean"},
      {"{" + base + R"(, "activation": 3})", "'activation' must be a string"},
      {"{" + base + R"(, "gate": "tanh"})", "'gate'"},
      {"{" + base + R"(, "norm_eps": "small"})", "'norm_eps' must be a number"},
      {"{" + base + R"(, "norm_eps": 1e300})", "'norm_eps' is out of range"},
      {"{" + base + R"(, "heads": 18446744073709551615})", "'heads' is out of range"},
      {R"({"dim": 40, "n_keys": 5, "topk": 4})", "missing required field 'dim_key'"},
      {"{" + base + R"(, "topk_per_half": 9})", "topk_per_half 9 must be <= n_keys 5"},
      {"[1, 2]", "must be a JSON object"},
  };
  for (const Case& tc : cases) {
    Result<PeerConfig> c = peer_config_from_json(nlohmann::json::parse(tc.json));
    ASSERT_FALSE(c.ok()) << tc.json;
    EXPECT_TRUE(c.status().is_invalid_argument()) << c.status().to_string();
    EXPECT_THAT(c.status().message(), HasSubstr(tc.expect)) << tc.json;
  }
}

// ---- layout names ------------------------------------------------------------------------------

TEST(ImportLayoutTest, NamesRoundTrip) {
  for (ImportLayout l :
       {ImportLayout::kTrove, ImportLayout::kMikeybeez, ImportLayout::kLucidrains}) {
    Result<ImportLayout> r = parse_import_layout(import_layout_name(l));
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, l);
  }
  EXPECT_THAT(parse_import_layout("pkm").status().message(),
              HasSubstr("accepted: trove, mikeybeez, lucidrains"));
  EXPECT_EQ(trove_layout_config_key("model.layers.19.peer"), "trove.layer.model.layers.19.peer");
}

// ---- trove layout ------------------------------------------------------------------------------

TEST_F(LayoutsTest, TroveLayoutImportsExactlyWithMetadataConfig) {
  const Dims d;
  const CanonicalLayer l = make_layer(d, 1);
  const std::string p = "model.layers.19.peer";
  Result<ImportedLayer> r = import_one("a.safetensors", trove_specs(l, p), ImportLayout::kTrove, p,
                                       {}, trove_metadata(p, trove_config(d)));
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  expect_canonical(*r, l, l.norm);
  EXPECT_EQ(r->prefix, p);
  EXPECT_EQ(r->source_file, path("a.safetensors"));
  EXPECT_EQ(r->config.topk, 4);
  EXPECT_EQ(r->config.topk_per_half, 3);
  EXPECT_EQ(r->config.activation, Activation::kGeluTanh);
  EXPECT_EQ(r->config.gate, Gate::kSigmoid);
  EXPECT_EQ(r->config.input_norm, InputNorm::kRms);
  EXPECT_EQ(r->config.norm_eps, 1e-5f);
  EXPECT_FALSE(r->config.shared_keys);
  EXPECT_EQ(r->down->dtype, StDType::kF32);
}

TEST_F(LayoutsTest, TroveLayoutWithSharedKeys) {
  Dims d;
  d.key_heads = 1;
  const CanonicalLayer l = make_layer(d, 2);
  const std::string p = "peer";
  Result<ImportedLayer> r = import_one("a.safetensors", trove_specs(l, p), ImportLayout::kTrove, p,
                                       {}, trove_metadata(p, trove_config(d)));
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  expect_canonical(*r, l, l.norm);
  EXPECT_TRUE(r->config.shared_keys);
  EXPECT_EQ(r->keys.size(), static_cast<size_t>(2 * d.n_keys * d.dim_key));
}

TEST_F(LayoutsTest, TroveLayoutFromHalfPrecisionSources) {
  for (StDType dt : {StDType::kF16, StDType::kBF16}) {
    SCOPED_TRACE(st_dtype_name(dt));
    const Dims d;
    const CanonicalLayer l = make_layer(d, 3, dt);
    const std::string p = "peer";
    Result<ImportedLayer> r =
        import_one(std::string(st_dtype_name(dt)) + ".safetensors", trove_specs(l, p, dt),
                   ImportLayout::kTrove, p, {}, trove_metadata(p, trove_config(d)));
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    expect_canonical(*r, l, l.norm);
    EXPECT_EQ(r->down->dtype, dt);
  }
}

TEST_F(LayoutsTest, TroveLayoutWithoutMetadataDerivesConfigFromShapes) {
  Dims d;
  d.query_bias = false;
  const CanonicalLayer l = make_layer(d, 4);
  ImportOverrides o;
  o.topk = 3;
  Result<ImportedLayer> r =
      import_one("a.safetensors", trove_specs(l, ""), ImportLayout::kTrove, "", o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  expect_canonical(*r, l, l.norm);
  EXPECT_EQ(r->config.topk, 3);
  EXPECT_EQ(r->config.topk_per_half, 3);
  EXPECT_EQ(r->config.input_norm, InputNorm::kRms);
  EXPECT_EQ(r->config.norm_eps, 1e-6f);
  EXPECT_FALSE(r->config.query_bias);
}

TEST_F(LayoutsTest, TroveLayoutWithOneExpertAndOneHead) {
  Dims d;
  d.heads = d.key_heads = 1;
  d.n_keys = 1;
  d.dim_key = 1;
  d.dim = 3;
  d.dim_out = 1;
  const CanonicalLayer l = make_layer(d, 15);
  ImportOverrides o;
  o.topk = 1;
  Result<ImportedLayer> r =
      import_one("a.safetensors", trove_specs(l, "p"), ImportLayout::kTrove, "p", o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  expect_canonical(*r, l, l.norm);
  EXPECT_FALSE(r->config.shared_keys);  // hk = h = 1: per-head keys unless metadata says shared
  EXPECT_EQ(r->config.num_experts(), 1);
}

TEST_F(LayoutsTest, OverridesWinOverMetadata) {
  const Dims d;
  const CanonicalLayer l = make_layer(d, 5);
  const std::string p = "peer";
  ImportOverrides o;
  o.topk = 2;
  o.activation = Activation::kSilu;
  o.gate = Gate::kRelu;
  o.norm_eps = 1e-3f;
  Result<ImportedLayer> r = import_one("a.safetensors", trove_specs(l, p), ImportLayout::kTrove, p,
                                       o, trove_metadata(p, trove_config(d)));
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->config.topk, 2);
  EXPECT_EQ(r->config.topk_per_half, 2);  // --topk alone means k' = k
  EXPECT_EQ(r->config.activation, Activation::kSilu);
  EXPECT_EQ(r->config.gate, Gate::kRelu);
  EXPECT_EQ(r->config.norm_eps, 1e-3f);
  EXPECT_EQ(r->config.input_norm, InputNorm::kRms);  // from metadata

  ImportOverrides only_half;
  only_half.topk_per_half = 5;
  Result<ImportedLayer> r2 =
      import_layer({files_.back().get()}, ImportLayout::kTrove, p, only_half);
  ASSERT_TRUE(r2.ok()) << r2.status().to_string();
  EXPECT_EQ(r2->config.topk, 4);  // from metadata
  EXPECT_EQ(r2->config.topk_per_half, 5);
}

TEST_F(LayoutsTest, OverrideNormNoneDropsTheNorm) {
  const Dims d;
  const CanonicalLayer l = make_layer(d, 6);
  ImportOverrides o;
  o.input_norm = InputNorm::kNone;
  const std::string p = "peer";
  Result<ImportedLayer> r = import_one("a.safetensors", trove_specs(l, p), ImportLayout::kTrove, p,
                                       o, trove_metadata(p, trove_config(d)));
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->config.input_norm, InputNorm::kNone);
  EXPECT_TRUE(r->norm_weight.empty());
}

TEST_F(LayoutsTest, ShardedCheckpointIsReadAcrossFiles) {
  const Dims d;
  const CanonicalLayer l = make_layer(d, 7);
  const std::string p = "peer";
  std::vector<TensorSpec> all = trove_specs(l, p);
  std::vector<TensorSpec> dense;
  std::vector<TensorSpec> experts;
  for (TensorSpec& s : all) {
    (s.name == "peer.down" || s.name == "peer.up" ? experts : dense).push_back(s);
  }
  const SafetensorsFile* a =
      write_and_open("shard-1.safetensors", dense, trove_metadata(p, trove_config(d)));
  const SafetensorsFile* b = write_and_open("shard-2.safetensors", experts);
  ASSERT_TRUE(a && b);
  Result<ImportedLayer> r = import_layer({a, b}, ImportLayout::kTrove, p, {});
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  expect_canonical(*r, l, l.norm);
  EXPECT_EQ(r->source_file, path("shard-2.safetensors"));
}

// ---- mikeybeez layout --------------------------------------------------------------------------

TEST_F(LayoutsTest, MikeybeezLayoutImportsExactly) {
  for (StDType dt : {StDType::kF32, StDType::kBF16}) {
    SCOPED_TRACE(st_dtype_name(dt));
    Dims d;
    d.norm = false;
    const CanonicalLayer l = make_layer(d, 8, dt);
    ImportOverrides o;
    o.topk = 4;
    Result<ImportedLayer> r = import_one(std::string("mb-") + st_dtype_name(dt) + ".safetensors",
                                         mikeybeez_specs(l, "model.layers.21.peer", dt),
                                         ImportLayout::kMikeybeez, "model.layers.21.peer", o);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    expect_canonical(*r, l, {});
    EXPECT_EQ(r->config.activation, Activation::kSilu);
    EXPECT_EQ(r->config.gate, Gate::kRelu);
    EXPECT_EQ(r->config.input_norm, InputNorm::kNone);
    EXPECT_EQ(r->config.topk, 4);
    EXPECT_EQ(r->config.topk_per_half, 4);
    EXPECT_FALSE(r->config.shared_keys);
    EXPECT_TRUE(r->config.query_bias);
  }
}

TEST_F(LayoutsTest, MikeybeezDefaultTopkIsEightWhenItFits) {
  Dims d;
  d.norm = false;
  d.query_bias = false;
  d.n_keys = 8;
  d.heads = d.key_heads = 2;
  d.dim_out = d.dim;
  const CanonicalLayer l = make_layer(d, 9);
  Result<ImportedLayer> r =
      import_one("a.safetensors", mikeybeez_specs(l, ""), ImportLayout::kMikeybeez, "");
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  expect_canonical(*r, l, {});
  EXPECT_EQ(r->config.topk, 8);
  EXPECT_EQ(r->config.topk_per_half, 8);
}

TEST_F(LayoutsTest, DefaultTopkThatDoesNotFitAsksForTopk) {
  Dims d;
  d.norm = false;
  const CanonicalLayer l = make_layer(d, 10);
  Result<ImportedLayer> r =
      import_one("a.safetensors", mikeybeez_specs(l, "peer"), ImportLayout::kMikeybeez, "peer");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("--topk"));
  EXPECT_THAT(r.status().message(), HasSubstr("n_keys is 5"));
}

TEST_F(LayoutsTest, MikeybeezHasNoNormTensor) {
  Dims d;
  d.norm = false;
  const CanonicalLayer l = make_layer(d, 11);
  ImportOverrides o;
  o.topk = 4;
  o.input_norm = InputNorm::kRms;
  Result<ImportedLayer> r =
      import_one("a.safetensors", mikeybeez_specs(l, "peer"), ImportLayout::kMikeybeez, "peer", o);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("layout mikeybeez has no norm tensor"));
}

// ---- lucidrains layout -------------------------------------------------------------------------

TEST_F(LayoutsTest, LucidrainsLayoutImportsExactly) {
  for (bool sequential : {true, false}) {
    for (StDType dt : {StDType::kF32, StDType::kF16}) {
      SCOPED_TRACE(std::string(sequential ? "to_queries.0" : "to_queries") + " " +
                   st_dtype_name(dt));
      const Dims d;
      const CanonicalLayer l = make_layer(d, 12, dt);
      std::vector<float> want_norm = l.norm;
      for (float& g : want_norm) g += 1.0f;
      ImportOverrides o;
      o.topk = 5;
      o.topk_per_half = 4;
      Result<ImportedLayer> r = import_one(
          std::string("luc-") + (sequential ? "seq-" : "") + st_dtype_name(dt) + ".safetensors",
          lucidrains_specs(l, "peer", sequential, dt), ImportLayout::kLucidrains, "peer", o);
      ASSERT_TRUE(r.ok()) << r.status().to_string();
      expect_canonical(*r, l, want_norm);
      EXPECT_EQ(r->config.activation, Activation::kGelu);
      EXPECT_EQ(r->config.gate, Gate::kRelu);  // non_competing_scores=True, PEER-pytorch's default
      EXPECT_EQ(r->config.input_norm, InputNorm::kRms);
      EXPECT_EQ(r->config.norm_eps, 1e-12f);
      EXPECT_EQ(r->config.topk, 5);
      EXPECT_EQ(r->config.topk_per_half, 4);
    }
  }
}

// PEER-pytorch's default non_competing_scores=True: relu gate over the final top-1 per head
// of the k'^2 candidates, k' = num_experts_per_head = 16 (SPEC §2).
TEST_F(LayoutsTest, LucidrainsDefaultsAreNonCompetingScoresTopOneOfSixteenPerHalf) {
  Dims d;
  d.n_keys = 16;
  d.dim_out = d.dim;
  const CanonicalLayer l = make_layer(d, 15);
  Result<ImportedLayer> r = import_one("a.safetensors", lucidrains_specs(l, "peer", true),
                                       ImportLayout::kLucidrains, "peer");
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->config.gate, Gate::kRelu);
  EXPECT_EQ(r->config.activation, Activation::kGelu);
  EXPECT_EQ(r->config.topk, 1);
  EXPECT_EQ(r->config.topk_per_half, 16);
}

// non_competing_scores=False: softmax gate, k = k' = num_experts_per_head; --topk alone sets k'.
TEST_F(LayoutsTest, LucidrainsSoftmaxVariantIsGateSoftmaxWithTopk) {
  Dims d;
  d.n_keys = 16;
  d.dim_out = d.dim;
  const CanonicalLayer l = make_layer(d, 16);
  ImportOverrides o;
  o.gate = Gate::kSoftmax;
  o.topk = 16;
  Result<ImportedLayer> r = import_one("a.safetensors", lucidrains_specs(l, "peer", true),
                                       ImportLayout::kLucidrains, "peer", o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->config.gate, Gate::kSoftmax);
  EXPECT_EQ(r->config.topk, 16);
  EXPECT_EQ(r->config.topk_per_half, 16);
}

TEST_F(LayoutsTest, LucidrainsDefaultTopkPerHalfThatDoesNotFitAsksForTopk) {
  Dims d;
  d.n_keys = 15;
  const CanonicalLayer l = make_layer(d, 17);
  Result<ImportedLayer> r = import_one("a.safetensors", lucidrains_specs(l, "peer", true),
                                       ImportLayout::kLucidrains, "peer");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("topk_per_half = 16"));
  EXPECT_THAT(r.status().message(), HasSubstr("n_keys is 15"));
}

TEST_F(LayoutsTest, LucidrainsWithoutNormHasNoInputNorm) {
  Dims d;
  d.norm = false;
  d.query_bias = false;
  const CanonicalLayer l = make_layer(d, 13);
  ImportOverrides o;
  o.topk = 4;
  o.norm_eps = 1e-6f;
  Result<ImportedLayer> r =
      import_one("a.safetensors", lucidrains_specs(l, "", true), ImportLayout::kLucidrains, "", o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  expect_canonical(*r, l, {});
  EXPECT_EQ(r->config.input_norm, InputNorm::kNone);
}

TEST_F(LayoutsTest, LucidrainsWithBothQueryNamesIsAmbiguous) {
  const Dims d;
  const CanonicalLayer l = make_layer(d, 14);
  std::vector<TensorSpec> specs = lucidrains_specs(l, "peer", true);
  std::vector<TensorSpec> plain = lucidrains_specs(l, "peer", false);
  specs.push_back(plain[0]);  // peer.to_queries.weight
  ImportOverrides o;
  o.topk = 4;
  Result<ImportedLayer> r =
      import_one("a.safetensors", specs, ImportLayout::kLucidrains, "peer", o);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("peer.to_queries.weight"));
  EXPECT_THAT(r.status().message(), HasSubstr("only one"));
}

// ---- errors ------------------------------------------------------------------------------------

class LayoutErrorsTest : public LayoutsTest {
 protected:
  // A trove-layout layer under prefix "peer" with metadata, for breaking one piece at a time.
  void SetUp() override {
    LayoutsTest::SetUp();
    layer_ = make_layer(Dims{}, 20);
    specs_ = trove_specs(layer_, "peer");
    metadata_ = trove_metadata("peer", trove_config(layer_.d));
  }
  Status import_specs() {
    return import_one("broken.safetensors", specs_, ImportLayout::kTrove, "peer", {}, metadata_)
        .status();
  }
  CanonicalLayer layer_;
  std::vector<TensorSpec> specs_;
  std::map<std::string, std::string> metadata_;
};

TEST_F(LayoutErrorsTest, UnbrokenLayerImports) {
  EXPECT_TRUE(import_specs().ok());
}

TEST_F(LayoutErrorsTest, MissingTensorNamesItTheLayoutTheFilesAndSuggestsAPrefix) {
  const SafetensorsFile* f = write_and_open("a.safetensors", trove_specs(layer_, "layers.3.peer"));
  ASSERT_NE(f, nullptr);
  Result<ImportedLayer> r = import_layer({f}, ImportLayout::kTrove, "layers.4.peer", {});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_not_found());
  const std::string& m = r.status().message();
  EXPECT_THAT(m, HasSubstr("'layers.4.peer.down'"));
  EXPECT_THAT(m, HasSubstr("layout trove"));
  EXPECT_THAT(m, HasSubstr(path("a.safetensors")));
  EXPECT_THAT(m, HasSubstr("layers.3.peer.down"));
  EXPECT_THAT(m, HasSubstr("did you mean --prefix 'layers.3.peer'?"));
}

TEST_F(LayoutErrorsTest, MissingKeysNamesTheFullName) {
  specs_.erase(specs_.begin() + 2);  // peer.keys
  Status s = import_specs();
  EXPECT_TRUE(s.is_not_found());
  EXPECT_THAT(s.message(), HasSubstr("'peer.keys' not found"));
  EXPECT_THAT(s.message(), HasSubstr("similar tensors: peer.query.weight"));
}

TEST_F(LayoutErrorsTest, QueryRowsNotAMultipleOfTwiceDimKey) {
  reshape_spec(specs_, "peer.query.weight", {37, 40});
  Status s = import_specs();
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(),
              HasSubstr("'peer.query.weight' has shape [37, 40], expected [h*2*6, 40]"));
}

TEST_F(LayoutErrorsTest, ExpertCountNotAPerfectSquare) {
  reshape_spec(specs_, "peer.down", {24, 40});
  reshape_spec(specs_, "peer.up", {24, 24});
  Status s = import_specs();
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(), HasSubstr("'peer.down' has shape [24, 40]"));
  EXPECT_THAT(s.message(), HasSubstr("not a perfect square"));
}

TEST_F(LayoutErrorsTest, QueryColumnsDisagreeWithDown) {
  reshape_spec(specs_, "peer.query.weight", {36, 41});
  Status s = import_specs();
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(),
              HasSubstr("'peer.query.weight' has shape [36, 41], expected [h*2*6, 40]"));
  EXPECT_THAT(s.message(), HasSubstr("peer.down [25, 40]"));
}

TEST_F(LayoutErrorsTest, KeysDisagreeOnN) {
  reshape_spec(specs_, "peer.keys", {3, 2, 4, 6});
  Status s = import_specs();
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(),
              HasSubstr("'peer.keys' has shape [3, 2, 4, 6], expected [hk, 2, 5, dk]"));
}

TEST_F(LayoutErrorsTest, KeysDisagreeOnHeads) {
  reshape_spec(specs_, "peer.keys", {2, 2, 5, 6});
  Status s = import_specs();
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(), HasSubstr("expected [3 or 1, 2, 5, 6]"));
}

TEST_F(LayoutErrorsTest, UpRowsDisagreeWithDown) {
  reshape_spec(specs_, "peer.up", {16, 24});
  Status s = import_specs();
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(), HasSubstr("'peer.up' has shape [16, 24], expected [25, D_out]"));
}

TEST_F(LayoutErrorsTest, BiasAndNormShapesAreChecked) {
  reshape_spec(specs_, "peer.query.bias", {35});
  Status s = import_specs();
  EXPECT_THAT(s.message(), HasSubstr("'peer.query.bias' has shape [35], expected [36]"));
  specs_ = trove_specs(layer_, "peer");
  reshape_spec(specs_, "peer.norm.weight", {24});
  s = import_specs();
  EXPECT_THAT(s.message(), HasSubstr("'peer.norm.weight' has shape [24], expected [40]"));
}

TEST_F(LayoutErrorsTest, UnsupportedDtypeNamesTensorAndDtype) {
  find_spec(specs_, "peer.keys")->dtype = StDType::kI8;
  Status s = import_specs();
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(), HasSubstr("'peer.keys' has dtype I8"));
}

TEST_F(LayoutErrorsTest, MetadataDisagreeingWithShapes) {
  PeerConfig c = trove_config(layer_.d);
  c.dim_key = 9;
  metadata_ = trove_metadata("peer", c);
  Status s = import_specs();
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(), HasSubstr("dim_key = 9 but the tensors give 6"));

  c = trove_config(layer_.d);
  c.shared_keys = true;
  metadata_ = trove_metadata("peer", c);
  EXPECT_THAT(import_specs().message(), HasSubstr("key heads"));

  c = trove_config(layer_.d);
  c.query_bias = false;
  metadata_ = trove_metadata("peer", c);
  EXPECT_THAT(import_specs().message(),
              HasSubstr("query_bias = false but tensor 'peer.query.bias' is present"));

  c = trove_config(layer_.d);
  c.input_norm = InputNorm::kNone;
  metadata_ = trove_metadata("peer", c);
  EXPECT_THAT(import_specs().message(),
              HasSubstr("input_norm = none but tensor 'peer.norm.weight'"));
}

TEST_F(LayoutErrorsTest, MetadataNormWithoutNormTensor) {
  specs_.pop_back();  // peer.norm.weight
  Status s = import_specs();
  EXPECT_TRUE(s.is_not_found());
  EXPECT_THAT(s.message(), HasSubstr("'peer.norm.weight'"));
}

TEST_F(LayoutErrorsTest, DuplicateTensorAcrossFiles) {
  const SafetensorsFile* a = write_and_open("a.safetensors", specs_, metadata_);
  const SafetensorsFile* b = write_and_open("b.safetensors", {specs_[2]});  // peer.keys again
  ASSERT_TRUE(a && b);
  Result<ImportedLayer> r = import_layer({a, b}, ImportLayout::kTrove, "peer", {});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("'peer.keys' appears in two files"));
  EXPECT_THAT(r.status().message(), HasSubstr(path("b.safetensors")));
}

TEST_F(LayoutErrorsTest, BadMetadataConfig) {
  nlohmann::json j = peer_config_to_json(trove_config(layer_.d));
  j["topk_per_hlaf"] = 3;
  metadata_ = {{"trove.layer.peer", j.dump()}};
  Status s = import_specs();
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(), HasSubstr("trove.layer.peer"));
  EXPECT_THAT(s.message(), HasSubstr("unknown field 'topk_per_hlaf'"));

  j = peer_config_to_json(trove_config(layer_.d));
  j["heads"] = "three";
  metadata_ = {{"trove.layer.peer", j.dump()}};
  EXPECT_THAT(import_specs().message(), HasSubstr("'heads' must be an integer"));

  metadata_ = {{"trove.layer.peer", "{\"dim\": 40,"}};
  EXPECT_THAT(import_specs().message(), HasSubstr("is not valid JSON"));
}

TEST_F(LayoutErrorsTest, HeadsOverrideMustAgreeWithShapes) {
  const SafetensorsFile* f = write_and_open("a.safetensors", specs_, metadata_);
  ASSERT_NE(f, nullptr);
  ImportOverrides o;
  o.heads = 4;
  Result<ImportedLayer> r = import_layer({f}, ImportLayout::kTrove, "peer", o);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("--heads 4 disagrees"));
  o.heads = 3;
  EXPECT_TRUE(import_layer({f}, ImportLayout::kTrove, "peer", o).ok());
}

TEST_F(LayoutErrorsTest, InvalidOverrideIsRejectedByValidation) {
  const SafetensorsFile* f = write_and_open("a.safetensors", specs_, metadata_);
  ASSERT_NE(f, nullptr);
  ImportOverrides o;
  o.topk = 7;  // k' = 7 > n = 5
  Result<ImportedLayer> r = import_layer({f}, ImportLayout::kTrove, "peer", o);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("topk_per_half 7 must be <= n_keys 5"));
}

// ---- read_rows_f32 -----------------------------------------------------------------------------

TEST_F(LayoutsTest, ReadRowsConvertsARangeAndChecksBounds) {
  const Dims d;
  const CanonicalLayer l = make_layer(d, 30, StDType::kBF16);
  const SafetensorsFile* f = write_and_open("a.safetensors", trove_specs(l, "", StDType::kBF16));
  ASSERT_NE(f, nullptr);
  const StTensorView* up = f->find("up");
  ASSERT_NE(up, nullptr);
  std::vector<float> rows(3 * 24);
  ASSERT_TRUE(read_rows_f32(*up, 22, 3, rows.data()).ok());
  EXPECT_EQ(rows, std::vector<float>(l.up.begin() + 22 * 24, l.up.end()));
  EXPECT_TRUE(read_rows_f32(*up, 25, 0, nullptr).ok());
  EXPECT_EQ(read_rows_f32(*up, 23, 3, rows.data()).code(), Status::Code::kOutOfRange);
  EXPECT_EQ(read_rows_f32(*up, -1, 1, rows.data()).code(), Status::Code::kOutOfRange);
  EXPECT_EQ(read_rows_f32(*up, 0, -1, rows.data()).code(), Status::Code::kOutOfRange);
  EXPECT_THAT(read_rows_f32(*f->find("norm.weight"), 0, 1, rows.data()).message(),
              HasSubstr("expected [rows, row_len]"));
}

}  // namespace
}  // namespace trove
