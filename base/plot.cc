// Line plots as PNG (base/plot.h): validation, layout, a small RGB raster with a 5x7 bitmap
// font, and a PNG encoder that stores the pixels uncompressed (deflate "stored" blocks). A
// plot is written once per report, so simplicity wins over file size.
#include "base/plot.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "base/strings.h"

namespace trove {

namespace {

// ---- font -----------------------------------------------------------------------------------

constexpr int kGlyphWidth = 5;
constexpr int kGlyphHeight = 7;
constexpr int kCharAdvance = kGlyphWidth + 1;  // one column of spacing
constexpr int kLineAdvance = kGlyphHeight + 1;

// Printable ASCII 32..126, one glyph per line: 7 rows top to bottom, bit 4 the leftmost of
// 5 columns. Drawn for this file in the style of the HD44780 LCD character set.
constexpr uint8_t kFont[95][kGlyphHeight] = {
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // space
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04},  // !
    {0x0A, 0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00},  // "
    {0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A},  // #
    {0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04},  // $
    {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03},  // %
    {0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D},  // &
    {0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00},  // '
    {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02},  // (
    {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08},  // )
    {0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00},  // *
    {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00},  // +
    {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08},  // ,
    {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00},  // -
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C},  // .
    {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00},  // /
    {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E},  // 0
    {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E},  // 1
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F},  // 2
    {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E},  // 3
    {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02},  // 4
    {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E},  // 5
    {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E},  // 6
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08},  // 7
    {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E},  // 8
    {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C},  // 9
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00},  // :
    {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08},  // ;
    {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02},  // <
    {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00},  // =
    {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08},  // >
    {0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04},  // ?
    {0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E},  // @
    {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11},  // A
    {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E},  // B
    {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E},  // C
    {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C},  // D
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F},  // E
    {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10},  // F
    {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F},  // G
    {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11},  // H
    {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E},  // I
    {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C},  // J
    {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11},  // K
    {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F},  // L
    {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11},  // M
    {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11},  // N
    {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E},  // O
    {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10},  // P
    {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D},  // Q
    {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11},  // R
    {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E},  // S
    {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},  // T
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E},  // U
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04},  // V
    {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A},  // W
    {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11},  // X
    {0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04},  // Y
    {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F},  // Z
    {0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E},  // [
    {0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00},  // backslash
    {0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E},  // ]
    {0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00},  // ^
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F},  // _
    {0x08, 0x04, 0x02, 0x00, 0x00, 0x00, 0x00},  // `
    {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F},  // a
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E},  // b
    {0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E},  // c
    {0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F},  // d
    {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E},  // e
    {0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08},  // f
    {0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // g
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11},  // h
    {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E},  // i
    {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C},  // j
    {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12},  // k
    {0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E},  // l
    {0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11},  // m
    {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11},  // n
    {0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E},  // o
    {0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10},  // p
    {0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01},  // q
    {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10},  // r
    {0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E},  // s
    {0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06},  // t
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D},  // u
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04},  // v
    {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A},  // w
    {0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11},  // x
    {0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // y
    {0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F},  // z
    {0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02},  // {
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},  // |
    {0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08},  // }
    {0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00},  // ~
};

const uint8_t* glyph(char c) {
  const auto u = static_cast<unsigned char>(c);
  return kFont[(u >= 32 && u <= 126) ? u - 32 : '?' - 32];
}

// ---- raster ---------------------------------------------------------------------------------

constexpr PlotColor kWhite{255, 255, 255};
constexpr PlotColor kBlack{0, 0, 0};
constexpr PlotColor kGrid{226, 226, 226};
constexpr PlotColor kLegendFrame{160, 160, 160};

constexpr std::array<PlotColor, 8> kPalette = {{
    {31, 119, 180},   // blue
    {255, 127, 14},   // orange
    {44, 160, 44},    // green
    {214, 39, 40},    // red
    {148, 103, 189},  // purple
    {140, 86, 75},    // brown
    {227, 119, 194},  // pink
    {23, 190, 207},   // cyan
}};

