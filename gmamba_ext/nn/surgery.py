"""Plugging GMamba blocks into an existing CNN (torchvision ResNet, ConvNeXt, or any model whose stages are
named sub-modules producing (B, C, H, W) maps): a block runs on the stage's output through a forward hook,
so the backbone's modules, weights and state_dict keys stay as they were (the blocks live under
`gmamba_blocks.*`) and the output shapes do not change."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .block import GMambaBlock

__all__ = ["insert_gmamba_blocks", "RESNET_STAGES", "CONVNEXT_STAGES"]

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")  # torchvision ResNet
CONVNEXT_STAGES = ("features.1", "features.3", "features.5", "features.7")  # torchvision ConvNeXt


class _ApplyBlock:
    """Forward hook: replaces a stage's output y by block(y) (a class, not a lambda, so models pickle)."""

    def __init__(self, block: GMambaBlock):
        self.block = block

    def __call__(self, module, inputs, output):
        return self.block(output)


def _output_channels(model: nn.Module, names: Sequence[str], example: Tensor) -> Dict[str, int]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"insert_gmamba_blocks: the model has no sub-modules {missing}")
    shapes, handles = {}, []
    for n in names:
        handles.append(modules[n].register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape) if isinstance(o, Tensor) else None)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            try:
                model(example)
            except Exception as err:  # e.g. a model that does not take 3-channel 64 x 64 images
                raise ValueError(f"insert_gmamba_blocks: the dry run that finds the blocks' channel counts failed "
                                 f"on an input of shape {tuple(example.shape)} ({type(err).__name__}: {err}); "
                                 f"pass example_input= with an input this model takes") from err
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    bad = {n: s for n, s in shapes.items() if s is None or len(s) != 4}
    if bad:
        raise ValueError(f"insert_gmamba_blocks: these sub-modules do not output (B, C, H, W) tensors: {bad}")
    return {n: shapes[n][1] for n in names}


def insert_gmamba_blocks(model: nn.Module, after: Sequence[str] = RESNET_STAGES, example_input: Optional[Tensor] = None,
                         zero_init: bool = True, **block_kwargs) -> nn.Module:
    """Add a GMambaBlock after each sub-module named in `after` (RESNET_STAGES, CONVNEXT_STAGES or your
    own names), in place; returns the model. Channel counts come from one dry run on example_input
    (default a 1 x 3 x 64 x 64 tensor on the model's device). With zero_init (default) the blocks' layer
    scales start at 0, so the model computes exactly what it computed before until training moves them;
    block_kwargs go to GMambaBlock (window_size, variant, d_state, ...)."""
    if hasattr(model, "gmamba_blocks"):
        raise ValueError("insert_gmamba_blocks: the model already has GMamba blocks (model.gmamba_blocks)")
    if isinstance(after, str):
        after = (after,)
    keys = [name.replace(".", "_") for name in after]
    if len(set(keys)) != len(keys):  # a second block under one key would run but never be registered
        raise ValueError(f"insert_gmamba_blocks: `after` names a sub-module twice (or two names that agree up to "
                         f"'.' vs '_'): {list(after)}")
    if zero_init and block_kwargs.get("layer_scale", 0.0) != 0.0:
        raise ValueError(f"insert_gmamba_blocks: zero_init=True starts the blocks' layer scales at 0; it "
                         f"conflicts with layer_scale={block_kwargs['layer_scale']!r} (pass zero_init=False)")
    param = next(model.parameters(), None)
    if example_input is None:
        example_input = torch.zeros(1, 3, 64, 64, device=param.device if param is not None else None,
                                    dtype=param.dtype if param is not None else None)
    channels = _output_channels(model, after, example_input)
    if zero_init:
        block_kwargs["layer_scale"] = 0.0
    modules = dict(model.named_modules())
    blocks = nn.ModuleDict()
    for name in after:
        ref = param if param is not None else example_input
        block = GMambaBlock(channels[name], device=ref.device, dtype=ref.dtype, **block_kwargs)
        blocks[name.replace(".", "_")] = block
        modules[name].register_forward_hook(_ApplyBlock(block))
    model.gmamba_blocks = blocks
    return model
