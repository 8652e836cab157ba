// CUDA RoIAlign: forward, atomicAdd backward and deterministic (atomics-free) backward; NCHW and
// channels-last; fp32/fp64/fp16/bf16 with fp32 (fp64 for fp64) accumulation. Same sampling as the
// CPU kernels (roi_align_common.h). Element loops use 32-bit index arithmetic when every tensor fits,
// 64-bit otherwise.
//
// Deterministic backward: bilinear sampling is separable, so a region's gradient on input pixel (y, x)
// of channel c is  sum_ph sum_pw  Wy[r, y, ph] * Wx[r, x, pw] * grad[r, c, ph, pw] / count_r,  where
// Wy/Wx hold the summed per-axis sample weights. We tabulate Wy, Wx and, per (region, row) and
// (region, column), the range of bins that touch it; then one thread per (pixel, channel group)
// gathers over the regions of its image in a fixed order. No atomics, no races, same result every run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../roi_align.h"
#include "../roi_align_common.h"

namespace detector {
namespace {

using roi::AxisSample;
using roi::Geometry;

constexpr int kThreads = 256;
constexpr int kChannelsPerThread = 4;  // channels one thread accumulates (geometry and taps reused)

int64_t blocks_for(int64_t n) {
  // Grid-stride loops cover anything beyond this.
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20));
}

bool fits_int32(std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes)
    if (s >= std::numeric_limits<int32_t>::max()) return false;
  return true;
}

// Batch index of a region, or -1 when it is out of range (such regions pool to zero and get no gradient;
// the Python wrapper rejects them with a clear message before they get here).
template <typename acc_t>
__device__ __forceinline__ int64_t batch_of(const acc_t* roi, int64_t N) {
  const acc_t b = roi[0];
  return (b >= acc_t(0) && b < static_cast<acc_t>(N)) ? static_cast<int64_t>(b) : -1;
}

// Forward and atomic backward: one thread per (region, bin, group of kChannelsPerThread channels). The
// bin's geometry and each sample's four taps are computed once and reused for all of the thread's
// channels. Channel mapping keeps memory accesses coalesced within a warp:
//  - NCHW: lanes take consecutive bins; a thread's channels are c0 .. c0 + kChannelsPerThread - 1.
//  - channels-last: lanes take consecutive channels; a thread's channels are strided by the warp size.

template <typename index_t, bool kChannelsLast>
struct ChannelMap {
  index_t r, bin, first, step;  // region, bin (ph * PW + pw), first channel, channel stride

  __device__ __forceinline__ ChannelMap(index_t idx, index_t C, index_t bins) {
    constexpr index_t kWarp = 32;
    if constexpr (kChannelsLast) {
      const index_t groups = (C + kWarp * kChannelsPerThread - 1) / (kWarp * kChannelsPerThread);
      const index_t lane = idx % kWarp;
      index_t rest = idx / kWarp;
      const index_t group = rest % groups;
      rest /= groups;
      bin = rest % bins;
      r = rest / bins;
      first = group * kWarp * kChannelsPerThread + lane;
      step = kWarp;
    } else {
      const index_t groups = (C + kChannelsPerThread - 1) / kChannelsPerThread;
      bin = idx % bins;
      const index_t rest = idx / bins;
      r = rest / groups;
      first = (rest % groups) * kChannelsPerThread;
      step = 1;
    }
  }

  static int64_t threads(int64_t K, int64_t C, int64_t bins) {
    return kChannelsLast ? K * bins * 32 * ((C + 32 * kChannelsPerThread - 1) / (32 * kChannelsPerThread))
                         : K * bins * ((C + kChannelsPerThread - 1) / kChannelsPerThread);
  }
};

