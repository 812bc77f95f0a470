"""Numbers read off influence maps: tau (the global-perception axiom's constant) and the causal-scan check
(influence beyond the depthwise conv's look-ahead in raster scan order)."""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..nn import GSSM
from .inputs import check_positions, check_positive_int

__all__ = ["sample_positions", "tau", "tau_argmin", "lookahead", "beyond_lookahead_mask",
           "max_influence_beyond_lookahead", "scan_d_conv"]


def sample_positions(H: int, W: int, count: int = 8, seed: int = 0) -> List[Tuple[int, int]]:
    """count distinct output positions: the four corners and the centre first (where windowed, causal and
    padded layers differ most), then uniformly drawn ones (seeded); all H * W if count >= H * W."""
    check_positive_int(H, "H")
    check_positive_int(W, "W")
    check_positive_int(count, "count")
    if count >= H * W:
        return [(p, q) for p in range(H) for q in range(W)]
    fixed = [(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1), (H // 2, W // 2)]
    out = list(dict.fromkeys(fixed))[:count]
    rest = [(p, q) for p in range(H) for q in range(W) if (p, q) not in out]
    out += random.Random(seed).sample(rest, count - len(out))
    return out


def _check_maps(maps) -> Tensor:
    if not isinstance(maps, Tensor) or maps.dim() != 3 or maps.numel() == 0:
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a non-empty (P, H, W) tensor of influence maps, got {got}")
    return maps


def tau(maps: Tensor) -> float:
    """The minimum influence over every input position and every sampled output position."""
    return float(_check_maps(maps).min())


def tau_argmin(maps: Tensor, positions) -> Dict[str, object]:
    """{"tau", "output": (p, q), "input": (i, j)}: where the minimum influence is reached."""
    _check_maps(maps)
    P, H, W = maps.shape
    pos = check_positions(positions, H, W)
    if len(pos) != P:
        raise ValueError(f"positions: {len(pos)} positions for {P} maps")
    flat = int(maps.reshape(-1).argmin())
    k, rem = divmod(flat, H * W)
    return {"tau": float(maps.reshape(-1)[flat]), "output": pos[k], "input": divmod(rem, W)}


def lookahead(d_conv: int) -> int:
    """How many positions after the output, in scan order, the "same"-padded depthwise conv of width
    d_conv reads: K - 1 - left with left = (K - 1) // 2."""
    check_positive_int(d_conv, "d_conv")
    return d_conv - 1 - (d_conv - 1) // 2


def beyond_lookahead_mask(H: int, W: int, position, d_conv: int) -> Tensor:
    """(H, W) bool: the input positions more than lookahead(d_conv) after `position` in raster order
    (l = i * W + j), where a causal raster scan ("ssm", directions "uni") has exactly zero influence."""
    (p, q), = check_positions([position], H, W)
    raster = torch.arange(H * W).reshape(H, W)
    return raster > p * W + q + lookahead(d_conv)


def max_influence_beyond_lookahead(maps: Tensor, positions, d_conv: int) -> float:
    """The largest influence on the output positions from inputs beyond the look-ahead in raster scan
    order: exactly 0.0 for a causal raster scan, > 0 for a module that imposes no order (0.0 also when
    no sampled position has such inputs, e.g. only the last position)."""
    _check_maps(maps)
    P, H, W = maps.shape
    pos = check_positions(positions, H, W)
    if len(pos) != P:
        raise ValueError(f"positions: {len(pos)} positions for {P} maps")
    worst = 0.0
    for k, position in enumerate(pos):
        region = beyond_lookahead_mask(H, W, position, d_conv).to(maps.device)
        if region.any():
            worst = max(worst, float(maps[k][region].max()))
    return worst


def scan_d_conv(module: nn.Module) -> Optional[int]:
    """d_conv of the GSSM mixers inside `module` (None when it has none); ValueError when they differ."""
    found = {m.config.d_conv for m in module.modules() if isinstance(m, GSSM)}
    if len(found) > 1:
        raise ValueError(f"module: its GSSM mixers use different d_conv values {sorted(found)}; pass d_conv")
    return found.pop() if found else None
