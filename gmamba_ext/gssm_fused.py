"""The GSSM mixer through the composite C++ ops `gssm_fwd`, `gssm_bwd_scan` and `gssm_bwd_front`
(csrc/ops/gssm_fused.h): the same algebra as gssm.py's Python composition, orchestrated in C++ with a
hand-written backward, so that a call costs one autograd node and one dispatcher round trip per kernel
rather than Python and autograd work per op (a GPU forward at DESIGN's sizes was host-bound on the Python
composition; the C++ path is 1.2x-2x faster there, and still host-bound: docs/GSSM.md)."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import ops  # noqa: F401  (loads the extension: the fake kernels below register only for ops that exist)
from .gssm_reference import DIRECTIONS, GSSMConfig, GSSMParams, _field, expected_shapes, gssm_ref
from .higher_order import backward_is_differentiated, reference_vjp

__all__ = ["gssm_fused"]


_DIRECTIONS = {n: name for name, n in DIRECTIONS.items()}  # the `directions` option for a count of directions


@lru_cache(maxsize=None)
def _param_keys(n_directions: int) -> Tuple[str, ...]:
    """The state_dict keys in the order the C++ ops take them (expected_shapes' order)."""
    return tuple(expected_shapes(GSSMConfig(d_model=8, directions=_DIRECTIONS[n_directions])))


@lru_cache(maxsize=None)
def _param_fields(n_directions: int) -> Tuple[str, ...]:
    """GSSMParams field names in _param_keys' order (getattr without a key -> field translation per call)."""
    return tuple(_field(key) for key in _param_keys(n_directions))


def _absent_to_none(grads) -> List[Optional[Tensor]]:
    # The ops mark an absent gradient with an empty 1-D tensor; no parameter or state is empty.
    return [None if g.numel() == 0 and g.dim() == 1 else g for g in grads]


class _GSSMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, options, n_states, *tensors):
        states, params = list(tensors[:n_states]), list(tensors[n_states:])
        out, front, scan = torch.ops.gmamba_ext.gssm_fwd(h, params, states, *options, True)
        ctx.options, ctx.n_states = options, n_states
        ctx.save_for_backward(h, *states, *params)
        # Intermediates, kept on ctx (not save_for_backward) so that the backward can drop each list as soon
        # as it is consumed: the scan's tensors are freed before the front part of the backward runs.
        ctx.intermediates = [front, scan]
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors  # read once: non-reentrant checkpointing refuses a second unpack
        h, *rest = saved
        states, params = rest[:ctx.n_states], rest[ctx.n_states:]
        if _legacy_batched(dout):
            return _batched_backward(ctx, h, states, params, dout)
        if backward_is_differentiated((dout, *saved)):
            return _differentiable_backward(ctx, h, states, params, dout)
        lists = ctx.intermediates
        if lists is None:
            raise RuntimeError("gssm: backward through the same graph a second time needs retain_graph=True "
                               "on the first backward")
        # Without a retained graph nothing reads the lists again: the ops free each saved tensor once read
        # (consume), and the lists go with the locals below, not when the graph is freed.
        consume = not torch._C._autograd._get_current_graph_task_keep_graph()
        if consume:
            ctx.intermediates = None
        front, scan = lists
        del lists
        dx2, dparams_scan, dstates = torch.ops.gmamba_ext.gssm_bwd_scan(dout, h, params, states, scan,
                                                                        *ctx.options, consume)
        del scan
        dh, dparams_front = torch.ops.gmamba_ext.gssm_bwd_front(dout, dx2, h, params, front, *ctx.options,
                                                                consume)
        dstates = [g if s is not None else None for g, s in zip(_absent_to_none(dstates), states)]
        return (dh, None, None, *dstates, *_absent_to_none(dparams_front), *dparams_scan)


def _legacy_batched(t: Tensor) -> bool:
    """t carries a batch of gradients from torch.autograd.grad(..., is_grads_batched=True) (or
    jacobian(vectorize=True)), whose vmap has no batching rules for the ops below."""
    return torch._C._functorch.is_legacy_batchedtensor(t)


