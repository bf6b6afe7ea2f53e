// EngramTrainer: trains a stored int4 Engram layer's rows in place (SPEC §7, as PEER's
// TableTrainer trains expert records): the rows a step touches are imported into the int8
// training view (kernels/engram.h) and kept in memory with their row-wise Adagrad
// accumulators; step() applies the pending segment-summed row gradients with stochastic
// rounding; checkpoint() writes the served int4 records of every row changed since the last
// checkpoint as the store's next generation through its update journal
// (storage/store_update.h): a crash at any moment leaves the old or the new generation whole.
//
// What a checkpoint persists is the served int4 rows only: the training view's finer codes
// and the accumulators of the touched rows live in the trainer, so a run resumed from a
// checkpoint restarts them from the int4 rows (b = 16 q, accumulators 0). One thread.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

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
  uint64_t seed = 0;
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
  // Writes the records of the rows changed since the last checkpoint as the next generation;
  // returns it. `update` carries the fault-injection seam for tests. After a failed commit the
  // trainer is closed (every later call fails with Aborted): as after a crash, a new trainer
  // opens the store at a whole generation.
  Result<uint64_t> checkpoint(const StoreUpdateOptions& update = {});

  uint64_t steps() const { return steps_; }
  int64_t pending_rows() const { return static_cast<int64_t>(pending_.size()); }
  int64_t dirty_records() const { return static_cast<int64_t>(dirty_.size()); }

 private:
  EngramTrainer() = default;
  Status reopen();
  Status check_open() const;
  // The training row of global row g, imported from the store on first use.
  Result<uint8_t*> training_row(int64_t g);

  struct Row {
    std::vector<uint8_t> bytes;  // training view
    float accum = 0.0f;
  };

  std::string path_;
  std::string name_;
  EngramTrainOptions options_;
  std::unique_ptr<StoreReader> store_;
  const StoreLayerInfo* layer_ = nullptr;
  EngramStoredLayer stored_;
  EngramRowLayout training_;
  std::map<int64_t, Row> rows_;                    // global row -> training state
  std::map<int64_t, std::vector<float>> pending_;  // global row -> summed gradient
  std::set<int64_t> dirty_;                        // records changed since the checkpoint
  uint64_t steps_ = 0;
};

}  // namespace trove
