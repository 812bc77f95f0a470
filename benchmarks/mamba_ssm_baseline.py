"""Thin wrapper around mamba-ssm's prebuilt CUDA selective-scan kernel.

Comparison baseline only. The module is built by benchmarks/build_mamba_ssm.sh
into .device/mamba_ssm/selective_scan_cuda.so.gz (never committed); this file is
our own code and does not import mamba_ssm.

    import mamba_ssm_baseline as mb
    mb.load(".device/mamba_ssm")          # dir holding the .so or .so.gz, or the .gz itself
    y = mb.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

Shapes (mamba-ssm convention): u, delta, z: (batch, dim, L); A: (dim, N);
B, C: (batch, N, L) or (batch, groups, N, L) or (dim, N); D, delta_bias: (dim,).

Binding (mamba-ssm 2.3.2.post1, csrc/selective_scan/selective_scan.cpp):
  fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus) -> [out, x] (+ [out_z] if z)
  bwd(u, delta, A, B, C, D?, z?, delta_bias?, dout, x?, out?, dz?, delta_softplus,
      recompute_out_z) -> [du, ddelta, dA, dB, dC, dD, ddelta_bias] (+ [dz] if z)
  x: (batch, dim, n_chunks, 2*N) chunk states, n_chunks = ceil(L / 2048).
"""
import gzip
import importlib
import os
import shutil
import sys
import tempfile

import torch

_ext = None


def load(path=os.path.join(os.path.dirname(__file__), "..", ".device", "mamba_ssm")):
    """Import selective_scan_cuda from a dir (with .so or .so.gz) or a .so.gz file."""
    global _ext
    if _ext is not None:
        return _ext
    if os.path.isdir(path):
        so = os.path.join(path, "selective_scan_cuda.so")
        path = so if os.path.exists(so) else so + ".gz"
    if path.endswith(".gz"):
        tmp = tempfile.mkdtemp(prefix="selective_scan_cuda_")
        with gzip.open(path, "rb") as src, open(os.path.join(tmp, "selective_scan_cuda.so"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        path = tmp
    else:
        path = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, path)
    try:
        _ext = importlib.import_module("selective_scan_cuda")  # torch must be imported first
    finally:
        sys.path.remove(path)
    return _ext


def _last_dim_contig(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        u, delta, B, C, z = map(_last_dim_contig, (u, delta, B, C, z))
        D = D.contiguous() if D is not None else None
        ctx.squeeze_B, ctx.squeeze_C = B.dim() == 3, C.dim() == 3
        if ctx.squeeze_B:
            B = B.unsqueeze(1)  # (batch, 1 group, N, L)
        if ctx.squeeze_C:
            C = C.unsqueeze(1)
        out, x, *rest = _ext.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.delta_softplus = delta_softplus
        ctx.has_z = z is not None
        # bwd needs `out` (pre-gating) only when z is given
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out if ctx.has_z else None)
        y = rest[0] if ctx.has_z else out
        if return_last_state:
            return y, x[:, :, -1, 1::2]  # (batch, dim, N)
        return y

    @staticmethod
    def backward(ctx, dout, *_):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = _ext.bwd(
            u, delta, A, B, C, D, z, delta_bias, _last_dim_contig(dout), x, out, None,
            ctx.delta_softplus, False)
        if ctx.squeeze_B:
            dB = dB.squeeze(1)
        if ctx.squeeze_C:
            dC = dC.squeeze(1)
        return (du, ddelta, dA, dB, dC,
                dD if D is not None else None,
                rest[0] if ctx.has_z else None,
                ddelta_bias if delta_bias is not None else None,
                None, None)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, return_last_state=False):
    """mamba-ssm's selective scan (CUDA). Call load() first."""
    if _ext is None:
        raise RuntimeError("call mamba_ssm_baseline.load(path) first")
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                return_last_state)
