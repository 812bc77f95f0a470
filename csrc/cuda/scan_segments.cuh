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

// As few segments as give `want` (row, segment) workers, each a multiple of `unit` steps, at most
// kMaxSegments (rows of more than 65535 units then take longer segments).
inline SegmentPlan plan_segments(int64_t rows, int64_t len, int64_t unit, int64_t want) {
  const int64_t units = (len + unit - 1) / unit;
  int64_t count = rows >= want ? 1 : (want + rows - 1) / rows;
  if (count > units) count = units;
  if (count > kMaxSegments) count = kMaxSegments;
  if (count < 1) count = 1;
  const int64_t per = (units + count - 1) / count;
  return {(units + per - 1) / per, per * unit};
}

}  // namespace gmamba
