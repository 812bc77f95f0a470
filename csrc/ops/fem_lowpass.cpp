// FEM's low-pass low = irfft2(M rfft2(x)) in two halves, analysis F (x -> the mask's kept Fourier coefficients)
// and synthesis G (coefficients -> tokens), so that the backward can keep the few coefficients (about L / 16
// per channel) instead of low, and the fusion layer's channel product Pl can act on them instead of on the
// B L token rows (gssm_fused.h, Layout::product_on_coefficients).
//
// Two forms of the same maps, chosen by Layout::lowpass_fft:
// - Pruned real DFT matrices and GEMMs (the CPU's default). Why: ATen's CPU FFTs of channels-last
//   (B, H, W, c) tokens spend most of their time in layout copies and zero fills around pocketfft (rfft's
//   full output, the irfft's zero-padded input and transposed output), and compute every column of which the
//   mask keeps a quarter. Here every product reads and writes channels-last rows. With Xw = x's DFT along W
//   at the kept columns v < ncol (rows [re ; im] of 2 ncol), F: Z = F_U Xw (the DFT along H at the kept rows
//   U); G: Y = G_U Z (their inverse along H), low = Gw Y (the real inverse along W from ncol columns: weights
//   1/W for v = 0, 2/W above; the mask never keeps the Nyquist column, and the imaginary part of column 0 has
//   a zero weight, as in irfft).
// - ATen's FFTs (cuFFT on CUDA; pocketfft where forced on the CPU), pruned to the ncol kept columns before
//   the transform along H. gssm runs them on d-channel operands only (without product_on_coefficients no
//   2d-channel operand is transformed), so their transients are those of the low-pass before the split.
// Both give the coefficients in one layout, (B, U, 2, ncol, c) in the accumulation dtype: rows u in U (the
// mask's order), [re ; im], columns v, channels.
//
// The adjoint: G's transpose is D F with D the diagonal a_v / (H W) over columns (a_0 = 1, a_v = 2 above).
// Along W, Gw^T = diag(a / W) Fw row for row (column 0's imaginary row is zero in both); along H, the real
// form of G_U is the complex matrix e^{+2 pi i h u / H} / H, whose transpose in the real inner product is
// its conjugate transpose, F_U / H. So <t, G(Z)> = sum_k D_k F(t)_k Z_k: fem_coefficient_pairing.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>
#ifndef _WIN32
#include <pthread.h>
#endif
#include <string>
#include <vector>

#include "gssm_fused.h"

