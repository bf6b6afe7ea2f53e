// trove demo: the whole path on a generated checkpoint, in a scratch folder that is removed
// afterwards (--keep to look at it): write, pack, inspect, verify, unpack, and run the layer.
// Later issues grow it into the tiered run.
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "base/bytes.h"
#include "base/random.h"
#include "base/strings.h"
#include "runtime/bench/synthetic.h"
#include "runtime/convert/inspect.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/routing_stats.h"
#include "storage/safetensors.h"
#include "tools/commands.h"

namespace trove::cli {

namespace {

struct DemoArgs {
  int64_t dim = 256;
  int64_t n_keys = 128;
  int64_t layers = 2;
  std::string quant = "int4";
  std::string dir;
  bool keep = false;
  std::string bench_experts = "256K";  // step 7
  int64_t bench_dim = 1024;
};

constexpr int64_t kDemoTokens = 2048;

// Runs the packed layer and the same layer with the checkpoint's own (unquantized) tables on
// one batch of gaussian tokens: throughput, routing statistics, and how far the packed
// layer's output is from the source's.
Result<nlohmann::json> demo_forward(const StoreReader& store, const SafetensorsFile& ckpt,
                                    const SyntheticCheckpoint& spec, bool talk) {
  const std::string& name = spec.prefixes[0];
  TROVE_ASSIGN_OR_RETURN(PeerLayer packed, PeerLayer::open(store, name));
  const PeerConfig& c = packed.config();

  ImportOverrides overrides;
  overrides.topk = c.topk;
  overrides.topk_per_half = c.topk_per_half;
  TROVE_ASSIGN_OR_RETURN(ImportedLayer imported,
                         import_layer({&ckpt}, spec.layout, name, overrides));
  std::vector<float> down(static_cast<size_t>(c.num_experts() * c.dim));
  std::vector<float> up(static_cast<size_t>(c.num_experts() * c.dim_out));
  TROVE_RETURN_IF_ERROR(read_rows_f32(*imported.down, 0, c.num_experts(), down.data()));
  TROVE_RETURN_IF_ERROR(read_rows_f32(*imported.up, 0, c.num_experts(), up.data()));
  TROVE_ASSIGN_OR_RETURN(RecordLayout f32, RecordLayout::make(DType::kF32, c.dim, c.dim_out));
  TROVE_ASSIGN_OR_RETURN(auto source, MemoryExpertSource::pack(f32, down, up));
  PeerDenseParams dense = packed.params();
  TROVE_ASSIGN_OR_RETURN(PeerLayer exact, PeerLayer::create(c, dense, std::move(source)));

  std::vector<float> x(static_cast<size_t>(kDemoTokens * c.dim));
  fill_gaussian(x, 1.0, 0x9e3779b97f4a7c15ull);
  std::vector<float> y(static_cast<size_t>(kDemoTokens * c.dim_out)), y_exact(y.size());
  PeerRouting routing;
  PeerBatchStats stats;
  TROVE_RETURN_IF_ERROR(packed.forward(x, kDemoTokens, y, &routing));  // warm: first-touch checks
  TROVE_RETURN_IF_ERROR(packed.forward(x, kDemoTokens, y, &routing, &stats));
  TROVE_RETURN_IF_ERROR(exact.forward(x, kDemoTokens, y_exact));
  QuantError out_err;
  out_err.add(y_exact.data(), y.data(), static_cast<int64_t>(y.size()));
  RoutingStats rs(c.num_experts());
  rs.add(routing);
  const double seconds = stats.route_seconds + stats.acquire_seconds + stats.expert_seconds;
  if (talk) {
    std::printf(
        "   %lld tokens in %.1f ms: %.0f tokens/s (route %.1f ms, experts %.1f ms at %s "
        "of %s records)\n",
        static_cast<long long>(kDemoTokens), 1e3 * seconds, kDemoTokens / seconds,
        1e3 * stats.route_seconds, 1e3 * stats.expert_seconds,
        format_rate(stats.record_bytes_used / stats.expert_seconds).c_str(),
        std::string(dtype_name(packed.record_layout().dtype)).c_str());
    std::printf(
        "   %lld unique experts of %lld selections; usage %.1f%% of %lld experts, KL from "
        "uniform %.3f nats\n",
        static_cast<long long>(stats.unique_experts), static_cast<long long>(stats.slots),
        100 * rs.usage(), static_cast<long long>(c.num_experts()), rs.kl_from_uniform());
    std::printf("   output vs the unquantized layer: relative error %.4f (rmse %.3e)\n",
                out_err.rel_fro(), out_err.rmse());
  }
  return nlohmann::json{{"tokens", kDemoTokens},
                        {"seconds", seconds},
                        {"tokens_per_second", kDemoTokens / seconds},
                        {"unique_experts", stats.unique_experts},
                        {"usage", rs.usage()},
                        {"kl_from_uniform", rs.kl_from_uniform()},
                        {"output_rel_error_vs_source", out_err.rel_fro()}};
}

int run_demo(const DemoArgs& args, const GlobalOptions& global) {
  const bool talk = !global.quiet && !global.json;
  std::string dir = args.dir;
  bool made_dir = false;
  if (dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp != nullptr ? tmp : "/tmp") + "/trove-demo-XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) {
      return report_error("demo", Status::from_errno("creating a scratch folder " + templ, errno));
    }
    dir = templ;
    made_dir = true;
  } else {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return report_error("demo", Status::io_error("creating " + dir + ": " + ec.message()));
  }
  struct Cleanup {
    std::string dir;
    bool active;
    ~Cleanup() {
      if (active) {
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);
      }
    }
  } cleanup{dir, made_dir && !args.keep};

  SyntheticCheckpoint spec;
  spec.layout = ImportLayout::kMikeybeez;
  spec.prefixes.clear();
  for (int64_t i = 0; i < args.layers; ++i) {
    spec.prefixes.push_back(
        str_printf("model.layers.%lld.mlp.peer", static_cast<long long>(19 + 2 * i)));
  }
  spec.config.dim = args.dim;
  spec.config.heads = 4;
  spec.config.n_keys = args.n_keys;
  spec.config.dim_key = 32;
  spec.config.topk = 8;
  spec.config.activation = Activation::kSilu;
  spec.config.gate = Gate::kRelu;
  spec.dtype = StDType::kBF16;
  const std::string ckpt = dir + "/peer.safetensors";
  const std::string store = dir + "/peer.trove";
  const std::string back = dir + "/back.safetensors";

  if (talk) {
    std::printf(
        "trove demo: %lld PEER layer(s) of %lld experts (D=%lld, h=4, k=8, dk=32, "
        "silu, relu gate), bf16, in mikeybeez layout\nscratch folder: %s%s\n\n",
        static_cast<long long>(args.layers), static_cast<long long>(args.n_keys * args.n_keys),
        static_cast<long long>(args.dim), dir.c_str(),
        cleanup.active ? " (removed at the end; --keep keeps it)" : "");
    std::printf("1. writing a synthetic checkpoint %s\n", ckpt.c_str());
  }
  Status s = write_synthetic_checkpoint(ckpt, spec);
  if (!s.ok()) return report_error("demo", s);

  PackOptions pack;
  pack.inputs = {ckpt};
  pack.output = store;
  pack.layout = ImportLayout::kMikeybeez;
  for (const auto& p : spec.prefixes) pack.layers.push_back({p, p});
  pack.dtype = parse_dtype(args.quant).value();
  pack.command_line = global.command_line;
  if (talk)
    std::printf("2. trove pack %s -o %s --layout mikeybeez --quant %s\n\n", ckpt.c_str(),
                store.c_str(), args.quant.c_str());
  Result<PackReport> packed = pack_store(pack);
  if (!packed.ok()) return report_error("demo", packed.status());
  if (talk) print_pack_report(pack, *packed);

  Result<StoreReader> reader = StoreReader::open(store);
  if (!reader.ok()) return report_error("demo", reader.status());
  const uint64_t table_bytes = packed->output_bytes;
  TierBudgets budgets{0, table_bytes / 10};
  Result<nlohmann::json> inspected = inspect_store(*reader, budgets);
  if (!inspected.ok()) return report_error("demo", inspected.status());
  if (talk) {
    std::printf("\n3. trove inspect %s --host %s\n\n%s", store.c_str(),
                format_bytes(budgets.host).c_str(), render_inspect(*inspected).c_str());
    std::printf("\n4. trove verify %s\n", store.c_str());
  }
  GlobalOptions quiet_verify = global;
  quiet_verify.json = false;
  quiet_verify.quiet = !talk;
  const int verify_code = run_verify(store, quiet_verify);
  if (verify_code != kExitOk) return verify_code;

  UnpackOptions unpack;
  unpack.input = store;
  unpack.output = back;
  if (talk) std::printf("\n5. trove unpack %s -o %s\n", store.c_str(), back.c_str());
  Result<UnpackReport> unpacked = unpack_store(unpack);
  if (!unpacked.ok()) return report_error("demo", unpacked.status());
  // The unpacked tables are the store's reconstruction: compare them with the source to show
  // the error the pack table reported is what a reader gets back.
  Result<SafetensorsFile> src = SafetensorsFile::open(ckpt);
  Result<SafetensorsFile> dst = SafetensorsFile::open(back);
  if (!src.ok()) return report_error("demo", src.status());
  if (!dst.ok()) return report_error("demo", dst.status());
  const std::string& p0 = spec.prefixes[0];
  Result<std::vector<float>> a = src->read_f32(p0 + ".expert_down.weight");
  Result<std::vector<float>> b = dst->read_f32(p0 + ".down");
  if (!a.ok()) return report_error("demo", a.status());
  if (!b.ok()) return report_error("demo", b.status());
  QuantError err;
  err.add(a->data(), b->data(), static_cast<int64_t>(a->size()));
  if (talk) {
    std::printf("   %s: %lld tensors, %s; %s.down round trip rmse %.3e (pack reported %.3e)\n",
                back.c_str(), static_cast<long long>(unpacked->tensors),
                format_bytes(unpacked->output_bytes).c_str(), p0.c_str(), err.rmse(),
                packed->layers[0].down_error.rmse());
  }
  if (talk) {
    std::printf("\n6. trove forward %s --layer %s on %lld gaussian tokens\n", store.c_str(),
                p0.c_str(), static_cast<long long>(kDemoTokens));
  }
  Result<nlohmann::json> forward = demo_forward(*reader, *src, spec, talk);
  if (!forward.ok()) return report_error("demo", forward.status());
  nlohmann::json bench;
  const int bench_code = run_demo_bench(dir, args.bench_experts, args.bench_dim, global, &bench);
  if (bench_code != kExitOk) return bench_code;
  if (talk) {
    std::printf(
        "\nNext: pack your own checkpoint with `trove pack --help`, run it with "
        "`trove forward --help`,\n"
        "measure your disk and budgets with `trove bench --help`.\n");
  }
  if (global.json) {
    nlohmann::json j = {{"pack", pack_report_json(pack, *packed)},
                        {"inspect", *inspected},
                        {"verify", "ok"},
                        {"unpack",
                         {{"tensors", unpacked->tensors},
                          {"bytes", unpacked->output_bytes},
                          {"down_rmse", err.rmse()}}},
                        {"forward", *forward},
                        {"bench", bench}};
    print_json(j);
  }
  return kExitOk;
}

}  // namespace

