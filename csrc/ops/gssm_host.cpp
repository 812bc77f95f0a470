#include "gssm_host.h"

#include <c10/util/Exception.h>

#include <limits>

namespace gmamba {
namespace {

at::ScalarType acc_type_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks of one op's arguments against its first (token) input; errors name the op and the argument.
struct ArgChecker {
  const char* op;
  const at::Tensor& ref;  // the token tensor that fixes device and dtype
  const char* ref_name;

  void tokens(const at::Tensor& t, const char* name) const {
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": argument '", name,
                     "' must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                     t.scalar_type());
    same_device(t, name);
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": argument '", name, "' must have ", ref_name,
                     "'s dtype ", ref.scalar_type(), ", got ", t.scalar_type());
    contiguous(t, name);
  }
  void weight(const at::Tensor& t, at::IntArrayRef shape, const char* name) const {
    same_device(t, name);
    const auto acc = acc_type_for(ref.scalar_type());
    TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": argument '", name, "' must be ", acc, " for ",
                     ref.scalar_type(), " inputs (the Python wrapper casts it), got ", t.scalar_type());
    shape_is(t, shape, name);
    contiguous(t, name);
  }
  void shape_is(const at::Tensor& t, at::IntArrayRef shape, const char* name) const {
    TORCH_CHECK_VALUE(t.sizes() == shape, op, ": argument '", name, "' must have shape ", shape, ", got ",
                      t.sizes());
  }
  void same_device(const at::Tensor& t, const char* name) const {
    TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": argument '", name, "' is on ", t.device(), " but '",
                      ref_name, "' is on ", ref.device(), "; move all inputs to one device");
  }
  void contiguous(const at::Tensor& t, const char* name) const {
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": argument '", name,
                      "' must be contiguous (the Python wrapper makes it so; call .contiguous() when using the "
                      "raw op)");
  }
};

// The kernels flatten (batch, tile, channel block) into one grid dimension.
void check_launchable(const char* op, int64_t batch, int64_t len, int64_t channels) {
  const int64_t blocks = batch * gssm_tiles(len) * ((channels + 31) / 32);
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), op, ": input of ", batch, " x ", len, " x ",
                    channels, " elements is too large for one launch");
}

ConvShape conv_shape(const char* op, const at::Tensor& xz, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(xz.dim() == 3, op, ": argument 'xz' must be 3-D (B, L, 2d), got shape ", xz.sizes());
  const ArgChecker check{op, xz, "xz"};
  check.tokens(xz, "xz");
  const int64_t channels = xz.size(2);
  TORCH_CHECK_VALUE(channels > 0 && channels % 2 == 0, op, ": argument 'xz' must have an even, non-zero channel ",
                    "count 2d (x and z halves), got ", channels);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == channels, op, ": argument 'weight' must have shape (",
                    channels, ", K), got ", weight.sizes());
  const int64_t width = weight.size(1);
  TORCH_CHECK_VALUE(width >= 1 && width <= kMaxConvWidth, op, ": conv width K = weight.shape[1] must be in [1, ",
                    kMaxConvWidth, "], got ", width);
  check.weight(weight, {channels, width}, "weight");
  check.weight(bias, {channels}, "bias");
  check_launchable(op, xz.size(0), xz.size(1), channels);
  return ConvShape{xz.size(0), xz.size(1), channels, width, (width - 1) / 2};
}

void check_fgmm_tokens(const char* op, const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c,
                       const at::Tensor& gate_logit) {
  TORCH_CHECK_VALUE(x1.dim() == 3, op, ": argument 'x1' must be 3-D (B, L, d), got shape ", x1.sizes());
  const ArgChecker check{op, x1, "x1"};
  check.tokens(x1, "x1");
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{f, "f"}, {c, "c"}}) {
    check.tokens(t, name);
    check.shape_is(t, x1.sizes(), name);
  }
  check.tokens(gate_logit, "gate_logit");
  check.shape_is(gate_logit, {x1.size(0), x1.size(1)}, "gate_logit");
  check_launchable(op, x1.size(0), x1.size(1), x1.size(2));
}

void check_fgmm_weights(const char* op, const at::Tensor& x1, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& ratio) {
  const ArgChecker check{op, x1, "x1"};
  const int64_t d = x1.size(2);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == d, op, ": argument 'w1' must have shape (hidden, ", d,
                    "), got ", w1.sizes());
  const int64_t hidden = w1.size(0);
  check.weight(w1, {hidden, d}, "w1");
  check.weight(b1, {hidden}, "b1");
  check.weight(w2, {2, hidden}, "w2");
  check.weight(b2, {2}, "b2");
  check.weight(ratio, {}, "ratio");
}

