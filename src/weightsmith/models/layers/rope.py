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
    """Cos and signed sin tables for integer positions ``pos`` of shape (T,) or (B, T).

    Returns ``(cos, sin)``, each of shape ``pos.shape + (d_head,)``, float32, in the half-split layout:
    ``cos = [cos(m theta), cos(m theta)]`` and ``sin = [-sin(m theta), sin(m theta)]``. The sign of the
    rotation is folded into the first half of ``sin`` so that :func:`apply_rope` needs no negation.
    """
    angles = pos.to(torch.float32)[..., None] * inv_freq.to(pos.device)  # (..., T, d_head/2)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (B, H, T, d_head) by the tables of :func:`rope_cos_sin`, (T, d_head) or
    (B, T, d_head): ``x * cos + [x2, x1] * sin`` with ``x = [x1, x2]``, which is ``[x1 cos - x2 sin,
    x2 cos + x1 sin]``. ``[x2, x1]`` is one ``roll`` by d_head/2 (three operators in all, which matters
    for a decode step whose cost is per-operator overhead)."""
    if cos.dim() == 3:  # per-sequence positions: (B, T, d_head) -> (B, 1, T, d_head)
        cos, sin = cos[:, None], sin[:, None]
    if x.dtype != cos.dtype:  # low-precision activations: rotate in float32, as LLaMA does
        return apply_rope(x.float(), cos, sin).type_as(x)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
