#pragma once
// Scalar math of the selective scan, shared by the CPU and CUDA kernels (and the C++ unit test).
#include <cmath>
#include <type_traits>

#include "fast_exp.h"
#include "macros.h"

namespace gmamba {

// softplus(v) = log(1 + e^v), linear above 20 like torch.nn.functional.softplus (avoids exp overflow).
// Host float uses the vectorisable approximations of fast_exp.h (libm's scalar calls dominated the CPU
// kernels at small d_state); device and double use the library functions.
template <typename acc_t>
GMAMBA_HD_SMALL acc_t softplus(acc_t v) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) return host_softplus_approx(v);
#endif
  using std::exp;
  using std::log1p;
  return v > acc_t(20) ? v : log1p(exp(v));
}

template <typename acc_t>
GMAMBA_HD_SMALL acc_t sigmoid(acc_t v) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) return host_sigmoid_approx(v);
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
