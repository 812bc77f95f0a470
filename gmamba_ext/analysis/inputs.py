"""Argument checks and layout helpers shared by the influence functions (ValueErrors name the argument)."""
from __future__ import annotations

import contextlib
import numbers
from typing import List, Sequence, Tuple

from torch import Tensor, nn

__all__ = ["LAYOUTS", "check_layout", "check_input", "check_positions", "check_positive_int", "to_bhwc",
           "from_bhwc", "eval_mode"]

LAYOUTS = ("bchw", "bhwc")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'bchw' (B, C, H, W) or 'bhwc' (B, H, W, C), got {layout!r}")
    return layout


def check_input(x, layout: str) -> Tuple[int, int, int]:
    """(H, W, C) of a single-sample floating-point input in `layout`."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D tensor in layout {layout!r}, got {got}")
    if x.shape[0] != 1:
        raise ValueError(f"x must hold one sample (batch size 1), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    _, H, W, C = to_bhwc(x, layout).shape
    if H * W * C == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    return H, W, C


def check_positions(positions, H: int, W: int) -> List[Tuple[int, int]]:
    """A list of (p, q) output positions from one pair or a sequence of pairs, each inside H x W."""
    def is_int(v):  # Python and NumPy integers, not bools
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if hasattr(positions, "tolist") and not isinstance(positions, (str, bytes)):  # NumPy arrays, tensors
        positions = positions.tolist()  # (np.argwhere gives a (k, 2) array)
    if isinstance(positions, Sequence) and len(positions) == 2 and all(is_int(v) for v in positions):
        positions = [positions]
    if not isinstance(positions, Sequence) or isinstance(positions, str) or len(positions) == 0:
        raise ValueError(f"positions must be a (p, q) pair or a non-empty sequence of pairs, "
                         f"got {positions!r}")
    out = []
    for pos in positions:
        if not (isinstance(pos, Sequence) and len(pos) == 2 and all(is_int(v) for v in pos)):
            raise ValueError(f"positions: each entry must be a (p, q) pair of ints, got {pos!r}")
        p, q = int(pos[0]), int(pos[1])
        if not (0 <= p < H and 0 <= q < W):
            raise ValueError(f"positions: output position {(p, q)} is outside the {H} x {W} grid "
                             f"(need 0 <= p < {H}, 0 <= q < {W})")
        out.append((p, q))
    return out


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def to_bhwc(t: Tensor, layout: str) -> Tensor:
    """A (B, H, W, C) view of a tensor in `layout`."""
    return t.permute(0, 2, 3, 1) if layout == "bchw" else t


def from_bhwc(t: Tensor, layout: str) -> Tensor:
    """A view of a (B, H, W, C) tensor in `layout`."""
    return t.permute(0, 3, 1, 2) if layout == "bchw" else t


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Runs the body with every submodule in eval mode (dropout off, norms on running stats, so samples of
    a batch stay independent), then restores each submodule's own training flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
