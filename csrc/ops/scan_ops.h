#pragma once
// The op-level entry points (schema argument lists in, tuples out) for a backend, written once.
#include "scan_host.h"

namespace gmamba {

template <typename Backend>
struct ScanOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
      const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state,
      bool delta_softplus, bool channels_last) {
    return scan_forward(pack_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, channels_last),
                        Backend::get());
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor>
  backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state, const at::Tensor& checkpoints,
           const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
           const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
           const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state,
           bool delta_softplus, bool channels_last) {
    const ScanGrads g = scan_backward(
        pack_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, channels_last), dout,
        dlast_state, checkpoints, Backend::get());
    return {g.du, g.ddelta, g.dA, g.dB, g.dC, g.dD, g.dz, g.ddelta_bias, g.dinitial_state};
  }
};

}  // namespace gmamba
