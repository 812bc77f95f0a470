"""A minimal window-attention layer (Swin-style, no shift) for comparison: local by construction."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import check_positive_int

__all__ = ["WindowAttention"]


class WindowAttention(nn.Module):
    """x + MultiheadAttention(LayerNorm(x)) inside non-overlapping w x w windows, on (B, C, H, W).
    The input is zero-padded at the bottom/right to multiples of w (the padded tokens take part as keys,
    like the windowed GMamba block's padding) and cropped back; no token sees outside its window."""

    def __init__(self, dim: int, window_size: int = 4, num_heads: int = 1):
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(window_size, "window_size")
        check_positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(f"num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
        self.dim, self.window_size = dim, window_size
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"WindowAttention: x must be (B, {self.dim}, H, W), got {got}")
        B, C, H, W = x.shape
        w = self.window_size
        Hp, Wp = -(-H // w) * w, -(-W // w) * w
        t = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, Wp - W, 0, Hp - H))
        win = t.reshape(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        h = self.norm(win)
        win = win + self.attn(h, h, h, need_weights=False)[0]
        out = win.reshape(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        return out[:, :H, :W].permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}"
