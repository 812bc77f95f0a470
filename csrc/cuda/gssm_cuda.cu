// CUDA kernels of the GSSM stages around the scan. A block is 32 channels x 8 row threads over a tile of
// kGssmTileRows tokens: a warp reads 32 consecutive channels of one token (coalesced, channels last). Tile
// partials are reduced inside the block in a fixed order and summed by the host: no atomics, so every
// result is bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/gssm_host.h"

namespace gmamba {
namespace {

constexpr int kLanesX = 32;  // channels per block
constexpr int kRowsY = 8;    // row threads per block; each covers kGssmTileRows / kRowsY tokens
constexpr int kThreads = kLanesX * kRowsY;
constexpr int kElementThreads = 256;

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The (sample, tile, channel) a thread of a tile block covers.
struct TileThread {
  int64_t b, t, c, l0, l1;
};

__device__ TileThread locate(int64_t len, int64_t channels) {
  const int64_t cblocks = (channels + kLanesX - 1) / kLanesX;
  const int64_t tiles = gssm_tiles(len);
  const int64_t blk = blockIdx.x;
  TileThread p;
  p.c = (blk % cblocks) * kLanesX + threadIdx.x;
  p.t = (blk / cblocks) % tiles;
  p.b = blk / (cblocks * tiles);
  p.l0 = p.t * kGssmTileRows;
  p.l1 = p.l0 + kGssmTileRows < len ? p.l0 + kGssmTileRows : len;
  return p;
}

int64_t tile_blocks(int64_t batch, int64_t len, int64_t channels) {
  return batch * gssm_tiles(len) * ((channels + kLanesX - 1) / kLanesX);
}

// Sums v over threadIdx.y in a fixed order; the result is valid in threads with threadIdx.y == 0.
template <typename acc_t>
__device__ acc_t sum_over_rows(acc_t v, acc_t* smem) {
  smem[threadIdx.y * kLanesX + threadIdx.x] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.y == 0)
    for (int y = 0; y < kRowsY; ++y) total += smem[y * kLanesX + threadIdx.x];
  __syncthreads();
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) conv_fwd_kernel(const scalar_t* __restrict__ xz,
                                                            const acc_t* __restrict__ wt,
                                                            const acc_t* __restrict__ bias, ConvShape s,
                                                            scalar_t* __restrict__ x1, scalar_t* __restrict__ z1) {
  const TileThread p = locate(s.len, s.channels);
  if (p.c >= s.channels) return;
  const int64_t d = s.channels / 2;
  const scalar_t* x = xz + p.b * s.len * s.channels;
  scalar_t* out = p.c < d ? x1 + p.b * s.len * d + p.c : z1 + p.b * s.len * d + (p.c - d);
  for (int64_t l = p.l0 + threadIdx.y; l < p.l1; l += kRowsY)
    out[l * d] = static_cast<scalar_t>(silu(conv_pre(x, wt, bias[p.c], l, p.c, s)));
}

// dx and the tile's partial dweight / dbias. g = dL/dpre is computed once per source row into shared
// memory (the tile plus K - 1 halo rows), then each token's dx reads its K neighbours there; recomputing g
// at every use cost K convolutions and K exps per token (run 8: 0.36 ms, 4.3x the forward, at C = 96,
// H = 128). The per-k sums are indexed by unrolled constants so they stay in registers (a run-time index
// put them in a 40-byte stack frame).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) conv_bwd_kernel(const scalar_t* __restrict__ dx1,
                                                            const scalar_t* __restrict__ dz1,
                                                            const scalar_t* __restrict__ xz,
                                                            const acc_t* __restrict__ wt,
                                                            const acc_t* __restrict__ bias, ConvShape s,
                                                            scalar_t* __restrict__ dxz, acc_t* __restrict__ part) {
  __shared__ acc_t g_rows[kGssmTileRows + kMaxConvWidth - 1][kLanesX];
  __shared__ acc_t smem[kThreads];
  const TileThread p = locate(s.len, s.channels);
  const bool live = p.c < s.channels;  // dead lanes still take part in the barriers
  const int64_t d = s.channels / 2, K = s.width;
  const scalar_t* x = xz + p.b * s.len * s.channels;
  const scalar_t* dout = p.c < d ? dx1 + p.b * s.len * d + p.c : dz1 + p.b * s.len * d + (p.c - d);
  // Token m feeds pre(m - k + left) for k < K: rows w0 .. w0 + rows - 1 cover the tile's sources.
  const int64_t w0 = p.l0 - (K - 1 - s.left), rows = p.l1 - p.l0 + K - 1;
  for (int64_t r = threadIdx.y; r < rows; r += kRowsY) {
    const int64_t src = w0 + r;
    acc_t g = 0;
    if (live && src >= 0 && src < s.len)
      g = static_cast<acc_t>(dout[src * d]) * silu_grad(conv_pre(x, wt, bias[p.c], src, p.c, s));
    g_rows[r][threadIdx.x] = g;
  }
  __syncthreads();
  acc_t sums[kMaxConvWidth] = {}, bias_sum = 0;
  if (live) {
    for (int64_t m = p.l0 + threadIdx.y; m < p.l1; m += kRowsY) {
      const int64_t r = m - w0;  // m's own row
      acc_t dx = 0;
#pragma unroll
      for (int k = 0; k < kMaxConvWidth; ++k)
        if (k < K) dx += wt[k * s.channels + p.c] * g_rows[r - k + s.left][threadIdx.x];
      dxz[(p.b * s.len + m) * s.channels + p.c] = static_cast<scalar_t>(dx);
      const acc_t g_own = g_rows[r][threadIdx.x];
#pragma unroll
      for (int k = 0; k < kMaxConvWidth; ++k) {
        const int64_t src = m + k - s.left;
        if (k < K && src >= 0 && src < s.len) sums[k] += g_own * static_cast<acc_t>(x[src * s.channels + p.c]);
      }
      bias_sum += g_own;
    }
  }
  const int64_t tiles = gssm_tiles(s.len);
#pragma unroll
  for (int k = 0; k <= kMaxConvWidth; ++k) {
    if (k > K) break;  // K is the same for every thread: the barriers inside stay uniform
    const acc_t total = sum_over_rows(k < K ? sums[k] : bias_sum, smem);
    if (live && threadIdx.y == 0) part[((p.b * tiles + p.t) * (K + 1) + k) * s.channels + p.c] = total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fgmm_pool_kernel(const scalar_t* __restrict__ x1,
                                                             const scalar_t* __restrict__ f,
                                                             const scalar_t* __restrict__ c, int64_t len,
                                                             int64_t d, acc_t* __restrict__ part) {
  __shared__ acc_t smem[kThreads];
  const TileThread p = locate(len, d);
  acc_t v = 0;
  if (p.c < d)
    for (int64_t l = p.l0 + threadIdx.y; l < p.l1; l += kRowsY) {
      const int64_t i = (p.b * len + l) * d + p.c;
      v += static_cast<acc_t>(x1[i]) + static_cast<acc_t>(f[i]) * sigmoid(static_cast<acc_t>(c[i]));
    }
  const acc_t total = sum_over_rows(v, smem);
  if (p.c < d && threadIdx.y == 0) part[(p.b * gssm_tiles(len) + p.t) * d + p.c] = total;
}

// One block per (sample, tile), looping over all channels: the partial is a sum over tokens and channels.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fgmm_bwd_reduce_kernel(const scalar_t* __restrict__ dx2,
                                                                   const scalar_t* __restrict__ x1,
                                                                   const scalar_t* __restrict__ f,
                                                                   const scalar_t* __restrict__ c, int64_t len,
                                                                   int64_t d, acc_t* __restrict__ part) {
  __shared__ acc_t smem[2][kThreads];
  const int64_t tiles = gssm_tiles(len);
  const int64_t b = blockIdx.x / tiles, t = blockIdx.x % tiles;
  const int64_t l0 = t * kGssmTileRows, l1 = l0 + kGssmTileRows < len ? l0 + kGssmTileRows : len;
  acc_t sx = 0, sf = 0;
  for (int64_t l = l0 + threadIdx.y; l < l1; l += kRowsY)
    for (int64_t j = threadIdx.x; j < d; j += kLanesX) {
      const int64_t i = (b * len + l) * d + j;
      const acc_t g = static_cast<acc_t>(dx2[i]);
      sx += static_cast<acc_t>(x1[i]) * g;
      sf += static_cast<acc_t>(f[i]) * sigmoid(static_cast<acc_t>(c[i])) * g;
    }
  const int tid = threadIdx.y * kLanesX + threadIdx.x;
  smem[0][tid] = sx;
  smem[1][tid] = sf;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {  // fixed tree: same order every run
    if (tid < stride) {
      smem[0][tid] += smem[0][tid + stride];
      smem[1][tid] += smem[1][tid + stride];
    }
    __syncthreads();
  }
  if (tid == 0) {
    part[(b * tiles + t) * 2] = smem[0][0];
    part[(b * tiles + t) * 2 + 1] = smem[1][0];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void fgmm_mix_kernel(const scalar_t* __restrict__ x1, const scalar_t* __restrict__ f,
                                const scalar_t* __restrict__ c, const acc_t* __restrict__ coef, int64_t per_sample,
                                int64_t total, scalar_t* __restrict__ x2) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / per_sample;
    x2[i] = static_cast<scalar_t>(fgmm_mix(static_cast<acc_t>(x1[i]), static_cast<acc_t>(f[i]),
                                           static_cast<acc_t>(c[i]), coef[2 * b], coef[2 * b + 1]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void fgmm_bwd_apply_kernel(const scalar_t* __restrict__ dx2, const scalar_t* __restrict__ f,
                                      const scalar_t* __restrict__ c, const acc_t* __restrict__ coef,
                                      const acc_t* __restrict__ q, int64_t len, int64_t d, int64_t total,
                                      scalar_t* __restrict__ dx1, scalar_t* __restrict__ df,
                                      scalar_t* __restrict__ dc) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / (len * d), j = i % d;
    acc_t v1, vf, vc;
    fgmm_mix_grad(static_cast<acc_t>(dx2[i]), static_cast<acc_t>(f[i]), static_cast<acc_t>(c[i]), coef[2 * b],
                  coef[2 * b + 1], q[b * d + j], v1, vf, vc);
    dx1[i] = static_cast<scalar_t>(v1);
    df[i] = static_cast<scalar_t>(vf);
    dc[i] = static_cast<scalar_t>(vc);
  }
}

int element_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kElementThreads - 1) / kElementThreads, 65535L * 8));
}

