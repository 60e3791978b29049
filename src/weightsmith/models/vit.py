"""Vision Transformer (ViT) image classifier.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale".
An image is cut into non-overlapping P x P patches, each linearly projected to a D-wide token (one
Conv2d with ``kernel_size = stride = P``); a learned class token is prepended (or, the paper's "GAP"
variant, the tokens are averaged at the end), learned 1-D position embeddings are added, and a stack
of pre-norm encoder blocks (bidirectional attention, exact-erf GELU MLP) follows; a LayerNorm and one
linear layer map the pooled D-vector to class logits. Notation: the paper's D is our d_model, L our
n_layers, k (heads) our n_heads, D_h our d_head, "MLP size" our d_ff, P our patch_size, C our
in_channels, N = HW / P^2 our ``n_patches``. LayerNorm eps is 1e-6 as in the reference JAX code, which
torchvision and timm follow; HF's ``ViTConfig`` defaults to 1e-12 (the converter carries ours over).

Data flow, B batch, C = in_channels, H = W = image_size, P = patch_size, N = (H / P)^2, D = d_model::

    images (B, C, H, W) -> patch_emb Conv2d(C, D, P, stride P) -> (B, D, H/P, W/P) -> (B, N, D)
      -> [cls_token; patches] (B, 1 + N, D)  (pool="cls"; pool="mean" has no class token)
      -> + pos_emb -> n_layers x [ x + attn(norm(x)) ; x + mlp(norm(x)) ]     (no mask)
      -> pool: x[:, 0] (cls) or x.mean(1) (mean) -> (B, D) -> final_norm -> head -> logits (B, n_classes)

The final LayerNorm is applied to the pooled vector. For ``pool="cls"`` that is the same function as
the reference code's norm over every token followed by taking token 0 (a LayerNorm is per token),
without normalizing the N tokens nobody reads; for ``pool="mean"`` it is timm's ``fc_norm`` placement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.models.layers.attention import Attention
from weightsmith.models.layers.mlp import GeluMLP
from weightsmith.registry import register_family, register_preset


@dataclass(kw_only=True)
class ViTConfig:
    """ViT classifier config. The defaults are a small 2-layer model for 32x32 RGB images (the contract
    tests build it); ``vit-b16`` is the paper's ViT-B/16.

    in_channels: C, image channels (decided by the data).
    image_size: H = W, pixels per side (decided by the data); a multiple of ``patch_size``.
    n_classes: outputs of the head (decided by the data).
    patch_size: P, the side of a square patch: the Conv2d's ``kernel_size`` and ``stride``.
    d_model: D, the token width.
    n_layers: L, encoder blocks.
    n_heads: attention heads; ``d_model`` must be a multiple.
    d_ff: the MLP's hidden width ("MLP size"); unset means ``4 * d_model``.
    pool: ``"cls"`` prepends a learned class token and classifies its final state; ``"mean"`` has no
        class token and averages the patch tokens (the paper's "GAP" head).
    gelu: ``"erf"``, the exact GELU of torchvision, timm and HF; ``"tanh"``, the approximation that the
        JAX reference's ``nn.gelu`` computes by default.
    dropout: after the embeddings, on the attention probabilities and on each residual branch.
    bias: biases of every linear layer, the patch projection and the LayerNorms (HF export needs it).
    norm_eps: LayerNorm epsilon; 1e-6 as in the reference code, torchvision and timm.
    d_head: derived, ``d_model / n_heads``.
    n_patches: derived, N = ``(image_size / patch_size)^2``.
    """

    in_channels: int = 3
    image_size: int = 32
    n_classes: int = 10
    patch_size: int = 4
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int | None = None
    pool: Literal["cls", "mean"] = "cls"
    gelu: Literal["erf", "tanh"] = "erf"
    dropout: float = 0.0
    bias: bool = True
    norm_eps: float = 1e-6
    d_head: int = field(init=False)
    n_patches: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, ("in_channels", "image_size", "n_classes", "patch_size", "d_model", "n_layers",
                                "n_heads"))
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} must be divisible by "
                              f"model.patch_size={self.patch_size}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        self.d_head = self.d_model // self.n_heads
        self.n_patches = (self.image_size // self.patch_size) ** 2
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.d_ff <= 0:
            raise ConfigError(f"model.d_ff must be positive, got {self.d_ff}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def n_tokens(self) -> int:
        """Tokens per image in the encoder: the patches, plus the class token with ``pool="cls"``."""
        return self.n_patches + (self.pool == "cls")


class ViTBlock(nn.Module):
    """Pre-norm encoder block, (B, T, D) -> (B, T, D), attention over all T tokens (no mask)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, bias=cfg.bias, dropout=cfg.dropout,
                              causal=False)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = GeluMLP(cfg.d_model, cfg.d_ff, cfg.bias, cfg.dropout,
                           approximate="none" if cfg.gelu == "erf" else "tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


@register_family("vit", ViTConfig, task="classification")
class ViT(nn.Module):
    """Vision Transformer: images (B, in_channels, image_size, image_size) -> logits (B, n_classes)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        D = cfg.d_model
        self.patch_emb = nn.Conv2d(cfg.in_channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                   bias=cfg.bias)
        self.cls_token = nn.Parameter(torch.empty(D)) if cfg.pool == "cls" else None
        self.pos_emb = nn.Parameter(torch.empty(cfg.n_tokens, D))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(D, eps=cfg.norm_eps, bias=cfg.bias)
        self.head = nn.Linear(D, cfg.n_classes, bias=cfg.bias)
        if self.pos_emb.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference code's from-scratch initialization: every linear layer Xavier-uniform, the patch
        projection LeCun-normal (std ``1 / sqrt(C P^2)``), position embeddings N(0, 0.02), the class token
        0, biases 0, LayerNorm gains 1. (The reference also zero-initializes the head, for fine-tuning;
        we keep it Xavier, so the first step already sends a gradient into the encoder.) Unlike a fixed
        std of 0.02 these scale with the width, which matters for small models: on Fashion-MNIST,
        ``vit-fmnist`` with N(0, 0.02) everywhere is ~8 points of accuracy behind after 12.8k images."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
        fan_in = self.patch_emb.weight[0].numel()  # C * P * P
        nn.init.normal_(self.patch_emb.weight, 0.0, fan_in ** -0.5)
        nn.init.normal_(self.pos_emb, 0.0, 0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        for name, p in self.named_parameters():
            if p.dim() == 1 and name != "cls_token":
                (nn.init.zeros_ if name.endswith("bias") else nn.init.ones_)(p)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> encoder input tokens (B, n_tokens, D), position embeddings added.

        Raises:
            ValueError: if the channels or the image size differ from the config's.
        """
        cfg = self.config
        if images.dim() != 4 or images.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected images (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(images.shape)}")
        B = images.shape[0]
        x = self.patch_emb(images)  # (B, D, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, 1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.pos_emb  # (n_tokens, D) broadcast over the batch
        return self.drop(x) if self.drop.p else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Classify a batch.

        Args:
            images: (B, in_channels, image_size, image_size), float (normalized pixels).

        Returns:
            logits (B, n_classes), float, before any softmax.
        """
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)  # (B, n_tokens, D)
        pooled = x[:, 0] if self.cls_token is not None else x.mean(1)  # (B, D)
        return self.head(self.final_norm(pooled))  # (B, n_classes)


register_preset("vit-b16", "vit", doc="ViT-B/16 (86.6M), Dosovitskiy et al. 2021, ImageNet-1k 224x224",
                in_channels=3, image_size=224, n_classes=1000, patch_size=16, d_model=768, n_layers=12,
                n_heads=12, d_ff=3072, pool="cls")
# 49 patch tokens + cls, 540k parameters, 57.8 MFLOPs (28.9M multiply-adds) forward per image
register_preset("vit-fmnist", "vit", doc="a 4x128 ViT for 28x28 Fashion-MNIST: 4x4 patches, 49 tokens + cls",
                in_channels=1, image_size=28, n_classes=10, patch_size=4, d_model=128, n_layers=4, n_heads=4,
                d_ff=256, pool="cls")
