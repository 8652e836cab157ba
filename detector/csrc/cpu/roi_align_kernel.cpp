// CPU RoIAlign: forward and backward, NCHW and channels-last, fp32/fp64/fp16/bf16 (fp32 accumulation).
//
// Forward is parallel over (region, channel) for NCHW and over output bins for channels-last.
// Backward is deterministic by construction: each task owns whole gradient planes (NCHW) or a
// channel block of one image (channels-last) and visits that image's regions in index order, so
// no two threads ever add into the same element and the summation order never changes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../roi_align.h"
#include "../roi_align_common.h"

namespace detector {
namespace {

using roi::AxisSample;
using roi::Geometry;

// Batch indices must be integers in [0, N) and coordinates finite: reject before any thread reads memory.
template <typename acc_t>
void check_roi_values(const acc_t* rois, int64_t num_rois, int64_t batch_size) {
  for (int64_t r = 0; r < num_rois; ++r) {
    const acc_t* roi = rois + r * 5;
    for (int j = 0; j < 5; ++j) {
      TORCH_CHECK(std::isfinite(static_cast<double>(roi[j])), "roi_align: rois[", r, ", ", j, "] = ",
                  static_cast<double>(roi[j]), " is not finite");
    }
    const double b = static_cast<double>(roi[0]);
    TORCH_CHECK(b >= 0 && b < static_cast<double>(batch_size) && b == std::floor(b), "roi_align: rois[", r,
                ", 0] = ", b, " is not a valid batch index for an input with batch size ", batch_size);
  }
}

// Per-region sample tables: PH*grid_h row samples and PW*grid_w column samples.
template <typename acc_t>
struct RegionSamples {
  Geometry<acc_t> g;
  int gh = 0, gw = 0;  // grid sizes clamped at 0
  std::vector<AxisSample<acc_t>> ys, xs;

