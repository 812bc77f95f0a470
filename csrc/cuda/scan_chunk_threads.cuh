#pragma once
// How the chunk kernels map threads to work, shared by selective_scan_cuda.cu and scan_lane_backward.cuh:
// one thread per (batch, channel, 16-step chunk), a warp spanning 32 channels of one group and chunk, and
// the fixed-order warp reduce-scatter of per-step dB/dC over those channels.
#include "gmamba/scan_chunk.h"

namespace gmamba {
namespace chunk_threads {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

// Which (batch, group, channel, chunk) this thread covers; false for warps past the last chunk.
struct ThreadChunk {
  LaneSet ls;
  int64_t tile;
  bool live;
};

__device__ __forceinline__ ThreadChunk locate(const ScanShape& s, int64_t tiles) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  ThreadChunk tc;
  tc.ls.k = warp % s.nchunks;
  int64_t rest = warp / s.nchunks;
  tc.tile = rest % tiles;
  rest /= tiles;
  tc.ls.g = rest % s.groups;
  tc.ls.b = rest / s.groups;
  tc.live = tc.ls.b < s.batch;
  const int64_t first = tc.tile * kWarp + lane;
  tc.ls.c0 = tc.ls.g * s.dim_per_group + first;
  tc.ls.active = first < s.dim_per_group ? 1 : 0;
  return tc;
}

inline int64_t chunk_blocks(const ScanShape& s, int64_t tiles) {
  const int64_t warps = s.batch * s.groups * tiles * s.nchunks;
  return (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
}

// Sums each of the 32 values over the warp's lanes; lane i returns the sum of value i. Each stage swaps
// half of the remaining values with the partner lane: 31 shuffles in all, in a fixed order. The stages
// are a template recursion so every array index is a compile-time constant (registers, not local memory).
template <int kHalf, typename acc_t>
__device__ __forceinline__ void reduce_scatter_stage(acc_t (&v)[2 * kChunk], int lane) {
  const bool upper = lane & kHalf;
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const acc_t send = upper ? v[j] : v[j + kHalf];
    const acc_t keep = upper ? v[j + kHalf] : v[j];
    v[j] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf);
  }
  if constexpr (kHalf > 1) reduce_scatter_stage<kHalf / 2>(v, lane);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_reduce_scatter32(acc_t (&v)[2 * kChunk]) {
  static_assert(2 * kChunk == kWarp, "one value per lane");
  reduce_scatter_stage<kWarp / 2>(v, static_cast<int>(threadIdx.x % kWarp));
  return v[0];
}

}  // namespace chunk_threads
}  // namespace gmamba
