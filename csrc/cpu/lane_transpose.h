#pragma once
// Moves across the CPU scan's lanes (8 or 16, cpu/scan_lanes.h): 8 x 8 transposes between [channel][step]
// rows (how channels-first tensors lie in memory) and blocks of [step][lane] tiles, and per-row sums of the
// lanes. Filling a tile column by
// column instead costs a failed store-to-load forward on every vector read of the tile: it was the
// single largest cost of the channels-first forward.
#include <cstdint>

#include "gmamba/macros.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace gmamba::cpu {

// out[j * out_stride + i] = in[i * in_stride + j] for i, j < 8.
template <typename T>
GMAMBA_HOST_INLINE void transpose_8x8(const T* in, int64_t in_stride, T* out, int64_t out_stride) {
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) out[j * out_stride + i] = in[i * in_stride + j];
}

#if defined(__AVX__)
template <>
GMAMBA_HOST_INLINE void transpose_8x8<float>(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  __m256 r[8], s[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * in_stride);
  // Interleave pairs of rows, then pairs of pairs (within 128-bit halves), then swap the halves.
  for (int i = 0; i < 8; i += 2) {
    s[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    s[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(s[i], s[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(s[i], s[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(s[i + 1], s[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(s[i + 1], s[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * out_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * out_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// sums[i] = the sum of in[i][0..7] for rows i < R, R a multiple of 8, added as ((w0 + w2) + (w1 + w3)) +
// ((w4 + w6) + (w5 + w7)) for lanes w: a fixed order, so the result is the same run to run.
template <int R, typename T>
GMAMBA_HOST_INLINE void row_sums_8(const T (&in)[R][8], T (&sums)[R]) {
  static_assert(R % 8 == 0, "rows are summed in blocks of 8");
  for (int i = 0; i < R; ++i)
    sums[i] = ((in[i][0] + in[i][2]) + (in[i][1] + in[i][3])) + ((in[i][4] + in[i][6]) + (in[i][5] + in[i][7]));
}

#if defined(__AVX__)
// The same sums as a tree of pairwise adds over 8 rows at a time: 21 shuffles and adds per 8 rows, where
// an 8 x 8 transpose and 7 vector adds took 31 (the backward reduces two such tiles per state and chunk).
template <int R>
GMAMBA_HOST_INLINE void row_sums_8(const float (&in)[R][8], float (&sums)[R]) {
  static_assert(R % 8 == 0, "rows are summed in blocks of 8");
  for (int i0 = 0; i0 < R; i0 += 8) {
    __m256 pairs[4], quads[2];
    for (int j = 0; j < 4; ++j) {
      // [a0+a2, b0+b2, a1+a3, b1+b3 | a4+a6, b4+b6, a5+a7, b5+b7] for rows a, b
      const __m256 a = _mm256_loadu_ps(in[i0 + 2 * j]), b = _mm256_loadu_ps(in[i0 + 2 * j + 1]);
      pairs[j] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    }
    for (int j = 0; j < 2; ++j) {
      // [4 rows' sums of lanes 0-3 | the same rows' sums of lanes 4-7]
      const __m256 p = pairs[2 * j], q = pairs[2 * j + 1];
      quads[j] = _mm256_add_ps(_mm256_shuffle_ps(p, q, _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm256_shuffle_ps(p, q, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    _mm256_storeu_ps(sums + i0, _mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),
                                              _mm256_permute2f128_ps(quads[0], quads[1], 0x31)));
  }
}
#endif

// sums[i] = the sum of in[i][0..L-1] for L = 8 or 16 lanes: for 16, lane w + 8 is first added to lane w
// (one vector add per row), then row_sums_8 adds the 8 results in its order. Fixed, as the CPU backward's
// bitwise reproducibility needs; ctest checks it against the scalar formula.
template <int R, int L, typename T>
GMAMBA_HOST_INLINE void row_sums(const T (&in)[R][L], T (&sums)[R]) {
  static_assert(L == 8 || L == 16, "rows of 8 or 16 lanes");
  if constexpr (L == 8) {
    row_sums_8(in, sums);
  } else {
    T folded[R][8];
    for (int i = 0; i < R; ++i)
      _Pragma("omp simd") for (int w = 0; w < 8; ++w) folded[i][w] = in[i][w] + in[i][w + 8];
    row_sums_8(folded, sums);
  }
}

}  // namespace gmamba::cpu
