#pragma once
// The CPU selective scan over one chunk of kChunk steps for a pack of kLanes channels: one SIMD vector of
// lanes per step. Same math as gmamba/scan_chunk.h (the CUDA kernels' one-channel-per-thread form, where
// the recurrences are written out); this form is the CPU's own because different things cost time here.
// Everything that does not depend on the state index n (dt, dt u, silu(z), dy, the epilogues) is done once
// per chunk in vector loops over whole [step][lane] tiles, B and C are read through a pointer and a stride,
// and full packs and chunks take branch-free loads and stores. In the shared form the per-element
// branches, index arithmetic and scalar sigmoids of the prologue and epilogue took longer than the scan.
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "cpu/lane_transpose.h"
#include "cpu/scan_lanes.h"
#include "gmamba/fast_exp.h"
#include "gmamba/scan_math.h"
#include "gmamba/scan_params.h"

namespace gmamba::cpu {

constexpr int kSteps = kChunk;
static_assert(kLanes % 8 == 0 && kSteps % 8 == 0, "tiles are moved as 8 x 8 blocks");

template <typename acc_t>
using Tile = acc_t[kSteps][kLanes];

// Lanes w < active are channels c0 + w of group g in batch b; steps t < valid are positions l0 + t.
// row is the pack's row of variable dB / dC partials within its group, shared by the packs of one task;
// the first of them writes it, the others add to it in pack order.
struct PackChunk {
  int64_t b, g, c0, row, k, l0;
  int active, valid;
  bool first_in_row;
  bool full() const { return active == kLanes && valid == kSteps; }
};

// The recurrences' step loops (per state) unroll by 16; the once-per-chunk loops over whole tiles
// (prologues, epilogues, tile loads and stores) by 4. Unrolled by 16 as well, those made forward_chunk
// 27 KB and backward_chunk 48 KB of code, run once per chunk, more than the 32 KB L1i; by 4 they are 19
// and 30 KB, and the backward was 7-14 % faster (paired medians, 1 thread), the forward 3-5 %.
#define GMAMBA_STEPS _Pragma("GCC unroll 16")
#define GMAMBA_TILE_STEPS _Pragma("GCC unroll 4")

// Tile v from kLanes [lane][step] rows of kSteps steps that lie row_stride apart, and back: 8 x 8
// transposes.
template <typename acc_t>
GMAMBA_HOST_INLINE void tile_from_rows(const acc_t* rows, int64_t row_stride, Tile<acc_t>& v) {
  for (int w = 0; w < kLanes; w += 8)
    for (int t = 0; t < kSteps; t += 8) transpose_8x8(rows + w * row_stride + t, row_stride, &v[t][w], kLanes);
}
template <typename acc_t>
GMAMBA_HOST_INLINE void tile_to_rows(const Tile<acc_t>& v, acc_t* rows, int64_t row_stride) {
  for (int w = 0; w < kLanes; w += 8)
    for (int t = 0; t < kSteps; t += 8) transpose_8x8(&v[t][w], kLanes, rows + w * row_stride + t, row_stride);
}

// The tile moves of partial packs and chunks (channels past d, steps past L) are out of line: they run at
// most once per sequence or pack, and inlined they made forward_chunk and backward_chunk larger than L1i.
#define GMAMBA_CPU_COLD __attribute__((noinline, cold))

// load_tile for a partial pack or chunk: lane-masked loads of the valid steps.
template <typename in_t, typename acc_t>
GMAMBA_CPU_COLD void load_partial_tile(const in_t* base, const ScanShape& s, const PackChunk& p, Tile<acc_t>& v) {
  if (s.channels_last) {
    for (int t = 0; t < kSteps; ++t) {
      const int active = t < p.valid ? p.active : 0;
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w)
        v[t][w] = w < active ? static_cast<acc_t>(base[t * s.sl + w]) : acc_t(0);
    }
    return;
  }
  acc_t rows[kLanes][kSteps];
  for (int w = 0; w < kLanes; ++w) {
    const int valid = w < p.active ? p.valid : 0;
    GMAMBA_LANES for (int t = 0; t < kSteps; ++t)
      rows[w][t] = t < valid ? static_cast<acc_t>(base[w * s.sc + t]) : acc_t(0);
  }
  tile_from_rows(&rows[0][0], kSteps, v);
}

