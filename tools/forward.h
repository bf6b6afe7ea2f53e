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

#include "base/metrics.h"
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
  // What the batches did (base/metrics.h), summed with +=: each batch's batch_metrics (tokens,
  // slots, record bytes, stage seconds, "host.*": the host tier's unique hits and misses, bytes
  // read, disk and stall seconds, experts read ahead by the look-ahead; "device.*": the device
  // tier's hits and misses and the host -> device copies), the same names as the Python side's
  // last_stats, and the per-batch latency histograms "latency.batch" (from one batch's output to
  // the next's, look-ahead included), "latency.route", "latency.acquire", "latency.experts".
  Metrics metrics;
  // Whether the executor moves records to a device memory (ExecutorTraits::device_memory), and
  // the method misses moved by at the end ("auto": still trying).
  bool device = false;
  std::string h2d_method;
  RoutingStats stats{0};
};

Result<ForwardReport> run_forward(const ForwardOptions& options);

}  // namespace trove
