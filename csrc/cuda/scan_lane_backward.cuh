#pragma once
// The gradient pass of the CUDA backward for variable B and C with d_state <= 16, either layout: the default
// there (d_state <= 8 since GPU runs 20-21, 9..16 since runs 24-25; see selective_scan_cuda.cu and
// docs/KERNELS.md).
// Same work split as bwd_chunk_grads (one thread per (batch, channel, 16-step chunk), a warp over 32
// channels of one chunk) and the same inputs (the chunk's checkpoint and its end adjoint from the summary
// pass and chain_chunks), but every state in registers and steps outer:
//   1) recompute the chunk's states from the checkpoint into shared memory (kSeg steps x kN states);
//   2) walk the steps in reverse with B and C rows as vector loads (channels-last; one broadcast address
//      per warp and state in channels-first), finishing du, ddelta and dz step by step (no per-step
//      arrays), and hand the kN dB + kN dC values of 32 / (2 kN) steps to the warp's fixed-order
//      reduce-scatter (32 values, one per lane).
// kN = 8 keeps the whole chunk (kSeg = 16: 512 B per thread, 64 KB per block). kN = 16 would need 128 KB
// per block for that, so it walks the chunk in two segments of 8 steps, the later first: steps 0..7 are
// recomputed twice (once to reach step 8's start state), a half more exps than one pass, and the state
// before the segment takes a ninth row (576 B per thread, 72 KB per block).
// bwd_chunk_grads keeps per-step arrays for every state in registers instead (217 registers at N = 8:
// 2 blocks per SM, 12.5 % occupancy); at kN = 8 this kernel needs 150 registers channels-last, 168
// channels-first (3 blocks per SM, 18.75 %), at kN = 16 (float accumulation only) 167 / 168 (channels-first
// with 2 KB more shared memory per block for the staged rows: 74 KB, still 3 blocks per SM).
// float64 spills a little (gradcheck only). H200, float32, (8, 4096, 96, 8), ncu: 146 against 282 us
// channels-last, 283 against 321 us channels-first; the whole backward op 1.25x-1.45x faster
// channels-last at L >= 1024 (about even at L = 256), 1.04x-1.35x channels-first
// (benchmarks/results/2026-11-27-h200-523eab7/ab_scan_bwd.md). kN = 16, (8, 2048-3136, 1536, 16): 1.6x
// channels-last, 1.1x-1.3x channels-first (2026-11-27-h200-48eb045/ab_n16/ab_scan_bwd.md).
#include <type_traits>

#include "scan_chunk_threads.cuh"
#include "scan_lane_forward.cuh"

