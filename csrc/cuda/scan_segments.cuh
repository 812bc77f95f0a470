#pragma once
// Segments of the scan's rows, for the forward kernels that walk a row in order (scan_warp_forward.cuh,
// scan_lane_forward.cuh): with too few rows to fill the GPU, each row is cut into segments that run in
// parallel from start states found by a summary launch and chain_chunks.
#include <cstdint>

namespace gmamba {

template <typename acc_t>
struct ScanSegments {
  int64_t count;  // segments per row (1: a single pass, no summary)
  int64_t len;    // steps per segment: a multiple of the kernel's step granularity and of kChunk
  acc_t* state;   // (B, count, N, d): end states from a zero start, then start states
  acc_t* dt_sum;  // (B, count, d): summed step sizes per segment
};

struct SegmentPlan {
  int64_t count, len;
};

// Segments run as gridDim.y, whose limit is 65535.
constexpr int64_t kMaxSegments = 65535;

// Segments of whole `unit`s of steps for `rows` rows. `aim`: the (row, segment) workers to aim for (the
// fewest segments that reach it bound the count); `capacity`: how many the output kernel holds at once (one
// wave). Up to that bound, the plan with the least (waves x segment length), a summary pass (segments > 1)
// counted as half an output pass; ties go to fewer segments. The aim alone overshot: (8, 1536, 2048, 16)
// channels-last took 7 segments, 1.27 waves of channels_forward<16> (4 blocks per SM), so its output pass
// ran two waves (ncu, GPU run 26). At most kMaxSegments (rows of more than 65535 units then take longer
// segments).
inline SegmentPlan plan_segments(int64_t rows, int64_t len, int64_t unit, int64_t aim, int64_t capacity) {
  const int64_t units = (len + unit - 1) / unit;
  if (rows < 1) rows = 1;
  if (capacity < 1) capacity = 1;
  int64_t fill = rows >= aim ? 1 : (aim + rows - 1) / rows;
  if (fill > units) fill = units;
  if (fill > kMaxSegments) fill = kMaxSegments;
  if (fill < 1) fill = 1;
  SegmentPlan best{1, units * unit};
  int64_t best_cost = -1;
  for (int64_t c = 1; c <= fill; ++c) {
    const int64_t per = (units + c - 1) / c, count = (units + per - 1) / per;
    if (count < c) continue;  // the same plan as a smaller c
    const int64_t waves = (rows * count + capacity - 1) / capacity;
    const int64_t cost = waves * per * (count > 1 ? 3 : 2);  // in half output passes of one unit
    if (best_cost < 0 || cost < best_cost) best_cost = cost, best = {count, per * unit};
  }
  return best;
}

}  // namespace gmamba