namespace gmamba::fused {
namespace {

constexpr double kTwoPi = 6.283185307179586;

int64_t kept_columns(const Layout& s) { return (s.W / 2 + 1) / 4; }

// Everything below is made on the operands' device (no host-to-device copy, which would synchronise a
// CUDA stream with the host), in double until the end.

// cos and sin of 2 pi (a b mod n) / n for a in `as` (an index tensor), b in [0, m): (|as|, m) tensors in
// double. The index is reduced mod n in integers first, so large products lose no accuracy.
std::pair<at::Tensor, at::Tensor> twiddles(const at::Tensor& as, int64_t m, int64_t n) {
  const at::Tensor b = at::arange(m, as.options()).unsqueeze(0);
  const at::Tensor angle = at::remainder(as.unsqueeze(1) * b, n).to(at::kDouble) * (kTwoPi / static_cast<double>(n));
  return {angle.cos(), angle.sin()};
}

// The kept rows of the mask along H: u < n ("corner"), or u < ceil(n/2) and u >= H - floor(n/2).
int64_t kept_row_count(const Layout& s) { return s.H / 4; }
at::Tensor kept_rows(const Layout& s, const c10::Device& device) {
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(device);
  const int64_t n = kept_row_count(s);
  if (s.corner) return at::arange(n, i64);
  return at::cat({at::arange((n + 1) / 2, i64), at::arange(s.H - n / 2, s.H, i64)});
}

// The column weights a_v of the real inverse along W (1 for v = 0, 2 above), in double.
at::Tensor column_weights(int64_t ncol, const c10::Device& device) {
  at::Tensor a = at::full({ncol}, 2.0, at::TensorOptions().dtype(at::kDouble).device(device));
  a.narrow(0, 0, 1).fill_(1.0);
  return a;
}

// P = A M per batch, for a complex matrix A = Ar + i Ai (rows, k) and a batch of complex M (B, k, [re | im]
// of `cols` each), written into out (B, rows, [re | im]): four real products, no temporaries of their own.
void complex_product_into(const at::Tensor& out, const at::Tensor& Ar, const at::Tensor& Ai, const at::Tensor& M) {
  const int64_t B = M.size(0), rows = Ar.size(0), k = Ar.size(1), cols = M.size(2) / 2;
  const at::Tensor ar = Ar.expand({B, rows, k}), ai = Ai.expand({B, rows, k});
  const at::Tensor Mr = M.narrow(2, 0, cols), Mi = M.narrow(2, cols, cols);
  at::Tensor Pr = out.narrow(2, 0, cols), Pi = out.narrow(2, cols, cols);
  at::bmm_out(Pr, ar, Mr);
  Pr.baddbmm_(ai, Mi, 1, -1);
  at::bmm_out(Pi, ar, Mi);
  Pi.baddbmm_(ai, Mr);
}

// The DFT form's matrices, in `acc`'s dtype (the accumulation dtype) and on its device.
struct DftMatrices {
  at::Tensor Fw;        // (2 ncol, W): [cos ; -sin] of 2 pi v w / W
  at::Tensor FUr, FUi;  // (U, H): cos and -sin of 2 pi u h / H
  at::Tensor GUr, GUi;  // (H, U): cos / H and sin / H of 2 pi h u / H
  at::Tensor Gw;        // (W, 2 ncol): [a cos | -a sin] / W of 2 pi v w / W
};

DftMatrices dft_matrices(const Layout& s, const at::TensorOptions& acc) {
  const int64_t ncol = kept_columns(s);
  const c10::Device device = acc.device();
  const auto [cw, sw] = twiddles(at::arange(ncol, at::TensorOptions().dtype(at::kLong).device(device)), s.W, s.W);
  const auto [ch, sh] = twiddles(kept_rows(s, device), s.H, s.H);
  const at::Tensor weight = (column_weights(ncol, device) / static_cast<double>(s.W)).unsqueeze(0);
  const double h = static_cast<double>(s.H);
  return {at::cat({cw, -sw}).to(acc), ch.to(acc), (-sh).to(acc), (ch.t() / h).to(acc), (sh.t() / h).to(acc),
          at::cat({cw.t() * weight, -sw.t() * weight}, 1).to(acc)};
}

// The DFT cache's lock, held only around lookups and insertions (the matrices are built outside it). It is
// also taken across fork(): a child forked while another thread held it inherited it locked, and its first
// gssm call hung for ever (DataLoader workers fork while a serving thread runs gssm).
static std::mutex& dft_cache_mutex() {
  static std::mutex mutex;
#ifndef _WIN32
  static const int across_fork = pthread_atfork([] { dft_cache_mutex().lock(); },
                                                [] { dft_cache_mutex().unlock(); },
                                                [] { dft_cache_mutex().unlock(); });
  (void)across_fork;
#endif
  return mutex;
}

// dft_matrices through a small cache on the CPU: they depend only on (H, W, mask, dtype), and building them
// takes about 25 small ATen calls, made by each half of the low-pass (four or more times per forward +
// backward). Not on other devices: a cache filled while a CUDA graph is being captured would keep matrices
// whose kernels never ran. Callers get their own copy of the handles; nobody writes the matrices.
DftMatrices cached_dft_matrices(const Layout& s, const at::TensorOptions& acc) {
  if (!acc.device().is_cpu()) return dft_matrices(s, acc);
  struct Entry {
    int64_t H, W;
    bool corner;
    at::ScalarType dtype;
    DftMatrices m;
  };
  constexpr size_t kEntries = 16;
  static std::vector<Entry> entries;  // most recently used last
  const at::ScalarType dtype = c10::typeMetaToScalarType(acc.dtype());
  std::mutex& mutex = dft_cache_mutex();
  // Moves a hit to the back (most recent); false on a miss. Called with the lock held.
  const auto found = [&] {
    const auto hit = std::find_if(entries.begin(), entries.end(), [&](const Entry& e) {
      return e.H == s.H && e.W == s.W && e.corner == s.corner && e.dtype == dtype;
    });
    if (hit == entries.end()) return false;
    std::rotate(hit, hit + 1, entries.end());
    return true;
  };
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (found()) return entries.back().m;
  }
  DftMatrices made = [&] {
    const c10::InferenceMode normal_tensors(false);  // not inference tensors, even if this caller runs in that mode
    return dft_matrices(s, acc);
  }();
  std::lock_guard<std::mutex> lock(mutex);
  if (!found()) {  // (another thread may have made the same ones meanwhile: keep one entry)
    if (entries.size() == kEntries) entries.erase(entries.begin());
    entries.push_back({s.H, s.W, s.corner, dtype, std::move(made)});
  }
  return entries.back().m;
}

void check_tokens_for_lowpass(const at::Tensor& x, const Layout& s, const char* what) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == s.B && x.size(1) == s.L, what, ": tokens must be (B, L, c) = (", s.B,
              ", ", s.L, ", c), got ", x.sizes());
}

