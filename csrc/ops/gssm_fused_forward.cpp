// gssm_fwd: the GSSM mixer's forward (gmamba_ext/gssm.py's algebra) in one op, and what its backward needs.
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "gssm_fused.h"

namespace gmamba::fused {
namespace {

// The folded fusion layer: [x1, lf, hf] W_f1^T + b_f1 = x1 Px^T + low Pl^T + c0 (gssm.py's docstring). The
// forward saves Px, Pl, c0 for the backward.
struct Fusion {
  at::Tensor Px, Pl, c0;
};

Fusion fusion_weights(const Weights& w) {
  const int64_t d = w.s.d;
  const at::Tensor W1 = w(kFuse0W);
  const at::Tensor W1a = W1.narrow(1, 0, d), W1b = W1.narrow(1, d, d), W1c = W1.narrow(1, 2 * d, d);
  const at::Tensor sl = at::sigmoid(w(kLowW)), sh = at::sigmoid(w(kHighW));
  // addcmul (a + s t in one op) where sums of scaled products were two or three: 11 ATen calls, not 14.
  const at::Tensor hp = at::mm(W1c, w(kHighProjW));  // before the factor sh
  Fusion f;
  f.Px = at::addcmul(W1a, sh, hp);
  f.Pl = at::addcmul(sl * at::mm(W1b, w(kLowProjW)), sh, hp, -1);
  f.c0 = at::addcmul(at::addcmul(w(kFuse0B), sl, at::mv(W1b, w(kLowProjB))), sh, at::mv(W1c, w(kHighProjB)));
  return f;
}

struct Frequency {  // FEM and FGMM outputs, and what the backward keeps of them
  at::Tensor x2, low_coeffs, Fm, hid, gate_logit, pool_s, mix_a, gate_g, relu;
  Fusion folded;  // the fusion layer's folded weights (small: (2d, d) and (2d,))
};

// Without `save` (no backward to serve) each intermediate is dropped once read: the forward's peak is then
// about 6 (B, L, d) tensors instead of every intermediate at once.
Frequency frequency_stages(const Weights& w, const at::Tensor& x1, bool save) {
  const Layout& s = w.s;
  const int64_t BL = s.B * s.L, d = s.d;
  Frequency f;
  if (!s.fem) {
    f.x2 = x1;
    return f;
  }
  if (s.fusion) {
    // pre = x1 Px^T + low Pl^T + c0 with low = G(Z), Z = F(x1) the kept coefficients (what the backward
    // keeps): low Pl^T as G(Z Pl^T), or a GEMM on low formed before pre (gssm_fused.h)
    f.folded = fusion_weights(w);
    const Fusion& fw = f.folded;
    at::Tensor low;
    if (s.has_low) {
      f.low_coeffs = fem_coefficients(x1, s);
      if (!s.product_on_coefficients) low = fem_synthesis(f.low_coeffs, s);
    }
    at::Tensor pre = at::addmm(fw.c0, x1.view({BL, d}), fw.Px.t());
    if (low.defined()) {
      pre.addmm_(low.view({BL, d}), fw.Pl.t());
      low.reset();
    } else if (s.has_low) {
      fem_synthesis_add(pre.view({s.B, s.L, 2 * d}), fem_coefficient_mix(f.low_coeffs, fw.Pl.t()), s);
    }
    if (!save) f.low_coeffs.reset();
    f.Fm = at::addmm(w(kFuse2B), pre.relu_(), w(kFuse2W).t()).view({s.B, s.L, d});
    if (s.keep_relu) f.relu = pre;
  } else {
    f.Fm = s.has_low ? fem_low(x1, s) : at::zeros_like(x1);
  }
  if (!s.fgmm) {
    f.x2 = x1 + f.Fm;
    return f;
  }
  // The global gate's and FGMM's first layers both read Fm: one GEMM with the two weights stacked.
  const at::Tensor w_first = at::cat({w(kGate0W), w(kFconv0W).reshape({s.d4, d})});
  f.hid = at::addmm(at::cat({w(kGate0B), w(kFconv0B)}), f.Fm.view({BL, d}), w_first.t()).relu_();
  f.gate_logit = at::addmm(w(kGate2B), f.hid.narrow(1, 0, s.E4), w(kGate2W).t()).view({s.B, s.L});
  std::tie(f.x2, f.pool_s, f.mix_a, f.gate_g) =
      call_fgmm_fwd(x1, f.Fm, fgmm_conv(w, f.hid), f.gate_logit, fgmm_weights(w));
  return f;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gssm_forward(
    const at::Tensor& x, at::TensorList params, const c10::List<std::optional<at::Tensor>>& states, int64_t H,
    int64_t W, c10::string_view variant, c10::string_view mask, bool single_dt_bias, bool save) {
  // Every dtype here is chosen explicitly (the Python wrapper resolves autocast before the call).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::AutoDispatchBelowADInplaceOrView no_autograd;  // the inner ops' autograd kernels are Python: skip them
  TORCH_CHECK_VALUE(x.dim() == 4, "gssm: x must be (B, H, W, C), got shape ", x.sizes());
  Layout s = describe(x.size(0), x.scalar_type(), x.device(), params, H, W, variant, mask, single_dt_bias);
  if (save) {  // GMAMBA_GSSM_SAVE is read only when there is a backward to serve
    s.keep_conv = keeps_intermediates(x.device());
    s.keep_relu = s.fusion && s.keep_conv;
  }
  check_tokens(x, s, "x");
  TORCH_CHECK_VALUE(static_cast<int64_t>(states.size()) == s.ndir, "gssm: expected ", s.ndir,
                    " initial states (one per scan direction, None allowed), got ", states.size());
  const Weights w{params, s};
  const int64_t BL = s.B * s.L, d = s.d;

  // 1-2. in_proj, then conv + SiLU of both halves in one pass
  at::Tensor xz = in_proj(x, w);
  const auto [conv_w, conv_b] = conv_weights(w);
  auto [x1, z1] = call_conv_silu_fwd(xz, conv_w, conv_b);
  if (!(save && s.keep_conv)) xz.reset();  // otherwise the backward recomputes it from x

  // 3-6. FEM, FGMM and the global gate (x1 is kept only for a backward that does not recompute it)
  Frequency f = frequency_stages(w, x1, save);
  if (!save) {
    Frequency x2_only;
    x2_only.x2 = f.x2;
    f = x2_only;
  }
  if (!(save && s.keep_conv && s.fem)) x1.reset();

  // 7. the selective scan per direction (channels last; softplus and delta_bias folded into the kernel)
  at::Tensor y;
  std::vector<at::Tensor> per_direction;
  for (int64_t k = 0; k < s.ndir; ++k) {
    const at::Tensor u = to_direction(f.x2, k, s);
    at::Tensor xdbl = aligned_rows(BL, s.R + 2 * s.N, u.options());
    at::mm_out(xdbl, u.view({BL, d}), w(s.scan_index(k, kXProj)).t());
    const ScanOperands o = scan_operands(w, k, xdbl, states);
    const auto [out_k, last_state, checkpoints] = call_scan_fwd(u, o);
    const at::Tensor yk = from_direction(out_k, k, s);
    y = y.defined() ? y.add_(yk) : yk;
    if (save) {
      per_direction.push_back(xdbl);
      per_direction.push_back(checkpoints);
    }
  }
  if (!save) f.x2.reset();

  // 8. out_proj on [y | z1] without concatenating
  const at::Tensor w_out = w(s.out_proj_index());
  at::Tensor out = at::mm(y.view({BL, d}), w_out.narrow(1, 0, d).t());
  out.addmm_(z1.view({BL, d}), w_out.narrow(1, d, d).t());
  out = out.view({s.B, s.L, s.C});

  std::vector<at::Tensor> front, scan;
  if (!save) return {out, front, scan};
  const auto keep = [&](std::vector<at::Tensor>& list, const at::Tensor& t) {
    list.push_back(t.defined() ? t : absent(x));
  };
  // The low-pass coefficients only where the backward reads them (the fusion layer); in dft_fgmm_ssm low is
  // Fm itself.
  // x1 only with a frequency stage: without one x2 is x1, saved in `scan`, and the front's backward does
  // not read x1.
  for (const at::Tensor& t : {xz, f.low_coeffs, f.Fm, f.hid, f.gate_logit, f.pool_s,
                              f.mix_a, f.gate_g, f.relu, f.folded.Px, f.folded.Pl, f.folded.c0,
                              s.keep_conv && s.fem ? x1 : at::Tensor()})
    keep(front, t);
  for (const at::Tensor& t : {f.x2, y, s.keep_conv ? z1 : at::Tensor()}) keep(scan, t);
  for (const at::Tensor& t : per_direction) keep(scan, t);
  return {out, front, scan};
}

}  // namespace
}  // namespace gmamba::fused

TORCH_LIBRARY_IMPL(gmamba_ext, CompositeExplicitAutograd, m) {
  m.impl("gssm_fwd", &gmamba::fused::gssm_forward);
}