// v[t][w] = x[b, c0 + w, l0 + t] inside the pack's chunk, 0 outside.
template <typename in_t, typename acc_t>
GMAMBA_HOST_INLINE void load_tile(const in_t* x, const ScanShape& s, const PackChunk& p, Tile<acc_t>& v) {
  const in_t* base = x + s.x_index(p.b, p.c0, p.l0);
  if (!p.full()) {
    load_partial_tile(base, s, p, v);
  } else if (s.channels_last) {
    GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) v[t][w] = static_cast<acc_t>(base[t * s.sl + w]);
  } else if constexpr (std::is_same_v<in_t, acc_t>) {
    // Channels-first: 8 x 8 transposes of the pack's [lane][step] rows (converted to acc_t first where in_t
    // is not).
    tile_from_rows(base, s.sc, v);
  } else {
    acc_t rows[kLanes][kSteps];
    for (int w = 0; w < kLanes; ++w)
      GMAMBA_LANES for (int t = 0; t < kSteps; ++t) rows[w][t] = static_cast<acc_t>(base[w * s.sc + t]);
    tile_from_rows(&rows[0][0], kSteps, v);
  }
}

// The rows of u, delta, z (and dout) that a pack-chunk still to come will read, to be fetched while this
// one computes, a share per state (all at once, 48-64 lines at 16 lanes outnumbered the core's miss
// buffers and the chunk's own first loads waited behind them).
// - Channels-first: a pack streams one row per lane of each tensor, more streams than the hardware
//   prefetcher follows (with 8 lanes their loads stalled 16 % of the forward and 8 % of the backward, perf,
//   (8, 384, 256, 8)); the task's next pack-chunk is fetched.
// - Channels-last: a chunk's tile is 16 token rows d apart; the first pack of a block to read them missed
//   on every row (a third of the forward at (8, 96, 4096, 8)); each pack fetches its own next chunk.
struct NextRows {
  const char* first[4];  // each tensor's first row
  int64_t stride = 0;    // bytes from one row to the next (the same for every tensor)
  int tensors = 0, rows = 0;

  template <typename in_t>
  GMAMBA_HOST_INLINE void add(const in_t* x, const ScanShape& s, const PackChunk& p) {
    if (!x) return;
    first[tensors++] = reinterpret_cast<const char*>(x + s.x_index(p.b, p.c0, p.l0));
    stride = (s.channels_last ? s.sl : s.sc) * static_cast<int64_t>(sizeof(in_t));
    rows = s.channels_last ? p.valid : p.active;
  }
  // The rows forward_chunk and backward_chunk read for pack-chunk p.
  template <typename in_t, typename acc_t>
  GMAMBA_HOST_INLINE void add_inputs(const ScanFwdArgs<in_t, acc_t>& a, const PackChunk& p) {
    for (const in_t* x : {a.u, a.delta, a.z}) add(x, a.s, p);
  }
  template <typename in_t, typename acc_t>
  GMAMBA_HOST_INLINE void add_inputs(const ScanBwdArgs<in_t, acc_t>& a, const PackChunk& p) {
    add_inputs(a.f, p);
    add(a.dout, a.f.s, p);
  }
  // Fetches share `part` of `parts` equal shares of the rows (tensor-major order). Addresses are formed
  // here: a pointer per row built beforehand was a vectorised 64-bit multiply loop, 9 % of an N = 1 forward.
  GMAMBA_HOST_INLINE void fetch(int64_t part, int64_t parts) const {
    const int64_t count = static_cast<int64_t>(tensors) * rows, lo = count * part / parts;
    const int64_t hi = count * (part + 1) / parts;
    if (lo >= hi) return;
    int64_t t = lo / rows, r = lo % rows;
    for (int64_t i = lo; i < hi; ++i) {
      __builtin_prefetch(first[t] + r * stride);
      if (++r == rows) r = 0, ++t;
    }
  }
};

