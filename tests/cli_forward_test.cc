// `trove forward` as a user runs it, checked against the math of SPEC §2 written here from
// scratch: each test writes a checkpoint in a FOREIGN layout (trove, mikeybeez, lucidrains),
// packs it with `trove pack --quant f32`, runs the built binary, and compares the output with
// a naive double-precision PEER layer that reads the foreign tensors in their own arrangement
// (lucidrains' half-major query rows, [h, n, 2, dk] keys, its (gamma + 1) RMSNorm ...). It
// shares no code with trove's kernels or layouts, so a misread tensor cannot cancel out.
// Then dtypes and shapes of the input, every bad input (exit 1, a message naming the problem,
// no output file), the --stats --json report, and --device cuda (a clear error before any work
// without a device; equal to --device cpu within tests/cuda_peer_test.cc's tolerances with one).
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "runtime/layer/peer_layer.h"
#include "storage/safetensors.h"
#include "storage/store.h"
#include "tests/cli_util.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using testing::run;
using testing::RunResult;
using testing::ScratchDir;
using testing::slurp;

bool exists(const std::string& path) {
  return std::filesystem::exists(path);
}

// ---- tensors in and out of safetensors files -------------------------------------------------

template <typename T>
std::span<const uint8_t> as_bytes(const std::vector<T>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)};
}

uint16_t bf16_bits(float f) {  // round to nearest even; the test's data has no NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void write_f32(const std::string& path, const std::string& name, std::vector<int64_t> shape,
               const std::vector<float>& v) {
  Status s = write_safetensors(path, {{name, StDType::kF32, std::move(shape), as_bytes(v)}}, {});
  ASSERT_TRUE(s.ok()) << s.to_string();
}

struct ReadTensor {
  StDType dtype = StDType::kF32;
  std::vector<int64_t> shape;
  std::vector<float> values;   // float dtypes, converted
  std::vector<uint8_t> bytes;  // raw little-endian bytes
};

ReadTensor read_tensor(const std::string& path, const std::string& name) {
  ReadTensor t;
  Result<SafetensorsFile> f = SafetensorsFile::open(path);
  EXPECT_TRUE(f.ok()) << f.status().to_string();
  if (!f.ok()) return t;
  const StTensorView* v = f->find(name);
  EXPECT_NE(v, nullptr) << path << " has no tensor " << name;
  if (v == nullptr) return t;
  t.dtype = v->dtype;
  t.shape = v->shape;
  t.bytes.assign(v->bytes.begin(), v->bytes.end());
  if (st_dtype_is_float(v->dtype)) {
    Result<std::vector<float>> values = f->read_f32(name);
    EXPECT_TRUE(values.ok()) << values.status().to_string();
    if (values.ok()) t.values = std::move(*values);
  }
  return t;
}

std::vector<int64_t> as_i64(const ReadTensor& t) {
  std::vector<int64_t> v(t.bytes.size() / 8);
  std::memcpy(v.data(), t.bytes.data(), v.size() * 8);
  return v;
}

// ---- the PEER layer of SPEC §2, from the foreign tensors ---------------------------------------

enum class Layout { kTrove, kMikeybeez, kLucidrains };
enum class Act { kRelu, kGelu, kGeluTanh, kSilu };
enum class GateFn { kSoftmax, kRelu, kSigmoid };
// kRms: x / sqrt(mean(x^2) + eps) * gamma (trove). kLucidrains: PEER-pytorch's RMSNorm,
// F.normalize(x) * sqrt(D) * (gamma + 1), F.normalize dividing by max(||x||_2, 1e-12).
enum class Norm { kNone, kRms, kLucidrains };

const char* layout_name(Layout l) {
  return l == Layout::kTrove ? "trove" : l == Layout::kMikeybeez ? "mikeybeez" : "lucidrains";
}

// One layer's tensors as the foreign checkpoint holds them.
struct ForeignLayer {
  Layout layout = Layout::kTrove;
  int64_t dim = 40, dim_out = 40, heads = 2, n_keys = 6, dim_key = 5, topk = 4, topk_per_half = 3;
  bool shared_keys = false;  // trove layout only: keys [1, 2, n, dk]
  Act act = Act::kRelu;
  GateFn gate = GateFn::kSoftmax;
  Norm norm = Norm::kNone;
  double norm_eps = 1e-6;
  std::vector<float> query;  // [h*2*dk, D], rows in the layout's order
  std::vector<float> bias;   // [h*2*dk] in the same order, or empty
  std::vector<float> keys;   // trove [hk, 2, n, dk]; mikeybeez, lucidrains [h, n, 2, dk]
  std::vector<float> down;   // [N, D]
  std::vector<float> up;     // [N, D_out]
  std::vector<float> gamma;  // [D] or empty

  int64_t num_experts() const { return n_keys * n_keys; }
  int64_t query_rows() const { return heads * 2 * dim_key; }
  // Row of W_q for (head, half, j): lucidrains orders rows (half, head, j).
  int64_t query_row(int64_t head, int64_t half, int64_t j) const {
    return layout == Layout::kLucidrains ? (half * heads + head) * dim_key + j
                                         : (head * 2 + half) * dim_key + j;
  }
  double key(int64_t head, int64_t half, int64_t i, int64_t j) const {
    if (layout == Layout::kTrove) {
      const int64_t hk = shared_keys ? 0 : head;
      return keys[static_cast<size_t>(((hk * 2 + half) * n_keys + i) * dim_key + j)];
    }
    return keys[static_cast<size_t>(((head * n_keys + i) * 2 + half) * dim_key + j)];
  }
  std::vector<int64_t> keys_shape() const {
    if (layout == Layout::kTrove) return {shared_keys ? 1 : heads, 2, n_keys, dim_key};
    return {heads, n_keys, 2, dim_key};
  }
};

std::vector<float> normal(std::mt19937& rng, size_t count, double stddev, double mean = 0) {
  std::normal_distribution<double> dist(mean, stddev);
  std::vector<float> v(count);
  for (float& f : v) f = static_cast<float>(dist(rng));
  return v;
}

// Scales that keep scores, expert pre-activations and outputs O(1).
ForeignLayer make_layer(Layout layout, uint32_t seed) {
  ForeignLayer L;
  L.layout = layout;
  std::mt19937 rng(seed);
  const auto D = static_cast<double>(L.dim);
  L.query = normal(rng, static_cast<size_t>(L.query_rows() * L.dim), 1 / std::sqrt(D));
  const int64_t hk = layout == Layout::kTrove && L.shared_keys ? 1 : L.heads;
  L.keys = normal(rng, static_cast<size_t>(hk * 2 * L.n_keys * L.dim_key), 1.0);
  L.down = normal(rng, static_cast<size_t>(L.num_experts() * L.dim), 1 / std::sqrt(D));
  L.up = normal(rng, static_cast<size_t>(L.num_experts() * L.dim_out), 1.0);
  return L;
}