class Canvas {
 public:
  Canvas(int width, int height)
      : width_(width), height_(height), rgb_(static_cast<size_t>(width) * height * 3, 255) {}

  int width() const { return width_; }
  int height() const { return height_; }
  const std::vector<uint8_t>& rgb() const { return rgb_; }

  // Pixels outside the image are dropped, so callers draw without clipping.
  void set(int x, int y, PlotColor c) {
    if (x < 0 || y < 0 || x >= width_ || y >= height_) return;
    uint8_t* p = &rgb_[(static_cast<size_t>(y) * width_ + x) * 3];
    p[0] = c.r;
    p[1] = c.g;
    p[2] = c.b;
  }
  void fill_rect(int x0, int y0, int x1, int y1, PlotColor c) {  // inclusive corners
    for (int y = y0; y <= y1; ++y) {
      for (int x = x0; x <= x1; ++x) set(x, y, c);
    }
  }
  void frame_rect(int x0, int y0, int x1, int y1, PlotColor c) {
    fill_rect(x0, y0, x1, y0, c);
    fill_rect(x0, y1, x1, y1, c);
    fill_rect(x0, y0, x0, y1, c);
    fill_rect(x1, y0, x1, y1, c);
  }
  // Bresenham, `thickness` pixels wide (a square brush).
  void line(int x0, int y0, int x1, int y1, int thickness, PlotColor c) {
    const int dx = std::abs(x1 - x0), sx = x0 < x1 ? 1 : -1;
    const int dy = -std::abs(y1 - y0), sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    for (;;) {
      fill_rect(x0, y0, x0 + thickness - 1, y0 + thickness - 1, c);
      if (x0 == x1 && y0 == y1) return;
      const int e2 = 2 * err;
      if (e2 >= dy) {
        err += dy;
        x0 += sx;
      }
      if (e2 <= dx) {
        err += dx;
        y0 += sy;
      }
    }
  }
  // Text whose top-left corner is (x, y), each font pixel a scale x scale square.
  void text(int x, int y, std::string_view s, PlotColor c, int scale = 1) {
    for (size_t i = 0; i < s.size(); ++i) {
      const uint8_t* g = glyph(s[i]);
      const int gx = x + static_cast<int>(i) * kCharAdvance * scale;
      for (int row = 0; row < kGlyphHeight; ++row) {
        for (int col = 0; col < kGlyphWidth; ++col) {
          if ((g[row] & (0x10 >> col)) == 0) continue;
          fill_rect(gx + col * scale, y + row * scale, gx + col * scale + scale - 1,
                    y + row * scale + scale - 1, c);
        }
      }
    }
  }
  // Text turned 90 degrees counter-clockwise (reading upwards), its first character's
  // bottom-left corner at (x, y): glyph tops face left.
  void text_up(int x, int y, std::string_view s, PlotColor c) {
    for (size_t i = 0; i < s.size(); ++i) {
      const uint8_t* g = glyph(s[i]);
      const int gy = y - static_cast<int>(i) * kCharAdvance;
      for (int row = 0; row < kGlyphHeight; ++row) {
        for (int col = 0; col < kGlyphWidth; ++col) {
          if ((g[row] & (0x10 >> col)) != 0) set(x + row, gy - col, c);
        }
      }
    }
  }

 private:
  int width_;
  int height_;
  std::vector<uint8_t> rgb_;
};

int text_width(std::string_view s, int scale = 1) {
  return s.empty() ? 0 : (static_cast<int>(s.size()) * kCharAdvance - 1) * scale;
}

// ---- axes -----------------------------------------------------------------------------------

struct Tick {
  double at;  // in axis units (log10 of the value on a log axis)
  std::string label;
};

