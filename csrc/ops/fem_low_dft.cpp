// FEM's low-pass as pruned real DFT matrices and GEMMs (the CPU's form of fem_low; gssm_fused.h).
// Why: on the CPU, ATen's FFTs of a channels-last (B, H, W, d) tensor spend most of their time in layout
// copies and zero fills around pocketfft (rfft's full (B, d, H, W/2+1) output, the irfft's zero-padded
// input and transposed output, the final channels-last copy), and the rfft computes every column of which
// the mask keeps a quarter. Here every product reads and writes channels-last rows: no copies.
//
// With Xw = x's DFT along W at the kept columns v < ncol (rows [re | im] of 2 ncol), the map is
//   Z = F_U Xw (the DFT along H at the kept rows U), Y = G_U Z (their inverse along H), low = Gw Y (the
// real inverse along W from ncol columns: weights 1/W for v = 0, 2/W above; the mask never keeps the
// Nyquist column, and the imaginary part of column 0 has a zero weight, as in irfft).
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "gssm_fused.h"

namespace gmamba::fused {
namespace {

constexpr double kTwoPi = 6.283185307179586;

// cos and sin of 2 pi (a b mod n) / n for a in `as`, b in [0, m): (|as|, m) tensors in double. The index
// is reduced mod n in integers first, so large products lose no accuracy.
std::pair<at::Tensor, at::Tensor> twiddles(const std::vector<int64_t>& as, int64_t m, int64_t n) {
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const at::Tensor a = at::tensor(as, i64).unsqueeze(1), b = at::arange(m, i64).unsqueeze(0);
  const at::Tensor angle = at::remainder(a * b, n).to(at::kDouble) * (kTwoPi / static_cast<double>(n));
  return {angle.cos(), angle.sin()};
}

// The kept rows of the mask along H: u < n ("corner"), or u < ceil(n/2) and u >= H - floor(n/2).
std::vector<int64_t> kept_rows(const Layout& s) {
  const int64_t n = s.H / 4;
  std::vector<int64_t> rows;
  if (s.corner) {
    for (int64_t u = 0; u < n; ++u) rows.push_back(u);
  } else {
    for (int64_t u = 0; u < (n + 1) / 2; ++u) rows.push_back(u);
    for (int64_t u = s.H - n / 2; u < s.H; ++u) rows.push_back(u);
  }
  return rows;
}

// [P(re) ; P(im)] for a product P = A M of a complex A (rows [re ; im], each `rows` tall) and a complex M
// held as [M(re) | M(im)] (columns): from the real product [A(re) ; A(im)] [M(re) | M(im)].
at::Tensor complex_from_blocks(const at::Tensor& prod, int64_t rows, int64_t cols) {
  const at::Tensor rr = prod.narrow(1, 0, rows).narrow(2, 0, cols), ri = prod.narrow(1, 0, rows).narrow(2, cols, cols);
  const at::Tensor ir = prod.narrow(1, rows, rows).narrow(2, 0, cols), ii = prod.narrow(1, rows, rows).narrow(2, cols, cols);
  return at::cat({rr - ii, ri + ir}, 2);
}

}  // namespace

at::Tensor fem_low_dft(const at::Tensor& x, const Layout& s) {
  const int64_t ncol = (s.W / 2 + 1) / 4, cols = ncol * s.d;
  const std::vector<int64_t> rows = kept_rows(s);
  const int64_t U = static_cast<int64_t>(rows.size());
  const auto acc = x.options().dtype(s.acc);
  std::vector<int64_t> vs(ncol);
  for (int64_t v = 0; v < ncol; ++v) vs[v] = v;

  // Along W, forward: Fw (2 ncol, W) = [cos ; -sin] of 2 pi v w / W.
  const auto [cw, sw] = twiddles(vs, s.W, s.W);
  const at::Tensor Fw = at::cat({cw, -sw}).to(acc);
  // Along H: F_U (2U, H) = [cos ; -sin] of 2 pi u h / H; G_U (2H, U) = [cos ; sin] / H of 2 pi h u / H.
  const auto [ch, sh] = twiddles(rows, s.H, s.H);
  const at::Tensor FU = at::cat({ch, -sh}).to(acc);
  const at::Tensor GU = (at::cat({ch.t(), sh.t()}) / static_cast<double>(s.H)).to(acc);
  // Along W, inverse: Gw (W, 2 ncol) = [a cos | -a sin] / W of 2 pi v w / W, a = 1 for v = 0, else 2.
  at::Tensor weight = at::full({1, ncol}, 2.0 / static_cast<double>(s.W), at::TensorOptions().dtype(at::kDouble));
  weight.narrow(1, 0, 1).fill_(1.0 / static_cast<double>(s.W));
  const at::Tensor Gw = at::cat({cw.t() * weight, -sw.t() * weight}, 1).to(acc);

  // x in the transform's precision lives only for the first product (a float32 copy for half inputs)
  const at::Tensor Xw = at::matmul(Fw, as_dtype(x, s.acc).reshape({s.B * s.H, s.W, s.d}))
                            .view({s.B, s.H, 2 * cols});                              // [re | im] per (b, h)
  const at::Tensor Z = complex_from_blocks(at::matmul(FU, Xw), U, cols);            // (B, U, 2 cols)
  const at::Tensor Y = complex_from_blocks(at::matmul(GU, Z), s.H, cols);           // (B, H, 2 cols)
  const at::Tensor low = at::matmul(Gw, Y.view({s.B * s.H, 2 * ncol, s.d}));        // (B H, W, d)
  return as_dtype(low.view({s.B, s.L, s.d}), s.dt).contiguous();
}

}  // namespace gmamba::fused