double activation(Act a, double z) {
  switch (a) {
    case Act::kRelu:
      return z > 0 ? z : 0;
    case Act::kGelu:
      return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
    case Act::kGeluTanh:
      return 0.5 * z * (1 + std::tanh(std::sqrt(2 / M_PI) * (z + 0.044715 * z * z * z)));
    case Act::kSilu:
      return z / (1 + std::exp(-z));
  }
  return 0;
}

struct Selected {
  int64_t id;
  double score;
  double gate = 0;
};

// The best `count` of (score, id): score descending, ties to the lower id.
std::vector<Selected> top(std::vector<Selected> all, int64_t count) {
  std::sort(all.begin(), all.end(), [](const Selected& a, const Selected& b) {
    return a.score != b.score ? a.score > b.score : a.id < b.id;
  });
  all.resize(static_cast<size_t>(count));
  return all;
}

struct Reference {
  std::vector<double> y;                 // [T, D_out]
  std::vector<std::vector<Selected>> r;  // [T * h], each the head's top-k, best first
};

Reference reference_forward(const ForeignLayer& L, const std::vector<float>& x, int64_t T) {
  const int64_t D = L.dim, n = L.n_keys, dk = L.dim_key;
  Reference ref;
  ref.y.assign(static_cast<size_t>(T * L.dim_out), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> xh(x.begin() + t * D, x.begin() + (t + 1) * D);
    double sq = 0;
    for (double v : xh) sq += v * v;
    if (L.norm == Norm::kRms) {
      const double r = 1 / std::sqrt(sq / static_cast<double>(D) + L.norm_eps);
      for (int64_t d = 0; d < D; ++d) xh[d] *= r * L.gamma[d];
    } else if (L.norm == Norm::kLucidrains) {
      const double r = std::sqrt(static_cast<double>(D)) / std::max(std::sqrt(sq), 1e-12);
      for (int64_t d = 0; d < D; ++d) xh[d] *= r * (L.gamma[d] + 1.0);
    }
    for (int64_t head = 0; head < L.heads; ++head) {
      std::vector<Selected> halves[2];
      for (int64_t half = 0; half < 2; ++half) {
        std::vector<double> q(static_cast<size_t>(dk));
        for (int64_t j = 0; j < dk; ++j) {
          const int64_t row = L.query_row(head, half, j);
          double acc = L.bias.empty() ? 0.0 : L.bias[row];
          for (int64_t d = 0; d < D; ++d) acc += L.query[row * D + d] * xh[d];
          q[j] = acc;
        }
        std::vector<Selected> sub;
        for (int64_t i = 0; i < n; ++i) {
          double s = 0;
          for (int64_t j = 0; j < dk; ++j) s += q[j] * L.key(head, half, i, j);
          sub.push_back({i, s});
        }
        halves[half] = top(sub, L.topk_per_half);
      }
      std::vector<Selected> cand;
      for (const Selected& a : halves[0]) {
        for (const Selected& b : halves[1]) cand.push_back({a.id * n + b.id, a.score + b.score});
      }
      std::vector<Selected> best = top(cand, L.topk);
      double max_score = best[0].score, sum = 0;
      for (Selected& s : best) {
        switch (L.gate) {
          case GateFn::kSoftmax:
            s.gate = std::exp(s.score - max_score);
            sum += s.gate;
            break;
          case GateFn::kRelu:
            s.gate = std::max(s.score, 0.0);
            break;
          case GateFn::kSigmoid:
            s.gate = 1 / (1 + std::exp(-s.score));
            break;
        }
      }
      if (L.gate == GateFn::kSoftmax) {
        for (Selected& s : best) s.gate /= sum;
      }
      for (const Selected& s : best) {
        double z = 0;
        for (int64_t d = 0; d < D; ++d) z += L.down[s.id * D + d] * xh[d];
        const double a = activation(L.act, z);
        for (int64_t o = 0; o < L.dim_out; ++o) {
          ref.y[t * L.dim_out + o] += s.gate * a * L.up[s.id * L.dim_out + o];
        }
      }
      ref.r.push_back(best);
    }
  }
  return ref;
}

// ---- checkpoints in the foreign layouts -------------------------------------------------------

const char* act_name(Act a) {
  return a == Act::kRelu       ? "relu"
         : a == Act::kGelu     ? "gelu"
         : a == Act::kGeluTanh ? "gelu_tanh"
                               : "silu";
}
const char* gate_name(GateFn g) {
  return g == GateFn::kSoftmax ? "softmax" : g == GateFn::kRelu ? "relu" : "sigmoid";
}

// Writes the layers (each under its prefix) in their layout's names; trove-layout layers carry
// their config in __metadata__["trove.layer.<prefix>"].
void write_checkpoint(const std::string& path,
                      const std::vector<std::pair<std::string, const ForeignLayer*>>& layers) {
  std::vector<StTensorOut> out;
  std::map<std::string, std::string> meta;
  for (const auto& [prefix, lp] : layers) {
    const ForeignLayer& L = *lp;
    const std::string p = prefix + ".";
    const int64_t N = L.num_experts();
    auto add = [&](const std::string& name, std::vector<int64_t> shape,
                   const std::vector<float>& v) {
      out.push_back({p + name, StDType::kF32, std::move(shape), as_bytes(v)});
    };
    switch (L.layout) {
      case Layout::kTrove: {
        add("query.weight", {L.query_rows(), L.dim}, L.query);
        if (!L.bias.empty()) add("query.bias", {L.query_rows()}, L.bias);
        add("keys", L.keys_shape(), L.keys);
        add("down", {N, L.dim}, L.down);
        add("up", {N, L.dim_out}, L.up);
        if (!L.gamma.empty()) add("norm.weight", {L.dim}, L.gamma);
        nlohmann::json c = {{"dim", L.dim},
                            {"dim_out", L.dim_out},
                            {"heads", L.heads},
                            {"n_keys", L.n_keys},
                            {"dim_key", L.dim_key},
                            {"topk", L.topk},
                            {"topk_per_half", L.topk_per_half},
                            {"activation", act_name(L.act)},
                            {"gate", gate_name(L.gate)},
                            {"input_norm", L.norm == Norm::kRms ? "rms" : "none"},
                            {"norm_eps", L.norm_eps},
                            {"shared_keys", L.shared_keys},
                            {"query_bias", !L.bias.empty()}};
        meta["trove.layer." + prefix] = c.dump();
        break;
      }
      case Layout::kMikeybeez:
        add("to_queries.weight", {L.query_rows(), L.dim}, L.query);
        if (!L.bias.empty()) add("to_queries.bias", {L.query_rows()}, L.bias);
        add("keys", L.keys_shape(), L.keys);
        add("expert_down.weight", {N, L.dim}, L.down);
        add("expert_up.weight", {N, L.dim_out}, L.up);
        break;
      case Layout::kLucidrains:
        add("to_queries.weight", {L.query_rows(), L.dim}, L.query);
        add("keys", L.keys_shape(), L.keys);
        add("weight_down_embed.weight", {N, L.dim}, L.down);
        add("weight_up_embed.weight", {N, L.dim_out}, L.up);
        if (!L.gamma.empty()) add("norm.gamma", {L.dim}, L.gamma);
        break;
    }
  }
  Status s = write_safetensors(path, out, meta);
  ASSERT_TRUE(s.ok()) << s.to_string();
}

