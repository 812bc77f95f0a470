// The op schemas, declared once; each backend registers its implementation under its dispatch key.
#include <torch/library.h>

TORCH_LIBRARY(gmamba_ext, m) {
  // Returns (out, last_state, checkpoints); checkpoints (B, ceil(L/16), N, d) feed the backward.
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, Tensor? initial_state, bool delta_softplus, bool channels_last) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients of absent optional inputs come back as empty tensors.
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor? dlast_state, Tensor checkpoints, Tensor u, Tensor delta, "
      "Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? initial_state, "
      "bool delta_softplus, bool channels_last) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // GSSM stages around the scan. conv_silu: xz (B, L, 2d) -> silu(depthwise "same" conv) of its halves
  // (x1, z1); weight (2d, K), bias (2d,).
  m.def("conv_silu_fwd(Tensor xz, Tensor weight, Tensor bias) -> (Tensor, Tensor)");
  m.def("conv_silu_bwd(Tensor dx1, Tensor dz1, Tensor xz, Tensor weight, Tensor bias) -> (Tensor, Tensor, Tensor)");
  // FGMM with the global gate: returns (x2, s, a, g); w1 (d/4, d), b1, w2 (2, d/4), b2, ratio ().
  m.def(
      "fgmm_fwd(Tensor x1, Tensor f, Tensor c, Tensor gate_logit, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor ratio) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (dx1, df, dc, dgate_logit, dw1, db1, dw2, db2, dratio).
  m.def(
      "fgmm_bwd(Tensor dx2, Tensor x1, Tensor f, Tensor c, Tensor gate_logit, Tensor s, Tensor a, Tensor g, "
      "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor ratio) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The whole mixer (csrc/ops/gssm_fused.h): x (B, H, W, C) in the compute dtype; params in the order of
  // gssm_reference.expected_shapes; one initial state (or None) per scan direction. gssm_fwd returns the
  // output (B, L, C) and, with save, the two lists of tensors the backward needs (front, scan). The backward
  // is gssm_bwd_scan (-> dx2, the gradients of the parameters from the first scan direction's on, of the
  // initial states) then gssm_bwd_front (-> dx, the gradients of the parameters before those); an empty 1-D
  // tensor marks an absent gradient (a parameter the variant does not use, an initial state not given).
  // consume: the caller will not read `saved` again (no retained graph), so each saved tensor's memory is
  // released once the op has read it for the last time (the tensor becomes empty): what is dead does not
  // count toward the peak. With consume false (the default) `saved` is left as it was.
  m.def(
      "gssm_fwd(Tensor x, Tensor[] params, Tensor?[] initial_states, int H, int W, str variant, str mask, "
      "bool single_dt_bias, bool save) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "gssm_bwd_scan(Tensor dout, Tensor x, Tensor[] params, Tensor?[] initial_states, Tensor[] saved, int H, "
      "int W, str variant, str mask, bool single_dt_bias, bool consume=False) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "gssm_bwd_front(Tensor dout, Tensor dx2, Tensor x, Tensor[] params, Tensor[] saved, int H, int W, "
      "str variant, str mask, bool single_dt_bias, bool consume=False) -> (Tensor, Tensor[])");
}
