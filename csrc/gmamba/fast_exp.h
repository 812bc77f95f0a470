#pragma once
// exp for the scan's decay factors exp(delta * A).
// - device float: the hardware 2^x (ex2.approx.ftz), a few ulp, as mamba-ssm's __expf but without its denormal rescaling;
// - host float: a Cephes-style range reduction + Horner polynomial (relative error < 1e-7 on [-87, 88])
//   built only from arithmetic, selects and bit casts, so loops over channel lanes vectorise (libm's expf
//   does not);
//   the CPU sources are compiled with -fno-trapping-math -fopenmp-simd for that.
// - double: the library exp (the float64 path serves gradcheck, not speed).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace gmamba {

// exp(x) for x in [-87.3, 88.7], with no bounds: the core of host_exp_approx and host_exp_nonpositive.
GMAMBA_HOST_INLINE float host_exp_in_range(float x) {
  // Adding 1.5 * 2^23 + 127 rounds x / ln2 to the nearest integer n and leaves 127 + n in the low mantissa
  // bits (vectorisable, unlike nearbyint without SSE4.1); shifted left by 23 they are the exponent of 2^n,
  // and the magic's own bits shift out. n = 128 (x near 88.7) gives inf, as exp overflows there.
  const float magic = 12582912.0f + 127.0f;
  const float shifted = x * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2 in two parts (Cody-Waite)
  // exp(r) on |r| <= ln2 / 2 as 1 + r (1 + r (1/2 + ...)) in Horner form: one FMA per coefficient.
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = __builtin_bit_cast(uint32_t, shifted) << 23;
  // __builtin_bit_cast (GCC >= 11, clang) vectorises where memcpy does not.
  return p * __builtin_bit_cast(float, bits);
}

GMAMBA_HOST_INLINE float host_exp_approx(float x) {
  // A NaN fails both comparisons and passes through (then poisons the result). With -fno-trapping-math
  // these selects vectorise.
  x = std::min(x, 88.7f);
  x = std::max(x, -87.3f);
  return host_exp_in_range(x);
}

// exp(x) for x <= 0 (softplus's exp(-|v|)): host_exp_approx without the upper bound, one select fewer.
// Below -87.3 it is 0 (clamping there left a floor of 1.2e-38 under softplus and its derivative, which
// scaled by a large u showed in the output); NaN passes through.
GMAMBA_HOST_INLINE float host_exp_nonpositive(float x) { return x < -87.3f ? 0.0f : host_exp_in_range(x); }

// 2^x for the CPU scan's decays, whose exponent dt * A log2(e) comes with A scaled once per state
// (scan_cpu_chunk.h). Against host_exp_approx: no multiply by 1/ln2, no two-part Cody-Waite reduction
// (x - n is exact here) and a degree-6 polynomial for 2^r on [-1/2, 1/2] (minimax, relative error
// < 8e-8 in float arithmetic) instead of degree 7 for e^r: 16 vector operations instead of 19 (GCC 12,
// AVX2), and the forward 9 % faster. Above 127.5 the result is inf (n rounds to 128; 2^127.5 is 2.4e38,
// float's largest 3.4e38); below -126 it is 0 (the decay underflows there either way); NaN passes
// through. The bounds are written as selects on x and on the result: GCC needs 5 operations for them
// (std::min/max took 6: GCC folds the exp of each clamped bound to a constant and selects afterwards).
GMAMBA_HOST_INLINE float host_exp2_approx(float x) {
  const float xc = x > 128.0f ? 128.0f : x;
  const float magic = 12582912.0f + 127.0f;  // see host_exp_in_range: rounds, and leaves 127 + n in the bits
  const float shifted = xc + magic;
  const float r = xc - (shifted - magic);
  float p = 1.534581242594868e-4f;
  p = p * r + 1.3399930903688073e-3f;
  p = p * r + 9.618489071726799e-3f;
  p = p * r + 5.550328642129898e-2f;
  p = p * r + 0.24022646248340607f;
  p = p * r + 0.6931471824645996f;
  p = p * r + 1.0f;
  const float v = p * __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, shifted) << 23);
  return xc < -126.0f ? 0.0f : v;
}

// 2 atanh(s) for s in [0, 1/3] as an odd series to s^13: log(1 + e) with s = e / (2 + e), e in [0, 1]
// (no cancellation for tiny e), relative error < 2e-7. The device softplus uses it (its division is a fast
// one there); the host has a division-free polynomial, host_log1p_unit_approx.
GMAMBA_HD_SMALL float log1p_from_atanh_arg(float s) {
  const float s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// log1p(e) for e in [0, 1] as e q(e), q a degree-9 polynomial fitted for relative error. No division,
// unlike the atanh series the device uses: softplus got 16 % cheaper on the CPU (34.5 -> 29.1 cycles per
// 8 lanes, Zen3), and its relative error is 1.8e-7 at most over [-87, 60] (ctest's sweep; the atanh form
// measured 2.2e-7 in a coarser one).
GMAMBA_HOST_INLINE float host_log1p_unit_approx(float e) {
  float p = -0.0032439809292554855f;
  p = p * e + 0.019851261749863625f;
  p = p * e - 0.056959159672260284f;
  p = p * e + 0.10603617131710052f;
  p = p * e - 0.15305569767951965f;
  p = p * e + 0.19675931334495544f;
  p = p * e - 0.24954132735729218f;
  p = p * e + 0.3332996368408203f;
  p = p * e - 0.4999990165233612f;
  p = p * e + 1.0f;
  return p * e;
}

// softplus(v) = max(v, 0) + log1p(e) with e = exp(-|v|) given (the CPU backward needs e for the
// derivative too). Above 20 this is v exactly, as torch's linear branch gives: log1p(e) < 2.1e-9 there,
// under half of v's last place.
GMAMBA_HOST_INLINE float host_softplus_given_exp(float v, float e) {
  return (v > 0.0f ? v : 0.0f) + host_log1p_unit_approx(e);
}

// softplus(v), vectorisable.
GMAMBA_HOST_INLINE float host_softplus_approx(float v) {
  return host_softplus_given_exp(v, host_exp_nonpositive(v < 0.0f ? v : -v));
}

GMAMBA_HOST_INLINE float host_sigmoid_approx(float v) { return 1.0f / (1.0f + host_exp_approx(-v)); }

#if defined(__CUDA_ARCH__)
// The hardware 2^x with denormal results flushed to zero: one multiply and one MUFU. __expf without
// -ftz adds a range test and two rescaling multiplies per call (ncu/SASS, GPU run 17: 5 instructions per
// exp, a fifth of the forward's per-state work). A decay below 1e-38 is zero for the scan either way.
__device__ __forceinline__ float device_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}
#endif

GMAMBA_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return device_exp(x);
#else
  return host_exp_approx(x);
#endif
}

GMAMBA_HD double fast_exp(double x) { return exp(x); }

}  // namespace gmamba
