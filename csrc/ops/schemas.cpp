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
}
