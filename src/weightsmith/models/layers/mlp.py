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
        y = self.down(F.gelu(self.up(x), approximate=self.approximate))
        return self.dropout(y) if self.dropout.p else y


class SwiGLU(nn.Module):
    """(B, T, d_model) -> (B, T, d_model): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.gate_up: nn.Linear | None = None  # [gate; up] (2 d_ff, d_model), set only by ship.fuse (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        y = self.down(F.silu(gate) * up)
        return self.dropout(y) if self.dropout.p else y  # skip the no-op module call when p = 0


def make_mlp(kind: str, d_model: int, d_ff: int, bias: bool, dropout: float) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, bias, dropout)
    if kind == "gelu":
        return GeluMLP(d_model, d_ff, bias, dropout)
    raise ValueError(f"unknown mlp {kind!r}")
