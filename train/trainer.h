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
// Checkpoints are store generations: every `checkpoint_every` steps (and at the end) the store
// is rewritten atomically (StoreWriter: temp file, fsync, rename) with the layer's int4 records
// (what `trove forward` serves) and a second layer "<L>.train" holding the training view and
// the optimizer state (int8 records; Adagrad's per-row accumulators as a dense tensor; the
// step, seed and optimizer in its info). A crash at any moment leaves the last committed
// generation; running the same command again resumes from it, and because the inputs, the SR
// hash and the kernels are functions of (seed, step) alone, the resumed run's losses equal an
// uninterrupted run's bit for bit.
//
// Today the whole training view is held in memory (N x int8 stride bytes, plus 8 bytes per
// expert of optimizer state); write-back of dirty records through the host tier is later work.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/train.h"
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
  uint64_t seed = 1;
  int64_t checkpoint_every = 200;  // 0: only at the end
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
  double seconds = 0;                             // the steps (not the checkpoints)
  double checkpoint_seconds = 0;
  int64_t checkpoints = 0;
  int64_t tokens = 0;
  int64_t expert_updates = 0;  // unique experts updated, summed over steps
  int64_t rescales = 0;
  int64_t elements_changed = 0;
  uint64_t checkpoint_bytes = 0;  // file size of one checkpoint (the whole store is rewritten)
  uint64_t state_bytes = 0;       // training view + optimizer states held in memory
};

// Errors: no layer or a layer named twice, a student layer that is not int4, a teacher of
// other dims, --lr-phases naming a group that is not trained, an input file of another
// D, a checkpoint written with another seed or optimizer (resume with the same flags or start
// from a fresh store), steps/batch/lr out of range; all before any work. The store is only
// ever replaced whole by a committed generation.
Result<TrainReport> run_train(const TrainOptions& options);

// The name of the layer that holds `layer`'s training state in a checkpoint.
std::string train_state_layer_name(const std::string& layer);

}  // namespace trove
