"""Normalization layers.

- LayerNorm: Ba, Kiros & Hinton 2016, "Layer Normalization" (``torch.nn.LayerNorm``).
- RMSNorm: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization": ``x / rms(x) * weight``, no
  mean subtraction and no bias, as in LLaMA and T5.
- DyT: Zhu, Chen, He, LeCun & Liu 2025, "Transformers without Normalization": ``weight * tanh(alpha * x)
  + bias``, an element-wise squashing with one learnable scalar ``alpha`` (the paper's alpha_0 is our
  ``alpha0``, 0.5 by default) in place of any statistic over the channels.
- ``"none"``: the identity, no parameters (the no-normalization ablation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight``; input and output (..., d_model).

    The reduction is computed in float32 and cast back, as LLaMA does, so bf16 training is stable.
    """

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, the same arithmetic
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class DyT(nn.Module):
    """Dynamic tanh, ``y = weight * tanh(alpha * x) + bias``; input and output (..., d_model).

    ``alpha`` is one learnable scalar, shape (1,), initialized to ``alpha0``; ``weight`` starts at ones and
    ``bias`` (if any) at zeros, as in the paper's code. No reduction over channels, so no ``eps``.
    """

    def __init__(self, d_model: int, *, alpha0: float = 0.5, bias: bool = True) -> None:
        super().__init__()
        self.alpha0 = alpha0
        self.alpha = nn.Parameter(torch.full((1,), float(alpha0)))
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.alpha * x) * self.weight
        return y if self.bias is None else y + self.bias


def make_norm(kind: str, d_model: int, eps: float, bias: bool, *, alpha0: float = 0.5) -> nn.Module:
    """``kind`` is ``"layernorm"``, ``"rmsnorm"``, ``"dyt"`` or ``"none"`` (identity); ``bias`` applies to
    LayerNorm and DyT, ``eps`` to LayerNorm and RMSNorm, ``alpha0`` (DyT's initial alpha) to DyT."""
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps)
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=eps, bias=bias)
    if kind == "dyt":
        return DyT(d_model, alpha0=alpha0, bias=bias)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of 'layernorm', 'rmsnorm', 'dyt', 'none'")
