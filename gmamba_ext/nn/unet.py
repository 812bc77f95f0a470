"""A small segmentation UNet with a torchvision ResNet-18/34 encoder and GMamba blocks at up to 7 positions
(after each of the 4 encoder stages and each of the 3 decoder stages), the paper's segmentation setting."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import GMambaBlock, _is_int

__all__ = ["GMambaUNet", "UNET_POSITIONS"]

UNET_POSITIONS = ("enc1", "enc2", "enc3", "enc4", "dec3", "dec2", "dec1")


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Up(nn.Module):
    """Upsample x2, concatenate the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(_conv_bn_relu(cin + cskip, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class GMambaUNet(nn.Module):
    """UNet: ResNet encoder (torchvision resnet18 / resnet34, random init), decoder of upsample + concat +
    conv blocks, a 1x1 head; GMamba blocks after the stages named in `gmamba_at` (subset of
    UNET_POSITIONS; empty = a plain UNet). block_kwargs go to GMambaBlock (variant, window_size, ...).
    Input (B, in_channels, H, W) with H, W multiples of 32 recommended; output (B, num_classes, H, W)."""

    def __init__(self, num_classes: int, encoder: str = "resnet18", in_channels: int = 3,
                 gmamba_at: Sequence[str] = UNET_POSITIONS, **block_kwargs):
        super().__init__()
        try:
            import torchvision
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("GMambaUNet needs torchvision (pip install torchvision)") from error
        if encoder not in ("resnet18", "resnet34"):
            raise ValueError(f"GMambaUNet: encoder must be 'resnet18' or 'resnet34', got {encoder!r}")
        if isinstance(gmamba_at, str):  # one position, as insert_gmamba_blocks takes one name
            gmamba_at = (gmamba_at,)
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"GMambaUNet: {name} must be a positive int, got {v!r}")
        unknown = [p for p in gmamba_at if p not in UNET_POSITIONS]
        if unknown:
            raise ValueError(f"GMambaUNet: unknown positions {unknown}; choose from {UNET_POSITIONS}")
        net = getattr(torchvision.models, encoder)(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)  # 64, /2
        self.pool = net.maxpool
        self.enc = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])  # 64, 128, 256, 512
        self.dec = nn.ModuleList([_Up(512, 256, 256), _Up(256, 128, 128), _Up(128, 64, 64)])
        self.final = _Up(64, 64, 32)
        self.head = nn.Conv2d(32, num_classes, 1)
        widths = dict(enc1=64, enc2=128, enc3=256, enc4=512, dec3=256, dec2=128, dec1=64)
        self.gmamba_at = tuple(gmamba_at)
        self.gmamba = nn.ModuleDict({p: GMambaBlock(widths[p], **block_kwargs) for p in self.gmamba_at})

    def _maybe(self, name: str, x: Tensor) -> Tensor:
        return self.gmamba[name](x) if name in self.gmamba else x

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        s0 = self.stem(x)
        feats, h = [], self.pool(s0)
        for i, stage in enumerate(self.enc):
            h = self._maybe(f"enc{i + 1}", stage(h))
            feats.append(h)
        h = feats[3]
        for i, up in enumerate(self.dec):
            h = self._maybe(f"dec{3 - i}", up(h, feats[2 - i]))
        h = self.final(h, s0)
        return F.interpolate(self.head(h), size=size, mode="bilinear", align_corners=False)
