"""Optimizers and learning-rate schedules.

- AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (``torch.optim.AdamW``).
  Weight decay applies to matrices inside the network only; norm gains, biases and embeddings are not
  decayed (as in GPT-2/nanoGPT and LLaMA).
- Schedules, as a multiplier on the peak ``lr`` per optimizer step:
  ``cosine``: linear warmup over ``warmup_steps`` then cosine decay to ``min_lr`` at the end of training
  (Loshchilov & Hutter 2017, SGDR); ``wsd``: warmup-stable-decay, constant then a linear decay to
  ``min_lr`` over the last ``decay_fraction`` of training (Hu et al. 2024, MiniCPM); ``constant``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (2-D+ weights of linear layers) and not decayed (norms, biases, embeddings)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                eps: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``foreach`` kernels are used where available."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "cosine", decay_fraction: float = 0.2, progress: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    ``progress`` in [0, 1] overrides ``step / total_steps`` after warmup (used with a wall-clock
    budget). Returns a float in [min_lr, lr].
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if progress is None:
        span = max(1, total_steps - warmup_steps)
        progress = (step - warmup_steps) / span
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        start = 1.0 - decay_fraction
        if progress <= start:
            return lr
        return lr - (lr - min_lr) * (progress - start) / decay_fraction
    raise ValueError(f"unknown schedule {schedule!r}")
