// trove train: distil a teacher PEER layer into a stored int4 layer, trained in place
// (train/trainer.h).
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "base/bytes.h"
#include "base/log.h"
#include "base/plot.h"
#include "base/progress.h"
#include "base/strings.h"
#include "runtime/bench/calibrate.h"
#include "tools/commands.h"
#include "train/schedule.h"
#include "train/trainer.h"

namespace trove::cli {

namespace {

struct TrainArgs {
  std::string store, teacher, inputs = "gaussian", optimizer = "adagrad";
  std::vector<std::string> layers, teacher_layers;
  std::string loss_csv, plot, teacher_kind = "peer", lr_phases;
  int64_t steps = 1000, batch = 1024, checkpoint_every = 200;
  float lr = 1e-2f, router_lr = 1e-3f;
  bool train_router = false;
  uint64_t seed = 1;
  int threads = 0;
  int saturation_tolerance = 64;
  bool limits = false;
  std::string host, max_dirty = "1GiB";
  TierFlags tier;
};

Status write_loss_csv(const std::string& path, const std::vector<std::string>& layers,
                      const TrainReport& r) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    if (!f) return Status::from_errno("loss curve " + tmp, errno);
    // One column per layer when several train side by side.
    const bool per_layer = r.layer_losses.size() > 1;
    f << "step,loss";
    for (size_t l = 0; per_layer && l < layers.size(); ++l) f << ",loss:" << layers[l];
    f << '\n';
    for (size_t i = 0; i < r.losses.size(); ++i) {
      f << (r.start_step + static_cast<int64_t>(i) + 1) << ',' << str_printf("%.9g", r.losses[i]);
      for (size_t l = 0; per_layer && l < r.layer_losses.size(); ++l) {
        f << ',' << str_printf("%.9g", r.layer_losses[l][i]);
      }
      f << '\n';
    }
    if (!f.flush()) return Status::io_error("writing the loss curve " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return Status::from_errno("renaming the loss curve to " + path, errno);
  }
  return Status::ok_status();
}

int run_train_command(const TrainArgs& a, const GlobalOptions& global) {
  const bool talk = !global.json && !global.quiet;
  TrainOptions o;
  o.store = a.store;
  o.layers = a.layers;
  o.teacher = a.teacher;
  o.teacher_layers = a.teacher_layers;
  o.train_router = a.train_router;
  o.router_lr = a.router_lr;
  if (!a.lr_phases.empty()) {
    Result<std::vector<LrPhase>> phases = parse_lr_phases(a.lr_phases);
    if (!phases.ok()) return report_error("train", phases.status());
    o.lr_phases = std::move(*phases);
  }
  o.teacher_kind =
      a.teacher_kind == "mlp" ? TrainOptions::TeacherKind::kMlp : TrainOptions::TeacherKind::kPeer;
  o.inputs = a.inputs;
  o.steps = a.steps;
  o.batch = a.batch;
  o.lr = a.lr;
  o.optimizer = a.optimizer == "sgd" ? TrainOptimizer::kSgd : TrainOptimizer::kAdagrad;
  o.seed = a.seed;
  o.checkpoint_every = a.checkpoint_every;
  o.saturation_tolerance = a.saturation_tolerance;
  o.max_dirty_bytes = parse_bytes(a.max_dirty).value();
  if (!a.host.empty()) o.tiers = tier_options(a.tier, parse_bytes(a.host).value());
  o.threads = a.threads;
  std::unique_ptr<ProgressBar> bar;
  const auto start = std::chrono::steady_clock::now();
  int64_t first_step = -1;
  o.progress = [&](int64_t done, int64_t total, double loss) {
    if (!bar) {
      bar = std::make_unique<ProgressBar>("training", static_cast<uint64_t>(total));
      first_step = done - 1;
    }
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    bar->set_note(str_printf("loss %.4g  %.0f tok/s", loss,
                             s > 0 ? static_cast<double>((done - first_step) * a.batch) / s : 0.0));
    bar->update(static_cast<uint64_t>(done));
  };
  Result<TrainReport> r = run_train(o);
  if (bar) bar->finish();
  if (!r.ok()) return report_error("train", r.status());
  if (!a.loss_csv.empty()) {
    const Status s = write_loss_csv(a.loss_csv, a.layers, *r);
    if (!s.ok()) return report_error("train", s);
  }
  if (!a.plot.empty() && !r->losses.empty()) {
    PlotSpec plot;
    plot.title = "trove train: " + a.layers[0] + (a.layers.size() > 1 ? " ..." : "");
    plot.x_label = "step";
    plot.y_label = "loss (mean squared error vs the teacher)";
    // One curve per layer when several train side by side (their rates may differ by phase).
    const bool per_layer = r->layer_losses.size() > 1;
    for (size_t l = 0; l < (per_layer ? r->layer_losses.size() : 1); ++l) {
      PlotSeries loss{per_layer ? a.layers[l] : "int4 student", {}, {}};
      const std::vector<double>& y = per_layer ? r->layer_losses[l] : r->losses;
      for (size_t i = 0; i < y.size(); ++i) {
        loss.x.push_back(static_cast<double>(r->start_step + static_cast<int64_t>(i) + 1));
        loss.y.push_back(y[i]);
      }
      plot.series.push_back(loss);
    }
    const Status s = write_plot_png(a.plot, plot);
    if (!s.ok()) return report_error("train", s);
  }
  const TrainReport& t = *r;
  const Metrics& m = t.metrics;
  const double seconds = t.seconds(), update_seconds = t.update_seconds();
  const double checkpoint_seconds = t.checkpoint_seconds();
  const int64_t expert_updates = m.counter("expert_updates");
  const auto checkpoint_bytes = static_cast<uint64_t>(m.counter("checkpoint.bytes_written"));
  const double ups = seconds > 0 ? static_cast<double>(expert_updates) / seconds : 0;
  nlohmann::json j = {
      {"store", a.store},
      {"layer", a.layers.size() == 1 ? nlohmann::json(a.layers[0]) : nlohmann::json()},
      {"layers", a.layers},
      {"teacher", a.teacher},
      {"start_step", t.start_step},
      {"steps", t.steps},
      {"first_loss", t.losses.empty() ? nlohmann::json() : nlohmann::json(t.losses.front())},
      {"final_loss", t.losses.empty() ? nlohmann::json() : nlohmann::json(t.losses.back())},
      {"losses", t.losses},
      {"layer_losses", t.layer_losses},
      {"train_router", a.train_router},
      {"seconds", seconds},
      {"tokens_per_second", seconds > 0 ? static_cast<double>(m.counter("tokens")) / seconds : 0.0},
      {"expert_updates_per_second", ups},
      {"expert_updates", expert_updates},
      {"rescales", m.counter("rescales")},
      {"clamps", m.counter("clamps")},
      {"checkpoints", t.checkpoints()},
      {"whole_rewrites", m.counter("checkpoint.whole_rewrites")},
      {"checkpoint_seconds", checkpoint_seconds},
      {"checkpoint_bytes_written", checkpoint_bytes},
      {"records_written", m.counter("checkpoint.records_written")},
      {"bytes_written_per_step",
       t.steps > t.start_step
           ? static_cast<double>(checkpoint_bytes) / static_cast<double>(t.steps - t.start_step)
           : 0.0},
      {"optimizer_bytes_in_memory", t.optimizer_bytes},
      {"peak_dirty_bytes_in_memory", t.peak_dirty_bytes},
      // Everything counted, with the per-step, per-update and per-checkpoint latency
      // histograms (seconds: count, sum, mean, p50, p90, p99, max).
      {"metrics", m.to_json()},
  };
  // What the update and the checkpoints achieved, beside what memory and disk can do.
  const double update_bw =
      update_seconds > 0 ? static_cast<double>(m.counter("update.bytes")) / update_seconds : 0;
  const double ckpt_bw =
      checkpoint_seconds > 0 ? static_cast<double>(checkpoint_bytes) / checkpoint_seconds : 0;
  j["update_seconds"] = update_seconds;
  j["update_bytes_per_second"] = update_bw;
  j["checkpoint_bytes_per_second"] = ckpt_bw;
  double mem_bw = 0, disk_bw = 0;
  if (a.limits) {
    // A failed measurement is a warning: the training is done and its report still counts.
    Result<double> mem = measure_host_read_bandwidth(uint64_t{512} << 20, a.threads, 0.5);
    const std::string dir = std::filesystem::path(a.store).parent_path().string();
    Result<double> d = measure_disk_write_bandwidth(dir.empty() ? "." : dir, uint64_t{256} << 20);
    if (!mem.ok()) {
      TROVE_LOG_WARN("--limits: memory bandwidth: %s", mem.status().to_string().c_str());
    }
    if (!d.ok()) TROVE_LOG_WARN("--limits: disk bandwidth: %s", d.status().to_string().c_str());
    mem_bw = mem.ok() ? *mem : 0;
    disk_bw = d.ok() ? *d : 0;
    auto fraction = [](double x, double limit) {
      return limit > 0 ? nlohmann::json(x / limit) : nlohmann::json();
    };
    j["limits"] = {{"host_read_bytes_per_second", mem_bw},
                   {"disk_write_bytes_per_second", disk_bw},
                   {"update_fraction_of_memory", fraction(update_bw, mem_bw)},
                   {"checkpoint_fraction_of_disk", fraction(ckpt_bw, disk_bw)}};
  }
  if (!a.loss_csv.empty()) j["loss_csv"] = a.loss_csv;
  if (!a.plot.empty()) j["plot"] = a.plot;
  if (global.json) {
    print_json(j);
  } else if (talk) {
    std::string names;
    for (const std::string& l : a.layers) names += (names.empty() ? "" : ", ") + l;
    std::printf("%s: %s %s trained steps %lld..%lld%s\n", a.store.c_str(),
                a.layers.size() > 1 ? "layers" : "layer", names.c_str(),
                static_cast<long long>(t.start_step + 1), static_cast<long long>(t.steps),
                t.start_step > 0 ? " (resumed from the last checkpoint)" : "");
    if (!t.losses.empty()) {
      std::printf("  loss %.6g -> %.6g (mean squared error vs the teacher)\n", t.losses.front(),
                  t.losses.back());
    }
    std::printf("  %.0f tokens/s, %.0f expert updates/s, %lld rescales, %lld groups clamped\n",
                j["tokens_per_second"].get<double>(), ups,
                static_cast<long long>(m.counter("rescales")),
                static_cast<long long>(m.counter("clamps")));
    if (const LatencyHistogram* h = m.histogram("latency.step")) {
      std::printf("  step latency: p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms\n",
                  h->quantile(0.5) * 1e3, h->quantile(0.9) * 1e3, h->quantile(0.99) * 1e3,
                  h->quantile(1.0) * 1e3);
    }
    std::printf(
        "  %lld checkpoints (%lld rewrote the store, the rest wrote %lld changed records in "
        "place): %s written, %s per step, %.2f s in all\n",
        static_cast<long long>(t.checkpoints()),
        static_cast<long long>(m.counter("checkpoint.whole_rewrites")),
        static_cast<long long>(m.counter("checkpoint.records_written")),
        format_bytes(checkpoint_bytes).c_str(),
        format_bytes(static_cast<uint64_t>(j["bytes_written_per_step"].get<double>())).c_str(),
        checkpoint_seconds);
    std::printf("  update: %.0f expert updates/s in the update itself, touching %.2f GB/s%s\n",
                update_seconds > 0 ? static_cast<double>(expert_updates) / update_seconds : 0.0,
                update_bw / 1e9,
                mem_bw > 0
                    ? str_printf(" = %.2f of the memory's %.1f GB/s streaming read, measured "
                                 "now (the update reads and writes what it touches)",
                                 update_bw / mem_bw, mem_bw / 1e9)
                          .c_str()
                    : "");
    std::printf("  checkpoints: %.1f MB/s%s\n", ckpt_bw / 1e6,
                disk_bw > 0
                    ? str_printf(" = %.2f of the disk's %.1f MB/s durable sequential write, "
                                 "measured now (checkpoints journal, then write in place "
                                 "with fsyncs)",
                                 ckpt_bw / disk_bw, disk_bw / 1e6)
                          .c_str()
                    : "");
    std::printf("  memory: optimizer states %s, changed records up to %s between checkpoints\n",
                format_bytes(t.optimizer_bytes).c_str(), format_bytes(t.peak_dirty_bytes).c_str());
    if (!a.loss_csv.empty()) std::printf("  loss curve: %s\n", a.loss_csv.c_str());
    if (!a.plot.empty()) std::printf("  plot: %s\n", a.plot.c_str());
  }
  return kExitOk;
}

}  // namespace

