"""Opt-in checks that the inputs of `selective_scan` and `gssm` hold no NaN or inf.

By default NaN and inf propagate to the outputs, as in PyTorch's own ops: on a GPU a check needs a
device-to-host sync per call, and a forward that raised on inf would break mixed-precision training, where
an overflowing step is expected to produce inf and be skipped by the gradient scaler. The checks run when

- GMAMBA_CHECK_FINITE=always, or
- GMAMBA_CHECK_FINITE=auto (or unset) and PyTorch's anomaly mode is on (`torch.autograd.detect_anomaly()`
  or `torch.autograd.set_detect_anomaly(True)`), the switch users already reach for when hunting NaN:
  anomaly mode then names the backward that made a NaN, and these checks name the forward argument that
  carried one in.

GMAMBA_CHECK_FINITE=never turns them off. The variable is read per call. A failed check raises ValueError
naming the function, the argument (a parameter by its state_dict key) and the index of the first bad value.
Skipped where a check cannot read values: under torch.compile or torch.export tracing, functorch
transforms (vmap, grad), fake or meta tensors, CUDA graph capture, and when the tensors are on several
devices (the op itself then raises its device error).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["finite_checks_enabled", "check_finite"]

_MODES = ("auto", "always", "never")


def finite_checks_enabled() -> bool:
    """Whether `check_finite` checks now (GMAMBA_CHECK_FINITE and anomaly mode, as the module says). Never
    while torch.compile traces (it could neither read the values nor trace torch.is_anomaly_enabled)."""
    if torch.compiler.is_compiling():
        return False
    mode = os.environ.get("GMAMBA_CHECK_FINITE") or "auto"
    if mode not in _MODES:
        raise ValueError(f"GMAMBA_CHECK_FINITE must be one of {_MODES}, got {mode!r}")
    return mode == "always" or (mode == "auto" and torch.is_anomaly_enabled())


def _values_unreadable(tensors: Sequence[Tensor]) -> bool:
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return True
    device = next(iter(devices))
    if device.type == "meta" or any(torch._subclasses.fake_tensor.is_fake(t) for t in tensors):
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _describe_first_bad(t: Tensor) -> str:
    flat = t.detach().reshape(-1)
    first = int(torch.nonzero(~torch.isfinite(flat))[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), t.shape))
    return f"{flat[first].item()} at index {index}"


def check_finite(function: str, named: Iterable[Tuple[str, Optional[Tensor]]]) -> None:
    """Raise ValueError if a floating-point tensor of `named` ((name, tensor or None) pairs) holds NaN or inf.
    Callers test finite_checks_enabled() first (so that nothing is built per call while the checks are off).
    One host sync for all the tensors together."""
    pairs = [(name, t) for name, t in named if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not pairs or _values_unreadable([t for _, t in pairs]):
        return
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(t).all() for _, t in pairs])
        bad = torch.nonzero(~finite).flatten().tolist()  # the one sync
    if bad:
        name, t = pairs[bad[0]]
        raise ValueError(f"{function}: {name} holds a non-finite value ({_describe_first_bad(t)}); "
                         f"this check runs under torch.autograd.detect_anomaly or with GMAMBA_CHECK_FINITE="
                         f"always (GMAMBA_CHECK_FINITE=never turns it off)")
