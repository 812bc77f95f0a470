#pragma once
// The selective scan over one chunk of kChunk steps for W channel lanes, written for the CUDA kernels
// (W = 1: one channel per thread, a warp spans 32 channels). The CPU kernels have their own form of the
// same recurrences (csrc/cpu/scan_cpu_chunk.h: [step][lane] tiles, vector prologues and epilogues).
// State n is the outer loop, so the per-step arrays (T x W values) stay in registers whatever d_state is,
// and no (L, N) tensor is ever stored.
//
// Forward, one state n:   s_t = exp(dt_t A_n) s_{t-1} + dt_t B_t u_t,   y_t += C_t s_t
// Backward, one state n (g_t = total adjoint of s_t, reverse order, carry = adjoint of the chunk's end):
//   g_t = C_t dy_t + carry;  ddt_t += g_t (s_{t-1} decay_t A_n + B_t u_t);  du_t += g_t dt_t B_t
//   dB_t = g_t dt_t u_t;  dC_t = dy_t s_t;  dA_n += g_t s_{t-1} decay_t dt_t;  carry = decay_t g_t
#include "fast_exp.h"
#include "scan_math.h"
#include "scan_params.h"

namespace gmamba {

template <typename T>
GMAMBA_HD float to_acc(T v, float) { return static_cast<float>(v); }
GMAMBA_HD double to_acc(double v, double) { return v; }

// Which channels a work item covers: lanes w < active are channels c0 + w of group g.
struct LaneSet {
  int64_t b, g, c0, k;  // batch, group, first channel, chunk
  int active;           // lanes holding a real channel (the rest compute zeros)
};

template <int W, typename in_t, typename acc_t>
struct ChunkInputs {
  static constexpr int T = kChunk;
  acc_t u[T][W];
  acc_t dt[T][W];  // discretised delta; 0 on padding steps and lanes, which makes them identity steps
  int valid;       // steps of this chunk inside the sequence

