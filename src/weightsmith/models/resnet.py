"""Residual networks: basic and bottleneck blocks with BatchNorm.

Sources:
- He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition" (ResNet-18/34 basic blocks,
  ResNet-50/101/152 bottleneck blocks, projection shortcuts, option B, where the shape changes).
- torchvision ``resnet.py`` (ResNet "v1.5": a bottleneck strides in its 3x3 conv, not its first 1x1;
  same parameter count as the paper's v1). The published ImageNet sizes are 11,689,512 (ResNet-18) and
  25,557,032 (ResNet-50) parameters.
- Goyal et al. 2017, "Accurate, Large Minibatch SGD": the last BatchNorm of every residual branch starts
  at gamma = 0 (``zero_init_residual``), so each block starts as the identity.

Notation: the paper's stage outputs conv2_x..conv5_x are our ``stages.0..3``; its per-stage filter counts
64..512 are our ``widths`` (a bottleneck outputs ``4 * width`` channels: ``expansion``).

Data flow, shape legend B batch, C = in_channels, H = W = image_size, K = n_classes; the ImageNet shapes::

    x (B, 3, 224, 224) -> stem: conv 7x7/2 -> BN -> ReLU -> maxpool 3x3/2       (B, 64, 56, 56)
      -> stages.0 (B, 64 e, 56, 56) -> .1 (B, 128 e, 28, 28) -> .2 (14) -> .3 (B, 512 e, 7, 7)
      -> mean over H, W (B, 512 e) -> head -> logits (B, K)                      e = expansion

    basic block:      x -> conv3x3/s -> BN -> ReLU -> conv3x3 -> BN --+--> ReLU
                      x -> [conv1x1/s -> BN]  (shortcut, when the shape changes) --+
    bottleneck block: x -> conv1x1 -> BN -> ReLU -> conv3x3/s -> BN -> ReLU -> conv1x1 (4 w) -> BN --+--> ReLU

The first block of every stage after the first strides by 2. Small images (28x28, 32x32) use a 3x3 stem
without max-pool (the CIFAR-style networks of the paper's section 4.2). Convolutions followed by BN
have no bias. Initialization: He et al. 2015 normal (fan_out) for convolutions, BN gamma 1 and beta 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.registry import register_family, register_preset


@dataclass(kw_only=True)
class ResNetConfig:
    """ResNet config. ``in_channels, image_size, n_classes`` are decided by the data. ``depths`` (blocks per
    stage) and ``widths`` (per-stage width) have one entry per stage; ``expansion`` is derived (1 basic,
    4 bottleneck). The stem is a ``stem_kernel_size`` conv of stride ``stem_stride`` with ``stem_width``
    channels, then a 3x3 stride-2 max-pool if ``stem_pool``. The defaults are a small CIFAR-style
    ResNet-8 for 32x32 RGB images (contract tests build it); ``resnet18`` and ``resnet50`` are the paper's
    ImageNet networks."""

    in_channels: int = 3
    image_size: int = 32
    n_classes: int = 10
    block: Literal["basic", "bottleneck"] = "basic"
    depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    stem_width: int = 16
    stem_kernel_size: int = 3
    stem_stride: int = 1
    stem_pool: bool = False
    zero_init_residual: bool = True
    norm_eps: float = 1e-5
    expansion: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, ("in_channels", "image_size", "n_classes", "stem_width", "stem_kernel_size",
                                "stem_stride"))
        if not self.depths or len(self.depths) != len(self.widths):
            raise ConfigError(f"model.depths={list(self.depths)} and model.widths={list(self.widths)} must be "
                              "non-empty and of the same length (one entry per stage)")
        if min(self.depths) <= 0 or min(self.widths) <= 0:
            raise ConfigError(f"model.depths={list(self.depths)} and model.widths={list(self.widths)} must be "
                              "positive")
        self.expansion = 4 if self.block == "bottleneck" else 1


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, eps: float
             ) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
    return conv, nn.BatchNorm2d(out_channels, eps=eps)


class Shortcut(nn.Module):
    """Projection shortcut (option B): 1x1 conv of stride ``stride`` and BN, (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, eps: float) -> None:
        super().__init__()
        self.conv, self.bn = _conv_bn(in_channels, out_channels, 1, stride, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, (B, C_in, H, W) -> (B, width, H / stride, W / stride)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, eps: float) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 3, stride, eps)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, 1, eps)
        self.shortcut = Shortcut(in_channels, width, stride, eps) if stride != 1 or in_channels != width else None

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to ``4 * width``: (B, C_in, H, W) -> (B, 4 width, H / s, W / s)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, eps: float) -> None:
        super().__init__()
        out_channels = 4 * width
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 1, 1, eps)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride, eps)
        self.conv3, self.bn3 = _conv_bn(width, out_channels, 1, 1, eps)
        self.shortcut = (Shortcut(in_channels, out_channels, stride, eps)
                         if stride != 1 or in_channels != out_channels else None)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Stem(nn.Module):
    """conv (stem_kernel_size, stem_stride), BN, ReLU [, maxpool 3x3/2]: (B, C, H, W) -> (B, stem_width, H', W')."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.conv, self.bn = _conv_bn(cfg.in_channels, cfg.stem_width, cfg.stem_kernel_size, cfg.stem_stride,
                                      cfg.norm_eps)
        self.pool = nn.MaxPool2d(3, 2, padding=1) if cfg.stem_pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return x if self.pool is None else self.pool(x)


class Stage(nn.Module):
    """``depth`` blocks; the first one strides by ``stride`` and changes the width."""

    def __init__(self, block: type, in_channels: int, width: int, depth: int, stride: int, eps: float) -> None:
        super().__init__()
        out_channels = block.expansion * width
        self.blocks = nn.ModuleList(block(in_channels if i == 0 else out_channels, width, stride if i == 0 else 1,
                                          eps) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ResNet(nn.Module):
    """Image classifier: images (B, in_channels, image_size, image_size) -> logits (B, n_classes)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.config = cfg
        block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        self.stem = Stem(cfg)
        stages, c = [], cfg.stem_width
        for s, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            stages.append(Stage(block, c, width, depth, 1 if s == 0 else 2, cfg.norm_eps))
            c = block.expansion * width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c, cfg.n_classes)
        if self.head.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """He-normal (fan_out) convolutions, BN (1, 0), the last BN of each branch gamma 0 if
        ``zero_init_residual``; the head keeps nn.Linear's default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_residual:
            for stage in self.stages:
                for block in stage.blocks:
                    nn.init.zeros_(block.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, in_channels, image_size, image_size) float. Returns: logits (B, n_classes)."""
        x = self.stem(x)  # (B, stem_width, H', W')
        for stage in self.stages:
            x = stage(x)  # (B, expansion * width, H / 2^s, W / 2^s) after the stem
        x = x.mean(dim=(-2, -1))  # (B, C) global average pool; keeps nothing for backward
        return self.head(x)


