"""Second-order gradients through the package's ops (create_graph=True, torch.func.grad over grad, hessians,
gradient penalties).

The kernels' backward ops have no derivative of their own: differentiated, their outputs acted as constants
and second derivatives through the ops came out as silent zeros (PyTorch only warned once, and not at all
under torch.func). A backward that is itself being differentiated therefore computes its gradients as the
vector-Jacobian product of the plain-PyTorch reference instead: exact and differentiable, at the
reference's speed. First-order backward passes are unchanged.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters


def backward_is_differentiated(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether a custom backward running now, with these inputs (output gradients and saved tensors), will
    itself be differentiated. Under torch.func, when a second grad transform encloses the one running the
    backward (torch.func.grad always builds a graph, so grad mode alone says nothing there); under plain
    autograd, when the backward runs with grad mode on (create_graph=True) on tensors that require grad."""
    interpreters = retrieve_all_functorch_interpreters()
    if interpreters:
        grads = [i for i in interpreters if i.key() == torch._C._functorch.TransformType.Grad]
        return len(grads) >= 2
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def reference_vjp(fn: Callable, inputs: Sequence[Optional[Tensor]], grad_outputs) -> List[Optional[Tensor]]:
    """The gradients of fn's outputs (weighted by grad_outputs, fn's output structure) with respect to each
    tensor in inputs (None where an input is None), computed so that they can be differentiated again.
    fn(*inputs) must be plain PyTorch (a reference implementation)."""
    present = [i for i, t in enumerate(inputs) if t is not None]

    def of_present(*xs):
        full = list(inputs)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    _, vjp_fn = torch.func.vjp(of_present, *[inputs[i] for i in present])
    grads: List[Optional[Tensor]] = [None] * len(inputs)
    for i, g in zip(present, vjp_fn(grad_outputs)):
        grads[i] = g
    return grads
