"""Cross-attention: queries from one sequence attend over another (the encoder's output).

Vaswani et al. 2017, "Attention Is All You Need", section 3.2.3 ("encoder-decoder attention"): the
decoder's queries (B, T, d_model) read keys and values projected from the encoder's memory
(B, S, d_model). Nothing is causal here; a padding mask over the S memory positions is optional::

    x (B, T, D) --q_proj--> q (B, H, T, d_head)
    memory (B, S, D) --k_proj, v_proj--> k, v (B, H, S, d_head)
    softmax(scale * q k^T + mask) v  (B, H, T, d_head) --o_proj--> (B, T, D)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """(B, T, d_model) queries over (B, S, d_model) memory -> (B, T, d_model).

    Args:
        d_head: per-head width, default ``d_model // n_heads``.
        scale: multiplier of ``q k^T``; default ``1 / sqrt(d_head)`` (T5 uses 1.0).
    """

    def __init__(self, d_model: int, n_heads: int, *, bias: bool, dropout: float, d_head: int | None = None,
                 scale: float | None = None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_head or d_model // n_heads
        self.dropout, self.scale = dropout, scale
        inner = n_heads * self.d_head
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.o_proj = nn.Linear(inner, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, *,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: queries (B, T, d_model).
            memory: keys and values come from here, (B, S, d_model).
            attn_mask: boolean (True = attend) or additive float, broadcastable to (B, H, T, S).
        """
        B, T, _ = x.shape
        S = memory.shape[1]
        q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, d_head)
        k = self.k_proj(memory).view(B, S, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, S, d_head)
        v = self.v_proj(memory).view(B, S, self.n_heads, self.d_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, H * d_head)
        return self.resid_dropout(self.o_proj(y))