def _batched_backward(ctx, h, states, params, dout):
    """The backward for a batch of output gradients: autograd through the Python composition of the same
    function (gssm.py), whose ops the batched backward can run, recomputed from the saved inputs."""
    from .gssm import _composition, config_for  # gssm.py imports this module

    _, _, variant, mask, single_dt_bias = ctx.options
    if not torch._C._autograd._get_current_graph_task_keep_graph():
        ctx.intermediates = None  # not read again (the forward's intermediates, unused here)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (h, *[s for s in states if s is not None], *params)]
        it = iter(leaves[1:])
        states_in = [next(it) if s is not None else None for s in states]
        weights = GSSMParams(**dict(zip(_param_fields(len(states)), it)))
        config = config_for(weights, variant, mask, _DIRECTIONS[len(states)], single_dt_bias)
        out = _composition(leaves[0], weights, config, states_in).reshape(dout.shape)
        grads = list(torch.autograd.grad(out, leaves, dout, allow_unused=True))
    dh, grads = grads[0], iter(grads[1:])
    dstates = [next(grads) if s is not None else None for s in states]
    # what the ops return: zeros for a parameter of the variant that the composition leaves out (Pl's, with
    # an empty low-pass), None for one the variant has no use for
    _, fusion, fgmm, _ = _flags(variant, h.shape[1], h.shape[2])
    dparams = [g if g is not None or not _variant_uses(i, fusion, fgmm) else torch.zeros_like(p)
               for i, (p, g) in enumerate(zip(params, grads))]
    return (dh, None, None, *dstates, *dparams)


def _differentiable_backward(ctx, h, states, params, dout):
    """The backward when it will itself be differentiated (second-order gradients: higher_order.py): the
    vector-Jacobian product of the plain-PyTorch reference gssm_ref, recomputed from the saved inputs."""
    from .gssm import config_for  # gssm.py imports this module

    _, _, variant, mask, single_dt_bias = ctx.options
    if not torch._C._autograd._get_current_graph_task_keep_graph():
        ctx.intermediates = None  # not read again (the forward's intermediates, unused here)
    n, fields = len(states), _param_fields(len(states))

    def reference(h, *rest):
        weights = GSSMParams(**dict(zip(fields, rest[n:])))
        config = config_for(weights, variant, mask, _DIRECTIONS[n], single_dt_bias)
        return gssm_ref(h, weights, config, layout="bhwc", initial_state=list(rest[:n])).reshape(dout.shape)

    dh, *grads = reference_vjp(reference, (h, *states, *params), dout)
    return (dh, None, None, *grads)


def gssm_fused(h: Tensor, params: GSSMParams, config: GSSMConfig, states: List[Optional[Tensor]]) -> Tensor:
    """out (B, L, C) of the mixer on h (B, H, W, C) in h's dtype (autocast already resolved by the caller)."""
    B, H, W, C = h.shape
    tensors = [getattr(params, name) for name in _param_fields(config.n_directions)]
    options = (H, W, config.variant, config.mask, config.single_dt_bias)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(t.requires_grad for t in tensors)
                                        or any(s is not None and s.requires_grad for s in states))
    if not grad:
        return torch.ops.gmamba_ext.gssm_fwd(h, tensors, states, *options, False)[0]
    return _GSSMFunction.apply(h, options, len(states), *states, *tensors)



# Fake kernels (shapes only), for opcheck and FakeTensor tracing of the raw ops. They restate the C++ ops'
# output layout (csrc/ops/gssm_fused.h: FrontSaved, ScanSaved); opcheck in the tests compares the two.
_FUSION = range(5, 15)  # low/high weights, their projections, the fusion MLP
_FGMM = range(15, 28)   # gate, FGMM conv and adaptive weights, freq_ratio
_N_SHARED = 28          # parameters before the per-direction ones


def _variant_uses(i, fusion, fgmm) -> bool:
    """Whether parameter i (the ops' order) takes part in a variant with those stages (_flags)."""
    return i < 5 or i >= _N_SHARED or (fusion and i in _FUSION) or (fgmm and i in _FGMM)


def _sizes(params, H, W):
    d = params[1].shape[0]
    E4, d4 = params[15].shape[0], params[19].shape[0]
    R, N = params[29].shape[1], params[31].shape[1]
    return H * W, d, E4, d4, R, N


def keeps_intermediates(device: torch.device) -> bool:
    """Whether gssm's forward keeps xz, x1, z1 and relu(pre) for the backward on `device` (else the backward
    recomputes them: less memory, more time). GMAMBA_GSSM_SAVE: "auto" (or unset) keeps them on the CPU
    and recomputes them on GPUs; "keep" or "recompute" everywhere. Read by every forward call; the backward
    follows what its forward kept. The C++ ops read it the same way (csrc/ops/gssm_fused.h)."""
    policy = os.environ.get("GMAMBA_GSSM_SAVE") or "auto"
    if policy not in ("auto", "keep", "recompute"):
        raise ValueError(f"GMAMBA_GSSM_SAVE must be 'auto', 'keep' or 'recompute', got {policy!r}")
    return device.type == "cpu" if policy == "auto" else policy == "keep"