register_family("resnet", ResNetConfig, task="classification")(ResNet)

_IMAGENET = dict(in_channels=3, image_size=224, n_classes=1000, widths=[64, 128, 256, 512], stem_width=64,
                 stem_kernel_size=7, stem_stride=2, stem_pool=True)
register_preset("resnet18", "resnet", doc="ResNet-18 (11.7M), He et al. 2016, ImageNet shapes",
                block="basic", depths=[2, 2, 2, 2], **_IMAGENET)
register_preset("resnet50", "resnet", doc="ResNet-50 (25.6M), He et al. 2016, ImageNet shapes",
                block="bottleneck", depths=[3, 4, 6, 3], **_IMAGENET)
# Sized for CPU training: the stride-2 stem puts the three stages at 14x14, 7x7 and 4x4, so a 28x28 image
# costs 29.7 MFLOPs forward (0.60M parameters); about 500 images/s of training per CPU core.
register_preset("resnet-fmnist", "resnet", doc="a CIFAR-style ResNet for 28x28 grayscale images (Fashion-MNIST)",
                in_channels=1, image_size=28, n_classes=10, block="basic", depths=[1, 1, 2], widths=[32, 64, 128],
                stem_width=32, stem_kernel_size=3, stem_stride=2, stem_pool=False)
