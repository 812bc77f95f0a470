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

// pre[c] = bias[c] + sum_k w[k, c] x[l + k - left, c] for one token l, every channel: taps outer, channels
// inner (contiguous, SIMD), which GCC vectorises where a per-element tap loop with bounds checks is not.
template <typename in_t, typename acc_t>
inline void conv_row(const in_t* x, const acc_t* wt, const acc_t* bias, int64_t l, const ConvShape& s, acc_t* pre) {
  const int64_t ch = s.channels;
  GMAMBA_LANES
  for (int64_t c = 0; c < ch; ++c) pre[c] = bias[c];
  for (int64_t k = 0; k < s.width; ++k) {
    const int64_t src = l + k - s.left;
    if (src < 0 || src >= s.len) continue;
    const in_t* xr = x + src * ch;
    const acc_t* wk = wt + k * ch;
    GMAMBA_LANES
    for (int64_t c = 0; c < ch; ++c) pre[c] += wk[c] * static_cast<acc_t>(xr[c]);
  }
}

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
      std::vector<acc_t> pre(ch);
      for (int64_t l = l0; l < l1; ++l) {
        conv_row(x, w, bs, l, s, pre.data());
        for (int half = 0; half < 2; ++half) {
          scalar_t* o = out[half] + l * d;
          const acc_t* p = pre.data() + half * d;
          GMAMBA_LANES
          for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(silu(p[c]));
        }
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
      for (int64_t l = g0; l < g1; ++l) {
        acc_t* gl = g.data() + (l - g0) * ch;
        conv_row(x, w, bs, l, s, gl);  // the pre-activation, turned into dL/dpre in place
        for (int half = 0; half < 2; ++half) {
          acc_t* gr = gl + half * d;
          const scalar_t* dr = dout[half] + l * d;
          GMAMBA_LANES
          for (int64_t c = 0; c < d; ++c) gr[c] = static_cast<acc_t>(dr[c]) * silu_grad(gr[c]);
        }
      }
      scalar_t* dx = dxz.data_ptr<scalar_t>() + b * s.len * ch;
      acc_t* p = part.data_ptr<acc_t>() + (b * tiles + t) * (K + 1) * ch;
      std::vector<acc_t> dx_row(ch);
      acc_t* acc_row = dx_row.data();
      for (int64_t m = l0; m < l1; ++m) {
        scalar_t* dr = dx + m * ch;
        const acc_t* gm = g.data() + (m - g0) * ch;
        GMAMBA_LANES
        for (int64_t c = 0; c < ch; ++c) acc_row[c] = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t src = m - k + s.left;  // the token whose pre-activation read x[m] through tap k
          if (src < 0 || src >= s.len) continue;
          const acc_t* gs = g.data() + (src - g0) * ch;
          const acc_t* wk = w + k * ch;
          GMAMBA_LANES
          for (int64_t c = 0; c < ch; ++c) acc_row[c] += wk[c] * gs[c];
        }
        GMAMBA_LANES
        for (int64_t c = 0; c < ch; ++c) dr[c] = static_cast<scalar_t>(acc_row[c]);
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
      const scalar_t *x1p = x1.data_ptr<scalar_t>(), *fp = f.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>();
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t row = (b * len + l) * d;
        const scalar_t *xr = x1p + row, *fr = fp + row, *cr = cp + row;
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
      const scalar_t *gp = dx2.data_ptr<scalar_t>(), *fp = f.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>();
      scalar_t *o1p = dx1.data_ptr<scalar_t>(), *ofp = df.data_ptr<scalar_t>(), *ocp = dc.data_ptr<scalar_t>();
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t row = (b * len + l) * d;
        const scalar_t *gr = gp + row, *fr = fp + row, *cr = cp + row;
        scalar_t *o1 = o1p + row, *of = ofp + row, *oc = ocp + row;
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
