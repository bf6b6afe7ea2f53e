// PeerLayer: one PEER layer (SPEC §2) ready to run on the CPU or a CUDA device: its config, its
// router parameters (fp32, always resident) and an ExpertSource for its records. forward() routes
// the batch, dedupes the selected experts, leases them from the source, runs the expert kernels on
// the record pointers and releases them; backward() returns the gradients of every parameter,
// the expert tables' as row-sparse rows per unique expert.
//
//   auto store = StoreReader::open("model.trove");
//   auto layer = PeerLayer::open(*store, "model.layers.19.mlp.peer");
//   layer->forward(x, T, y);                 // x [T, D] fp32, y [T, D_out]
//
// Non-finite inputs are rejected (Status::invalid_argument naming the token and element):
// routing by NaN scores is undefined, and a silent NaN output would hide the fault upstream.
// An empty batch (T = 0) is valid and produces nothing. A PeerLayer is not thread-safe; run one
// batch at a time per layer.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "runtime/tiers/cache_policy.h"
#include "runtime/tiers/expert_source.h"
#include "runtime/tiers/tiered_source.h"
#include "storage/store.h"

namespace trove {

enum class PeerBackend : uint8_t {
  kCpu,   // kernels/cpu/peer.h: SIMD + threads
  kRef,   // kernels/cpu/ref/peer_ref.h: the oracle (slow; for checking)
  kCuda,  // kernels/cuda/peer_cuda.h on the current CUDA device (runtime/layer/peer_layer_cuda.h)
};
std::string_view peer_backend_name(PeerBackend b);  // "cpu" "ref" "cuda"
Result<PeerBackend> parse_peer_backend(std::string_view s);

// OK when layers of backend `b` can be made on this machine. kCuda: kNotSupported "no CUDA
// device is available (<why>)" without a usable device, or "trove was built without CUDA ..."
// in a build without the CUDA backend. Cheap; for tools to refuse before any work.
Status check_backend_available(PeerBackend b);

// OK when every value of `v` (rows of `row_len`) is finite; else Status::invalid_argument
// "<what>: token <first_row + row>, element <col> is nan; ...".
Status check_finite_rows(const char* what, std::span<const float> v, int64_t row_len,
                         int64_t first_row = 0);

// kCuda: how the records a batch misses in the device tier reach the device (SPEC §5). Each is
// one operation per pipeline chunk (runtime/layer/peer_layer_cuda.h), never one per record.
enum class H2dMethod {
  kAuto,    // the first batches with misses try each method that applies; then the fastest
  kSlab,    // the host packs the records into a pinned staging slab; one cudaMemcpyAsync (no
            // device tier) or one cudaMemcpyBatchAsync scattering it into the device slots
  kBatch,   // one cudaMemcpyBatchAsync straight from the host tier's pinned slots (no host copy)
  kGather,  // one kernel whose SMs read the host tier's pinned slots through the mapping
};
std::string_view h2d_method_name(H2dMethod m);  // "auto" "slab" "batch" "gather"
Result<H2dMethod> parse_h2d_method(std::string_view s);

// kCuda: what one H2D method moved over the layer's batches so far (records only, no tables).
struct H2dMethodTotals {
  H2dMethod method = H2dMethod::kSlab;
  int64_t batches = 0;
  uint64_t bytes = 0;
  double seconds = 0;  // copy stream time from the first record copy to the last, by events
};

struct PeerLayerOptions {
  PeerBackend backend = PeerBackend::kCpu;
  int threads = 0;               // 0: all cores
  bool verify_checksums = true;  // verify each record read from a store the first time
  // open(): with a host budget, records come through a TieredExpertSource (host tier over the
  // store file, runtime/tiers/tiered_source.h); without, each record is read (checked I/O) the
  // first time it is used and kept (ResidentStoreExpertSource).
  std::optional<TieredSourceOptions> tiers;
  // kCuda only: the device tier's (T0's) byte budget (--vram). 0: no device tier; each batch's
  // records are copied to the device afresh (one staging slab per batch).
  uint64_t vram_budget_bytes = 0;
  EvictionPolicy vram_policy = EvictionPolicy::kFrequency;
  // kCuda only. kBatch and kGather need the records in pinned, mapped host memory (open() with
  // tiers pins the host tier for kCuda); a batch whose records are not falls back to kSlab.
  H2dMethod h2d = H2dMethod::kAuto;
  // kCuda only: a batch's transfer and expert kernel run in this many chunks of tokens, chunk
  // c's kernel overlapping chunk c + 1's transfer. 0: one per 256 tokens, 1 to 4.
  int pipeline_chunks = 0;
  // kCpu only (last, so that positional initializers of the fields above stay valid): the expert
  // stage's down-row dots on int8/int4 records (kernels/cpu/peer.h). kInt8 quantizes each token's
  // xhat to int8 for integer dot products: faster where compute bounds the stage, outside the fp32
  // parity tolerances, hence off by default.
  ExpertDot expert_dot = ExpertDot::kFloat;
};

// kCuda: what making a batch's records visible to the device cost.
struct DeviceTransferStats {
  int64_t hits = 0;           // unique experts already in the device tier (no copy)
  int64_t misses = 0;         // unique experts copied from the host (all of them without T0)
  uint64_t bytes_copied = 0;  // host -> device, records and tables
  double copy_seconds = 0;    // those copies, between CUDA events on the copy stream
  bool pinned = true;         // the staging slab was pinned (false: the pageable fallback)
  H2dMethod method = H2dMethod::kSlab;  // how the misses moved
  int chunks = 0;                       // pipeline chunks
};

// Router parameters, canonical arrangement (runtime/convert/layouts.h), owned.
struct PeerDenseParams {
  std::vector<float> query_weight;  // [h*2*dk, D]
  std::vector<float> query_bias;    // [h*2*dk] or empty
  std::vector<float> keys;          // [hk, 2, n, dk]
  std::vector<float> norm_weight;   // [D] or empty
};

// What one forward() did, for reports and benchmarks.
struct PeerBatchStats {
  int64_t tokens = 0;
  int64_t slots = 0;                 // T * h * k expert uses
  int64_t unique_experts = 0;        // distinct experts among them
  uint64_t record_bytes_used = 0;    // slots * record bytes: what the expert kernels read
  uint64_t record_bytes_unique = 0;  // unique * record bytes
  double route_seconds = 0;          // norm, query, sub-key scores, top-k, gates
  double acquire_seconds = 0;        // dedupe and leasing from the source
  double expert_seconds = 0;   // the expert kernels (both waves, see runtime/tiers/tiered_source.h)
  ExpertFetchStats fetch;      // what the source did (tiers: hits, misses, disk, stall)
  DeviceTransferStats device;  // kCuda only
};

class PeerLayer {
 public:
  PeerLayer(PeerLayer&&) noexcept;
  PeerLayer& operator=(PeerLayer&&) noexcept;
  PeerLayer(const PeerLayer&) = delete;
  PeerLayer& operator=(const PeerLayer&) = delete;
  ~PeerLayer();

