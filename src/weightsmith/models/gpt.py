"""Decoder-only transformer: GPT-2 and LLaMA shapes from one config.

Sources:
- Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2: pre-norm
  LayerNorm, GELU MLP, learned positions, tied embeddings, biases).
- Touvron et al. 2023, "Llama 2" (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases).
- Karpathy, nanoGPT ``model.py`` for the layout of the code.

Data flow, shape legend B batch, T sequence, D = d_model, V = vocab_size::

    idx (B, T) -> tok_emb (B, T, D) [+ pos_emb if pos == "learned"]
      -> n_layers x [ x + attn(norm(x)) ; x + mlp(norm(x)) ]     (RoPE inside attention)
      -> final norm -> lm_head -> logits (B, T, V)

Initialization follows GPT-2: every weight ~ N(0, init_std), and the two projections that write into
the residual stream (attention ``o_proj`` and MLP ``down``) use ``init_std / sqrt(2 * n_layers)`` so
the residual variance does not grow with depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.models.layers.attention import Attention, KVCache
from weightsmith.models.layers.mlp import make_mlp
from weightsmith.models.layers.moe import MoE
from weightsmith.models.layers.norms import make_norm
from weightsmith.models.layers.rope import rope_cos_sin, rope_frequencies
from weightsmith.registry import register_family, register_preset


@dataclass(kw_only=True)
class GPTConfig:
    """Decoder-only transformer config. ``d_head`` is derived.

    ``n_kv_heads=None`` means ``n_heads`` (plain multi-head attention). ``d_ff=None`` means ``4 *
    d_model`` for GELU, and for SwiGLU ``8/3 * d_model`` rounded up to a multiple of 64 (LLaMA's rule).
    ``n_experts > 0`` replaces every MLP by a top-``n_experts_per_token`` mixture of SwiGLU experts of
    width ``d_ff`` (layers/moe.py); 0 keeps the dense MLP.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    n_experts: int = 0
    n_experts_per_token: int = 2
    max_seq_len: int = 256
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    pos: Literal["learned", "rope"] = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    d_head: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}"
            )
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}"
            )
        self.d_head = self.d_model // self.n_heads
        if self.pos == "rope" and self.d_head % 2:
            raise ConfigError(f"model.d_head={self.d_head} must be even for pos='rope'")
        if self.d_ff is None:
            if self.mlp == "gelu":
                self.d_ff = 4 * self.d_model
            else:
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.n_experts < 0:
            raise ConfigError(f"model.n_experts must be >= 0 (0 = dense MLP), got {self.n_experts}")
        if self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts:
            raise ConfigError(f"model.n_experts_per_token={self.n_experts_per_token} must be in "
                              f"[1, n_experts={self.n_experts}]")
        if self.n_experts and self.mlp != "swiglu":
            raise ConfigError(f"model.mlp='{self.mlp}': experts are SwiGLU, set mlp='swiglu' with n_experts")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


