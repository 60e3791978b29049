"""Multi-head attention with grouped-query heads and an optional preallocated KV cache.

Vaswani et al. 2017, "Attention Is All You Need" (scaled dot-product attention);
Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models" (grouped-query
attention: ``n_kv_heads`` key/value heads, each shared by ``n_heads / n_kv_heads`` query heads; the
paper's G groups is our n_kv_heads). The kernel is ``torch.nn.functional.scaled_dot_product_attention``.

    query heads  q0 q1 q2 q3 q4 q5 q6 q7      n_heads = 8
                  \\ |  / |   \\ |  / |
    kv heads       k0    k1    k2    k3       n_kv_heads = 4  (head h reads kv head h // 2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.models.layers.rope import apply_rope


class KVCache(nn.Module):
    """Preallocated key/value buffers for one attention layer.

    ``k`` and ``v`` have shape (B, n_kv_heads, max_len, d_head). :meth:`update` writes new keys and
    values at positions ``[start, start + T)`` and returns the filled prefix ``[0, start + T)``.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, d_head: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, d_head)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, n_kv_heads, T, d_head) -> cached (B, n_kv_heads, start + T, d_head).

        Raises:
            ValueError: if ``start + T`` exceeds the preallocated length.
        """
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k.narrow(2, start, k.shape[2]).copy_(k)  # narrow: one view op where [:, :, a:b] takes three
        self.v.narrow(2, start, v.shape[2]).copy_(v)
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)


class Attention(nn.Module):
    """Self-attention, (B, T, d_model) -> (B, T, d_model).

    Args:
        causal: mask future positions (decoder) or not (encoder).
        d_head: per-head width; default ``d_model // n_heads`` (T5 allows ``n_heads * d_head != d_model``).
        scale: multiplier of ``q k^T``; default ``1 / sqrt(d_head)`` (T5 uses 1.0, folding it into init).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, bias: bool, dropout: float,
                 causal: bool = True, d_head: int | None = None, scale: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.d_head = d_head or d_model // n_heads
        self.causal = causal
        self.dropout = dropout
        self.scale = scale
        self.q_proj = nn.Linear(d_model, n_heads * self.d_head, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.d_head, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.d_head, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.d_head, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        # set only by weightsmith.ship.fuse.fuse_projections (inference): one (H + 2 Hkv) d_head x d_model
        # matrix in place of q/k/v_proj, so a decode step runs one matmul where it ran three
        self.qkv_proj: nn.Linear | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                cache: KVCache | None = None, start: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over ``x`` (B, T, d_model), plus cached positions ``[0, start)`` if ``cache`` is given.

        Args:
            rope: (cos, sin) for the T query positions, shape (T, d_head) or (B, T, d_head).
            attn_mask: optional boolean mask broadcastable to (B, n_heads, T, start + T); True = attend.
                When given it replaces the causal mask (the caller folds causality and padding in). A float
                mask is added to the scores (T5's relative position bias, with -inf where masked).
        """
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        if self.qkv_proj is not None:  # fused: heads [0, H) are q, then Hkv of k, then Hkv of v
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.d_head).transpose(1, 2)
            qk, v = qkv.split((H + Hkv, Hkv), dim=1)
            if rope is not None:  # q and k rotate by the same angles: one rotation for both
                qk = apply_rope(qk, *rope)
            q, k = qk.split((H, Hkv), dim=1)
        else:
            q = self.q_proj(x).view(B, T, H, self.d_head).transpose(1, 2)  # (B, H, T, d_head)
            k = self.k_proj(x).view(B, T, Hkv, self.d_head).transpose(1, 2)  # (B, Hkv, T, d_head)
            v = self.v_proj(x).view(B, T, Hkv, self.d_head).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, start)  # (B, Hkv, S, d_head), S = start + T
        S = k.shape[2]
        is_causal = False
        if attn_mask is None and self.causal and T > 1:
            if S == T:
                is_causal = True
            else:  # a chunk after a cached prefix: query i sits at absolute position start + i
                qpos = torch.arange(start, start + T, device=x.device)[:, None]
                attn_mask = torch.arange(S, device=x.device)[None, :] <= qpos  # (T, S)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=Hkv != H, scale=self.scale,
        )  # (B, H, T, d_head)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.d_head))
        return self.resid_dropout(y) if self.dropout else y  # skip the no-op module call when p = 0
