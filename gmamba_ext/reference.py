"""The math of gmamba_ext in plain PyTorch: the oracle of every test and the fallback for devices that have
no compiled kernel. Written for clarity, not speed (sequential over the sequence)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of states, sums and weights for inputs of `dtype`: float64 for float64, else float32
    (the kernels' rule too: csrc/ops/scan_host.cpp, acc_type_for)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bc_per_channel(M: torch.Tensor, d: int, L: int, channels_last: bool) -> torch.Tensor:
    """B or C as (B or 1, d, N, L) (per-channel view), from (d, N), (B, N, L), (B, G, N, L) or their
    channels-last forms (B, L, N), (B, L, G, N). Channel c of group g uses group c // (d // G)."""
    if M.dim() == 2:
        return M[None, :, :, None].expand(1, d, M.shape[1], L)
    if channels_last:
        M = M.permute(0, 2, 3, 1) if M.dim() == 4 else M.transpose(1, 2)  # -> (B, G, N, L) / (B, N, L)
    if M.dim() == 3:
        return M[:, None]
    return M.repeat_interleave(d // M.shape[1], dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, channels_last=False):
    """Sequential selective scan with mamba-ssm's `selective_scan_fn` semantics.

    u, delta, z: (B, d, L), or (B, L, d) with channels_last; A: (d, N); B, C: see `_bc_per_channel`;
    D, delta_bias: (d,); initial_state: (B, d, N). State and accumulation in float32 (float64 for float64
    inputs); the output has u's dtype; last_state is (B, d, N) in the accumulation dtype.
    """
    dtype_in = u.dtype
    acc = accumulation_dtype(dtype_in)
    if channels_last:
        u, delta = u.transpose(1, 2), delta.transpose(1, 2)
        z = z.transpose(1, 2) if z is not None else None
    u, delta, A = u.to(acc), delta.to(acc), A.to(acc)
    batch, d, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bm = _bc_per_channel(B.to(acc), d, L, channels_last)
    Cm = _bc_per_channel(C.to(acc), d, L, channels_last)
    state = (initial_state.to(acc) if initial_state is not None
             else u.new_zeros(batch, d, A.shape[1]))
    ys = []
    for t in range(L):
        decay = torch.exp(delta[:, :, t, None] * A)
        state = decay * state + delta[:, :, t, None] * Bm[..., t] * u[:, :, t, None]
        ys.append((state * Cm[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if L > 0 else u.new_zeros(batch, d, 0)
    if D is not None:
        y = y + u * D.to(acc)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(dtype_in)
    if channels_last:
        out = out.transpose(1, 2)
    return (out, state) if return_last_state else out


def __getattr__(name):
    """The GSSM mixer's oracle lives in gmamba_ext.gssm_reference (it builds on this module); it is reachable
    here too, as `gmamba_ext.reference.gssm_ref`."""
    if name in ("gssm_ref", "gssm_stages", "GSSMConfig", "GSSMParams"):
        from . import gssm_reference
        return getattr(gssm_reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
