#pragma once
// 8 x 8 transposes between [channel][step] rows (how channels-first tensors lie in memory) and the CPU
// scan's [step][lane] tiles. Filling a tile column by column instead costs a failed store-to-load
// forward on every vector read of the tile: it was the single largest cost of the channels-first forward.
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

// sums[i] = in[i][0] + in[i][1] + ... + in[i][7] (added in that order) for rows i < R, R a multiple of 8:
// transposed in 8 x 8 blocks, the eight lanes are then added as whole vectors.
template <int R, typename T>
GMAMBA_HOST_INLINE void row_sums_8(const T (&in)[R][8], T (&sums)[R]) {
  static_assert(R % 8 == 0, "rows are summed in blocks of 8");
  for (int i0 = 0; i0 < R; i0 += 8) {
    T cols[8][8];
    transpose_8x8(&in[i0][0], 8, &cols[0][0], 8);
    for (int i = 0; i < 8; ++i) sums[i0 + i] = cols[0][i];
    for (int j = 1; j < 8; ++j)
      for (int i = 0; i < 8; ++i) sums[i0 + i] += cols[j][i];
  }
}

}  // namespace gmamba::cpu
