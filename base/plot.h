// Line plots as PNG files, for reports (`trove bench` curves of IOPS against queue depth,
// bandwidth against threads). Self-contained: its own raster, 5x7 bitmap font and PNG encoder
// (stored deflate blocks, so files are about width * height * 3 bytes; an 800x500 plot is
// 1.2 MB). No third-party code, and nothing outside base.
//
// The picture: white background, a title on top, a framed plot area with light grey
// gridlines at "nice" ticks (1, 2, 5 x 10^k; decades on a log x axis) labelled with numbers,
// axis labels below and (rotated) left, one coloured polyline with square point markers per
// series, and a legend naming the series in the plot area's top right corner. Text is
// printable ASCII; any other byte is drawn as '?'.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace trove {

struct PlotSeries {
  std::string name;       // legend entry; also names the series in errors
  std::vector<double> x;  // as many x as y, all finite (> 0 on a log x axis)
  std::vector<double> y;
};

struct PlotSpec {
  std::string title;
  std::string x_label;
  std::string y_label;
  bool log_x = false;  // base-10 x axis (queue depths 1..256, block sizes)
  std::vector<PlotSeries> series;
  int width = 800;   // pixels, in [kMinPlotWidth, kMaxPlotSide]
  int height = 500;  // pixels, in [kMinPlotHeight, kMaxPlotSide]
};

inline constexpr int kMinPlotWidth = 200;
inline constexpr int kMinPlotHeight = 150;
inline constexpr int kMaxPlotSide = 4096;

struct PlotColor {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const PlotColor&) const = default;
};

// The colour series `index` is drawn in (a fixed palette of 8, reused cyclically). No other
// part of a plot uses these colours, so a test or a reader can find a series by colour.
PlotColor plot_series_color(size_t index);

// Draws `spec` and writes it to `path` as an 8-bit RGB PNG, atomically: the bytes go to
// "<path>.tmp", are fsynced and renamed over `path`, so `path` is never a partial image.
// Errors: Status::invalid_argument for a spec that cannot be drawn (no series; a series with
// no points, x and y of different lengths, a NaN or infinite value, x <= 0 on a log axis;
// a size out of range), naming the series and the point; an I/O error naming the path.
Status write_plot_png(const std::string& path, const PlotSpec& spec);

// The PNG file write_plot_png writes, in memory (for tests and for callers that embed it).
Result<std::vector<uint8_t>> render_plot_png(const PlotSpec& spec);

}  // namespace trove
