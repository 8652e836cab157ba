// RoIAlign geometry shared by the CPU and CUDA kernels, so both backends sample exactly the same
// points with the same weights (and match torchvision.ops.roi_align's arithmetic).
//
// Bilinear sampling is separable: a sample at (y, x) touches rows {y_low, y_high} with weights
// {hy, ly} and columns {x_low, x_high} with weights {hx, lx}; its four weights are the products.
// A sample outside [-1, H] x [-1, W] contributes nothing, which is also separable (both weights of
// an out-of-range axis are zero). The kernels precompute one AxisSample per sample row and column.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DETECTOR_HD __host__ __device__ __forceinline__
#else
#define DETECTOR_HD inline
#endif

namespace detector::roi {

// Where one region samples the feature map; acc_t is the accumulation type (float, or double for fp64).
template <typename acc_t>
struct Geometry {
  acc_t start_h, start_w;  // top-left corner in feature-map coordinates
  acc_t bin_h, bin_w;      // size of one output bin
  int grid_h, grid_w;      // samples per bin along each axis (<= 0 means no samples)
  acc_t count;             // divisor of the bin average (at least 1)
};

// `roi` points at the 5 values [batch_index, x1, y1, x2, y2] of one region.
template <typename acc_t, typename roi_t>
DETECTOR_HD Geometry<acc_t> make_geometry(const roi_t* roi, double spatial_scale, int64_t pooled_h,
                                          int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  const double offset = aligned ? 0.5 : 0.0;
  Geometry<acc_t> g;
  g.start_w = static_cast<acc_t>(static_cast<double>(roi[1]) * spatial_scale - offset);
  g.start_h = static_cast<acc_t>(static_cast<double>(roi[2]) * spatial_scale - offset);
  const acc_t end_w = static_cast<acc_t>(static_cast<double>(roi[3]) * spatial_scale - offset);
  const acc_t end_h = static_cast<acc_t>(static_cast<double>(roi[4]) * spatial_scale - offset);
  acc_t roi_w = end_w - g.start_w;
  acc_t roi_h = end_h - g.start_h;
  if (!aligned) {  // legacy behaviour: regions are at least one pixel
    roi_w = roi_w > acc_t(1) ? roi_w : acc_t(1);
    roi_h = roi_h > acc_t(1) ? roi_h : acc_t(1);
  }
  g.bin_h = roi_h / static_cast<acc_t>(pooled_h);
  g.bin_w = roi_w / static_cast<acc_t>(pooled_w);
  // Adaptive sampling: about one sample per feature-map pixel covered by a bin.
  g.grid_h = sampling_ratio > 0 ? static_cast<int>(sampling_ratio)
                                : static_cast<int>(ceil(roi_h / static_cast<acc_t>(pooled_h)));
  g.grid_w = sampling_ratio > 0 ? static_cast<int>(sampling_ratio)
                                : static_cast<int>(ceil(roi_w / static_cast<acc_t>(pooled_w)));
  const int n = g.grid_h * g.grid_w;
  g.count = static_cast<acc_t>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample `i` (0 <= i < grid) of bin `p` along one axis.
template <typename acc_t>
DETECTOR_HD acc_t sample_coord(acc_t start, acc_t bin, int64_t p, int i, int grid) {
  return start + static_cast<acc_t>(p) * bin +
         static_cast<acc_t>(static_cast<float>(i) + 0.5f) * bin / static_cast<acc_t>(grid);
}

// The two taps of one sample along one axis of length `size`.
template <typename acc_t>
struct AxisSample {
  int low, high;
  acc_t w_low, w_high;
};

template <typename acc_t>
DETECTOR_HD AxisSample<acc_t> axis_sample(acc_t v, int64_t size) {
  AxisSample<acc_t> s;
  if (v < acc_t(-1) || v > static_cast<acc_t>(size)) {  // outside the map: contributes zero
    s.low = s.high = 0;
    s.w_low = s.w_high = acc_t(0);
    return s;
  }
  if (v <= acc_t(0)) v = acc_t(0);
  s.low = static_cast<int>(v);
  if (s.low >= size - 1) {
    s.low = s.high = static_cast<int>(size - 1);
    v = static_cast<acc_t>(s.low);
  } else {
    s.high = s.low + 1;
  }
  const acc_t l = v - static_cast<acc_t>(s.low);
  s.w_high = l;
  s.w_low = acc_t(1) - l;
  return s;
}

}  // namespace detector::roi