def lowpass_uses_fft(device: torch.device) -> bool:
    """Whether gssm's C++ ops run FEM's low-pass as ATen FFTs (cuFFT) on `device` rather than as DFT-matrix
    GEMMs. GMAMBA_GSSM_LOWPASS: "auto" (or unset) takes FFTs off the CPU; "fft" or "dft" everywhere. Read by
    every call. The C++ ops read it the same way (csrc/ops/fem_lowpass.cpp)."""
    form = os.environ.get("GMAMBA_GSSM_LOWPASS") or "auto"
    if form not in ("auto", "fft", "dft"):
        raise ValueError(f"GMAMBA_GSSM_LOWPASS must be 'auto', 'fft' or 'dft', got {form!r}")
    return device.type != "cpu" if form == "auto" else form == "fft"


def _flags(variant, H, W):
    fusion = variant in ("full", "fem_ssm")
    fgmm = variant in ("full", "dft_fgmm_ssm")
    has_low = H // 4 > 0 and (W // 2 + 1) // 4 > 0
    return variant != "ssm", fusion, fgmm, has_low


if hasattr(torch.ops, "gmamba_ext") and hasattr(torch.ops.gmamba_ext, "gssm_fwd"):

    @torch.library.register_fake("gmamba_ext::gssm_fwd")
    def _gssm_fwd_fake(x, params, initial_states, H, W, variant, mask, single_dt_bias, save):
        B, C = x.shape[0], x.shape[3]
        L, d, E4, d4, R, N = _sizes(params, H, W)
        fem, fusion, fgmm, has_low = _flags(variant, H, W)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32

        def maybe(present, shape, dtype=x.dtype):
            return x.new_empty(shape if present else (0,), dtype=dtype if present else x.dtype)

        out = x.new_empty((B, L, C))
        if not save:
            return out, [], []
        keep = keeps_intermediates(x.device)
        coeffs = (B, H // 4, 2, (W // 2 + 1) // 4, d)  # the low-pass's kept Fourier coefficients of x1
        front = [maybe(keep, (B, L, 2 * d)), maybe(fusion and has_low, coeffs, acc), maybe(fem, (B, L, d)),
                 maybe(fgmm, (B * L, E4 + d4)), maybe(fgmm, (B, L)),
                 maybe(fgmm, (B, d), acc), maybe(fgmm, (B, 2), acc), maybe(fgmm, (B,), acc),
                 maybe(fusion and keep, (B * L, 2 * d)),  # relu(pre)
                 maybe(fusion, (2 * d, d)), maybe(fusion, (2 * d, d)), maybe(fusion, (2 * d,)),  # Px, Pl, c0
                 maybe(fem and keep, (B, L, d))]  # x1
        scan = [x.new_empty((B, L, d)), x.new_empty((B, L, d)), maybe(keep, (B, L, d))]  # x2, y, z1
        for _ in initial_states:
            xdbl = x.new_empty((B * L, -(-(R + 2 * N) // 4) * 4))[:, :R + 2 * N]  # rows 16-byte aligned
            scan += [xdbl, x.new_empty((B, -(-L // 16), N, d), dtype=acc)]
        return out, front, scan

    @torch.library.register_fake("gmamba_ext::gssm_bwd_scan")
    def _gssm_bwd_scan_fake(dout, x, params, initial_states, saved, H, W, variant, mask, single_dt_bias,
                            consume=False):
        B, L = x.shape[0], x.shape[1] * x.shape[2]
        d = params[1].shape[0]
        dparams = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params[_N_SHARED:]]
        dstates = [x.new_empty((0,)) if s is None else torch.empty_like(s) for s in initial_states]
        return x.new_empty((B, L, d)), dparams, dstates

    @torch.library.register_fake("gmamba_ext::gssm_bwd_front")
    def _gssm_bwd_front_fake(dout, dx2, x, params, saved, H, W, variant, mask, single_dt_bias, consume=False):
        _, fusion, fgmm, _ = _flags(variant, H, W)
        dparams = [torch.empty_like(p, memory_format=torch.contiguous_format)
                   if _variant_uses(i, fusion, fgmm) else x.new_empty((0,)) for i, p in enumerate(params[:_N_SHARED])]
        return x.new_empty(x.shape), dparams