// Offset of channel c of image n in an (N, C, H, W) tensor stored NCHW or NHWC, and the offset of pixel
// (y, x) relative to it.
template <typename index_t, bool kChannelsLast>
__device__ __forceinline__ index_t channel_base(index_t n, index_t c, index_t C, index_t H, index_t W) {
  return kChannelsLast ? n * H * W * C + c : (n * C + c) * H * W;
}
template <typename index_t, bool kChannelsLast>
__device__ __forceinline__ index_t pixel_offset(int y, int x, index_t C, index_t W) {
  const index_t p = static_cast<index_t>(y) * W + static_cast<index_t>(x);
  return kChannelsLast ? p * C : p;
}

// Offset of output element (r, c, bin) in a (K, C, PH, PW) tensor stored NCHW or NHWC.
template <typename index_t, bool kChannelsLast>
__device__ __forceinline__ index_t output_offset(index_t r, index_t c, index_t bin, index_t C, index_t bins) {
  return kChannelsLast ? (r * bins + bin) * C + c : (r * C + c) * bins + bin;
}

// The four taps of one bilinear sample: pixel offsets (relative to a channel's base) and weights.
template <typename acc_t, typename index_t>
struct Taps {
  index_t o1, o2, o3, o4;
  acc_t w1, w2, w3, w4;
};

// Calls f(taps) for every in-range sample of bin (ph, pw), in the fixed order iy-major, ix-minor.
template <typename index_t, bool kChannelsLast, typename acc_t, typename F>
__device__ __forceinline__ void for_each_sample(const Geometry<acc_t>& g, index_t ph, index_t pw, index_t C, index_t H,
                                                index_t W, F&& f) {
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const AxisSample<acc_t> y = roi::axis_sample<acc_t>(roi::sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), H);
    if (y.w_low == acc_t(0) && y.w_high == acc_t(0)) continue;
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const AxisSample<acc_t> x = roi::axis_sample<acc_t>(roi::sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), W);
      if (x.w_low == acc_t(0) && x.w_high == acc_t(0)) continue;
      Taps<acc_t, index_t> t;
      t.w1 = y.w_low * x.w_low;
      t.w2 = y.w_low * x.w_high;
      t.w3 = y.w_high * x.w_low;
      t.w4 = y.w_high * x.w_high;
      t.o1 = pixel_offset<index_t, kChannelsLast>(y.low, x.low, C, W);
      t.o2 = pixel_offset<index_t, kChannelsLast>(y.low, x.high, C, W);
      t.o3 = pixel_offset<index_t, kChannelsLast>(y.high, x.low, C, W);
      t.o4 = pixel_offset<index_t, kChannelsLast>(y.high, x.high, C, W);
      f(t);
    }
  }
}

template <typename scalar_t, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ in, const at::opmath_type<scalar_t>* __restrict__ rois,
                   scalar_t* __restrict__ out, int64_t total, int64_t N, index_t C, index_t H, index_t W,
                   index_t PH, index_t PW, double scale, int64_t sr, bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t bins = PH * PW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const ChannelMap<index_t, kChannelsLast> m(static_cast<index_t>(i), C, bins);
    const acc_t* roi = rois + static_cast<int64_t>(m.r) * 5;
    const int64_t n = batch_of(roi, N);
    acc_t acc[kChannelsPerThread];
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) acc[k] = acc_t(0);
    const Geometry<acc_t> g = roi::make_geometry<acc_t>(roi, scale, PH, PW, sr, aligned);
    if (n >= 0) {
      for_each_sample<index_t, kChannelsLast>(g, m.bin / PW, m.bin % PW, C, H, W, [&](const Taps<acc_t, index_t>& t) {
#pragma unroll
        for (int k = 0; k < kChannelsPerThread; ++k) {
          const index_t c = m.first + k * m.step;
          if (c < C) {
            const scalar_t* p = in + channel_base<index_t, kChannelsLast>(static_cast<index_t>(n), c, C, H, W);
            acc[k] += t.w1 * static_cast<acc_t>(p[t.o1]) + t.w2 * static_cast<acc_t>(p[t.o2]) +
                      t.w3 * static_cast<acc_t>(p[t.o3]) + t.w4 * static_cast<acc_t>(p[t.o4]);
          }
        }
      });
    }
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      const index_t c = m.first + k * m.step;
      if (c < C) {
        out[output_offset<index_t, kChannelsLast>(m.r, c, m.bin, C, bins)] = static_cast<scalar_t>(acc[k] / g.count);
      }
    }
  }
}

