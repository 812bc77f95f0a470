"""Influence maps I_pq(i, j) = || dY[p,q,:] / dX[i,j,:] ||_F of a module at one input: exact (one
vector-Jacobian product per output channel) or estimated (k Gaussian projections of the output channels)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .inputs import check_input, check_layout, check_positions, check_positive_int
from .vjp import vjp_energy

__all__ = ["exact_influence", "estimated_influence"]


def exact_influence(module: nn.Module, x: Tensor, positions, layout: str = "bchw", chunk_size: int = 64,
                    batching: str = "stack") -> Tensor:
    """Exact influence maps, shape (P, H, W), for the P output positions (p, q) (one pair or a sequence).

    module maps a (1, C, H, W) input (layout "bchw") or a (1, H, W, C) input (layout "bhwc") to the same
    shape; x is that single input (the Jacobian is taken there). maps[m, i, j] = || dY[p_m, q_m, :] /
    dX[i, j, :] ||_F, from C vector-Jacobian products per position (the rows of the Jacobian, one-hot
    cotangents), chunk_size of them per forward/backward (bounds memory). The module runs in eval mode; the
    maps have x's dtype and device (use float64 for exact zeros and small values). batching: see
    `gmamba_ext.analysis.vjp.vjp_energy`.
    """
    check_layout(layout)
    H, W, C = check_input(x, layout)
    pos = check_positions(positions, H, W)
    check_positive_int(chunk_size, "chunk_size")
    rows = [(m, p, q) for m, (p, q) in enumerate(pos) for _ in range(C)]
    eye = torch.eye(C, dtype=x.dtype, device=x.device)
    vectors = eye.repeat(len(pos), 1)
    return vjp_energy(module, x, layout, rows, vectors, len(pos), chunk_size, batching).sqrt()


def estimated_influence(module: nn.Module, x: Tensor, positions, layout: str = "bchw",
                        num_projections: int = 32, seed: int = 0, chunk_size: int = 64,
                        batching: str = "stack") -> Tensor:
    """Estimated influence maps, shape (P, H, W), from num_projections = k vector-Jacobian products per
    position instead of C: maps[m, i, j]^2 = (1/k) sum_s || v_s^T dY[p,q,:] / dX[i,j,:] ||^2 with
    v_s ~ N(0, I_C) drawn from a CPU generator seeded with `seed` (the same numbers on every device), so
    E[maps^2] = exact^2. Worth it when k < C.

    Error bound (proof in gmamba_ext.analysis.bounds): with t = ln(2 n / delta), with probability at least
    1 - delta over the draw, every one of n estimated entries lies within
    [sqrt(max(0, 1 - 2 sqrt(t/k))), sqrt(1 + 2 sqrt(t/k) + 2 t/k)] times its exact value;
    `projection_bound(k, delta, n)` returns that interval and `projections_needed(eps, delta, n)` the k for
    a relative error eps. Entries with exactly zero influence are estimated as exactly zero. The bound is
    worst-case (rank-1 Jacobian blocks); it says nothing about a fixed seed beyond "this draw was one of
    the likely ones", so tests pin the seed.
    """
    check_layout(layout)
    H, W, C = check_input(x, layout)
    pos = check_positions(positions, H, W)
    check_positive_int(num_projections, "num_projections")
    check_positive_int(chunk_size, "chunk_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(len(pos) * num_projections, C, generator=gen, dtype=torch.float64)
    rows = [(m, p, q) for m, (p, q) in enumerate(pos) for _ in range(num_projections)]
    vectors = vectors.to(device=x.device, dtype=x.dtype)
    energy = vjp_energy(module, x, layout, rows, vectors, len(pos), chunk_size, batching)
    return (energy / num_projections).sqrt()
