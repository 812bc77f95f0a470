#pragma once
// Host-side glue of the GSSM ops around the scan (conv + SiLU of both halves, FGMM with its global gate):
// argument checks naming the argument, allocation, the tiny per-sample MLP (ATen), and fixed-order sums of
// the kernels' per-tile partials. A backend supplies only the token-parallel kernels.
#include <ATen/ATen.h>

#include <tuple>

#include "gmamba/gssm_math.h"

namespace gmamba {

struct GssmBackend {
  // x1 / z1 = silu(conv(xz)) of channels [0, d) / [d, 2d). wt: (K, 2d) in the accumulation dtype.
  void (*conv_fwd)(const at::Tensor& xz, const at::Tensor& wt, const at::Tensor& bias, const ConvShape& s,
                   const at::Tensor& x1, const at::Tensor& z1);
  // dxz, and per-tile partials part (B, tiles, K + 1, 2d): rows k < K hold dweight^T, row K dbias.
  void (*conv_bwd)(const at::Tensor& dx1, const at::Tensor& dz1, const at::Tensor& xz, const at::Tensor& wt,
                   const at::Tensor& bias, const ConvShape& s, const at::Tensor& dxz, const at::Tensor& part);
  // part (B, tiles, d) = per-tile sums over tokens of x1 + f sigma(c).
  void (*fgmm_pool)(const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c, const at::Tensor& part);
  // x2 = coef[b, 0] x1 + coef[b, 1] f sigma(c).
  void (*fgmm_mix)(const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c, const at::Tensor& coef,
                   const at::Tensor& x2);
  // part (B, tiles, 2) = per-tile sums over tokens and channels of (x1 dx2, f sigma(c) dx2).
  void (*fgmm_bwd_reduce)(const at::Tensor& dx2, const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c,
                          const at::Tensor& part);
  // dx1, df, dc of fgmm_mix_grad, with q (B, d) the pooled branch's gradient.
  void (*fgmm_bwd_apply)(const at::Tensor& dx2, const at::Tensor& f, const at::Tensor& c, const at::Tensor& coef,
                         const at::Tensor& q, const at::Tensor& dx1, const at::Tensor& df, const at::Tensor& dc);
};

std::tuple<at::Tensor, at::Tensor> conv_silu_forward(const at::Tensor& xz, const at::Tensor& weight,
                                                     const at::Tensor& bias, const GssmBackend& backend);

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_silu_backward(const at::Tensor& dx1, const at::Tensor& dz1,
                                                                  const at::Tensor& xz, const at::Tensor& weight,
                                                                  const at::Tensor& bias,
                                                                  const GssmBackend& backend);

// Returns (x2, s, a, g).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fgmm_forward(
    const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c, const at::Tensor& gate_logit,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& ratio,
    const GssmBackend& backend);

// Returns (dx1, df, dc, dgate_logit, dw1, db1, dw2, db2, dratio).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fgmm_backward(const at::Tensor& dx2, const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c,
              const at::Tensor& gate_logit, const at::Tensor& s, const at::Tensor& a, const at::Tensor& g,
              const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
              const at::Tensor& ratio, const GssmBackend& backend);

// The op schemas' entry points for a backend.
template <typename Backend>
struct GssmOps {
  static std::tuple<at::Tensor, at::Tensor> conv_fwd(const at::Tensor& xz, const at::Tensor& weight,
                                                     const at::Tensor& bias) {
    return conv_silu_forward(xz, weight, bias, Backend::get());
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd(const at::Tensor& dx1, const at::Tensor& dz1,
                                                                 const at::Tensor& xz, const at::Tensor& weight,
                                                                 const at::Tensor& bias) {
    return conv_silu_backward(dx1, dz1, xz, weight, bias, Backend::get());
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fgmm_fwd(
      const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c, const at::Tensor& gate_logit,
      const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
      const at::Tensor& ratio) {
    return fgmm_forward(x1, f, c, gate_logit, w1, b1, w2, b2, ratio, Backend::get());
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor>
  fgmm_bwd(const at::Tensor& dx2, const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c,
           const at::Tensor& gate_logit, const at::Tensor& s, const at::Tensor& a, const at::Tensor& g,
           const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
           const at::Tensor& ratio) {
    return fgmm_backward(dx2, x1, f, c, gate_logit, s, a, g, w1, b1, w2, b2, ratio, Backend::get());
  }
};

}  // namespace gmamba