// store_tile for a partial pack or chunk: lane-masked stores of the valid steps.
template <typename in_t, typename acc_t>
GMAMBA_CPU_COLD void store_partial_tile(in_t* base, const ScanShape& s, const PackChunk& p, const Tile<acc_t>& v) {
  if (s.channels_last) {
    for (int t = 0; t < p.valid; ++t) {
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w)
        if (w < p.active) base[t * s.sl + w] = static_cast<in_t>(v[t][w]);
    }
    return;
  }
  acc_t rows[kLanes][kSteps];
  tile_to_rows(v, &rows[0][0], kSteps);
  for (int w = 0; w < p.active; ++w) {
    GMAMBA_LANES for (int t = 0; t < kSteps; ++t)
      if (t < p.valid) base[w * s.sc + t] = static_cast<in_t>(rows[w][t]);
  }
}

// x[b, c0 + w, l0 + t] = v[t][w] inside the pack's chunk.
template <typename in_t, typename acc_t>
GMAMBA_HOST_INLINE void store_tile(in_t* x, const ScanShape& s, const PackChunk& p, const Tile<acc_t>& v) {
  in_t* base = x + s.x_index(p.b, p.c0, p.l0);
  if (!p.full()) {
    store_partial_tile(base, s, p, v);
  } else if (s.channels_last) {
    GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) base[t * s.sl + w] = static_cast<in_t>(v[t][w]);
  } else if constexpr (std::is_same_v<in_t, acc_t>) {
    tile_to_rows(v, base, s.sc);
  } else {
    acc_t rows[kLanes][kSteps];
    tile_to_rows(v, &rows[0][0], kSteps);
    for (int w = 0; w < kLanes; ++w)
      GMAMBA_LANES for (int t = 0; t < kSteps; ++t) base[w * s.sc + t] = static_cast<in_t>(rows[w][t]);
  }
}

template <typename acc_t>
GMAMBA_CPU_COLD void zero_partial(const PackChunk& p, Tile<acc_t>& v) {
  for (int t = 0; t < kSteps; ++t) {
    const int active = t < p.valid ? p.active : 0;
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) v[t][w] = w < active ? v[t][w] : acc_t(0);
  }
}
// Zeroes v outside the pack's chunk (nothing to do for full packs and chunks).
template <typename acc_t>
GMAMBA_HOST_INLINE void zero_outside(const PackChunk& p, Tile<acc_t>& v) {
  if (!p.full()) zero_partial(p, v);
}

// A per-channel vector (D, delta_bias) over the pack's lanes; 0 where absent or past the pack.
template <typename acc_t>
GMAMBA_HOST_INLINE void load_lanes(const acc_t* x, const PackChunk& p, acc_t (&v)[kLanes]) {
  for (int w = 0; w < kLanes; ++w) v[w] = x && w < p.active ? x[p.c0 + w] : acc_t(0);
}

// to[w] = from[w] for the pack's lanes: a whole vector for full packs (a loop bounded by p.active stays
// scalar), lanes past the pack set to 0 on loads.
template <typename acc_t>
GMAMBA_HOST_INLINE void load_lane_row(const acc_t* from, const PackChunk& p, acc_t* to) {
  if (p.active == kLanes) {
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) to[w] = from[w];
  } else {
    for (int w = 0; w < kLanes; ++w) to[w] = w < p.active ? from[w] : acc_t(0);
  }
}
template <typename acc_t>
GMAMBA_HOST_INLINE void store_lane_row(const acc_t* from, const PackChunk& p, acc_t* to) {
  if (p.active == kLanes) {
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) to[w] = from[w];
  } else {
    for (int w = 0; w < p.active; ++w) to[w] = from[w];
  }
}

// a * b + c as one FMA, for the recurrences' dependency chains (state, adjoint). Written as a * b + c where
// c is itself a product, GCC fused c's product and left a multiply and an FMA on the chain: 7 cycles per
// step on Zen3 instead of 4 (the backward was 7 % slower). Without FMA hardware (GMAMBA_NATIVE=0 on x86)
// it is the plain expression.
template <typename acc_t>
GMAMBA_HOST_INLINE acc_t chain_fma(acc_t a, acc_t b, acc_t c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  if constexpr (std::is_same_v<acc_t, float>) {
    return __builtin_fmaf(a, b, c);
  } else {
    return __builtin_fma(a, b, c);
  }
#else
  return a * b + c;
#endif
}

