// Pieces of the composite gssm ops that the forward and the backward share.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "gssm_fused.h"

namespace gmamba::fused {

bool keeps_intermediates(const c10::Device& device) {
  const char* value = std::getenv("GMAMBA_GSSM_SAVE");
  const std::string policy = value ? value : "";
  if (policy.empty() || policy == "auto") return device.is_cpu();
  TORCH_CHECK_VALUE(policy == "keep" || policy == "recompute",
                    "GMAMBA_GSSM_SAVE must be 'auto', 'keep' or 'recompute', got '", policy, "'");
  return policy == "keep";
}

Layout describe(int64_t B, at::ScalarType dt, const c10::Device& device, at::TensorList params, int64_t H,
                int64_t W, c10::string_view variant, c10::string_view mask, bool single_dt_bias) {
  const std::string v(variant.data(), variant.size()), m(mask.data(), mask.size());
  TORCH_CHECK_VALUE(v == "full" || v == "ssm" || v == "fem_ssm" || v == "dft_fgmm_ssm",
                    "gssm: variant must be 'full', 'ssm', 'fem_ssm' or 'dft_fgmm_ssm', got '", v, "'");
  TORCH_CHECK_VALUE(m == "corner" || m == "symmetric", "gssm: mask must be 'corner' or 'symmetric', got '", m, "'");
  const int64_t shared = kNumShared + 1, per = kPerDirection;  // + 1: out_proj.weight
  const int64_t extra = static_cast<int64_t>(params.size()) - shared, ndir = extra / per;
  TORCH_CHECK_VALUE(extra >= 0 && extra % per == 0 && (ndir == 1 || ndir == 2 || ndir == 4), "gssm: expected ",
                    shared + per, ", ", shared + 2 * per, " or ", shared + 4 * per,
                    " parameters (1, 2 or 4 scan directions), got ", params.size());
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, "gssm: H and W must be positive, got ", H, " x ", W);
  TORCH_CHECK_TYPE(at::isFloatingType(dt), "gssm: x must be floating point, got ", dt);
  for (const at::Tensor& t : params)
    TORCH_CHECK_VALUE(t.device() == device, "gssm: a parameter is on ", t.device(), " but x is on ", device);
  Layout s{};
  s.B = B, s.H = H, s.W = W, s.L = H * W, s.C = params[kInProj].size(-1);
  s.ndir = ndir;
  s.d = params[kConvXW].size(0);
  s.E4 = params[kGate0W].size(0);
  s.d4 = params[kFconv0W].size(0);
  s.R = params[s.scan_index(0, kDtW)].size(1);
  s.N = params[s.scan_index(0, kALog)].size(1);
  s.K = params[kConvXW].size(-1);
  s.fem = v != "ssm";
  s.fusion = v == "full" || v == "fem_ssm";
  s.fgmm = v == "full" || v == "dft_fgmm_ssm";
  s.has_low = H / 4 > 0 && (W / 2 + 1) / 4 > 0;
  s.corner = m == "corner";
  s.single_dt_bias = single_dt_bias;
  s.keep_relu = s.keep_conv = false;  // set by the forward when it saves, and by the backward from what it saved
  s.consume = false;                  // set by the backward ops from their argument
  s.dt = dt;
  s.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  s.lowpass_fft = lowpass_uses_fft(device);
  s.product_on_coefficients = !s.lowpass_fft && dt == s.acc;
  TORCH_CHECK_VALUE(params[kInProj].dim() == 2 && params[kInProj].size(0) == 2 * s.d,
                    "gssm: in_proj.weight must be (2d, C) with d = ", s.d, ", got ", params[kInProj].sizes());
  return s;
}

void check_tokens(const at::Tensor& x, const Layout& s, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(0) == s.B && x.size(1) == s.H && x.size(2) == s.W && x.size(3) == s.C,
                    "gssm: ", name, " must be (B, H, W, C) = (", s.B, ", ", s.H, ", ", s.W, ", ", s.C,
                    ") (C from in_proj.weight), got shape ", x.sizes());
}

std::vector<at::Tensor> finish_grads(const std::vector<at::Tensor>& g, at::TensorList params, size_t first,
                                     size_t last, const at::Tensor& like) {
  std::vector<at::Tensor> out;
  for (size_t i = first; i < last; ++i) {
    if (!g[i].defined()) {
      out.push_back(absent(like));
      continue;
    }
    const at::Tensor& p = params[i];
    at::Tensor grad = as_dtype(g[i].reshape(p.sizes()), p.scalar_type());
    // The parameter's strides, as autograd's own gradients have them: a (d, 1) weight's gradient came out
    // with strides (1, d), and DDP warned on every step that it did not match its bucket view.
    if (grad.strides() != p.strides() && p.is_non_overlapping_and_dense())
      grad = at::empty_strided(p.sizes(), p.strides(), grad.options()).copy_(grad);
    out.push_back(grad);
  }
  return out;
}

at::Tensor to_direction(const at::Tensor& u, int64_t k, const Layout& s) {
  if (k == 0) return u.contiguous();
  if (k == 1) return u.flip({1});
  const int64_t ch = u.size(2);
  at::Tensor v = u.reshape({s.B, s.H, s.W, ch}).transpose(1, 2).reshape({s.B, s.L, ch});
  return k == 3 ? v.flip({1}) : v;
}

at::Tensor from_direction(const at::Tensor& u, int64_t k, const Layout& s) {
  if (k == 0) return u.contiguous();
  if (k == 1) return u.flip({1});
  const int64_t ch = u.size(2);
  const at::Tensor v = k == 3 ? u.flip({1}) : u;
  return v.reshape({s.B, s.W, s.H, ch}).transpose(1, 2).reshape({s.B, s.L, ch});
}

