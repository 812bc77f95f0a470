"""Loading release checkpoints into GSSM / GMambaBlock (or any module holding them) whatever prefix the
checkpoint's keys carry ("module.", "backbone.layers.0.", ...)."""
from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

from torch import Tensor, nn

__all__ = ["load_release_state_dict"]


def _find_prefix(source: List[str], target: List[str]) -> str:
    """The prefix p such that the source keys p + t cover the most target keys t (ties: the shortest p)."""
    counts = {}
    target_set = set(target)
    for k in source:
        for t in target_set:
            if k.endswith(t) and (len(k) == len(t) or k[-len(t) - 1] == "."):
                p = k[:len(k) - len(t)]
                counts[p] = counts.get(p, 0) + 1
    if not counts:
        return ""
    best = max(counts.values())
    tied = sorted((p for p, n in counts.items() if n == best), key=len)
    if len(tied) > 1 and len(tied[0]) == len(tied[1]):
        raise ValueError(f"load_release_state_dict: several prefixes match equally well: {tied}; pass prefix=...")
    return tied[0]


def load_release_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor], prefix: Optional[str] = None,
                            strict: bool = True) -> Tuple[List[str], List[str]]:
    """Load a state_dict with the release's keys (mixer level: in_proj.weight, ...; block level:
    norm1.weight, mixer.in_proj.weight, ...) into `module`. prefix=None finds the prefix the checkpoint's
    keys carry (the one under which most of the module's keys appear); keys outside it are ignored.
    strict=True raises ValueError listing missing keys, unexpected keys (under the prefix) and shape
    mismatches; strict=False loads what matches and returns (missing, unexpected), and still raises on shape
    mismatches (as torch's load_state_dict does: a checkpoint of another configuration, which would
    otherwise leave those parameters at their initial values unreported)."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"load_release_state_dict: state_dict must be a mapping, got {type(state_dict).__name__}")
    own = module.state_dict()
    keys = list(state_dict.keys())
    if prefix is None:
        prefix = _find_prefix(keys, list(own))
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = [k for k in own if k not in sub]
    unexpected = sorted(k for k in sub if k not in own)
    mismatched = [f"{k}: checkpoint {tuple(sub[k].shape)}, module {tuple(own[k].shape)}"
                  for k in own if k in sub and tuple(sub[k].shape) != tuple(own[k].shape)]
    if mismatched or (strict and (missing or unexpected)):
        listed = (("missing keys", missing), ("unexpected keys", unexpected)) if strict else ()
        parts = [f"{name}: {items}" for name, items in (*listed, ("shape mismatches", mismatched)) if items]
        raise ValueError(f"load_release_state_dict (prefix {prefix!r}) into {type(module).__name__}: "
                         + "; ".join(parts))
    module.load_state_dict({k: v for k, v in sub.items() if k in own}, strict=False)
    return missing, unexpected
