// Adam (Kingma & Ba) for the router's fp32 tensors when `trove train --train-router` trains them
// (SPEC §7: W_q, keys and norms train in fp32 with Adam; the expert tables use the int4 update).
// Deterministic: the same inputs give the same bits on every machine and thread count.
#pragma once

#include <cstdint>
#include <span>

namespace trove {

struct AdamHyper {
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
};

// One step t (1-based, for the bias corrections) on parameters p with gradient g and moments m
// and v (all the same length; m and v start at zero):
//   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  p <- p - lr m^ / (sqrt(v^) + eps),
// m^ = m / (1 - b1^t), v^ = v / (1 - b2^t).
void adam_step(std::span<float> p, std::span<const float> g, std::span<float> m, std::span<float> v,
               float lr, int64_t t, const AdamHyper& hyper = {});

}  // namespace trove
