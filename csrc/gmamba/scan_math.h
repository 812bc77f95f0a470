#pragma once
// Scalar math of the selective scan, shared by the CPU and CUDA kernels (and the C++ unit test).
#include <cmath>
#include <limits>
#include <type_traits>

#include "fast_exp.h"
#include "macros.h"

namespace gmamba {

// softplus(v) = log(1 + e^v), linear above 20 like torch.nn.functional.softplus (avoids exp overflow).
// Host float uses the vectorisable approximations of fast_exp.h (libm's scalar calls dominated the CPU
// kernels at small d_state); device and double use the library functions.
// Device float: the hardware exp and a fast division around the same series (relative error < 1e-6).
// libdevice's expf + log1pf for softplus and expf + IEEE division for sigmoid cost about 100 and 40
// instructions per element, more than the scan's whole per-state work at d_state 8 (ncu, GPU run 16).
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float device_softplus(float v) {
  const float e = device_exp(-fabsf(v));
  const float sp = fmaxf(v, 0.0f) + log1p_from_atanh_arg(__fdividef(e, 2.0f + e));
  return v > 20.0f ? v : sp;
}
// 1 / (1 + e^-v); e^-v overflows to inf for v < -88, and the fast division gives 0 there, as it should.
__device__ __forceinline__ float device_sigmoid(float v) { return __fdividef(1.0f, 1.0f + device_exp(-v)); }
#endif

// A as the CUDA kernels read it: -inf (a step that forgets the state entirely) becomes the lowest finite
// value, so a padding step past L (dt = 0) decays by exp(0 * A) = 1 instead of exp(NaN), which made
// last_state and every gradient NaN; any dt > 0 still gives a decay of 0. NaN passes through.
template <typename acc_t>
GMAMBA_HD_SMALL acc_t finite_decay_coefficient(acc_t a) {
  return a < std::numeric_limits<acc_t>::lowest() ? std::numeric_limits<acc_t>::lowest() : a;
}

template <typename acc_t>
GMAMBA_HD_SMALL acc_t softplus(acc_t v) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) return host_softplus_approx(v);
#else
  if constexpr (std::is_same_v<acc_t, float>) return device_softplus(v);
#endif
  using std::exp;
  using std::log1p;
  return v > acc_t(20) ? v : log1p(exp(v));
}

template <typename acc_t>
GMAMBA_HD_SMALL acc_t sigmoid(acc_t v) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) return host_sigmoid_approx(v);
#else
  if constexpr (std::is_same_v<acc_t, float>) return device_sigmoid(v);
#endif
  using std::exp;
  return acc_t(1) / (acc_t(1) + exp(-v));
}

// d softplus(v) / dv = sigmoid(v); matches softplus's threshold (gradient 1 above 20).
template <typename acc_t>
GMAMBA_HD_SMALL acc_t softplus_grad(acc_t v) {
  return v > acc_t(20) ? acc_t(1) : sigmoid(v);
}

template <typename acc_t>
GMAMBA_HD_SMALL acc_t silu(acc_t v) {
  return v * sigmoid(v);
}

// d silu(v) / dv = sigma(v) (1 + v (1 - sigma(v))).
template <typename acc_t>
GMAMBA_HD_SMALL acc_t silu_grad(acc_t v) {
  const acc_t s = sigmoid(v);
  return s * (acc_t(1) + v * (acc_t(1) - s));
}

// Effective step size: delta (+ bias), optionally through softplus.
template <typename acc_t>
GMAMBA_HD_SMALL acc_t discretize_delta(acc_t raw, acc_t bias, bool use_softplus) {
  const acc_t v = raw + bias;
  return use_softplus ? softplus(v) : v;
}

// Chain rule back through discretize_delta.
template <typename acc_t>
GMAMBA_HD_SMALL acc_t discretize_delta_grad(acc_t raw, acc_t bias, bool use_softplus, acc_t grad) {
  return use_softplus ? grad * softplus_grad(raw + bias) : grad;
}

// One step of the recurrence s_l = exp(delta A) s_{l-1} + delta B u, with decay = exp(delta A) given.
template <typename acc_t>
GMAMBA_HD_SMALL acc_t scan_step(acc_t decay, acc_t state, acc_t delta_b_u) {
  return decay * state + delta_b_u;
}

}  // namespace gmamba
