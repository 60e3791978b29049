"""ConvNeXt: a convolutional network modernized toward the vision transformer.

Sources:
- Liu et al. 2022, "A ConvNet for the 2020s" (ConvNeXt-T/S/B/L; ConvNeXt-T has 28,589,128 parameters).
- Huang et al. 2016, "Deep Networks with Stochastic Depth" (``drop_path``); Touvron et al. 2021, "Going
  deeper with Image Transformers" (layer scale).
- facebookresearch/ConvNeXt ``models/convnext.py`` for the layout of the code.

Notation: the paper's (C1..C4) channels are our ``dims``, its (B1..B4) blocks per stage our ``depths``;
the inverted bottleneck's 4x width is ``mlp_ratio``; layer scale's initial value is
``layer_scale_init`` (1e-6), the maximal stochastic depth rate ``drop_path`` (block ``i`` of ``n``
drops its branch with probability ``drop_path * i / (n - 1)``, as in the paper's code).

Data flow, shape legend B batch, C = in_channels, H = W = image_size, K = n_classes, P = stem_patch_size::

    x (B, C, H, W) -> stem: conv PxP/P -> LN           (B, dims[0], H/P, W/P)        "patchify"
      -> stages.0 -> [downsample: LN -> conv 2x2/2] stages.1 -> ... -> (B, dims[-1], H', W')
      -> mean over H', W' (B, dims[-1]) -> final_norm (LN) -> head -> logits (B, K)

    block (width D):  x -> dwconv 7x7 (groups = D) -> permute (B, H, W, D) -> LN -> pwconv1 (D -> 4D)
                        -> GELU -> pwconv2 (4D -> D) -> layer scale (gamma * .) -> permute back
                        -> drop_path --+--> out
                      x ---------------+

The 1x1 convolutions run as ``nn.Linear`` over the channels-last tensor, as in the paper's code; the
LayerNorms of the stem and the downsampling layers normalize over channels of a (B, D, H, W) tensor.
Initialization: truncated normal (std 0.02) for conv and linear weights, zero biases, LN (1, 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.registry import register_family, register_preset


@dataclass(kw_only=True)
class ConvNeXtConfig:
    """ConvNeXt config. ``in_channels, image_size, n_classes`` are decided by the data. ``depths`` and
    ``dims`` have one entry per stage; ``kernel_size`` is the depthwise kernel. The defaults are a small
    3-stage model for 32x32 RGB images (contract tests build it); ``convnext-tiny`` is the paper's."""

    in_channels: int = 3
    image_size: int = 32
    n_classes: int = 10
    depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    dims: list[int] = field(default_factory=lambda: [16, 32, 64])
    stem_patch_size: int = 2
    kernel_size: int = 7
    mlp_ratio: int = 4
    layer_scale_init: float = 1e-6
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        require_positive(self, ("in_channels", "image_size", "n_classes", "stem_patch_size", "kernel_size",
                                "mlp_ratio", "layer_scale_init"))
        if not self.depths or len(self.depths) != len(self.dims):
            raise ConfigError(f"model.depths={list(self.depths)} and model.dims={list(self.dims)} must be "
                              "non-empty and of the same length (one entry per stage)")
        if min(self.depths) <= 0 or min(self.dims) <= 0:
            raise ConfigError(f"model.depths={list(self.depths)} and model.dims={list(self.dims)} must be positive")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size={self.kernel_size} must be odd (same padding)")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.drop_path must be in [0, 1), got {self.drop_path}")
        if self.image_size // self.stem_patch_size // 2 ** (len(self.dims) - 1) < 1:
            raise ConfigError(f"model.image_size={self.image_size} is too small for stem_patch_size="
                              f"{self.stem_patch_size} and {len(self.dims) - 1} downsampling layers")

    def drop_path_rates(self) -> list[float]:
        """Per-block drop probability, rising linearly from 0 to ``drop_path`` over all blocks."""
        n = sum(self.depths)
        return [self.drop_path * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, D, H, W) tensor (the paper's "channels_first" LN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, D), a view
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, D, H, W), a view of a channels-last tensor


