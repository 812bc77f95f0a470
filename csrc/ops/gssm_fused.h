#pragma once
// The whole GSSM mixer as composite ops: gssm_fwd, and the backward written by hand as gssm_bwd_scan then
// gssm_bwd_front, orchestrated in C++ over ATen's GEMMs and FFTs and the package's ops (conv_silu, fgmm,
// selective_scan). Why: on a GPU at DESIGN's sizes the Python composition was host-bound (profile_gssm,
// runs 8-10: ~80 ops per forward and ~265 per forward + backward at 20-40 us of Python, autograd and
// dispatch each, against 0.55 ms of device work at C = 768). From C++ the autograd graph is one node and
// each op costs the dispatcher and the launch (still ~20 us per ATen CUDA op on the H200's host, runs
// 11-13: the calls stay host-bound, 1.2x-2x faster). The backward frees what it has consumed and
// recomputes the cheap rest (x1, z1, delta, on CUDA relu(pre)). The algebra is gmamba_ext/gssm.py's
// (folded fusion layer, pruned FFT low-pass, one GEMM for the gate's and FGMM's first layers); that Python
// composition stays as the torch.compile / functorch path.
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace gmamba::fused {

// Parameters in the order of gssm_reference.expected_shapes: these, then kPerDirection per scan direction,
// then out_proj.weight.
enum Param : int {
  kInProj, kConvXW, kConvXB, kConvZW, kConvZB,
  kLowW, kHighW, kLowProjW, kLowProjB, kHighProjW, kHighProjB, kFuse0W, kFuse0B, kFuse2W, kFuse2B,
  kGate0W, kGate0B, kGate2W, kGate2B, kFconv0W, kFconv0B, kFconv2W, kFconv2B,
  kAdapt1W, kAdapt1B, kAdapt3W, kAdapt3B, kRatio, kNumShared
};
enum ScanRole : int { kXProj, kDtW, kDtB, kALog, kD, kPerDirection };

// What the forward saves for the backward, in two lists (an empty tensor where the variant has none):
// `front` for the stages before the scan (kXz, in_proj's output, only with Layout::keep_conv: otherwise the
// backward recomputes it from x; kLowCoeffs, the low-pass coefficients F(x1) (not low: fem_coefficients), and
// the folded weights kPx, kPl, kC0 only with the fusion layer; kRelu, relu(pre), only with it and
// Layout::keep_relu; kX1 only with Layout::keep_conv and a
// frequency stage; FGMM's conv output c is recomputed from kHid, one small GEMM, rather than held through the
// scan's backward), `scan` for the scans and out_proj (kScanSaved, then kSavedPerDirection per direction;
// kZ1 only with Layout::keep_conv). No two alias each other. The backward runs
// in two ops, scan part first, so that the caller can drop `scan` before the front part runs.
enum FrontSaved : int {
  kXz, kLowCoeffs, kFm, kHid, kGateLogit, kPoolS, kMixA, kGateG, kRelu, kPx, kPl, kC0, kX1, kNumFront
};
enum ScanSaved : int { kX2, kY, kZ1, kScanSaved };
enum SavedPerDirection : int { kXdbl, kCheckpoints, kSavedPerDirection };

// Sizes and options of one call, checked against the parameter list.
struct Layout {
  int64_t B, H, W, L, C, d, E4, d4, R, N, K, ndir;
  bool fem;       // a frequency stage at all (variant != "ssm")
  bool fusion;    // FEM's fusion MLP ("full", "fem_ssm")
  bool fgmm;      // FGMM and the global gate ("full", "dft_fgmm_ssm")
  bool has_low;   // the low-pass mask keeps something (H >= 4 and W // 2 + 1 >= 4)
  bool corner;    // mask "corner" (else "symmetric")
  bool single_dt_bias;
  // Keep relu(pre) from the forward rather than recompute it (two GEMMs) in the backward: by default on the
  // CPU, where the GEMMs are most of the time (about 10 % of a forward + backward at C = 768) and no memory
  // target applies; CUDA recomputes it (2 B L d values less at the peak: the <= 0.5x memory target).
  bool keep_relu;
  // Keep xz (in_proj's output), x1 and z1 (conv + SiLU's outputs) from the forward rather than recompute
  // them in the backward ops (three in_proj GEMMs and two conv_silu passes): by default on the CPU, for the
  // same reason; CUDA recomputes them (the memory target: 4 u fewer held).
  // Both false from describe(); the saving forward sets them from keeps_intermediates, the backward ops from
  // what the forward saved.
  bool keep_conv;
  // The backward ops may free saved tensors once read (their `consume` argument): see release().
  bool consume;
  bool lowpass_fft;  // FEM's low-pass as ATen FFTs rather than DFT matrices (lowpass_uses_fft)
  // The fusion layer's low-pass product on the Fourier coefficients rather than on a low formed from them:
  // the DFT form in float32 / float64 (fem_lowpass.cpp).
  bool product_on_coefficients;
  at::ScalarType dt, acc;  // compute dtype (x's) and accumulation dtype

  int scan_index(int64_t k, ScanRole role) const { return kNumShared + kPerDirection * static_cast<int>(k) + role; }
  int out_proj_index() const { return kNumShared + kPerDirection * static_cast<int>(ndir); }
};

// Whether the forward keeps relu(pre), xz, x1 and z1 for the backward (Layout::keep_relu, keep_conv) on
// `device`: GMAMBA_GSSM_SAVE=auto (or unset: on the CPU only), keep, or recompute; read per forward call.
bool keeps_intermediates(const c10::Device& device);

// B: batch; dt: the compute dtype; the direction count follows from the parameter list's length.
Layout describe(int64_t B, at::ScalarType dt, const c10::Device& device, at::TensorList params, int64_t H,
                int64_t W, c10::string_view variant, c10::string_view mask, bool single_dt_bias);

// x must be (B, H, W, C) for the Layout.
void check_tokens(const at::Tensor& x, const Layout& s, const char* name);

// t in dtype, without a dispatcher round trip when it already is (Tensor::to always makes one: ~120 per
// forward + backward here, each costing host time on a launch-bound GPU call).
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// A (rows, cols) matrix whose rows start 16-byte aligned (row stride rounded up to 4 elements): cuBLAS
// picks its slow unaligned kernels for operands with an odd leading dimension (run 11: the x_proj output,
// R + 2N = 22 columns at C = 96, sent six GEMMs to cutlass "align1" SIMT kernels, ~0.5 ms per forward +
// backward). The padding columns are never read.
inline at::Tensor aligned_rows(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  return at::empty({rows, (cols + 3) / 4 * 4}, options).narrow(1, 0, cols);
}

// Skinny GEMMs over the B L token rows whose operands have a side of 6-12 columns (dt_proj, FGMM's second
// layer), in the orientation that is faster on the CPU: oneDNN took 2-7x longer for these as written below
// than transposed (B L = 32768, 2 threads: (48, 6) weight gradient 2.0-2.5 -> 0.33-0.39 ms, (B L, 6)
// product into dxdbl's columns 2.1 -> 0.4-0.65 ms, (48, 12) weight gradient 0.8-0.9 -> 0.5-0.6 ms). CUDA
// keeps the plain form (not measured there).
// dY^T X, a layer's weight gradient from its output gradient dY (rows, n) and input X (rows, k).
inline at::Tensor skinny_weight_grad(const at::Tensor& dY, const at::Tensor& X) {
  return dY.is_cpu() ? at::mm(X.t(), dY).t().contiguous() : at::mm(dY.t(), X);
}
// out = X W for X (rows, k) and a small W (k, n), out a (rows, n) view with row stride >= n.
inline void skinny_product_into(at::Tensor out, const at::Tensor& X, const at::Tensor& W) {
  if (X.is_cpu()) {
    out.copy_(at::mm(W.t(), X.t()).t());
  } else {
    at::mm_out(out, X, W);
  }
}

// Parameters as the computation uses them.
struct Weights {
  at::TensorList p;
  const Layout& s;
  at::Tensor operator()(int i) const { return as_dtype(p[i], s.dt); }         // GEMM operands: compute dtype
  at::Tensor acc(int i) const { return as_dtype(p[i], s.acc).contiguous(); }  // kernel weights: accumulation
};

// FEM's low-pass (fem_lowpass.cpp). low = irfft2(M rfft2(x)) = G(F(x)) per channel of x (B, L, c): F gives
// the mask's kept Fourier coefficients, (B, U, 2, ncol, c) in the accumulation dtype (rows u, [re ; im],
// columns v < ncol: about L / 16 values per channel), G makes tokens of them. The backward of the fusion
// layer keeps the coefficients of x1 instead of low. Layout::lowpass_fft picks the form: ATen's FFTs
// (cuFFT; CUDA's default) or pruned DFT matrices and GEMMs (the CPU's). Channel products commute with F and
// G, so with Layout::product_on_coefficients (the DFT form in float32 / float64) the fusion layer applies
// Pl to the coefficients (fem_coefficient_mix) instead of to B L token rows: three (B L, d) x (d, 2d) GEMMs
// per forward + backward become transforms of 2d channels. Otherwise the GEMMs stay, on a low formed from
// the coefficients where needed: in the FFT form each transform is several launches of a host-bound call
// while a GEMM is one (not yet measured on a GPU either way); with half-precision tokens the transforms run
// in float32 while the GEMMs run in the half type (on the CPU the coefficient product made the bf16 forward
// 15 % slower at C = 96, H = 128).
// Whether the low-pass runs as ATen FFTs on `device`: GMAMBA_GSSM_LOWPASS=auto (or unset: off the CPU),
// fft, or dft; read per call.
bool lowpass_uses_fft(const c10::Device& device);
// F(x): the kept coefficients of tokens x (B, L, c), any c.
at::Tensor fem_coefficients(const at::Tensor& x, const Layout& s);
// G(Z): tokens (B, L, c) in the compute dtype.
at::Tensor fem_synthesis(const at::Tensor& Z, const Layout& s);
// out (B, L, c) += G(Z), in place; out has Z's dtype (the accumulation dtype). The DFT form only (what
// Layout::product_on_coefficients uses).
void fem_synthesis_add(const at::Tensor& out, const at::Tensor& Z, const Layout& s);
// The channel product Z M for M (c, c'): coefficients with c' channels.
at::Tensor fem_coefficient_mix(const at::Tensor& Z, const at::Tensor& M);
// <t_i, G(Z_j)> over all tokens for channels i of t and j of Z, from A = F(t): sum_k D_k A_ki Z_kj, (c_A, c_Z)
// in the accumulation dtype (D: G's transpose is D F, fem_lowpass.cpp). The fusion layer's dPl = dpre^T low.
at::Tensor fem_coefficient_pairing(const at::Tensor& A, const at::Tensor& Z, const Layout& s);
// low = G(F(x)) in x's dtype; undefined when the mask is empty. The map is self-adjoint, so the backward of
// dft_fgmm_ssm (Fm = low), and of the fusion layer without product_on_coefficients, applies it to dlow.
at::Tensor fem_low(const at::Tensor& x, const Layout& s);

// Tokens (B, L, d) in raster order into direction k's scan order (0 raster, 1 reversed, 2 column-major,
// 3 reversed column-major), and back; contiguous results.
at::Tensor to_direction(const at::Tensor& u, int64_t k, const Layout& s);
at::Tensor from_direction(const at::Tensor& u, int64_t k, const Layout& s);


// The conv weights of both halves as conv_silu takes them: (2d, K) and (2d,) in the accumulation dtype.
std::pair<at::Tensor, at::Tensor> conv_weights(const Weights& w);

// FGMM's small weights as fgmm_fwd / fgmm_bwd take them: w1 (d/4, d), b1, w2 (2, d/4), b2, ratio ().
std::vector<at::Tensor> fgmm_weights(const Weights& w);

// in_proj: xz = x W_in^T, (B, L, 2d), from x (B, H, W, C). The backward recomputes it from x where the forward
// did not keep xz (Layout::keep_conv false).
at::Tensor in_proj(const at::Tensor& x, const Weights& w);

// FGMM's conv output c = hid_c Wc2^T + bc2 (B, L, d) from the stacked gate / FGMM hidden layer hid (B L, E/4 +
// d/4). The forward does not save c: the backward recomputes it here, bitwise as the forward made it.
at::Tensor fgmm_conv(const Weights& w, const at::Tensor& hid);

// Direction k's scan operands, from its x_proj output xdbl (B L, R + 2N).
struct ScanOperands {
  at::Tensor dt_in, delta, A, B, C, D, bias;
  std::optional<at::Tensor> initial_state;
};
ScanOperands scan_operands(const Weights& w, int64_t k, const at::Tensor& xdbl,
                           const c10::List<std::optional<at::Tensor>>& states);

// The package's ops through the dispatcher (their CPU or CUDA kernel).
std::tuple<at::Tensor, at::Tensor> call_conv_silu_fwd(const at::Tensor& xz, const at::Tensor& w, const at::Tensor& b);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_conv_silu_bwd(const at::Tensor& dx1, const at::Tensor& dz1,
                                                                  const at::Tensor& xz, const at::Tensor& w,
                                                                  const at::Tensor& b);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_fgmm_fwd(const at::Tensor& x1, const at::Tensor& f,
                                                                         const at::Tensor& c, const at::Tensor& gl,
                                                                         const std::vector<at::Tensor>& small);
std::vector<at::Tensor> call_fgmm_bwd(const at::Tensor& dx2, const at::Tensor& x1, const at::Tensor& f,
                                      const at::Tensor& c, const at::Tensor& gl, const at::Tensor& s,
                                      const at::Tensor& a, const at::Tensor& g, const std::vector<at::Tensor>& small);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_scan_fwd(const at::Tensor& u, const ScanOperands& o);
std::vector<at::Tensor> call_scan_bwd(const at::Tensor& dout, const at::Tensor& checkpoints, const at::Tensor& u,
                                      const ScanOperands& o);

// Placeholder for an absent tensor in a Tensor[] (the Python side maps it to None). No saved tensor or
// gradient is 1-D and empty, so is_absent tells them apart.
inline at::Tensor absent(const at::Tensor& like) { return at::empty({0}, like.options()); }
inline bool is_absent(const at::Tensor& t) { return t.dim() == 1 && t.numel() == 0; }

// A backward op's last read of a saved tensor: with Layout::consume its memory is freed now rather than when
// the caller drops its list after the op (the tensor object, shared with that list, becomes empty; a view
// taken of it keeps the memory until the view goes). Afterwards the tensor reads as absent.
inline void release(const at::Tensor& saved, const Layout& s) {
  if (s.consume && saved.defined()) saved.set_();
}

// Gradients [first, last) in their parameters' shapes and dtypes, `absent` where undefined.
std::vector<at::Tensor> finish_grads(const std::vector<at::Tensor>& g, at::TensorList params, size_t first,
                                     size_t last, const at::Tensor& like);

}  // namespace gmamba::fused
