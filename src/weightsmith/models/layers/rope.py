"""Rotary position embedding (RoPE).

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding". Each pair of channels
``(2i, 2i+1)`` of a query or key at position ``m`` is rotated by the angle ``m * theta_i`` with
``theta_i = rope_theta ** (-2i / d_head)``. The dot product of a rotated query at ``m`` and a rotated
key at ``n`` then depends only on ``m - n``. We use the half-split layout (channel ``i`` pairs with
``i + d_head/2``) that GPT-NeoX and Hugging Face's LLaMA use, so LLaMA weights load without permuting.

Scaling for context extension (:func:`scaled_rope_frequencies`), with ``s = rope_scale`` the factor
between the new and the training context length ``L`` (``rope_original_max_seq_len``):

- ``linear``: position interpolation, Chen et al. 2023, "Extending Context Window of Large Language
  Models via Positional Interpolation": position ``m`` becomes ``m / s``, i.e. every ``theta_i / s``.
- ``ntk``: "NTK-aware" scaling (bloc97 2023, reddit r/LocalLLaMA): a larger base
  ``rope_theta' = rope_theta * s ** (d_head / (d_head - 2))``, which stretches the lowest frequency by
  ``s`` and leaves the highest almost unchanged.
- ``yarn``: Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models". With
  ``r_i = L / lambda_i`` the number of rotations of pair ``i`` over the training context (wavelength
  ``lambda_i = 2 pi / theta_i``) and the ramp ``gamma(r) = clamp((r - alpha) / (beta - alpha), 0, 1)``
  (the paper's alpha, beta are our ``yarn_alpha = 1``, ``yarn_beta = 32``), ``theta_i' = (1 - gamma)
  theta_i / s + gamma theta_i``: interpolate the slow pairs, keep the fast ones. The attention logits are
  divided by a temperature t with ``sqrt(1/t) = 0.1 ln s + 1``, applied here as a factor ``mscale =
  sqrt(1/t)`` on both q and k (folded into the cos/sin tables, as the paper suggests).
"""

from __future__ import annotations

import math

import torch


def rope_frequencies(d_head: int, rope_theta: float) -> torch.Tensor:
    """Inverse frequencies ``theta_i``, shape (d_head / 2,), float32."""
    return 1.0 / (rope_theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head))


def ntk_rope_theta(rope_theta: float, d_head: int, scale: float) -> float:
    """NTK-aware base ``rope_theta * scale ** (d_head / (d_head - 2))`` (needs ``d_head > 2``)."""
    return rope_theta * scale ** (d_head / (d_head - 2))


def yarn_mscale(scale: float) -> float:
    """YaRN's ``sqrt(1/t) = 0.1 ln(scale) + 1``, the factor on q and k (1.0 at ``scale = 1``)."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0


def scaled_rope_frequencies(d_head: int, rope_theta: float, *, scaling: str = "none", scale: float = 1.0,
                            original_max_seq_len: int = 0, yarn_alpha: float = 1.0,
                            yarn_beta: float = 32.0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (d_head / 2,) float32 after ``scaling`` (see the module docstring), and the
    factor ``mscale`` on q and k (YaRN's temperature; 1.0 otherwise).

    ``scaling="none"`` (or any scaling at ``scale=1``) returns :func:`rope_frequencies` bit for bit.
    ``original_max_seq_len`` (tokens) is the training context ``L``, used by ``yarn`` only.

    Raises:
        ValueError: for an unknown ``scaling``.
    """
    inv_freq = rope_frequencies(d_head, rope_theta)
    if scaling == "none":
        return inv_freq, 1.0
    if scaling == "linear":
        return inv_freq / scale, 1.0
    if scaling == "ntk":
        return rope_frequencies(d_head, ntk_rope_theta(rope_theta, d_head, scale)), 1.0
    if scaling == "yarn":
        rotations = original_max_seq_len * inv_freq / (2 * math.pi)  # r_i = L / lambda_i
        gamma = ((rotations - yarn_alpha) / (yarn_beta - yarn_alpha)).clamp(0.0, 1.0)
        interp = inv_freq / scale
        # theta/s + gamma (theta - theta/s) == (1 - gamma) theta/s + gamma theta, and exact at s = 1
        return interp + gamma * (inv_freq - interp), yarn_mscale(scale)
    raise ValueError(f"unknown rope_scaling {scaling!r}; choose one of 'none', 'linear', 'ntk', 'yarn'")


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
