// Two processes on one store, as training and serving run side by side: `trove forward` again
// and again against a store that `trove train` checkpoints in place at every step. Every
// forward must read one whole generation (its output equal, byte for byte, to a forward over a
// copy of that generation taken while no writer could touch it), none may report corruption,
// and the trainer must finish. storage/FORMAT.md, "Readers and writers", is the contract.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "runtime/bench/synthetic.h"
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
using testing::spawn;

// A generation's identity as forward reports it.
std::string identity(uint64_t generation, uint64_t manifest_xxh3) {
  return std::to_string(generation) + "-" + std::to_string(manifest_xxh3);
}

struct ForwardRun {
  int exit_code = -1;
  std::string err;
  std::string id;  // the generation it read
  std::vector<uint8_t> y;
  std::vector<std::string> args;  // to rerun on a snapshot
};

TEST(CliConcurrency, ForwardDuringInPlaceCheckpointsReadsOneWholeGenerationEachRun) {
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
  const std::string store = dir.file("int4.trove");
  auto train_args = [&](int steps) {
    return std::vector<std::string>{"train",
                                    store,
                                    "--layer",
                                    "p",
                                    "--teacher",
                                    dir.file("f32.trove"),
                                    "--batch",
                                    "32",
                                    "--lr",
                                    "0.05",
                                    "--train-router",
                                    "--checkpoint-every",
                                    "1",
                                    "--steps",
                                    std::to_string(steps),
                                    "-q"};
  };
  // One step first: its checkpoint rewrites the store whole (the training state is new); every
  // later one is an in-place generation.
  RunResult first = run(dir, train_args(1));
  ASSERT_EQ(first.exit_code, 0) << first.err;

  // Activations: 1536 tokens, read by forward in 48 batches of 32.
  const int64_t tokens = 1536;
  std::vector<float> x(static_cast<size_t>(tokens * spec.config.dim));
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  ASSERT_TRUE(write_safetensors(dir.file("x.safetensors"),
                                {{"x",
                                  StDType::kF32,
                                  {tokens, spec.config.dim},
                                  {reinterpret_cast<const uint8_t*>(x.data()), x.size() * 4},
                                  nullptr}},
                                {})
                  .ok());

  // Snapshots: a pinned reader in this process sees a generation no commit can change while it
  // is open, so a copy taken meanwhile is that generation whole.
  std::map<std::string, std::string> snapshots;  // identity -> file
  auto snapshot = [&] {
    Result<StoreReader> r = StoreReader::open(store);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    const std::string id = identity(r->generation(), r->manifest_xxh3());
    if (snapshots.count(id) == 0) {
      const std::string copy = dir.file("snap-" + id + ".trove");
      std::filesystem::copy_file(store, copy, std::filesystem::copy_options::overwrite_existing);
      snapshots[id] = copy;
    }
  };
  // The generations before and after the trainer are snapshotted here, the ones between by a
  // thread polling while it runs: on a loaded machine the poll can miss most of those, and the
  // first and last hold the forwards that start before the trainer's first commit and end after
  // its last.
  snapshot();

  // The trainer: 40 more steps, a checkpoint (an in-place commit) after each.
  const int kSteps = 41;
  const pid_t trainer = spawn(train_args(kSteps), dir.file("train.out"), dir.file("train.err"));
  std::atomic<bool> trainer_done{false};
  std::thread snapshotter([&] {
    while (!trainer_done) {
      snapshot();
      std::this_thread::sleep_for(std::chrono::milliseconds(3));
    }
  });

  // Forward runs, alternating the resident path and the host tier, while the trainer runs; then
  // more against the last generation (snapshotted as soon as the trainer is seen to end) until
  // four runs have a snapshot to compare with, however few of the generations between the poll
  // caught on a loaded machine.
  std::vector<ForwardRun> runs;
  auto comparable = [&] {
    int n = 0;
    for (const ForwardRun& f : runs) n += snapshots.count(f.id) != 0;
    return n;
  };
  for (int i = 0; !trainer_done || comparable() < 4; ++i) {
    ForwardRun f;
    const std::string y = dir.file("y" + std::to_string(i) + ".safetensors");
    f.args = {"forward", store, "--layer",   "p", "--input", dir.file("x.safetensors"), "-o", y,
              "--batch", "32",  "--threads", "1", "--json"};
    if (i % 2 == 1) f.args.insert(f.args.end(), {"--host", "16KiB"});
    RunResult r = run(dir, f.args);
    f.exit_code = r.exit_code;
    f.err = r.err;
    if (r.exit_code == 0) {
      const nlohmann::json j = nlohmann::json::parse(r.out);
      f.id = identity(j["generation"]["number"].get<uint64_t>(),
                      j["generation"]["manifest_xxh3"].get<uint64_t>());
      f.y = testing::read_all(y);
    }
    runs.push_back(std::move(f));
    int status = 0;
    if (!trainer_done && ::waitpid(trainer, &status, WNOHANG) == trainer) {
      trainer_done = true;
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
          << "the trainer failed: " << slurp(dir.file("train.err"));
      snapshotter.join();
      snapshot();
    }
    ASSERT_LT(i, 2000) << "the trainer did not finish";
  }
  const std::string train_err = slurp(dir.file("train.err"));
  EXPECT_EQ(train_err.find("Corruption"), std::string::npos) << train_err;

  // Every forward ran clean; each one whose generation was snapshotted equals a forward over
  // that snapshot, byte for byte.
  std::map<std::string, int> compared;
  for (size_t i = 0; i < runs.size(); ++i) {
    const ForwardRun& f = runs[i];
    SCOPED_TRACE("forward run " + std::to_string(i));
    ASSERT_EQ(f.exit_code, 0) << f.err;
    EXPECT_EQ(f.err.find("Corruption"), std::string::npos) << f.err;
    auto snap = snapshots.find(f.id);
    if (snap == snapshots.end()) continue;
    std::vector<std::string> args = f.args;
    args[1] = snap->second;
    const std::string y = dir.file("expected.safetensors");
    args[7] = y;
    RunResult again = run(dir, args);
    ASSERT_EQ(again.exit_code, 0) << again.err;
    // The outputs' metadata names the store file; compare the tensor bytes.
    SafetensorsFile got =
        SafetensorsFile::open(dir.file("y" + std::to_string(i) + ".safetensors")).value();
    SafetensorsFile want = SafetensorsFile::open(y).value();
    const StTensorView* a = got.find("y");
    const StTensorView* b = want.find("y");
    ASSERT_TRUE(a != nullptr && b != nullptr);
    ASSERT_EQ(a->bytes.size(), b->bytes.size());
    EXPECT_TRUE(std::equal(a->bytes.begin(), a->bytes.end(), b->bytes.begin()))
        << "forward run " << i << " read generation " << f.id
        << " but its output is not that generation's";
    ++compared[f.id];
  }
  int total = 0;
  for (const auto& [id, n] : compared) total += n;
  EXPECT_GE(compared.size(), 2u) << "too few generations compared to say anything";
  EXPECT_GE(total, 4);
  std::printf(
      "[ info ] %zu forward runs during %d in-place checkpoints; %d compared with %zu "
      "snapshotted generations\n",
      runs.size(), kSteps - 1, total, compared.size());
}