namespace gmamba {
namespace lane_scan {

constexpr int kBwdThreads = chunk_threads::kWarp * chunk_threads::kWarpsPerBlock;

// Steps whose states one pass keeps in shared memory: 16 x 8 or 8 x 16 values per thread.
template <int kN>
constexpr int lane_backward_segment() {
  static_assert(kN == 8 || kN == 16, "lane_backward is built for kN = 8 and 16");
  return kN == 8 ? kChunk : kChunk / 2;
}

// Shared-memory rows (kN states each) before the segment's steps: with two segments, the state before
// the segment lives there too (kept in registers, kN = 16 took 168 registers and spilled 16 bytes).
template <int kN>
constexpr int lane_backward_start_rows() {
  return lane_backward_segment<kN>() < kChunk ? 1 : 0;
}

// Channels-first with kN = 16: B and C rows lie at stride L, and their 2 x 16 addresses, live across the
// steps, took 255 registers and spilled. So each warp stages kStageSteps steps of both in shared memory
// ([B | C][step][kN], zero past N and past L) with loads along L, and each step reads its rows back as
// broadcast vectors. kN = 8 channels-first keeps its direct loads (168 registers, run in GPU runs 20-25).
constexpr int kStageSteps = 4;
template <int kN, bool kChannelsLast>
constexpr bool lane_backward_stages_rows() {
  return !kChannelsLast && kN == 16;
}

template <int kN, bool kChannelsLast, typename acc_t>
constexpr size_t lane_backward_smem() {
  const size_t traj = static_cast<size_t>(lane_backward_start_rows<kN>() + lane_backward_segment<kN>()) * kN * kBwdThreads;
  const size_t stage = lane_backward_stages_rows<kN, kChannelsLast>() ? 2 * kStageSteps * kN * kBwdThreads / chunk_threads::kWarp : 0;
  return (traj + stage) * sizeof(acc_t);
}

// The kN instance that covers this call (8 or 16), 0 where none does: B and C must be variable (or
// grouped), and d_state above 8 is built for float accumulation only (float64 is for gradcheck).
inline int lane_backward_states(const ScanShape& s, bool b_variable, bool c_variable, bool float_acc) {
  if (!b_variable || !c_variable) return 0;
  if (s.dstate <= 8) return 8;
  return s.dstate <= 16 && float_acc ? 16 : 0;
}

// One step's B or C row: kN values, zero past N. kContiguous (channels-last): vector loads. Otherwise
// (channels-first) at stride sn = L, where every lane of the warp reads the same address. A compile-time
// choice: with both paths in one kernel ptxas took 239 registers instead of 153.
template <bool kContiguous, int kN, typename acc_t>
__device__ __forceinline__ void load_step_row(const acc_t* row, int N, int64_t sn, acc_t (&out)[kN]) {
  if constexpr (kContiguous) {
    load_row<kN>(row, N, out);
  } else {
#pragma unroll
    for (int n = 0; n < kN; ++n, row += sn) out[n] = n < N ? __ldg(row) : acc_t(0);
  }
}

// A staged row back from shared memory (16-byte aligned): kN values, zeros included.
template <int kN, typename acc_t>
__device__ __forceinline__ void read_staged_row(const acc_t* row, acc_t (&out)[kN]) {
  if constexpr (std::is_same_v<acc_t, float> && kN % 4 == 0) {
#pragma unroll
    for (int j = 0; j < kN / 4; ++j) {
      const float4 v = reinterpret_cast<const float4*>(row)[j];
      out[4 * j] = v.x, out[4 * j + 1] = v.y, out[4 * j + 2] = v.z, out[4 * j + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int n = 0; n < kN; ++n) out[n] = row[n];
  }
}

template <int kN, bool kChannelsLast, typename in_t, typename acc_t>
__global__ void __launch_bounds__(kBwdThreads) lane_backward(ScanBwdArgs<in_t, acc_t> a, const acc_t* carry) {
  using namespace chunk_threads;
  constexpr int T = kChunk, kSeg = lane_backward_segment<kN>(), kSegments = T / kSeg;
  constexpr int kStartRows = lane_backward_start_rows<kN>();
  // Steps per reduce-scatter: their kN dB and kN dC values fill the warp's 32 lanes.
  constexpr int kGroup = kWarp / (2 * kN);
  static_assert(kGroup * 2 * kN == kWarp && kSeg % kGroup == 0, "whole step groups per segment");
  constexpr bool kStage = lane_backward_stages_rows<kN, kChannelsLast>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // [kStartRows + kSeg][kN][kBwdThreads]: (the state before the segment,) h after each of its steps;
  // then, with kStage, each warp's [2][kStageSteps][kN] staged B and C rows.
  acc_t* traj = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* stage = traj + (kStartRows + kSeg) * kN * kBwdThreads + (threadIdx.x / kWarp) * (2 * kStageSteps * kN);
  const ThreadChunk tc = locate(a.f.s, a.tiles);
  if (!tc.live) return;  // whole warps
  const ScanShape& s = a.f.s;
  const LaneSet& ls = tc.ls;
  const int N = static_cast<int>(s.dstate);
  const bool active = ls.active;  // a padding lane computes zeros and touches no channel data
  const int64_t b = ls.b, c = ls.c0, k = ls.k, l0 = ls.k * T;
  const int valid = s.len - l0 < T ? static_cast<int>(s.len - l0) : T;
  const int lane = threadIdx.x % kWarp;
  // h after step t0 + t of the segment starting at step t0; t = -1 is the start row (kStartRows = 1).
  auto state = [&](int t, int n) -> acc_t& {
    return traj[((t + kStartRows) * kN + n) * kBwdThreads + threadIdx.x];
  };
  auto checkpoint = [&](int n) {
    return active && n < N ? a.f.checkpoints[s.chunk_state_index(b, k, n, c)] : acc_t(0);
  };

  // h0: with one segment, the chunk's checkpoint (the state before it) in registers.
  acc_t A[kN], h0[kN], g[kN], dA[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    const bool real = active && n < N;
    A[n] = real ? finite_decay_coefficient(a.f.A[c * N + n]) : acc_t(0);
    h0[n] = kStartRows == 0 ? checkpoint(n) : acc_t(0);
    g[n] = real ? carry[s.chunk_state_index(b, k, n, c)] : acc_t(0);
    dA[n] = 0;
  }
  const acc_t bias = active && a.f.delta_bias ? a.f.delta_bias[c] : acc_t(0);
  const acc_t Dc = active && a.f.D ? a.f.D[c] : acc_t(0);
  const acc_t* B_row = a.f.B.ptr + b * a.f.B.sb + ls.g * a.f.B.sg;
  const acc_t* C_row = a.f.C.ptr + b * a.f.C.sb + ls.g * a.f.C.sg;

  // kStage: the whole warp stages steps [t, t + kStageSteps) of B (and C), lanes along L.
  auto stage_rows = [&](int t, bool with_c) {
    constexpr int kPerMatrix = kStageSteps * kN;
    __syncwarp();  // every lane is done with the rows staged before
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      if (m == 1 && !with_c) break;
      const acc_t* row = m == 0 ? B_row : C_row;
      const int64_t sn = m == 0 ? a.f.B.sn : a.f.C.sn, sl = m == 0 ? a.f.B.sl : a.f.C.sl;
#pragma unroll
      for (int r = 0; r < kPerMatrix / kWarp; ++r) {
        const int e = r * kWarp + lane, n = e / kStageSteps, q = e % kStageSteps;
        const int64_t l = l0 + t + q;
        stage[m * kPerMatrix + q * kN + n] = n < N && l < s.len ? __ldg(row + n * sn + l * sl) : acc_t(0);
      }
    }
    __syncwarp();
  };
  // Step t's B or C row (zero past N).
  auto load_B = [&](int t, acc_t(&out)[kN]) {
    if constexpr (kStage) read_staged_row<kN>(stage + (t % kStageSteps) * kN, out);
    else load_step_row<kChannelsLast, kN>(B_row + (l0 + t) * a.f.B.sl, N, a.f.B.sn, out);
  };
  auto load_C = [&](int t, acc_t(&out)[kN]) {
    if constexpr (kStage) read_staged_row<kN>(stage + (kStageSteps + t % kStageSteps) * kN, out);
    else load_step_row<kChannelsLast, kN>(C_row + (l0 + t) * a.f.C.sl, N, a.f.C.sn, out);
  };

  // A step's u and dt (both 0 on padding steps and lanes: identity steps). Recomputed in the reverse
  // walk rather than kept: per-step arrays held across the walk took every register (ptxas: 255).
  auto step_inputs = [&](int t, acc_t& u, acc_t& dt) {
    const bool in = active && t < valid;
    const int64_t i = s.x_index(b, c, l0 + t);
    u = in ? to_acc(a.f.u[i], acc_t(0)) : acc_t(0);
    dt = in ? discretize_delta(to_acc(a.f.delta[i], acc_t(0)), bias, s.softplus) : acc_t(0);
  };

  acc_t dD = 0, dbias = 0;
  const int64_t part_row = ((b * s.groups + ls.g) * a.tiles + tc.tile) * s.dstate;
  // Walks the segment of steps [t0, t0 + kSeg) (t0 a compile-time constant), from the checkpoint.
  auto walk_segment = [&](auto t0_constant) {
    constexpr int t0 = decltype(t0_constant)::value;
    // 1) The segment's trajectory: steps before t0 only advance h; the state before t0 goes to the start
    // row when there is one.
    {
      acc_t h[kN];
#pragma unroll
      for (int n = 0; n < kN; ++n) h[n] = kStartRows == 0 ? h0[n] : checkpoint(n);
#pragma unroll 4
      for (int t = 0; t < t0 + kSeg; ++t) {
        if (kStartRows > 0 && t == t0) {
#pragma unroll
          for (int n = 0; n < kN; ++n) state(-1, n) = h[n];
        }
        if (kStage && t % kStageSteps == 0) stage_rows(t, false);
        acc_t u, dt;
        step_inputs(t, u, dt);
        acc_t Bv[kN];
        if (t < valid) {
          load_B(t, Bv);
        } else {
#pragma unroll
          for (int n = 0; n < kN; ++n) Bv[n] = 0;
        }
        const acc_t dtu = dt * u;
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          h[n] = fast_exp(dt * A[n]) * h[n] + dtu * Bv[n];
          if (t >= t0) state(t - t0, n) = h[n];
        }
      }
    }

    // 2) Reverse, kGroup steps at a time: v holds dB (each step of the group) then dC, kN states each.
#pragma unroll 1
    for (int group = (t0 + kSeg) / kGroup - 1; group >= t0 / kGroup; --group) {
      acc_t v[2 * T];
#pragma unroll
      for (int half = kGroup - 1; half >= 0; --half) {
        const int t = kGroup * group + half;
        if (kStage && t % kStageSteps == kStageSteps - 1) stage_rows(t - (kStageSteps - 1), true);
        const bool in = active && t < valid;
        const int64_t i = s.x_index(b, c, l0 + t);
        acc_t u, dt;
        step_inputs(t, u, dt);
        acc_t Bv[kN], Cv[kN];
        if (t < valid) {
          load_B(t, Bv);
          load_C(t, Cv);
        } else {
#pragma unroll
          for (int n = 0; n < kN; ++n) Bv[n] = Cv[n] = 0;
        }
        const acc_t dout = in ? to_acc(a.dout[i], acc_t(0)) : acc_t(0);
        const acc_t zt = in && a.f.z ? to_acc(a.f.z[i], acc_t(0)) : acc_t(0);
        const acc_t dy = a.f.z ? dout * silu(zt) : dout;
        acc_t y = Dc * u, ddt = 0, gB = 0;
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          const acc_t ht = state(t - t0, n);
          const acc_t hp = kStartRows > 0 || t > t0 ? state(t - t0 - 1, n) : h0[n];
          const acc_t decay = fast_exp(dt * A[n]);
          y += Cv[n] * ht;
          g[n] += Cv[n] * dy;
          const acc_t g_decay_prev = g[n] * decay * hp;
          ddt += g_decay_prev * A[n] + g[n] * Bv[n] * u;
          gB += g[n] * Bv[n];
          dA[n] += g_decay_prev * dt;
          v[half * kN + n] = g[n] * dt * u;
          v[T + half * kN + n] = dy * ht;
          g[n] *= decay;
        }
        if (in) {
          a.du[i] = static_cast<in_t>(gB * dt + Dc * dy);
          const acc_t dpre = discretize_delta_grad(to_acc(a.f.delta[i], acc_t(0)), bias, s.softplus, ddt);
          a.ddelta[i] = static_cast<in_t>(dpre);
          dbias += dpre;
          dD += dy * u;
          if (a.f.z) a.dz[i] = static_cast<in_t>(dout * y * silu_grad(zt));
        }
      }
      // Lane j ends with the sum over the warp's channels of value j: dB (j < 16) or dC of step
      // kGroup group + (j % 16) / kN, state j % kN.
      const acc_t sum = warp_reduce_scatter32(v);
      const int n = lane % kN;
      const int64_t l = l0 + kGroup * group + (lane % T) / kN;
      if (n < N && l < s.len) (lane < T ? a.dB_part : a.dC_part)[(part_row + n) * s.len + l] = sum;
    }
  };
  if constexpr (kSegments == 1) {
    walk_segment(std::integral_constant<int, 0>{});
  } else {
    static_assert(kSegments == 2, "one or two segments");
    walk_segment(std::integral_constant<int, kSeg>{});
    walk_segment(std::integral_constant<int, 0>{});
  }

  if (!active) return;
#pragma unroll
  for (int n = 0; n < kN; ++n)
    if (n < N) a.dA_part[s.chunk_state_index(b, k, n, c)] = dA[n];
  a.dD_part[s.chunk_index(b, k, c)] = dD;
  a.dbias_part[s.chunk_index(b, k, c)] = dbias;
}

}  // namespace lane_scan
}  // namespace gmamba
