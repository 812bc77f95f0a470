#include "scan_host.h"

#include <c10/util/Exception.h>

namespace gmamba {
namespace {

constexpr const char* kOp = "selective_scan";

at::ScalarType acc_type_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), kOp, ": argument '", name,
                   "' must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), kOp, ": argument '", name, "' is on ", t.device(),
                    " but 'u' is on ", ref.device(), "; move all inputs to one device");
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, kOp, ": argument '", name, "' must have shape ", expected, ", got ",
                    t.sizes());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": argument '", name,
                    "' must be contiguous (the Python wrapper makes it so; call .contiguous() when using the "
                    "raw op)");
}

// delta and z: same dtype, shape and device as u, contiguous.
void check_like_u(const at::Tensor& t, const at::Tensor& u, const char* name) {
  check_same_device(t, u, name);
  TORCH_CHECK_TYPE(t.scalar_type() == u.scalar_type(), kOp, ": argument '", name, "' must have u's dtype ",
                   u.scalar_type(), ", got ", t.scalar_type());
  check_shape(t, u.sizes(), name);
  check_contiguous(t, name);
}

// A weight-like tensor (A, B, C, D, delta_bias, initial_state): accumulation dtype, contiguous, same device.
void check_weight(const at::Tensor& t, const at::Tensor& u, at::ScalarType acc, const char* name) {
  check_same_device(t, u, name);
  TORCH_CHECK_TYPE(t.scalar_type() == acc, kOp, ": argument '", name, "' must be ", acc, " for ", u.scalar_type(),
                   " inputs (the Python wrapper casts it), got ", t.scalar_type());
  check_contiguous(t, name);
}

// Returns the number of groups G of a B/C argument, or 0 for the constant (d, N) form.
int64_t check_bc(const at::Tensor& t, const ScanShape& s, const char* name) {
  const int64_t dims = t.dim();
  if (dims == 2) {
    check_shape(t, {s.dim, s.dstate}, name);
    return 0;
  }
  TORCH_CHECK_VALUE(dims == 3 || dims == 4, kOp, ": argument '", name,
                    "' must be (d, N), or variable (B, N, L) / (B, G, N, L) ((B, L, N) / (B, L, G, N) in the "
                    "channels-last form), got ", dims, " dimensions");
  const int64_t groups = dims == 4 ? (s.channels_last ? t.size(2) : t.size(1)) : 1;
  TORCH_CHECK_VALUE(groups > 0 && s.dim % groups == 0, kOp, ": the channel count d=", s.dim,
                    " must be divisible by the number of groups G=", groups, " of argument '", name, "'");
  std::vector<int64_t> expected;
  if (s.channels_last) {
    expected = dims == 4 ? std::vector<int64_t>{s.batch, s.len, groups, s.dstate}
                         : std::vector<int64_t>{s.batch, s.len, s.dstate};
  } else {
    expected = dims == 4 ? std::vector<int64_t>{s.batch, groups, s.dstate, s.len}
                         : std::vector<int64_t>{s.batch, s.dstate, s.len};
  }
  check_shape(t, expected, name);
  return groups;
}

template <typename acc_t>
BCView<acc_t> bc_view(const at::Tensor& t, const ScanShape& s) {
  BCView<acc_t> v{t.data_ptr<acc_t>(), 0, 0, 0, 0, 0, t.dim() != 2};
  if (!v.variable) {
    v.sc = s.dstate;
    v.sn = 1;
    return v;
  }
  const int64_t G = t.dim() == 4 ? s.groups : 1;
  if (s.channels_last) {  // (B, L, G, N)
    v.sn = 1, v.sg = s.dstate, v.sl = G * s.dstate, v.sb = s.len * G * s.dstate;
  } else {  // (B, G, N, L)
    v.sl = 1, v.sn = s.len, v.sg = s.dstate * s.len, v.sb = G * s.dstate * s.len;
  }
  return v;
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

ScanInputs pack_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state,
                       bool delta_softplus, bool channels_last) {
  return ScanInputs{u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, channels_last};
}