// `trove pack --quant f32` of the layers written by write_checkpoint. The foreign layouts do
// not record topk, so it is given on the command line (their default k', 8 and 16, exceed n).
void pack(const ScratchDir& dir, const std::string& store,
          const std::vector<std::pair<std::string, const ForeignLayer*>>& layers) {
  const std::string ckpt = store + ".safetensors";
  ASSERT_NO_FATAL_FAILURE(write_checkpoint(ckpt, layers));
  const ForeignLayer& L = *layers[0].second;
  std::vector<std::string> args = {"pack",    ckpt,  "-o", store, "--layout", layout_name(L.layout),
                                   "--quant", "f32", "-q"};
  for (const auto& layer : layers) {
    args.push_back("--prefix");
    args.push_back(layer.first);
  }
  if (L.layout != Layout::kTrove) {
    for (const std::string& a : {std::string("--topk"), std::to_string(L.topk),
                                 std::string("--topk-per-half"), std::to_string(L.topk_per_half)}) {
      args.push_back(a);
    }
  }
  // lucidrains' default gate is relu (PEER-pytorch's non_competing_scores=True); its softmax
  // variant is asked for.
  if (L.layout == Layout::kLucidrains && L.gate != GateFn::kRelu) {
    args.push_back("--gate");
    args.push_back(gate_name(L.gate));
  }
  RunResult r = run(dir, args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

// ---- comparisons ---------------------------------------------------------------------------

// trove computes in fp32: a dot product of D = 40 terms of magnitude O(1) carries a rounding
// error of a few 1e-6, and it propagates through the gates (softmax, sigmoid, relu: Lipschitz
// 1 in the scores) and a sum over h * k = 8 experts into outputs of magnitude O(1). 1e-4
// absolute + 1e-4 relative is ~100x the largest error seen (about 1% of the tolerance on
// every test here), while a misread tensor (a permuted query row or key, lucidrains' norm
// without its + 1) moves every output by O(0.1-1).
constexpr double kAbsTol = 1e-4;
constexpr double kRelTol = 1e-4;

::testing::AssertionResult near_reference(const std::vector<float>& got,
                                          const std::vector<double>& want) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  }
  int bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= kAbsTol + kRelTol * std::abs(want[i]))) {
      if (++bad <= 5) {
        first += " [" + std::to_string(i) + "] got " + std::to_string(got[i]) + " want " +
                 std::to_string(want[i]) + ";";
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " values off:" << first;
}

// The dumped routing: per (token, head) the same set of ids as the reference, and the score
// and gate of each id within tolerance.
void expect_routing(const std::string& path, const ForeignLayer& L, const Reference& ref,
                    std::vector<int64_t> leading) {
  ReadTensor ids = read_tensor(path, "ids");
  ReadTensor scores = read_tensor(path, "scores");
  ReadTensor gates = read_tensor(path, "gates");
  std::vector<int64_t> shape = leading;
  shape.push_back(L.heads);
  shape.push_back(L.topk);
  ASSERT_EQ(ids.dtype, StDType::kI64);
  ASSERT_EQ(ids.shape, shape);
  ASSERT_EQ(scores.shape, shape);
  ASSERT_EQ(gates.shape, shape);
  const std::vector<int64_t> id = as_i64(ids);
  for (size_t th = 0; th < ref.r.size(); ++th) {
    std::set<int64_t> want, got;
    for (const Selected& s : ref.r[th]) want.insert(s.id);
    for (int64_t j = 0; j < L.topk; ++j) got.insert(id[th * L.topk + j]);
    EXPECT_EQ(got, want) << "token " << th / L.heads << " head " << th % L.heads;
    for (int64_t j = 0; j < L.topk; ++j) {
      const size_t at = th * L.topk + j;
      for (const Selected& s : ref.r[th]) {
        if (s.id != id[at]) continue;
        EXPECT_NEAR(scores.values[at], s.score, kAbsTol + kRelTol * std::abs(s.score));
        EXPECT_NEAR(gates.values[at], s.gate, kAbsTol + kRelTol * std::abs(s.gate));
      }
    }
  }
}

constexpr int64_t kTokens = 9;
const std::string kPrefix = "model.layers.7.mlp.peer";

// Packs L, runs `trove forward` on T random tokens with each backend, and checks y and the
// routing against the reference.
void check_import(const ForeignLayer& L, uint32_t seed) {
  ScratchDir dir;
  const std::string store = dir.file("m.trove");
  ASSERT_NO_FATAL_FAILURE(pack(dir, store, {{kPrefix, &L}}));

  std::mt19937 rng(seed);
  const std::vector<float> x = normal(rng, static_cast<size_t>(kTokens * L.dim), 1.0);
  ASSERT_NO_FATAL_FAILURE(write_f32(dir.file("x.safetensors"), "x", {kTokens, L.dim}, x));
  const Reference ref = reference_forward(L, x, kTokens);
  double norm = 0;
  for (double v : ref.y) norm += v * v;
  ASSERT_GT(norm, 1.0) << "degenerate test data: the reference output is ~0";

  for (const char* backend : {"cpu", "ref"}) {
    SCOPED_TRACE(std::string("--backend ") + backend);
    RunResult r = run(dir, {"forward", store, "--layer", kPrefix, "-i", dir.file("x.safetensors"),
                            "-o", dir.file("y.safetensors"), "--dump-routing",
                            dir.file("r.safetensors"), "--backend", backend, "-q"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ReadTensor y = read_tensor(dir.file("y.safetensors"), "y");
    EXPECT_EQ(y.dtype, StDType::kF32);
    EXPECT_EQ(y.shape, (std::vector<int64_t>{kTokens, L.dim_out}));
    EXPECT_TRUE(near_reference(y.values, ref.y));
    expect_routing(dir.file("r.safetensors"), L, ref, {kTokens});
  }
}

// ---- 1. import fidelity --------------------------------------------------------------------

TEST(CliForward, TroveLayoutMatchesTheMathWithBiasRmsNormAndDimOut) {
  ForeignLayer L = make_layer(Layout::kTrove, 11);
  L.dim_out = 24;
  std::mt19937 rng(12);
  L.up = normal(rng, static_cast<size_t>(L.num_experts() * L.dim_out), 1.0);
  L.bias = normal(rng, static_cast<size_t>(L.query_rows()), 0.5);
  L.gamma = normal(rng, static_cast<size_t>(L.dim), 0.3, 1.0);
  L.norm = Norm::kRms;
  L.norm_eps = 1e-5;
  L.act = Act::kRelu;
  L.gate = GateFn::kSoftmax;
  check_import(L, 13);
}

TEST(CliForward, TroveLayoutMatchesTheMathWithSharedKeysGeluTanhSigmoid) {
  ForeignLayer L = make_layer(Layout::kTrove, 21);
  L.shared_keys = true;
  std::mt19937 rng(22);
  L.keys = normal(rng, static_cast<size_t>(2 * L.n_keys * L.dim_key), 1.0);
  L.act = Act::kGeluTanh;
  L.gate = GateFn::kSigmoid;
  check_import(L, 23);
}

TEST(CliForward, MikeybeezLayoutMatchesTheMathWithSiluAndReluGate) {
  ForeignLayer L = make_layer(Layout::kMikeybeez, 31);
  L.act = Act::kSilu;  // the layout's defaults: nothing on the command line says so
  L.gate = GateFn::kRelu;
  check_import(L, 33);
}

TEST(CliForward, LucidrainsLayoutMatchesTheMathWithGeluSoftmaxAndItsNorm) {
  ForeignLayer L = make_layer(Layout::kLucidrains, 41);
  std::mt19937 rng(42);
  L.gamma = normal(rng, static_cast<size_t>(L.dim), 0.3);  // scales by gamma + 1
  L.norm = Norm::kLucidrains;
  L.act = Act::kGelu;
  L.gate = GateFn::kSoftmax;
  check_import(L, 43);
}

TEST(CliForward, LucidrainsLayoutDefaultsToGeluAndReluGate) {
  ForeignLayer L = make_layer(Layout::kLucidrains, 45);
  std::mt19937 rng(46);
  L.gamma = normal(rng, static_cast<size_t>(L.dim), 0.3);
  L.norm = Norm::kLucidrains;
  L.act = Act::kGelu;  // the layout's defaults: nothing on the command line says so
  L.gate = GateFn::kRelu;
  check_import(L, 47);
}

TEST(CliForward, LucidrainsLayoutWithoutNormMatchesTheMath) {
  ForeignLayer L = make_layer(Layout::kLucidrains, 51);
  L.act = Act::kGelu;
  L.gate = GateFn::kSoftmax;
  check_import(L, 53);
}

// ---- 2. dtypes and shapes of the input --------------------------------------------------------

class CliForwardStore : public ::testing::Test {
 protected:
  void SetUp() override {
    layer_ = make_layer(Layout::kMikeybeez, 61);
    layer_.act = Act::kSilu;
    layer_.gate = GateFn::kRelu;
    store_ = dir_.file("m.trove");
    ASSERT_NO_FATAL_FAILURE(pack(dir_, store_, {{kPrefix, &layer_}}));
  }

  RunResult forward(const std::string& input, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"forward", store_, "--layer", kPrefix, "-i",
                                     input,     "-o",   y_path(),  "-q"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(dir_, args);
  }
  std::string y_path() const { return dir_.file("y.safetensors"); }

  // Runs a bad input and checks: exit 1, stderr has every piece of `message`, no output.
  void expect_rejected(const std::string& input, const std::vector<std::string>& message,
                       std::vector<std::string> extra = {}) {
    extra.push_back("--dump-routing");
    extra.push_back(dir_.file("r.safetensors"));
    RunResult r = forward(input, extra);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    for (const std::string& m : message) {
      EXPECT_NE(r.err.find(m), std::string::npos) << "'" << m << "' not in: " << r.err;
    }
    EXPECT_FALSE(exists(y_path())) << "an output was written for a rejected input";
    EXPECT_FALSE(exists(dir_.file("r.safetensors"))) << "a routing dump was written";
  }

  ScratchDir dir_;
  ForeignLayer layer_;
  std::string store_;
};

TEST_F(CliForwardStore, Bf16InputGivesBf16OutputOrF32OnRequestAndKeepsLeadingDims) {
  const int64_t D = layer_.dim;
  std::mt19937 rng(62);
  std::vector<float> x = normal(rng, static_cast<size_t>(10 * D), 1.0);
  std::vector<uint16_t> xb(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    xb[i] = bf16_bits(x[i]);
    x[i] = bf16_value(xb[i]);
  }
  const std::string xf = dir_.file("xf.safetensors"), xh = dir_.file("xh.safetensors");
  ASSERT_NO_FATAL_FAILURE(write_f32(xf, "x", {10, D}, x));
  ASSERT_TRUE(write_safetensors(xh, {{"x", StDType::kBF16, {2, 5, D}, as_bytes(xb)}}, {}).ok());

  RunResult r = forward(xf);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const ReadTensor y32 = read_tensor(y_path(), "y");
  ASSERT_EQ(y32.shape, (std::vector<int64_t>{10, layer_.dim_out}));
  EXPECT_TRUE(near_reference(y32.values, reference_forward(layer_, x, 10).y));

  r = forward(xh);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const ReadTensor y16 = read_tensor(y_path(), "y");
  EXPECT_EQ(y16.dtype, StDType::kBF16);
  ASSERT_EQ(y16.shape, (std::vector<int64_t>{2, 5, layer_.dim_out}));
  ASSERT_EQ(y16.bytes.size(), y32.values.size() * 2);
  for (size_t i = 0; i < y32.values.size(); ++i) {
    uint16_t got;
    std::memcpy(&got, &y16.bytes[2 * i], 2);
    EXPECT_EQ(got, bf16_bits(y32.values[i])) << i << ": the F32 run's value rounded to bf16";
  }

  r = forward(xh, {"--dtype", "F32"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const ReadTensor yf = read_tensor(y_path(), "y");
  EXPECT_EQ(yf.dtype, StDType::kF32);
  ASSERT_EQ(yf.shape, (std::vector<int64_t>{2, 5, layer_.dim_out}));
  EXPECT_EQ(yf.values, y32.values);

  // A 1-D [D] tensor is one token.
  const std::vector<float> x0(x.begin(), x.begin() + D);
  ASSERT_NO_FATAL_FAILURE(write_f32(dir_.file("x0.safetensors"), "x", {D}, x0));
  r = forward(dir_.file("x0.safetensors"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const ReadTensor y0 = read_tensor(y_path(), "y");
  ASSERT_EQ(y0.shape, (std::vector<int64_t>{layer_.dim_out}));
  EXPECT_EQ(y0.values, std::vector<float>(y32.values.begin(), y32.values.begin() + y0.shape[0]));
}

TEST_F(CliForwardStore, EmptyBatchWritesAnEmptyOutput) {
  ASSERT_NO_FATAL_FAILURE(write_f32(dir_.file("x.safetensors"), "x", {0, layer_.dim}, {}));
  RunResult r = forward(dir_.file("x.safetensors"), {"--dump-routing", dir_.file("r.safetensors")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ReadTensor y = read_tensor(y_path(), "y");
  EXPECT_EQ(y.shape, (std::vector<int64_t>{0, layer_.dim_out}));
  EXPECT_TRUE(y.values.empty());
  ReadTensor ids = read_tensor(dir_.file("r.safetensors"), "ids");
  EXPECT_EQ(ids.shape, (std::vector<int64_t>{0, layer_.heads, layer_.topk}));
}

// ---- 3. bad input ------------------------------------------------------------------------

TEST_F(CliForwardStore, WrongDimIsRejectedNamingTheShapeAndTheDim) {
  const int64_t D = layer_.dim;
  ASSERT_NO_FATAL_FAILURE(write_f32(dir_.file("x.safetensors"), "x", {kTokens, D + 1},
                                    std::vector<float>(static_cast<size_t>(kTokens * (D + 1)))));
  expect_rejected(dir_.file("x.safetensors"), {"[9, 41]", "[..., 40]"});
}

TEST_F(CliForwardStore, IntegerInputIsRejectedNamingItsDtype) {
  const int64_t D = layer_.dim;
  std::vector<int32_t> i32(static_cast<size_t>(kTokens * D), 1);
  std::vector<int64_t> i64(i32.size(), 1);
  ASSERT_TRUE(write_safetensors(dir_.file("x32.safetensors"),
                                {{"x", StDType::kI32, {kTokens, D}, as_bytes(i32)}}, {})
                  .ok());
  ASSERT_TRUE(write_safetensors(dir_.file("x64.safetensors"),
                                {{"x", StDType::kI64, {kTokens, D}, as_bytes(i64)}}, {})
                  .ok());
  expect_rejected(dir_.file("x32.safetensors"), {"dtype I32", "F32, F16 or BF16"});
  expect_rejected(dir_.file("x64.safetensors"), {"dtype I64", "F32, F16 or BF16"});
}

TEST_F(CliForwardStore, NonFiniteInputIsRejectedNamingTokenAndElement) {
  const int64_t D = layer_.dim;
  std::mt19937 rng(71);
  std::vector<float> x = normal(rng, static_cast<size_t>(kTokens * D), 1.0);
  x[3 * D + 7] = std::numeric_limits<float>::quiet_NaN();
  ASSERT_NO_FATAL_FAILURE(write_f32(dir_.file("nan.safetensors"), "x", {kTokens, D}, x));
  expect_rejected(dir_.file("nan.safetensors"), {"token 3, element 7", "nan"});

  x[3 * D + 7] = 0.5f;
  x[5 * D + 0] = std::numeric_limits<float>::infinity();
  ASSERT_NO_FATAL_FAILURE(write_f32(dir_.file("inf.safetensors"), "x", {kTokens, D}, x));
  expect_rejected(dir_.file("inf.safetensors"), {"token 5, element 0", "inf"});
}

// The token named is the token of the file, not its index within the --batch slice.
TEST_F(CliForwardStore, NonFiniteInputInALaterBatchNamesTheTokenOfTheFile) {
  const int64_t D = layer_.dim;
  std::mt19937 rng(72);
  std::vector<float> x = normal(rng, static_cast<size_t>(kTokens * D), 1.0);
  x[6 * D + 2] = std::numeric_limits<float>::quiet_NaN();
  ASSERT_NO_FATAL_FAILURE(write_f32(dir_.file("nan.safetensors"), "x", {kTokens, D}, x));
  expect_rejected(dir_.file("nan.safetensors"), {"token 6, element 2", "nan"}, {"--batch", "4"});
}

TEST_F(CliForwardStore, UnknownLayerIsRejectedListingTheStoresLayers) {
  ASSERT_NO_FATAL_FAILURE(write_f32(dir_.file("x.safetensors"), "x", {1, layer_.dim},
                                    std::vector<float>(static_cast<size_t>(layer_.dim), 1.0f)));
  RunResult r = run(dir_, {"forward", store_, "--layer", "model.layers.8.mlp.peer", "-i",
                           dir_.file("x.safetensors"), "-o", y_path(), "-q"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("model.layers.8.mlp.peer"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("layers: " + kPrefix), std::string::npos) << r.err;
  EXPECT_FALSE(exists(y_path()));
}

TEST_F(CliForwardStore, SeveralTensorsAndNoneNamedXNeedInputTensor) {
  const int64_t D = layer_.dim;
  std::mt19937 rng(81);
  const std::vector<float> a = normal(rng, static_cast<size_t>(kTokens * D), 1.0);
  const std::vector<float> b = normal(rng, static_cast<size_t>(kTokens * D), 1.0);
  const std::string in = dir_.file("ab.safetensors");
  ASSERT_TRUE(write_safetensors(in,
                                {{"hidden.a", StDType::kF32, {kTokens, D}, as_bytes(a)},
                                 {"hidden.b", StDType::kF32, {kTokens, D}, as_bytes(b)}},
                                {})
                  .ok());
  expect_rejected(in, {"none is named 'x'", "--input-tensor", "hidden.a", "hidden.b"});
  expect_rejected(in, {"no tensor named 'hidden.c'"}, {"--input-tensor", "hidden.c"});

  RunResult r = forward(in, {"--input-tensor", "hidden.b"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(
      near_reference(read_tensor(y_path(), "y").values, reference_forward(layer_, b, kTokens).y));
}

TEST_F(CliForwardStore, HostBudgetGivesTheResidentOutputBitForBitOrAClearErrorFirst) {
  const int64_t D = layer_.dim;
  std::mt19937 rng(111);
  const std::vector<float> x = normal(rng, static_cast<size_t>(kTokens * D), 1.0);
  const std::string xin = dir_.file("x.safetensors");
  ASSERT_NO_FATAL_FAILURE(write_f32(xin, "x", {kTokens, D}, x));
  auto store = StoreReader::open(store_);
  ASSERT_TRUE(store.ok());
  const uint64_t stride = store->find_layer(kPrefix)->table.stride;
  // A batch of 4 tokens selects at most 4 * h * k = 32 distinct experts (of 36).
  const int64_t per_batch = 4 * layer_.heads * layer_.topk;
  ASSERT_EQ(forward(xin, {"--batch", "4"}).exit_code, 0);
  const std::string resident = slurp(y_path());
  for (const char* io : {"pread", "auto"}) {
    for (int64_t slots : {per_batch, per_batch + 3, layer_.num_experts()}) {
      SCOPED_TRACE(std::string(io) + " " + std::to_string(slots) + " slots");
      std::remove(y_path().c_str());
      RunResult r = forward(xin, {"--batch", "4", "--io", io, "--host",
                                  std::to_string(static_cast<uint64_t>(slots) * stride)});
      ASSERT_EQ(r.exit_code, 0) << r.err;
      EXPECT_EQ(slurp(y_path()), resident) << "tiered output differs from the resident one";
    }
  }
  // One slot short of a batch's working set: refused before anything runs or is written.
  std::remove(y_path().c_str());
  expect_rejected(xin, {"host budget", "raise --host to at least", "or lower --batch"},
                  {"--batch", "4", "--host", std::to_string((per_batch - 1) * stride)});
  // Not a size at all.
  RunResult bad = forward(xin, {"--host", "lots"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--host"), std::string::npos) << bad.err;
}

// --landing-groups reads each batch's misses in groups (the cuda backend computes each as it
// lands; the cpu one waits for all): the same bytes as all-resident; out of range is refused.
TEST_F(CliForwardStore, LandingGroupsGiveTheSameBytes) {
  const int64_t D = layer_.dim;
  std::mt19937 rng(113);
  const std::vector<float> x = normal(rng, static_cast<size_t>(23 * D), 1.0);
  const std::string xin = dir_.file("x.safetensors");
  ASSERT_NO_FATAL_FAILURE(write_f32(xin, "x", {23, D}, x));
  auto store = StoreReader::open(store_);
  ASSERT_TRUE(store.ok());
  const uint64_t stride = store->find_layer(kPrefix)->table.stride;
  const int64_t per_batch = 4 * layer_.heads * layer_.topk;
  ASSERT_EQ(forward(xin, {"--batch", "4"}).exit_code, 0);
  const std::string resident = slurp(y_path());
  for (const char* groups : {"2", "5"}) {
    SCOPED_TRACE(std::string(groups) + " landing groups");
    std::remove(y_path().c_str());
    RunResult r = forward(xin, {"--batch", "4", "--landing-groups", groups, "--host",
                                std::to_string(static_cast<uint64_t>(per_batch + 3) * stride)});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(slurp(y_path()), resident) << "output differs from the resident one";
  }
  RunResult bad = forward(xin, {"--landing-groups", "0"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--landing-groups"), std::string::npos) << bad.err;
}

// --lookahead routes and prefetches later batches while one computes: the output files are
// the same bytes as without it and as all-resident, at host budgets from one batch's working set
// (no room to prefetch: it prefetches less) to the whole table, on both I/O engines; and with
// room, records were read ahead of their batch.
TEST_F(CliForwardStore, LookaheadGivesTheSameBytesAtEveryHostBudget) {
  const int64_t D = layer_.dim;
  constexpr int64_t kMany = 41;  // 11 batches of 4, the last short
  std::mt19937 rng(112);
  const std::vector<float> x = normal(rng, static_cast<size_t>(kMany * D), 1.0);
  const std::string xin = dir_.file("x.safetensors");
  ASSERT_NO_FATAL_FAILURE(write_f32(xin, "x", {kMany, D}, x));
  auto store = StoreReader::open(store_);
  ASSERT_TRUE(store.ok());
  const uint64_t stride = store->find_layer(kPrefix)->table.stride;
  const int64_t per_batch = 4 * layer_.heads * layer_.topk;
  const std::string routing = dir_.file("r.safetensors");
  ASSERT_EQ(forward(xin, {"--batch", "4", "--dump-routing", routing}).exit_code, 0);
  const std::string resident = slurp(y_path());
  const std::string resident_routing = slurp(routing);
  for (const char* io : {"pread", "auto"}) {
    for (int64_t slots : {per_batch, per_batch + 3, layer_.num_experts()}) {
      for (const char* depth : {"0", "1", "2", "8"}) {
        SCOPED_TRACE(std::string(io) + " " + std::to_string(slots) + " slots, lookahead " + depth);
        std::remove(y_path().c_str());
        std::remove(routing.c_str());
        RunResult r =
            run(dir_, {"forward", store_, "--layer", kPrefix, "-i", xin, "-o", y_path(), "--json",
                       "--batch", "4", "--io", io, "--lookahead", depth, "--dump-routing", routing,
                       "--host", std::to_string(static_cast<uint64_t>(slots) * stride)});
        ASSERT_EQ(r.exit_code, 0) << r.err;
        EXPECT_EQ(slurp(y_path()), resident) << "output differs from the resident one";
        EXPECT_EQ(slurp(routing), resident_routing) << "routing differs from the resident one";
        const nlohmann::json j = nlohmann::json::parse(r.out);
        EXPECT_EQ(j["batches"], 11);
        EXPECT_EQ(j["tiers"]["lookahead"], std::stoi(depth));
        const int64_t prefetched = j["tiers"]["prefetched"].get<int64_t>();
        if (std::string(depth) == "0") {
          EXPECT_EQ(prefetched, 0);
        } else if (slots == layer_.num_experts()) {
          // The whole table fits: every record is read once, and all of them ahead of their
          // batch (the first batch's too: it is prefetched, then waited for).
          EXPECT_EQ(j["tiers"]["misses"], 0) << r.out;
          EXPECT_GT(prefetched, 0) << r.out;
        }
      }
    }
  }
  RunResult bad = forward(xin, {"--lookahead", "9"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--lookahead"), std::string::npos) << bad.err;
}

TEST(CliForward, TwoLayerStoreNeedsLayerAndRunsTheOneNamed) {
  ScratchDir dir;
  ForeignLayer a = make_layer(Layout::kMikeybeez, 91), b = make_layer(Layout::kMikeybeez, 92);
  for (ForeignLayer* L : {&a, &b}) {
    L->act = Act::kSilu;
    L->gate = GateFn::kRelu;
  }
  const std::string store = dir.file("m.trove");
  ASSERT_NO_FATAL_FAILURE(pack(dir, store, {{"layers.3.peer", &a}, {"layers.5.peer", &b}}));
  std::mt19937 rng(93);
  const std::vector<float> x = normal(rng, static_cast<size_t>(kTokens * a.dim), 1.0);
  ASSERT_NO_FATAL_FAILURE(write_f32(dir.file("x.safetensors"), "x", {kTokens, a.dim}, x));
  const std::string y = dir.file("y.safetensors");

  RunResult r = run(dir, {"forward", store, "-i", dir.file("x.safetensors"), "-o", y, "-q"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  for (const char* m : {"2 layers", "--layer", "layers.3.peer", "layers.5.peer"}) {
    EXPECT_NE(r.err.find(m), std::string::npos) << "'" << m << "' not in: " << r.err;
  }
  EXPECT_FALSE(exists(y));

  r = run(dir, {"forward", store, "--layer", "layers.5.peer", "-i", dir.file("x.safetensors"), "-o",
                y, "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(near_reference(read_tensor(y, "y").values, reference_forward(b, x, kTokens).y));
}

// ---- 4. --stats --json ----------------------------------------------------------------------

TEST_F(CliForwardStore, StatsJsonMatchesTheRoutingOfEachBatch) {
  const int64_t D = layer_.dim;
  std::mt19937 rng(101);
  const std::vector<float> x = normal(rng, static_cast<size_t>(kTokens * D), 1.0);
  ASSERT_NO_FATAL_FAILURE(write_f32(dir_.file("x.safetensors"), "x", {kTokens, D}, x));
  RunResult r = run(dir_, {"forward", store_, "--layer", kPrefix, "-i", dir_.file("x.safetensors"),
                           "-o", y_path(), "--stats", "--json", "--batch", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tokens"], kTokens);
  EXPECT_EQ(j["batches"], 3);
  ASSERT_TRUE(j.contains("stats")) << r.out;
  const nlohmann::json& s = j["stats"];

  // What the reference routing says, batch by batch: tokens [0, 4), [4, 8), [8, 9).
  const Reference ref = reference_forward(layer_, x, kTokens);
  const auto N = static_cast<double>(layer_.num_experts());
  std::vector<int64_t> counts(static_cast<size_t>(layer_.num_experts()), 0);
  std::vector<int64_t> unique;
  for (int64_t first = 0; first < kTokens; first += 4) {
    std::set<int64_t> ids;
    for (int64_t t = first; t < std::min(first + 4, kTokens); ++t) {
      for (int64_t head = 0; head < layer_.heads; ++head) {
        for (const Selected& sel : ref.r[t * layer_.heads + head]) {
          ids.insert(sel.id);
          ++counts[sel.id];
        }
      }
    }
    unique.push_back(static_cast<int64_t>(ids.size()));
  }
  const int64_t selections = kTokens * layer_.heads * layer_.topk;
  int64_t used = 0, max_count = 0;
  double kl = 0;
  for (int64_t c : counts) {
    if (c == 0) continue;
    ++used;
    max_count = std::max(max_count, c);
    const double p = static_cast<double>(c) / static_cast<double>(selections);
    kl += p * std::log(p * N);
  }

  EXPECT_EQ(s["selections"], selections);
  EXPECT_EQ(s["experts_used"], used);
  const double usage = s["usage"].get<double>();
  EXPECT_GT(usage, 0.0);
  EXPECT_LE(usage, 1.0);
  EXPECT_NEAR(usage, static_cast<double>(used) / N, 1e-12);
  EXPECT_GE(s["kl_from_uniform"].get<double>(), 0.0);
  EXPECT_NEAR(s["kl_from_uniform"].get<double>(), kl, 1e-9);
  EXPECT_NEAR(s["max_share"].get<double>(),
              static_cast<double>(max_count) / static_cast<double>(selections), 1e-12);
  const nlohmann::json& u = s["unique_per_batch"];
  EXPECT_EQ(u["min"], *std::min_element(unique.begin(), unique.end()));
  EXPECT_EQ(u["max"], *std::max_element(unique.begin(), unique.end()));
  EXPECT_NEAR(u["mean"].get<double>(), (unique[0] + unique[1] + unique[2]) / 3.0, 1e-12);
  // The last batch holds one token: its heads select at most h * k distinct experts.
  EXPECT_LE(u["min"].get<int64_t>(), layer_.heads * layer_.topk);
}

// The report's "metrics" (base/metrics.h): the batches' counters summed, each per-batch latency
// a histogram of one sample per batch, and the figures above them read from the same sums.
TEST_F(CliForwardStore, JsonMetricsSumTheBatchesAndHistogramEachOne) {
  const int64_t D = layer_.dim;
  constexpr int64_t kMany = 41;  // 11 batches of 4, the last short
  std::mt19937 rng(115);
  const std::vector<float> x = normal(rng, static_cast<size_t>(kMany * D), 1.0);
  const std::string xin = dir_.file("x.safetensors");
  ASSERT_NO_FATAL_FAILURE(write_f32(xin, "x", {kMany, D}, x));
  auto store = StoreReader::open(store_);
  ASSERT_TRUE(store.ok());
  const uint64_t stride = store->find_layer(kPrefix)->table.stride;
  const int64_t per_batch = 4 * layer_.heads * layer_.topk;
  for (const char* depth : {"0", "2"}) {
    SCOPED_TRACE(std::string("lookahead ") + depth);
    RunResult r = run(dir_, {"forward", store_, "--layer", kPrefix, "-i", xin, "-o", y_path(),
                             "--json", "--batch", "4", "--lookahead", depth, "--host",
                             std::to_string(static_cast<uint64_t>(per_batch + 5) * stride)});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const nlohmann::json j = nlohmann::json::parse(r.out);
    ASSERT_TRUE(j.contains("metrics")) << r.out;
    const nlohmann::json& m = j["metrics"];
    EXPECT_EQ(m["tokens"], kMany);
    EXPECT_EQ(m["slots"], kMany * layer_.heads * layer_.topk);
    EXPECT_LE(m["unique_experts"].get<int64_t>(), m["slots"].get<int64_t>());
    EXPECT_EQ(m["host"]["hits"].get<int64_t>() + m["host"]["misses"].get<int64_t>(),
              m["unique_experts"].get<int64_t>());
    // A cold tier reads its first batch's records: as misses, or ahead of it.
    EXPECT_GT(m["host"]["misses"].get<int64_t>() + m["host"]["prefetched"].get<int64_t>(), 0);
    EXPECT_EQ(j["tiers"]["hits"], m["host"]["hits"]);
    EXPECT_EQ(j["tiers"]["misses"], m["host"]["misses"]);
    EXPECT_EQ(j["tiers"]["prefetched"], m["host"]["prefetched"]);
    EXPECT_EQ(j["tiers"]["bytes_read"], m["host"]["bytes_read"]);
    EXPECT_GE(m["host"]["bytes_read"].get<uint64_t>(),
              m["host"]["misses"].get<uint64_t>() * stride);
    EXPECT_EQ(j["record_bytes_used"], m["record_bytes_used"]);
    EXPECT_EQ(j["stage_seconds"]["experts"], m["expert_seconds"]);
    for (const char* name : {"batch", "route", "acquire", "experts"}) {
      SCOPED_TRACE(name);
      const nlohmann::json& h = m["latency"][name];
      EXPECT_EQ(h["count"], 11);
      const double p50 = h["p50"], p90 = h["p90"], p99 = h["p99"], max = h["max"];
      EXPECT_GE(p50, 0.0);
      EXPECT_LE(p50, p90);
      EXPECT_LE(p90, p99);
      EXPECT_LE(p99, max);
      EXPECT_LE(max, h["sum"].get<double>());
      EXPECT_NEAR(h["mean"].get<double>() * 11, h["sum"].get<double>(), 1e-9);
    }
    // A stage's histogram holds the same samples its sum adds.
    EXPECT_NEAR(m["latency"]["route"]["sum"].get<double>(), j["stage_seconds"]["route"], 1e-9);
    EXPECT_NEAR(m["latency"]["experts"]["sum"].get<double>(), j["stage_seconds"]["experts"], 1e-9);
    // Batch latencies lie within the run, and cover its stages.
    EXPECT_LE(m["latency"]["batch"]["sum"].get<double>(), j["seconds"].get<double>() + 1e-9);
    EXPECT_GE(m["latency"]["batch"]["sum"].get<double>(),
              m["latency"]["experts"]["sum"].get<double>());
  }
}

// ---- 5. --device cuda -------------------------------------------------------------------------

bool have_cuda() {
  return check_backend_available(PeerBackend::kCuda).ok();
}

TEST_F(CliForwardStore, DeviceCudaWithoutADeviceFailsBeforeAnyWork) {
  if (have_cuda()) GTEST_SKIP() << "a CUDA device is present; the no-device path is not reachable";
  const int64_t D = layer_.dim;
  std::mt19937 rng(121);
  const std::string xin = dir_.file("x.safetensors");
  ASSERT_NO_FATAL_FAILURE(
      write_f32(xin, "x", {kTokens, D}, normal(rng, static_cast<size_t>(kTokens * D), 1.0)));
  for (const std::vector<std::string>& extra :
       {std::vector<std::string>{"--device", "cuda"},
        std::vector<std::string>{"--device", "cuda", "--vram", "1GiB", "--host", "1MiB"}}) {
    expect_rejected(xin, {"no CUDA device is available (", "); run without --device cuda"}, extra);
  }
  // trove bench too, before it writes a store.
  const std::string bench_dir = dir_.file("bench");
  RunResult r = run(dir_, {"bench", "--device", "cuda", "--experts", "1024", "--dim", "64",
                           "--store", bench_dir, "--no-calibrate"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("no CUDA device is available ("), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("; run without --device cuda"), std::string::npos) << r.err;
  EXPECT_FALSE(exists(bench_dir)) << "bench did work before refusing the device";
}

TEST_F(CliForwardStore, VramNeedsDeviceCudaAndRefDoesNotRunThere) {
  const int64_t D = layer_.dim;
  std::mt19937 rng(122);
  const std::string xin = dir_.file("x.safetensors");
  ASSERT_NO_FATAL_FAILURE(
      write_f32(xin, "x", {kTokens, D}, normal(rng, static_cast<size_t>(kTokens * D), 1.0)));
  expect_rejected(xin, {"--vram 1GiB", "needs --device cuda"}, {"--vram", "1GiB"});
  expect_rejected(xin, {"--backend ref", "--device cuda"},
                  {"--device", "cuda", "--backend", "ref"});
  expect_rejected(xin, {"--h2d gather", "needs --device cuda"}, {"--h2d", "gather"});
  expect_rejected(xin, {"--cpu-misses", "needs --device cuda"}, {"--cpu-misses"});
  RunResult r = run(dir_, {"bench", "--cpu-misses", "--experts", "1024"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("--cpu-misses"), std::string::npos) << r.err;
  r = run(dir_, {"bench", "--vram", "1GiB", "--experts", "1024"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("needs --device cuda"), std::string::npos) << r.err;
  r = run(dir_, {"bench", "--h2d", "batch", "--experts", "1024"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("--h2d batch says how records reach the device; it needs --device cuda"),
            std::string::npos)
      << r.err;
  r = run(dir_, {"bench", "--h2d", "dma", "--experts", "1024"});
  EXPECT_EQ(r.exit_code, 2) << r.err;  // CLI11's usage error
}

// --routing-math reaches the CPU layer: int8 and bf16 routing give other bytes than f32 (their
// scores are not f32's), the same bytes at any thread count, and the report names the modes;
// the modes are refused where they do not exist (the reference backend).
TEST_F(CliForwardStore, RoutingMathReachesTheCpuLayerAndIsRefusedElsewhere) {
  const int64_t D = layer_.dim;
  std::mt19937 rng(123);
  const std::string xin = dir_.file("x.safetensors");
  ASSERT_NO_FATAL_FAILURE(
      write_f32(xin, "x", {kTokens, D}, normal(rng, static_cast<size_t>(kTokens * D), 1.0)));
  ASSERT_EQ(forward(xin).exit_code, 0);
  const std::string f32 = slurp(y_path());
  for (const char* math : {"bf16", "int8"}) {
    SCOPED_TRACE(math);
    RunResult r = forward(xin, {"--routing-math", math, "--threads", "1"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const std::string one_thread = slurp(y_path());
    EXPECT_NE(one_thread, f32) << "--routing-math " << math << " gave f32 routing's bytes";
    r = run(dir_, {"forward", store_, "--layer", kPrefix, "-i", xin, "-o", y_path(), "--json",
                   "--routing-math", math, "--expert-dot", "int8", "--threads", "3"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const nlohmann::json j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["routing_math"], math);
    EXPECT_EQ(j["expert_dot"], "int8");
    EXPECT_EQ(slurp(y_path()), one_thread) << "f32 records: the int8 dot falls back to float";
  }
  std::remove(y_path().c_str());
  expect_rejected(xin, {"--routing-math int8", "CPU backend", "--backend cpu"},
                  {"--routing-math", "int8", "--backend", "ref"});
  expect_rejected(xin, {"--expert-dot int8 is a mode of the CPU backend"},
                  {"--expert-dot", "int8", "--backend", "ref"});
  RunResult bad = forward(xin, {"--routing-math", "fp8"});
  EXPECT_EQ(bad.exit_code, 2) << bad.err;  // CLI11's usage error
  EXPECT_NE(bad.err.find("--routing-math"), std::string::npos) << bad.err;
}

TEST_F(CliForwardStore, DeviceCudaEqualsDeviceCpuAtSeveralVramAndHostBudgets) {
  if (!have_cuda()) {
    GTEST_SKIP() << "no CUDA device: " << check_backend_available(PeerBackend::kCuda).message();
  }
  // tests/cuda_peer_test.cc's forward tolerances, against the largest |y|.
  constexpr double kAbs = 1e-5, kRel = 1e-5;
  const int64_t D = layer_.dim;
  std::mt19937 rng(123);
  const std::vector<float> x = normal(rng, static_cast<size_t>(kTokens * D), 1.0);
  const std::string xin = dir_.file("x.safetensors");
  ASSERT_NO_FATAL_FAILURE(write_f32(xin, "x", {kTokens, D}, x));
  ASSERT_EQ(forward(xin, {"--batch", "4"}).exit_code, 0);
  const std::vector<float> want = read_tensor(y_path(), "y").values;
  double scale = 0;
  for (float v : want) scale = std::max(scale, std::abs(static_cast<double>(v)));
  auto store = StoreReader::open(store_);
  ASSERT_TRUE(store.ok());
  const uint64_t stride = store->find_layer(kPrefix)->table.stride;
  const int64_t per_batch = 4 * layer_.heads * layer_.topk;
  const std::string slots[] = {"", std::to_string(per_batch * stride),
                               std::to_string((per_batch + 3) * stride),
                               std::to_string(layer_.num_experts() * stride)};
  for (const std::string& vram : slots) {
    for (const std::string& host : {slots[0], slots[1], slots[3]}) {
      SCOPED_TRACE("--vram '" + vram + "' --host '" + host + "'");
      std::remove(y_path().c_str());
      std::vector<std::string> extra = {"--batch", "4", "--device", "cuda"};
      if (!vram.empty()) extra.insert(extra.end(), {"--vram", vram});
      if (!host.empty()) extra.insert(extra.end(), {"--host", host, "--h2d", "gather"});
      RunResult r = forward(xin, extra);
      ASSERT_EQ(r.exit_code, 0) << r.err;
      const std::vector<float> got = read_tensor(y_path(), "y").values;
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_LE(std::abs(static_cast<double>(got[i]) - want[i]),
                  kAbs * scale + kRel * std::abs(static_cast<double>(want[i])))
            << "element " << i;
      }
    }
  }
  // The device tier below one batch: refused before anything is written, naming --vram.
  std::remove(y_path().c_str());
  expect_rejected(
      xin, {"device budget", "raise --vram to at least"},
      {"--batch", "4", "--device", "cuda", "--vram", std::to_string((per_batch - 1) * stride)});
}

}  // namespace
}  // namespace trove
