"""torch.func support for the package's ops (selective_scan, conv_silu, fgmm): batching rules for vmap, and
autograd Functions that functorch's grad transforms accept (grad, vjp, jacrev, vmap(grad(...)) for
per-sample gradients).

Why: torch.library's register_autograd makes an autograd.Function that functorch refuses ("it must
override the setup_context staticmethod"), and without batching rules vmap ran each op once per vmapped
index through PyTorch's slow fallback, with a performance warning.

- Batching rules. A forward op whose weights are not vmapped folds the vmapped dimension into its batch
  dimension: one call over V * B samples (samples are independent in every forward op). Otherwise, and for
  the backward ops, whose weight gradients are sums over the batch that each vmapped index needs apart,
  the op runs once per index and the results are stacked (what the fallback did, without the warning).
- Functions. `functorch_function(fwd_op, setup_context, backward)` wraps an op's forward with the same
  setup_context and backward as its registered autograd, as a Function with a separate setup_context and
  `generate_vmap_rule = True` (vmap of it runs the ops' batching rules). The wrappers call it only under
  functorch transforms: it costs more Python per call than the eager paths' Functions. Forward-mode AD
  (jvp, jacfwd) is not implemented.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["functorch_active", "functorch_function", "register_fold_rule", "register_loop_rule"]


def functorch_active() -> bool:
    """True under a functorch transform (vmap, grad, jvp, ...) outside torch.compile's tracing."""
    return torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling()


def functorch_function(name: str, fwd_op, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function running fwd_op with the given setup_context and backward, usable under functorch."""

    def forward(*args):
        return fwd_op(*args)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "generate_vmap_rule": True})


def _slice(arg, dim, i):
    return arg.select(dim, i) if dim is not None else arg


def _loop(op, info, in_dims, args):
    """op once per vmapped index; every output stacked along a new leading dimension."""
    results = [op(*(_slice(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
    single = isinstance(results[0], Tensor)
    if single:
        return torch.stack(results), 0
    stacked = tuple(torch.stack(list(outs)) for outs in zip(*results))
    return stacked, (0,) * len(stacked)


def register_loop_rule(op) -> None:
    """vmap of op: once per vmapped index (the backward ops)."""
    torch.library.register_vmap(op, lambda info, in_dims, *args: _loop(op, info, in_dims, args))


def register_fold_rule(op, batch_leading: Callable[[Sequence], Sequence[bool]]) -> None:
    """vmap of a forward op whose every output leads with the batch dimension: when only arguments that lead
    with the batch dimension are vmapped, one call with the vmapped dimension folded into the batch; else
    once per vmapped index. batch_leading(ndims) says which arguments lead with it, from each argument's
    dimension count as the op sees it (None for a non-tensor)."""

    def rule(info, in_dims, *args):
        ndims = [a.dim() - (d is not None) if isinstance(a, Tensor) else None for a, d in zip(args, in_dims)]
        leading = batch_leading(ndims)
        if any(d is not None and not lead for d, lead in zip(in_dims, leading)):
            return _loop(op, info, in_dims, args)
        V = info.batch_size
        folded = []
        for a, d, lead in zip(args, in_dims, leading):
            if lead and isinstance(a, Tensor):
                a = a.movedim(d, 0) if d is not None else a.expand(V, *a.shape)
                # contiguous: the ops take dense tensors, and a shared (unvmapped) batch-1 argument expands
                # to a stride-0 view here
                a = a.reshape(V * a.shape[1], *a.shape[2:]).contiguous()
            folded.append(a)
        out = op(*folded)
        outs = (out,) if isinstance(out, Tensor) else tuple(out)
        unfolded = tuple(o.reshape(V, o.shape[0] // V, *o.shape[1:]) for o in outs)
        if isinstance(out, Tensor):
            return unfolded[0], 0
        return unfolded, (0,) * len(unfolded)

    torch.library.register_vmap(op, rule)
