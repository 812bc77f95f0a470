"""One module's global-perception numbers at one input: influence maps plus tau and the scan-order check."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import Tensor, nn

from .influence import estimated_influence, exact_influence
from .inputs import check_input, check_layout, check_positions
from .metrics import max_influence_beyond_lookahead, tau_argmin

__all__ = ["perception_report"]


def perception_report(module: nn.Module, x: Tensor, positions, layout: str = "bchw",
                      d_conv: Optional[int] = None, method: str = "exact", **options) -> Tuple[Dict, Tensor]:
    """(report, maps) for the given output positions. report: tau (min influence over all inputs and the
    positions), tau_output / tau_input (where it is reached), max_influence, tau_relative (tau /
    max_influence), zero_fraction (share of map entries that are exactly 0), and, when d_conv is given,
    beyond_lookahead_max (exactly 0.0 for a causal raster scan). method "exact" or "estimated"; options
    go to exact_influence / estimated_influence."""
    check_layout(layout)
    H, W, _ = check_input(x, layout)
    pos = check_positions(positions, H, W)
    if method == "exact":
        maps = exact_influence(module, x, pos, layout, **options)
    elif method == "estimated":
        maps = estimated_influence(module, x, pos, layout, **options)
    else:
        raise ValueError(f"method must be 'exact' or 'estimated', got {method!r}")
    arg = tau_argmin(maps, pos)
    report = {"method": method, "tau": arg["tau"], "tau_output": list(arg["output"]),
              "tau_input": list(arg["input"]), "max_influence": float(maps.max()),
              "tau_relative": arg["tau"] / float(maps.max()) if float(maps.max()) > 0 else 0.0,
              "zero_fraction": float((maps == 0).double().mean())}
    if d_conv is not None:
        report["d_conv"] = d_conv
        report["beyond_lookahead_max"] = max_influence_beyond_lookahead(maps, pos, d_conv)
    return report, maps
