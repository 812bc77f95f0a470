"""The one autograd loop behind every influence map: chunked vector-Jacobian products of a module at one
input, each taken at a single output position with a given vector over the output channels."""
from __future__ import annotations

import contextlib
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from ..gssm import composition_only
from .inputs import check_input, check_layout, check_positive_int, eval_mode, from_bhwc, to_bhwc

__all__ = ["BATCHING", "vjp_energy"]

BATCHING = ("stack", "vmap")


def _memory_format(x: Tensor):
    # a GSSM reads (B, C, H, W) only in channels_last memory format: keep the caller's format for the copies
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _forward(module: nn.Module, leaf: Tensor) -> Tensor:
    y = module(leaf)
    if not isinstance(y, Tensor) or y.shape != leaf.shape:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"module must map its input to an output of the same shape and layout, got input "
                         f"{tuple(leaf.shape)} -> output {got}")
    return y


def vjp_energy(module: nn.Module, x: Tensor, layout: str, rows: Sequence[Tuple[int, int, int]],
               vectors: Tensor, num_maps: int, chunk_size: int = 64, batching: str = "stack") -> Tensor:
    """maps[m, i, j] = sum over rows r = (m, p, q) of || v_r^T dY[p, q, :] / dX[i, j, :] ||^2, where
    v_r = vectors[r] (a vector over output channels). Returns (num_maps, H, W) in x's dtype and device.

    The module runs in eval mode (training flags restored afterwards) at most chunk_size rows at a time:
    - batching "stack": x is repeated chunk_size times along the batch and each copy gets its own cotangent
      (one forward + one backward per chunk). Valid for modules that treat samples independently, which
      eval mode gives for the usual layers; works with any custom op that has a backward.
    - batching "vmap": one forward at batch 1, then torch.autograd.grad(is_grads_batched=True) per chunk.
      No independence assumption, but every op's backward needs a vmap rule.
    """
    check_layout(layout)
    H, W, C = check_input(x, layout)
    check_positive_int(chunk_size, "chunk_size")
    if batching not in BATCHING:
        raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
    if vectors.shape != (len(rows), C):
        raise ValueError(f"vectors must be (len(rows), C) = ({len(rows)}, {C}), got {tuple(vectors.shape)}")
    out = x.new_zeros(num_maps, H, W)
    fmt = _memory_format(x)
    base = x.detach()
    # The C++-orchestrated gssm has no batching rule for its backward: "vmap" runs the Python composition.
    batched = composition_only() if batching == "vmap" else contextlib.nullcontext()
    with eval_mode(module), torch.enable_grad(), batched:
        if batching == "vmap":
            leaf = base.clone(memory_format=fmt).requires_grad_(True)
            y = _forward(module, leaf)
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start:start + chunk_size]
            n = len(chunk)
            maps = torch.tensor([r[0] for r in chunk], device=x.device)
            ps = torch.tensor([r[1] for r in chunk], device=x.device)
            qs = torch.tensor([r[2] for r in chunk], device=x.device)
            cot = x.new_zeros(n, H, W, C)
            cot[torch.arange(n, device=x.device), ps, qs] = vectors[start:start + n].to(cot)
            if batching == "stack":
                leaf = base.repeat(n, 1, 1, 1).contiguous(memory_format=fmt).requires_grad_(True)
                y = _forward(module, leaf)
                grad_out = from_bhwc(cot, layout)
            else:
                grad_out = from_bhwc(cot, layout).unsqueeze(1)  # (n, 1, ...): one batched cotangent each
            if not y.requires_grad:  # the output does not depend on x at all
                continue
            (g,) = torch.autograd.grad(y, leaf, grad_out.to(y.dtype), retain_graph=batching == "vmap",
                                       allow_unused=True, is_grads_batched=batching == "vmap")
            if g is None:
                continue
            if batching == "vmap":
                g = g.squeeze(1)
            out.index_add_(0, maps, to_bhwc(g, layout).to(out.dtype).pow(2).sum(-1))
    return out