void add_train(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "train",
      "Distil a teacher (a PEER layer or a dense MLP) into stored int4 layers, trained in place\n"
      "with stochastic rounding into an 8-bit training code (SPEC §7); --train-router also\n"
      "trains the routers (Adam). Checkpoints are new generations of the store: the int4\n"
      "records (ready for `trove forward`) and the training state, the changed records\n"
      "written in place, crash-safe; running the same command again after a crash resumes\n"
      "from the last checkpoint.\n"
      "Example: trove train student.trove --layer L --teacher teacher.trove --steps 2000 \\\n"
      "           --batch 1024 --lr 1e-2 --checkpoint-every 200");
  auto a = std::make_shared<TrainArgs>();
  cmd->add_option("store", a->store, "The student .trove (an int4 layer), trained in place")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--layer", a->layers,
                  "A layer to train; repeat to train several side by side, each against its\n"
                  "teacher layer on the same inputs")
      ->required()
      ->allow_extra_args(false);  // one name per --layer: the store path is not a layer
  cmd->add_option("--teacher", a->teacher,
                  "The teacher: a .trove store holding a PEER layer (pack any supported layout\n"
                  "with `trove pack`, e.g. --quant f32), or with --teacher-kind mlp a\n"
                  "safetensors file holding a dense SwiGLU or GELU MLP")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--teacher-kind", a->teacher_kind,
                  "peer, or mlp: P.gate_proj/up_proj/down_proj.weight (SwiGLU) or\n"
                  "P.fc1/fc2.weight (+ .bias) (GELU), with P from --teacher-layer")
      ->check(CLI::IsMember({"peer", "mlp"}))
      ->capture_default_str();
  cmd->add_option("--teacher-layer", a->teacher_layers,
                  "The teacher's PEER layer, or the MLP tensors' prefix; one per --layer, in\n"
                  "the same order (default: the student layers' names)")
      ->allow_extra_args(false);
  cmd->add_option("--inputs", a->inputs,
                  "gaussian, or a safetensors file of activations [..., D] (cycled)")
      ->capture_default_str();
  cmd->add_option("--steps", a->steps, "Optimizer steps in all (a resumed run continues to it)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40))
      ->capture_default_str();
  cmd->add_option("--batch", a->batch, "Tokens per step")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24))
      ->capture_default_str();
  cmd->add_option("--lr", a->lr, "Learning rate")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_flag("--train-router", a->train_router,
                "Also train each layer's router (W_q, its bias, the sub-keys, the input norm)\n"
                "in fp32 with Adam; the trained router is stored with the layer");
  cmd->add_option("--router-lr", a->router_lr, "Adam's learning rate for --train-router")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--lr-phases", a->lr_phases,
                  "Learning-rate phases, STEPS:GROUP=LR[,...][;...]; a group is a layer's table\n"
                  "(its name), its router (<layer>.router), experts, router or all; unnamed\n"
                  "groups use --lr / --router-lr; the last phase holds after its end. E.g. the\n"
                  "differential schedule '1000:A=1e-3,B=1e-5;1000:A=1e-5,B=1e-3;1000:all=5e-4'");
  cmd->add_option("--optimizer", a->optimizer, "adagrad (row-wise) or sgd")
      ->check(CLI::IsMember({"adagrad", "sgd"}))
      ->capture_default_str();
  cmd->add_option("--saturation-tolerance", a->saturation_tolerance,
                  "Codes of overshoot a saturating group is clamped by instead of doubling its\n"
                  "scale (0: always double). 64, SPEC §7's default, brought the int4 student\n"
                  "from 1.54x to 1.22x fp32's error in bench/train_compare, whose targets lie\n"
                  "inside the start range; tables whose weights must grow still double past the\n"
                  "tolerance")
      ->check(CLI::Range(0, 128))
      ->capture_default_str();
  cmd->add_option("--seed", a->seed, "Seed of the inputs and of the stochastic rounding")
      ->capture_default_str();
  cmd->add_option("--checkpoint-every", a->checkpoint_every,
                  "Steps between checkpoints (0: only at the end)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--threads", a->threads, "Worker threads (0: all cores)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-dirty", a->max_dirty,
                  "Take a checkpoint early when the records changed since the last one reach\n"
                  "this size in memory (0: only --checkpoint-every)")
      ->check(valid_bytes)
      ->capture_default_str();
  cmd->add_option("--host", a->host,
                  "Host memory budget for the student's int4 records (e.g. 2GiB): read from the\n"
                  "store file on demand into a cache of this size. Default: map the table")
      ->check(valid_bytes);
  add_tier_flags(cmd, &a->tier);
  cmd->add_flag("--limits", a->limits,
                "After training, measure this machine's memory read bandwidth and the store\n"
                "folder's durable write bandwidth and print the update's and the checkpoints'\n"
                "rates as fractions of them (writes and removes a 256 MiB temporary file)");
  cmd->add_option("--loss-csv", a->loss_csv, "Write the loss per step to this CSV file");
  cmd->add_option("--plot", a->plot, "Write the loss curve to this PNG file");
  cmd->callback([a, &global] { global.exit_code = run_train_command(*a, global); });
}

}  // namespace trove::cli
