"""The modules the CLI compares, built with one seed: GMamba (global and scan-only), the windowed block,
a 3x3 conv stack and window attention."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from ..nn import GSSM, GMambaBlock
from .inputs import check_positive_int
from .window_attention import WindowAttention

__all__ = ["ConvStack", "Candidate", "comparison_modules"]


class ConvStack(nn.Sequential):
    """layers 3x3 convolutions ("same" zero padding) with GELU between: receptive field (2 layers + 1)^2."""

    def __init__(self, dim: int, layers: int = 3):
        check_positive_int(dim, "dim")
        check_positive_int(layers, "layers")
        mods: List[nn.Module] = []
        for k in range(layers):
            mods.append(nn.Conv2d(dim, dim, 3, padding=1))
            if k < layers - 1:
                mods.append(nn.GELU())
        super().__init__(*mods)


class TokenMixer(GSSM):
    """The GSSM mixer called on (B, H, W, C) tokens with the layout said, so that maps with H = W = C (which
    fit both readings) take no warning."""

    def forward(self, x):
        return super().forward(x, layout="bhwc")


@dataclass
class Candidate:
    name: str          # short key used in the JSON
    label: str         # panel title
    module: nn.Module
    layout: str        # "bchw" or "bhwc"
    causal: bool       # a raster-order causal scan: report the beyond-look-ahead number


def comparison_modules(channels: int, window_size: int = 4, seed: int = 0,
                       dtype: torch.dtype = torch.float64, device="cpu") -> List[Candidate]:
    """Freshly initialised modules (eval mode, `dtype`, `device`); module k draws its parameters from
    torch.manual_seed(seed + k) (so no draw depends on the others) inside fork_rng (the caller's global
    RNG state is left as it was)."""
    check_positive_int(channels, "channels")
    check_positive_int(window_size, "window_size")
    w = window_size
    specs = [
        ("gmamba_full", "GMambaBlock full", lambda: GMambaBlock(channels), "bchw", False),
        ("gssm_full", "GSSM mixer full", lambda: TokenMixer(channels, variant="full"), "bhwc", False),
        ("gmamba_ssm", "GMambaBlock ssm (scan only, uni)", lambda: GMambaBlock(channels, variant="ssm"),
         "bchw", True),
        (f"gmamba_window{w}", f"GMambaBlock full, window {w}", lambda: GMambaBlock(channels, window_size=w),
         "bchw", False),
        ("conv3x3_x3", "3 x conv3x3 + GELU", lambda: ConvStack(channels, 3), "bchw", False),
        (f"window_attention{w}", f"window attention {w}x{w}", lambda: WindowAttention(channels, w), "bchw",
         False),
    ]
    out = []
    for k, (name, label, build, layout, causal) in enumerate(specs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            module = build()
        module = module.to(device=device, dtype=dtype).eval()
        out.append(Candidate(name, label, module, layout, causal))
    return out
