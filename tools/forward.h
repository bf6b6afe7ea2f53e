// `trove forward`: runs one stored PEER layer over activations from a safetensors file and
// writes the output (and optionally the routing) as safetensors.
//
// The input tensor is [..., D] in F32, F16 or BF16 (a 1-D [D] tensor is one token); it is read
// batch by batch straight from the mapped file. The output keeps the leading dimensions:
// [..., D_out], in the input's dtype unless another is asked for. The routing dump holds
// "ids" (I64), "scores" and "gates" (F32), each [..., h, k], best first per head. Output files
// are each written atomically, after every batch has run: an error during the run writes
// nothing.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/routing_stats.h"
#include "storage/safetensors.h"

namespace trove {

struct ForwardOptions {
  std::string store;
  std::string layer;
  std::string input;
  std::string input_tensor;  // empty: the file's only tensor, else one named "x"
  std::string output;
  std::string routing_output;        // empty: no routing dump
  std::optional<StDType> out_dtype;  // default: the input's
  int64_t batch = 4096;              // tokens per layer call
  // Batches routed and prefetched ahead of the one computing (runtime/layer/lookahead.h); 0:
  // none. The output is the same bit for bit at any depth.
  int lookahead = 0;
  PeerLayerOptions layer_options;
  // Called after each batch with (tokens done, tokens in all).
  std::function<void(int64_t, int64_t)> progress;
};

struct ForwardReport {
  // The generation of the store the run read (every record and router tensor came from it:
  // a StoreReader pins its generation): its number and manifest checksum.
  uint64_t store_generation = 0;
  uint64_t store_manifest_xxh3 = 0;
  std::string input_tensor;
  std::vector<int64_t> input_shape;
  std::string input_dtype;
  std::vector<int64_t> output_shape;
  std::string output_dtype;
  PeerConfig config;
  std::string record_dtype;
  int64_t tokens = 0;
  int64_t batches = 0;
  double seconds = 0;  // the layer calls (not reading or writing files)
  double route_seconds = 0;
  double acquire_seconds = 0;
  double expert_seconds = 0;
  uint64_t record_bytes_used = 0;  // summed over batches (see PeerBatchStats)
  uint64_t record_bytes_unique = 0;
  // With a host budget (layer_options.tiers): the host tier's unique hits and misses, bytes
  // read from the store file, the disk's busy time and the time the layer waited for it.
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t prefetched = 0;  // unique experts read ahead of their batch by the look-ahead
  uint64_t bytes_read = 0;
  double disk_seconds = 0;
  double stall_seconds = 0;
  // An executor that moves records to a device (cuda; `device` says whether this one does): the
  // device tier's unique hits and misses (misses are every unique expert without one) and the
  // host -> device copies (bytes, seconds by CUDA events, all pinned).
  bool device = false;
  int64_t device_hits = 0;
  int64_t device_misses = 0;
  uint64_t h2d_bytes = 0;
  double h2d_seconds = 0;
  bool h2d_pinned = true;
  std::string h2d_method;  // the method misses moved by at the end ("auto": still trying)
  RoutingStats stats{0};
};

Result<ForwardReport> run_forward(const ForwardOptions& options);

}  // namespace trove