template <typename acc_t>
struct ValueAndGrad {
  acc_t value, grad;
};

// The decay exp(dt A) as decay_from_rate(dt * rate) with rate = decay_rate(A), formed once per state of a
// chunk: in float the rate carries log2(e) and the exp is host_exp2_approx, which saves the per-step
// range-reduction work (the decays are the scan's innermost exps, two fifths of its vector operations).
// The rate is kept finite (-inf, or an A below -2.4e38 that A log2(e) takes to -inf, becomes the lowest
// finite value): a step with dt = 0, as every padding step past L is, then decays by exp2(0 * rate) = 1
// instead of exp2(NaN), which made last_state and every gradient NaN. NaN still passes through.
GMAMBA_HOST_INLINE float decay_rate(float a) {
  const float r = a * 1.4426950408889634f;
  return r < std::numeric_limits<float>::lowest() ? std::numeric_limits<float>::lowest() : r;
}
GMAMBA_HOST_INLINE double decay_rate(double a) { return finite_decay_coefficient(a); }
GMAMBA_HOST_INLINE float decay_from_rate(float x) { return host_exp2_approx(x); }
GMAMBA_HOST_INLINE double decay_from_rate(double x) { return std::exp(x); }

// softplus(v) and its derivative sigmoid(v) from one exp (the backward needs both). Float uses
// fast_exp.h's vectorisable approximations, double the library functions. Above 20 the float values are v
// and 1 exactly (exp(-v) < 2.1e-9), as torch's linear branch gives, with no select for it.
GMAMBA_HOST_INLINE ValueAndGrad<float> softplus_and_grad(float v) {
  const float e = host_exp_nonpositive(v < 0.0f ? v : -v);  // exp(-|v|)
  const float r = 1.0f / (1.0f + e);
  return {host_softplus_given_exp(v, e), v < 0.0f ? e * r : r};
}
GMAMBA_HOST_INLINE ValueAndGrad<double> softplus_and_grad(double v) { return {softplus(v), softplus_grad(v)}; }

// silu(z) and its derivative from one sigmoid.
template <typename acc_t>
GMAMBA_HOST_INLINE ValueAndGrad<acc_t> silu_and_grad(acc_t z) {
  const acc_t sg = sigmoid(z);
  return {z * sg, sg * (acc_t(1) + z * (acc_t(1) - sg))};
}

// The chunk's step inputs: u, the discretised dt (0 on padding: an identity step) and dt u; with
// kGrad, also d dt / d (delta + bias) where softplus is on (sigmoid of what softplus saw).
template <typename acc_t, bool kGrad>
struct StepTiles {
  Tile<acc_t> u, dt, dtu, ddt_dpre;  // ddt_dpre: filled with kGrad and softplus only

  template <typename in_t>
  GMAMBA_HOST_INLINE void load(const ScanFwdArgs<in_t, acc_t>& a, const PackChunk& p) {
    const ScanShape& s = a.s;
    acc_t bias[kLanes];
    load_lanes(a.delta_bias, p, bias);
    load_tile(a.u, s, p, u);
    load_tile(a.delta, s, p, dt);
    // Branches hoisted out of the lane loops: GCC left the loop scalar with them inside.
    if (s.softplus) {
      if constexpr (kGrad) {
        GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
          GMAMBA_LANES for (int w = 0; w < kLanes; ++w) {
            const ValueAndGrad<acc_t> sp = softplus_and_grad(dt[t][w] + bias[w]);
            dt[t][w] = sp.value;
            ddt_dpre[t][w] = sp.grad;
          }
      } else {
        GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
          GMAMBA_LANES for (int w = 0; w < kLanes; ++w) dt[t][w] = softplus(dt[t][w] + bias[w]);
      }
    } else {
      GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
        GMAMBA_LANES for (int w = 0; w < kLanes; ++w) dt[t][w] += bias[w];
    }
    zero_outside(p, dt);
    GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) dtu[t][w] = dt[t][w] * u[t][w];
  }
};

