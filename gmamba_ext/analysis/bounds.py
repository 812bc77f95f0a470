"""The error bound of the random-projection influence estimate (see `estimated_influence`).

Setting. Fix an output position (p, q) and an input position (i, j); J = dY[p,q,:] / dX[i,j,:] is a C x C
matrix and M = J J^T is positive semi-definite with eigenvalues lambda_1.. >= 0, trace ||J||_F^2. For k
independent Gaussian vectors v_s ~ N(0, I_C) the estimate of the squared influence is

    T = (1/k) sum_s ||v_s^T J||^2 = (1/k) sum_s v_s^T M v_s = sum_{s, m} (lambda_m / k) w_{s,m}^2,

w ~ N(0, 1) i.i.d. (rotate v_s into M's eigenbasis), so E[T] = ||J||_F^2.

Bound. Laurent & Massart (2000, Lemma 1): for Z = sum_i a_i (w_i^2 - 1) with a_i >= 0 and t > 0,
P(Z >= 2 |a|_2 sqrt(t) + 2 |a|_inf t) <= exp(-t) and P(Z <= -2 |a|_2 sqrt(t)) <= exp(-t). Here
|a|_2 = |lambda|_2 / sqrt(k) <= tr(M) / sqrt(k) and |a|_inf = lambda_max / k <= tr(M) / k, hence

    P(T / ||J||_F^2 >= 1 + 2 sqrt(t/k) + 2 t/k) <= exp(-t),   P(T / ||J||_F^2 <= 1 - 2 sqrt(t/k)) <= exp(-t).

A union bound over n map entries (the same v_s serve every entry; a union bound needs no independence) with
t = ln(2 n / delta) gives: with probability >= 1 - delta, EVERY entry's estimated influence sqrt(T) lies in
[lo, hi] * the exact influence, where lo = sqrt(max(0, 1 - 2 sqrt(t/k))) and hi = sqrt(1 + 2 sqrt(t/k) +
2 t/k). The bound is dimension-free and worst-case (tight for rank-1 J); for J of higher rank the actual
errors are smaller. An entry whose J is exactly 0 is estimated as exactly 0.
"""
from __future__ import annotations

import math
from typing import Tuple

__all__ = ["projection_bound", "projections_needed"]


def _check(delta, n_entries):
    if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 < delta < 1):
        raise ValueError(f"delta must be a probability in (0, 1), got {delta!r}")
    if isinstance(n_entries, bool) or not isinstance(n_entries, int) or n_entries < 1:
        raise ValueError(f"n_entries must be a positive int, got {n_entries!r}")
    return math.log(2 * n_entries / delta)


def projection_bound(num_projections: int, delta: float = 1e-3, n_entries: int = 1) -> Tuple[float, float]:
    """(lo, hi) such that, with probability >= 1 - delta over the Gaussian projections, every one of
    n_entries estimated influences is within [lo, hi] times its exact value (module docstring)."""
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections must be a positive int, got {num_projections!r}")
    t = _check(delta, n_entries)
    s = math.sqrt(t / num_projections)
    return math.sqrt(max(0.0, 1.0 - 2.0 * s)), math.sqrt(1.0 + 2.0 * s + 2.0 * s * s)


def projections_needed(rel_error: float, delta: float = 1e-3, n_entries: int = 1) -> int:
    """The smallest k for which projection_bound(k, delta, n_entries) lies within [1 - rel_error,
    1 + rel_error]."""
    if not (isinstance(rel_error, (int, float)) and not isinstance(rel_error, bool) and 0 < rel_error < 1):
        raise ValueError(f"rel_error must be in (0, 1), got {rel_error!r}")
    t = _check(delta, n_entries)
    e = rel_error
    s_low = (1.0 - (1.0 - e) ** 2) / 2.0  # 1 - 2 s >= (1 - e)^2
    s_high = (-1.0 + math.sqrt(1.0 + 2.0 * ((1.0 + e) ** 2 - 1.0))) / 2.0  # 1 + 2 s + 2 s^2 <= (1 + e)^2
    s = min(s_low, s_high)
    k = max(1, math.ceil(t / (s * s)))
    while k > 1:  # undo float rounding of the ceiling
        lo, hi = projection_bound(k - 1, delta, n_entries)
        if lo < 1.0 - e or hi > 1.0 + e:
            break
        k -= 1
    return k
