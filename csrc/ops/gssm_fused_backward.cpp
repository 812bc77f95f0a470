// The gradient of gssm_fwd for x, every parameter and the initial scan states, written out stage by stage in
// reverse (each step's formula beside it), as two ops: gssm_bwd_scan (out_proj and the scans) then
// gssm_bwd_front (FGMM, the gate, FEM, conv, in_proj), so that the caller frees the scan's saved tensors
// between them. Recomputed rather than saved: by default on CUDA (Layout::keep_conv, keep_relu) xz, x1 and z1
// (three in_proj GEMMs, two conv_silu passes) and the fusion layer's relu(pre) (two GEMMs); always, FGMM's
// conv output (one small GEMM) and each direction's delta (one GEMM). Intermediates are released as soon as
// they are consumed (saved ones too, with `consume`), and masks are applied in place: peak memory is the
// point of these details.
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "gssm_fused.h"

namespace gmamba::fused {
namespace {

// The gradients of the folded fusion layer's inputs, from those of Px, Pl (undefined: no low-pass) and c0:
// Px = W1a + sh W1c Whp,  Pl = sl W1b Wlp - sh W1c Whp,  c0 = b1 + sl W1b blp + sh W1c bhp.
// d sl = <dPl, W1b Wlp> + ... is taken as <W1b^T dPl, Wlp>: W1b^T dPl is needed for dWlp anyway, so no
// (2d, d) x (d, d) product is recomputed (each ~2 ms on the CPU at C = 768).
void fusion_weights_backward(const Weights& w, const at::Tensor& dPx, const at::Tensor& dPl, const at::Tensor& dc0,
                             std::vector<at::Tensor>& g) {
  const int64_t d = w.s.d;
  const at::Tensor W1 = w(kFuse0W);
  const at::Tensor W1b = W1.narrow(1, d, d), W1c = W1.narrow(1, 2 * d, d);
  const at::Tensor sl = at::sigmoid(w(kLowW)), sh = at::sigmoid(w(kHighW));
  const at::Tensor Whp = w(kHighProjW), Wlp = w(kLowProjW), bhp = w(kHighProjB), blp = w(kLowProjB);
  const at::Tensor dH = dPl.defined() ? dPx - dPl : dPx;  // gradient of W1c Whp, before the factor sh
  const at::Tensor W1c_dH = at::mm(W1c.t(), dH), W1b_dc0 = at::mv(W1b.t(), dc0), W1c_dc0 = at::mv(W1c.t(), dc0);
  // dW1 = [dPx | sl (dPl Wlp^T + dc0 blp^T) | sh (dH Whp^T + dc0 bhp^T)], each block written in place (the
  // outer products as rank-1 GEMMs): no (2d, d) temporaries, a parameter-sized peak where C is large.
  at::Tensor dW1 = at::empty({2 * d, 3 * d}, dPx.options());
  at::Tensor dW1b = dW1.narrow(1, d, d), dW1c = dW1.narrow(1, 2 * d, d);
  dW1.narrow(1, 0, d).copy_(dPx);
  at::mm_out(dW1b, dc0.unsqueeze(1), blp.unsqueeze(0));
  at::Tensor dsl = at::dot(W1b_dc0, blp);
  if (dPl.defined()) {
    at::Tensor W1b_dPl = at::mm(W1b.t(), dPl);
    dW1b.addmm_(dPl, Wlp.t());
    dsl = dsl + (W1b_dPl * Wlp).sum();
    g[kLowProjW] = W1b_dPl.mul_(sl);
  } else {
    g[kLowProjW] = at::zeros_like(Wlp);
  }
  dW1b.mul_(sl);
  at::mm_out(dW1c, dc0.unsqueeze(1), bhp.unsqueeze(0));
  dW1c.addmm_(dH, Whp.t()).mul_(sh);
  const at::Tensor dsh = (W1c_dH * Whp).sum() + at::dot(W1c_dc0, bhp);
  g[kFuse0W] = dW1;
  g[kFuse0B] = dc0;
  g[kHighProjW] = sh * W1c_dH;
  g[kLowProjB] = sl * W1b_dc0;
  g[kHighProjB] = sh * W1c_dc0;
  g[kLowW] = at::sigmoid_backward(dsl, sl);  // dsl sl (1 - sl) in one op (four as written out)
  g[kHighW] = at::sigmoid_backward(dsh, sh);
}

// dFm from FGMM's and the gate's gradients; fills dx1 with FGMM's direct part.
// gate_logit = hid_g Wg2^T + bg2,  c = hid_c Wc2^T + bc2,  hid = relu(Fm [Wg1; Wc1]^T + [bg1; bc1]).
at::Tensor fgmm_backward(const Weights& w, at::TensorList saved, const at::Tensor& x1, const at::Tensor& dx2,
                         at::Tensor& dx1, std::vector<at::Tensor>& g) {
  const Layout& s = w.s;
  const int64_t BL = s.B * s.L, d = s.d;
  const at::Tensor hid = saved[kHid];
  std::vector<at::Tensor> r = call_fgmm_bwd(dx2, x1, saved[kFm], fgmm_conv(w, hid), saved[kGateLogit],
                                            saved[kPoolS], saved[kMixA], saved[kGateG], fgmm_weights(w));
  dx1 = r[0];
  for (int i = 0; i < 5; ++i) g[kAdapt1W + i] = r[4 + i];
  at::Tensor dc = r[2].view({BL, d});
  const at::Tensor dgl = r[3].view({BL, 1});
  r[2].reset();
  g[kGate2W] = at::mm(dgl.t(), hid.narrow(1, 0, s.E4));
  g[kGate2B] = dgl.sum(0);
  g[kFconv2W] = skinny_weight_grad(dc, hid.narrow(1, s.E4, s.d4));
  g[kFconv2B] = dc.sum(0);
  at::Tensor dhid = at::empty({BL, s.E4 + s.d4}, dc.options());  // both blocks written in place: no concat
  at::Tensor dhid_gate = dhid.narrow(1, 0, s.E4), dhid_conv = dhid.narrow(1, s.E4, s.d4);
  at::mm_out(dhid_gate, dgl, w(kGate2W));
  at::mm_out(dhid_conv, dc, w(kFconv2W).reshape({d, s.d4}));
  dc.reset();
  at::threshold_backward_out(dhid, dhid, hid, 0);  // relu's mask, in place
  release(saved[kHid], s);
  const at::Tensor dw_first = at::mm(dhid.t(), saved[kFm].view({BL, d})), db_first = dhid.sum(0);
  release(saved[kFm], s);
  g[kGate0W] = dw_first.narrow(0, 0, s.E4).clone();  // clones: an op's outputs must not alias each other
  g[kFconv0W] = dw_first.narrow(0, s.E4, s.d4).clone();
  g[kGate0B] = db_first.narrow(0, 0, s.E4).clone();
  g[kFconv0B] = db_first.narrow(0, s.E4, s.d4).clone();
  const at::Tensor w_first = at::cat({w(kGate0W), w(kFconv0W).reshape({s.d4, d})});
  return r[1].view({BL, d}).addmm_(dhid, w_first);
}

// dx1 from dx2 through FGMM / the gate / FEM (the forward's frequency_stages in reverse).
at::Tensor frequency_backward(const Weights& w, at::TensorList saved, const at::Tensor& x1, const at::Tensor& dx2,
                              std::vector<at::Tensor>& g) {
  const Layout& s = w.s;
  const int64_t BL = s.B * s.L, d = s.d;
  if (!s.fem) return dx2;
  at::Tensor dx1, dFm;
  if (s.fgmm) {
    dFm = fgmm_backward(w, saved, x1, dx2, dx1, g);
  } else {  // fem_ssm: x2 = x1 + Fm (Fm itself is not read)
    release(saved[kFm], s);
    dx1 = dx2.clone();
    dFm = dx2.view({BL, d});
  }
  if (!s.fusion) {  // dft_fgmm_ssm: Fm = low
    if (s.has_low) dx1.add_(fem_low(dFm.view({s.B, s.L, d}), s));
    return dx1;
  }
  // Fm = relu(pre) W2^T + b2,  pre = x1 Px^T + low Pl^T + c0 (relu(pre) kept or recomputed), low = G(Z),
  // Z = F(x1) the saved low-pass coefficients. Without Layout::product_on_coefficients low is formed here
  // once and the GEMMs stay (gssm_fused.h).
  const at::Tensor &Px = saved[kPx], &Pl = saved[kPl], &Z = saved[kLowCoeffs];
  const at::Tensor x1f = x1.view({BL, d});
  at::Tensor low = s.has_low && !s.product_on_coefficients ? fem_synthesis(Z, s) : at::Tensor();
  at::Tensor relu = s.keep_relu ? saved[kRelu] : at::addmm(saved[kC0], x1f, Px.t());
  if (!s.keep_relu) {
    if (low.defined()) {
      relu.addmm_(low.view({BL, d}), Pl.t());
    } else if (s.has_low) {
      fem_synthesis_add(relu.view({s.B, s.L, 2 * d}), fem_coefficient_mix(Z, Pl.t()), s);
    }
    relu.relu_();
  }
  g[kFuse2W] = at::mm(dFm.t(), relu);
  g[kFuse2B] = dFm.sum(0);
  at::Tensor dpre = at::mm(dFm, w(kFuse2W));
  dFm.reset();
  at::threshold_backward_out(dpre, dpre, relu, 0);
  relu.reset();
  release(saved[kRelu], s);
  const at::Tensor dPx = at::mm(dpre.t(), x1f), dc0 = dpre.sum(0);
  dx1.view({BL, d}).addmm_(dpre, Px);
  at::Tensor dPl;
  if (low.defined()) {  // dPl = dpre^T low; x1's part through low is P(dpre Pl), P = G F self-adjoint
    dPl = at::mm(dpre.t(), low.view({BL, d}));
    low.reset();
    release(Z, s);
    const at::Tensor dlow = at::mm(dpre, Pl).view({s.B, s.L, d});
    dpre.reset();
    dx1.add_(fem_low(dlow, s));
  } else if (s.has_low) {
    // With A = F(dpre): dPl = dpre^T G(Z) = sum_k D_k A_k Z_k^T (G^T = D F), and x1's part through low,
    // P(dpre Pl), is G(A Pl): two transforms, no B L-row GEMM.
    const at::Tensor A = fem_coefficients(dpre.view({s.B, s.L, 2 * d}), s);
    dpre.reset();
    dPl = as_dtype(fem_coefficient_pairing(A, Z, s), s.dt);
    release(Z, s);
    fem_synthesis_add(dx1, fem_coefficient_mix(A, Pl), s);
  }
  fusion_weights_backward(w, dPx, dPl, dc0, g);
  return dx1;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gssm_backward_scan(
    const at::Tensor& dout, const at::Tensor& x, at::TensorList params,
    const c10::List<std::optional<at::Tensor>>& states, at::TensorList saved, int64_t H, int64_t W,
    c10::string_view variant, c10::string_view mask, bool single_dt_bias, bool consume) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  TORCH_CHECK_VALUE(x.dim() == 4, "gssm_bwd_scan: x must be (B, H, W, C), got shape ", x.sizes());
  Layout s = describe(x.size(0), x.scalar_type(), x.device(), params, H, W, variant, mask, single_dt_bias);
  check_tokens(x, s, "x");
  TORCH_CHECK_VALUE(static_cast<int64_t>(saved.size()) == kScanSaved + kSavedPerDirection * s.ndir &&
                        static_cast<int64_t>(states.size()) == s.ndir,
                    "gssm_bwd_scan: 'saved' and 'initial_states' must be what gssm_fwd was given and returned");
  s.keep_conv = !is_absent(saved[kZ1]);  // what the forward kept, whatever GMAMBA_GSSM_SAVE says now
  s.consume = consume;
  const Weights w{params, s};
  const int64_t BL = s.B * s.L, d = s.d;
  std::vector<at::Tensor> g(params.size());
  const at::Tensor go = as_dtype(dout.reshape({BL, s.C}), s.dt);

  // 8. out = y Wy^T + z1 Wz^T (z1 saved or recomputed and dropped at once; dz1 is the front op's)
  const int out_i = s.out_proj_index();
  const at::Tensor w_out = w(out_i);
  {
    const auto [conv_w, conv_b] = conv_weights(w);
    const at::Tensor z1 = s.keep_conv ? saved[kZ1] : std::get<1>(call_conv_silu_fwd(in_proj(x, w), conv_w, conv_b));
    g[out_i] = at::empty({s.C, 2 * d}, go.options());  // both halves written in place: no (C, d) temporaries
    at::Tensor gy = g[out_i].narrow(1, 0, d), gz = g[out_i].narrow(1, d, d);
    at::mm_out(gy, go.t(), saved[kY].view({BL, d}));
    at::mm_out(gz, go.t(), z1.view({BL, d}));
    release(saved[kY], s);  // y and z1 are read only here: not held through the scans' backward
    release(saved[kZ1], s);
  }
  at::Tensor dy = at::mm(go, w_out.narrow(1, 0, d)).view({s.B, s.L, d});

  // 7. the scans: u = dir_k(x2), xdbl = u Wx^T = [dt_in | B | C], delta = dt_in Wdt^T (+ dt_b)
  at::Tensor dx2;
  std::vector<at::Tensor> dstates;
  for (int64_t k = 0; k < s.ndir; ++k) {
    const at::Tensor u = to_direction(saved[kX2], k, s);
    const at::Tensor xdbl = saved[kScanSaved + kSavedPerDirection * k + kXdbl];
    const ScanOperands o = scan_operands(w, k, xdbl, states);
    const at::Tensor& checkpoints = saved[kScanSaved + kSavedPerDirection * k + kCheckpoints];
    std::vector<at::Tensor> r = call_scan_bwd(to_direction(dy, k, s), checkpoints, u, o);
    release(checkpoints, s);
    const at::Tensor ddelta = r[1].view({BL, d});
    g[s.scan_index(k, kALog)] = r[2] * o.A;  // A = -exp(A_log)
    g[s.scan_index(k, kD)] = r[5];
    g[s.scan_index(k, kDtB)] = s.single_dt_bias ? r[7] : r[7] + as_dtype(ddelta.sum(0), s.acc);
    g[s.scan_index(k, kDtW)] = skinny_weight_grad(ddelta, o.dt_in);
    at::Tensor dxdbl = aligned_rows(BL, s.R + 2 * s.N, u.options());  // [d dt_in | dB | dC]
    skinny_product_into(dxdbl.narrow(1, 0, s.R), ddelta, w(s.scan_index(k, kDtW)));
    dxdbl.narrow(1, s.R, s.N).copy_(r[3].view({BL, s.N}));
    dxdbl.narrow(1, s.R + s.N, s.N).copy_(r[4].view({BL, s.N}));
    g[s.scan_index(k, kXProj)] = at::mm(dxdbl.t(), u.view({BL, d}));
    const at::Tensor du = r[0].view({BL, d}).addmm_(dxdbl, w(s.scan_index(k, kXProj))).view({s.B, s.L, d});
    const at::Tensor du_raster = from_direction(du, k, s);
    dx2 = dx2.defined() ? dx2.add_(du_raster) : du_raster;
    dstates.push_back(o.initial_state.has_value() ? as_dtype(r[8], states.get(k)->scalar_type()) : absent(x));
  }
  return {dx2, finish_grads(g, params, kNumShared, params.size(), x), dstates};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> gssm_backward_front(
    const at::Tensor& dout, const at::Tensor& dx2, const at::Tensor& x, at::TensorList params, at::TensorList saved,
    int64_t H, int64_t W, c10::string_view variant, c10::string_view mask, bool single_dt_bias, bool consume) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  TORCH_CHECK_VALUE(x.dim() == 4, "gssm_bwd_front: x must be (B, H, W, C), got shape ", x.sizes());
  Layout s = describe(x.size(0), x.scalar_type(), x.device(), params, H, W, variant, mask, single_dt_bias);
  check_tokens(x, s, "x");
  TORCH_CHECK_VALUE(static_cast<int64_t>(saved.size()) == kNumFront,
                    "gssm_bwd_front: 'saved' must be the front list gssm_fwd returned");
  s.keep_relu = !is_absent(saved[kRelu]);  // what the forward kept, whatever GMAMBA_GSSM_SAVE says now
  s.keep_conv = !is_absent(saved[kXz]);
  s.consume = consume;
  const Weights w{params, s};
  const int64_t BL = s.B * s.L, d = s.d;
  std::vector<at::Tensor> g(params.size());
  const auto [conv_w, conv_b] = conv_weights(w);

  // 3-6. FGMM, gate, FEM (x1 saved or recomputed, z1 and a recomputed xz dropped here, not kept alive by the
  // call's temporaries; without a frequency stage x1 is not read)
  at::Tensor x1;
  if (s.fem) x1 = s.keep_conv ? saved[kX1] : std::get<0>(call_conv_silu_fwd(in_proj(x, w), conv_w, conv_b));
  at::Tensor dx1 = frequency_backward(w, saved, x1, dx2, g);
  x1.reset();
  release(saved[kX1], s);

  // 1-2. conv + SiLU (dz1 = dout Wz, from out = y Wy^T + z1 Wz^T), in_proj
  const at::Tensor go = as_dtype(dout.reshape({BL, s.C}), s.dt);
  at::Tensor dz1 = at::mm(go, w(s.out_proj_index()).narrow(1, d, d)).view({s.B, s.L, d});
  // xz recomputed a second time rather than held through FEM and FGMM's backward: 2 u off that peak
  const auto [dxz, dconv_w, dconv_b] = call_conv_silu_bwd(
      dx1.contiguous(), dz1, s.keep_conv ? saved[kXz] : in_proj(x, w), conv_w, conv_b);
  release(saved[kXz], s);
  dx1.reset();
  dz1.reset();
  g[kConvXW] = dconv_w.narrow(0, 0, d).clone();
  g[kConvZW] = dconv_w.narrow(0, d, d).clone();
  g[kConvXB] = dconv_b.narrow(0, 0, d).clone();
  g[kConvZB] = dconv_b.narrow(0, d, d).clone();
  const at::Tensor dxz2 = dxz.view({BL, 2 * d});
  g[kInProj] = at::mm(dxz2.t(), x.reshape({BL, s.C}));
  const at::Tensor dx = at::mm(dxz2, w(kInProj)).view(x.sizes());
  return {dx, finish_grads(g, params, 0, kNumShared, x)};
}

}  // namespace
}  // namespace gmamba::fused

TORCH_LIBRARY_IMPL(gmamba_ext, CompositeExplicitAutograd, m) {
  m.impl("gssm_bwd_scan", &gmamba::fused::gssm_backward_scan);
  m.impl("gssm_bwd_front", &gmamba::fused::gssm_backward_front);
}
