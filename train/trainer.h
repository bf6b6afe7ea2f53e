// Distillation of a teacher into a stored int4 PEER layer, trained in place in the int4
// training view (SPEC §7, kernels/train.h): what `trove train` runs.
//
// Each step: a batch of inputs (gaussian, or rows of an activation file), the teacher's output
// y_t, the student's y over its current int4 records, loss = mean((y - y_t)^2), the student's
// backward (row-sparse gradients per unique expert), and the stochastic-rounding update of
// those experts' training records (int8 code b at scale d/16), exported back to int4 for the
// next forward. With --train-router the router (W_q, its bias, the sub-keys and the input norm)
// trains too, in fp32 with Adam; otherwise it stays as stored. Several layers train side by
// side, each against its own teacher layer on the same inputs, each with its own learning-rate
// schedule (train/schedule.h) and its own table index in the SR hash.
//
// Records stay in the store. The student computes on its int4 table through the host tier
// (--host) or a mapping, overlaid with the records changed since the last checkpoint (kept in
// memory, int8 training view and int4 export). Checkpoints are store generations, taken every
// `checkpoint_every` steps, at the end, and when the changes reach `max_dirty_bytes`:
//   - the first adds a second layer "<L>.train" per trained layer, the training view (int8
//     records), Adagrad's per-row accumulators, Adam's moments, and the step, seed and
//     optimizer in its info: the store is rewritten whole and atomically (StoreWriter);
//   - every later one writes the changed records of both tables, the optimizer states, the
//     router and the step in place, as the store's next generation (storage/store_update.h:
//     journal, commit point, apply), so its cost follows the records changed, not the table.
// A crash at any moment leaves the last committed generation whole; running the same command
// again resumes from it, and because the inputs, the SR hash and the kernels are functions of
// (seed, step) alone, the resumed run's losses equal an uninterrupted run's bit for bit.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/metrics.h"
#include "base/status.h"
#include "kernels/train.h"
#include "runtime/tiers/tiered_source.h"
#include "train/schedule.h"

namespace trove {

struct TrainOptions {
  std::string store;                // the student .trove, an int4 layer; rewritten at checkpoints
  std::vector<std::string> layers;  // the student layers (at least one)
  std::string teacher;              // kPeer: a .trove store; kMlp: a safetensors file
  // One per layer (or empty: the same names). kPeer: the teacher's layer; kMlp: the tensors'
  // prefix.
  std::vector<std::string> teacher_layers;
  // kPeer: a PEER layer. kMlp: a dense MLP, either SwiGLU (P.gate_proj.weight [H, D],
  // P.up_proj.weight [H, D], P.down_proj.weight [D_out, H]: y = down(silu(gate x) * up x)) or
  // GELU (P.fc1.weight [H, D], P.fc2.weight [D_out, H], optional P.fc1.bias / P.fc2.bias:
  // y = fc2(gelu(fc1 x + b1)) + b2); P is teacher_layer followed by '.', or nothing.
  enum class TeacherKind { kPeer, kMlp };
  TeacherKind teacher_kind = TeacherKind::kPeer;
  std::string inputs = "gaussian";  // or a safetensors file of activations [..., D]
  int64_t steps = 1000;
  int64_t batch = 1024;
  float lr = 1e-2f;  // the expert tables' rate
  bool train_router = false;
  float router_lr = 1e-3f;         // Adam's rate for the routers
  std::vector<LrPhase> lr_phases;  // empty: lr and router_lr throughout
  TrainOptimizer optimizer = TrainOptimizer::kAdagrad;
  // TrainStep::saturation_tolerance (kernels/train.h step 2c): overshoots of up to T codes are
  // clamped, larger ones double the group's scale; 0 always doubles. SPEC §7's default is 64.
  int saturation_tolerance = 64;
  uint64_t seed = 1;
  int64_t checkpoint_every = 200;  // 0: only at the end
  // A checkpoint is also taken when the records changed since the last one reach this many
  // bytes (0: no limit): it bounds the memory the changes hold.
  uint64_t max_dirty_bytes = uint64_t{1} << 30;
  // With a host budget the student's int4 records come through the host tier over the store
  // file (runtime/tiers/tiered_source.h); without, the table is memory-mapped.
  std::optional<TieredSourceOptions> tiers;
  int threads = 0;
  // After each step: (step done, steps in all, loss of that step, the mean over the layers).
  std::function<void(int64_t, int64_t, double)> progress;
  // After each checkpoint commits: (the step it holds).
  std::function<void(int64_t)> checkpointed;
};

struct TrainReport {
  int64_t start_step = 0;      // > 0 when resumed from a checkpoint
  int64_t steps = 0;           // the step reached
  std::vector<double> losses;  // one per step run in this call (start_step .. steps-1)
  std::vector<std::vector<double>> layer_losses;  // [layer][step], the same steps
  // What the steps and checkpoints did (base/metrics.h), each step's summed with +=:
  //   tokens, and of the int4 update (train_step_metrics, summed over the layers):
  //   expert_updates (unique experts updated), elements_changed, rescales, clamps, scale_inits;
  //   update.bytes: memory the update touched (training records read and written, int4 export
  //     written, accumulators, gradient rows);
  //   checkpoint.whole_rewrites (checkpoints that rewrote the store: the first, which adds the
  //     training state; the others wrote changed records in place), checkpoint.bytes_written
  //     (journals + in-place writes + whole rewrites), checkpoint.records_written (changed
  //     records committed);
  //   latency histograms: latency.step (each step, all layers; not the checkpoints),
  //     latency.update (each layer's int4 update: read, update, export the records),
  //     latency.checkpoint (each checkpoint).
  Metrics metrics;
  double seconds() const { return sum_of("latency.step"); }  // the steps, not the checkpoints
  double update_seconds() const { return sum_of("latency.update"); }
  double checkpoint_seconds() const { return sum_of("latency.checkpoint"); }
  int64_t checkpoints() const {
    const LatencyHistogram* h = metrics.histogram("latency.checkpoint");
    return h != nullptr ? h->count() : 0;
  }
  uint64_t optimizer_bytes = 0;   // Adagrad and Adam states, held in memory
  uint64_t peak_dirty_bytes = 0;  // most changed records held in memory between checkpoints

 private:
  double sum_of(const char* name) const {
    const LatencyHistogram* h = metrics.histogram(name);
    return h != nullptr ? h->sum() : 0.0;
  }
};

// One int4 update's counts (kernels/train.h: TrainStats) as metrics: expert_updates (the
// experts given), elements_changed, rescales, clamps, scale_inits.
Metrics train_step_metrics(const TrainStats& s, int64_t experts);

// Errors: no layer or a layer named twice, a student layer that is not int4, a teacher of
// other dims, --lr-phases naming a group that is not trained, an input file of another
// D, a checkpoint written with another seed or optimizer (resume with the same flags or start
// from a fresh store), steps/batch/lr out of range; all before any work. The store is only
// ever replaced whole by a committed generation.
Result<TrainReport> run_train(const TrainOptions& options);

// The name of the layer that holds `layer`'s training state in a checkpoint.
std::string train_state_layer_name(const std::string& layer);

}  // namespace trove