// Column n of B or C over the chunk's steps and the pack's lanes (0 on padding). A variable column's
// first and last steps of the chunk `ahead` steps away are prefetched: with B and C channels-first, each
// state is its own stream, more than the hardware prefetcher follows (the backward stalled 10% of its
// time on the first load of each column). branch_free: a full chunk's variable column without the per-step
// test, which GCC compiles to a compare and jump per step. The forward takes it (5-10 % faster, 1 thread);
// the backward measured no gain from it (1-4 % slower, as much as moving its code alone did), so keeps the
// general loop.
template <typename acc_t>
GMAMBA_HOST_INLINE void load_column(const BCView<acc_t>& v, const PackChunk& p, int64_t n, int64_t ahead,
                                    Tile<acc_t>& col, bool branch_free = false) {
  if (v.variable) {
    const acc_t* q = v.ptr + p.b * v.sb + p.g * v.sg + n * v.sn + p.l0 * v.sl;
    __builtin_prefetch(q + ahead * v.sl);
    __builtin_prefetch(q + (ahead + kSteps - 1) * v.sl);
    if (branch_free && p.valid == kSteps) {
      GMAMBA_STEPS for (int t = 0; t < kSteps; ++t) {
        const acc_t x = q[t * v.sl];
        GMAMBA_LANES for (int w = 0; w < kLanes; ++w) col[t][w] = x;
      }
      return;
    }
    GMAMBA_STEPS for (int t = 0; t < kSteps; ++t) {
      const acc_t x = t < p.valid ? q[t * v.sl] : acc_t(0);
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) col[t][w] = x;
    }
    return;
  }
  acc_t lanes[kLanes];
  const acc_t* q = v.ptr + p.c0 * v.sc + n * v.sn;
  for (int w = 0; w < kLanes; ++w) lanes[w] = w < p.active ? q[w * v.sc] : acc_t(0);
  GMAMBA_STEPS for (int t = 0; t < kSteps; ++t)
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) col[t][w] = t < p.valid ? lanes[w] : acc_t(0);
}

// A (d, N) transposed to the pack's [n][lane] slab, once per pack (A is read every chunk).
template <typename acc_t>
GMAMBA_HOST_INLINE void load_a_slab(const acc_t* A, int64_t dstate, const PackChunk& p, acc_t* slab) {
  for (int64_t n = 0; n < dstate; ++n)
    for (int w = 0; w < kLanes; ++w) slab[n * kLanes + w] = w < p.active ? A[(p.c0 + w) * dstate + n] : acc_t(0);
}

// Per-chunk (B, nchunks, N, d) buffers (checkpoints, dA partials): row n of the pack's chunk <-> a slab.
template <typename acc_t>
GMAMBA_HOST_INLINE acc_t* chunk_row(acc_t* buf, const ScanShape& s, const PackChunk& p, int64_t n) {
  return buf + s.chunk_state_index(p.b, p.k, n, p.c0);
}

// Runs the chunk from state (the pack's [n][lane] slab, updated in place), writes the checkpoint of the
// chunk's start and out = (sum_n C s + D u) * silu(z); fetches `next` over its states.
template <typename in_t, typename acc_t>
void forward_chunk(const ScanFwdArgs<in_t, acc_t>& a, const PackChunk& p, const acc_t* a_slab, acc_t* state,
                   const NextRows& next) {
  const ScanShape& s = a.s;
  StepTiles<acc_t, false> x;
  x.load(a, p);
  Tile<acc_t> y = {}, Bc, Cc;
  for (int64_t n = 0; n < s.dstate; ++n) {
    next.fetch(n, s.dstate);
    acc_t* st_n = state + n * kLanes;
    store_lane_row(st_n, p, chunk_row(a.checkpoints, s, p, n));
    load_column(a.B, p, n, kSteps, Bc, /*branch_free=*/true);
    load_column(a.C, p, n, kSteps, Cc, /*branch_free=*/true);
    const acc_t* A_n = a_slab + n * kLanes;
    acc_t st[kLanes], rate[kLanes];
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) st[w] = st_n[w], rate[w] = decay_rate(A_n[w]);
    GMAMBA_STEPS for (int t = 0; t < kSteps; ++t) {
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) {
        st[w] = chain_fma(decay_from_rate(x.dt[t][w] * rate[w]), st[w], x.dtu[t][w] * Bc[t][w]);
        y[t][w] += Cc[t][w] * st[w];
      }
    }
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) st_n[w] = st[w];
  }
  acc_t D[kLanes];
  load_lanes(a.D, p, D);
  GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) y[t][w] += D[w] * x.u[t][w];
  if (a.z) {
    Tile<acc_t> z;
    load_tile(a.z, s, p, z);
    GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) y[t][w] *= silu(z[t][w]);
  }
  store_tile(a.out, s, p, y);
}

