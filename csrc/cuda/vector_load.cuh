#pragma once
// kCount contiguous values read as 16-byte vectors (the caller guarantees a 16-byte aligned address and
// whole vectors) and converted to acc_t: the one vector load of the row-walking scan kernels.
#include <cstdint>
#include <cstring>

#include "gmamba/scan_chunk.h"

namespace gmamba {

template <int kCount, typename T, typename acc_t>
__device__ __forceinline__ void load_vec16(const T* p, acc_t (&out)[kCount]) {
  constexpr int kPerVec = 16 / sizeof(T);
  static_assert(kCount % kPerVec == 0, "whole 16-byte vectors");
#pragma unroll
  for (int v = 0; v < kCount / kPerVec; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
    T vals[kPerVec];
    memcpy(vals, &raw, 16);
#pragma unroll
    for (int e = 0; e < kPerVec; ++e) out[v * kPerVec + e] = to_acc(vals[e], acc_t(0));
  }
}

}  // namespace gmamba
