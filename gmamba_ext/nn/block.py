"""`GMambaBlock`: the plug-and-play residual block of GSSM_SPEC.md on (B, C, H, W) feature maps:
t = x + drop_path(gamma_1 * mixer(norm1(x))); out = t + drop_path(gamma_2 * mlp(norm2(t))), with an optional
window_size that reproduces the release's windowed block (not global)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gssm_module import GSSM

__all__ = ["GMambaBlock", "Mlp", "drop_path"]


def drop_path(x: Tensor, p: float, training: bool, group: int = 1) -> Tensor:
    """Stochastic depth: zero whole samples with probability p, scale the rest by 1 / (1 - p). Each run of
    `group` consecutive rows of x is one sample (the windows of one image) and is kept or dropped as one."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0] // group,) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    keep = keep.bernoulli_(1 - p).repeat_interleave(group, dim=0)
    return x * keep / (1 - p)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Mlp(nn.Module):
    """Linear(C, hidden) -> GELU -> Linear(hidden, C) (keys fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, **kw):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **kw)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GMambaBlock(nn.Module):
    """Residual GMamba block on (B, C, H, W) (GSSM_SPEC.md "GMamba block"). Keys: norm1.*, mixer.*, norm2.*,
    mlp.fc1.*, mlp.fc2.*, and gamma_1 / gamma_2 when layer_scale is a number (their initial value; 0 makes
    the block the identity at initialisation). window_size: None (global, the default) or w for the release's
    windowed block (zero padding to multiples of w at the bottom/right, w x w windows as independent samples,
    then crop). A channels_last input is read without a copy; the output is (B, C, H, W) in the input's
    memory format (channels_last for channels_last, contiguous for contiguous). Extra keyword arguments go
    to the mixer (variant, mask, directions, dt_rank, ...)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None, window_size: Optional[int] = None, d_state: int = 8,
                 d_conv: int = 3, expand: float = 1, device=None, dtype=None, **mixer_kwargs):
        super().__init__()
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"GMambaBlock: dim must be a positive int, got {dim!r}")
        if window_size is not None and (not _is_int(window_size) or window_size < 1):
            raise ValueError(f"GMambaBlock: window_size must be None or a positive int, got {window_size!r}")
        if not _is_number(drop_path) or not 0.0 <= drop_path < 1.0:
            raise ValueError(f"GMambaBlock: drop_path must be a number in [0, 1), got {drop_path!r}")
        if not _is_number(mlp_ratio) or not mlp_ratio > 0 or int(dim * mlp_ratio) < 1:
            raise ValueError(f"GMambaBlock: mlp_ratio must be a number with int(dim * mlp_ratio) >= 1, got "
                             f"{mlp_ratio!r}")
        if layer_scale is not None and (not _is_number(layer_scale) or not math.isfinite(layer_scale)):
            raise ValueError(f"GMambaBlock: layer_scale must be None or a finite number, got {layer_scale!r}")
        kw = dict(device=device, dtype=dtype)
        self.dim = dim
        self.window_size = window_size
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, **kw)
        self.mixer = GSSM(dim, d_state=d_state, d_conv=d_conv, expand=expand, **mixer_kwargs, **kw)
        self.norm2 = nn.LayerNorm(dim, **kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)
        self.layer_scale = layer_scale
        if layer_scale is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale), **kw))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale), **kw))
        else:
            self.gamma_1 = self.gamma_2 = None

    def reset_parameters(self) -> None:
        """Its own parameters, the layer scales (to layer_scale), as deferred (meta-device) initialisation
        such as FSDP's calls it on each module that owns parameters; the sub-modules reset themselves."""
        if self.gamma_1 is not None:
            with torch.no_grad():
                self.gamma_1.fill_(float(self.layer_scale))
                self.gamma_2.fill_(float(self.layer_scale))

    def _tokens(self, t: Tensor, group: int = 1) -> Tensor:
        """The block on (N, H, W, C) tokens; each `group` consecutive rows are one sample (drop_path)."""
        mixed = self.mixer(self.norm1(t), layout="bhwc")  # tokens, whatever the sizes (H = W = C too)
        if self.gamma_1 is not None:
            mixed = self.gamma_1 * mixed
        t = t + drop_path(mixed, self.drop_path, self.training, group)
        mlp = self.mlp(self.norm2(t))
        if self.gamma_2 is not None:
            mlp = self.gamma_2 * mlp
        return t + drop_path(mlp, self.drop_path, self.training, group)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"GMambaBlock: x must be a 4-D (B, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"GMambaBlock: x must be floating point, got {x.dtype}")
        if x.shape[1] != self.dim:
            raise ValueError(f"GMambaBlock: x has {x.shape[1]} channels (shape {tuple(x.shape)}), the block "
                             f"was built for dim = {self.dim}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"GMambaBlock: x has an empty map (shape {tuple(x.shape)}): H and W must be >= 1")
        t = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view, contiguous when x is channels_last
        w = self.window_size
        if w is None:
            return self._tokens(t).permute(0, 3, 1, 2)
        B, H, W, C = t.shape
        Hp, Wp = -(-H // w) * w, -(-W // w) * w
        t = F.pad(t, (0, 0, 0, Wp - W, 0, Hp - H))
        win = t.reshape(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, C)
        out = self._tokens(win, group=(Hp // w) * (Wp // w)).reshape(B, Hp // w, Wp // w, w, w, C)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)[:, :H, :W].permute(0, 3, 1, 2)
        # the input's memory format, as the global block gives (a channels_last input is not contiguous)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, drop_path={self.drop_path}"