// ---- the DFT-matrix form

// Half-precision tokens go through the analysis's first (float32) product in slices of the B H rows, so that
// no float32 copy of the whole operand exists.
constexpr int64_t kHalfSlices = 8;

template <typename Fn>
void over_row_slices(int64_t rows, Fn&& fn) {
  const int64_t step = std::max<int64_t>(1, (rows + kHalfSlices - 1) / kHalfSlices);
  for (int64_t r0 = 0; r0 < rows; r0 += step) fn(r0, std::min(step, rows - r0));
}

at::Tensor coefficients_dft(const at::Tensor& x, const Layout& s) {
  const int64_t c = x.size(2), ncol = kept_columns(s), cols = ncol * c, BH = s.B * s.H;
  const DftMatrices m = cached_dft_matrices(s, x.options().dtype(s.acc));
  const int64_t U = m.FUr.size(0);
  const at::Tensor rows = x.reshape({BH, s.W, c});
  at::Tensor Xw;  // x's DFT along W at the kept columns, [re | im] per (b, h)
  if (x.scalar_type() == s.acc) {
    Xw = at::bmm(m.Fw.expand({BH, 2 * ncol, s.W}), rows);  // expanded, not copied as matmul would
  } else {
    Xw = at::empty({BH, 2 * ncol, c}, m.Fw.options());
    over_row_slices(BH, [&](int64_t r0, int64_t n) {
      at::Tensor slice = Xw.narrow(0, r0, n);
      at::bmm_out(slice, m.Fw.expand({n, 2 * ncol, s.W}), rows.narrow(0, r0, n).to(s.acc));
    });
  }
  at::Tensor Z = at::empty({s.B, U, 2, ncol, c}, Xw.options());
  complex_product_into(Z.view({s.B, U, 2 * cols}), m.FUr, m.FUi, Xw.view({s.B, s.H, 2 * cols}));
  return Z;
}

// Y = G_U Z: (B H, 2 ncol, c), and the matrices for the last product.
std::pair<at::Tensor, DftMatrices> synthesis_rows_dft(const at::Tensor& Z, const Layout& s) {
  const int64_t U = Z.size(1), ncol = Z.size(3), c = Z.size(4), cols = ncol * c;
  DftMatrices m = cached_dft_matrices(s, Z.options());
  at::Tensor Y = at::empty({s.B * s.H, 2 * ncol, c}, Z.options());
  complex_product_into(Y.view({s.B, s.H, 2 * cols}), m.GUr, m.GUi, Z.reshape({s.B, U, 2 * cols}));
  return {Y, std::move(m)};
}

void synthesis_add_dft(const at::Tensor& out, const at::Tensor& Z, const Layout& s) {
  TORCH_CHECK(out.is_contiguous(), "fem_synthesis_add: out must be contiguous");
  const int64_t c = Z.size(4), BH = s.B * s.H;
  const auto [Y, m] = synthesis_rows_dft(Z, s);
  out.view({BH, s.W, c}).baddbmm_(m.Gw.expand({BH, s.W, Y.size(1)}), Y);  // accumulates in place
}

// ---- the ATen FFT form

at::Tensor coefficients_fft(const at::Tensor& x, const Layout& s) {
  const int64_t c = x.size(2), ncol = kept_columns(s), n = s.H / 4;
  const at::Tensor xs = as_dtype(x, s.acc).reshape({s.B, s.H, s.W, c});
  // Pruned: only the ncol kept columns go through the FFT along H.
  const at::Tensor X = at::fft_fft(at::fft_rfft(xs, std::nullopt, 2).narrow(2, 0, ncol), std::nullopt, 1);
  const at::Tensor kept = s.corner ? X.narrow(1, 0, n)
                                   : at::cat({X.narrow(1, 0, (n + 1) / 2), X.narrow(1, s.H - n / 2, n / 2)}, 1);
  return at::view_as_real(kept).permute({0, 1, 4, 2, 3}).contiguous();  // [re ; im] in one pass
}

