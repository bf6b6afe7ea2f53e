// The `trove` binary as a user runs it: exit codes, messages, --json, and the crash safety of
// `pack` under SIGKILL at random moments.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <random>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "runtime/bench/synthetic.h"
#include "runtime/layer/store_layer.h"
#include "storage/file.h"
#include "storage/store.h"
#include "tests/cli_util.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using testing::run;
using testing::RunResult;
using testing::ScratchDir;
using testing::slurp;
using testing::spawn;

Status write_checkpoint(const std::string& path, int64_t dim, int64_t n_keys) {
  SyntheticCheckpoint spec;
  spec.layout = ImportLayout::kMikeybeez;
  spec.prefixes = {"model.layers.19.mlp.peer"};
  spec.config.dim = dim;
  spec.config.heads = 2;
  spec.config.n_keys = n_keys;
  spec.config.dim_key = 8;
  spec.config.topk = 4;
  spec.dtype = StDType::kBF16;
  return write_synthetic_checkpoint(path, spec);
}

std::vector<std::string> pack_args(const ScratchDir& dir) {
  return {"pack",     dir.file("in.safetensors"),
          "-o",       dir.file("m.trove"),
          "--layout", "mikeybeez",
          "--prefix", "model.layers.19.mlp.peer",
          "--quant",  "int4",
          "-q"};
}

TEST(Cli, HelpExplainsEveryCommand) {
  ScratchDir dir;
  RunResult r = run(dir, {"--help"});
  EXPECT_EQ(r.exit_code, 0);
  for (const char* cmd : {"pack", "unpack", "inspect", "verify", "demo", "forward", "bench",
                          "train", "export", "import", "Exit codes"}) {
    EXPECT_NE(r.out.find(cmd), std::string::npos) << cmd;
  }
}

TEST(Cli, DemoRunsEndToEndAndLeavesNoFiles) {
  ScratchDir dir;
  setenv("TMPDIR", dir.path().c_str(), 1);
  RunResult r = run(dir, {"demo", "--dim", "64", "--n-keys", "16", "--bench-experts", "16K",
                          "--bench-dim", "256", "--json"});
  unsetenv("TMPDIR");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["verify"], "ok");
  // Step 7: the layer from disk through a tenth of its table.
  ASSERT_EQ(j["bench"]["points"].size(), 1u) << r.out;
  const auto& p = j["bench"]["points"][0];
  EXPECT_EQ(p["experts"], 16384);
  EXPECT_NEAR(p["host_budget_share"].get<double>(), 0.1, 0.01);
  EXPECT_GT(p["tokens_per_second"].get<double>(), 0.0);
  EXPECT_GT(p["misses_per_batch"].get<double>(), 0.0);
  EXPECT_LE(p["cold_run_hit_rate"].get<double>(), p["belady_hit_rate"].get<double>() + 1e-12);
  EXPECT_EQ(j["pack"]["layers"].size(), 2u);
  EXPECT_GT(j["unpack"]["down_rmse"].get<double>(), 0.0);
  EXPECT_TRUE(dir.list().empty()) << "demo left files behind";
}

TEST(Cli, PackInspectVerifyUnpack) {
  ScratchDir dir;
  ASSERT_TRUE(write_checkpoint(dir.file("in.safetensors"), 64, 12).ok());
  RunResult p = run(dir, pack_args(dir));
  ASSERT_EQ(p.exit_code, 0) << p.err;

  RunResult i = run(dir, {"inspect", dir.file("m.trove"), "--json", "--host", "16KiB"});
  ASSERT_EQ(i.exit_code, 0) << i.err;
  auto j = nlohmann::json::parse(i.out);
  EXPECT_EQ(j["layers"][0]["experts"], 144);
  EXPECT_EQ(j["tiers"]["host"]["budget"], 16384);

  RunResult v = run(dir, {"verify", dir.file("m.trove")});
  EXPECT_EQ(v.exit_code, 0) << v.err;
  EXPECT_NE(v.out.find("OK"), std::string::npos);

  RunResult u = run(dir, {"unpack", dir.file("m.trove"), "-o", dir.file("back.safetensors"), "-q"});
  EXPECT_EQ(u.exit_code, 0) << u.err;
  auto back = SafetensorsFile::open(dir.file("back.safetensors"));
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_NE(back->find("model.layers.19.mlp.peer.down"), nullptr);
}