// Where the backward's per-pack dB / dC go (see ScanBwdArgs): a variable B / C gets each step's sum over
// the pack's lanes in the pack's row; a constant one gets each lane's sum over the chunk's steps.
template <typename in_t, typename acc_t>
GMAMBA_HOST_INLINE void emit_bc_grad(const ScanBwdArgs<in_t, acc_t>& a, const BCView<acc_t>& view, acc_t* part,
                                     const PackChunk& p, int64_t n, const Tile<acc_t>& v) {
  const ScanShape& s = a.f.s;
  if (view.variable) {
    acc_t* row = part + (((p.b * s.groups + p.g) * a.tiles + p.row) * s.dstate + n) * s.len + p.l0;
    acc_t sums[kSteps];
    row_sums(v, sums);
    // A full chunk in fixed-count loops: bounded by p.valid, GCC made the copy a memcpy call (spilling
    // the live vectors around it: 5-8 % of the backward).
    if (p.valid == kSteps && p.first_in_row) {
      GMAMBA_LANES for (int t = 0; t < kSteps; ++t) row[t] = sums[t];
    } else if (p.valid == kSteps) {
      GMAMBA_LANES for (int t = 0; t < kSteps; ++t) row[t] += sums[t];
    } else {
      for (int t = 0; t < p.valid; ++t) row[t] = p.first_in_row ? sums[t] : row[t] + sums[t];
    }
    return;
  }
  acc_t sum[kLanes] = {};
  GMAMBA_STEPS for (int t = 0; t < kSteps; ++t)
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) sum[w] += v[t][w];
  store_lane_row(sum, p, chunk_row(part, s, p, n));
}