at::Tensor acc_view(const at::Tensor& t) { return t.to(acc_type_for(t.scalar_type())); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_silu_forward(const at::Tensor& xz, const at::Tensor& weight,
                                                     const at::Tensor& bias, const GssmBackend& backend) {
  const ConvShape s = conv_shape("conv_silu_fwd", xz, weight, bias);
  const int64_t d = s.channels / 2;
  at::Tensor x1 = at::empty({s.batch, s.len, d}, xz.options());
  at::Tensor z1 = at::empty({s.batch, s.len, d}, xz.options());
  if (xz.numel() > 0) backend.conv_fwd(xz, weight.t().contiguous(), bias, s, x1, z1);
  return {x1, z1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_silu_backward(const at::Tensor& dx1, const at::Tensor& dz1,
                                                                  const at::Tensor& xz, const at::Tensor& weight,
                                                                  const at::Tensor& bias,
                                                                  const GssmBackend& backend) {
  const char* op = "conv_silu_bwd";
  const ConvShape s = conv_shape(op, xz, weight, bias);
  const ArgChecker check{op, xz, "xz"};
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{dx1, "dx1"}, {dz1, "dz1"}}) {
    check.tokens(t, name);
    check.shape_is(t, {s.batch, s.len, s.channels / 2}, name);
  }
  at::Tensor dxz = at::empty_like(xz);
  at::Tensor part = at::zeros({s.batch, gssm_tiles(s.len), s.width + 1, s.channels}, weight.options());
  if (xz.numel() > 0) backend.conv_bwd(dx1, dz1, xz, weight.t().contiguous(), bias, s, dxz, part);
  at::Tensor sums = part.sum(at::IntArrayRef{0, 1});  // (K + 1, 2d), fixed order
  // Fresh tensors, not views of sums (their metadata must match the fake kernel's).
  return {dxz, sums.narrow(0, 0, s.width).t().clone(at::MemoryFormat::Contiguous), sums[s.width].clone()};
}

namespace {

// The hidden layer of the adaptive mixing weights a = softmax(relu(s w1^T + b1) w2^T + b2).
at::Tensor mixing_hidden(const at::Tensor& s, const at::Tensor& w1, const at::Tensor& b1) {
  return at::relu(at::linear(s, w1, b1));
}

// Per-sample (a0 m, a1 m) with m = 1 + sigma(ratio) g.
at::Tensor mixing_coef(const at::Tensor& a, const at::Tensor& g, const at::Tensor& ratio) {
  const at::Tensor m = 1 + at::sigmoid(ratio) * g;
  return (a * m.unsqueeze(1)).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fgmm_forward(
    const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c, const at::Tensor& gate_logit,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& ratio,
    const GssmBackend& backend) {
  const char* op = "fgmm_fwd";
  check_fgmm_tokens(op, x1, f, c, gate_logit);
  check_fgmm_weights(op, x1, w1, b1, w2, b2, ratio);
  const int64_t batch = x1.size(0), len = x1.size(1), d = x1.size(2);
  TORCH_CHECK_VALUE(len > 0, op, ": argument 'x1' must have at least one token (L > 0)");
  at::Tensor part = at::zeros({batch, gssm_tiles(len), d}, w1.options());
  if (x1.numel() > 0) backend.fgmm_pool(x1, f, c, part);
  const at::Tensor s = part.sum(1) / static_cast<double>(len);
  const at::Tensor g = at::sigmoid(acc_view(gate_logit)).mean(1);
  const at::Tensor a = at::softmax(at::linear(mixing_hidden(s, w1, b1), w2, b2), -1);
  at::Tensor x2 = at::empty_like(x1);
  if (x1.numel() > 0) backend.fgmm_mix(x1, f, c, mixing_coef(a, g, ratio), x2);
  return {x2, s, a, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fgmm_backward(const at::Tensor& dx2, const at::Tensor& x1, const at::Tensor& f, const at::Tensor& c,
              const at::Tensor& gate_logit, const at::Tensor& s, const at::Tensor& a, const at::Tensor& g,
              const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
              const at::Tensor& ratio, const GssmBackend& backend) {
  const char* op = "fgmm_bwd";
  check_fgmm_tokens(op, x1, f, c, gate_logit);
  check_fgmm_weights(op, x1, w1, b1, w2, b2, ratio);
  const ArgChecker check{op, x1, "x1"};
  check.tokens(dx2, "dx2");
  check.shape_is(dx2, x1.sizes(), "dx2");
  const int64_t batch = x1.size(0), len = x1.size(1), d = x1.size(2);
  check.weight(s, {batch, d}, "s");
  check.weight(a, {batch, 2}, "a");
  check.weight(g, {batch}, "g");

  // Sums over each sample's tokens of x1 dx2 and f sigma(c) dx2 give the gradients of a and g.
  at::Tensor part = at::zeros({batch, gssm_tiles(len), 2}, w1.options());
  if (x1.numel() > 0) backend.fgmm_bwd_reduce(dx2, x1, f, c, part);
  const at::Tensor sums = part.sum(1);  // (B, 2)
  const at::Tensor sr = at::sigmoid(ratio);
  const at::Tensor m = 1 + sr * g;
  const at::Tensor da = sums * m.unsqueeze(1);
  const at::Tensor dm = (a * sums).sum(1);  // (B,)
  const at::Tensor dg = sr * dm;
  const at::Tensor dratio = sr * (1 - sr) * (g * dm).sum();

  // Back through softmax and the two-layer MLP on s.
  const at::Tensor h = mixing_hidden(s, w1, b1);
  const at::Tensor dout = a * (da - (a * da).sum(1, true));
  const at::Tensor dw2 = dout.t().mm(h);
  const at::Tensor db2 = dout.sum(0);
  const at::Tensor dh = dout.mm(w2) * (h > 0);
  const at::Tensor dw1 = dh.t().mm(s);
  const at::Tensor db1 = dh.sum(0);
  const at::Tensor q = (dh.mm(w1) / static_cast<double>(len)).contiguous();  // ds / L, (B, d)

  const at::Tensor sg = at::sigmoid(acc_view(gate_logit));
  const at::Tensor dgate = ((dg / static_cast<double>(len)).unsqueeze(1) * sg * (1 - sg)).to(gate_logit.scalar_type());
  at::Tensor dx1 = at::empty_like(x1), df = at::empty_like(x1), dc = at::empty_like(x1);
  if (x1.numel() > 0) backend.fgmm_bwd_apply(dx2, f, c, mixing_coef(a, g, ratio), q, dx1, df, dc);
  return {dx1, df, dc, dgate, dw1, db1, dw2, db2, dratio};
}

}  // namespace gmamba
