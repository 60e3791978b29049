"""Encoder-decoder transformer (T5).

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer". Pre-norm blocks with a scale-only RMS norm (the paper's "simplified layer norm"; our
RMSNorm), no biases anywhere, unscaled attention logits (the 1/sqrt(d_head) is folded into the
initialization of ``q_proj``), no absolute positions but a learned *relative position bias*: a scalar
per head and per bucket of ``key - query`` distance, added to the attention logits of every layer of a
stack (computed once per stack). The paper's d_kv is our d_head; "num_layers" the encoder's n_layers.

Data flow, B batch, S source length, T target length, D = d_model, V = vocab_size::

    src (B, S) -> shared emb -> n_layers x [ x + attn(norm(x), bias_enc) ; x + mlp(norm(x)) ]
               -> final_norm -> memory (B, S, D)
    tgt (B, T) -> shared emb -> n_decoder_layers x [ x + causal_attn(norm(x), bias_dec)
                                                      x + cross_attn(norm(x), memory)
                                                      x + mlp(norm(x)) ]
               -> final_norm -> (* D^-0.5 if tied) -> lm_head -> logits (B, T, V)

Relative position buckets (section 2.1 and the Mesh TensorFlow code): half of the buckets are exact
distances 0..n/2-1, the other half cover distances up to ``rel_max_distance`` logarithmically; the
encoder is bidirectional (half the buckets for each sign), the decoder sees only the past.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.models.layers.attention import Attention
from weightsmith.models.layers.cross_attention import CrossAttention
from weightsmith.models.layers.norms import RMSNorm
from weightsmith.registry import register_family, register_preset


@dataclass(kw_only=True)
class T5Config:
    """Encoder-decoder config. ``n_decoder_layers=None`` means ``n_layers``; ``d_head=None`` means
    ``d_model // n_heads``; ``d_ff=None`` means ``4 * d_model``.

    ``mlp="relu"`` is the original T5 FFN, ``"gated-gelu"`` T5 v1.1's. ``pos="none"`` drops the relative
    position bias (the model then has no position information at all).
    """

    vocab_size: int = 32128
    d_model: int = 128
    n_layers: int = 2
    n_decoder_layers: int | None = None
    n_heads: int = 4
    d_head: int | None = None
    d_ff: int | None = None
    mlp: Literal["relu", "gated-gelu"] = "relu"
    pos: Literal["relative", "none"] = "relative"
    rel_buckets: int = 32
    rel_max_distance: int = 128
    max_seq_len: int = 512
    tie_embeddings: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"))
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads="
                                  f"{self.n_heads} (or set model.d_head)")
            self.d_head = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("n_decoder_layers", "d_head", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.pos == "relative" and (self.rel_buckets < 4 or self.rel_max_distance < self.rel_buckets // 2):
            raise ConfigError(f"model.rel_buckets={self.rel_buckets} must be >= 4 and model.rel_max_distance="
                              f"{self.rel_max_distance} >= rel_buckets / 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


def relative_position_bucket(rel: torch.Tensor, *, bidirectional: bool, n_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket index (same shape, int64) of relative positions ``rel = key_pos - query_pos``.

    Distances below ``n/2`` get a bucket each; larger ones share log-spaced buckets up to
    ``max_distance`` (and the last bucket beyond). Bidirectional: half the buckets per sign. Causal: only
    ``rel <= 0`` is distinguished (future keys are masked anyway).
    """
    bucket = torch.zeros_like(rel)
    if bidirectional:
        n_buckets //= 2
        bucket = bucket + (rel > 0).long() * n_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = n_buckets // 2
    log_ratio = torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (n_buckets - exact)).long()
    far = far.clamp(max=n_buckets - 1)
    return bucket + torch.where(dist < exact, dist, far)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head): (T queries, S keys) -> additive bias (1, n_heads, T, S)."""

    def __init__(self, n_heads: int, n_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.emb = nn.Embedding(n_buckets, n_heads)

    def forward(self, T: int, S: int, device: torch.device) -> torch.Tensor:
        rel = torch.arange(S, device=device)[None, :] - torch.arange(T, device=device)[:, None]  # (T, S)
        buckets = relative_position_bucket(rel, bidirectional=self.bidirectional, n_buckets=self.n_buckets,
                                           max_distance=self.max_distance)
        return self.emb(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)


class ReluMLP(nn.Module):
    """T5's FFN: ``down(relu(up(x)))``, (B, T, d_model) -> (B, T, d_model), no biases."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.relu(self.up(x))))


