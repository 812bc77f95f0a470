"""Thin Python wrappers over the compiled ops: argument normalisation, fake (meta) kernels for
torch.compile, and autograd, all registered through torch.library (no device branches here)."""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .finite_checks import check_finite, finite_checks_enabled
from .functorch_rules import functorch_active, functorch_function, register_fold_rule, register_loop_rule
from .higher_order import backward_is_differentiated, reference_vjp

__all__ = ["selective_scan", "selective_scan_channels_last", "CHUNK"]

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.gmamba_ext.*)

    HAS_EXTENSION = True
except ImportError as _error:  # a source checkout that was never built
    HAS_EXTENSION = False
    _IMPORT_ERROR = _error

# Steps per checkpoint chunk; must match kChunk in csrc/gmamba/scan_params.h.
CHUNK = 16
_OPS = "gmamba_ext::"


def _kernel_device_types() -> frozenset:
    """Device types with a compiled scan kernel, looked up once: a plain set keeps the wrappers traceable
    by torch.compile (the dispatcher query itself is not)."""
    if not HAS_EXTENSION:
        return frozenset()
    return frozenset(dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if torch._C._dispatch_has_kernel_for_dispatch_key(_OPS + "selective_scan_fwd", key))


_KERNEL_DEVICE_TYPES = _kernel_device_types()


def _has_kernel(device: torch.device) -> bool:
    return device.type in _KERNEL_DEVICE_TYPES


# Set by gmamba_ext.gssm.composition_only(): callers that batch the backward (torch.autograd.grad with
# is_grads_batched=True) need every op's backward to have a batching rule.
_BATCHED_BACKWARD = threading.local()


def _traced_or_batched() -> bool:
    """True under torch.compile, functorch transforms (vmap, grad, jvp) or a batched backward: these see the
    ops' registered autograd, or under functorch the same as Functions it accepts (functorch_rules.py), and
    gssm its Python composition; plain eager calls take faster routes."""
    return (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
            or getattr(_BATCHED_BACKWARD, "on", False))


def _require_tensor(value, name: str, optional: bool = False) -> Optional[Tensor]:
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"selective_scan: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")
    return value


def _weight(value, name: str, acc: torch.dtype, optional: bool = False) -> Optional[Tensor]:
    """Weights (A, B, C, D, delta_bias, initial_state) run in the accumulation dtype: cast (differentiably)."""
    t = _require_tensor(value, name, optional)
    if t is None:
        return None
    if not t.is_floating_point():
        raise TypeError(f"selective_scan: argument '{name}' must be a floating-point tensor, got {t.dtype}")
    return t.to(acc).contiguous()


_ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _check_one_device(args) -> None:
    """The kernels' device check (scan_host.cpp), for the reference fallback (ATen's own error there names
    no argument) and the fake kernel."""
    for name, t in zip(_ARG_NAMES, args):
        if t is not None and t.device != args[0].device:
            raise ValueError(f"selective_scan: argument '{name}' is on {t.device} but 'u' is on {args[0].device}; "
                             f"move all inputs to one device")


def _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, channels_last):
    u = _require_tensor(u, "u")
    if not u.is_floating_point():
        raise TypeError(f"selective_scan: argument 'u' must be a floating-point tensor, got {u.dtype}")
    acc = reference.accumulation_dtype(u.dtype)
    delta = _require_tensor(delta, "delta").contiguous()
    z = _require_tensor(z, "z", optional=True)
    args = (u.contiguous(), delta, _weight(A, "A", acc), _weight(B, "B", acc), _weight(C, "C", acc),
            _weight(D, "D", acc, True), None if z is None else z.contiguous(),
            _weight(delta_bias, "delta_bias", acc, True), _weight(initial_state, "initial_state", acc, True))
    if finite_checks_enabled():
        check_finite("selective_scan", ((f"argument '{name}'", t) for name, t in zip(_ARG_NAMES, args)))
    if _has_kernel(u.device):
        flags = (bool(delta_softplus), bool(channels_last))
        if functorch_active():
            out, last_state, _ = _ScanFunctorch.apply(*args, *flags)
        elif torch.is_grad_enabled() and not _traced_or_batched() and any(
                t is not None and t.requires_grad for t in args):
            out, last_state, _ = _ScanFunction.apply(*args, *flags)
        else:
            out, last_state, _ = torch.ops.gmamba_ext.selective_scan_fwd(*args, *flags)
    else:  # no compiled kernel for this device: the reference computes the same function
        _check_one_device(args)
        out, last_state = reference.selective_scan_ref(*args[:8], delta_softplus=delta_softplus,
                                                       return_last_state=True, initial_state=args[8],
                                                       channels_last=channels_last)
    return (out, last_state) if return_last_state else out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """Drop-in for mamba-ssm's ``selective_scan_fn``, plus ``initial_state``.

    u, delta, z: (batch, d, L); A: (d, N) real; B, C: (batch, N, L) or (batch, G, N, L) ("variable", d
    divisible by G) or (d, N) ("constant"); D, delta_bias: (d,); initial_state: (batch, d, N).
    Returns out (batch, d, L) in u's dtype, and with ``return_last_state`` also the final state
    (batch, d, N) in float32 (float64 for float64 inputs), through which gradients flow.
    """
    return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, False)