ScanShape describe_scan(const ScanInputs& in) {
  const at::Tensor& u = in.u;
  check_float_input(u, "u");
  TORCH_CHECK_VALUE(u.dim() == 3, kOp, ": argument 'u' must be 3-D (", in.channels_last ? "B, L, d" : "B, d, L",
                    "), got ", u.dim(), " dimensions");
  check_contiguous(u, "u");
  ScanShape s{};
  s.channels_last = in.channels_last;
  s.softplus = in.softplus;
  s.batch = u.size(0);
  s.dim = in.channels_last ? u.size(2) : u.size(1);
  s.len = in.channels_last ? u.size(1) : u.size(2);
  s.nchunks = (s.len + kChunk - 1) / kChunk;
  if (in.channels_last) {
    s.sc = 1, s.sl = s.dim, s.sb = s.len * s.dim;
  } else {
    s.sl = 1, s.sc = s.len, s.sb = s.dim * s.len;
  }

  check_like_u(in.delta, u, "delta");
  if (in.z.has_value()) check_like_u(*in.z, u, "z");

  const at::ScalarType acc = acc_type_for(u.scalar_type());
  TORCH_CHECK_VALUE(in.A.dim() == 2 && in.A.size(0) == s.dim, kOp, ": argument 'A' must have shape (d, N) = (",
                    s.dim, ", N), got ", in.A.sizes());
  TORCH_CHECK_TYPE(!in.A.is_complex(), kOp, ": argument 'A' must be real (complex A is not supported)");
  check_weight(in.A, u, acc, "A");
  s.dstate = in.A.size(1);
  TORCH_CHECK_VALUE(s.dstate >= 1 && s.dstate <= kMaxDState, kOp, ": d_state N = A.shape[1] must be in [1, ",
                    kMaxDState, "], got ", s.dstate);

  check_weight(in.B, u, acc, "B");
  check_weight(in.C, u, acc, "C");
  const int64_t gB = check_bc(in.B, s, "B");
  const int64_t gC = check_bc(in.C, s, "C");
  TORCH_CHECK_VALUE(gB == 0 || gC == 0 || gB == gC, kOp, ": arguments 'B' and 'C' have different group counts (",
                    gB, " and ", gC, ")");
  s.groups = std::max<int64_t>({gB, gC, int64_t(1)});
  s.dim_per_group = s.dim / s.groups;

  const std::pair<const std::optional<at::Tensor>*, const char*> per_channel[] = {{&in.D, "D"},
                                                                                {&in.delta_bias, "delta_bias"}};
  for (const auto& [t, name] : per_channel) {
    if (!t->has_value()) continue;
    check_weight(**t, u, acc, name);
    check_shape(**t, {s.dim}, name);
  }
  if (in.initial_state.has_value()) {
    check_weight(*in.initial_state, u, acc, "initial_state");
    check_shape(*in.initial_state, {s.batch, s.dim, s.dstate}, "initial_state");
  }
  return s;
}

template <typename in_t, typename acc_t>
ScanFwdArgs<in_t, acc_t> make_fwd_args(const ScanInputs& in, const ScanShape& s, const at::Tensor& out,
                                       const at::Tensor& checkpoints, const at::Tensor& last_state) {
  ScanFwdArgs<in_t, acc_t> a{};
  a.s = s;
  a.u = in.u.data_ptr<in_t>();
  a.delta = in.delta.data_ptr<in_t>();
  a.z = opt_ptr<in_t>(in.z);
  a.A = in.A.data_ptr<acc_t>();
  a.D = opt_ptr<acc_t>(in.D);
  a.delta_bias = opt_ptr<acc_t>(in.delta_bias);
  a.initial_state = opt_ptr<acc_t>(in.initial_state);
  a.B = bc_view<acc_t>(in.B, s);
  a.C = bc_view<acc_t>(in.C, s);
  a.out = out.defined() && out.numel() ? out.data_ptr<in_t>() : nullptr;
  a.checkpoints = checkpoints.data_ptr<acc_t>();
  a.last_state = last_state.defined() && last_state.numel() ? last_state.data_ptr<acc_t>() : nullptr;
  return a;
}

