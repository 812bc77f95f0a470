"""FLOP formulas for the package's custom ops, for torch.utils.flop_counter.FlopCounterMode (which counts
only ops it has a formula for: without these it counted none of the eager mixer, only the block's MLP).

Conventions, those of FlopCounterMode and of vision-Mamba papers:
- GEMMs 2 M N K; a depthwise conv 2 K per output element (FlopCounterMode's convolution formula); elementwise
  work and FFTs are not counted (FlopCounterMode has no formula for torch.fft).
- The selective scan forward 9 B L d N, plus B L d for D and for z (VMamba's `flops_selective_scan_fn`,
  from state-spaces/mamba issue 110); its backward twice that.
- gssm_fwd counts the GEMMs and ops of the Python composition it is equivalent to (gmamba_ext.gssm
  `_composition`): eager gssm reports what FlopCounterMode reports for `gssm_composition` (tested), with
  FEM's low-pass counted as its four DFT-matrix GEMMs where that form runs (the CPU's default) and as 0
  where it runs as FFTs (GMAMBA_GSSM_LOWPASS, docs/GSSM.md). Its two backward ops together count twice the
  forward (the usual estimate; autograd's own count of the composition's backward differs by the GEMMs
  with constant operands).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .ops import HAS_EXTENSION
from .gssm_fused import _sizes, lowpass_uses_fft

__all__ = ["selective_scan_flops", "gssm_flops"]


def selective_scan_flops(batch: int, dim: int, length: int, d_state: int, with_D: bool = True,
                         with_z: bool = False) -> int:
    """VMamba's count of one selective scan forward: 9 B L d N (+ B L d each for D and z)."""
    flops = 9 * batch * length * dim * d_state
    return flops + batch * length * dim * (int(with_D) + int(with_z))


def _lowpass_flops(B: int, H: int, W: int, d: int, mask: str) -> int:
    """The four GEMMs of the DFT-matrix low-pass (gssm._fem_low_dft): analysis along W and H, synthesis
    along H and W, over the kept rows U and columns ncol."""
    n, ncol = H // 4, (W // 2 + 1) // 4
    if n == 0 or ncol == 0:
        return 0
    U = n  # "corner": rows < n; "symmetric": ceil(n / 2) + floor(n / 2) rows
    cols = ncol * d
    along_w = 2 * (B * H) * (2 * ncol) * W * d
    along_h = 2 * B * (2 * U) * H * (2 * cols) + 2 * B * (2 * H) * U * (2 * cols)
    return 2 * along_w + along_h


def gssm_flops(B: int, H: int, W: int, C: int, d: int, d_state: int, dt_rank: int, d_conv: int,
               variant: str = "full", mask: str = "corner", n_directions: int = 1,
               lowpass_fft: bool = False) -> int:
    """Forward FLOPs of the GSSM mixer as gssm's composition computes it (module docstring)."""
    return sum(_gssm_parts(B, H, W, C, d, d_state, dt_rank, d_conv, variant, mask, n_directions, lowpass_fft))


def _gssm_parts(B, H, W, C, d, N, R, K, variant, mask, n_directions, lowpass_fft):
    """(front, scan): the forward FLOPs before the scans (in_proj, conv, FEM, FGMM) and from them on (x_proj,
    dt_proj, the scans, out_proj), as the two backward ops split the work."""
    L, E = H * W, 2 * d
    BL = B * L
    front = 2 * BL * C * E + 2 * BL * E * K  # in_proj; conv_silu's depthwise conv of both halves
    if variant != "ssm":
        has_low = H // 4 > 0 and (W // 2 + 1) // 4 > 0
        front += 0 if lowpass_fft else _lowpass_flops(B, H, W, d, mask)
        if variant in ("full", "fem_ssm"):
            front += 2 * (2 * (2 * d) * d * d)  # the fold: W1c Whp and W1b Wlp
            front += 2 * BL * d * (2 * d) * (2 if has_low else 1)  # x1 Px^T (+ low Pl^T)
            front += 2 * BL * (2 * d) * d  # freq_fusion.2
        if variant in ("full", "dft_fgmm_ssm"):
            E4, d4 = E // 4, d // 4
            front += 2 * BL * d * (E4 + d4) + 2 * BL * E4 + 2 * BL * d4 * d  # gate and freq_conv layers
            front += 2 * B * d * d4 + 2 * B * d4 * 2  # fgmm's adaptive-weight MLP on the pooled vector
    per_direction = 2 * BL * d * (R + 2 * N) + 2 * BL * R * d + selective_scan_flops(B, d, L, N, with_D=True)
    return front, n_directions * per_direction + 2 * BL * E * C  # out_proj on [y | z1]


