// write_plot_png (base/plot.h) read back by an independent PNG reader written here: the
// signature, IHDR's size and format, every chunk's CRC (a bitwise CRC-32, not the writer's
// table), the zlib stream's stored blocks and Adler-32, the decoded pixels (each series'
// colour is drawn); and the specs that cannot be drawn are errors naming the series.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "base/plot.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using ::testing::HasSubstr;

uint32_t be32(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | p[3];
}

// Bit at a time, straight from the PNG spec's definition.
uint32_t bitwise_crc32(const uint8_t* p, size_t n) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1)));
  }
  return ~crc;
}

uint32_t plain_adler32(const std::vector<uint8_t>& data) {
  uint64_t a = 1, b = 0;
  for (uint8_t byte : data) {
    a = (a + byte) % 65521;
    b = (b + a) % 65521;
  }
  return static_cast<uint32_t>(b << 16 | a);
}

struct Chunk {
  std::string type;
  std::vector<uint8_t> data;
};

struct DecodedPng {
  uint32_t width = 0, height = 0;
  std::vector<uint8_t> scanlines;  // filter byte + RGB per row
  size_t stored_blocks = 0;

  // REQUIRES: every scanline uses filter 0 (checked by the caller).
  PlotColor pixel(uint32_t x, uint32_t y) const {
    const uint8_t* p = &scanlines[y * (1 + 3 * size_t{width}) + 1 + 3 * size_t{x}];
    return {p[0], p[1], p[2]};
  }
  bool has_color(PlotColor c) const {
    for (uint32_t y = 0; y < height; ++y) {
      for (uint32_t x = 0; x < width; ++x) {
        if (pixel(x, y) == c) return true;
      }
    }
    return false;
  }
};

// Parses and checks `png` with gtest assertions; fills `out`.
void decode(const std::vector<uint8_t>& png, DecodedPng* out) {
  const uint8_t kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  ASSERT_GE(png.size(), 8u);
  ASSERT_TRUE(std::equal(kSignature, kSignature + 8, png.begin()));

  std::vector<Chunk> chunks;
  size_t at = 8;
  while (at < png.size()) {
    ASSERT_LE(at + 12, png.size()) << "chunk header past the end at " << at;
    const uint32_t length = be32(&png[at]);
    ASSERT_LE(at + 12 + length, png.size());
    Chunk c;
    c.type.assign(png.begin() + at + 4, png.begin() + at + 8);
    c.data.assign(png.begin() + at + 8, png.begin() + at + 8 + length);
    EXPECT_EQ(be32(&png[at + 8 + length]), bitwise_crc32(&png[at + 4], 4 + length))
        << "CRC of chunk " << c.type << " at " << at;
    chunks.push_back(std::move(c));
    at += 12 + length;
  }
  ASSERT_GE(chunks.size(), 3u);
  EXPECT_EQ(chunks.front().type, "IHDR");
  EXPECT_EQ(chunks.back().type, "IEND");
  EXPECT_TRUE(chunks.back().data.empty());

  const Chunk& ihdr = chunks.front();
  ASSERT_EQ(ihdr.data.size(), 13u);
  out->width = be32(&ihdr.data[0]);
  out->height = be32(&ihdr.data[4]);
  EXPECT_EQ(ihdr.data[8], 8);   // bit depth
  EXPECT_EQ(ihdr.data[9], 2);   // truecolour RGB
  EXPECT_EQ(ihdr.data[10], 0);  // deflate
  EXPECT_EQ(ihdr.data[11], 0);  // filter method 0
  EXPECT_EQ(ihdr.data[12], 0);  // not interlaced

  std::vector<uint8_t> z;
  for (const Chunk& c : chunks) {
    if (c.type == "IDAT") z.insert(z.end(), c.data.begin(), c.data.end());
  }
  ASSERT_GE(z.size(), 2u + 5u + 4u);
  EXPECT_EQ((z[0] << 8 | z[1]) % 31, 0) << "zlib header check bits";
  EXPECT_EQ(z[0] & 0x0F, 8) << "zlib method: deflate";
  EXPECT_EQ(z[1] & 0x20, 0) << "no preset dictionary";
  size_t zp = 2;
  bool final_block = false;
  while (!final_block) {
    ASSERT_LE(zp + 5, z.size());
    final_block = (z[zp] & 1) != 0;
    ASSERT_EQ(z[zp] >> 1, 0) << "block type must be stored (00) at " << zp;
    const uint16_t len = static_cast<uint16_t>(z[zp + 1] | z[zp + 2] << 8);
    const uint16_t nlen = static_cast<uint16_t>(z[zp + 3] | z[zp + 4] << 8);
    ASSERT_EQ(len, static_cast<uint16_t>(~nlen));
    ASSERT_LE(zp + 5 + len, z.size());
    out->scanlines.insert(out->scanlines.end(), z.begin() + zp + 5, z.begin() + zp + 5 + len);
    zp += 5 + len;
    ++out->stored_blocks;
  }
  ASSERT_EQ(zp + 4, z.size()) << "Adler-32 must follow the final block and end the stream";
  EXPECT_EQ(be32(&z[zp]), plain_adler32(out->scanlines));
  ASSERT_EQ(out->scanlines.size(), size_t{out->height} * (1 + 3 * size_t{out->width}));
  for (uint32_t y = 0; y < out->height; ++y) {
    ASSERT_EQ(out->scanlines[y * (1 + 3 * size_t{out->width})], 0) << "filter of row " << y;
  }
}