TEST(Cli, VerifyNamesTheDamagedExpertAndExitsThree) {
  ScratchDir dir;
  ASSERT_TRUE(write_checkpoint(dir.file("in.safetensors"), 64, 12).ok());
  ASSERT_EQ(run(dir, pack_args(dir)).exit_code, 0);
  auto store = StoreReader::open(dir.file("m.trove"));
  ASSERT_TRUE(store.ok());
  const StoreTableInfo table = store->layers()[0].table;
  auto bytes = testing::read_all(dir.file("m.trove"));
  bytes[table.offset + 37 * table.stride + 5] ^= 0x10;  // expert 37
  testing::write_all(dir.file("m.trove"), bytes);

  RunResult v = run(dir, {"verify", dir.file("m.trove")});
  EXPECT_EQ(v.exit_code, 3);
  EXPECT_NE(v.err.find("expert 37"), std::string::npos) << v.err;
}

TEST(Cli, ExportImportRoundTripsAndRefusesDamage) {
  ScratchDir dir;
  ASSERT_TRUE(write_checkpoint(dir.file("in.safetensors"), 64, 12).ok());
  ASSERT_EQ(run(dir, pack_args(dir)).exit_code, 0);
  RunResult e = run(dir, {"export", dir.file("m.trove"), dir.file("m.zst"), "--json"});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  auto j = nlohmann::json::parse(e.out);
  EXPECT_TRUE(j["verified"].get<bool>());
  EXPECT_GT(j["by_dtype"]["int4"]["bytes"].get<uint64_t>(), 0u);
  EXPECT_LT(j["archive_bytes"].get<uint64_t>(), j["store_bytes"].get<uint64_t>());

  RunResult i = run(dir, {"import", dir.file("m.zst"), dir.file("r.trove")});
  ASSERT_EQ(i.exit_code, 0) << i.err;
  EXPECT_EQ(testing::read_all(dir.file("r.trove")), testing::read_all(dir.file("m.trove")));
  RunResult again = run(dir, {"import", dir.file("m.zst"), dir.file("r.trove")});
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_NE(again.err.find("already exists"), std::string::npos) << again.err;
  EXPECT_EQ(run(dir, {"import", dir.file("m.zst"), dir.file("r.trove"), "--force", "-q"}).exit_code,
            0);

  // A damaged store is not exported (exit 3, the expert named); a damaged archive not imported.
  auto store = StoreReader::open(dir.file("m.trove"));
  ASSERT_TRUE(store.ok());
  const StoreTableInfo table = store->layers()[0].table;
  auto bytes = testing::read_all(dir.file("m.trove"));
  bytes[table.offset + 37 * table.stride + 5] ^= 0x10;
  testing::write_all(dir.file("m.trove"), bytes);
  RunResult bad = run(dir, {"export", dir.file("m.trove"), dir.file("bad.zst")});
  EXPECT_EQ(bad.exit_code, 3);
  EXPECT_NE(bad.err.find("expert 37"), std::string::npos) << bad.err;
  auto archive = testing::read_all(dir.file("m.zst"));
  archive.resize(archive.size() - 10);
  testing::write_all(dir.file("cut.zst"), archive);
  RunResult cut = run(dir, {"import", dir.file("cut.zst"), dir.file("c.trove")});
  EXPECT_EQ(cut.exit_code, 3);
  EXPECT_NE(cut.err.find("cut.zst"), std::string::npos) << cut.err;
  EXPECT_FALSE(file_exists(dir.file("c.trove")));
}

