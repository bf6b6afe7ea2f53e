// trove forward.
#include <cstdio>

#include "base/bytes.h"
#include "base/progress.h"
#include "base/strings.h"
#include "runtime/layer/lookahead.h"
#include "runtime/tiers/cache_policy.h"
#include "tools/commands.h"
#include "tools/forward.h"

namespace trove::cli {

namespace {

nlohmann::json forward_report_json(const ForwardOptions& opt, const ForwardReport& r) {
  const RoutingStats& s = r.stats;
  const Metrics& m = r.metrics;
  const int64_t hits = m.counter("host.hits"), misses = m.counter("host.misses");
  const double expert_seconds = m.real("expert_seconds");
  const double h2d_seconds = m.real("device.copy_seconds");
  const auto h2d_bytes = static_cast<double>(m.counter("device.bytes_copied"));
  nlohmann::json j = {
      {"store", opt.store},
      {"generation", {{"number", r.store_generation}, {"manifest_xxh3", r.store_manifest_xxh3}}},
      {"layer", opt.layer},
      {"backend", peer_backend_name(opt.layer_options.backend)},
      {"routing_math", routing_precision_name(opt.layer_options.cpu.routing_precision)},
      {"expert_dot", expert_dot_name(opt.layer_options.cpu.expert_dot)},
      {"input",
       {{"file", opt.input},
        {"tensor", r.input_tensor},
        {"shape", r.input_shape},
        {"dtype", r.input_dtype}}},
      {"output", {{"file", opt.output}, {"shape", r.output_shape}, {"dtype", r.output_dtype}}},
      {"record_dtype", r.record_dtype},
      {"experts", r.config.num_experts()},
      {"tokens", r.tokens},
      {"batches", r.batches},
      {"seconds", r.seconds},
      {"tokens_per_second", r.seconds > 0 ? r.tokens / r.seconds : 0.0},
      {"stage_seconds",
       {{"route", m.real("route_seconds")},
        {"acquire", m.real("acquire_seconds")},
        {"experts", expert_seconds}}},
      {"record_bytes_used", m.counter("record_bytes_used")},
      {"tiers",
       opt.layer_options.tiers.has_value()
           ? nlohmann::json{{"host_budget_bytes", opt.layer_options.tiers->host_budget_bytes},
                            {"policy", eviction_policy_name(opt.layer_options.tiers->policy)},
                            {"hits", hits},
                            {"misses", misses},
                            {"hit_rate",
                             hits + misses > 0 ? static_cast<double>(hits) / (hits + misses) : 0.0},
                            {"bytes_read", m.counter("host.bytes_read")},
                            {"disk_seconds", m.real("host.disk_seconds")},
                            {"stall_seconds",
                             m.real("host.stall_seconds") + m.real("host.prefetch_wait_seconds")},
                            {"lookahead", opt.lookahead},
                            {"prefetched", m.counter("host.prefetched")}}
           : nlohmann::json(nullptr)},
      {"record_bytes_unique", m.counter("record_bytes_unique")},
      {"device",
       r.device ? nlohmann::json{{"vram_budget_bytes", opt.layer_options.cuda.vram_budget_bytes},
                                 {"hits", m.counter("device.hits")},
                                 {"misses", m.counter("device.misses")},
                                 {"h2d_bytes", m.counter("device.bytes_copied")},
                                 {"h2d_seconds", h2d_seconds},
                                 {"h2d_gb_per_second",
                                  h2d_seconds > 0 ? h2d_bytes / h2d_seconds / 1e9 : 0.0},
                                 {"pinned", m.counter("device.pageable_batches") == 0},
                                 {"h2d_method", r.h2d_method},
                                 {"cpu_misses", m.counter("device.cpu_misses")},
                                 {"cpu_slots", m.counter("device.cpu_slots")},
                                 {"cpu_seconds", m.real("device.cpu_seconds")}}
                : nlohmann::json(nullptr)},
      {"record_gb_per_second",
       expert_seconds > 0
           ? static_cast<double>(m.counter("record_bytes_used")) / expert_seconds / 1e9
           : 0.0},
      // Everything counted, as the Python side's last_stats names it (summed over the batches),
      // with the per-batch latency histograms (seconds: count, sum, mean, p50, p90, p99, max).
      {"metrics", m.to_json()},
  };
  if (!opt.routing_output.empty()) j["routing"] = opt.routing_output;
  if (s.batches() > 0) {
    const auto& u = s.unique_per_batch();
    double mean = 0;
    for (int64_t v : u) mean += static_cast<double>(v);
    j["stats"] = {{"selections", s.selections()},
                  {"experts_used", s.experts_used()},
                  {"usage", s.usage()},
                  {"kl_from_uniform", s.kl_from_uniform()},
                  {"max_share", s.max_share()},
                  {"unique_per_batch",
                   {{"min", *std::min_element(u.begin(), u.end())},
                    {"mean", mean / static_cast<double>(u.size())},
                    {"max", *std::max_element(u.begin(), u.end())}}}};
  }
  return j;
}

void print_forward_report(const nlohmann::json& j, bool stats) {
  std::printf("%s: %lld tokens through %s (%s records, %lld experts) in %.3f s: %.0f tokens/s\n",
              j["output"]["file"].get<std::string>().c_str(), j["tokens"].get<long long>(),
              j["layer"].get<std::string>().c_str(), j["record_dtype"].get<std::string>().c_str(),
              j["experts"].get<long long>(), j["seconds"].get<double>(),
              j["tokens_per_second"].get<double>());
  const auto& st = j["stage_seconds"];
  std::printf("  stages: route %.3f s, acquire %.3f s, experts %.3f s (%s of records read)\n",
              st["route"].get<double>(), st["acquire"].get<double>(), st["experts"].get<double>(),
              format_rate(j["record_gb_per_second"].get<double>() * 1e9).c_str());
  if (const auto& m = j["metrics"]; m.contains("latency") && m["latency"].contains("batch")) {
    const auto& b = m["latency"]["batch"];
    std::printf("  batch latency: p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms\n",
                b["p50"].get<double>() * 1e3, b["p90"].get<double>() * 1e3,
                b["p99"].get<double>() * 1e3, b["max"].get<double>() * 1e3);
  }
  if (const auto& t = j["tiers"]; !t.is_null()) {
    std::printf(
        "  host tier %s (%s): hit rate %.1f%% of unique experts (%lld hits, %lld misses), %s "
        "read from disk in %.3f s busy, layer stalled %.3f s\n",
        format_bytes(t["host_budget_bytes"].get<uint64_t>()).c_str(),
        t["policy"].get<std::string>().c_str(), 100 * t["hit_rate"].get<double>(),
        t["hits"].get<long long>(), t["misses"].get<long long>(),
        format_bytes(t["bytes_read"].get<uint64_t>()).c_str(), t["disk_seconds"].get<double>(),
        t["stall_seconds"].get<double>());
    if (t["lookahead"].get<int>() > 0) {
      std::printf("  look-ahead %d batches: %lld of the hits were read ahead of their batch\n",
                  t["lookahead"].get<int>(), t["prefetched"].get<long long>());
    }
  }
  if (const auto& d = j["device"]; !d.is_null()) {
    const uint64_t vram = d["vram_budget_bytes"].get<uint64_t>();
    std::printf(
        "  device: %s, %lld hits, %lld misses; %s copied host -> device in %.3f s (%s%s, "
        "--h2d %s)\n",
        vram > 0 ? ("tier " + format_bytes(vram)).c_str() : "no tier (--vram)",
        d["hits"].get<long long>(), d["misses"].get<long long>(),
        format_bytes(d["h2d_bytes"].get<uint64_t>()).c_str(), d["h2d_seconds"].get<double>(),
        format_rate(d["h2d_gb_per_second"].get<double>() * 1e9).c_str(),
        d["pinned"].get<bool>() ? "pinned" : ", pageable: pinning failed",
        d["h2d_method"].get<std::string>().c_str());
  }
  if (stats && j.contains("stats")) {
    const auto& s = j["stats"];
    std::printf(
        "  expert usage %.2f%% (%lld of %lld), KL from uniform %.3f nats, top expert "
        "%.2f%% of selections\n",
        100 * s["usage"].get<double>(), s["experts_used"].get<long long>(),
        j["experts"].get<long long>(), s["kl_from_uniform"].get<double>(),
        100 * s["max_share"].get<double>());
    const auto& u = s["unique_per_batch"];
    std::printf(
        "  unique experts per batch: min %lld, mean %.1f, max %lld (of %lld selections "
        "per batch of up to %lld tokens)\n",
        u["min"].get<long long>(), u["mean"].get<double>(), u["max"].get<long long>(),
        s["selections"].get<long long>() / std::max<long long>(1, j["batches"]),
        j["batch_tokens"].get<long long>());
  }
  if (j.contains("routing")) {
    std::printf("  routing: %s\n", j["routing"].get<std::string>().c_str());
  }
}

}  // namespace

void add_forward(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "forward",
      "Run a stored PEER layer on activations: y = PEER(x) for x [..., D] from a safetensors\n"
      "file (F32, F16 or BF16), written as tensor 'y' [..., D_out].\n"
      "Example: trove forward model.trove --layer model.layers.19.mlp.peer --input x.safetensors "
      "\\\n           -o y.safetensors --dump-routing r.safetensors --stats");
  struct Args {
    std::string store, layer, input, input_tensor, output, routing, dtype, backend = "cpu";
    std::string host, device = "cpu", vram, h2d = "auto";
    std::string routing_math = "f32", expert_dot = "float";
    bool cpu_misses = false;
    TierFlags tier;
    int64_t batch = 4096;
    int lookahead = 0;
    int threads = 0;
    bool stats = false, no_verify = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("store", args->store, "The .trove store")->required()->check(CLI::ExistingFile);
  cmd->add_option("--layer", args->layer,
                  "Layer name in the store (`trove inspect` lists them); may be left out when "
                  "the store has one layer");
  cmd->add_option("-i,--input", args->input, "safetensors file with the activations")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--input-tensor", args->input_tensor,
                  "Tensor to read (default: the file's only tensor, else 'x')");
  cmd->add_option("-o,--output", args->output, "safetensors file to write (tensor 'y')")
      ->required();
  cmd->add_option("--dtype", args->dtype, "Output dtype: F32, F16 or BF16 (default: the input's)")
      ->check(CLI::IsMember({"F32", "F16", "BF16", "f32", "f16", "bf16"}));
  cmd->add_option("--dump-routing", args->routing,
                  "Also write the routing: 'ids' (I64), 'scores', 'gates' (F32), each "
                  "[..., heads, topk], best first (input for `trove bench --routing trace:FILE`)");
  cmd->add_flag("--stats", args->stats,
                "Print expert usage, KL unevenness from uniform and unique experts per batch");
  cmd->add_option("--batch", args->batch, "Tokens per layer call")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--lookahead", args->lookahead,
                  "Batches to route and prefetch ahead of the one computing (0: none): with\n"
                  "--host, their missing records are read from disk while this batch computes,\n"
                  "within the budget (less when it has no room). The output is the same bit\n"
                  "for bit")
      ->check(CLI::Range(0, kMaxLookahead))
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "Worker threads (0: all cores)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--backend", args->backend,
                  "cpu (SIMD + threads) or ref (the plain reference kernels, slow; for checking)")
      ->check(CLI::IsMember({"cpu", "ref"}))
      ->capture_default_str();
  cmd->add_option("--routing-math", args->routing_math,
                  "With --backend cpu: the router's two products in f32, bf16 (operands rounded\n"
                  "to bf16) or int8 (operands quantized per row, exact integer products: about\n"
                  "2x f32's GEMM rate with AVX2, 4x with VNNI; may swap experts whose scores are\n"
                  "within ~1%)")
      ->check(CLI::IsMember({"f32", "bf16", "int8"}))
      ->capture_default_str();
  cmd->add_option("--expert-dot", args->expert_dot,
                  "With --backend cpu on int8/int4 records: the down-row dot products on the\n"
                  "float activations (float), or on activations quantized per 32-group to int8\n"
                  "(int8: integer dot products, VNNI where the CPU has it, and the up rows summed\n"
                  "in integers with 16-bit coefficients; error ~1e-2 relative)")
      ->check(CLI::IsMember({"float", "int8"}))
      ->capture_default_str();
  cmd->add_option("--device", args->device,
                  "cpu, or cuda: the layer on the CUDA device (records copied to it per batch,\n"
                  "or kept in a device tier of --vram bytes)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--vram", args->vram,
                  "With --device cuda: device memory budget for expert records (e.g. 12GiB);\n"
                  "records stay there between batches. Default: none, copied per batch")
      ->check(valid_bytes);
  add_h2d_flag(cmd, &args->h2d);
  add_cpu_misses_flag(cmd, &args->cpu_misses);
  cmd->add_flag("--no-verify", args->no_verify,
                "Skip the checksum of each record on its first use (not recommended)");
  cmd->add_option("--host", args->host,
                  "Host memory budget for expert records (e.g. 2GiB): records are read from the\n"
                  "store file on demand into a cache of this size. Default: map the whole table")
      ->check(valid_bytes);
  add_tier_flags(cmd, &args->tier);
  cmd->callback([args, &global] {
    // The device first, before any file is read.
    Result<DeviceChoice> device =
        choose_device(args->device, args->vram, args->backend, args->h2d, args->cpu_misses);
    if (!device.ok()) {
      global.exit_code = report_error("forward", device.status());
      return;
    }
    if ((args->routing_math != "f32" || args->expert_dot != "float") &&
        device->backend != PeerBackend::kCpu) {
      const std::string flag = args->routing_math != "f32" ? "--routing-math " + args->routing_math
                                                           : "--expert-dot " + args->expert_dot;
      global.exit_code = report_error(
          "forward",
          Status::invalid_argument(flag + " is a mode of the CPU backend (leave it out, or "
                                          "use --backend cpu --device cpu)"));
      return;
    }
    ForwardOptions opt;
    opt.store = args->store;
    opt.layer = args->layer;
    opt.input = args->input;
    opt.input_tensor = args->input_tensor;
    opt.output = args->output;
    opt.routing_output = args->routing;
    opt.batch = args->batch;
    opt.lookahead = args->lookahead;
    opt.layer_options.threads = args->threads;
    opt.layer_options.backend = device->backend;
    opt.layer_options.cuda.vram_budget_bytes = device->vram_budget_bytes;
    opt.layer_options.cuda.h2d = device->h2d;
    opt.layer_options.cuda.cpu_misses = args->cpu_misses;
    opt.layer_options.cuda.vram_policy = parse_eviction_policy(args->tier.policy).value();
    opt.layer_options.verify_checksums = !args->no_verify;
    opt.layer_options.cpu.routing_precision = args->routing_math == "int8" ? RoutingPrecision::kInt8
                                              : args->routing_math == "bf16"
                                                  ? RoutingPrecision::kBf16
                                                  : RoutingPrecision::kF32;
    opt.layer_options.cpu.expert_dot =
        args->expert_dot == "int8" ? ExpertDot::kInt8 : ExpertDot::kFloat;
    if (!args->host.empty()) {
      opt.layer_options.tiers = tier_options(args->tier, parse_bytes(args->host).value());
    }
    if (!args->dtype.empty()) {
      std::string d = args->dtype;
      for (char& ch : d) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      opt.out_dtype = d == "F32" ? StDType::kF32 : d == "F16" ? StDType::kF16 : StDType::kBF16;
    }
    if (opt.layer.empty()) {
      // The store's only layer, when it has one; the error lists them otherwise.
      Result<StoreReader> store = StoreReader::open(opt.store);
      if (!store.ok()) {
        global.exit_code = report_error("forward", store.status());
        return;
      }
      if (store->layers().size() != 1) {
        std::string names;
        for (const auto& l : store->layers()) names += (names.empty() ? "" : ", ") + l.name;
        global.exit_code = report_error(
            "forward",
            Status::invalid_argument(opt.store + " has " + std::to_string(store->layers().size()) +
                                     " layers; choose one with --layer (" + names + ")"));
        return;
      }
      opt.layer = store->layers()[0].name;
    }
    std::unique_ptr<ProgressBar> progress;
    opt.progress = [&progress](int64_t done, int64_t total) {
      if (!progress) {
        progress = std::make_unique<ProgressBar>("forward", static_cast<uint64_t>(total));
      }
      progress->update(static_cast<uint64_t>(done));
    };
    Result<ForwardReport> r = run_forward(opt);
    if (progress) progress->finish();
    if (!r.ok()) {
      global.exit_code = report_error("forward", r.status());
      return;
    }
    nlohmann::json j = forward_report_json(opt, *r);
    j["batch_tokens"] = opt.batch;
    if (global.json) {
      print_json(j);
    } else if (!global.quiet) {
      print_forward_report(j, args->stats);
    }
  });
}

}  // namespace trove::cli