// A data range mapped onto pixels [p0, p1] (p1 < p0 for the y axis: up is smaller).
struct Axis {
  double lo = 0, hi = 1;  // axis units
  bool log = false;
  std::vector<Tick> ticks;

  double units(double v) const { return log ? std::log10(v) : v; }
  int pixel(double v, int p0, int p1) const {
    const double t = (units(v) - lo) / (hi - lo);
    return p0 + static_cast<int>(std::lround(t * (p1 - p0)));
  }
};

// Fixed-point with `decimals` digits where that reads well, else %g.
std::string format_tick(double v, int decimals) {
  const double a = std::fabs(v);
  if (a == 0) return "0";
  if (a >= 1e-4 && a < 1e7 && decimals <= 6) return str_printf("%.*f", decimals, v);
  return str_printf("%g", v);
}

// 1, 2 or 5 x 10^k: the step giving about `target` intervals over `range`.
double nice_step(double range, int target) {
  const double raw = range / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

Axis linear_axis(double min, double max, int target_ticks) {
  if (min == max) {  // one value: a band around it
    const double pad = min == 0 ? 1 : std::fabs(min) * 0.1;
    min -= pad;
    max += pad;
  }
  Axis a;
  const double step = nice_step(max - min, target_ticks);
  const double k0 = std::floor(min / step), k1 = std::ceil(max / step);
  a.lo = k0 * step;
  a.hi = k1 * step;
  const int decimals = std::max(0, -static_cast<int>(std::floor(std::log10(step) + 1e-9)));
  for (double k = k0; k <= k1; k += 1)
    a.ticks.push_back({k * step, format_tick(k * step, decimals)});
  return a;
}

// Whole decades; 2 and 5 in between when the axis spans at most two decades; every n-th
// decade when it spans many.
Axis log_axis(double min, double max, int target_ticks) {
  Axis a;
  a.log = true;
  const int e0 = static_cast<int>(std::floor(std::log10(min)));
  int e1 = static_cast<int>(std::ceil(std::log10(max)));
  if (e1 == e0) ++e1;
  a.lo = e0;
  a.hi = e1;
  const int every = std::max(1, (e1 - e0 + target_ticks - 1) / std::max(1, target_ticks));
  for (int e = e0; e <= e1; ++e) {
    const int decimals = std::max(0, -e);
    if ((e - e0) % every == 0)
      a.ticks.push_back({double(e), format_tick(std::pow(10.0, e), decimals)});
    if (e1 - e0 <= 2 && e < e1) {
      for (int m : {2, 5}) {
        const double v = m * std::pow(10.0, e);
        a.ticks.push_back({std::log10(v), format_tick(v, decimals)});
      }
    }
  }
  return a;
}

// ---- validation -----------------------------------------------------------------------------

std::string series_name(const PlotSeries& s, size_t index) {
  return str_printf("series \"%s\" (#%zu)", clip(s.name, 64).c_str(), index);
}

Status validate(const PlotSpec& spec) {
  const std::string plot = str_printf("plot \"%s\"", clip(spec.title, 64).c_str());
  if (spec.width < kMinPlotWidth || spec.width > kMaxPlotSide || spec.height < kMinPlotHeight ||
      spec.height > kMaxPlotSide) {
    return Status::invalid_argument(str_printf("%s: size %dx%d is outside %dx%d..%dx%d pixels",
                                               plot.c_str(), spec.width, spec.height, kMinPlotWidth,
                                               kMinPlotHeight, kMaxPlotSide, kMaxPlotSide));
  }
  if (spec.series.empty()) {
    return Status::invalid_argument(plot + ": no series to draw");
  }
  for (size_t i = 0; i < spec.series.size(); ++i) {
    const PlotSeries& s = spec.series[i];
    const std::string where = plot + ": " + series_name(s, i);
    if (s.x.size() != s.y.size()) {
      return Status::invalid_argument(
          str_printf("%s has %zu x values but %zu y values: give one x per y", where.c_str(),
                     s.x.size(), s.y.size()));
    }
    if (s.x.empty()) return Status::invalid_argument(where + " is empty: give at least one point");
    for (size_t p = 0; p < s.x.size(); ++p) {
      if (!std::isfinite(s.x[p]) || !std::isfinite(s.y[p])) {
        return Status::invalid_argument(
            str_printf("%s: point %zu is (%g, %g): every value must be finite", where.c_str(), p,
                       s.x[p], s.y[p]));
      }
      if (spec.log_x && s.x[p] <= 0) {
        return Status::invalid_argument(
            str_printf("%s: point %zu has x = %g, which a log x axis cannot show (x must be > 0)",
                       where.c_str(), p, s.x[p]));
      }
    }
  }
  return Status();
}

// ---- drawing --------------------------------------------------------------------------------

constexpr int kTickLength = 4;
constexpr int kMarkerHalf = 2;  // markers: 6x6 squares, centred on the 2-pixel-wide line
constexpr int kLineThickness = 2;

std::vector<uint8_t> draw(const PlotSpec& spec) {
  Canvas canvas(spec.width, spec.height);
  const int w = spec.width, h = spec.height;

  double x_min = INFINITY, x_max = -INFINITY, y_min = INFINITY, y_max = -INFINITY;
  for (const PlotSeries& s : spec.series) {
    for (size_t p = 0; p < s.x.size(); ++p) {
      x_min = std::min(x_min, s.x[p]);
      x_max = std::max(x_max, s.x[p]);
      y_min = std::min(y_min, s.y[p]);
      y_max = std::max(y_max, s.y[p]);
    }
  }

  // Vertical layout first (it fixes the plot height and so the y ticks), then the y tick
  // labels' width fixes the left margin.
  const int title_scale = text_width(spec.title, 2) <= w - 16 ? 2 : 1;
  const int top = spec.title.empty() ? 12 : 8 + kGlyphHeight * title_scale + 10;
  const int bottom =
      h - 1 - (kTickLength + 4 + kLineAdvance + (spec.x_label.empty() ? 0 : 6 + kLineAdvance) + 6);
  const Axis y_axis = linear_axis(y_min, y_max, std::clamp((bottom - top) / 50, 2, 10));
  int y_label_width = 0;
  for (const Tick& t : y_axis.ticks) y_label_width = std::max(y_label_width, text_width(t.label));
  const int left =
      8 + (spec.y_label.empty() ? 0 : kLineAdvance + 6) + y_label_width + 4 + kTickLength;
  const int right = w - 1 - 20;
  const int x_target = std::clamp((right - left) / 90, 2, 10);
  const Axis x_axis =
      spec.log_x ? log_axis(x_min, x_max, x_target) : linear_axis(x_min, x_max, x_target);

  // Gridlines, then the frame over them.
  for (const Tick& t : x_axis.ticks) {
    const int px = left + static_cast<int>(std::lround((t.at - x_axis.lo) /
                                                       (x_axis.hi - x_axis.lo) * (right - left)));
    canvas.fill_rect(px, top, px, bottom, kGrid);
    canvas.fill_rect(px, bottom + 1, px, bottom + kTickLength, kBlack);
    canvas.text(px - text_width(t.label) / 2, bottom + kTickLength + 4, t.label, kBlack);
  }
  for (const Tick& t : y_axis.ticks) {
    const int py = bottom - static_cast<int>(std::lround((t.at - y_axis.lo) /
                                                         (y_axis.hi - y_axis.lo) * (bottom - top)));
    canvas.fill_rect(left, py, right, py, kGrid);
    canvas.fill_rect(left - kTickLength, py, left - 1, py, kBlack);
    canvas.text(left - kTickLength - 4 - text_width(t.label), py - kGlyphHeight / 2, t.label,
                kBlack);
  }
  canvas.frame_rect(left, top, right, bottom, kBlack);

  for (size_t i = 0; i < spec.series.size(); ++i) {
    const PlotSeries& s = spec.series[i];
    const PlotColor c = plot_series_color(i);
    int prev_x = 0, prev_y = 0;
    for (size_t p = 0; p < s.x.size(); ++p) {
      const int px = x_axis.pixel(s.x[p], left, right);
      const int py = y_axis.pixel(s.y[p], bottom, top);
      if (p > 0) canvas.line(prev_x, prev_y, px, py, kLineThickness, c);
      canvas.fill_rect(px - kMarkerHalf, py - kMarkerHalf, px + kMarkerHalf + 1,
                       py + kMarkerHalf + 1, c);
      prev_x = px;
      prev_y = py;
    }
  }

  // Legend: top right inside the plot area; names cut to the room there is.
  const int max_chars = std::max(1, (right - left - 48) / kCharAdvance);
  int name_width = 0;
  for (const PlotSeries& s : spec.series) {
    name_width = std::max(name_width, text_width(s.name.substr(0, max_chars)));
  }
  const int row_height = kLineAdvance + 4;
  const int legend_w = 6 + 18 + 6 + name_width + 6;
  const int legend_h = 4 + static_cast<int>(spec.series.size()) * row_height;
  const int lx = right - 8 - legend_w, ly = top + 8;
  canvas.fill_rect(lx, ly, lx + legend_w, ly + legend_h, kWhite);
  canvas.frame_rect(lx, ly, lx + legend_w, ly + legend_h, kLegendFrame);
  for (size_t i = 0; i < spec.series.size(); ++i) {
    const PlotColor c = plot_series_color(i);
    const int ry = ly + 4 + static_cast<int>(i) * row_height;
    const int mid = ry + kGlyphHeight / 2;
    canvas.line(lx + 6, mid, lx + 6 + 17, mid, kLineThickness, c);
    canvas.fill_rect(lx + 6 + 9 - kMarkerHalf, mid - kMarkerHalf, lx + 6 + 9 + kMarkerHalf,
                     mid + kMarkerHalf + 1, c);
    canvas.text(lx + 6 + 18 + 6, ry, spec.series[i].name.substr(0, max_chars), kBlack);
  }

  if (!spec.title.empty()) {
    canvas.text((w - text_width(spec.title, title_scale)) / 2, 8, spec.title, kBlack, title_scale);
  }
  if (!spec.x_label.empty()) {
    canvas.text((left + right - text_width(spec.x_label)) / 2, h - 6 - kGlyphHeight, spec.x_label,
                kBlack);
  }
  if (!spec.y_label.empty()) {
    canvas.text_up(8, (top + bottom + text_width(spec.y_label)) / 2, spec.y_label, kBlack);
  }
  return canvas.rgb();
}

// ---- PNG ------------------------------------------------------------------------------------

// CRC-32 (ISO-HDLC, reflected polynomial 0xEDB88320) as PNG chunks use it, a byte at a time.
constexpr std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[n] = c;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrcTable = make_crc_table();

uint32_t crc32_update(uint32_t crc, const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) crc = kCrcTable[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return crc;
}

// Adler-32 (RFC 1950): sums mod 65521, reduced every 5552 bytes, the most that cannot
// overflow 32 bits.
uint32_t adler32(const std::vector<uint8_t>& data) {
  constexpr uint32_t kMod = 65521;
  uint32_t a = 1, b = 0;
  size_t i = 0;
  while (i < data.size()) {
    const size_t end = std::min(data.size(), i + 5552);
    for (; i < end; ++i) {
      a += data[i];
      b += a;
    }
    a %= kMod;
    b %= kMod;
  }
  return (b << 16) | a;
}

void put_be32(std::vector<uint8_t>& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(v >> shift));
}