TEST(Cli, BadInputsGiveClearErrors) {
  ScratchDir dir;
  ASSERT_TRUE(write_checkpoint(dir.file("in.safetensors"), 64, 12).ok());
  RunResult r = run(dir, {"pack", dir.file("in.safetensors"), "-o", dir.file("m.trove"), "--layout",
                          "mikeybeez", "--prefix", "model.layers.20.mlp.peer"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("model.layers.20.mlp.peer"), std::string::npos) << r.err;

  testing::write_all(dir.file("junk.trove"), std::vector<uint8_t>(10000, 'x'));
  RunResult v = run(dir, {"verify", dir.file("junk.trove")});
  EXPECT_NE(v.exit_code, 0);
  EXPECT_NE(v.err.find("junk.trove"), std::string::npos) << v.err;

  RunResult b = run(dir, {"inspect", dir.file("junk.trove"), "--host", "12 parsecs"});
  EXPECT_EQ(b.exit_code, 1);
  EXPECT_NE(b.err.find("parsecs"), std::string::npos) << b.err;

  RunResult u = run(dir, {"frobnicate"});
  EXPECT_EQ(u.exit_code, 2);
}

// Kills `trove pack` at random moments over an existing store: afterwards the destination is
// always either the previous store, byte for byte, or a complete new one that verifies;
// nothing else is left in the folder but, rarely, the documented named temporary, which the
// next pack removes. TROVE_KILL_ITERATIONS raises the count (soak).
TEST(Cli, PackKilledAtAnyMomentLeavesTheOldOrTheNewStore) {
  ScratchDir dir;
  ASSERT_TRUE(write_checkpoint(dir.file("in.safetensors"), 512, 64).ok());  // ~8 MiB of bf16
  // The previous store: same layer packed as int8, so old and new differ.
  std::vector<std::string> old_args = pack_args(dir);
  old_args[9] = "int8";
  ASSERT_EQ(run(dir, old_args).exit_code, 0);
  const std::vector<uint8_t> old_bytes = testing::read_all(dir.file("m.trove"));

  // Time one full pack to spread the kills over its whole life.
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(run(dir, pack_args(dir)).exit_code, 0);
  const double full_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  const char* env = std::getenv("TROVE_KILL_ITERATIONS");
  const int iterations = env != nullptr ? std::atoi(env) : 12;
  std::mt19937 rng(1234);
  int saw_old = 0, saw_new = 0, leftovers = 0;
  std::vector<pid_t> killed;
  for (int it = 0; it < iterations; ++it) {
    testing::write_all(dir.file("m.trove"), old_bytes);
    // Kill times spread evenly (with jitter) over 0 .. 2x a full run: the early ones land
    // before the rename, the late ones after it, so both outcomes must be seen.
    const double slot = full_ms * 2.0 / iterations;
    const double delay = slot * (it + std::uniform_real_distribution<double>(0, 1)(rng));
    pid_t pid = spawn(pack_args(dir), dir.file(".out"), dir.file(".err"));
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(delay * 1000)));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    unlink(dir.file(".out").c_str());
    unlink(dir.file(".err").c_str());

    const std::vector<uint8_t> now = testing::read_all(dir.file("m.trove"));
    if (now == old_bytes) {
      ++saw_old;
    } else {
      auto store = StoreReader::open(dir.file("m.trove"));
      ASSERT_TRUE(store.ok()) << "iteration " << it << " after " << delay
                              << " ms: " << store.status().to_string();
      auto faults = store->verify();
      ASSERT_TRUE(faults.ok());
      ASSERT_TRUE(faults->empty()) << "iteration " << it;
      ++saw_new;
    }
    // A kill in the instant between naming the finished file and renaming it over the
    // destination leaves one hidden ".m.trove.tmp-<pid>-<n>" (storage/file.h); anything else
    // left behind is a bug. The next pack removes such a leftover (checked after the loop).
    killed.push_back(pid);
    for (const std::string& name : dir.list()) {
      if (name == "in.safetensors" || name == "m.trove") continue;
      const std::string prefix = ".m.trove.tmp-";
      const bool from_a_killed_pack =
          name.rfind(prefix, 0) == 0 &&
          std::find(killed.begin(), killed.end(), std::atoi(name.c_str() + prefix.size())) !=
              killed.end();
      ASSERT_TRUE(from_a_killed_pack) << "iteration " << it << " left " << name;
      ++leftovers;
    }
  }
  ASSERT_EQ(run(dir, pack_args(dir)).exit_code, 0);
  EXPECT_EQ(dir.list(), (std::vector<std::string>{"in.safetensors", "m.trove"}))
      << "a complete pack did not remove what killed ones left";
  EXPECT_EQ(saw_old + saw_new, iterations);
  EXPECT_GT(saw_old, 0) << "no kill landed before the new store was in place";
  EXPECT_GT(saw_new, 0) << "no kill landed after the new store was in place";
  std::printf(
      "pack killed %d times over %.0f ms: old store %d times, new store %d times, a named "
      "temporary seen (then removed) %d times\n",
      iterations, full_ms, saw_old, saw_new, leftovers);
}

