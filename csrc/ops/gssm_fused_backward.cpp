// gssm_bwd: the gradient of gssm_fwd for x, every parameter and the initial scan states, written out stage
// by stage in reverse (each step's formula beside it). x1 and z1 are recomputed by one conv_silu pass and
// each direction's delta by one GEMM instead of being saved.
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "gssm_fused.h"

namespace gmamba::fused {
namespace {

// The gradients of the folded fusion layer's inputs, from those of Px, Pl (undefined: no low-pass) and c0:
// Px = W1a + sh W1c Whp,  Pl = sl W1b Wlp - sh W1c Whp,  c0 = b1 + sl W1b blp + sh W1c bhp.
void fusion_weights_backward(const Weights& w, const at::Tensor& dPx, const at::Tensor& dPl, const at::Tensor& dc0,
                             std::vector<at::Tensor>& g) {
  const int64_t d = w.s.d;
  const at::Tensor W1 = w(kFuse0W);
  const at::Tensor W1b = W1.narrow(1, d, d), W1c = W1.narrow(1, 2 * d, d);
  const at::Tensor sl = at::sigmoid(w(kLowW)), sh = at::sigmoid(w(kHighW));
  const at::Tensor Whp = w(kHighProjW), Wlp = w(kLowProjW), bhp = w(kHighProjB), blp = w(kLowProjB);
  const at::Tensor dH = dPl.defined() ? dPx - dPl : dPx;  // gradient of W1c Whp, before the factor sh
  const at::Tensor dMh = sh * dH;
  const at::Tensor W1c_bhp = at::mv(W1c, bhp), W1b_blp = at::mv(W1b, blp);
  at::Tensor dW1b = sl * at::outer(dc0, blp);
  at::Tensor dsl = at::dot(dc0, W1b_blp);
  if (dPl.defined()) {
    const at::Tensor dMl = sl * dPl;
    dW1b = dW1b + at::mm(dMl, Wlp.t());
    g[kLowProjW] = at::mm(W1b.t(), dMl);
    dsl = dsl + (dPl * at::mm(W1b, Wlp)).sum();
  } else {
    g[kLowProjW] = at::zeros_like(Wlp);
  }
  const at::Tensor dsh = (dH * at::mm(W1c, Whp)).sum() + at::dot(dc0, W1c_bhp);
  g[kFuse0W] = at::cat({dPx, dW1b, at::mm(dMh, Whp.t()) + sh * at::outer(dc0, bhp)}, 1);
  g[kFuse0B] = dc0;
  g[kHighProjW] = at::mm(W1c.t(), dMh);
  g[kLowProjB] = sl * at::mv(W1b.t(), dc0);
  g[kHighProjB] = sh * at::mv(W1c.t(), dc0);
  g[kLowW] = dsl * sl * (1 - sl);
  g[kHighW] = dsh * sh * (1 - sh);
}

// dx1 from dx2 through FGMM / the gate / FEM (the forward's frequency_stages in reverse).
at::Tensor frequency_backward(const Weights& w, at::TensorList saved, const at::Tensor& x1, const at::Tensor& dx2,
                              std::vector<at::Tensor>& g) {
  const Layout& s = w.s;
  const int64_t BL = s.B * s.L, d = s.d;
  if (!s.fem) return dx2;
  const at::Tensor Fm = saved[kFm].view({BL, d});
  at::Tensor dx1, dFm;
  if (s.fgmm) {
    const std::vector<at::Tensor> small = fgmm_weights(w);
    std::vector<at::Tensor> r = call_fgmm_bwd(dx2, x1, saved[kFm], saved[kFc], saved[kGateLogit], saved[kPoolS],
                                              saved[kMixA], saved[kGateG], small);
    dx1 = r[0];
    const at::Tensor dc = r[2].view({BL, d}), dgl = r[3].view({BL, 1});
    for (int i = 0; i < 5; ++i) g[kAdapt1W + i] = r[4 + i];
    // gate_logit = hid_g Wg2^T + bg2,  c = hid_c Wc2^T + bc2,  hid = relu(Fm [Wg1; Wc1]^T + [bg1; bc1])
    const at::Tensor hid = saved[kHid];
    const at::Tensor w_conv2 = w(kFconv2W).reshape({d, s.d4});
    g[kGate2W] = at::mm(dgl.t(), hid.narrow(1, 0, s.E4));
    g[kGate2B] = dgl.sum(0);
    g[kFconv2W] = at::mm(dc.t(), hid.narrow(1, s.E4, s.d4));
    g[kFconv2B] = dc.sum(0);
    const at::Tensor dhid =
        at::threshold_backward(at::cat({at::mm(dgl, w(kGate2W)), at::mm(dc, w_conv2)}, 1), hid, 0);
    const at::Tensor dw_first = at::mm(dhid.t(), Fm), db_first = dhid.sum(0);
    g[kGate0W] = dw_first.narrow(0, 0, s.E4).clone();
    g[kFconv0W] = dw_first.narrow(0, s.E4, s.d4).clone();
    g[kGate0B] = db_first.narrow(0, 0, s.E4).clone();
    g[kFconv0B] = db_first.narrow(0, s.E4, s.d4).clone();
    const at::Tensor w_first = at::cat({w(kGate0W), w(kFconv0W).reshape({s.d4, d})});
    dFm = r[1].view({BL, d}).addmm_(dhid, w_first);
  } else {  // fem_ssm: x2 = x1 + Fm
    dx1 = dx2.clone();
    dFm = dx2.view({BL, d});
  }
  const at::Tensor x1f = x1.view({BL, d});
  if (s.fusion) {
    // Fm = relu(pre) W2^T + b2,  pre = x1 Px^T + low Pl^T + c0
    const at::Tensor relu = saved[kRelu];
    g[kFuse2W] = at::mm(dFm.t(), relu);
    g[kFuse2B] = dFm.sum(0);
    const at::Tensor dpre = at::threshold_backward(at::mm(dFm, w(kFuse2W)), relu, 0);
    const Fusion fw = fusion_weights(w);
    at::Tensor dPl;
    dx1.view({BL, d}).addmm_(dpre, fw.Px);
    if (s.has_low) {
      dPl = at::mm(dpre.t(), saved[kLow].view({BL, d}));
      dx1.add_(fem_low(at::mm(dpre, fw.Pl).view({s.B, s.L, d}), s));  // the low-pass map is self-adjoint
    }
    fusion_weights_backward(w, at::mm(dpre.t(), x1f), dPl, dpre.sum(0), g);
  } else if (s.has_low) {  // dft_fgmm_ssm: Fm = low
    dx1.add_(fem_low(dFm.view({s.B, s.L, d}), s));
  }
  return dx1;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gssm_backward(
    const at::Tensor& dout, const at::Tensor& x, at::TensorList params,
    const c10::List<std::optional<at::Tensor>>& states, at::TensorList saved, int64_t H, int64_t W,
    c10::string_view variant, c10::string_view mask, bool single_dt_bias) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::AutoDispatchBelowADInplaceOrView no_autograd;  // the inner ops' autograd kernels are Python: skip them
  const Layout s = describe(x, params, states.size(), H, W, variant, mask, single_dt_bias);
  TORCH_CHECK_VALUE(static_cast<int64_t>(saved.size()) == kNumSaved + kSavedPerDirection * s.ndir,
                    "gssm_bwd: 'saved' must be what gssm_fwd returned with save=True");
  const Weights w{params, s};
  const int64_t BL = s.B * s.L, d = s.d;
  std::vector<at::Tensor> g(params.size());
  const at::Tensor go = dout.reshape({BL, s.C}).to(s.dt);

  // Recompute x1, z1 (one memory-bound pass) rather than keeping them from the forward.
  const at::Tensor xz = saved[kXz];
  const auto [conv_w, conv_b] = conv_weights(w);
  const auto [x1, z1] = call_conv_silu_fwd(xz, conv_w, conv_b);

  // 8. out = y Wy^T + z1 Wz^T
  const int out_i = s.out_proj_index();
  const at::Tensor w_out = w(out_i);
  g[out_i] = at::cat({at::mm(go.t(), saved[kY].view({BL, d})), at::mm(go.t(), z1.view({BL, d}))}, 1);
  const at::Tensor dy = at::mm(go, w_out.narrow(1, 0, d)).view({s.B, s.L, d});
  const at::Tensor dz1 = at::mm(go, w_out.narrow(1, d, d)).view({s.B, s.L, d});

  // 7. the scans: u = dir_k(x2), xdbl = u Wx^T = [dt_in | B | C], delta = dt_in Wdt^T (+ dt_b)
  const at::Tensor x2 = saved[kX2];
  at::Tensor dx2;
  std::vector<at::Tensor> dstates;
  for (int64_t k = 0; k < s.ndir; ++k) {
    const at::Tensor u = to_direction(x2, k, s);
    const at::Tensor xdbl = saved[kNumSaved + kSavedPerDirection * k + kXdbl];
    const ScanOperands o = scan_operands(w, k, xdbl, states);
    const std::vector<at::Tensor> r =
        call_scan_bwd(to_direction(dy, k, s), saved[kNumSaved + kSavedPerDirection * k + kCheckpoints], u, o);
    const at::Tensor ddelta = r[1].view({BL, d});
    g[s.scan_index(k, kALog)] = r[2] * o.A;  // A = -exp(A_log)
    g[s.scan_index(k, kD)] = r[5];
    g[s.scan_index(k, kDtB)] = s.single_dt_bias ? r[7] : r[7] + ddelta.sum(0).to(s.acc);
    g[s.scan_index(k, kDtW)] = at::mm(ddelta.t(), o.dt_in);
    const at::Tensor dxdbl =
        at::cat({at::mm(ddelta, w(s.scan_index(k, kDtW))), r[3].view({BL, s.N}).to(s.dt), r[4].view({BL, s.N}).to(s.dt)},
                1);
    const at::Tensor w_x = w(s.scan_index(k, kXProj));
    g[s.scan_index(k, kXProj)] = at::mm(dxdbl.t(), u.view({BL, d}));
    const at::Tensor du = r[0].view({BL, d}).addmm_(dxdbl, w_x).view({s.B, s.L, d});
    const at::Tensor du_raster = from_direction(du, k, s);
    dx2 = dx2.defined() ? dx2.add_(du_raster) : du_raster;
    dstates.push_back(o.initial_state.has_value() ? r[8] : absent(x));
  }

  // 3-6. FGMM, gate, FEM
  const at::Tensor dx1 = frequency_backward(w, saved, x1, dx2, g);

  // 1-2. conv + SiLU, in_proj
  const auto [dxz, dconv_w, dconv_b] = call_conv_silu_bwd(dx1.contiguous(), dz1, xz, conv_w, conv_b);
  g[kConvXW] = dconv_w.narrow(0, 0, d).clone();
  g[kConvZW] = dconv_w.narrow(0, d, d).clone();
  g[kConvXB] = dconv_b.narrow(0, 0, d).clone();
  g[kConvZB] = dconv_b.narrow(0, d, d).clone();
  const at::Tensor dxz2 = dxz.view({BL, 2 * d});
  g[kInProj] = at::mm(dxz2.t(), x.reshape({BL, s.C}));
  const at::Tensor dx = at::mm(dxz2, w(kInProj)).view(x.sizes());

  // Each gradient in its parameter's shape and dtype; parameters the variant does not use get none. (Slices of
  // one buffer are cloned where they are taken: an op's outputs must not alias each other.)
  for (size_t i = 0; i < g.size(); ++i) {
    if (!g[i].defined()) {
      g[i] = absent(x);
      continue;
    }
    g[i] = g[i].reshape(params[i].sizes()).to(params[i].scalar_type());
  }
  for (int64_t k = 0; k < s.ndir; ++k) {
    const std::optional<at::Tensor> state = states.get(k);
    if (state.has_value()) dstates[k] = dstates[k].to(state->scalar_type());
  }
  return {dx, g, dstates};
}

}  // namespace
}  // namespace gmamba::fused

TORCH_LIBRARY_IMPL(gmamba_ext, CompositeExplicitAutograd, m) {
  m.impl("gssm_bwd", &gmamba::fused::gssm_backward);
}