def _gssm_parts_of_call(x, params, H, W, variant, mask, n_directions=1):
    """_gssm_parts for a gssm op's arguments (params in gssm_reference.expected_shapes' order; the ops take
    one initial state, or None, per direction)."""
    _, d, _, _, R, N = _sizes(params, H, W)
    return _gssm_parts(x.shape[0], H, W, x.shape[-1], d, N, R, params[1].shape[-1], variant, mask, n_directions,
                       lowpass_uses_fft(x.device))


def _register() -> None:
    ops = torch.ops.gmamba_ext

    @register_flop_formula(ops.selective_scan_fwd, get_raw=True)
    def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, channels_last, **_):
        b, L, dim = (u.shape[0], u.shape[1], u.shape[2]) if channels_last else (u.shape[0], u.shape[2], u.shape[1])
        return selective_scan_flops(b, dim, L, A.shape[1], D is not None, z is not None)

    @register_flop_formula(ops.selective_scan_bwd, get_raw=True)
    def _scan_bwd(dout, dlast, checkpoints, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus,
                  channels_last, **_):
        return 2 * _scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, channels_last)

    @register_flop_formula(ops.conv_silu_fwd, get_raw=True)
    def _conv_fwd(xz, weight, bias, **_):
        return 2 * xz.numel() * weight.shape[-1]  # (B, L, 2d), K taps each

    @register_flop_formula(ops.conv_silu_bwd, get_raw=True)
    def _conv_bwd(dx1, dz1, xz, weight, bias, **_):
        return 2 * _conv_fwd(xz, weight, bias)  # the input's and the weight's gradients

    @register_flop_formula(ops.fgmm_fwd, get_raw=True)
    def _fgmm_fwd(x1, f, c, gate_logit, w1, b1, w2, b2, ratio, **_):
        return 2 * x1.shape[0] * (w1.numel() + w2.numel())  # the MLP on the pooled (B, d) vector

    @register_flop_formula(ops.fgmm_bwd, get_raw=True)
    def _fgmm_bwd(dx2, x1, f, c, gate_logit, s, a, g, w1, b1, w2, b2, ratio, **_):
        return 2 * _fgmm_fwd(x1, f, c, gate_logit, w1, b1, w2, b2, ratio)

    @register_flop_formula(ops.gssm_fwd, get_raw=True)
    def _gssm_fwd(x, params, states, H, W, variant, mask, single_dt_bias, save, **_):
        return sum(_gssm_parts_of_call(x, params, H, W, variant, mask, len(states)))

    @register_flop_formula(ops.gssm_bwd_scan, get_raw=True)
    def _gssm_bwd_scan(dout, x, params, states, saved, H, W, variant, mask, *_, **__):
        return 2 * _gssm_parts_of_call(x, params, H, W, variant, mask, len(states))[1]

    @register_flop_formula(ops.gssm_bwd_front, get_raw=True)
    def _gssm_bwd_front(dout, dx2, x, params, saved, H, W, variant, mask, *_, **__):
        return 2 * _gssm_parts_of_call(x, params, H, W, variant, mask)[0]  # (the front needs no directions)


if HAS_EXTENSION:
    _register()