// trove bench on a small layer (4096 experts, D 64, h 2, k 4, dk 8, batch 16) plus `more`.
std::vector<std::string> small_bench(std::initializer_list<std::string> more) {
  std::vector<std::string> args = {"bench",   "--experts", "4096",   "--dim", "64",
                                   "--heads", "2",         "--topk", "4",     "--dim-key",
                                   "8",       "--batch",   "16"};
  args.insert(args.end(), more);
  return args;
}

TEST(Cli, BenchSweepsWritesJsonAndAPlotAndRefusesBadSizes) {
  ScratchDir dir;
  const std::string plot = dir.file("sweep.png");
  RunResult r =
      run(dir, small_bench({"--host", "5%,20%", "--routing", "zipf:1.09", "--batches", "4",
                            "--warmup", "2", "--store", dir.file("stores"), "--calibrate-seconds",
                            "0.1", "--no-fio", "--plot", plot, "--json"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["points"].size(), 2u);
  EXPECT_LT(j["points"][0]["host_budget_bytes"].get<uint64_t>(),
            j["points"][1]["host_budget_bytes"].get<uint64_t>());
  for (const auto& p : j["points"]) {
    EXPECT_EQ(p["requested_per_batch"].get<double>(), 16 * 2 * 4);
    for (const char* stage : {"route", "resolve", "disk", "compute", "stall", "batch"}) {
      ASSERT_TRUE(p["stages"].contains(stage)) << stage;
      const auto& t = p["stages"][stage];
      EXPECT_LE(t["p50_ms"].get<double>(), t["p90_ms"].get<double>()) << stage;
      EXPECT_LE(t["p90_ms"].get<double>(), t["p99_ms"].get<double>()) << stage;
      EXPECT_LE(t["p99_ms"].get<double>(), t["max_ms"].get<double>()) << stage;
      EXPECT_LE(t["mean_ms"].get<double>(), t["max_ms"].get<double>() + 1e-12) << stage;
      // The same histogram, in seconds, under "metrics": one sample per measured batch.
      const auto& h = p["metrics"]["latency"][stage];
      EXPECT_EQ(h["count"], 4) << stage;
      EXPECT_NEAR(h["max"].get<double>() * 1e3, t["max_ms"].get<double>(), 1e-9) << stage;
    }
    EXPECT_EQ(p["metrics"]["slots"], 4 * 16 * 2 * 4);
    EXPECT_LE(p["cold_run_hit_rate"].get<double>(), p["belady_hit_rate"].get<double>() + 1e-12);
  }
  EXPECT_GT(j["calibration"]["host_read_bandwidth"].get<double>(), 0.0);
  EXPECT_GT(j["calibration"]["disk_iops_ours"].get<double>(), 0.0);
  const auto png = testing::read_all(plot);
  ASSERT_GT(png.size(), 8u);
  EXPECT_EQ(0, std::memcmp(png.data(), "\x89PNG\r\n\x1a\n", 8));
  // One store for the sweep, kept in --store for later runs.
  const auto stores = std::filesystem::directory_iterator(dir.file("stores"));
  int count = 0;
  for (const auto& e : stores) count += e.path().extension() == ".trove" ? 1 : 0;
  EXPECT_EQ(count, 1);

  RunResult square = run(dir, {"bench", "--experts", "1000", "--store", dir.file("stores")});
  EXPECT_EQ(square.exit_code, 1);
  EXPECT_NE(square.err.find("not a square"), std::string::npos) << square.err;
  RunResult share = run(dir, {"bench", "--experts", "4096", "--dim", "64", "--host", "0%",
                              "--store", dir.file("stores")});
  EXPECT_EQ(share.exit_code, 1);
  EXPECT_NE(share.err.find("--host 0%"), std::string::npos) << share.err;
  RunResult routing = run(dir, {"bench", "--routing", "normal", "--store", dir.file("stores")});
  EXPECT_EQ(routing.exit_code, 1);
  EXPECT_NE(routing.err.find("zipf:A"), std::string::npos) << routing.err;
}

TEST(Cli, BenchCountsAreWholeAndBoundedAndAStoreIsReusedOnlyForItsOwnConfig) {
  ScratchDir dir;
  const std::string stores = dir.file("stores");
  // A fraction is not rounded to 0 or 2, inf or 1e30 is refused, not wrapped, and a table past
  // what the host tier can index (4G = 65536^2) is refused before its store is written.
  for (const auto& [flag, value] :
       std::vector<std::pair<std::string, std::string>>{{"--experts", "inf"},
                                                        {"--experts", "1e30"},
                                                        {"--experts", "4G"},
                                                        {"--experts", "0.3"},
                                                        {"--experts", "1.5"},
                                                        {"--batch", "inf"},
                                                        {"--batch", "0.3"},
                                                        {"--batch", "1e300"}}) {
    SCOPED_TRACE(flag + " " + value);
    std::vector<std::string> args = {"bench", "--dim",          "64",      flag,
                                     value,   "--no-calibrate", "--store", stores};
    if (flag != "--experts") args.insert(args.end(), {"--experts", "4096"});
    RunResult r = run(dir, args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find(flag + " " + value), std::string::npos) << r.err;
    EXPECT_FALSE(std::filesystem::exists(stores) && !std::filesystem::is_empty(stores))
        << "a store was written before the bad count was refused";
  }

  // A negative size is a bad command line, not "the default" (0) in disguise.
  for (const char* flag : {"--dim-out", "--topk-per-half", "--threads", "--heads"}) {
    RunResult r = run(dir, {"bench", flag, "-5", "--no-calibrate", "--store", stores});
    EXPECT_EQ(r.exit_code, 2) << flag << ": " << r.err;
  }

  // The same config reuses its store; another k' gets its own.
  const std::vector<std::string> base =
      small_bench({"--batches", "2", "--warmup", "1", "--routing", "pk", "--no-calibrate",
                   "--no-resident", "--store", stores, "-q"});
  auto list_stores = [&] {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(stores)) {
      names.push_back(e.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  };
  ASSERT_EQ(run(dir, base).exit_code, 0);
  const std::vector<std::string> first = list_stores();
  ASSERT_EQ(first.size(), 1u);
  const auto written = std::filesystem::last_write_time(stores + "/" + first[0]);
  ASSERT_EQ(run(dir, base).exit_code, 0);
  EXPECT_EQ(list_stores(), first);
  EXPECT_EQ(std::filesystem::last_write_time(stores + "/" + first[0]), written)
      << "the store of the same config was written again";
  std::vector<std::string> kp8 = base;
  kp8.insert(kp8.end(), {"--topk-per-half", "8"});
  ASSERT_EQ(run(dir, kp8).exit_code, 0);
  const std::vector<std::string> both = list_stores();
  ASSERT_EQ(both.size(), 2u);
  for (const std::string& name : both) {
    auto store = StoreReader::open(stores + "/" + name);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    auto layer = load_stored_layer(*store, "bench");
    ASSERT_TRUE(layer.ok()) << layer.status().to_string();
    EXPECT_EQ(layer->config.topk_per_half, name.find("-kp8") != std::string::npos ? 8 : 4) << name;
  }
}

TEST(Cli, BenchStacksLayersSplittingTheBudgetsAndReportsEachLayer) {
  ScratchDir dir;
  const std::string stores = dir.file("stores");
  const std::vector<std::string> quick = {
      "--batches", "2", "--warmup", "1", "--store", stores, "--no-calibrate", "--routing", "pk"};
  auto bench = [&](std::initializer_list<std::string> more) {
    std::vector<std::string> args = small_bench(more);
    args.insert(args.end(), quick.begin(), quick.end());
    return run(dir, args);
  };
  auto store_file = [&] {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(stores)) {
      names.push_back(e.path().string());
    }
    EXPECT_EQ(names.size(), 1u);
    return names.empty() ? std::string() : names[0];
  };
  // A one-layer store (as runs before --layers wrote) is written anew for two layers, saying so.
  ASSERT_EQ(bench({"--no-resident", "-q"}).exit_code, 0);
  ASSERT_EQ(StoreReader::open(store_file())->layers().size(), 1u);
  RunResult two = bench({"--layers", "2", "--host", "40%"});
  ASSERT_EQ(two.exit_code, 0) << two.err;
  EXPECT_NE(two.out.find("holds 1 of the 2 layers asked for: writing it anew"), std::string::npos)
      << two.out;
  EXPECT_NE(two.out.find("x 2 layers"), std::string::npos) << two.out;
  EXPECT_NE(two.out.find(" = 2 x "), std::string::npos) << two.out;  // host 205 KiB = 2 x 102 KiB
  EXPECT_NE(two.out.find("bench.1"), std::string::npos) << two.out;
  ASSERT_EQ(StoreReader::open(store_file())->layers().size(), 2u);
  const auto written = std::filesystem::last_write_time(store_file());

  // --json: the run's figures as before (over both layers), and each layer's.
  RunResult json = bench({"--layers", "2", "--host", "40%", "--json"});
  ASSERT_EQ(json.exit_code, 0) << json.err;
  const auto p = nlohmann::json::parse(json.out)["points"][0];
  EXPECT_EQ(p["layer_count"].get<int64_t>(), 2);
  ASSERT_EQ(p["layers"].size(), 2u);
  EXPECT_EQ(p["layers"][0]["name"], "bench");
  EXPECT_EQ(p["layers"][1]["name"], "bench.1");
  EXPECT_EQ(p["requested_per_batch"].get<double>(), 2 * 16 * 2 * 4);
  double unique = 0;
  for (const auto& l : p["layers"]) {
    EXPECT_EQ(l["requested_per_batch"].get<double>(), 16 * 2 * 4);
    EXPECT_EQ(l["host_budget_bytes"].get<uint64_t>(), p["host_budget_bytes"].get<uint64_t>() / 2);
    EXPECT_GE(l["hit_rate"].get<double>(), 0.0);
    EXPECT_LE(l["cold_run_hit_rate"].get<double>(), l["belady_hit_rate"].get<double>() + 1e-12);
    unique += l["unique_per_batch"].get<double>();
  }
  EXPECT_DOUBLE_EQ(p["unique_per_batch"].get<double>(), unique);
  EXPECT_GT(p["resident_tokens_per_second"].get<double>(), 0.0);

  // The two-layer store serves one layer without being written again.
  ASSERT_EQ(bench({"--no-resident", "-q"}).exit_code, 0);
  EXPECT_EQ(std::filesystem::last_write_time(store_file()), written);

  // A --host that holds one layer's batch (16 x 8 records of 128 B = 16 KiB) but not when halved
  // is refused before any batch, naming the layer and the split.
  ASSERT_EQ(bench({"--host", "24KiB", "--no-resident", "-q"}).exit_code, 0);
  RunResult halved = bench({"--host", "24KiB", "--layers", "2", "--no-resident", "-q"});
  EXPECT_EQ(halved.exit_code, 1);
  EXPECT_NE(halved.err.find("layer bench (1 of 2"), std::string::npos) << halved.err;
  EXPECT_NE(halved.err.find("= 2 x 12"), std::string::npos) << halved.err;

  // Bad counts are a bad command line; layers that cannot stack are refused before any store.
  for (const char* bad : {"0", "-1", "x"}) {
    EXPECT_EQ(bench({"--layers", bad}).exit_code, 2) << bad;
  }
  RunResult narrow = run(dir, small_bench({"--layers", "2", "--dim-out", "32", "--store",
                                           dir.file("narrow"), "--no-calibrate"}));
  EXPECT_EQ(narrow.exit_code, 1);
  EXPECT_NE(narrow.err.find("--dim-out 32 must equal --dim 64"), std::string::npos) << narrow.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("narrow")) &&
               !std::filesystem::is_empty(dir.file("narrow")));
}