// G(Z): (B, L, c) in the accumulation dtype.
at::Tensor synthesis_fft(const at::Tensor& Z, const Layout& s) {
  const int64_t U = Z.size(1), c = Z.size(4), n = s.H / 4;
  const at::Tensor kept = at::complex(Z.select(2, 0), Z.select(2, 1));  // (B, U, ncol, c)
  at::Tensor Y;
  if (s.corner) {
    Y = at::fft_ifft(kept, s.H, 1);  // the kept rows u < n, zero-padded to H
  } else {  // rows u < ceil(n/2), then u >= H - floor(n/2), in place in a zero spectrum
    at::Tensor full = at::zeros({s.B, s.H, kept.size(2), c}, kept.options());
    full.narrow(1, 0, (n + 1) / 2).copy_(kept.narrow(1, 0, (n + 1) / 2));
    if (n / 2 > 0) full.narrow(1, s.H - n / 2, n / 2).copy_(kept.narrow(1, (n + 1) / 2, U - (n + 1) / 2));
    Y = at::fft_ifft(full, std::nullopt, 1);
  }
  return at::fft_irfft(Y, s.W, 2).reshape({s.B, s.L, c});  // zero-pads the ncol columns to W / 2 + 1
}

}  // namespace

bool lowpass_uses_fft(const c10::Device& device) {
  const char* value = std::getenv("GMAMBA_GSSM_LOWPASS");
  const std::string form = value ? value : "";
  if (form.empty() || form == "auto") return !device.is_cpu();
  TORCH_CHECK_VALUE(form == "fft" || form == "dft", "GMAMBA_GSSM_LOWPASS must be 'auto', 'fft' or 'dft', got '",
                    form, "'");
  return form == "fft";
}

at::Tensor fem_coefficients(const at::Tensor& x, const Layout& s) {
  check_tokens_for_lowpass(x, s, "fem_coefficients");
  if (s.B == 0) {  // pocketfft / MKL reject empty batches
    return at::zeros({0, kept_row_count(s), 2, kept_columns(s), x.size(2)},
                     x.options().dtype(s.acc));
  }
  return s.lowpass_fft ? coefficients_fft(x, s) : coefficients_dft(x, s);
}

void fem_synthesis_add(const at::Tensor& out, const at::Tensor& Z, const Layout& s) {
  check_tokens_for_lowpass(out, s, "fem_synthesis_add");
  TORCH_CHECK(out.scalar_type() == Z.scalar_type(), "fem_synthesis_add: out must have the coefficients' dtype");
  TORCH_CHECK(!s.lowpass_fft, "fem_synthesis_add: only the DFT form accumulates (Layout::product_on_coefficients)");
  if (s.B == 0) return;
  synthesis_add_dft(out, Z, s);
}

at::Tensor fem_coefficient_mix(const at::Tensor& Z, const at::Tensor& M) {
  const at::Tensor m = as_dtype(M, Z.scalar_type());
  std::vector<int64_t> shape = Z.sizes().vec();
  shape.back() = m.size(1);
  return at::mm(Z.reshape({-1, Z.size(-1)}), m).view(shape);
}

at::Tensor fem_coefficient_pairing(const at::Tensor& A, const at::Tensor& Z, const Layout& s) {
  const int64_t ncol = A.size(3);
  const at::Tensor D =
      (column_weights(ncol, A.device()) / static_cast<double>(s.H * s.W)).to(A.scalar_type()).unsqueeze(1);
  return at::mm((A * D).reshape({-1, A.size(-1)}).t(), Z.reshape({-1, Z.size(-1)}));
}

at::Tensor fem_synthesis(const at::Tensor& Z, const Layout& s) {
  const int64_t c = Z.size(4);
  if (s.B == 0) return at::zeros({0, s.L, c}, Z.options().dtype(s.dt));
  if (s.lowpass_fft) return as_dtype(synthesis_fft(Z, s), s.dt).contiguous();
  const auto [Y, m] = synthesis_rows_dft(Z, s);
  return as_dtype(at::bmm(m.Gw.expand({s.B * s.H, s.W, Y.size(1)}), Y).view({s.B, s.L, c}), s.dt);
}

at::Tensor fem_low(const at::Tensor& x, const Layout& s) {
  if (!s.has_low) return {};
  return fem_synthesis(fem_coefficients(x, s), s);
}

}  // namespace gmamba::fused