// Backward through one chunk from its checkpoint. carry (the pack's [n][lane] slab) holds the adjoint of
// the chunk's end state and becomes that of its start. Writes du, ddelta, dz and the chunk's partials of
// dA, dB, dC, dD and delta_bias. Recurrences: see gmamba/scan_chunk.h.
template <typename in_t, typename acc_t>
void backward_chunk(const ScanBwdArgs<in_t, acc_t>& a, const PackChunk& p, const acc_t* a_slab, acc_t* carry,
                    const NextRows& next) {
  const ScanShape& s = a.f.s;
  StepTiles<acc_t, true> x;
  x.load(a.f, p);
  // Over the states, ddt first collects sum_n A_n g_t decay_t s_{t-1} and gB collects sum_n g_t B_t; the
  // epilogue turns them into ddt (+ u gB) and du (= dt gB + D dy): two FMAs per step and state fewer.
  Tile<acc_t> dout, dsilu, dy, y = {}, ddt = {}, gB = {};
  load_tile(a.dout, s, p, dout);
  if (a.f.z) {
    load_tile(a.f.z, s, p, dsilu);  // z, replaced by silu'(z)
    GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t) {
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) {
        const ValueAndGrad<acc_t> gate = silu_and_grad(dsilu[t][w]);
        dy[t][w] = dout[t][w] * gate.value;
        dsilu[t][w] = gate.grad;
      }
    }
  } else {
    GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) dy[t][w] = dout[t][w];
  }

  for (int64_t n = 0; n < s.dstate; ++n) {
    next.fetch(n, s.dstate);
    Tile<acc_t> st, Bc, Cc, decay;
    load_column(a.f.B, p, n, -kSteps, Bc);
    load_column(a.f.C, p, n, -kSteps, Cc);
    const acc_t* A_n = a_slab + n * kLanes;
    const acc_t* ckpt = chunk_row(a.f.checkpoints, s, p, n);
    // The chunks run backwards, which the hardware prefetcher does not follow across this (B, nchunks,
    // N, d) layout: fetch the previous chunk's row now (a miss here was 5 % of the backward).
    if (p.k > 0) __builtin_prefetch(ckpt - s.dstate * s.dim);
    acc_t s0[kLanes], rate[kLanes];
    load_lane_row(ckpt, p, s0);
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) rate[w] = decay_rate(A_n[w]);
    // Recompute this state's trajectory through the chunk (and y, which dz needs).
    GMAMBA_STEPS for (int t = 0; t < kSteps; ++t) {
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) {
        decay[t][w] = decay_from_rate(x.dt[t][w] * rate[w]);
        st[t][w] = chain_fma(decay[t][w], t == 0 ? s0[w] : st[t - 1][w], x.dtu[t][w] * Bc[t][w]);
        y[t][w] += Cc[t][w] * st[t][w];
      }
    }
    acc_t g[kLanes], dA[kLanes] = {};
    acc_t* carry_n = carry + n * kLanes;
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) g[w] = carry_n[w];
    // g_t = C_t dy_t + decay_{t+1} g_{t+1} (the carry at the chunk's end): one FMA per step on the
    // dependency chain (adding C dy, then scaling by the decay, took an FMA and a multiply).
    // Step t's B, C and state are dead once step t is done: Bc[t] becomes dB_t and st[t] becomes dC_t.
    GMAMBA_STEPS for (int t = kSteps - 1; t >= 0; --t) {
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) {
        const acc_t prev = t == 0 ? s0[w] : st[t - 1][w];
        const acc_t c_dy = Cc[t][w] * dy[t][w];
        g[w] = t == kSteps - 1 ? g[w] + c_dy : chain_fma(g[w], decay[t + 1][w], c_dy);
        const acc_t g_decay_prev = g[w] * decay[t][w] * prev;
        ddt[t][w] += g_decay_prev * A_n[w];
        gB[t][w] += g[w] * Bc[t][w];
        dA[w] += g_decay_prev * x.dt[t][w];
        Bc[t][w] = g[w] * x.dtu[t][w];
        st[t][w] = dy[t][w] * st[t][w];
      }
    }
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) carry_n[w] = g[w] * decay[0][w];
    store_lane_row(dA, p, chunk_row(a.dA_part, s, p, n));
    emit_bc_grad(a, a.f.B, a.dB_part, p, n, Bc);
    emit_bc_grad(a, a.f.C, a.dC_part, p, n, st);
  }

  // Per-step gradients of u, delta, z, and the chunk's partials of D and delta_bias (padding contributes
  // nothing: dy is 0 there, and ddelta is masked because ddt is not).
  acc_t D[kLanes], dD[kLanes] = {}, dbias[kLanes] = {};
  load_lanes(a.f.D, p, D);
  Tile<acc_t>& du = gB;  // du_t = dt_t gB_t + D dy_t, in place once ddt has used gB
  GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t) {
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) {
      dD[w] += dy[t][w] * x.u[t][w];
      ddt[t][w] += x.u[t][w] * gB[t][w];
      du[t][w] = x.dt[t][w] * gB[t][w] + D[w] * dy[t][w];
    }
  }
  if (s.softplus)
    GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w) ddt[t][w] *= x.ddt_dpre[t][w];
  zero_outside(p, ddt);
  GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
    GMAMBA_LANES for (int w = 0; w < kLanes; ++w) dbias[w] += ddt[t][w];
  if (a.f.z)
    GMAMBA_TILE_STEPS for (int t = 0; t < kSteps; ++t)
      GMAMBA_LANES for (int w = 0; w < kLanes; ++w)
        dsilu[t][w] *= dout[t][w] * (y[t][w] + D[w] * x.u[t][w]);
  store_tile(a.du, s, p, du);
  store_tile(a.ddelta, s, p, ddt);
  if (a.f.z) store_tile(a.dz, s, p, dsilu);
  store_lane_row(dD, p, a.dD_part + s.chunk_index(p.b, p.k, p.c0));
  store_lane_row(dbias, p, a.dbias_part + s.chunk_index(p.b, p.k, p.c0));
}

#undef GMAMBA_STEPS
#undef GMAMBA_TILE_STEPS
#undef GMAMBA_CPU_COLD

}  // namespace gmamba::cpu
