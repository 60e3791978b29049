"""Multilayer perceptron image classifier: the flattened image through ``n_layers`` hidden layers.

Sources:
- Rumelhart, Hinton & Williams 1986, "Learning representations by back-propagating errors" (the MLP).
- Ioffe & Szegedy 2015, "Batch Normalization" (``norm="batch"``); Ba, Kiros & Hinton 2016, "Layer
  Normalization" (``norm="layer"``); Srivastava et al. 2014, "Dropout".

Data flow, shape legend B batch, C = in_channels, H = W = image_size, D = d_hidden, K = n_classes::

    x (B, C, H, W) -> flatten (B, C*H*W)
      -> n_layers x [ linear -> norm -> activation -> dropout ]     (B, D)
      -> head -> logits (B, K)

A linear layer followed by BatchNorm has no bias (the norm's shift replaces it). ``n_layers=0`` is
multinomial logistic regression. Weights keep PyTorch's default initialization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.registry import register_family, register_preset


@dataclass(kw_only=True)
class MLPConfig:
    """MLP classifier config. ``in_channels, image_size, n_classes`` are decided by the data;
    ``d_in = in_channels * image_size**2`` is derived. The defaults are a small 2x128 model for 32x32
    RGB images (contract tests build it)."""

    in_channels: int = 3
    image_size: int = 32
    n_classes: int = 10
    n_layers: int = 2
    d_hidden: int = 128
    activation: Literal["relu", "gelu", "silu"] = "relu"
    norm: Literal["batch", "layer", "none"] = "none"
    dropout: float = 0.0
    norm_eps: float = 1e-5
    d_in: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, ("in_channels", "image_size", "n_classes", "d_hidden"))
        if self.n_layers < 0:
            raise ConfigError(f"model.n_layers must be >= 0 (0 = logistic regression), got {self.n_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        self.d_in = self.in_channels * self.image_size**2


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class MLPBlock(nn.Module):
    """(B, d_in) -> (B, d_out): linear, norm, activation, dropout."""

    def __init__(self, d_in: int, d_out: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=cfg.norm != "batch")
        if cfg.norm == "batch":
            self.norm = nn.BatchNorm1d(d_out, eps=cfg.norm_eps)
        elif cfg.norm == "layer":
            self.norm = nn.LayerNorm(d_out, eps=cfg.norm_eps)
        else:
            self.norm = nn.Identity()
        self.act = _ACTIVATIONS[cfg.activation]()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.linear(x)))
        return self.drop(x) if self.drop.p else x


class MLP(nn.Module):
    """Image classifier: images (B, in_channels, image_size, image_size) -> logits (B, n_classes)."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        widths = [cfg.d_in] + [cfg.d_hidden] * cfg.n_layers
        self.blocks = nn.ModuleList(MLPBlock(a, b, cfg) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], cfg.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, in_channels, image_size, image_size) float. Returns: logits (B, n_classes)."""
        x = x.flatten(1)  # (B, C*H*W), a view
        for block in self.blocks:
            x = block(x)  # (B, d_hidden)
        return self.head(x)


register_family("mlp", MLPConfig, task="classification")(MLP)

register_preset("mlp-fmnist", "mlp", doc="a 2x512 MLP with BatchNorm for 28x28 grayscale images (Fashion-MNIST)",
                in_channels=1, image_size=28, n_classes=10, n_layers=2, d_hidden=512, activation="relu",
                norm="batch", dropout=0.1)