// True once process pid holds an exclusive flock (a store writer's lock), polled in /proc/locks
// ("N: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF"); false if it exits or the time runs out.
bool holds_exclusive_flock(pid_t pid, std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const std::string needle = " " + std::to_string(pid) + " ";
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream locks("/proc/locks");
    for (std::string line; std::getline(locks, line);) {
      if (line.find("FLOCK") != std::string::npos && line.find("WRITE") != std::string::npos &&
          line.find(needle) != std::string::npos) {
        return true;
      }
    }
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

TEST(CliConcurrency, SecondTrainerIsBusyAtOnceAndReadersDoNotEndTheFirst) {
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
  const std::string store = dir.file("int4.trove");
  auto train_args = [&](int steps) {
    return std::vector<std::string>{"train",   store,       "--layer",
                                    "p",       "--teacher", dir.file("f32.trove"),
                                    "--batch", "32",        "--checkpoint-every",
                                    "1",       "--steps",   std::to_string(steps),
                                    "-q"};
  };
  ASSERT_EQ(run(dir, train_args(1)).exit_code, 0);
  const pid_t first = spawn(train_args(400), dir.file("t1.out"), dir.file("t1.err"));
  // Wait until it holds its lock (before any training), seen in /proc/locks without touching the
  // lock: a second trainer started earlier could take the lock first and run to the end (the CI
  // machine, 2 loaded cores, once did so).
  ASSERT_TRUE(holds_exclusive_flock(first, std::chrono::seconds(60)))
      << "the first trainer never took its lock: " << slurp(dir.file("t1.err"));
  bool refused = false;
  for (int attempt = 0; attempt < 200 && !refused; ++attempt) {
    RunResult second = run(dir, train_args(400));
    if (second.exit_code != 0 && second.err.find("busy") != std::string::npos) refused = true;
    EXPECT_EQ(second.err.find("Corruption"), std::string::npos) << second.err;
    // Readers come and go meanwhile; none ends the trainer.
    RunResult v = run(dir, {"verify", store, "-q"});
    EXPECT_EQ(v.exit_code, 0) << v.err;
  }
  EXPECT_TRUE(refused) << "a second trainer was never told the store is busy";
  int status = 0;
  ::waitpid(first, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << slurp(dir.file("t1.err"));
  EXPECT_EQ(run(dir, {"verify", store}).exit_code, 0);
}

}  // namespace
}  // namespace trove
