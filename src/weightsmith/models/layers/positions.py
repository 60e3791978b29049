"""Parameter-free positions: sinusoidal embeddings and ALiBi attention biases.

- Sinusoidal: Vaswani et al. 2017, "Attention Is All You Need", section 3.5. Position ``pos`` gets
  ``PE[pos, 2i] = sin(pos / 10000 ** (2i / d_model))`` and ``PE[pos, 2i+1] = cos(...)`` (the paper's
  d_model is ours), added to the token embedding; nothing is learned.
- ALiBi: Press, Smith & Lewis 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input
  Length Extrapolation". No position enters the embeddings; head ``h`` adds ``-m_h * (i - j)`` to the
  score of query ``i`` and key ``j``. The slopes are a geometric sequence: for ``n`` heads, a power of 2,
  ``m_h = 2 ** (-8 h / n)``, h = 1..n (1/2 ... 1/256 for 8 heads); otherwise the ``2 ** floor(log2 n)``
  slopes of the nearest power of 2, followed by every other slope of twice that many (the paper's code).

    scores (one head), keys j ->       bias -m (i - j), future keys masked
    query i = 2    s20 s21 s22  .       -2m  -m   0  -inf
    query i = 3    s30 s31 s32 s33      -3m -2m  -m   0
"""

from __future__ import annotations

import math

import torch


def sinusoidal_embedding(pos: torch.Tensor, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """Sinusoidal position embeddings for integer positions ``pos`` (T,) or (B, T) -> ``pos.shape +
    (d_model,)``, float32, interleaved: channel ``2i`` is the sine and ``2i + 1`` the cosine of
    ``pos / base ** (2i / d_model)``. ``d_model`` must be even."""
    inv = 1.0 / base ** (torch.arange(0, d_model, 2, dtype=torch.float32, device=pos.device) / d_model)
    angles = pos.to(torch.float32)[..., None] * inv  # (..., T, d_model/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., T, d_model)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The paper's per-head slopes ``m_h``, shape (n_heads,), float32 (see the module docstring)."""
    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_2(closest) + alibi_slopes(2 * closest).tolist()[0::2][:n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *,
               attn_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask for ``scaled_dot_product_attention``: ``-m_h * (q_pos - k_pos)``, with
    ``-inf`` where masked.

    Args:
        slopes: (H,) from :func:`alibi_slopes`.
        q_pos, k_pos: (T,) and (S,) integer positions of the queries and the keys (cache columns).
        attn_mask: boolean mask broadcastable to (B, 1, T, S), True = attend, e.g. causal plus padding; if
            None the causal mask ``k_pos <= q_pos`` is applied.

    Returns:
        (1, H, T, S) without ``attn_mask``, else (B, H, T, S), in ``dtype``.
    """
    dist = (q_pos[:, None] - k_pos[None, :]).to(torch.float32)  # (T, S), >= 0 where attended
    bias = -slopes.to(dist.device)[:, None, None] * dist  # (H, T, S)
    if attn_mask is None:
        attn_mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S) -> bias (1, H, T, S)
    if attn_mask.dtype == torch.bool:
        bias = torch.where(attn_mask, bias, float("-inf"))
    else:  # an additive float mask (0 / -inf): add it
        bias = bias + attn_mask
    return bias.to(dtype)