def selective_scan_channels_last(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                 return_last_state=False, initial_state=None):
    """`selective_scan` on channels-last tokens, read in place (no transposes):
    u, delta, z: (batch, L, d); B, C: (batch, L, N), (batch, L, G, N) or (d, N); the rest as there.
    Returns out as (batch, L, d)."""
    return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, True)


if HAS_EXTENSION:

    @torch.library.register_fake(_OPS + "selective_scan_fwd")
    def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, channels_last):
        # A call with one argument on meta and the others on the CPU dispatches here: without the kernels'
        # device check it would return an uninitialised CPU tensor.
        _check_one_device((u, delta, A, B, C, D, z, delta_bias, initial_state))
        batch = u.shape[0]
        d, L = (u.shape[2], u.shape[1]) if channels_last else (u.shape[1], u.shape[2])
        N = A.shape[1]
        chunks = (L + CHUNK - 1) // CHUNK
        return (torch.empty_like(u), A.new_empty((batch, d, N)), A.new_empty((batch, chunks, N, d)))

    @torch.library.register_fake(_OPS + "selective_scan_bwd")
    def _scan_bwd_fake(dout, dlast_state, checkpoints, u, delta, A, B, C, D, z, delta_bias, initial_state,
                       delta_softplus, channels_last):
        def like(t, fallback):
            return torch.empty_like(t) if t is not None else fallback.new_empty((0,))

        return (torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(B),
                torch.empty_like(C), like(D, A), like(z, u), like(delta_bias, A), like(initial_state, A))

    def _setup_context(ctx, inputs, output):
        *tensors, delta_softplus, channels_last = inputs
        optional = tensors[5:]  # D, z, delta_bias, initial_state: None or tensors
        ctx.has_optional = tuple(t is not None for t in optional)
        ctx.save_for_backward(*tensors[:5], output[2], *[t for t in optional if t is not None])
        ctx.flags = (delta_softplus, channels_last)
        ctx.mark_non_differentiable(output[2])
        # Unused outputs' gradients arrive as None, not as zeros: the checkpoints' would be a (B, L/16, N, d)
        # zero fill per backward, and a zero dlast_state would be read by the kernel.
        ctx.set_materialize_grads(False)

    def _backward(ctx, dout, dlast_state, _dcheckpoints):
        u, delta, A, B, C, checkpoints, *present = ctx.saved_tensors
        it = iter(present)
        D, z, delta_bias, initial_state = (next(it) if has else None for has in ctx.has_optional)
        inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        if backward_is_differentiated((dout, dlast_state, *inputs)):
            return (*_reference_vjp(inputs, ctx.flags, dout, dlast_state), None, None)
        if dout is None:
            dout = torch.zeros_like(u)
        grads = torch.ops.gmamba_ext.selective_scan_bwd(
            dout.contiguous(), None if dlast_state is None else dlast_state.contiguous(), checkpoints,
            u, delta, A, B, C, D, z, delta_bias, initial_state, *ctx.flags)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = grads
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                ddelta_bias if delta_bias is not None else None,
                dinitial_state if initial_state is not None else None, None, None)

    def _reference_vjp(inputs, flags, dout, dlast_state):
        """The backward as a differentiable function (higher_order.py): through the reference scan."""
        u, A = inputs[0], inputs[2]
        delta_softplus, channels_last = flags
        d = u.shape[2] if channels_last else u.shape[1]
        dout = torch.zeros_like(u) if dout is None else dout
        dlast_state = A.new_zeros((u.shape[0], d, A.shape[1])) if dlast_state is None else dlast_state
        return reference_vjp(
            lambda *t: reference.selective_scan_ref(*t[:8], delta_softplus=delta_softplus, return_last_state=True,
                                                    initial_state=t[8], channels_last=channels_last),
            inputs, (dout, dlast_state))

    torch.library.register_autograd(_OPS + "selective_scan_fwd", _backward, setup_context=_setup_context)

    # torch.func: the same autograd as a Function functorch accepts, and batching rules (functorch_rules.py).
    # In the forward, u, delta, z, initial_state and a variable (3-D or 4-D) B / C lead with the batch.
    _ScanFunctorch = functorch_function("_ScanFunctorch", torch.ops.gmamba_ext.selective_scan_fwd, _setup_context,
                                        _backward)
    register_fold_rule(torch.ops.gmamba_ext.selective_scan_fwd.default, lambda n: (
        True, True, False, n[3] >= 3, n[4] >= 3, False, n[6] is not None, False, n[8] is not None, False, False))
    register_loop_rule(torch.ops.gmamba_ext.selective_scan_bwd.default)

    class _ScanFunction(torch.autograd.Function):
        """The op's registered autograd (same setup, same backward) as a plain autograd.Function for eager
        calls. torch.library's generic autograd wrapper, and a Function with a separate setup_context
        (which binds its arguments through inspect.signature), each cost about 90 us of Python per call on
        a tiny CPU input, four times the op itself: more than a small scan's kernels take on a GPU."""

        @staticmethod
        def forward(ctx, *inputs):
            output = torch.ops.gmamba_ext.selective_scan_fwd(*inputs)
            _setup_context(ctx, inputs, output)
            return output

        backward = staticmethod(_backward)
