#include "train/adam.h"

#include <cassert>
#include <cmath>

namespace trove {

void adam_step(std::span<float> p, std::span<const float> g, std::span<float> m, std::span<float> v,
               float lr, int64_t t, const AdamHyper& hyper) {
  assert(g.size() == p.size() && m.size() == p.size() && v.size() == p.size() && t >= 1);
  const double c1 = 1.0 - std::pow(static_cast<double>(hyper.beta1), static_cast<double>(t));
  const double c2 = 1.0 - std::pow(static_cast<double>(hyper.beta2), static_cast<double>(t));
  const float b1 = hyper.beta1, b2 = hyper.beta2;
  for (size_t i = 0; i < p.size(); ++i) {
    m[i] = b1 * m[i] + (1.0f - b1) * g[i];
    v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
    const double mhat = m[i] / c1, vhat = v[i] / c2;
    p[i] = static_cast<float>(p[i] - lr * mhat / (std::sqrt(vhat) + hyper.eps));
  }
}

}  // namespace trove
