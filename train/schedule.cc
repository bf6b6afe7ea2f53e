#include "train/schedule.h"

#include <cmath>
#include <cstdlib>

#include "base/strings.h"

namespace trove {

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// A whole-string number.
bool parse_number(std::string_view s, double* out) {
  const std::string text(s);
  if (text.empty()) return false;
  char* end = nullptr;
  *out = std::strtod(text.c_str(), &end);
  return end == text.c_str() + text.size();
}

}  // namespace

Result<std::vector<LrPhase>> parse_lr_phases(std::string_view spec) {
  std::vector<LrPhase> phases;
  const std::vector<std::string> texts = str_split(spec, ';');
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::string_view text = trim(texts[i]);
    if (text.empty() && i + 1 == texts.size() && i > 0) break;  // a trailing ';'
    auto bad = [&](const std::string& why) {
      return Status::invalid_argument(
          str_printf("--lr-phases: phase %zu '%s': %s (expected STEPS:GROUP=LR[,GROUP=LR...], e.g. "
                     "'1000:L0=1e-3,L1=1e-5;1000:all=5e-4')",
                     i + 1, std::string(text).c_str(), why.c_str()));
    };
    const size_t colon = text.find(':');
    if (colon == std::string_view::npos) return bad("no ':' after the step count");
    double steps = 0;
    if (!parse_number(trim(text.substr(0, colon)), &steps) || steps < 1 ||
        steps != std::floor(steps) || steps > 1e15) {
      return bad("the step count is not a whole number >= 1");
    }
    LrPhase phase;
    phase.steps = static_cast<int64_t>(steps);
    for (const std::string& whole : str_split(text.substr(colon + 1), ',')) {
      const std::string_view item = trim(whole);
      const size_t eq = item.find('=');
      if (eq == std::string_view::npos) return bad("'" + std::string(item) + "' has no '='");
      const std::string group(trim(item.substr(0, eq)));
      double lr = 0;
      if (group.empty()) return bad("a rate without a group");
      if (!parse_number(trim(item.substr(eq + 1)), &lr) || !(lr > 0) || !std::isfinite(lr) ||
          lr > 1e30) {
        return bad("the rate of '" + group + "' is not a positive number");
      }
      for (const auto& [name, rate] : phase.rates) {
        if (name == group) return bad("'" + group + "' is named twice");
      }
      phase.rates.emplace_back(group, static_cast<float>(lr));
    }
    phases.push_back(std::move(phase));
  }
  if (phases.empty()) return Status::invalid_argument("--lr-phases: no phase given");
  return phases;
}

// The shortest %g spelling that reads back as `v`.
std::string shortest(float v) {
  for (int digits = 6;; ++digits) {
    const std::string text = str_printf("%.*g", digits, static_cast<double>(v));
    if (digits >= 9 || std::strtof(text.c_str(), nullptr) == v) return text;
  }
}

std::string lr_phases_text(const std::vector<LrPhase>& phases) {
  std::string text;
  for (const LrPhase& p : phases) {
    text += (text.empty() ? "" : ";") + std::to_string(p.steps) + ":";
    for (size_t i = 0; i < p.rates.size(); ++i) {
      text += (i ? "," : "") + p.rates[i].first + "=" + shortest(p.rates[i].second);
    }
  }
  return text;
}

Status check_lr_phase_groups(const std::vector<LrPhase>& phases,
                             const std::vector<std::string>& layers, bool train_router) {
  for (size_t i = 0; i < phases.size(); ++i) {
    for (const auto& [group, rate] : phases[i].rates) {
      bool router_group = group == "router";
      for (const std::string& l : layers) router_group = router_group || group == l + ".router";
      if (router_group && !train_router) {
        return Status::invalid_argument(
            str_printf("--lr-phases: phase %zu sets a rate for '%s', but the routers do not "
                       "train: add --train-router, or drop the group",
                       i + 1, group.c_str()));
      }
      bool known = group == "experts" || group == "router" || group == "all";
      for (const std::string& l : layers) known = known || group == l || group == l + ".router";
      if (!known) {
        std::string names;
        for (const std::string& l : layers) names += (names.empty() ? "" : ", ") + l;
        return Status::invalid_argument(
            str_printf("--lr-phases: phase %zu names '%s', which is not a trained layer, "
                       "'<layer>.router', 'experts', 'router' or 'all'; the layers: %s",
                       i + 1, group.c_str(), names.c_str()));
      }
    }
  }
  return Status::ok_status();
}

float phase_lr(const std::vector<LrPhase>& phases, int64_t step, const std::string& layer,
               bool router, float base) {
  if (phases.empty()) return base;
  const LrPhase* phase = &phases.back();
  int64_t end = 0;
  for (const LrPhase& p : phases) {
    end += p.steps;
    if (step < end) {
      phase = &p;
      break;
    }
  }
  // Most specific first.
  const std::string names[3] = {router ? layer + ".router" : layer, router ? "router" : "experts",
                                "all"};
  for (const std::string& name : names) {
    for (const auto& [group, rate] : phase->rates) {
      if (group == name) return rate;
    }
  }
  return base;
}

}  // namespace trove
