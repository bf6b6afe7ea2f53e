// EngramTrainer: trains a stored int4 Engram layer's rows in place (SPEC §7, as PEER's
// TableTrainer trains expert records): the rows a step touches are imported into the int8
// training view (kernels/engram.h) and kept in memory; step() applies the pending segment-summed
// row gradients with stochastic rounding and row-wise Adagrad (one fp32 accumulator per row, for
// every row of the layer: 4 bytes a row in memory).
//
// Checkpoints persist the whole training state, as PEER's do: the served int4 rows, and in the
// state layer "<L>.train" (an Engram layer of int8 rows whose info has "training_view") the
// training view's codes, the accumulators (dense "adagrad" [rows]), the step and the seed. The
// first checkpoint adds the state layer by rewriting the store whole (atomically: a crash leaves
// the old file); every later one writes the changed records of both layers, the accumulators
// and the step as the next generation through the store's update journal
// (storage/store_update.h): a crash at any moment leaves the old or the new generation whole. A
// trainer opened on a store with a state layer resumes from it, so a run checkpointed and
// resumed gives the bits of one that never stopped. One thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/status.h"
#include "kernels/engram.h"
#include "kernels/train.h"
#include "runtime/engram/engram_store.h"
#include "storage/store.h"
#include "storage/store_update.h"

namespace trove {

struct EngramTrainOptions {
  TrainOptimizer optimizer = TrainOptimizer::kAdagrad;
  float eps = 1e-8f;
  uint64_t seed = 0;  // a store with a training state resumes its own seed instead
  int32_t saturation_tolerance = 0;
  uint32_t table_id = 0;  // the SR hash's table input (tell layers apart)
};

class EngramTrainer {
 public:
  // Errors: no such layer, not an Engram layer, rows that are not int4.
  static Result<std::unique_ptr<EngramTrainer>> open(const std::string& path,
                                                     const std::string& layer,
                                                     const EngramTrainOptions& options = {});

  const EngramConfig& config() const { return stored_.config; }

  // Adds table k's row gradients (ids in [0, vocab), grads [ids.size()][e]; an id may repeat
  // across calls: they sum) to the pending step.
  Status add_row_grads(int64_t table, std::span<const int64_t> ids, std::span<const float> grads);
  // Applies the pending gradients (then cleared) with learning rate lr. Errors change nothing
  // (bad lr, a non-finite gradient) or, for a row whose scale would overflow fp16, leave that
  // row as it was and name it.
  Result<TrainStats> step(float lr);
  // The current weights of table k's rows `ids` (training rows dequantized, others as stored):
  // out [ids.size()][e].
  Status read_rows(int64_t table, std::span<const int64_t> ids, float* out);
  // Writes the rows changed since the last checkpoint, their training state and the
  // accumulators (the first time: the store rewritten whole with the state layer added, its
  // generation then 1); returns the store's new generation. `update` carries the fault-injection
  // seam for tests. After a failed commit the trainer is closed (every later call fails with
  // Aborted): as after a crash, a new trainer opens the store at a whole generation.
  Result<uint64_t> checkpoint(const StoreUpdateOptions& update = {});

  // Drops the pending gradients.
  void zero_grad() { pending_.clear(); }
  uint64_t steps() const { return steps_; }
  uint64_t seed() const { return seed_; }
  int64_t pending_rows() const { return static_cast<int64_t>(pending_.size()); }
  int64_t dirty_rows() const { return static_cast<int64_t>(dirty_.size()); }

 private:
  EngramTrainer() = default;
  Status reopen();
  Status check_open() const;
  // The training row of global row g: the trainer's copy, else the state layer's, else imported
  // from the served int4 row (b = 16 q).
  Result<uint8_t*> training_row(int64_t g);
  nlohmann::json state_info() const;
  // The records of `layer` (rows laid out as `l`) that hold rows changed since the checkpoint,
  // read into `bytes`, each changed row's training view written over its place by `put`.
  Status changed_records(const StoreLayerInfo& layer, const EngramRowLayout& l,
                         std::vector<int64_t>* recs, std::vector<uint8_t>* bytes,
                         const std::function<void(const uint8_t*, uint8_t*)>& put);
  // The first checkpoint: the store rewritten with `served` (records `recs`) and the state layer.
  Status rewrite_with_state(std::span<const int64_t> recs, std::span<const uint8_t> served);
  // Later checkpoints: both layers' changed records and the accumulators as one generation.
  Result<uint64_t> update_in_place(std::span<const int64_t> recs, std::span<const uint8_t> served,
                                   const StoreUpdateOptions& update);

  std::string path_;
  std::string name_;
  EngramTrainOptions options_;
  std::unique_ptr<StoreReader> store_;
  const StoreLayerInfo* layer_ = nullptr;
  const StoreLayerInfo* state_ = nullptr;  // "<L>.train", once a checkpoint has written it
  EngramStoredLayer stored_;
  EngramRowLayout training_;
  std::map<int64_t, std::vector<uint8_t>> rows_;   // global row -> training view
  std::vector<float> accum_;                       // [rows] row-wise Adagrad accumulators
  std::map<int64_t, std::vector<float>> pending_;  // global row -> summed gradient
  std::set<int64_t> dirty_;                        // rows changed since the checkpoint
  uint64_t steps_ = 0;
  uint64_t seed_ = 0;
};

// The name of Engram layer `layer`'s training state layer.
std::string engram_state_layer_name(const std::string& layer);

}  // namespace trove