  GMAMBA_HD void load(const ScanFwdArgs<in_t, acc_t>& a, const LaneSet& ls) {
    const ScanShape& s = a.s;
    const int64_t l0 = ls.k * T;
    valid = s.len - l0 < T ? static_cast<int>(s.len - l0) : T;
    // Gather first, then discretise in a separate branch-free loop that vectorises on the CPU.
GMAMBA_UNROLL
    for (int t = 0; t < T; ++t) {
GMAMBA_LANES
      for (int w = 0; w < W; ++w) {
        u[t][w] = acc_t(0);
        dt[t][w] = acc_t(0);
        if (t < valid && w < ls.active) {
          const int64_t c = ls.c0 + w;
          const int64_t i = s.x_index(ls.b, c, l0 + t);
          u[t][w] = to_acc(a.u[i], acc_t(0));
          dt[t][w] = to_acc(a.delta[i], acc_t(0)) + (a.delta_bias ? a.delta_bias[c] : acc_t(0));
        }
      }
    }
    if (!s.softplus) return;
GMAMBA_UNROLL
    for (int t = 0; t < T; ++t) {
GMAMBA_LANES
      for (int w = 0; w < W; ++w) {
        const acc_t sp = softplus(dt[t][w]);
        dt[t][w] = t < valid && w < ls.active ? sp : acc_t(0);  // padding stays an identity step
      }
    }
  }
};

// B or C of state n over the chunk's steps, per lane (0 on padding steps). Variable B/C do not depend on
// the channel, so one load serves every lane; constant ones are per channel, and a padding lane's channel
// may lie past d, so it reads nothing. Loading up front keeps the arithmetic loops branch-free.
template <int W, typename acc_t>
GMAMBA_HD void load_bc_column(const BCView<acc_t>& v, const LaneSet& ls, int64_t n, int valid,
                              acc_t (&out)[kChunk][W]) {
GMAMBA_UNROLL
  for (int t = 0; t < kChunk; ++t) {
    const int64_t l = ls.k * kChunk + t;
    if (v.variable) {
      const acc_t value = t < valid ? v.at(ls.b, ls.g, 0, n, l) : acc_t(0);
GMAMBA_LANES
      for (int w = 0; w < W; ++w) out[t][w] = value;
    } else {
GMAMBA_LANES
      for (int w = 0; w < W; ++w) out[t][w] = t < valid && w < ls.active ? v.at(ls.b, ls.g, ls.c0 + w, n, l) : acc_t(0);
    }
  }
}

// B or C of state n in the forward passes. CPU lanes (W > 1) load the column up front (branch-free
// arithmetic loops); a GPU thread (W = 1) loads each step where it is used, which keeps fewer values
// live (the column cost the forward summary kernel 118 -> 146 registers and 0.43 -> 0.70 ms, ncu runs
// 2 and 3). The backward keeps the column: it reuses the storage for dB.
template <int W, typename acc_t>
struct ForwardColumn {
  acc_t v[kChunk][W];
  GMAMBA_HD ForwardColumn(const BCView<acc_t>& view, const LaneSet& ls, int64_t n, int valid) {
    load_bc_column(view, ls, n, valid, v);
  }
  GMAMBA_HD acc_t operator()(int t, int w) const { return v[t][w]; }
};

template <typename acc_t>
struct ForwardColumn<1, acc_t> {
  const acc_t* base;  // the value at step 0 of this chunk (null for a padding lane)
  int64_t stride;
  int valid;
  GMAMBA_HD ForwardColumn(const BCView<acc_t>& view, const LaneSet& ls, int64_t n, int valid_steps)
      : base(view.variable || ls.active ? view.ptr + (ls.b * view.sb + ls.g * view.sg +
                                                      (view.variable ? 0 : ls.c0) * view.sc + n * view.sn +
                                                      ls.k * kChunk * view.sl)
                                        : nullptr),
        stride(view.sl),
        valid(valid_steps) {}
  GMAMBA_HD acc_t operator()(int t, int) const { return base && t < valid ? base[t * stride] : acc_t(0); }
};

// exp(dt A_n) for every step and lane: independent, so they vectorise (CPU) or pipeline (GPU).
template <int W, typename acc_t>
GMAMBA_HD void decays(const acc_t (&dt)[kChunk][W], const acc_t (&A_n)[W], acc_t (&out)[kChunk][W]) {
GMAMBA_UNROLL
  for (int t = 0; t < kChunk; ++t)
GMAMBA_LANES
    for (int w = 0; w < W; ++w) out[t][w] = fast_exp(dt[t][w] * A_n[w]);
}

template <typename acc_t>
GMAMBA_HD acc_t a_at(const acc_t* A, const LaneSet& ls, int w, int64_t n, int64_t N) {
  return w < ls.active ? finite_decay_coefficient(A[(ls.c0 + w) * N + n]) : acc_t(0);
}

// Runs the chunk from the states given by state_in(n, w); hands the end states to state_out(n, w, s).
// With kOutput, also writes out = (sum_n C s + D u) * silu(z).
template <bool kOutput, int W, typename in_t, typename acc_t, typename StateIn, typename StateOut>
GMAMBA_HD void chunk_forward(const ScanFwdArgs<in_t, acc_t>& a, const LaneSet& ls,
                             const ChunkInputs<W, in_t, acc_t>& x, StateIn state_in, StateOut state_out) {
  constexpr int T = kChunk;
  const ScanShape& s = a.s;
  acc_t y[T][W];
GMAMBA_UNROLL
  for (int t = 0; t < T; ++t)
GMAMBA_LANES
    for (int w = 0; w < W; ++w) y[t][w] = acc_t(0);

  for (int64_t n = 0; n < s.dstate; ++n) {
    acc_t A_n[W], st[W];
GMAMBA_LANES
    for (int w = 0; w < W; ++w) {
      A_n[w] = a_at(a.A, ls, w, n, s.dstate);
      st[w] = state_in(n, w);
    }
    const ForwardColumn<W, acc_t> Bn(a.B, ls, n, x.valid);
    const ForwardColumn<W, acc_t> Cn(a.C, ls, n, kOutput ? x.valid : 0);
    // exp inline: an array of decays costs the GPU registers and occupancy (ncu, run 3).
GMAMBA_UNROLL
    for (int t = 0; t < T; ++t) {
GMAMBA_LANES
      for (int w = 0; w < W; ++w) {
        st[w] = scan_step(fast_exp(x.dt[t][w] * A_n[w]), st[w], x.dt[t][w] * Bn(t, w) * x.u[t][w]);
        if constexpr (kOutput) y[t][w] += Cn(t, w) * st[w];
      }
    }
GMAMBA_LANES
    for (int w = 0; w < W; ++w) state_out(n, w, st[w]);
  }

  if constexpr (kOutput) {
GMAMBA_UNROLL
    for (int t = 0; t < T; ++t) {
GMAMBA_LANES
      for (int w = 0; w < W; ++w) {
        if (t >= x.valid || w >= ls.active) continue;
        const int64_t c = ls.c0 + w;
        const int64_t i = s.x_index(ls.b, c, ls.k * T + t);
        acc_t v = y[t][w] + (a.D ? a.D[c] * x.u[t][w] : acc_t(0));
        if (a.z) v *= silu(to_acc(a.z[i], acc_t(0)));
        a.out[i] = static_cast<in_t>(v);
      }
    }
  }
}

// dy = dout * silu(z) (or dout): the gradient reaching the scan's output y.
template <int W, typename in_t, typename acc_t>
GMAMBA_HD void load_dy(const ScanBwdArgs<in_t, acc_t>& a, const LaneSet& ls, int valid, acc_t (&dy)[kChunk][W]) {
  const ScanShape& s = a.f.s;
GMAMBA_UNROLL
  for (int t = 0; t < kChunk; ++t) {
GMAMBA_LANES
    for (int w = 0; w < W; ++w) {
      dy[t][w] = acc_t(0);
      if (t < valid && w < ls.active) {
        const int64_t i = s.x_index(ls.b, ls.c0 + w, ls.k * kChunk + t);
        dy[t][w] = to_acc(a.dout[i], acc_t(0));
        if (a.f.z) dy[t][w] *= silu(to_acc(a.f.z[i], acc_t(0)));
      }
    }
  }
}

// Backward through one chunk. carry(n, w) is read as the adjoint of the chunk's end state and must be
// updated by carry_out(n, w, g) to the adjoint of its start state. emit_bc(n, dB, dC) receives the
// per-step dB and dC of state n (before the reduction over channels). Writes du, ddelta, dz and the
// per-chunk partials of dA, dD, delta_bias (and of constant B/C, through emit_bc).
template <int W, typename in_t, typename acc_t, typename StateIn, typename CarryIn, typename CarryOut,
          typename EmitBC>
GMAMBA_HD void chunk_backward(const ScanBwdArgs<in_t, acc_t>& a, const LaneSet& ls,
                              const ChunkInputs<W, in_t, acc_t>& x, StateIn state_in, CarryIn carry_in,
                              CarryOut carry_out, EmitBC emit_bc) {
  constexpr int T = kChunk;
  const ScanShape& s = a.f.s;
  acc_t dy[T][W], ddt[T][W], du[T][W], y[T][W];
  load_dy<W>(a, ls, x.valid, dy);
GMAMBA_UNROLL
  for (int t = 0; t < T; ++t)
GMAMBA_LANES
    for (int w = 0; w < W; ++w) ddt[t][w] = du[t][w] = y[t][w] = acc_t(0);

  for (int64_t n = 0; n < s.dstate; ++n) {
    acc_t A_n[W], s0[W], st[T][W], Bn[T][W], Cn[T][W], decay[T][W];
GMAMBA_LANES
    for (int w = 0; w < W; ++w) {
      A_n[w] = a_at(a.f.A, ls, w, n, s.dstate);
      s0[w] = state_in(n, w);
    }
    load_bc_column(a.f.B, ls, n, x.valid, Bn);
    load_bc_column(a.f.C, ls, n, x.valid, Cn);
    decays(x.dt, A_n, decay);
    // Recompute this state's trajectory through the chunk (and y, which dz needs).
GMAMBA_UNROLL
    for (int t = 0; t < T; ++t) {
GMAMBA_LANES
      for (int w = 0; w < W; ++w) {
        const acc_t prev = t == 0 ? s0[w] : st[t - 1][w];
        st[t][w] = scan_step(decay[t][w], prev, x.dt[t][w] * Bn[t][w] * x.u[t][w]);
        if (a.f.z) y[t][w] += Cn[t][w] * st[t][w];
      }
    }
    acc_t g[W], dA[W];
GMAMBA_LANES
    for (int w = 0; w < W; ++w) {
      g[w] = carry_in(n, w);
      dA[w] = acc_t(0);
    }
    // Step t's B, C and state are dead once step t is done: Bn[t] becomes dB_t and st[t] becomes dC_t.
GMAMBA_UNROLL
    for (int t = T - 1; t >= 0; --t) {
GMAMBA_LANES
      for (int w = 0; w < W; ++w) {
        const acc_t prev = t == 0 ? s0[w] : st[t - 1][w];
        g[w] += Cn[t][w] * dy[t][w];
        const acc_t g_decay_prev = g[w] * decay[t][w] * prev;
        ddt[t][w] += g_decay_prev * A_n[w] + g[w] * Bn[t][w] * x.u[t][w];
        du[t][w] += g[w] * x.dt[t][w] * Bn[t][w];
        dA[w] += g_decay_prev * x.dt[t][w];
        Bn[t][w] = g[w] * x.dt[t][w] * x.u[t][w];
        st[t][w] = dy[t][w] * st[t][w];
        g[w] *= decay[t][w];
      }
    }
GMAMBA_LANES
    for (int w = 0; w < W; ++w) {
      carry_out(n, w, g[w]);
      if (w < ls.active) a.dA_part[s.chunk_state_index(ls.b, ls.k, n, ls.c0 + w)] = dA[w];
    }
    emit_bc(n, Bn, st);
  }

  // Per-step gradients of u, delta, z, and this chunk's partials of D and delta_bias.
GMAMBA_LANES
  for (int w = 0; w < W; ++w) {
    if (w >= ls.active) continue;
    const int64_t c = ls.c0 + w;
    const acc_t D = a.f.D ? a.f.D[c] : acc_t(0);
    const acc_t bias = a.f.delta_bias ? a.f.delta_bias[c] : acc_t(0);
    acc_t dD = 0, dbias = 0;
GMAMBA_UNROLL
    for (int t = 0; t < T; ++t) {
      if (t >= x.valid) continue;
      const int64_t i = s.x_index(ls.b, c, ls.k * T + t);
      dD += dy[t][w] * x.u[t][w];
      a.du[i] = static_cast<in_t>(du[t][w] + D * dy[t][w]);
      const acc_t dpre = discretize_delta_grad(to_acc(a.f.delta[i], acc_t(0)), bias, s.softplus, ddt[t][w]);
      dbias += dpre;
      a.ddelta[i] = static_cast<in_t>(dpre);
      if (a.f.z) {
        const acc_t zi = to_acc(a.f.z[i], acc_t(0));
        a.dz[i] = static_cast<in_t>(to_acc(a.dout[i], acc_t(0)) * (y[t][w] + D * x.u[t][w]) * silu_grad(zi));
      }
    }
    a.dD_part[s.chunk_index(ls.b, ls.k, c)] = dD;
    a.dbias_part[s.chunk_index(ls.b, ls.k, c)] = dbias;
  }
}

// Adjoint of the chunk's start state for each n with a zero adjoint at its end (CUDA's first backward
// pass): g_t = C_t dy_t + decay_{t+1} g_{t+1}, returned through out(n, w, decay_1 g_1).
template <int W, typename in_t, typename acc_t, typename Out>
GMAMBA_HD void chunk_local_adjoint(const ScanBwdArgs<in_t, acc_t>& a, const LaneSet& ls,
                                   const ChunkInputs<W, in_t, acc_t>& x, Out out) {
  constexpr int T = kChunk;
  acc_t dy[T][W];
  load_dy<W>(a, ls, x.valid, dy);
  for (int64_t n = 0; n < a.f.s.dstate; ++n) {
    acc_t A_n[W], g[W];
GMAMBA_LANES
    for (int w = 0; w < W; ++w) A_n[w] = a_at(a.f.A, ls, w, n, a.f.s.dstate), g[w] = acc_t(0);
    const ForwardColumn<W, acc_t> Cn(a.f.C, ls, n, x.valid);
GMAMBA_UNROLL
    for (int t = T - 1; t >= 0; --t)
GMAMBA_LANES
      for (int w = 0; w < W; ++w) g[w] = (g[w] + Cn(t, w) * dy[t][w]) * fast_exp(x.dt[t][w] * A_n[w]);
GMAMBA_LANES
    for (int w = 0; w < W; ++w) out(n, w, g[w]);
  }
}

}  // namespace gmamba
