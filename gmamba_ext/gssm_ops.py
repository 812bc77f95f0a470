"""The GSSM stages around the scan as custom ops (torch.library): `conv_silu` (depthwise "same" conv + SiLU
of both halves of the in_proj output in one pass) and `fgmm` (FGMM gating, the per-sample poolings, the
adaptive mixing weights and the global gate in two passes). Fake kernels and autograd are registered here;
`conv_silu_torch` / `fgmm_torch` compute the same functions with plain torch ops (the fallback on devices
without a compiled kernel, and the oracle of the op tests)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .functorch_rules import functorch_active, functorch_function, register_fold_rule, register_loop_rule
from .higher_order import backward_is_differentiated, reference_vjp
from .ops import _OPS, HAS_EXTENSION, _has_kernel
from .reference import accumulation_dtype

__all__ = ["conv_silu", "fgmm", "conv_silu_torch", "fgmm_torch"]


def _acc(t: Tensor, like: Tensor) -> Tensor:
    return t.to(accumulation_dtype(like.dtype)).contiguous()


def conv_silu(xz: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """x1, z1 = silu(conv(xz)) of channels [0, d) and [d, 2d) of xz (B, L, 2d); the depthwise conv runs along
    L with "same" zero padding ((K-1)//2 before, the rest after). weight (2d, K) or (2d, 1, K), bias (2d,).
    Returns two contiguous (B, L, d) tensors in xz's dtype (weights act in float32, float64 for float64)."""
    w = _acc(weight.reshape(weight.shape[0], -1), xz)
    b = _acc(bias, xz)
    xz = xz.contiguous()
    if _has_kernel(xz.device):
        return (_ConvFunctorch.apply if functorch_active() else torch.ops.gmamba_ext.conv_silu_fwd)(xz, w, b)
    return conv_silu_torch(xz, w, b)


def conv_silu_torch(xz: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    ch, K = weight.shape[0], weight.shape[-1]
    left = (K - 1) // 2
    v = F.pad(xz.transpose(1, 2).to(weight.dtype), (left, K - 1 - left))
    out = F.silu(F.conv1d(v, weight.reshape(ch, 1, K), bias, groups=ch)).transpose(1, 2).to(xz.dtype)
    d = ch // 2
    return out[..., :d].contiguous(), out[..., d:].contiguous()


def fgmm(x1: Tensor, f: Tensor, c: Tensor, gate_logit: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
         ratio: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """FGMM and the global gate on tokens (B, L, d), all in x1's dtype:
        g = mean_l sigmoid(gate_logit)                       (B,)
        F2 = f * sigmoid(c);  s = mean_l (x1 + F2)          (B, d)
        a = softmax(relu(s w1^T + b1) w2^T + b2)             (B, 2)
        x2 = (a0 x1 + a1 F2) * (1 + sigmoid(ratio) g)
    w1 (d/4, d) (or the 1x1 conv's (d/4, d, 1, 1)), b1, w2 (2, d/4), b2 (2,), ratio a scalar. Returns
    (x2, s, a, g); s, a, g in float32 (float64 for float64) and not differentiable (x2 carries the graph)."""
    acc = accumulation_dtype(x1.dtype)
    w1 = w1.reshape(w1.shape[0], -1).to(acc).contiguous()
    w2 = w2.reshape(w2.shape[0], -1).to(acc).contiguous()
    args = (x1.contiguous(), f.contiguous(), c.contiguous(), gate_logit.contiguous(), w1, _acc(b1, x1), w2,
            _acc(b2, x1), ratio.reshape(()).to(acc))
    if _has_kernel(x1.device):
        return (_FgmmFunctorch.apply if functorch_active() else torch.ops.gmamba_ext.fgmm_fwd)(*args)
    return fgmm_torch(*args)


def fgmm_torch(x1, f, c, gate_logit, w1, b1, w2, b2, ratio):
    acc = w1.dtype
    g = torch.sigmoid(gate_logit.to(acc)).mean(1)
    F2 = f.to(acc) * torch.sigmoid(c.to(acc))
    s = (x1.to(acc) + F2).mean(1)
    a = torch.softmax(F.linear(F.relu(F.linear(s, w1, b1)), w2, b2), dim=-1)
    m = 1 + torch.sigmoid(ratio) * g
    x2 = (a[:, None, 0:1] * x1.to(acc) + a[:, None, 1:2] * F2) * m[:, None, None]
    return x2.to(x1.dtype), s, a, g


if HAS_EXTENSION:

    @torch.library.register_fake(_OPS + "conv_silu_fwd")
    def _conv_fwd_fake(xz, weight, bias):
        B, L, ch = xz.shape
        return xz.new_empty((B, L, ch // 2)), xz.new_empty((B, L, ch // 2))

    @torch.library.register_fake(_OPS + "conv_silu_bwd")
    def _conv_bwd_fake(dx1, dz1, xz, weight, bias):
        return torch.empty_like(xz), torch.empty_like(weight), torch.empty_like(bias)

    def _conv_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)  # the backward fills a missing half's gradient itself

    def _conv_backward(ctx, dx1, dz1):
        xz, weight, bias = ctx.saved_tensors
        B, L, ch = xz.shape
        differentiated = backward_is_differentiated((dx1, dz1, xz, weight, bias))
        dx1 = xz.new_zeros((B, L, ch // 2)) if dx1 is None else dx1.contiguous()
        dz1 = xz.new_zeros((B, L, ch // 2)) if dz1 is None else dz1.contiguous()
        if differentiated:  # through the reference (higher_order.py)
            return tuple(reference_vjp(conv_silu_torch, (xz, weight, bias), (dx1, dz1)))
        return tuple(torch.ops.gmamba_ext.conv_silu_bwd(dx1, dz1, xz, weight, bias))

    torch.library.register_autograd(_OPS + "conv_silu_fwd", _conv_backward, setup_context=_conv_setup)

    @torch.library.register_fake(_OPS + "fgmm_fwd")
    def _fgmm_fwd_fake(x1, f, c, gate_logit, w1, b1, w2, b2, ratio):
        B, _, d = x1.shape
        return torch.empty_like(x1), w1.new_empty((B, d)), w1.new_empty((B, 2)), w1.new_empty((B,))

    @torch.library.register_fake(_OPS + "fgmm_bwd")
    def _fgmm_bwd_fake(dx2, x1, f, c, gate_logit, s, a, g, w1, b1, w2, b2, ratio):
        return (torch.empty_like(x1), torch.empty_like(x1), torch.empty_like(x1), torch.empty_like(gate_logit),
                torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2), torch.empty_like(b2),
                torch.empty_like(ratio))

    def _fgmm_setup(ctx, inputs, output):
        _, s, a, g = output
        ctx.save_for_backward(*inputs, s, a, g)
        ctx.mark_non_differentiable(s, a, g)
        ctx.set_materialize_grads(False)  # no zero fills for s, a, g, which take no gradient

    def _fgmm_backward(ctx, dx2, _ds, _da, _dg):
        x1, f, c, gate_logit, w1, b1, w2, b2, ratio, s, a, g = ctx.saved_tensors
        inputs = (x1, f, c, gate_logit, w1, b1, w2, b2, ratio)
        differentiated = backward_is_differentiated((dx2, *inputs))
        dx2 = torch.zeros_like(x1) if dx2 is None else dx2.contiguous()
        if differentiated:  # through the reference (higher_order.py); s, a, g take no gradient
            return tuple(reference_vjp(lambda *t: fgmm_torch(*t)[0], inputs, dx2))
        return tuple(torch.ops.gmamba_ext.fgmm_bwd(dx2, x1, f, c, gate_logit, s, a, g, w1, b1, w2, b2, ratio))

    torch.library.register_autograd(_OPS + "fgmm_fwd", _fgmm_backward, setup_context=_fgmm_setup)

    # torch.func (functorch_rules.py): Functions functorch accepts, and batching rules; xz, and x1, f, c,
    # gate_logit lead with the batch, the weights do not.
    _ConvFunctorch = functorch_function("_ConvFunctorch", torch.ops.gmamba_ext.conv_silu_fwd, _conv_setup,
                                        _conv_backward)
    _FgmmFunctorch = functorch_function("_FgmmFunctorch", torch.ops.gmamba_ext.fgmm_fwd, _fgmm_setup,
                                        _fgmm_backward)
    register_fold_rule(torch.ops.gmamba_ext.conv_silu_fwd.default, lambda n: (True, False, False))
    register_fold_rule(torch.ops.gmamba_ext.fgmm_fwd.default, lambda n: (True,) * 4 + (False,) * 5)
    register_loop_rule(torch.ops.gmamba_ext.conv_silu_bwd.default)
    register_loop_rule(torch.ops.gmamba_ext.fgmm_bwd.default)