template <typename in_t, typename acc_t>
ScanBwdArgs<in_t, acc_t> make_bwd_args(const ScanInputs& in, const ScanShape& s, const at::Tensor& dout,
                                       const std::optional<at::Tensor>& dlast, const at::Tensor& checkpoints,
                                       std::vector<at::Tensor>& buf, int64_t tiles) {
  ScanBwdArgs<in_t, acc_t> a{};
  a.f = make_fwd_args<in_t, acc_t>(in, s, at::Tensor(), checkpoints, at::Tensor());
  a.dout = dout.data_ptr<in_t>();
  a.dlast_state = opt_ptr<acc_t>(dlast);
  a.du = buf[kDu].data_ptr<in_t>();
  a.ddelta = buf[kDdelta].data_ptr<in_t>();
  a.dz = in.z.has_value() ? buf[kDz].data_ptr<in_t>() : nullptr;
  a.dA_part = buf[kDAPart].data_ptr<acc_t>();
  a.dB_part = buf[kDBPart].data_ptr<acc_t>();
  a.dC_part = buf[kDCPart].data_ptr<acc_t>();
  a.dD_part = buf[kDDPart].data_ptr<acc_t>();
  a.dbias_part = buf[kDBiasPart].data_ptr<acc_t>();
  a.dinitial_state = buf[kDInit].data_ptr<acc_t>();
  a.tiles = tiles;
  return a;
}

#define GMAMBA_INSTANTIATE_ARGS(in_t, acc_t)                                                                   \
  template ScanFwdArgs<in_t, acc_t> make_fwd_args<in_t, acc_t>(const ScanInputs&, const ScanShape&,            \
                                                               const at::Tensor&, const at::Tensor&,           \
                                                               const at::Tensor&);                             \
  template ScanBwdArgs<in_t, acc_t> make_bwd_args<in_t, acc_t>(const ScanInputs&, const ScanShape&,            \
                                                               const at::Tensor&,                              \
                                                               const std::optional<at::Tensor>&,               \
                                                               const at::Tensor&, std::vector<at::Tensor>&,    \
                                                               int64_t);
GMAMBA_INSTANTIATE_ARGS(double, double)
GMAMBA_INSTANTIATE_ARGS(float, float)
GMAMBA_INSTANTIATE_ARGS(at::Half, float)
GMAMBA_INSTANTIATE_ARGS(at::BFloat16, float)
#undef GMAMBA_INSTANTIATE_ARGS

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_forward(const ScanInputs& in, const ScanBackend& backend) {
  const ScanShape s = describe_scan(in);
  const auto acc_opts = in.u.options().dtype(acc_type_for(in.u.scalar_type()));
  at::Tensor out = at::empty_like(in.u);
  at::Tensor checkpoints = at::empty({s.batch, s.nchunks, s.dstate, s.dim}, acc_opts);
  at::Tensor last_state = in.initial_state.has_value() ? in.initial_state->clone()
                                                        : at::zeros({s.batch, s.dim, s.dstate}, acc_opts);
  if (s.batch > 0 && s.dim > 0 && s.len > 0) backend.forward(in, s, out, checkpoints, last_state);
  return {out, last_state, checkpoints};
}

// Brings a reduced (B, G, N, L) variable gradient back to the layout of the user's B or C.
static at::Tensor variable_grad_to_user_layout(const at::Tensor& grad_bgnl, const at::Tensor& like,
                                               bool channels_last) {
  at::Tensor g = channels_last ? grad_bgnl.permute({0, 3, 1, 2}) : grad_bgnl;  // (B, L, G, N)
  if (like.dim() == 3) g = g.squeeze(channels_last ? 2 : 1);
  return g.contiguous();
}

