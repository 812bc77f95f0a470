#pragma once
// Plain-old-data views of the selective scan's tensors, shared by host and device code.
// All indices are 64-bit: no size that fits in memory overflows them.
#include <cstdint>

#include "macros.h"

namespace gmamba {

// Steps per chunk: the forward stores one state checkpoint per chunk, the backward recomputes a chunk's
// states from it. Both backends use the same value so checkpoints mean the same thing everywhere.
constexpr int kChunk = 16;
// Largest d_state we accept (a documented limit, checked on the host).
constexpr int64_t kMaxDState = 256;

// B or C: "variable" (B, G, N, L) in either memory order, or "constant" (d, N). One formula covers all
// modes; unused strides are zero.
template <typename acc_t>
struct BCView {
  const acc_t* ptr;
  int64_t sb, sg, sc, sn, sl;
  bool variable;
  GMAMBA_HD acc_t at(int64_t b, int64_t g, int64_t c, int64_t n, int64_t l) const {
    return ptr[b * sb + g * sg + c * sc + n * sn + l * sl];
  }
};

struct ScanShape {
  int64_t batch, dim, len, dstate, groups, dim_per_group, nchunks;
  // u, delta, z, out and their gradients share one layout: (B, d, L) or (B, L, d), contiguous.
  int64_t sb, sc, sl;
  bool channels_last, softplus;
  GMAMBA_HD int64_t x_index(int64_t b, int64_t c, int64_t l) const { return b * sb + c * sc + l * sl; }
  // Checkpoints, carries and per-chunk partials are laid out (B, nchunks, N, d): channel fastest, so
  // neighbouring channels (GPU lanes, CPU vector lanes) touch neighbouring addresses.
  GMAMBA_HD int64_t chunk_state_index(int64_t b, int64_t k, int64_t n, int64_t c) const {
    return ((b * nchunks + k) * dstate + n) * dim + c;
  }
  GMAMBA_HD int64_t chunk_index(int64_t b, int64_t k, int64_t c) const { return (b * nchunks + k) * dim + c; }
  // initial_state, last_state and their gradients: (B, d, N).
  GMAMBA_HD int64_t state_index(int64_t b, int64_t c, int64_t n) const { return (b * dim + c) * dstate + n; }
};

template <typename in_t, typename acc_t>
struct ScanFwdArgs {
  ScanShape s;
  const in_t *u, *delta, *z;  // z may be null
  const acc_t *A, *D, *delta_bias, *initial_state;  // D, delta_bias, initial_state may be null
  BCView<acc_t> B, C;
  in_t* out;
  acc_t* checkpoints;  // (B, nchunks, N, d): the state before each chunk
  acc_t* last_state;   // (B, d, N)
};

template <typename in_t, typename acc_t>
struct ScanBwdArgs {
  ScanFwdArgs<in_t, acc_t> f;  // forward inputs; f.out unused
  const in_t* dout;
  const acc_t* dlast_state;  // may be null
  in_t *du, *ddelta, *dz;    // dz null without z
  // Partials, reduced on the host in a fixed order (deterministic, no atomics):
  acc_t* dA_part;     // (B, nchunks, N, d)
  acc_t* dB_part;     // variable: (B, G, tiles, N, L); constant: (B, nchunks, N, d)
  acc_t* dC_part;     // as dB_part
  acc_t* dD_part;     // (B, nchunks, d)
  acc_t* dbias_part;  // (B, nchunks, d)
  acc_t* dinitial_state;  // (B, d, N)
  int64_t tiles;          // channel tiles per group for the variable partials
};

}  // namespace gmamba
