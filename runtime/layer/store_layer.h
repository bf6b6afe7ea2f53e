// A PEER layer as stored: the manifest's opaque per-layer `info` (written by pack) parsed back
// into a PeerConfig and a RecordLayout, cross-checked against the physical table.
#pragma once

#include "base/status.h"
#include "kernels/peer_config.h"
#include "kernels/record.h"
#include "storage/store.h"

namespace trove {

struct StoredLayer {
  const StoreLayerInfo* info = nullptr;  // owned by the StoreReader
  PeerConfig config;
  RecordLayout record;
};

// Errors name the store, the layer and the field ("model.trove: layer L: info.record.dim = 0
// ...") when info is missing, malformed or disagrees with the table (dtype, record_bytes,
// stride, count = n_keys^2).
Result<StoredLayer> load_stored_layer(const StoreReader& store, const StoreLayerInfo& layer);

// By name; not found lists the layers the store has.
Result<StoredLayer> load_stored_layer(const StoreReader& store, const std::string& name);

}  // namespace trove
