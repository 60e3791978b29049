"""Analytic FLOPs per token.

Convention: 2 FLOPs per multiply-add; matmuls only; attention dense over the whole context of
``seq_len`` keys; training = 3x forward (see :mod:`weightsmith.analysis`).
"""

from __future__ import annotations

from typing import Any

from weightsmith.errors import ConfigError


def _gpt_fwd_per_token(cfg: Any, seq_len: int) -> float:
    d, dh = cfg.d_model, cfg.d_head
    d_q, d_kv = cfg.n_heads * dh, cfg.n_kv_heads * dh
    attn_proj = 2 * (d * d_q + 2 * d * d_kv + d_q * d)
    n_experts = getattr(cfg, "n_experts", 0)
    n_mats = 3 if cfg.mlp == "swiglu" else 2
    if n_experts:
        mlp = 2 * d * n_experts + cfg.n_experts_per_token * 2 * n_mats * d * cfg.d_ff
    else:
        mlp = 2 * n_mats * d * cfg.d_ff
    attn_ctx = 2 * 2 * seq_len * d_q  # Q K^T and P V, dense
    return float(cfg.n_layers * (attn_proj + mlp + attn_ctx) + 2 * d * cfg.vocab_size)


def flops_per_token(family: str, cfg: Any, seq_len: int, *, training: bool = True) -> float:
    """FLOPs per token of a model of ``family`` with config ``cfg`` at context length ``seq_len``.

    Forward FLOPs per token, times 3 if ``training`` (forward + backward). 2 FLOPs per multiply-add.

    Raises:
        ConfigError: for an unknown family.
    """
    if family != "gpt":
        raise ConfigError(f"flops_per_token: family '{family}' is not supported yet")
    fwd = _gpt_fwd_per_token(cfg, seq_len)
    return 3.0 * fwd if training else fwd
