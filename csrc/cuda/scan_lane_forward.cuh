#pragma once
// Forward selective scan for channels-last (B, L, d) inputs with d_state <= 16: one thread per
// (batch, channel, segment), lanes over channels (each step's tokens are one coalesced row), steps in
// order with every state in registers. Per step the B and C rows (N values, shared by the warp) are read
// as vectors and each state costs an exp, two FMAs and a multiply: no per-state loads or index arithmetic.
// The rows are cut into segments for parallelism: a summary launch gives each segment's end state from a
// zero start, chain_chunks turns those into start states, and the output launch runs every segment from
// its start state, writing the output and the backward's checkpoints (the state before every kChunk
// steps). Larger d_state takes the chunk kernels of selective_scan_cuda.cu.
#include "gmamba/scan_chunk.h"
#include "scan_segments.cuh"
#include "vector_load.cuh"

namespace gmamba {
namespace lane_scan {

constexpr int kThreads = 128;
// Threads per SM the segment plan aims at, at most (registers allow 4-6 blocks of 128 threads).
constexpr int kThreadsPerSM = 640;

// N values of a B or C row (zero past N): 16-byte vector loads when the row is whole and aligned.
template <int kN, typename acc_t>
__device__ __forceinline__ void load_row(const acc_t* row, int N, acc_t (&out)[kN]) {
  if (N == kN && reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    load_vec16(row, out);
    return;
  }
#pragma unroll
  for (int n = 0; n < kN; ++n) out[n] = n < N ? __ldg(row + n) : acc_t(0);
}

// kSummary: each segment's end state from a zero start and its summed dt. Otherwise: output,
// checkpoints and (single segment) the last state. States n >= N run with A = 0 and B = 0: they stay 0.
template <int kN, bool kSummary, typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) channels_forward(ScanFwdArgs<in_t, acc_t> a, ScanSegments<acc_t> seg) {
  const ScanShape& s = a.s;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // b * d + c
  if (idx >= s.batch * s.dim) return;
  const int N = static_cast<int>(s.dstate);
  const int64_t b = idx / s.dim, c = idx % s.dim, g = c / s.dim_per_group;
  const int64_t segment = blockIdx.y;
  const int64_t begin = segment * seg.len;
  const int64_t end = begin + seg.len < s.len ? begin + seg.len : s.len;

  // A of this thread's channel in shared memory, one column per thread (each thread reads only its own:
  // no barrier, no bank conflicts), which leaves the registers to the state and the prefetched step.
  __shared__ acc_t A[kN][kThreads];
  acc_t h[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    A[n][threadIdx.x] = n < N ? finite_decay_coefficient(a.A[c * N + n]) : acc_t(0);
    h[n] = 0;
    if (kSummary || n >= N) continue;
    if (seg.count > 1) {
      h[n] = seg.state[((b * seg.count + segment) * N + n) * s.dim + c];
    } else if (a.initial_state) {
      h[n] = a.initial_state[s.state_index(b, c, n)];
    }
  }
  const acc_t bias = a.delta_bias ? a.delta_bias[c] : acc_t(0);
  const acc_t Dc = a.D ? a.D[c] : acc_t(0);
  // Variable B/C: (B, L, G, N) rows, stride sl per step; constant: the channel's (N,) row, stride 0.
  const acc_t* B_row = a.B.ptr + (a.B.variable ? b * a.B.sb + g * a.B.sg : c * a.B.sc);
  const acc_t* C_row = a.C.ptr + (a.C.variable ? b * a.C.sb + g * a.C.sg : c * a.C.sc);
  const int64_t B_step = a.B.variable ? a.B.sl : 0, C_step = a.C.variable ? a.C.sl : 0;
  const int64_t x0 = b * s.sb + c;  // channels-last: step l of this channel at x0 + l * d
  acc_t dt_total = 0;

  // One step of software pipelining: step l + 1's loads are issued before step l's arithmetic (ncu, run
  // 16: without it three quarters of the stall cycles waited on these loads). u, delta and z stay in the
  // input type until used: converting bf16 / fp16 at the load made the conversion wait on the load right
  // there (ncu, run 26: bf16 output pass 7.8 cycles of scoreboard stall per instruction against 3.5 for
  // float32, with the same instruction counts).
  struct Step {
    in_t u, delta, z;
    acc_t B[kN], C[kN];
  };
  auto load_step = [&](int64_t l, Step& st) {
    const int64_t i = x0 + l * s.sl;
    st.u = a.u[i];
    st.delta = a.delta[i];
    load_row<kN>(B_row + l * B_step, N, st.B);
    if constexpr (!kSummary) {
      st.z = a.z ? a.z[i] : static_cast<in_t>(0.f);
      load_row<kN>(C_row + l * C_step, N, st.C);
    }
  };
  Step cur, next;
  if (begin < end) load_step(begin, cur);
  for (int64_t l = begin; l < end; ++l) {
    if (l + 1 < end) load_step(l + 1, next);
    if (!kSummary && l % kChunk == 0) {
#pragma unroll
      for (int n = 0; n < kN; ++n)
        if (n < N) a.checkpoints[s.chunk_state_index(b, l / kChunk, n, c)] = h[n];
    }
    const acc_t u = to_acc(cur.u, acc_t(0));
    const acc_t dt = discretize_delta(to_acc(cur.delta, acc_t(0)), bias, s.softplus);
    const acc_t dtu = dt * u;
#pragma unroll
    for (int n = 0; n < kN; ++n) h[n] = fast_exp(dt * A[n][threadIdx.x]) * h[n] + dtu * cur.B[n];
    if constexpr (kSummary) {
      dt_total += dt;
    } else {
      acc_t y = Dc * u;
#pragma unroll
      for (int n = 0; n < kN; ++n) y += cur.C[n] * h[n];
      if (a.z) y *= silu(to_acc(cur.z, acc_t(0)));
      a.out[x0 + l * s.sl] = static_cast<in_t>(y);
    }
    cur = next;
  }

  if constexpr (kSummary) {
#pragma unroll
    for (int n = 0; n < kN; ++n)
      if (n < N) seg.state[((b * seg.count + segment) * N + n) * s.dim + c] = h[n];
    seg.dt_sum[(b * seg.count + segment) * s.dim + c] = dt_total;
  } else if (seg.count == 1 && a.last_state) {
#pragma unroll
    for (int n = 0; n < kN; ++n)
      if (n < N) a.last_state[s.state_index(b, c, n)] = h[n];
  }
}

}  // namespace lane_scan
}  // namespace gmamba