TEST(Cli, TrainWritesCurvesCheckpointsAndResumes) {
  ScratchDir dir;
  SyntheticCheckpoint spec;
  spec.layout = ImportLayout::kMikeybeez;
  spec.prefixes = {"p"};
  spec.config.dim = 32;
  spec.config.heads = 2;
  spec.config.n_keys = 8;
  spec.config.dim_key = 8;
  spec.config.topk = 4;
  spec.dtype = StDType::kF32;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("c.safetensors"), spec).ok());
  for (const char* q : {"f32", "int4"}) {
    RunResult p =
        run(dir, {"pack", dir.file("c.safetensors"), "-o", dir.file(std::string(q) + ".trove"),
                  "--layout", "mikeybeez", "--prefix", "p", "--quant", q, "-q"});
    ASSERT_EQ(p.exit_code, 0) << p.err;
  }
  const std::vector<std::string> args = {"train",
                                         dir.file("int4.trove"),
                                         "--layer",
                                         "p",
                                         "--teacher",
                                         dir.file("f32.trove"),
                                         "--batch",
                                         "32",
                                         "--lr",
                                         "0.01",
                                         "--checkpoint-every",
                                         "3",
                                         "--loss-csv",
                                         dir.file("loss.csv"),
                                         "--plot",
                                         dir.file("loss.png"),
                                         "--json"};
  std::vector<std::string> first = args;
  first.insert(first.end(), {"--steps", "6"});
  RunResult r = run(dir, first);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["start_step"], 0);
  EXPECT_EQ(j["steps"], 6);
  EXPECT_EQ(j["checkpoints"], 2);
  EXPECT_EQ(j["losses"].size(), 6u);
  EXPECT_GT(j["expert_updates_per_second"].get<double>(), 0.0);
  const std::string csv = slurp(dir.file("loss.csv"));
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 7) << csv;  // header + 6 steps
  const auto png = testing::read_all(dir.file("loss.png"));
  ASSERT_GT(png.size(), 8u);
  EXPECT_EQ(0, std::memcmp(png.data(), "\x89PNG\r\n\x1a\n", 8));
  // The same command with more steps resumes from the last checkpoint.
  std::vector<std::string> again = args;
  again.insert(again.end(), {"--steps", "8"});
  RunResult r2 = run(dir, again);
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  auto j2 = nlohmann::json::parse(r2.out);
  EXPECT_EQ(j2["start_step"], 6);
  EXPECT_EQ(j2["losses"].size(), 2u);
  // The trained store serves.
  RunResult inspect = run(dir, {"verify", dir.file("int4.trove")});
  EXPECT_EQ(inspect.exit_code, 0) << inspect.err;
  // An f32 student is refused, naming what to do.
  RunResult bad = run(dir, {"train", dir.file("f32.trove"), "--layer", "p", "--teacher",
                            dir.file("f32.trove"), "--steps", "2"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("--quant int4"), std::string::npos) << bad.err;
  // --train-router with phases that name the router, on a fresh student; the store path may
  // come after --layer (one name per --layer).
  RunResult fresh = run(dir, {"pack", dir.file("c.safetensors"), "-o", dir.file("fresh.trove"),
                              "--layout", "mikeybeez", "--prefix", "p", "--quant", "int4", "-q"});
  RunResult router =
      run(dir, {"train", "--layer", "p", dir.file("fresh.trove"), "--teacher",
                dir.file("f32.trove"), "--batch", "16", "--steps", "10", "--train-router",
                "--lr-phases", "1:p=1e-2,p.router=1e-3;1:router=1e-2", "--json"});
  ASSERT_EQ(router.exit_code, 0) << fresh.err << router.err;
  EXPECT_EQ(nlohmann::json::parse(router.out)["train_router"], true);
  // Resuming with other flags is refused, naming them.
  RunResult other = run(dir, {"train", dir.file("fresh.trove"), "--layer", "p", "--teacher",
                              dir.file("f32.trove"), "--batch", "16", "--steps", "12"});
  EXPECT_EQ(other.exit_code, 1);
  EXPECT_NE(other.err.find("train_router true, now false"), std::string::npos) << other.err;
  // A malformed schedule and a group that is not trained are refused, naming the phase/group.
  for (const auto& [phases, says] : std::vector<std::pair<std::string, std::string>>{
           {"10:p=fast", "phase 1 '10:p=fast'"}, {"10:q=1e-3", "names 'q'"}}) {
    RunResult r3 = run(dir, {"train", dir.file("int4.trove"), "--layer", "p", "--teacher",
                             dir.file("f32.trove"), "--steps", "12", "--lr-phases", phases});
    EXPECT_EQ(r3.exit_code, 1) << phases;
    EXPECT_NE(r3.err.find(says), std::string::npos) << r3.err;
  }
}

}  // namespace
}  // namespace trove
