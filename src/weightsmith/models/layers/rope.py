"""Rotary position embedding (RoPE).

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding". Each pair of channels
``(2i, 2i+1)`` of a query or key at position ``m`` is rotated by the angle ``m * theta_i`` with
``theta_i = rope_theta ** (-2i / d_head)``. The dot product of a rotated query at ``m`` and a rotated
key at ``n`` then depends only on ``m - n``. We use the half-split layout (channel ``i`` pairs with
``i + d_head/2``) that GPT-NeoX and Hugging Face's LLaMA use, so LLaMA weights load without permuting.
"""

from __future__ import annotations

import torch


def rope_frequencies(d_head: int, rope_theta: float) -> torch.Tensor:
    """Inverse frequencies ``theta_i``, shape (d_head / 2,), float32."""
    return 1.0 / (rope_theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head))


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos and sin tables for integer positions ``pos`` of shape (T,) or (B, T).

    Returns two tensors of shape ``pos.shape + (d_head,)``, float32.
    """
    angles = pos.to(torch.float32)[..., None] * inv_freq.to(pos.device)  # (..., T, d_head/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, d_head)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (B, H, T, d_head) by cos/sin of shape (T, d_head) or (B, T, d_head)."""
    if cos.dim() == 3:  # per-sequence positions: (B, T, d_head) -> (B, 1, T, d_head)
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)