// Fast backward: the same thread layout, atomicAdd into an accumulation-type (fp32/fp64) buffer.
template <typename scalar_t, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    backward_atomic_kernel(const scalar_t* __restrict__ grad, const at::opmath_type<scalar_t>* __restrict__ rois,
                           at::opmath_type<scalar_t>* __restrict__ gin, int64_t total, int64_t N, index_t C,
                           index_t H, index_t W, index_t PH, index_t PW, double scale, int64_t sr, bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t bins = PH * PW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const ChannelMap<index_t, kChannelsLast> m(static_cast<index_t>(i), C, bins);
    const acc_t* roi = rois + static_cast<int64_t>(m.r) * 5;
    const int64_t n = batch_of(roi, N);
    if (n < 0) continue;
    const Geometry<acc_t> g = roi::make_geometry<acc_t>(roi, scale, PH, PW, sr, aligned);
    acc_t go[kChannelsPerThread];
    bool any = false;
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      const index_t c = m.first + k * m.step;
      go[k] = c < C ? static_cast<acc_t>(grad[output_offset<index_t, kChannelsLast>(m.r, c, m.bin, C, bins)]) / g.count
                    : acc_t(0);
      any = any || go[k] != acc_t(0);
    }
    if (!any) continue;
    for_each_sample<index_t, kChannelsLast>(g, m.bin / PW, m.bin % PW, C, H, W, [&](const Taps<acc_t, index_t>& t) {
#pragma unroll
      for (int k = 0; k < kChannelsPerThread; ++k) {
        const index_t c = m.first + k * m.step;
        if (c < C && go[k] != acc_t(0)) {
          acc_t* p = gin + channel_base<index_t, kChannelsLast>(static_cast<index_t>(n), c, C, H, W);
          atomicAdd(p + t.o1, go[k] * t.w1);
          atomicAdd(p + t.o2, go[k] * t.w2);
          atomicAdd(p + t.o3, go[k] * t.w3);
          atomicAdd(p + t.o4, go[k] * t.w4);
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------
// Deterministic backward, step 1: per-axis weight tables. weights[r, s, p] = sum of the weights with which
// the samples of bin p (along this axis) touch coordinate s. One thread per (region, bin) writes only its
// own column p, sequentially, so the table is the same every run.

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    axis_weights_kernel(const acc_t* __restrict__ rois, int64_t K, int64_t N, int64_t PH, int64_t PW,
                        bool along_y, int64_t size, double scale, int64_t sr, bool aligned,
                        acc_t* __restrict__ weights) {
  const int64_t P = along_y ? PH : PW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < K * P; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t r = i / P, p = i % P;
    const acc_t* roi = rois + r * 5;
    if (batch_of(roi, N) < 0) continue;
    const Geometry<acc_t> g = roi::make_geometry<acc_t>(roi, scale, PH, PW, sr, aligned);
    const int grid = along_y ? g.grid_h : g.grid_w;
    const acc_t start = along_y ? g.start_h : g.start_w;
    const acc_t bin = along_y ? g.bin_h : g.bin_w;
    acc_t* w = weights + r * size * P + p;
    for (int k = 0; k < grid; ++k) {
      const AxisSample<acc_t> s = roi::axis_sample<acc_t>(roi::sample_coord(start, bin, p, k, grid), size);
      if (s.w_low == acc_t(0) && s.w_high == acc_t(0)) continue;
      w[s.low * P] += s.w_low;
      w[s.high * P] += s.w_high;
    }
  }
}

// Step 2: for each (region, coordinate) the half-open range of bins with a nonzero weight there.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    axis_ranges_kernel(const acc_t* __restrict__ weights, int64_t count, int64_t P, int2* __restrict__ ranges) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(blockDim.x) * gridDim.x) {
    const acc_t* w = weights + i * P;
    int lo = 0, hi = 0;
    for (int p = 0; p < P; ++p) {
      if (w[p] != acc_t(0)) {
        if (hi == 0) lo = p;
        hi = p + 1;
      }
    }
    ranges[i] = make_int2(lo, hi);
  }
}

// Step 3: one thread per (image, row, column, group of kChannelsPerThread channels) sums the
// contributions of the image's regions in index order.
template <typename scalar_t, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    backward_gather_kernel(const scalar_t* __restrict__ grad, const at::opmath_type<scalar_t>* __restrict__ rois,
                           const int64_t* __restrict__ order, const int64_t* __restrict__ image_begin,
                           const at::opmath_type<scalar_t>* __restrict__ wy, const at::opmath_type<scalar_t>* __restrict__ wx,
                           const int2* __restrict__ y_ranges, const int2* __restrict__ x_ranges,
                           scalar_t* __restrict__ gin, int64_t total, index_t C, index_t H, index_t W, index_t PH,
                           index_t PW, double scale, int64_t sr, bool aligned) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t groups = (C + kChannelsPerThread - 1) / kChannelsPerThread;
  const index_t bins = PH * PW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const index_t idx = static_cast<index_t>(i);
    index_t x, y, cg, n;
    if constexpr (kChannelsLast) {  // channel groups fastest: a warp shares one pixel
      cg = idx % groups;
      x = (idx / groups) % W;
      y = (idx / groups / W) % H;
      n = idx / groups / W / H;
    } else {  // columns fastest: a warp writes contiguous runs of a plane
      x = idx % W;
      y = (idx / W) % H;
      cg = (idx / W / H) % groups;
      n = idx / W / H / groups;
    }
    const index_t c0 = cg * kChannelsPerThread;
    const int nc = static_cast<int>(C - c0 < kChannelsPerThread ? C - c0 : kChannelsPerThread);
    acc_t acc[kChannelsPerThread];
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) acc[k] = acc_t(0);
    for (int64_t j = image_begin[n]; j < image_begin[n + 1]; ++j) {
      const int64_t r = order[j];
      const int2 yr = y_ranges[r * H + y];
      if (yr.x >= yr.y) continue;
      const int2 xr = x_ranges[r * W + x];
      if (xr.x >= xr.y) continue;
      const acc_t* wyr = wy + (r * H + y) * PH;
      const acc_t* wxr = wx + (r * W + x) * PW;
      acc_t part[kChannelsPerThread];
#pragma unroll
      for (int k = 0; k < kChannelsPerThread; ++k) part[k] = acc_t(0);
      for (int ph = yr.x; ph < yr.y; ++ph) {
        const acc_t a = wyr[ph];
        if (a == acc_t(0)) continue;
        for (int pw = xr.x; pw < xr.y; ++pw) {
          const acc_t w = a * wxr[pw];
          if (w == acc_t(0)) continue;
          const index_t bin = static_cast<index_t>(ph) * PW + pw;
#pragma unroll
          for (int k = 0; k < kChannelsPerThread; ++k) {
            if (k < nc) {
              const index_t c = c0 + k;
              part[k] += w * static_cast<acc_t>(
                                 grad[output_offset<index_t, kChannelsLast>(static_cast<index_t>(r), c, bin, C, bins)]);
            }
          }
        }
      }
      const Geometry<acc_t> g = roi::make_geometry<acc_t>(rois + r * 5, scale, PH, PW, sr, aligned);
#pragma unroll
      for (int k = 0; k < kChannelsPerThread; ++k) acc[k] += part[k] / g.count;
    }
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      if (k < nc) {
        const index_t c = c0 + k;
        gin[channel_base<index_t, kChannelsLast>(n, c, C, H, W) + pixel_offset<index_t, kChannelsLast>(y, x, C, W)] =
            static_cast<scalar_t>(acc[k]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  check_roi_align_args(input, rois, pooled_h, pooled_w);
  TORCH_CHECK(input.is_cuda(), "roi_align: expected a CUDA input");
  c10::cuda::CUDAGuard guard(input.device());
  const auto memory_format = input.suggest_memory_format();
  const bool nhwc = memory_format == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = input.contiguous(memory_format);
  const at::Tensor r = rois_in_acc_type(rois, input);
  const int64_t K = rois.size(0), N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({K, C, pooled_h, pooled_w}, x.options().memory_format(memory_format));
  if (out.numel() == 0) return out;
  const int64_t total = nhwc ? ChannelMap<int64_t, true>::threads(K, C, pooled_h * pooled_w)
                             : ChannelMap<int64_t, false>::threads(K, C, pooled_h * pooled_w);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool small = fits_int32({total, out.numel(), x.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto index_zero, auto channels_last) {
      using index_t = decltype(index_zero);
      forward_kernel<scalar_t, index_t, decltype(channels_last)::value><<<blocks_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), r.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), total, N, C, H,
          W, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned);
    };
    if (small)
      nhwc ? launch(int32_t(0), std::true_type{}) : launch(int32_t(0), std::false_type{});
    else
      nhwc ? launch(int64_t(0), std::true_type{}) : launch(int64_t(0), std::false_type{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Regions ordered by image (stable) and the start of each image's run; invalid batch indices go to a
// trailing bucket that no image reads.
std::pair<at::Tensor, at::Tensor> regions_by_image(const at::Tensor& rois, int64_t N) {
  at::Tensor b = rois.select(1, 0);
  const at::Tensor valid = (b >= 0) & (b < static_cast<double>(N));
  const at::Tensor index = at::where(valid, b, static_cast<double>(N)).to(at::kLong);
  const at::Tensor order = std::get<1>(index.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::bincount(index, {}, N + 1);
  const at::Tensor begin = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  return {order.contiguous(), begin.contiguous()};
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_h, int64_t pooled_w, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                   bool deterministic) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              "roi_align backward: grad has shape ", grad.sizes(), ", expected (", rois.size(0), ", ", channels,
              ", ", pooled_h, ", ", pooled_w, ")");
  check_roi_align_args(grad, rois, pooled_h, pooled_w);
  TORCH_CHECK(height > 0 && width > 0, "roi_align backward: empty feature map ", height, "x", width);
  TORCH_CHECK(grad.is_cuda(), "roi_align backward: expected a CUDA grad");
  c10::cuda::CUDAGuard guard(grad.device());
  const auto memory_format = grad.suggest_memory_format();
  const bool nhwc = memory_format == at::MemoryFormat::ChannelsLast;
  const at::Tensor g = grad.contiguous(memory_format);
  const at::Tensor r = rois_in_acc_type(rois, grad);
  const int64_t K = rois.size(0);
  const std::vector<int64_t> sizes{batch_size, channels, height, width};
  const auto options = grad.options().memory_format(memory_format);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t in_numel = batch_size * channels * height * width;
  // (at::zeros would drop the memory format carried in `options`, hence empty + zero_.)
  if (K == 0 || in_numel == 0) return at::empty(sizes, options).zero_();
  const bool small = fits_int32({g.numel(), in_numel});

  if (!deterministic) {
    at::Tensor acc = at::empty(sizes, options.dtype(r.scalar_type())).zero_();
    const int64_t total = nhwc ? ChannelMap<int64_t, true>::threads(K, channels, pooled_h * pooled_w)
                               : ChannelMap<int64_t, false>::threads(K, channels, pooled_h * pooled_w);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "roi_align_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto launch = [&](auto index_zero, auto channels_last) {
        using index_t = decltype(index_zero);
        backward_atomic_kernel<scalar_t, index_t, decltype(channels_last)::value>
            <<<blocks_for(total), kThreads, 0, stream>>>(
                g.const_data_ptr<scalar_t>(), r.const_data_ptr<acc_t>(), acc.mutable_data_ptr<acc_t>(), total,
                batch_size, channels, height, width, pooled_h, pooled_w, spatial_scale,
                sampling_ratio, aligned);
      };
      if (small && fits_int32({total}))
        nhwc ? launch(int32_t(0), std::true_type{}) : launch(int32_t(0), std::false_type{});
      else
        nhwc ? launch(int64_t(0), std::true_type{}) : launch(int64_t(0), std::false_type{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (acc.scalar_type() == grad.scalar_type()) return acc;
    at::Tensor out = at::empty(sizes, options);
    out.copy_(acc);
    return out;
  }

  // Deterministic: tables, then the gather (which writes every element, so no zero-fill is needed).
  const auto acc_options = r.options();
  at::Tensor wy = at::zeros({K, height, pooled_h}, acc_options);
  at::Tensor wx = at::zeros({K, width, pooled_w}, acc_options);
  at::Tensor y_ranges = at::empty({K * height * 2}, acc_options.dtype(at::kInt));
  at::Tensor x_ranges = at::empty({K * width * 2}, acc_options.dtype(at::kInt));
  const auto [order, image_begin] = regions_by_image(r, batch_size);
  at::Tensor out = at::empty(sizes, options);
  const int64_t groups = (channels + kChannelsPerThread - 1) / kChannelsPerThread;
  const int64_t total = batch_size * height * width * groups;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "roi_align_backward_cuda_det", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* rp = r.const_data_ptr<acc_t>();
    axis_weights_kernel<acc_t><<<blocks_for(K * pooled_h), kThreads, 0, stream>>>(
        rp, K, batch_size, pooled_h, pooled_w, true, height, spatial_scale, sampling_ratio, aligned,
        wy.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    axis_weights_kernel<acc_t><<<blocks_for(K * pooled_w), kThreads, 0, stream>>>(
        rp, K, batch_size, pooled_h, pooled_w, false, width, spatial_scale, sampling_ratio, aligned,
        wx.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    axis_ranges_kernel<acc_t><<<blocks_for(K * height), kThreads, 0, stream>>>(
        wy.const_data_ptr<acc_t>(), K * height, pooled_h, reinterpret_cast<int2*>(y_ranges.mutable_data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    axis_ranges_kernel<acc_t><<<blocks_for(K * width), kThreads, 0, stream>>>(
        wx.const_data_ptr<acc_t>(), K * width, pooled_w, reinterpret_cast<int2*>(x_ranges.mutable_data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto launch = [&](auto index_zero, auto channels_last) {
      using index_t = decltype(index_zero);
      backward_gather_kernel<scalar_t, index_t, decltype(channels_last)::value>
          <<<blocks_for(total), kThreads, 0, stream>>>(
              g.const_data_ptr<scalar_t>(), rp, order.const_data_ptr<int64_t>(), image_begin.const_data_ptr<int64_t>(),
              wy.const_data_ptr<acc_t>(), wx.const_data_ptr<acc_t>(),
              reinterpret_cast<const int2*>(y_ranges.const_data_ptr<int>()),
              reinterpret_cast<const int2*>(x_ranges.const_data_ptr<int>()), out.mutable_data_ptr<scalar_t>(), total,
              channels, height, width, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned);
    };
    if (small && fits_int32({total}))
      nhwc ? launch(int32_t(0), std::true_type{}) : launch(int32_t(0), std::false_type{});
    else
      nhwc ? launch(int64_t(0), std::true_type{}) : launch(int64_t(0), std::false_type{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(detector, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cuda));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cuda));
}

}  // namespace detector