ScanGrads scan_backward(const ScanInputs& in, const at::Tensor& dout, const std::optional<at::Tensor>& dlast,
                        const at::Tensor& checkpoints, const ScanBackend& backend) {
  const ScanShape s = describe_scan(in);
  TORCH_CHECK_VALUE(dout.sizes() == in.u.sizes() && dout.scalar_type() == in.u.scalar_type() &&
                        dout.device() == in.u.device() && dout.is_contiguous(),
                    kOp, ": 'dout' must be a contiguous tensor like 'u'");
  const at::ScalarType acc = acc_type_for(in.u.scalar_type());
  if (dlast.has_value()) {
    check_weight(*dlast, in.u, acc, "dlast_state");
    check_shape(*dlast, {s.batch, s.dim, s.dstate}, "dlast_state");
  }
  check_weight(checkpoints, in.u, acc, "checkpoints");
  check_shape(checkpoints, {s.batch, s.nchunks, s.dstate, s.dim}, "checkpoints");

  const auto acc_opts = in.u.options().dtype(acc);
  const int64_t tiles = backend.bc_partial_rows ? backend.bc_partial_rows(s)
                                                : (s.dim_per_group + backend.tile_width - 1) / backend.tile_width;
  const bool runs = s.batch > 0 && s.dim > 0 && s.len > 0;
  auto part = [&](at::IntArrayRef sizes) {
    return runs && backend.writes_every_partial ? at::empty(sizes, acc_opts) : at::zeros(sizes, acc_opts);
  };
  auto bc_part = [&](const at::Tensor& t) {
    return t.dim() == 2 ? part({s.batch, s.nchunks, s.dstate, s.dim}) : part({s.batch, s.groups, tiles, s.dstate, s.len});
  };
  std::vector<at::Tensor> buf(kNumBwdBuffers);
  buf[kDu] = at::empty_like(in.u);
  buf[kDdelta] = at::empty_like(in.u);
  buf[kDz] = in.z.has_value() ? at::empty_like(in.u) : empty_grad(in.u);
  buf[kDAPart] = part({s.batch, s.nchunks, s.dstate, s.dim});
  buf[kDBPart] = bc_part(in.B);
  buf[kDCPart] = bc_part(in.C);
  buf[kDDPart] = part({s.batch, s.nchunks, s.dim});
  buf[kDBiasPart] = part({s.batch, s.nchunks, s.dim});
  buf[kDInit] = dlast.has_value() ? dlast->clone() : at::zeros({s.batch, s.dim, s.dstate}, acc_opts);
  if (runs) {
    backend.backward(in, s, dout, dlast, checkpoints, buf, tiles);
  } else {
    buf[kDu].zero_(), buf[kDdelta].zero_(), buf[kDz].zero_();
  }

  // Fixed-order reductions of the partials (ATen's sums are deterministic run to run).
  auto reduce_bc = [&](const at::Tensor& part, const at::Tensor& like) {
    if (like.dim() == 2) return part.sum(at::IntArrayRef{0, 1}).t().contiguous();  // (d, N)
    return variable_grad_to_user_layout(part.sum(2), like, s.channels_last);
  };
  ScanGrads g;
  g.du = buf[kDu];
  g.ddelta = buf[kDdelta];
  g.dz = buf[kDz];
  g.dA = buf[kDAPart].sum(at::IntArrayRef{0, 1}).t().contiguous();
  g.dB = reduce_bc(buf[kDBPart], in.B);
  g.dC = reduce_bc(buf[kDCPart], in.C);
  g.dD = in.D.has_value() ? buf[kDDPart].sum(at::IntArrayRef{0, 1}) : empty_grad(in.A);
  g.ddelta_bias = in.delta_bias.has_value() ? buf[kDBiasPart].sum(at::IntArrayRef{0, 1}) : empty_grad(in.A);
  g.dinitial_state = in.initial_state.has_value() ? buf[kDInit] : empty_grad(in.A);
  return g;
}

}  // namespace gmamba
