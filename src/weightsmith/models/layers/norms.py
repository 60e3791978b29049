"""Normalization layers.

- LayerNorm: Ba, Kiros & Hinton 2016, "Layer Normalization" (``torch.nn.LayerNorm``).
- RMSNorm: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization": ``x / rms(x) * weight``, no
  mean subtraction and no bias, as in LLaMA and T5.
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


def make_norm(kind: str, d_model: int, eps: float, bias: bool) -> nn.Module:
    """``kind`` is ``"layernorm"`` or ``"rmsnorm"``; ``bias`` applies to LayerNorm only."""
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps)
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=eps, bias=bias)
    raise ValueError(f"unknown norm {kind!r}")
