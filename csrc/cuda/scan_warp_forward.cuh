#pragma once
// Forward selective scan for channels-first (B, d, L) inputs: one warp per (batch, channel) row, lanes
// along L with kItems consecutive steps each, so every load of u, delta, z, B and C is one coalesced
// vector load per lane. Per tile of kTile steps and per state n:
//   1) each lane folds its steps into the affine map h -> P h + S (P = exp(A_n * its summed dt));
//   2) a shuffle scan over the lanes composes the maps (Hillis-Steele, fixed order: reproducible);
//   3) each lane's start state is the composed map of the lanes before it applied to the tile's carry,
//      and the lane walks its steps again from it, adding C_t h_t to y_t.
// Each input is read once and the output written once: the whole forward is one launch with no
// per-chunk summary pass, as long as there are enough rows to fill the GPU. With few rows (long L,
// small B * d) the sequence is cut into segments: a summary launch gives each segment's end state from a
// zero start, `chain_chunks` turns those into start states, and the output launch runs the segments in
// parallel. The backward's checkpoints (the state before every kChunk steps) are written on the way.
#include <cstring>

#include "gmamba/scan_chunk.h"
#include "scan_segments.cuh"
#include "vector_load.cuh"

namespace gmamba {
namespace warp_scan {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kItems = 8;                     // consecutive steps per lane
constexpr int kTile = 32 * kItems;            // steps per warp iteration
constexpr int kRowsPerBlock = 4;              // one warp per row
constexpr int kWarpsPerSM = 16;               // rows (warps) per SM the segment plan aims at, at most
// Register cap through __launch_bounds__: 5 blocks (20 warps) per SM, no spills for the float kernels.
constexpr int kBlocksPerSM = 5;
constexpr int kLanesPerChunk = kChunk / kItems;
static_assert(kChunk % kItems == 0, "every checkpoint chunk starts at a lane's first step");

// kItems values of a row from step `first` (zero past `end`) as acc_t. A full, 16-byte aligned run is
// read as 16-byte vectors; the last lane of a row and misaligned rows take scalar loads.
template <typename T, typename acc_t>
__device__ __forceinline__ void load_items(const T* row, int64_t first, int64_t end, acc_t (&out)[kItems]) {
  const T* p = row + first;
  if (first + kItems <= end && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    load_vec16(p, out);
    return;
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) out[i] = first + i < end ? to_acc(p[i], acc_t(0)) : acc_t(0);
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store_items(T* row, int64_t first, int64_t end, const acc_t (&in)[kItems]) {
  constexpr int kPerVec = 16 / sizeof(T);
  T* p = row + first;
  if (first + kItems <= end && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
#pragma unroll
    for (int v = 0; v < kItems / kPerVec; ++v) {
      T vals[kPerVec];
#pragma unroll
      for (int e = 0; e < kPerVec; ++e) vals[e] = static_cast<T>(in[v * kPerVec + e]);
      uint4 raw;
      memcpy(&raw, vals, 16);
      reinterpret_cast<uint4*>(p)[v] = raw;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i)
    if (first + i < end) p[i] = static_cast<T>(in[i]);
}

// B or C over one lane's steps, state by state: a row of the variable (B, G, N, L) form (L contiguous),
// or the channel's constant (d, N) value repeated. Whether the lane's steps are whole, aligned vectors is
// decided once per tile, not per state (ncu, run 17: integer and predicate work led the pipelines).
template <typename acc_t>
struct BCLane {
  const acc_t* p;  // state 0: the value at the lane's first step (variable), or the channel's value
  int64_t stride;  // between states
  int valid;       // steps of this lane inside the segment (0..kItems)
  bool variable, vec;

  __device__ __forceinline__ BCLane(const BCView<acc_t>& v, const acc_t* var_base, int64_t c, int64_t first,
                                    int64_t end) {
    variable = v.variable;
    stride = v.sn;
    const int64_t left = end - first;
    valid = left <= 0 ? 0 : (left < kItems ? static_cast<int>(left) : kItems);
    p = variable ? var_base + first : v.ptr + c * v.sc;
    // first is a multiple of kItems, so the lane's run is aligned for every state when the base and
    // the state stride are.
    vec = variable && valid == kItems && reinterpret_cast<uintptr_t>(var_base) % 16 == 0 &&
          (stride * sizeof(acc_t)) % 16 == 0;
  }

  __device__ __forceinline__ void load(int n, acc_t (&out)[kItems]) const {
    const acc_t* q = p + n * stride;
    if (vec) {
      load_vec16(q, out);
    } else if (variable) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) out[i] = i < valid ? __ldg(q + i) : acc_t(0);
    } else {
      const acc_t value = __ldg(q);
#pragma unroll
      for (int i = 0; i < kItems; ++i) out[i] = value;
    }
  }
};

// Inclusive scan of affine maps over the warp: lane i ends with the composition of lanes 0..i's maps
// (earlier maps applied first).
template <typename acc_t>
__device__ __forceinline__ void warp_compose(acc_t& P, acc_t& S, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const acc_t prev_P = __shfl_up_sync(kFullMask, P, offset);
    const acc_t prev_S = __shfl_up_sync(kFullMask, S, offset);
    if (lane >= offset) {
      S = P * prev_S + S;
      P *= prev_P;
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// kSummary: the segment's end state from a zero start and its summed dt (no output).
// Otherwise: the output, the checkpoints, and (single pass) the last state.
template <bool kSummary, typename in_t, typename acc_t>
__global__ void __launch_bounds__(32 * kRowsPerBlock, kBlocksPerSM)
    rows_forward(ScanFwdArgs<in_t, acc_t> a, ScanSegments<acc_t> seg) {
  extern __shared__ unsigned char smem_raw[];
  const ScanShape& s = a.s;
  const int N = static_cast<int>(s.dstate);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  acc_t* carry = reinterpret_cast<acc_t*>(smem_raw) + warp * N;  // this row's state, per n
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;  // b * d + c
  if (row >= s.batch * s.dim) return;  // the whole warp leaves together
  const int64_t b = row / s.dim, c = row % s.dim, g = c / s.dim_per_group;
  const int64_t segment = blockIdx.y;
  const int64_t begin = segment * seg.len;
  const int64_t end = begin + seg.len < s.len ? begin + seg.len : s.len;

  for (int n = lane; n < N; n += 32) {
    acc_t h0 = 0;
    if (!kSummary && seg.count > 1) {
      h0 = seg.state[((b * seg.count + segment) * N + n) * s.dim + c];
    } else if (!kSummary && a.initial_state) {
      h0 = a.initial_state[s.state_index(b, c, n)];
    }
    carry[n] = h0;  // lane n % 32's slot: each lane reads back only what it wrote
  }

  const int64_t offset = row * s.len;  // channels-first: row (b, c) is contiguous
  const acc_t bias = a.delta_bias ? a.delta_bias[c] : acc_t(0);
  const acc_t Dc = a.D ? a.D[c] : acc_t(0);
  const acc_t* A_row = a.A + c * N;
  const acc_t* B_base = a.B.ptr + b * a.B.sb + g * a.B.sg;
  const acc_t* C_base = a.C.ptr + b * a.C.sb + g * a.C.sg;
  acc_t dt_total = 0;

  for (int64_t l0 = begin; l0 < end; l0 += kTile) {
    const int64_t first = l0 + lane * kItems;
    acc_t dt[kItems], dtu[kItems], y[kItems];
    load_items(a.delta + offset, first, end, dt);
    load_items(a.u + offset, first, end, dtu);
    acc_t lane_dt = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      dt[i] = first + i < end ? discretize_delta(dt[i], bias, s.softplus) : acc_t(0);  // padding: identity
      y[i] = Dc * dtu[i];
      dtu[i] *= dt[i];
      lane_dt += dt[i];
    }
    dt_total += lane_dt;

    // The carries of 32 states at a time live in registers (lane j holds state n0 + j) and in shared
    // memory between tiles, each lane touching only its own slots: no barrier in the state loop, so the
    // next state's B row and this state's C row load while the shuffles run (ncu, run 16: half the stall
    // cycles waited on these loads).
    const BCLane<acc_t> B_lane(a.B, B_base, c, first, end), C_lane(a.C, C_base, c, first, end);
    // Lanes that start a checkpoint chunk write the state before it, (B, nchunks, N, d): stride d per state.
    const bool writes_checkpoint = !kSummary && lane % kLanesPerChunk == 0 && first < end;
    acc_t* checkpoint = writes_checkpoint ? a.checkpoints + s.chunk_state_index(b, first / kChunk, 0, c) : nullptr;
    acc_t Bv[kItems];
    B_lane.load(0, Bv);
    acc_t my_carry = 0;
    for (int n = 0; n < N; ++n) {
      const int j = n & 31;
      if (j == 0) my_carry = n + lane < N ? carry[n + lane] : acc_t(0);
      acc_t Cv[kItems], Bnext[kItems];
      if constexpr (!kSummary) C_lane.load(n, Cv);
      if (n + 1 < N) B_lane.load(n + 1, Bnext);
      const acc_t A_n = finite_decay_coefficient(__ldg(A_row + n));
      // This lane's steps as h -> P h + S; P from one exp of the summed dt (the product of the steps'
      // decays up to rounding).
      acc_t decay[kItems], S = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        decay[i] = fast_exp(dt[i] * A_n);
        S = decay[i] * S + dtu[i] * Bv[i];
      }
      acc_t P = fast_exp(lane_dt * A_n);
      warp_compose(P, S, lane);
      const acc_t h_in = __shfl_sync(kFullMask, my_carry, j);
      const acc_t end_state = __shfl_sync(kFullMask, P * h_in + S, 31);
      if constexpr (!kSummary) {
        acc_t before_P = __shfl_up_sync(kFullMask, P, 1), before_S = __shfl_up_sync(kFullMask, S, 1);
        if (lane == 0) before_P = 1, before_S = 0;
        acc_t h = before_P * h_in + before_S;  // the state before this lane's first step
        if (writes_checkpoint) checkpoint[n * s.dim] = h;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          h = decay[i] * h + dtu[i] * Bv[i];
          y[i] += Cv[i] * h;
        }
      }
      if (lane == j) my_carry = end_state;
      if ((j == 31 || n + 1 == N) && n - j + lane < N) carry[n - j + lane] = my_carry;
#pragma unroll
      for (int i = 0; i < kItems; ++i) Bv[i] = Bnext[i];
    }

    if constexpr (!kSummary) {
      if (a.z) {
        acc_t zv[kItems];
        load_items(a.z + offset, first, end, zv);
#pragma unroll
        for (int i = 0; i < kItems; ++i) y[i] *= silu(zv[i]);
      }
      store_items(a.out + offset, first, end, y);
    }
  }

  if constexpr (kSummary) {
    dt_total = warp_sum(dt_total);
    const int64_t at = (b * seg.count + segment) * N;
    for (int n = lane; n < N; n += 32) seg.state[(at + n) * s.dim + c] = carry[n];
    if (lane == 0) seg.dt_sum[(b * seg.count + segment) * s.dim + c] = dt_total;
  } else {
    if (seg.count == 1 && a.last_state)
      for (int n = lane; n < N; n += 32) a.last_state[s.state_index(b, c, n)] = carry[n];
  }
}

}  // namespace warp_scan
}  // namespace gmamba
