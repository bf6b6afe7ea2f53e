// Learning-rate phases for `trove train --lr-phases` (the background documents' differential-LR
// schedule: one table leads at a high rate while another follows at a minimal one, then they
// swap, then all train together).
//
//   "1000:L0=1e-3,L1=1e-5; 1000:L0=1e-5,L1=1e-3; 1000:all=5e-4"
//
// A phase is STEPS:GROUP=LR[,GROUP=LR...]. A group is a layer's expert table (its name), a
// layer's router ("<name>.router"), every table ("experts"), every router ("router") or both
// ("all"); the most specific name wins, and a group a phase does not name trains at the base
// rate (--lr for tables, --router-lr for routers). After the last phase its rates hold. The
// rate of step s is a function of s alone, so a resumed run follows the same schedule.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/status.h"

namespace trove {

struct LrPhase {
  int64_t steps = 0;                                 // >= 1
  std::vector<std::pair<std::string, float>> rates;  // group -> rate (> 0, finite)
};

// Errors name the phase and the text that is wrong.
Result<std::vector<LrPhase>> parse_lr_phases(std::string_view spec);

// The phases as one canonical line (each rate the shortest text that reads back as it), for
// checkpoints and reports; ""
// when there are none.
std::string lr_phases_text(const std::vector<LrPhase>& phases);

// OK when every group the phases name is one of `layers`, "<layer>.router", "experts",
// "router" or "all"; else an error naming the group and listing the layers.
// Router groups ("<layer>.router", "router") need `train_router`.
Status check_lr_phase_groups(const std::vector<LrPhase>& phases,
                             const std::vector<std::string>& layers, bool train_router);

// The rate of `layer`'s expert table (router = false) or router (router = true) at `step`.
float phase_lr(const std::vector<LrPhase>& phases, int64_t step, const std::string& layer,
               bool router, float base);

}  // namespace trove