PlotSpec two_series() {
  PlotSpec spec;
  spec.title = "IOPS vs queue depth";
  spec.x_label = "queue depth";
  spec.y_label = "IOPS";
  spec.log_x = true;
  spec.series.push_back(
      {"trove io_uring", {1, 2, 4, 8, 16, 32, 64}, {9e3, 17e3, 30e3, 52e3, 80e3, 96e3, 101e3}});
  spec.series.push_back({"fio", {1, 4, 16, 64}, {10e3, 33e3, 85e3, 105e3}});
  return spec;
}

TEST(Plot, WritesAValidPngWithEverySeriesColour) {
  testing::ScratchDir dir;
  const std::string path = dir.file("iops.png");
  PlotSpec spec = two_series();
  spec.width = 643;  // odd sizes: rows are not a multiple of anything convenient
  spec.height = 401;
  ASSERT_TRUE(write_plot_png(path, spec).ok());
  EXPECT_EQ(dir.list(), std::vector<std::string>{"iops.png"}) << "no temporary left behind";

  DecodedPng img;
  ASSERT_NO_FATAL_FAILURE(decode(testing::read_all(path), &img));
  EXPECT_EQ(img.width, 643u);
  EXPECT_EQ(img.height, 401u);
  EXPECT_GT(img.stored_blocks, 1u) << "643x401 RGB needs several 64 KiB stored blocks";
  EXPECT_EQ(img.pixel(0, 0), (PlotColor{255, 255, 255})) << "white background";
  EXPECT_TRUE(img.has_color({0, 0, 0})) << "axes and text";
  EXPECT_TRUE(img.has_color(plot_series_color(0)));
  EXPECT_TRUE(img.has_color(plot_series_color(1)));
  EXPECT_FALSE(img.has_color(plot_series_color(2))) << "only two series were drawn";
}

TEST(Plot, RenderMatchesTheWrittenFileAndReplacesAnOldOne) {
  testing::ScratchDir dir;
  const std::string path = dir.file("p.png");
  testing::write_all(path, {1, 2, 3});
  const PlotSpec spec = two_series();
  ASSERT_TRUE(write_plot_png(path, spec).ok());
  Result<std::vector<uint8_t>> png = render_plot_png(spec);
  ASSERT_TRUE(png.ok());
  EXPECT_EQ(testing::read_all(path), *png);
}

TEST(Plot, LinearAxesNegativeValuesAndOnePointSeries) {
  PlotSpec spec;
  spec.series.push_back({"flat", {-3, 0, 2.5}, {-1e-3, -1e-3, -1e-3}});
  spec.series.push_back({"single", {1}, {7}});
  spec.width = 200;
  spec.height = 150;
  Result<std::vector<uint8_t>> png = render_plot_png(spec);
  ASSERT_TRUE(png.ok()) << png.status().to_string();
  DecodedPng img;
  ASSERT_NO_FATAL_FAILURE(decode(*png, &img));
  EXPECT_EQ(img.width, 200u);
  EXPECT_TRUE(img.has_color(plot_series_color(0)));
  EXPECT_TRUE(img.has_color(plot_series_color(1)));
}

TEST(Plot, PaletteColoursAreDistinctAndCycle) {
  for (size_t i = 0; i < 8; ++i) {
    for (size_t j = i + 1; j < 8; ++j) EXPECT_NE(plot_series_color(i), plot_series_color(j));
    EXPECT_EQ(plot_series_color(i), plot_series_color(i + 8));
  }
}

Status render_status(const PlotSpec& spec) {
  return render_plot_png(spec).status();
}

TEST(Plot, SpecsThatCannotBeDrawnAreInvalidArgumentsNamingTheSeries) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    const char* what;
    PlotSeries series;
    bool log_x;
    const char* message;
  };
  const Case cases[] = {
      {"empty", {"empty one", {}, {}}, false, "is empty"},
      {"size mismatch", {"lopsided", {1, 2, 3}, {1, 2}}, false, "3 x values but 2 y values"},
      {"NaN y", {"has nan", {1, 2}, {1, nan}}, false, "point 1"},
      {"infinite x", {"has inf", {inf}, {1}}, false, "must be finite"},
      {"x = 0 on log", {"zero x", {0, 1}, {1, 2}}, true, "x must be > 0"},
      {"x < 0 on log", {"negative x", {1, -2}, {1, 2}}, true, "point 1 has x = -2"},
  };
  for (const Case& c : cases) {
    PlotSpec spec = two_series();
    spec.log_x = c.log_x;
    spec.series.push_back(c.series);
    const Status s = render_status(spec);
    EXPECT_TRUE(s.is_invalid_argument()) << c.what << ": " << s.to_string();
    EXPECT_THAT(s.message(), HasSubstr("series \"" + c.series.name + "\" (#2)")) << c.what;
    EXPECT_THAT(s.message(), HasSubstr(c.message)) << c.what;
  }
}

TEST(Plot, NoSeriesOrABadSizeIsInvalidAndWritesNothing) {
  testing::ScratchDir dir;
  PlotSpec spec;
  spec.title = "nothing";
  Status s = write_plot_png(dir.file("a.png"), spec);
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(), HasSubstr("no series"));

  spec = two_series();
  spec.width = 10;
  s = write_plot_png(dir.file("a.png"), spec);
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(), HasSubstr("10x500"));
  EXPECT_TRUE(dir.list().empty());
}

TEST(Plot, AnUnwritableFolderIsAnIoErrorNamingThePath) {
  const Status s = write_plot_png("/nonexistent-trove-dir/plot.png", two_series());
  EXPECT_TRUE(s.is_io_error()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr("/nonexistent-trove-dir/plot.png"));
}

}  // namespace
}  // namespace trove