class Block(nn.Module):
    """Pre-norm transformer block, (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, bias=cfg.bias,
                              dropout=cfg.dropout, causal=True)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        if cfg.n_experts:
            self.mlp = MoE(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.n_experts_per_token, bias=cfg.bias,
                           dropout=cfg.dropout)
        else:
            self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.d_ff, cfg.bias, cfg.dropout)

    def forward(self, x: torch.Tensor, rope=None, *, cache: KVCache | None = None, start: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache=cache, start=start, attn_mask=attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":  # derived, not saved: inverse frequencies and cos/sin for 0..max_seq_len-1
            dev = self.tok_emb.weight.device
            self.register_buffer("inv_freq", torch.empty(cfg.d_head // 2, device=dev), persistent=False)
            self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.d_head, device=dev), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.d_head, device=dev), persistent=False)
        else:
            self.inv_freq = None
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialization with depth-scaled residual projections (see module docstring)."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm gains and biases
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the non-persistent RoPE buffers: ``inv_freq`` (d_head/2,) and the cos/sin tables
        (max_seq_len, d_head) that the forward pass slices instead of recomputing them every call
        (a decode step is dominated by per-op overhead on CPU). Call after materializing from meta."""
        if self.inv_freq is None:
            return
        cfg = self.config
        dev = self.tok_emb.weight.device
        self.inv_freq = rope_frequencies(cfg.d_head, cfg.rope_theta).to(dev)
        self.rope_cos, self.rope_sin = rope_cos_sin(torch.arange(cfg.max_seq_len, device=dev), self.inv_freq)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> list[KVCache]:
        """One preallocated :class:`KVCache` per layer, (B, n_kv_heads, max_len, d_head) each."""
        cfg = self.config
        dev = self.tok_emb.weight.device
        dtype = dtype or self.tok_emb.weight.dtype
        return [KVCache(batch_size, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.d_head, dtype, dev)
                for _ in range(cfg.n_layers)]

    def forward(self, idx: torch.Tensor, *, cache: list[KVCache] | None = None, start: int = 0,
                pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for every position.

        Args:
            idx: token ids (B, T), int64.
            cache: per-layer KV caches from :meth:`new_cache`; positions ``[0, start)`` are already filled.
            start: absolute position of ``idx[:, 0]`` (with a cache).
            pos: explicit positions (T,) or (B, T) for RoPE or learned embeddings, e.g. per-sequence
                positions of a left-padded batch; default ``start + arange(T)``.
            attn_mask: boolean (B, 1, T, start + T) mask, True = attend; replaces the causal mask.
            last_only: return logits for the last position only, (B, 1, V).

        Returns:
            logits (B, T, vocab_size), float.

        Raises:
            ValueError: if a position reaches ``max_seq_len`` with learned positions.
        """
        B, T = idx.shape
        max_len = self.config.max_seq_len
        x = self.tok_emb(idx)  # (B, T, D)
        rope = None
        if self.pos_emb is not None:
            if pos is None:
                if start + T > max_len:
                    raise ValueError(f"position {start + T - 1} >= max_seq_len={max_len}")
                pos = torch.arange(start, start + T, device=idx.device)
            elif pos.device.type != "meta" and int(pos.max()) >= max_len:  # meta: shapes only
                raise ValueError(f"position {int(pos.max())} >= max_seq_len={max_len}")
            x = x + self.pos_emb(pos)
        elif pos is None and start + T <= max_len:  # the common case: slice the precomputed tables
            rope = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, d_head) each
        else:  # per-sequence positions, or past max_seq_len (RoPE extrapolates)
            if pos is None:
                pos = torch.arange(start, start + T, device=idx.device)
            rope = rope_cos_sin(pos, self.inv_freq)  # (T, d_head) or (B, T, d_head)
        if self.drop.p:
            x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache=None if cache is None else cache[i], start=start, attn_mask=attn_mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_norm(x))  # (B, T, V)


register_family("gpt", GPTConfig)(GPT)

# Presets: published shapes are config choices of the one family.
register_preset("gpt2", "gpt", doc="GPT-2 small (124M), Radford et al. 2019",
                vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024,
                norm="layernorm", mlp="gelu", pos="learned", tie_embeddings=True, bias=True)
register_preset("gpt2-medium", "gpt", doc="GPT-2 medium (355M)",
                vocab_size=50257, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024,
                norm="layernorm", mlp="gelu", pos="learned", tie_embeddings=True, bias=True)
register_preset("llama2-7b", "gpt", doc="LLaMA-2 7B, Touvron et al. 2023",
                vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                max_seq_len=4096, norm="rmsnorm", mlp="swiglu", pos="rope", rope_theta=10000.0,
                tie_embeddings=False, bias=False, norm_eps=1e-5)
register_preset("mixtral-8x7b", "gpt", doc="Mixtral 8x7B (46.7B total, 12.9B active), Jiang et al. 2024",
                vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                n_experts=8, n_experts_per_token=2, max_seq_len=32768, norm="rmsnorm", mlp="swiglu",
                pos="rope", rope_theta=1e6, tie_embeddings=False, bias=False, norm_eps=1e-5)
register_preset("moe-tiny", "gpt", doc="a 2-layer top-2-of-4 mixture of experts for smoke tests",
                vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, n_experts=4,
                n_experts_per_token=2, max_seq_len=128)
register_preset("gpt-tiny", "gpt", doc="a 4x128 char/byte-level model for smoke tests",
                vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=256)
