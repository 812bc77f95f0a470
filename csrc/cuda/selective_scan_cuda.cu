// CUDA selective scan.
// Forward: channels-first rows by one warp each (scan_warp_forward.cuh); channels-last with d_state <= 16
// by one thread per (batch, channel, segment) (scan_lane_forward.cuh); both cut rows into segments chained
// by chain_chunks when there are too few rows to fill the GPU. Channels-last with d_state > 16 and the
// backward use the chunk kernels here: one thread per (batch, channel, 16-step chunk) runs the shared
// chunk code with a single lane; a warp spans 32 channels of one chunk, so channels-last tokens are read
// coalesced. Chunks are chained in three launches (no inter-block waiting, no atomics):
//   forward:  1) each chunk's end state from a zero start, 2) a short sequential pass over chunks per
//             (batch, state, channel) turning those into checkpoints, 3) each chunk again from its
//             checkpoint, writing the output.
//   backward: 1) each chunk's start adjoint from a zero end adjoint, 2) the same short pass in reverse,
//             3) each chunk again with its true end adjoint, writing every gradient. Variable dB / dC are
//             reduced over the warp's 32 channels with a fixed butterfly, then over warps by the host's
//             fixed-order sum: the backward is bitwise reproducible.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gmamba/scan_chunk.h"
#include "ops/scan_ops.h"
#include "scan_chunk_threads.cuh"
#include "scan_lane_backward.cuh"
#include "scan_lane_forward.cuh"
#include "scan_warp_forward.cuh"

