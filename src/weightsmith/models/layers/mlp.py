"""Position-wise feed-forward blocks.

- ``gelu``: Vaswani et al. 2017 with GELU (Hendrycks & Gimpel 2016) as in GPT-2:
  ``W_down gelu(W_up x)``, d_model -> d_ff -> d_model.
- ``swiglu``: Shazeer 2020, "GLU Variants Improve Transformer", as in LLaMA:
  ``W_down (silu(W_gate x) * W_up x)``. Three matrices, so LLaMA takes d_ff ~ 8/3 d_model to keep the
  parameter count of a 4x GELU MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeluMLP(nn.Module):
    """(B, T, d_model) -> (B, T, d_model) through a hidden width d_ff."""

    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0,
                 approximate: str = "tanh") -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh approximation by default: the form GPT-2 was trained with ("gelu_new" in HF); BERT passes
        # approximate="none" for the exact erf GELU.
        return self.dropout(self.down(F.gelu(self.up(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """(B, T, d_model) -> (B, T, d_model): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


def make_mlp(kind: str, d_model: int, d_ff: int, bias: bool, dropout: float) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, bias, dropout)
    if kind == "gelu":
        return GeluMLP(d_model, d_ff, bias, dropout)
    raise ValueError(f"unknown mlp {kind!r}")