void put_chunk(std::vector<uint8_t>& out, const char type[5], const std::vector<uint8_t>& data) {
  put_be32(out, static_cast<uint32_t>(data.size()));
  const size_t type_at = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put_be32(out, crc32_update(0xFFFFFFFFu, &out[type_at], out.size() - type_at) ^ 0xFFFFFFFFu);
}

// zlib stream (RFC 1950) of stored deflate blocks (RFC 1951 §3.2.4), each <= 65535 bytes.
std::vector<uint8_t> zlib_stored(const std::vector<uint8_t>& data) {
  constexpr size_t kMaxBlock = 65535;
  std::vector<uint8_t> z;
  z.reserve(data.size() + data.size() / kMaxBlock * 5 + 16);
  z.push_back(0x78);  // CMF: deflate, 32 KiB window
  z.push_back(0x01);  // FLG: no dictionary, fastest; (0x78 << 8 | 0x01) % 31 == 0
  size_t at = 0;
  do {
    const size_t n = std::min(kMaxBlock, data.size() - at);
    const bool last = at + n == data.size();
    z.push_back(last ? 1 : 0);  // BFINAL, BTYPE = 00 (stored)
    z.push_back(static_cast<uint8_t>(n));
    z.push_back(static_cast<uint8_t>(n >> 8));
    z.push_back(static_cast<uint8_t>(~n));
    z.push_back(static_cast<uint8_t>(~n >> 8));
    z.insert(z.end(), data.begin() + at, data.begin() + at + n);
    at += n;
  } while (at < data.size());
  put_be32(z, adler32(data));
  return z;
}

