#pragma once
// Per-element arithmetic of the GSSM stages around the scan (depthwise conv + SiLU, FGMM mixing), shared by
// the CPU and CUDA kernels so that both compute the same expressions.
#include <cstdint>

#include "scan_math.h"

namespace gmamba {

// Token rows per partial-reduction tile: every backend reduces a tile in a fixed order, and the host sums
// the tiles with ATen (deterministic), so results do not depend on threads or launch shapes.
constexpr int64_t kGssmTileRows = 64;

GMAMBA_HD int64_t gssm_tiles(int64_t len) { return (len + kGssmTileRows - 1) / kGssmTileRows; }
// Largest depthwise-conv width the kernels take (the release uses 3, Mamba 4).
constexpr int64_t kMaxConvWidth = 8;

// A (batch, len, channels) channels-last slab convolved along len with a "same" zero padding of `left`
// steps before and width - 1 - left after.
struct ConvShape {
  int64_t batch, len, channels, width, left;
  GMAMBA_HD int64_t right() const { return width - 1 - left; }
};

// Pre-activation of the depthwise conv at token l, channel c of one sample's slab x (row stride =
// channels). wt is the weight transposed to (width, channels), so a row of it is contiguous in c. The GPU
// uses this per-element form; the CPU sums the same terms in the same order a whole row at a time
// (conv_row in gssm_cpu.cpp), which vectorises.
template <typename in_t, typename acc_t>
GMAMBA_HD_SMALL acc_t conv_pre(const in_t* x, const acc_t* wt, acc_t bias, int64_t l, int64_t c, const ConvShape& s) {
  acc_t v = bias;
  for (int64_t k = 0; k < s.width; ++k) {
    const int64_t src = l + k - s.left;
    if (src >= 0 && src < s.len) v += wt[k * s.channels + c] * static_cast<acc_t>(x[src * s.channels + c]);
  }
  return v;
}

// FGMM mixing of one element: x2 = (a0 m) x1 + (a1 m) f sigma(c), coef = (a0 m, a1 m) of the sample.
template <typename acc_t>
GMAMBA_HD_SMALL acc_t fgmm_mix(acc_t x1, acc_t f, acc_t c, acc_t coef_x, acc_t coef_f) {
  return coef_x * x1 + coef_f * f * sigmoid(c);
}

// Its backward for one element, with q = ds / L the pooled branch's per-channel gradient (s = mean of
// x1 + f sigma(c)): writes dx1, df, dc.
template <typename acc_t>
GMAMBA_HD_SMALL void fgmm_mix_grad(acc_t dx2, acc_t f, acc_t c, acc_t coef_x, acc_t coef_f, acc_t q, acc_t& dx1,
                             acc_t& df, acc_t& dc) {
  const acc_t sc = sigmoid(c);
  const acc_t dF2 = coef_f * dx2 + q;
  dx1 = coef_x * dx2 + q;
  df = dF2 * sc;
  dc = dF2 * f * sc * (acc_t(1) - sc);
}

}  // namespace gmamba