  void build(const acc_t* roi, double scale, int64_t PH, int64_t PW, int64_t sr, bool aligned, int64_t H,
             int64_t W) {
    g = roi::make_geometry<acc_t>(roi, scale, PH, PW, sr, aligned);
    gh = std::max(g.grid_h, 0);
    gw = std::max(g.grid_w, 0);
    ys.resize(PH * gh);
    xs.resize(PW * gw);
    for (int64_t p = 0; p < PH; ++p)
      for (int i = 0; i < gh; ++i)
        ys[p * gh + i] = roi::axis_sample<acc_t>(roi::sample_coord(g.start_h, g.bin_h, p, i, g.grid_h), H);
    for (int64_t p = 0; p < PW; ++p)
      for (int i = 0; i < gw; ++i)
        xs[p * gw + i] = roi::axis_sample<acc_t>(roi::sample_coord(g.start_w, g.bin_w, p, i, g.grid_w), W);
  }
};

// One bilinear sample flattened for the NCHW inner loop: offsets in an HxW plane and the four weights.
template <typename acc_t>
struct Tap {
  int32_t p1, p2, p3, p4;
  acc_t w1, w2, w3, w4;
};

template <typename acc_t>
void build_taps(const RegionSamples<acc_t>& s, int64_t PH, int64_t PW, int64_t W, std::vector<Tap<acc_t>>& taps) {
  taps.resize(PH * PW * s.gh * s.gw);
  Tap<acc_t>* t = taps.data();
  for (int64_t ph = 0; ph < PH; ++ph)
    for (int64_t pw = 0; pw < PW; ++pw)
      for (int iy = 0; iy < s.gh; ++iy) {
        const AxisSample<acc_t>& y = s.ys[ph * s.gh + iy];
        for (int ix = 0; ix < s.gw; ++ix, ++t) {
          const AxisSample<acc_t>& x = s.xs[pw * s.gw + ix];
          t->p1 = static_cast<int32_t>(y.low * W + x.low);
          t->p2 = static_cast<int32_t>(y.low * W + x.high);
          t->p3 = static_cast<int32_t>(y.high * W + x.low);
          t->p4 = static_cast<int32_t>(y.high * W + x.high);
          t->w1 = y.w_low * x.w_low;
          t->w2 = y.w_low * x.w_high;
          t->w3 = y.w_high * x.w_low;
          t->w4 = y.w_high * x.w_high;
        }
      }
}

template <typename scalar_t>
void forward_nchw(const scalar_t* in, const at::opmath_type<scalar_t>* rois, scalar_t* out, int64_t K, int64_t C,
                  int64_t H, int64_t W, int64_t PH, int64_t PW, double scale, int64_t sr, bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  // Channels pooled together: each tap (4 offsets + 4 weights) is loaded once per block instead of once
  // per channel, and the block's accumulators are independent chains.
  constexpr int64_t kBlock = 16;
  const int64_t bins = PH * PW, blocks = (C + kBlock - 1) / kBlock, plane_size = H * W;
  // Tasks are (region, channel block) pairs in region-major order; a thread rebuilds its taps only when
  // the region changes, so the per-region set-up is amortised over its channels.
  at::parallel_for(0, K * blocks, 1, [&](int64_t begin, int64_t end) {
    RegionSamples<acc_t> s;
    std::vector<Tap<acc_t>> taps;
    int64_t current = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / blocks, c0 = (task % blocks) * kBlock, nc = std::min(kBlock, C - c0);
      const acc_t* roi = rois + r * 5;
      if (r != current) {
        s.build(roi, scale, PH, PW, sr, aligned, H, W);
        build_taps(s, PH, PW, W, taps);
        current = r;
      }
      const scalar_t* planes = in + (static_cast<int64_t>(roi[0]) * C + c0) * plane_size;
      scalar_t* o = out + (r * C + c0) * bins;
      const int64_t per_bin = static_cast<int64_t>(s.gh) * s.gw;
      const Tap<acc_t>* t = taps.data();
      for (int64_t b = 0; b < bins; ++b) {
        acc_t acc[kBlock] = {};
        for (int64_t i = 0; i < per_bin; ++i, ++t) {
          const scalar_t* p = planes;
          for (int64_t k = 0; k < nc; ++k, p += plane_size) {
            acc[k] += t->w1 * static_cast<acc_t>(p[t->p1]) + t->w2 * static_cast<acc_t>(p[t->p2]) +
                      t->w3 * static_cast<acc_t>(p[t->p3]) + t->w4 * static_cast<acc_t>(p[t->p4]);
          }
        }
        for (int64_t k = 0; k < nc; ++k) o[k * bins + b] = static_cast<scalar_t>(acc[k] / s.g.count);
      }
    }
  });
}

template <typename scalar_t>
void forward_nhwc(const scalar_t* in, const at::opmath_type<scalar_t>* rois, scalar_t* out, int64_t K, int64_t C,
                  int64_t H, int64_t W, int64_t PH, int64_t PW, double scale, int64_t sr, bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  // Tasks are output rows (region, ph); each sample adds four contiguous channel vectors.
  at::parallel_for(0, K * PH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / PH, ph = task % PH;
      const acc_t* roi = rois + r * 5;
      const Geometry<acc_t> g = roi::make_geometry<acc_t>(roi, scale, PH, PW, sr, aligned);
      const scalar_t* img = in + static_cast<int64_t>(roi[0]) * H * W * C;
      for (int64_t pw = 0; pw < PW; ++pw) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t* a = acc.data();
        for (int iy = 0; iy < g.grid_h; ++iy) {
          const AxisSample<acc_t> y = roi::axis_sample<acc_t>(roi::sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), H);
          if (y.w_low == acc_t(0) && y.w_high == acc_t(0)) continue;
          for (int ix = 0; ix < g.grid_w; ++ix) {
            const AxisSample<acc_t> x =
                roi::axis_sample<acc_t>(roi::sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), W);
            if (x.w_low == acc_t(0) && x.w_high == acc_t(0)) continue;
            const acc_t w1 = y.w_low * x.w_low, w2 = y.w_low * x.w_high;
            const acc_t w3 = y.w_high * x.w_low, w4 = y.w_high * x.w_high;
            const scalar_t* v1 = img + (y.low * W + x.low) * C;
            const scalar_t* v2 = img + (y.low * W + x.high) * C;
            const scalar_t* v3 = img + (y.high * W + x.low) * C;
            const scalar_t* v4 = img + (y.high * W + x.high) * C;
            for (int64_t c = 0; c < C; ++c) {
              a[c] += w1 * static_cast<acc_t>(v1[c]) + w2 * static_cast<acc_t>(v2[c]) +
                      w3 * static_cast<acc_t>(v3[c]) + w4 * static_cast<acc_t>(v4[c]);
            }
          }
        }
        scalar_t* o = out + (task * PW + pw) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(a[c] / g.count);
      }
    }
  });
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  check_roi_align_args(input, rois, pooled_h, pooled_w);
  const auto memory_format = input.suggest_memory_format();
  const bool nhwc = memory_format == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.contiguous(memory_format);
  const at::Tensor r = rois_in_acc_type(rois, input);
  const int64_t K = rois.size(0), N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({K, C, pooled_h, pooled_w}, x.options().memory_format(memory_format));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "roi_align_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* rp = r.const_data_ptr<acc_t>();
    check_roi_values(rp, K, N);
    auto run = nhwc ? forward_nhwc<scalar_t> : forward_nchw<scalar_t>;
    run(x.const_data_ptr<scalar_t>(), rp, out.mutable_data_ptr<scalar_t>(), K, C, H, W, pooled_h, pooled_w,
        spatial_scale, sampling_ratio, aligned);
  });
  return out;
}