void add_demo(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "demo",
      "Generate a small PEER checkpoint, pack it to int4, inspect, verify and unpack it, and run\n"
      "the packed layer against the unquantized one, in a scratch folder that is removed\n"
      "afterwards.");
  auto args = std::make_shared<DemoArgs>();
  cmd->add_option("--dim", args->dim, "Model dimension D")->capture_default_str();
  cmd->add_option("--n-keys", args->n_keys, "Sub-keys per half n (N = n^2 experts)")
      ->capture_default_str();
  cmd->add_option("--layers", args->layers, "PEER layers")
      ->capture_default_str()
      ->check(CLI::Range(1, 8));
  cmd->add_option("--quant", args->quant, "Record dtype: int4, int8, bf16, f16 or f32")
      ->check(CLI::IsMember({"int4", "int8", "bf16", "f16", "f32"}))
      ->capture_default_str();
  cmd->add_option("--dir", args->dir, "Work in this folder (kept) instead of a scratch folder");
  cmd->add_flag("--keep", args->keep, "Keep the scratch folder");
  cmd->add_option("--bench-experts", args->bench_experts,
                  "Step 7: experts in the table benchmarked from disk (a square)")
      ->capture_default_str();
  cmd->add_option("--bench-dim", args->bench_dim, "Step 7: model dimension of that table")
      ->check(CLI::Range(int64_t{32}, int64_t{65536}))
      ->capture_default_str();
  cmd->callback([args, &global] { global.exit_code = run_demo(*args, global); });
}

}  // namespace trove::cli