namespace gmamba {
namespace {

using namespace chunk_threads;

constexpr int kCarryThreads = 256;
// Register caps through __launch_bounds__ (occupancy for these memory-bound kernels), chosen so that
// ptxas reports no spills for the float kernels (see docs/KERNELS.md).
constexpr int kFwdBlocksPerSM = 3;
constexpr int kBwdBlocksPerSM = 2;

// Sum over a chunk's steps of one lane's values (fixed order).
template <typename acc_t>
__device__ __forceinline__ acc_t sum_steps(const acc_t (&v)[kChunk][1]) {
  acc_t sum = 0;
#pragma unroll
  for (int t = 0; t < kChunk; ++t) sum += v[t][0];
  return sum;
}

// Forward pass 1: the chunk's end state from a zero start, and its summed step size.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    fwd_chunk_summary(ScanFwdArgs<in_t, acc_t> a, acc_t* dt_sum, int64_t tiles) {
  const ThreadChunk tc = locate(a.s, tiles);
  if (!tc.live) return;
  ChunkInputs<1, in_t, acc_t> x;
  x.load(a, tc.ls);
  const ScanShape& s = a.s;
  chunk_forward<false>(a, tc.ls, x, [](int64_t, int) { return acc_t(0); },
                       [&](int64_t n, int, acc_t v) {
                         if (tc.ls.active) a.checkpoints[s.chunk_state_index(tc.ls.b, tc.ls.k, n, tc.ls.c0)] = v;
                       });
  if (tc.ls.active) dt_sum[s.chunk_index(tc.ls.b, tc.ls.k, tc.ls.c0)] = sum_steps(x.dt);
}

// Visits chunks [first, last) of one (batch, state, channel) chain in scan order (reversed for kReverse)
// with each chunk's decay exp(A_n * sum of its steps) and its value in `io`. The loads of kBatch chunks are
// issued before the visits, which may depend on one another: they overlap instead of costing one memory
// latency per chunk (ncu, run 2: 0.54 ms at IPC 0.1 without this).
template <bool kReverse, typename acc_t, typename Visit>
__device__ __forceinline__ void walk_chunks(const ScanShape& s, int64_t b, int64_t n, int64_t c, acc_t A_n,
                                            const acc_t* dt_sum, const acc_t* io, int64_t first, int64_t last,
                                            Visit visit) {
  constexpr int kBatch = 8;
  for (int64_t base = first; base < last; base += kBatch) {
    acc_t local[kBatch], decay[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int64_t step = base + j;
      const int64_t k = kReverse ? s.nchunks - 1 - step : step;
      const bool in = step < last;
      local[j] = in ? io[s.chunk_state_index(b, k, n, c)] : acc_t(0);
      decay[j] = in ? fast_exp(A_n * dt_sum[s.chunk_index(b, k, c)]) : acc_t(1);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      if (base + j < last) visit(kReverse ? s.nchunks - 1 - (base + j) : base + j, decay[j], local[j]);
  }
}

// Lanes per chain: each lane takes a run of about 16 chunks, so long sequences (1024 chunks at L = 16384)
// do not leave a few thousand threads walking every chunk in turn (run 8: 0.22 ms per chain pass at
// (8, 48, 16384, 8), more than the chunk passes).
int chain_group(int64_t nchunks) {
  int group = 1;
  while (group < kWarp && nchunks >= 32 * group) group *= 2;
  return group;
}

// Pass 2 of both directions: chains chunks for one (batch, state, channel), `group` lanes of a warp per
// chain (a power of two up to 32). Forward: `io` holds each chunk's zero-start end state and becomes the
// checkpoint (state before the chunk); `edge` holds the initial state in and the final state out. Backward
// (kReverse): `io` holds each chunk's zero-end start adjoint and becomes the adjoint at the chunk's end;
// `edge` holds dlast_state in and d initial_state out. With several lanes, each lane first folds its run
// of chunks into one affine map h -> decay h + state, the lanes compose those maps with a fixed shuffle
// scan (Hillis-Steele over the group), and each lane walks its run again from its true start state. The
// order of operations depends only on the shape: results are bitwise reproducible.
template <bool kReverse, typename acc_t>
__global__ void chain_chunks(ScanShape s, const acc_t* __restrict__ A, const acc_t* __restrict__ dt_sum, acc_t* io,
                             acc_t* __restrict__ edge, int group) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chain = idx / group;
  const int lane = static_cast<int>(idx % group);  // blocks hold whole warps: a group never straddles two
  const bool live = chain < s.batch * s.dstate * s.dim;
  if (group == 1 && !live) return;  // with several lanes every thread of the warp must join the shuffles
  const int64_t c = live ? chain % s.dim : 0, n = live ? (chain / s.dim) % s.dstate : 0;
  const int64_t b = live ? chain / (s.dim * s.dstate) : 0;
  const acc_t A_n = live ? finite_decay_coefficient(A[c * s.dstate + n]) : acc_t(0);
  const int64_t edge_index = (b * s.dim + c) * s.dstate + n;
  const acc_t h0 = live ? edge[edge_index] : acc_t(0);
  const int64_t per = (s.nchunks + group - 1) / group;
  const int64_t first = lane * per < s.nchunks ? lane * per : s.nchunks;
  const int64_t last = !live ? first : (first + per < s.nchunks ? first + per : s.nchunks);
  acc_t h = h0;
  if (group > 1) {
    acc_t run_decay = 1, run_state = 0;  // this lane's run as h -> run_decay h + run_state
    walk_chunks<kReverse>(s, b, n, c, A_n, dt_sum, io, first, last, [&](int64_t, acc_t decay, acc_t local) {
      run_state = decay * run_state + local;
      run_decay *= decay;
    });
    for (int offset = 1; offset < group; offset <<= 1) {  // inclusive scan: runs of lanes 0..lane
      const acc_t prev_decay = __shfl_up_sync(0xffffffffu, run_decay, offset, group);
      const acc_t prev_state = __shfl_up_sync(0xffffffffu, run_state, offset, group);
      if (lane >= offset) {
        run_state = run_decay * prev_state + run_state;
        run_decay *= prev_decay;
      }
    }
    const acc_t end = run_decay * h0 + run_state;  // the state after this lane's run
    const acc_t before = __shfl_up_sync(0xffffffffu, end, 1, group);
    h = lane == 0 ? h0 : before;
    if (live && lane == group - 1) edge[edge_index] = end;
  }
  walk_chunks<kReverse>(s, b, n, c, A_n, dt_sum, io, first, last, [&](int64_t k, acc_t decay, acc_t local) {
    io[s.chunk_state_index(b, k, n, c)] = h;
    h = decay * h + local;
  });
  if (group == 1) edge[edge_index] = h;
}

template <bool kReverse, typename acc_t>
void launch_chain(const ScanShape& s, const acc_t* A, const acc_t* dt_sum, acc_t* io, acc_t* edge,
                  cudaStream_t stream) {
  const int group = chain_group(s.nchunks);
  const int64_t threads = s.batch * s.dstate * s.dim * group;
  chain_chunks<kReverse><<<(threads + kCarryThreads - 1) / kCarryThreads, kCarryThreads, 0, stream>>>(
      s, A, dt_sum, io, edge, group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward pass 3: the chunk from its checkpoint, writing the output.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, kFwdBlocksPerSM) fwd_chunk_output(ScanFwdArgs<in_t, acc_t> a, int64_t tiles) {
  const ThreadChunk tc = locate(a.s, tiles);
  if (!tc.live) return;
  ChunkInputs<1, in_t, acc_t> x;
  x.load(a, tc.ls);
  const ScanShape& s = a.s;
  chunk_forward<true>(
      a, tc.ls, x,
      [&](int64_t n, int) {
        return tc.ls.active ? a.checkpoints[s.chunk_state_index(tc.ls.b, tc.ls.k, n, tc.ls.c0)] : acc_t(0);
      },
      [](int64_t, int, acc_t) {});
}

// Backward pass 1: the chunk's start adjoint given a zero adjoint at its end, and its summed step size.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    bwd_chunk_summary(ScanBwdArgs<in_t, acc_t> a, acc_t* carry, acc_t* dt_sum) {
  const ThreadChunk tc = locate(a.f.s, a.tiles);
  if (!tc.live) return;
  ChunkInputs<1, in_t, acc_t> x;
  x.load(a.f, tc.ls);
  const ScanShape& s = a.f.s;
  chunk_local_adjoint(a, tc.ls, x, [&](int64_t n, int, acc_t g) {
    if (tc.ls.active) carry[s.chunk_state_index(tc.ls.b, tc.ls.k, n, tc.ls.c0)] = g;
  });
  if (tc.ls.active) dt_sum[s.chunk_index(tc.ls.b, tc.ls.k, tc.ls.c0)] = sum_steps(x.dt);
}

// Backward pass 3: all gradients of the chunk, given its checkpoint and its true end adjoint.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, kBwdBlocksPerSM)
    bwd_chunk_grads(ScanBwdArgs<in_t, acc_t> a, const acc_t* carry) {
  const ThreadChunk tc = locate(a.f.s, a.tiles);
  if (!tc.live) return;
  ChunkInputs<1, in_t, acc_t> x;
  x.load(a.f, tc.ls);
  const ScanShape& s = a.f.s;
  const LaneSet& ls = tc.ls;
  auto state_at = [&](const acc_t* buf, int64_t n) {
    return ls.active ? buf[s.chunk_state_index(ls.b, ls.k, n, ls.c0)] : acc_t(0);
  };
  const int lane = threadIdx.x % kWarp;
  // Variable B/C: reduce over the warp's channels (lane < 16 ends with dB at step lane, the others with
  // dC at step lane - 16). Constant B/C: sum over the chunk's steps per channel. Written without
  // run-time-indexed arrays, which would push the per-step values to local memory.
  auto emit = [&](int64_t n, const acc_t(&dB)[kChunk][1], const acc_t(&dC)[kChunk][1]) {
    if (a.f.B.variable || a.f.C.variable) {
      acc_t v[2 * kChunk];
#pragma unroll
      for (int t = 0; t < kChunk; ++t) v[t] = dB[t][0], v[kChunk + t] = dC[t][0];
      const acc_t sum = warp_reduce_scatter32(v);
      const bool is_c = lane >= kChunk;
      const int64_t l = ls.k * kChunk + lane % kChunk;
      if ((is_c ? a.f.C.variable : a.f.B.variable) && l < s.len) {
        acc_t* part = is_c ? a.dC_part : a.dB_part;
        part[(((ls.b * s.groups + ls.g) * a.tiles + tc.tile) * s.dstate + n) * s.len + l] = sum;
      }
    }
    if (!ls.active) return;
    const int64_t i = s.chunk_state_index(ls.b, ls.k, n, ls.c0);
    if (!a.f.B.variable) a.dB_part[i] = sum_steps(dB);
    if (!a.f.C.variable) a.dC_part[i] = sum_steps(dC);
  };
  chunk_backward(
      a, ls, x, [&](int64_t n, int) { return state_at(a.f.checkpoints, n); },
      [&](int64_t n, int) { return state_at(carry, n); }, [](int64_t, int, acc_t) {}, emit);
}

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

int64_t tiles_of(const ScanShape& s) { return (s.dim_per_group + kWarp - 1) / kWarp; }

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// A row-walking forward (scan_warp_forward.cuh, scan_lane_forward.cuh): its two kernels and launch shape.
template <typename in_t, typename acc_t>
struct RowWalk {
  using Kernel = void (*)(ScanFwdArgs<in_t, acc_t>, ScanSegments<acc_t>);
  Kernel summary, output;
  int64_t unit;            // segment lengths are multiples of this many steps
  int64_t workers_per_sm;  // rows per SM the segment plan aims at, at most (tuned in GPU runs 15-18)
  int rows_per_block, threads;
  size_t smem;
};

// Channels-first: one warp per (batch, channel) row, lanes along L.
template <typename in_t, typename acc_t>
RowWalk<in_t, acc_t> rows_walk(const ScanShape& s) {
  using namespace warp_scan;
  return {rows_forward<true, in_t, acc_t>, rows_forward<false, in_t, acc_t>, kTile, kWarpsPerSM, kRowsPerBlock,
          32 * kRowsPerBlock, kRowsPerBlock * s.dstate * sizeof(acc_t)};
}

// Channels-last with d_state <= kN (8 or 16): one thread per (batch, channel, segment), states in registers.
template <int kN, typename in_t, typename acc_t>
RowWalk<in_t, acc_t> channels_walk() {
  using namespace lane_scan;
  return {channels_forward<kN, true, in_t, acc_t>, channels_forward<kN, false, in_t, acc_t>, kChunk, kThreadsPerSM,
          kThreads, kThreads, 0};
}

// One output launch when the plan has a single segment per row, else a summary launch, chain_chunks over
// the segments and the output launch.
template <typename in_t, typename acc_t>
void forward_segmented(const ScanFwdArgs<in_t, acc_t>& args, const ScanShape& s, const RowWalk<in_t, acc_t>& walk,
                       const at::Tensor& like, cudaStream_t stream) {
  const int64_t rows = s.batch * s.dim;
  // One wave of the output kernel: its blocks per SM as registers and shared memory allow. The aim stays
  // the tuned one; the wave only keeps a plan from running a small tail into a second wave.
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, walk.output, walk.threads, walk.smem));
  const int64_t sms = sm_count();
  const int64_t capacity = sms * std::max(blocks_per_sm, 1) * walk.rows_per_block;
  const SegmentPlan plan = plan_segments(rows, s.len, walk.unit, sms * walk.workers_per_sm, capacity);
  const dim3 grid(static_cast<unsigned>((rows + walk.rows_per_block - 1) / walk.rows_per_block),
                  static_cast<unsigned>(plan.count));
  ScanSegments<acc_t> seg{plan.count, plan.len, nullptr, nullptr};
  at::Tensor seg_state, dt_sum;
  if (plan.count > 1) {
    seg_state = at::empty({s.batch, plan.count, s.dstate, s.dim}, like.options());
    dt_sum = at::empty({s.batch, plan.count, s.dim}, like.options());
    seg.state = seg_state.data_ptr<acc_t>();
    seg.dt_sum = dt_sum.data_ptr<acc_t>();
    walk.summary<<<grid, walk.threads, walk.smem, stream>>>(args, seg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ScanShape by_segment = s;  // chain_chunks over segments instead of chunks
    by_segment.nchunks = plan.count;
    launch_chain<false>(by_segment, args.A, seg.dt_sum, seg.state, args.last_state, stream);
  }
  walk.output<<<grid, walk.threads, walk.smem, stream>>>(args, seg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void forward_cuda(const ScanInputs& in, const ScanShape& s, const at::Tensor& out, const at::Tensor& checkpoints,
                  const at::Tensor& last_state) {
  const c10::cuda::CUDAGuard guard(in.u.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (!s.channels_last || s.dstate <= 16) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.u.scalar_type(), "selective_scan_fwd_rows", [&] {
      using acc_t = acc_of<scalar_t>;
      const auto args = make_fwd_args<scalar_t, acc_t>(in, s, out, checkpoints, last_state);
      const RowWalk<scalar_t, acc_t> walk = !s.channels_last ? rows_walk<scalar_t, acc_t>(s)
                                            : s.dstate <= 8    ? channels_walk<8, scalar_t, acc_t>()
                                                               : channels_walk<16, scalar_t, acc_t>();
      forward_segmented(args, s, walk, checkpoints, stream);
    });
    return;
  }
  // Channels-last with d_state > 16: the chunk kernels.
  const int64_t tiles = tiles_of(s);
  at::Tensor dt_sum = at::empty({s.batch, s.nchunks, s.dim}, checkpoints.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.u.scalar_type(), "selective_scan_fwd_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    const auto args = make_fwd_args<scalar_t, acc_t>(in, s, out, checkpoints, last_state);
    const int64_t blocks = chunk_blocks(s, tiles);
    fwd_chunk_summary<<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(args, dt_sum.data_ptr<acc_t>(), tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // last_state enters holding initial_state (or zeros) and leaves holding the final state.
    launch_chain<false>(s, args.A, dt_sum.data_ptr<acc_t>(), args.checkpoints, last_state.data_ptr<acc_t>(), stream);
    fwd_chunk_output<<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(args, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Which lane_backward instance (kN = 8 or 16) the backward runs, 0 for bwd_chunk_grads. By default
// lane_backward wherever an instance applies (d_state <= 8 since GPU runs 20-21: as fast or faster at every
// shape; d_state 9..16 since runs 24-25: 1.27x-1.61x channels-last, 1.00x-1.42x channels-first), and
// bwd_chunk_grads elsewhere (constant B or C, d_state > 16, float64 at d_state > 8).
// GMAMBA_CUDA_SCAN_BWD=chunk forces bwd_chunk_grads, =lane (the default) the lane kernel where it applies,
// =lane_l1 the lane kernel with channels-first blocks sized for L1 (see launch_lane_backward); read per
// call so tests and benchmarks/ab_scan_bwd_gpu.py can compare them.
struct LaneChoice {
  int states;      // 8 or 16: the lane_backward instance; 0: bwd_chunk_grads
  bool prefer_l1;  // channels-first: 2 blocks per SM, the rest of shared memory's space to L1
};

LaneChoice lane_backward_choice(const ScanShape& s, bool b_variable, bool c_variable, bool float_acc) {
  const char* v = std::getenv("GMAMBA_CUDA_SCAN_BWD");
  const std::string choice = v == nullptr ? "" : v;
  TORCH_CHECK_VALUE(choice.empty() || choice == "chunk" || choice == "lane" || choice == "lane_l1",
                    "selective_scan: environment variable GMAMBA_CUDA_SCAN_BWD must be 'chunk', 'lane', 'lane_l1' "
                    "or unset, got '", choice, "'");
  if (choice == "chunk") return {0, false};
  return {lane_scan::lane_backward_states(s, b_variable, c_variable, float_acc), choice == "lane_l1"};
}

// The shared-memory carveout (percent of the SM's maximum) that holds `blocks` blocks of `smem` bytes
// each (plus the 1 KB per block the runtime reserves).
int carveout_for_blocks(int blocks, size_t smem) {
  const size_t max_smem = at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor;
  const size_t need = static_cast<size_t>(blocks) * (smem + 1024);
  return static_cast<int>(std::min<size_t>(100, (need * 100 + max_smem - 1) / max_smem));
}

// prefer_l1 (channels-first only, opt-in, not yet run on a GPU): run 26 found the channels-first kernel
// bound by L2 bandwidth (L1 hit rate 8 %): each thread reads 16 consecutive u, delta, z, dout of one row,
// the warp's lanes 32 rows apart, and at 3 blocks per SM shared memory leaves L1 about 30 KB, less than the
// 3 x 32 KB of row segments the blocks walk. A carveout for 2 blocks leaves L1 about 90-120 KB.
// Returns false, launching nothing, where the device cannot give a block the kernel's shared memory: float64
// at kN = 8 takes 128 KB, more than sm_86 / sm_89 allow (99 KB); kN = 16 takes 72-74 KB, more than sm_75's
// 64 KB. The caller then runs bwd_chunk_grads, which needs no dynamic shared memory.
template <int kN, bool kChannelsLast, typename in_t, typename acc_t>
bool launch_lane_backward(const ScanBwdArgs<in_t, acc_t>& args, int64_t blocks, const acc_t* carry, bool prefer_l1,
                          cudaStream_t stream) {
  const auto kernel = lane_scan::lane_backward<kN, kChannelsLast, in_t, acc_t>;
  const size_t smem = lane_scan::lane_backward_smem<kN, kChannelsLast, acc_t>();
  if (smem > at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) return false;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if constexpr (!kChannelsLast) {  // set on every launch: the attribute persists across calls
    const int carveout = prefer_l1 ? carveout_for_blocks(2, smem) : static_cast<int>(cudaSharedmemCarveoutDefault);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, carveout));
  }
  kernel<<<blocks, lane_scan::kBwdThreads, smem, stream>>>(args, carry);
  return true;
}

void backward_cuda(const ScanInputs& in, const ScanShape& s, const at::Tensor& dout,
                   const std::optional<at::Tensor>& dlast, const at::Tensor& checkpoints,
                   std::vector<at::Tensor>& buffers, int64_t tiles) {
  const c10::cuda::CUDAGuard guard(in.u.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor carry = at::empty_like(checkpoints);
  at::Tensor dt_sum = at::empty({s.batch, s.nchunks, s.dim}, checkpoints.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.u.scalar_type(), "selective_scan_bwd_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    const auto args = make_bwd_args<scalar_t, acc_t>(in, s, dout, dlast, checkpoints, buffers, tiles);
    const int64_t blocks = chunk_blocks(s, tiles);
    acc_t* const carry_ptr = carry.data_ptr<acc_t>();
    bwd_chunk_summary<<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(args, carry_ptr, dt_sum.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // dinitial_state enters holding dlast_state (or zeros) and leaves holding the initial state's gradient.
    launch_chain<true>(s, args.f.A, dt_sum.data_ptr<acc_t>(), carry_ptr, args.dinitial_state, stream);
    constexpr bool kFloatAcc = std::is_same_v<acc_t, float>;
    const LaneChoice lane = lane_backward_choice(s, args.f.B.variable, args.f.C.variable, kFloatAcc);
    bool launched = false;
    if (lane.states == 8) {
      launched = s.channels_last ? launch_lane_backward<8, true>(args, blocks, carry_ptr, lane.prefer_l1, stream)
                                 : launch_lane_backward<8, false>(args, blocks, carry_ptr, lane.prefer_l1, stream);
    } else if (lane.states == 16) {
      // Built for float accumulation only (the only case lane_backward_states picks it for).
      if constexpr (kFloatAcc) {
        launched = s.channels_last ? launch_lane_backward<16, true>(args, blocks, carry_ptr, lane.prefer_l1, stream)
                                   : launch_lane_backward<16, false>(args, blocks, carry_ptr, lane.prefer_l1, stream);
      }
    }
    if (!launched) bwd_chunk_grads<<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(args, carry_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct CudaBackend {
  static const ScanBackend& get() {
    // Every partial element is written by either gradient kernel (GPU run 25's NaN-filled-memory test), so
    // the partial buffers are not zero-filled first.
    static const ScanBackend backend{forward_cuda, backward_cuda, kWarp, /*bc_partial_rows=*/nullptr,
                                     /*writes_every_partial=*/true};
    return backend;
  }
};

}  // namespace
}  // namespace gmamba

TORCH_LIBRARY_IMPL(gmamba_ext, CUDA, m) {
  m.impl("selective_scan_fwd", &gmamba::ScanOps<gmamba::CudaBackend>::forward);
  m.impl("selective_scan_bwd", &gmamba::ScanOps<gmamba::CudaBackend>::backward);
}
