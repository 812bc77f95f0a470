// CPU kernels of the GSSM stages around the scan: token tiles of kGssmTileRows rows run in parallel, the
// channel loop inside a row is the SIMD loop (channels-last tokens are contiguous in c).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/gssm_host.h"

namespace gmamba {
namespace {

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Runs fn(b, tile, l0, l1) over every (sample, token tile), in parallel.
template <typename Fn>
void for_each_tile(int64_t batch, int64_t len, const Fn& fn) {
  const int64_t tiles = gssm_tiles(len);
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / tiles, t = i % tiles;
      const int64_t l0 = t * kGssmTileRows;
      fn(b, t, l0, std::min(len, l0 + kGssmTileRows));
    }
  });
}

#define GMAMBA_DISPATCH_CPU(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

void conv_fwd_cpu(const at::Tensor& xz, const at::Tensor& wt, const at::Tensor& bias, const ConvShape& s,
                  const at::Tensor& x1, const at::Tensor& z1) {
  GMAMBA_DISPATCH_CPU(xz.scalar_type(), "conv_silu_fwd_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const int64_t ch = s.channels, d = ch / 2;
    const acc_t* w = wt.data_ptr<acc_t>();
    const acc_t* bs = bias.data_ptr<acc_t>();
    for_each_tile(s.batch, s.len, [&](int64_t b, int64_t, int64_t l0, int64_t l1) {
      const scalar_t* x = xz.data_ptr<scalar_t>() + b * s.len * ch;
      scalar_t* out[2] = {x1.data_ptr<scalar_t>() + b * s.len * d, z1.data_ptr<scalar_t>() + b * s.len * d};
      for (int64_t l = l0; l < l1; ++l)
        for (int half = 0; half < 2; ++half) {
          scalar_t* o = out[half] + l * d;
          GMAMBA_LANES
          for (int64_t c = 0; c < d; ++c)
            o[c] = static_cast<scalar_t>(silu(conv_pre(x, w, bs[half * d + c], l, half * d + c, s)));
        }
    });
  });
}

void conv_bwd_cpu(const at::Tensor& dx1, const at::Tensor& dz1, const at::Tensor& xz, const at::Tensor& wt,
                  const at::Tensor& bias, const ConvShape& s, const at::Tensor& dxz, const at::Tensor& part) {
  GMAMBA_DISPATCH_CPU(xz.scalar_type(), "conv_silu_bwd_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const int64_t ch = s.channels, d = ch / 2, K = s.width;
    const int64_t tiles = gssm_tiles(s.len);
    const acc_t* w = wt.data_ptr<acc_t>();
    const acc_t* bs = bias.data_ptr<acc_t>();
    for_each_tile(s.batch, s.len, [&](int64_t b, int64_t t, int64_t l0, int64_t l1) {
      const scalar_t* x = xz.data_ptr<scalar_t>() + b * s.len * ch;
      const scalar_t* dout[2] = {dx1.data_ptr<scalar_t>() + b * s.len * d, dz1.data_ptr<scalar_t>() + b * s.len * d};
      // g = dL/dpre over the tile and the halo its dx needs.
      const int64_t g0 = std::max<int64_t>(0, l0 - s.right()), g1 = std::min(s.len, l1 + s.left);
      std::vector<acc_t> g((g1 - g0) * ch);
      for (int64_t l = g0; l < g1; ++l)
        for (int half = 0; half < 2; ++half) {
          acc_t* gr = g.data() + (l - g0) * ch + half * d;
          const scalar_t* dr = dout[half] + l * d;
          GMAMBA_LANES
          for (int64_t c = 0; c < d; ++c)
            gr[c] = static_cast<acc_t>(dr[c]) * silu_grad(conv_pre(x, w, bs[half * d + c], l, half * d + c, s));
        }
      scalar_t* dx = dxz.data_ptr<scalar_t>() + b * s.len * ch;
      acc_t* p = part.data_ptr<acc_t>() + (b * tiles + t) * (K + 1) * ch;
      for (int64_t m = l0; m < l1; ++m) {
        scalar_t* dr = dx + m * ch;
        const acc_t* gm = g.data() + (m - g0) * ch;
        GMAMBA_LANES
        for (int64_t c = 0; c < ch; ++c) {
          acc_t v = 0;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t src = m - k + s.left;  // the token whose pre-activation read x[m] through tap k
            if (src >= 0 && src < s.len) v += w[k * ch + c] * g[(src - g0) * ch + c];
          }
          dr[c] = static_cast<scalar_t>(v);
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t src = m + k - s.left;
          if (src < 0 || src >= s.len) continue;
          const scalar_t* xr = x + src * ch;
          acc_t* pk = p + k * ch;
          GMAMBA_LANES
          for (int64_t c = 0; c < ch; ++c) pk[c] += gm[c] * static_cast<acc_t>(xr[c]);
        }
        acc_t* pb = p + K * ch;
        GMAMBA_LANES
        for (int64_t c = 0; c < ch; ++c) pb[c] += gm[c];
      }
    });
  });
}

void fgmm_pool_cpu(const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c, const at::Tensor& part) {
  GMAMBA_DISPATCH_CPU(x1.scalar_type(), "fgmm_pool_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const int64_t len = x1.size(1), d = x1.size(2), tiles = gssm_tiles(len);
    for_each_tile(x1.size(0), len, [&](int64_t b, int64_t t, int64_t l0, int64_t l1) {
      acc_t* p = part.data_ptr<acc_t>() + (b * tiles + t) * d;
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t row = (b * len + l) * d;
        const scalar_t *xr = x1.data_ptr<scalar_t>() + row, *fr = f.data_ptr<scalar_t>() + row,
                       *cr = c.data_ptr<scalar_t>() + row;
        GMAMBA_LANES
        for (int64_t j = 0; j < d; ++j)
          p[j] += static_cast<acc_t>(xr[j]) + static_cast<acc_t>(fr[j]) * sigmoid(static_cast<acc_t>(cr[j]));
      }
    });
  });
}