// Region indices grouped by image, each group in increasing index order (fixes the summation order).
template <typename acc_t>
std::vector<std::vector<int64_t>> regions_by_image(const acc_t* rois, int64_t K, int64_t N) {
  std::vector<std::vector<int64_t>> groups(N);
  for (int64_t r = 0; r < K; ++r) groups[static_cast<int64_t>(rois[r * 5])].push_back(r);
  return groups;
}

template <typename scalar_t>
void backward_nchw(const scalar_t* grad, const at::opmath_type<scalar_t>* rois, at::opmath_type<scalar_t>* gin,
                   int64_t K, int64_t N, int64_t C, int64_t H, int64_t W, int64_t PH, int64_t PW, double scale,
                   int64_t sr, bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<RegionSamples<acc_t>> samples(K);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) samples[r].build(rois + r * 5, scale, PH, PW, sr, aligned, H, W);
  });
  const auto groups = regions_by_image(rois, K, N);
  const int64_t bins = PH * PW;
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane_index = begin; plane_index < end; ++plane_index) {
      const int64_t n = plane_index / C, c = plane_index % C;
      acc_t* plane = gin + plane_index * H * W;
      for (const int64_t r : groups[n]) {
        const RegionSamples<acc_t>& s = samples[r];
        const scalar_t* go = grad + (r * C + c) * bins;
        for (int64_t ph = 0; ph < PH; ++ph) {
          for (int64_t pw = 0; pw < PW; ++pw) {
            const acc_t g = static_cast<acc_t>(go[ph * PW + pw]) / s.g.count;
            for (int iy = 0; iy < s.gh; ++iy) {
              const AxisSample<acc_t>& y = s.ys[ph * s.gh + iy];
              const acc_t g_low = g * y.w_low, g_high = g * y.w_high;
              acc_t* row_low = plane + y.low * W;
              acc_t* row_high = plane + y.high * W;
              for (int ix = 0; ix < s.gw; ++ix) {
                const AxisSample<acc_t>& x = s.xs[pw * s.gw + ix];
                row_low[x.low] += g_low * x.w_low;
                row_low[x.high] += g_low * x.w_high;
                row_high[x.low] += g_high * x.w_low;
                row_high[x.high] += g_high * x.w_high;
              }
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_nhwc(const scalar_t* grad, const at::opmath_type<scalar_t>* rois, at::opmath_type<scalar_t>* gin,
                   int64_t K, int64_t N, int64_t C, int64_t H, int64_t W, int64_t PH, int64_t PW, double scale,
                   int64_t sr, bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<RegionSamples<acc_t>> samples(K);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) samples[r].build(rois + r * 5, scale, PH, PW, sr, aligned, H, W);
  });
  const auto groups = regions_by_image(rois, K, N);
  constexpr int64_t kBlock = 64;  // channels per task: a few cache lines per touched pixel
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scaled(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * kBlock, nc = std::min(kBlock, C - c0);
      acc_t* img = gin + n * H * W * C + c0;
      for (const int64_t r : groups[n]) {
        const RegionSamples<acc_t>& s = samples[r];
        for (int64_t ph = 0; ph < PH; ++ph) {
          for (int64_t pw = 0; pw < PW; ++pw) {
            const scalar_t* go = grad + ((r * PH + ph) * PW + pw) * C + c0;
            acc_t* g = scaled.data();
            for (int64_t c = 0; c < nc; ++c) g[c] = static_cast<acc_t>(go[c]) / s.g.count;
            for (int iy = 0; iy < s.gh; ++iy) {
              const AxisSample<acc_t>& y = s.ys[ph * s.gh + iy];
              if (y.w_low == acc_t(0) && y.w_high == acc_t(0)) continue;
              for (int ix = 0; ix < s.gw; ++ix) {
                const AxisSample<acc_t>& x = s.xs[pw * s.gw + ix];
                if (x.w_low == acc_t(0) && x.w_high == acc_t(0)) continue;
                const acc_t w1 = y.w_low * x.w_low, w2 = y.w_low * x.w_high;
                const acc_t w3 = y.w_high * x.w_low, w4 = y.w_high * x.w_high;
                acc_t* d1 = img + (y.low * W + x.low) * C;
                acc_t* d2 = img + (y.low * W + x.high) * C;
                acc_t* d3 = img + (y.high * W + x.low) * C;
                acc_t* d4 = img + (y.high * W + x.high) * C;
                // Sequential adds: d1..d4 may alias (clamped edge samples), so keep them in this order.
                for (int64_t c = 0; c < nc; ++c) d1[c] += w1 * g[c];
                for (int64_t c = 0; c < nc; ++c) d2[c] += w2 * g[c];
                for (int64_t c = 0; c < nc; ++c) d3[c] += w3 * g[c];
                for (int64_t c = 0; c < nc; ++c) d4[c] += w4 * g[c];
              }
            }
          }
        }
      }
    }
  });
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_h, int64_t pooled_w, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                  bool /*deterministic: always, by construction*/) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              "roi_align backward: grad has shape ", grad.sizes(), ", expected (", rois.size(0), ", ", channels,
              ", ", pooled_h, ", ", pooled_w, ")");
  check_roi_align_args(grad, rois, pooled_h, pooled_w);
  TORCH_CHECK(height > 0 && width > 0, "roi_align backward: empty feature map ", height, "x", width);
  const auto memory_format = grad.suggest_memory_format();
  const bool nhwc = memory_format == at::MemoryFormat::ChannelsLast;
  const at::Tensor g = grad.contiguous(memory_format);
  const at::Tensor r = rois_in_acc_type(rois, grad);
  const auto acc_type = r.scalar_type();
  const bool same = acc_type == grad.scalar_type();
  const auto sizes = std::vector<int64_t>{batch_size, channels, height, width};
  // at::zeros drops a memory format given in TensorOptions, hence empty + zero_.
  at::Tensor acc = at::empty(sizes, grad.options().dtype(acc_type).memory_format(memory_format)).zero_();
  const int64_t K = rois.size(0);
  if (K > 0 && acc.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "roi_align_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* rp = r.const_data_ptr<acc_t>();
      check_roi_values(rp, K, batch_size);
      auto run = nhwc ? backward_nhwc<scalar_t> : backward_nchw<scalar_t>;
      run(g.const_data_ptr<scalar_t>(), rp, acc.mutable_data_ptr<acc_t>(), K, batch_size, channels, height, width,
          pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned);
    });
  }
  if (same) return acc;
  at::Tensor out = at::empty(sizes, grad.options().memory_format(memory_format));
  out.copy_(acc);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(detector, CPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cpu));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cpu));
}

}  // namespace detector