std::pair<at::Tensor, at::Tensor> conv_weights(const Weights& w) {
  const at::Tensor weight = at::cat({w.p[kConvXW], w.p[kConvZW]}).reshape({2 * w.s.d, w.s.K});
  const at::Tensor bias = at::cat({w.p[kConvXB], w.p[kConvZB]});
  return {as_dtype(weight, w.s.acc).contiguous(), as_dtype(bias, w.s.acc).contiguous()};
}

std::vector<at::Tensor> fgmm_weights(const Weights& w) {
  const Layout& s = w.s;
  return {w.acc(kAdapt1W).reshape({s.d4, s.d}), w.acc(kAdapt1B), w.acc(kAdapt3W).reshape({2, s.d4}),
          w.acc(kAdapt3B), w.acc(kRatio).reshape({})};
}

at::Tensor in_proj(const at::Tensor& x, const Weights& w) {
  const Layout& s = w.s;
  return at::mm(x.reshape({s.B * s.L, s.C}), w(kInProj).t()).view({s.B, s.L, 2 * s.d});
}

at::Tensor fgmm_conv(const Weights& w, const at::Tensor& hid) {
  const Layout& s = w.s;
  return at::addmm(w(kFconv2B), hid.narrow(1, s.E4, s.d4), w(kFconv2W).reshape({s.d, s.d4}).t())
      .view({s.B, s.L, s.d});
}

ScanOperands scan_operands(const Weights& w, int64_t k, const at::Tensor& xdbl,
                           const c10::List<std::optional<at::Tensor>>& states) {
  const Layout& s = w.s;
  ScanOperands o;
  o.dt_in = xdbl.narrow(1, 0, s.R);
  const at::Tensor dt_w = w(s.scan_index(k, kDtW)).t();
  // The release adds dt_proj's bias twice (in dt_proj and as the scan's delta_bias) unless single_dt_bias.
  o.delta = (s.single_dt_bias ? at::mm(o.dt_in, dt_w) : at::addmm(w(s.scan_index(k, kDtB)), o.dt_in, dt_w))
                .view({s.B, s.L, s.d});
  o.A = w.acc(s.scan_index(k, kALog)).exp().neg_();
  o.B = as_dtype(xdbl.narrow(1, s.R, s.N), s.acc).contiguous().view({s.B, s.L, s.N});
  o.C = as_dtype(xdbl.narrow(1, s.R + s.N, s.N), s.acc).contiguous().view({s.B, s.L, s.N});
  o.D = w.acc(s.scan_index(k, kD));
  o.bias = w.acc(s.scan_index(k, kDtB));
  const std::optional<at::Tensor> state = states.get(k);
  if (state.has_value()) o.initial_state = as_dtype(*state, s.acc).contiguous();
  return o;
}

namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;

}  // namespace

std::tuple<T, T> call_conv_silu_fwd(const T& xz, const T& w, const T& b) {
  static const auto op = handle<std::tuple<T, T>(const T&, const T&, const T&)>("gmamba_ext::conv_silu_fwd");
  return op.call(xz, w, b);
}

std::tuple<T, T, T> call_conv_silu_bwd(const T& dx1, const T& dz1, const T& xz, const T& w, const T& b) {
  static const auto op = handle<std::tuple<T, T, T>(const T&, const T&, const T&, const T&, const T&)>(
      "gmamba_ext::conv_silu_bwd");
  return op.call(dx1, dz1, xz, w, b);
}

std::tuple<T, T, T, T> call_fgmm_fwd(const T& x1, const T& f, const T& c, const T& gl, const std::vector<T>& small) {
  static const auto op = handle<std::tuple<T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                       const T&, const T&, const T&)>("gmamba_ext::fgmm_fwd");
  return op.call(x1, f, c, gl, small[0], small[1], small[2], small[3], small[4]);
}

std::vector<T> call_fgmm_bwd(const T& dx2, const T& x1, const T& f, const T& c, const T& gl, const T& s, const T& a,
                             const T& g, const std::vector<T>& small) {
  static const auto op =
      handle<std::tuple<T, T, T, T, T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                   const T&, const T&, const T&, const T&, const T&, const T&,
                                                   const T&)>("gmamba_ext::fgmm_bwd");
  const auto r = op.call(dx2, x1, f, c, gl, s, a, g, small[0], small[1], small[2], small[3], small[4]);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
          std::get<5>(r), std::get<6>(r), std::get<7>(r), std::get<8>(r)};
}

std::tuple<T, T, T> call_scan_fwd(const T& u, const ScanOperands& o) {
  static const auto op = handle<std::tuple<T, T, T>(const T&, const T&, const T&, const T&, const T&, const OptT&,
                                                    const OptT&, const OptT&, const OptT&, bool, bool)>(
      "gmamba_ext::selective_scan_fwd");
  return op.call(u, o.delta, o.A, o.B, o.C, o.D, std::nullopt, o.bias, o.initial_state, true, true);
}

std::vector<T> call_scan_bwd(const T& dout, const T& checkpoints, const T& u, const ScanOperands& o) {
  static const auto op =
      handle<std::tuple<T, T, T, T, T, T, T, T, T>(const T&, const OptT&, const T&, const T&, const T&, const T&,
                                                   const T&, const T&, const OptT&, const OptT&, const OptT&,
                                                   const OptT&, bool, bool)>("gmamba_ext::selective_scan_bwd");
  const auto r = op.call(dout, std::nullopt, checkpoints, u, o.delta, o.A, o.B, o.C, o.D, std::nullopt, o.bias,
                         o.initial_state, true, true);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
          std::get<5>(r), std::get<6>(r), std::get<7>(r), std::get<8>(r)};
}

}  // namespace gmamba::fused