class GatedGeluMLP(nn.Module):
    """T5 v1.1's FFN (Shazeer 2020): ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x)))


def _mlp(cfg: T5Config) -> nn.Module:
    return ReluMLP(cfg.d_model, cfg.d_ff, cfg.dropout) if cfg.mlp == "relu" else \
        GatedGeluMLP(cfg.d_model, cfg.d_ff, cfg.dropout)


def _self_attn(cfg: T5Config, causal: bool) -> Attention:
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, bias=False, dropout=cfg.dropout, causal=causal,
                     d_head=cfg.d_head, scale=1.0)


class EncoderBlock(nn.Module):
    """(B, S, D) -> (B, S, D): pre-norm bidirectional self-attention and FFN."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = _self_attn(cfg, causal=False)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = _mlp(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), attn_mask=mask)
        return x + self.mlp(self.mlp_norm(x))


class DecoderBlock(nn.Module):
    """(B, T, D) -> (B, T, D): causal self-attention, cross-attention over memory (B, S, D), FFN."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = _self_attn(cfg, causal=True)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.n_heads, bias=False, dropout=cfg.dropout,
                                         d_head=cfg.d_head, scale=1.0)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = _mlp(cfg)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), attn_mask=self_mask)
        x = x + self.cross_attn(self.cross_norm(x), memory, attn_mask=cross_mask)
        return x + self.mlp(self.mlp_norm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.rel_bias = RelativePositionBias(cfg.n_heads, cfg.rel_buckets, cfg.rel_max_distance, True) \
            if cfg.pos == "relative" else None
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)


class Decoder(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.rel_bias = RelativePositionBias(cfg.n_heads, cfg.rel_buckets, cfg.rel_max_distance, False) \
            if cfg.pos == "relative" else None
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = attend) -> additive float mask (0 or the most negative finite value)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class T5(nn.Module):
    """Encoder-decoder: source ids (B, S) and target ids (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        if self.shared.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mesh-TF T5 initialization: embeddings N(0, 1); ``q_proj`` N(0, (d_model d_head)^-1/2), which
        stands in for the missing 1/sqrt(d_head); other weights N(0, fan_in^-1/2); norm gains 1."""
        cfg = self.config
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name in ("shared.weight", "lm_head.weight"):
                nn.init.normal_(p, 0.0, 1.0)
            elif name.endswith("q_proj.weight"):
                nn.init.normal_(p, 0.0, (cfg.d_model * cfg.d_head) ** -0.5)
            elif name.endswith("rel_bias.emb.weight"):
                nn.init.normal_(p, 0.0, cfg.d_model ** -0.5)
            else:
                nn.init.normal_(p, 0.0, p.shape[1] ** -0.5)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) and optional padding mask (B, S) (True = token) -> memory (B, S, d_model)."""
        enc = self.encoder
        S = src.shape[1]
        x = enc.drop(self.shared(src))  # (B, S, D)
        mask = None if src_mask is None else src_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        if enc.rel_bias is not None:
            bias = enc.rel_bias(S, S, src.device).to(x.dtype)  # (1, H, S, S)
            mask = bias if mask is None else bias + _additive(mask, x.dtype)
        for block in enc.blocks:
            x = block(x, mask)
        return enc.drop(enc.final_norm(x))

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor,
               src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Target ids (B, T), memory (B, S, d_model) -> logits (B, T, vocab_size)."""
        dec = self.decoder
        T = tgt.shape[1]
        x = dec.drop(self.shared(tgt))  # (B, T, D)
        self_mask = None  # None: Attention applies its own causal mask
        if dec.rel_bias is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=tgt.device).tril()
            self_mask = dec.rel_bias(T, T, tgt.device).to(x.dtype) + _additive(causal, x.dtype)  # (1, H, T, T)
        cross_mask = None if src_mask is None else src_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        for block in dec.blocks:
            x = block(x, memory, self_mask, cross_mask)
        x = dec.drop(dec.final_norm(x))
        if self.config.tie_embeddings:  # Mesh-TF rescales before the tied softmax
            x = x * self.config.d_model ** -0.5
        return self.lm_head(x)  # (B, T, V)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, *,
                src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) of the target ids ``tgt`` (B, T) given source ids ``src`` (B, S).

        ``tgt`` is the decoder input (shifted right, starting with the pad/start id); ``src_mask`` (B, S)
        marks real source tokens (True) versus padding.
        """
        return self.decode(tgt, self.encode(src, src_mask), src_mask)


register_family("t5", T5Config, task="span-corruption")(T5)

register_preset("t5-small", "t5", doc="T5-small (60M), Raffel et al. 2020",
                vocab_size=32128, d_model=512, n_layers=6, n_heads=8, d_ff=2048)
register_preset("t5-base", "t5", doc="T5-base (223M, tied lm_head), Raffel et al. 2020",
                vocab_size=32128, d_model=768, n_layers=12, n_heads=12, d_ff=3072)
register_preset("t5-tiny", "t5", doc="a 2+2 layer encoder-decoder for smoke tests",
                vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=96, rel_buckets=8,
                rel_max_distance=16, max_seq_len=128)