void fgmm_mix_cpu(const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c, const at::Tensor& coef,
                  const at::Tensor& x2) {
  GMAMBA_DISPATCH_CPU(x1.scalar_type(), "fgmm_mix_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const int64_t len = x1.size(1), d = x1.size(2);
    for_each_tile(x1.size(0), len, [&](int64_t b, int64_t, int64_t l0, int64_t l1) {
      const acc_t cx = coef.data_ptr<acc_t>()[2 * b], cf = coef.data_ptr<acc_t>()[2 * b + 1];
      const int64_t begin = (b * len + l0) * d, end = (b * len + l1) * d;
      const scalar_t *xr = x1.data_ptr<scalar_t>(), *fr = f.data_ptr<scalar_t>(), *cr = c.data_ptr<scalar_t>();
      scalar_t* out = x2.data_ptr<scalar_t>();
      GMAMBA_LANES
      for (int64_t i = begin; i < end; ++i)
        out[i] = static_cast<scalar_t>(fgmm_mix(static_cast<acc_t>(xr[i]), static_cast<acc_t>(fr[i]),
                                                static_cast<acc_t>(cr[i]), cx, cf));
    });
  });
}

void fgmm_bwd_reduce_cpu(const at::Tensor& dx2, const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c,
                         const at::Tensor& part) {
  GMAMBA_DISPATCH_CPU(x1.scalar_type(), "fgmm_bwd_reduce_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const int64_t len = x1.size(1), d = x1.size(2), tiles = gssm_tiles(len);
    for_each_tile(x1.size(0), len, [&](int64_t b, int64_t t, int64_t l0, int64_t l1) {
      const int64_t begin = (b * len + l0) * d, end = (b * len + l1) * d;
      const scalar_t *gr = dx2.data_ptr<scalar_t>(), *xr = x1.data_ptr<scalar_t>(), *fr = f.data_ptr<scalar_t>(),
                     *cr = c.data_ptr<scalar_t>();
      acc_t sx = 0, sf = 0;
      _Pragma("omp simd reduction(+ : sx, sf)")
      for (int64_t i = begin; i < end; ++i) {
        const acc_t g = static_cast<acc_t>(gr[i]);
        sx += static_cast<acc_t>(xr[i]) * g;
        sf += static_cast<acc_t>(fr[i]) * sigmoid(static_cast<acc_t>(cr[i])) * g;
      }
      acc_t* p = part.data_ptr<acc_t>() + (b * tiles + t) * 2;
      p[0] = sx;
      p[1] = sf;
    });
  });
}

void fgmm_bwd_apply_cpu(const at::Tensor& dx2, const at::Tensor& f, const at::Tensor& c, const at::Tensor& coef,
                        const at::Tensor& q, const at::Tensor& dx1, const at::Tensor& df, const at::Tensor& dc) {
  GMAMBA_DISPATCH_CPU(f.scalar_type(), "fgmm_bwd_apply_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const int64_t len = f.size(1), d = f.size(2);
    for_each_tile(f.size(0), len, [&](int64_t b, int64_t, int64_t l0, int64_t l1) {
      const acc_t cx = coef.data_ptr<acc_t>()[2 * b], cf = coef.data_ptr<acc_t>()[2 * b + 1];
      const acc_t* qb = q.data_ptr<acc_t>() + b * d;
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t row = (b * len + l) * d;
        const scalar_t *gr = dx2.data_ptr<scalar_t>() + row, *fr = f.data_ptr<scalar_t>() + row,
                       *cr = c.data_ptr<scalar_t>() + row;
        scalar_t *o1 = dx1.data_ptr<scalar_t>() + row, *of = df.data_ptr<scalar_t>() + row,
                 *oc = dc.data_ptr<scalar_t>() + row;
        GMAMBA_LANES
        for (int64_t j = 0; j < d; ++j) {
          acc_t v1, vf, vc;
          fgmm_mix_grad(static_cast<acc_t>(gr[j]), static_cast<acc_t>(fr[j]), static_cast<acc_t>(cr[j]), cx, cf,
                        qb[j], v1, vf, vc);
          o1[j] = static_cast<scalar_t>(v1);
          of[j] = static_cast<scalar_t>(vf);
          oc[j] = static_cast<scalar_t>(vc);
        }
      }
    });
  });
}

struct CpuGssmBackend {
  static const GssmBackend& get() {
    static const GssmBackend backend{conv_fwd_cpu,        conv_bwd_cpu,       fgmm_pool_cpu,
                                     fgmm_mix_cpu,        fgmm_bwd_reduce_cpu, fgmm_bwd_apply_cpu};
    return backend;
  }
};

}  // namespace
}  // namespace gmamba

TORCH_LIBRARY_IMPL(gmamba_ext, CPU, m) {
  using Ops = gmamba::GssmOps<gmamba::CpuGssmBackend>;
  m.impl("conv_silu_fwd", &Ops::conv_fwd);
  m.impl("conv_silu_bwd", &Ops::conv_bwd);
  m.impl("fgmm_fwd", &Ops::fgmm_fwd);
  m.impl("fgmm_bwd", &Ops::fgmm_bwd);
}
