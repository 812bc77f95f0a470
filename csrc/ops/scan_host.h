#pragma once
// Host-side glue of the selective scan shared by every backend: argument checks (clear errors that name
// the argument), output allocation, kernel-argument packing, and the fixed-order reductions of partials.
#include <ATen/ATen.h>

#include <optional>

#include "gmamba/scan_params.h"

namespace gmamba {

struct ScanInputs {
  at::Tensor u, delta, A, B, C;
  std::optional<at::Tensor> D, z, delta_bias, initial_state;
  bool softplus;
  bool channels_last;
};

struct ScanGrads {
  at::Tensor du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state;
};

// Validates every argument and returns sizes and strides. Throws ValueError / TypeError naming the argument.
ScanShape describe_scan(const ScanInputs& in);

// Kernel argument packs (pointers into the given tensors).
template <typename in_t, typename acc_t>
ScanFwdArgs<in_t, acc_t> make_fwd_args(const ScanInputs& in, const ScanShape& s, const at::Tensor& out,
                                       const at::Tensor& checkpoints, const at::Tensor& last_state);

// Backend hooks. A backend launches its kernels on packed arguments; everything else is shared.
struct ScanBackend {
  void (*forward)(const ScanInputs&, const ScanShape&, const at::Tensor& out, const at::Tensor& checkpoints,
                  const at::Tensor& last_state);
  // Fills du/ddelta/dz and the partial buffers named in ScanBwdArgs.
  void (*backward)(const ScanInputs&, const ScanShape&, const at::Tensor& dout,
                   const std::optional<at::Tensor>& dlast, const at::Tensor& checkpoints,
                   std::vector<at::Tensor>& buffers, int64_t tiles);
  int64_t tile_width;  // channels per partial tile of variable dB/dC
  // Rows of variable dB/dC partials per (batch, group) when the backend sums several tiles itself (the CPU
  // sums each task's packs); null: one row per tile of tile_width channels.
  int64_t (*bc_partial_rows)(const ScanShape&) = nullptr;
  // True when backward writes every element of every partial buffer, so they need not be zero-filled first
  // (the fills were 7 % of a CPU backward at B=1, d=192, L=1024).
  bool writes_every_partial = false;
};

// Buffers passed to ScanBackend::backward, in this order.
enum BwdBuffer { kDu, kDdelta, kDz, kDAPart, kDBPart, kDCPart, kDDPart, kDBiasPart, kDInit, kNumBwdBuffers };

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_forward(const ScanInputs& in, const ScanBackend& backend);

ScanGrads scan_backward(const ScanInputs& in, const at::Tensor& dout, const std::optional<at::Tensor>& dlast,
                        const at::Tensor& checkpoints, const ScanBackend& backend);

template <typename in_t, typename acc_t>
ScanBwdArgs<in_t, acc_t> make_bwd_args(const ScanInputs& in, const ScanShape& s, const at::Tensor& dout,
                                       const std::optional<at::Tensor>& dlast, const at::Tensor& checkpoints,
                                       std::vector<at::Tensor>& buffers, int64_t tiles);

// The op schemas' argument lists, unpacked into ScanInputs.
ScanInputs pack_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& initial_state,
                       bool delta_softplus, bool channels_last);

}  // namespace gmamba