  // Layer `name` of `store` (which must outlive the layer): config and record layout from the
  // manifest, router parameters read and verified, records through a ResidentStoreExpertSource.
  // A missing layer is Status::not_found listing the store's layers.
  static Result<PeerLayer> open(const StoreReader& store, const std::string& name,
                                PeerLayerOptions options = {});
  // From tensors in memory. `config` is validated (and its defaults filled); every tensor's size
  // and the source's layout are checked against it, errors naming the tensor.
  static Result<PeerLayer> create(PeerConfig config, PeerDenseParams params,
                                  std::unique_ptr<ExpertSource> experts,
                                  PeerLayerOptions options = {});

  const PeerConfig& config() const;
  const RecordLayout& record_layout() const;
  const PeerDenseParams& params() const;
  // The router parameters to change in place between batches (the trainer's Adam step). The
  // sizes must stay as they are. (kCuda: the device copy is refreshed at the next batch.)
  PeerDenseParams& mutable_params();
  ExpertSource& experts();
  const PeerLayerOptions& options() const;

  // kCuda: what each H2D method moved so far, and the method batches use now (kAuto while
  // still trying). Empty otherwise.
  std::vector<H2dMethodTotals> h2d_totals() const;
  H2dMethod h2d_method() const;

  // OK when batches of up to `tokens` tokens fit the expert source and, for kCuda, the device
  // tier (each can select tokens * h * k distinct experts); else the source's or the device
  // tier's error, before any work.
  Status check_batch(int64_t tokens) const;

  // y [T, D_out] for x [T, D] (row-major fp32). `routing`, when given, receives the routing;
  // `stats`, when given, what the batch cost. Errors: sizes that disagree with T and the
  // config, non-finite inputs, and whatever the expert source reports.
  Status forward(std::span<const float> x, int64_t T, std::span<float> y,
                 PeerRouting* routing = nullptr, PeerBatchStats* stats = nullptr);

  // forward() with the routing given instead of computed (benchmarks replay synthetic or
  // recorded routings through the same expert path): `routing` must hold T tokens of h x k
  // ids in [0, N) and finite gates. x is still normalized (the experts read x-hat).
  Status forward_routed(std::span<const float> x, int64_t T, const PeerRouting& routing,
                        std::span<float> y, PeerBatchStats* stats = nullptr);

  // Look-ahead (runtime/layer/lookahead.h): the routing forward() computes for x, without the
  // experts; forward_routed(x, T, routing) then gives forward()'s y bit for bit. Errors: as
  // forward()'s for x.
  Status route(std::span<const float> x, int64_t T, PeerRouting* routing);
  // Tells the expert source the distinct experts of `routing`, a batch to come
  // (ExpertSource::prefetch: the source reads ahead what it lacks). Never fails.
  // REQUIRES: the routing's ids in [0, N) (as route() gives).
  void prefetch(const PeerRouting& routing);

  // The distinct experts the last forward() used, ascending (valid until the next call).
  std::span<const int64_t> last_experts() const;

  // Gradients of sum(dy * y) at x (routing recomputed from x). dy is [T, D_out].
  Status backward(std::span<const float> x, int64_t T, std::span<const float> dy, PeerGrads* grads);

 private:
  struct Impl;
  explicit PeerLayer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace trove
