#pragma once
// exp for the scan's decay factors exp(delta * A).
// - device float: the hardware approximation (__expf), a few ulp, as mamba-ssm's kernels use.
// - host float: a Cephes-style range reduction + degree-6 polynomial (about 1 ulp on [-87, 88]) built only
//   from arithmetic and bit casts, so loops over channel lanes auto-vectorise (libm's expf does not).
// - double: the library exp (the float64 path serves gradcheck, not speed).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace gmamba {

inline float host_exp_approx(float x) {
  // NaN stays NaN: the clamps below are written so a NaN compares false and passes through.
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  // Round x / ln2 to nearest with the 1.5 * 2^23 trick (vectorisable, unlike nearbyint without SSE4.1).
  const float magic = 12582912.0f;
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

GMAMBA_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return host_exp_approx(x);
#endif
}

GMAMBA_HD double fast_exp(double x) { return exp(x); }

}  // namespace gmamba