std::vector<uint8_t> encode_png(int width, int height, const std::vector<uint8_t>& rgb) {
  const size_t row_bytes = static_cast<size_t>(width) * 3;
  std::vector<uint8_t> scanlines;
  scanlines.reserve((row_bytes + 1) * height);
  for (int y = 0; y < height; ++y) {
    scanlines.push_back(0);  // filter type None
    scanlines.insert(scanlines.end(), rgb.begin() + y * row_bytes,
                     rgb.begin() + (y + 1) * row_bytes);
  }

  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  put_be32(ihdr, static_cast<uint32_t>(width));
  put_be32(ihdr, static_cast<uint32_t>(height));
  ihdr.insert(ihdr.end(),
              {8, 2, 0, 0, 0});  // 8-bit, truecolour RGB, deflate, filter 0, no interlace
  put_chunk(png, "IHDR", ihdr);
  put_chunk(png, "IDAT", zlib_stored(scanlines));
  put_chunk(png, "IEND", {});
  return png;
}

Status write_file_replacing(const std::string& path, const std::vector<uint8_t>& bytes) {
  const std::string temp = path + ".tmp";
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::from_errno("creating " + temp, errno);
  Status status;
  size_t done = 0;
  while (status.ok() && done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      status = Status::from_errno("writing " + temp, errno);
    else
      done += static_cast<size_t>(n);
  }
  if (status.ok() && ::fsync(fd) != 0) status = Status::from_errno("syncing " + temp, errno);
  if (::close(fd) != 0 && status.ok()) status = Status::from_errno("closing " + temp, errno);
  if (status.ok() && ::rename(temp.c_str(), path.c_str()) != 0) {
    status = Status::from_errno("renaming " + temp + " to " + path, errno);
  }
  if (!status.ok()) ::unlink(temp.c_str());
  return status;
}

}  // namespace

PlotColor plot_series_color(size_t index) {
  return kPalette[index % kPalette.size()];
}

Result<std::vector<uint8_t>> render_plot_png(const PlotSpec& spec) {
  TROVE_RETURN_IF_ERROR(validate(spec));
  return encode_png(spec.width, spec.height, draw(spec));
}

Status write_plot_png(const std::string& path, const PlotSpec& spec) {
  TROVE_ASSIGN_OR_RETURN(std::vector<uint8_t> png, render_plot_png(spec));
  return write_file_replacing(path, png);
}

}  // namespace trove