class LayerScale(nn.Module):
    """``gamma * x`` with a learned per-channel gamma (D,), initialized to ``init``; x (..., D)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the residual branch of each sample with probability ``p`` and
    scale the kept ones by ``1 / (1 - p)``; the identity in evaluation. x (B, ...)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)  # (B, 1, 1, 1)
        return x * keep.div_(1.0 - self.p)


class Block(nn.Module):
    """ConvNeXt block, (B, D, H, W) -> (B, D, H, W)."""

    def __init__(self, dim: int, cfg: ConvNeXtConfig, drop_path: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, cfg.kernel_size, padding=cfg.kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.pwconv1 = nn.Linear(dim, cfg.mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(cfg.mlp_ratio * dim, dim)
        self.layer_scale = LayerScale(dim, cfg.layer_scale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, D)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))  # (B, H, W, 4D) inside
        y = self.layer_scale(y).permute(0, 3, 1, 2)  # (B, D, H, W)
        return x + (y if self.drop_path is None else self.drop_path(y))


class Downsample(nn.Module):
    """LN then a 2x2 stride-2 conv: (B, D_in, H, W) -> (B, D_out, H // 2, W // 2)."""

    def __init__(self, in_channels: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm2d(in_channels, eps=eps)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


class Stem(nn.Module):
    """Patchify: a PxP stride-P conv, then LN: (B, C, H, W) -> (B, dims[0], H // P, W // P)."""

    def __init__(self, cfg: ConvNeXtConfig) -> None:
        super().__init__()
        p = cfg.stem_patch_size
        self.conv = nn.Conv2d(cfg.in_channels, cfg.dims[0], kernel_size=p, stride=p)
        self.norm = LayerNorm2d(cfg.dims[0], eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Stage(nn.Module):
    """[downsample] then ``depth`` blocks of width ``dim``."""

    def __init__(self, downsample: Downsample | None, dim: int, cfg: ConvNeXtConfig, rates: list[float]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(Block(dim, cfg, r) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class ConvNeXt(nn.Module):
    """Image classifier: images (B, in_channels, image_size, image_size) -> logits (B, n_classes)."""

    def __init__(self, cfg: ConvNeXtConfig) -> None:
        super().__init__()
        self.config = cfg
        self.stem = Stem(cfg)
        rates, stages, start = cfg.drop_path_rates(), [], 0
        for s, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            down = Downsample(cfg.dims[s - 1], dim, cfg.norm_eps) if s > 0 else None
            stages.append(Stage(down, dim, cfg, rates[start:start + depth]))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.final_norm = nn.LayerNorm(cfg.dims[-1], eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dims[-1], cfg.n_classes)
        if self.head.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated normal (``init_std``, cut at 2 std) conv and linear weights, zero biases; LN (1, 0);
        layer scale ``layer_scale_init``."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                m.gamma.fill_(self.config.layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, in_channels, image_size, image_size) float. Returns: logits (B, n_classes)."""
        x = self.stem(x)  # (B, dims[0], H / P, W / P)
        for stage in self.stages:
            x = stage(x)  # (B, dims[s], H / P / 2^s, W / P / 2^s)
        x = x.mean(dim=(-2, -1))  # (B, dims[-1]) global average pool
        return self.head(self.final_norm(x))


register_family("convnext", ConvNeXtConfig, task="classification")(ConvNeXt)

register_preset("convnext-tiny", "convnext", doc="ConvNeXt-T (28.6M), Liu et al. 2022, ImageNet shapes",
                in_channels=3, image_size=224, n_classes=1000, depths=[3, 3, 9, 3], dims=[96, 192, 384, 768],
                stem_patch_size=4)
# Stages at 14x14, 7x7 and 3x3 (the 2x2 stride-2 downsampling floors 7 to 3): 16.2 MFLOPs forward per 28x28
# image (0.51M parameters); about 400 images/s of training per CPU core (LayerNorm and GELU are memory-bound).
register_preset("convnext-fmnist", "convnext", doc="a 3-stage ConvNeXt for 28x28 grayscale images (Fashion-MNIST)",
                in_channels=1, image_size=28, n_classes=10, depths=[1, 1, 3], dims=[32, 64, 128], stem_patch_size=2)