#define GMAMBA_DISPATCH_CUDA(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

const dim3 kTileBlock(kLanesX, kRowsY);

void conv_fwd_cuda(const at::Tensor& xz, const at::Tensor& wt, const at::Tensor& bias, const ConvShape& s,
                   const at::Tensor& x1, const at::Tensor& z1) {
  const c10::cuda::CUDAGuard guard(xz.device());
  GMAMBA_DISPATCH_CUDA(xz.scalar_type(), "conv_silu_fwd_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    conv_fwd_kernel<<<tile_blocks(s.batch, s.len, s.channels), kTileBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        xz.data_ptr<scalar_t>(), wt.data_ptr<acc_t>(), bias.data_ptr<acc_t>(), s, x1.data_ptr<scalar_t>(),
        z1.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void conv_bwd_cuda(const at::Tensor& dx1, const at::Tensor& dz1, const at::Tensor& xz, const at::Tensor& wt,
                   const at::Tensor& bias, const ConvShape& s, const at::Tensor& dxz, const at::Tensor& part) {
  const c10::cuda::CUDAGuard guard(xz.device());
  GMAMBA_DISPATCH_CUDA(xz.scalar_type(), "conv_silu_bwd_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    conv_bwd_kernel<<<tile_blocks(s.batch, s.len, s.channels), kTileBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        dx1.data_ptr<scalar_t>(), dz1.data_ptr<scalar_t>(), xz.data_ptr<scalar_t>(), wt.data_ptr<acc_t>(),
        bias.data_ptr<acc_t>(), s, dxz.data_ptr<scalar_t>(), part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fgmm_pool_cuda(const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c, const at::Tensor& part) {
  const c10::cuda::CUDAGuard guard(x1.device());
  const int64_t batch = x1.size(0), len = x1.size(1), d = x1.size(2);
  GMAMBA_DISPATCH_CUDA(x1.scalar_type(), "fgmm_pool_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    fgmm_pool_kernel<<<tile_blocks(batch, len, d), kTileBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        x1.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), len, d, part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fgmm_mix_cuda(const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c, const at::Tensor& coef,
                   const at::Tensor& x2) {
  const c10::cuda::CUDAGuard guard(x1.device());
  const int64_t total = x1.numel();
  GMAMBA_DISPATCH_CUDA(x1.scalar_type(), "fgmm_mix_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    fgmm_mix_kernel<<<element_blocks(total), kElementThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x1.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(),
        x1.size(1) * x1.size(2), total, x2.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fgmm_bwd_reduce_cuda(const at::Tensor& dx2, const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c,
                          const at::Tensor& part) {
  const c10::cuda::CUDAGuard guard(x1.device());
  const int64_t batch = x1.size(0), len = x1.size(1), d = x1.size(2);
  GMAMBA_DISPATCH_CUDA(x1.scalar_type(), "fgmm_bwd_reduce_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    fgmm_bwd_reduce_kernel<<<batch * gssm_tiles(len), kTileBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        dx2.data_ptr<scalar_t>(), x1.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), len, d,
        part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fgmm_bwd_apply_cuda(const at::Tensor& dx2, const at::Tensor& f, const at::Tensor& c, const at::Tensor& coef,
                         const at::Tensor& q, const at::Tensor& dx1, const at::Tensor& df, const at::Tensor& dc) {
  const c10::cuda::CUDAGuard guard(f.device());
  const int64_t total = f.numel();
  GMAMBA_DISPATCH_CUDA(f.scalar_type(), "fgmm_bwd_apply_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    fgmm_bwd_apply_kernel<<<element_blocks(total), kElementThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        dx2.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(),
        q.data_ptr<acc_t>(), f.size(1), f.size(2), total, dx1.data_ptr<scalar_t>(), df.data_ptr<scalar_t>(),
        dc.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct CudaGssmBackend {
  static const GssmBackend& get() {
    static const GssmBackend backend{conv_fwd_cuda,        conv_bwd_cuda,       fgmm_pool_cuda,
                                     fgmm_mix_cuda,        fgmm_bwd_reduce_cuda, fgmm_bwd_apply_cuda};
    return backend;
  }
};

}  // namespace
}  // namespace gmamba

TORCH_LIBRARY_IMPL(gmamba_ext, CUDA, m) {
  using Ops = gmamba::GssmOps<gmamba::CudaGssmBackend>;
  m.impl("conv_silu_fwd", &Ops::conv_fwd);
  m.impl("conv_silu_bwd", &Ops::conv_bwd);
  m.impl("fgmm_fwd", &Ops::fgmm_fwd);
  m.impl("fgmm_bwd", &Ops::fgmm_bwd);
}
