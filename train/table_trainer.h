// One stored int4 PEER layer trained in place by gradients that come from outside: what
// trove.torch's Int4SR optimizer drives (python/core.cc). The caller runs the layer's forward
// and backward inside its own model; accumulate() adds each backward's row-sparse expert
// gradients (micro-batches sum, as torch's .grad does), step() applies SPEC §7 to the experts
// they touched and clears them, checkpoint() writes the changes as the store's next generation.
//
// Records and state are laid out as `trove train` lays them (train/trainer.h): the serving int4
// table computes through an overlay of the records changed since the last checkpoint; the training
// view (int8 code b at scale d/16) and row-wise Adagrad's accumulators live in the state layer
// "<L>.train", added by the first checkpoint (the store rewritten whole, atomically); every later
// checkpoint writes the changed records, the accumulators, the router and the step in place
// (storage/store_update.h: journaled, a crash leaves the old or the new generation). The router is
// the caller's to train; the checkpoint stores the layer's params() as they are.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/status.h"
#include "kernels/train.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/store_layer.h"
#include "runtime/tiers/overlay_source.h"
#include "storage/store.h"
#include "storage/store_lock.h"

namespace trove {

class TableTrainer {
 public:
  TableTrainer(const TableTrainer&) = delete;
  TableTrainer& operator=(const TableTrainer&) = delete;
  ~TableTrainer();

  // Layer `name` of the store at `path`, an int4 table (else invalid_argument naming its
  // dtype). The trainer holds the store's writer lock until it is destroyed: another writer
  // (a second trainer, `trove train`) is refused as busy, and a reader of the store in this
  // process would make checkpoint() refuse (storage/store_lock.h). `options` as for PeerLayer::open
  // (tiers: the serving table through a host tier). Resumes the step and the accumulators from a
  // state layer when the store has one.
  static Result<std::unique_ptr<TableTrainer>> open(const std::string& path,
                                                    const std::string& name,
                                                    PeerLayerOptions options = {});

  PeerLayer& layer() { return *layer_; }

  // Adds grads.expert_ids' rows d_down/d_up to the pending gradients.
  Status accumulate(const PeerGrads& grads);
  void zero_grad();
  int64_t pending_experts() const { return static_cast<int64_t>(pending_.size()); }
  int64_t steps() const { return step_; }

  // SPEC §7 on every expert with pending gradients (TrainStep: lr, tolerance, optimizer,
  // the store's seed, this step), then the pending gradients are cleared. Returns the update's
  // counts (experts, elements_changed, rescales, clamps, scale_inits) as JSON.
  Result<nlohmann::json> step(float lr, int saturation_tolerance, TrainOptimizer optimizer);

  // The changes since the last checkpoint as the store's next generation; returns what it
  // wrote (records, whole rewrite or in place, generation step) as JSON.
  Result<nlohmann::json> checkpoint();

  // The training view of `ids` dequantized (weight = d/16 * b): down [n, D], up [n, D_out].
  Status training_rows(std::span<const int64_t> ids, std::vector<float>* down,
                       std::vector<float>* up);

 private:
  TableTrainer() = default;
  Status open_sources();
  Status read_training_records(std::span<const int64_t> ids, uint8_t* out);

  std::string path_, name_;
  PeerLayerOptions options_;
  StoreLock lock_;  // the store's writer lock, for the trainer's life
  std::unique_ptr<StoreReader> store_;
  StoredLayer stored_;
  RecordLayout training_;
  uint64_t seed_ = 1;
  int64_t step_ = 0;
  std::vector<float> accum_;  // N x 2m row-wise Adagrad accumulators
  RecordOverlay dirty_serving_{64}, dirty_training_{64};
  OverlayExpertSource* serving_ = nullptr;        // the layer's source (the layer owns it)
  std::unique_ptr<ExpertSource> pending_source_;  // serving_ before the layer takes it
  std::unique_ptr<ExpertSource> committed_;       // the committed serving records
  std::unique_ptr<ExpertSource> training_base_;   // the state layer, or null before one
  std::unique_ptr<PeerLayer> layer_;
  std::unordered_map<int64_t, size_t> pending_;  // expert -> row in pending_down_/up_
  std::vector<float> pending_down_, pending_up_;
};

}  // namespace trove
