"""Decoder-only transformer: GPT-2 and LLaMA shapes from one config.

Sources:
- Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2: pre-norm
  LayerNorm, GELU MLP, learned positions, tied embeddings, biases).
- Touvron et al. 2023, "Llama 2" (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases).
- Karpathy, nanoGPT ``model.py`` for the layout of the code.
- Ablation variants: sinusoidal positions (Vaswani et al. 2017), ALiBi (Press et al. 2022), no positions
  (NoPE, Kazemnejad et al. 2023), RoPE context scaling (linear / NTK / YaRN, layers/rope.py), and DyT
  (Zhu et al. 2025) or no normalization (layers/norms.py).

Data flow, shape legend B batch, T sequence, D = d_model, V = vocab_size::

    idx (B, T) -> tok_emb (B, T, D) [+ pos_emb if pos == "learned" | + fixed table if "sinusoidal"]
      -> n_layers x [ x + attn(norm(x)) ; x + mlp(norm(x)) ]     (RoPE / ALiBi inside attention)
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
from weightsmith.models.layers.positions import alibi_bias, alibi_slopes, sinusoidal_embedding
from weightsmith.models.layers.rope import rope_cos_sin, rope_frequencies, scaled_rope_frequencies
from weightsmith.registry import register_family, register_preset


@dataclass(kw_only=True)
class GPTConfig:
    """Decoder-only transformer config. ``d_head`` is derived.

    ``n_kv_heads=None`` means ``n_heads`` (plain multi-head attention). ``d_ff=None`` means ``4 *
    d_model`` for GELU, and for SwiGLU ``8/3 * d_model`` rounded up to a multiple of 64 (LLaMA's rule).
    ``n_experts > 0`` replaces every MLP by a top-``n_experts_per_token`` mixture of SwiGLU experts of
    width ``d_ff`` (layers/moe.py); 0 keeps the dense MLP.

    ``pos`` is ``"learned"`` (a max_seq_len x d_model table), ``"rope"``, ``"sinusoidal"`` (fixed sin/cos
    added to the embedding, no parameters), ``"alibi"`` (a per-head linear bias on the attention scores) or
    ``"none"`` (NoPE: only the causal mask tells positions apart). ``norm`` is ``"layernorm"``,
    ``"rmsnorm"``, ``"dyt"`` (``weight * tanh(alpha * x) + bias``, bias if ``bias``) or ``"none"``
    (identity). ``dyt_alpha0`` is DyT's initial alpha (the paper's alpha_0). ``rope_scaling`` extends a RoPE
    model's context by the factor ``rope_scale`` (layers/rope.py): ``"linear"`` interpolates positions,
    ``"ntk"`` raises the base, ``"yarn"`` interpolates the slow frequencies only and sharpens the logits;
    typically set at load time together with a larger ``max_seq_len`` (the weights do not depend on it).
    ``rope_scale`` is that factor s >= 1, the new context over the training one (1 = no change).
    ``rope_original_max_seq_len=None`` means ``max_seq_len`` and is resolved and saved with the run, so a
    later ``max_seq_len`` override keeps the training context that YaRN's ramp needs.
    ``yarn_alpha`` and ``yarn_beta`` bound YaRN's ramp, in rotations over that context (paper: 1 and 32).
    ``sinusoidal_scale`` multiplies the fixed sin/cos table; None means ``init_std * sqrt(2)``, so each of
    its channels has the standard deviation of a freshly initialized token embedding (sin and cos have
    std 1/sqrt 2). Vaswani et al. add the unit table to embeddings that are multiplied by sqrt(d_model)
    at init std d_model^-0.5, i.e. token and position signals of equal scale; with GPT-2's 0.02 init an
    unscaled table is ~35x larger than the token signal and a short run learns only the unigram.
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
    norm: Literal["layernorm", "rmsnorm", "dyt", "none"] = "rmsnorm"
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    pos: Literal["learned", "rope", "sinusoidal", "alibi", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Literal["none", "linear", "ntk", "yarn"] = "none"
    rope_scale: float = 1.0
    rope_original_max_seq_len: int | None = None
    yarn_alpha: float = 1.0
    yarn_beta: float = 32.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False
    norm_eps: float = 1e-5
    dyt_alpha0: float = 0.5
    sinusoidal_scale: float | None = None
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
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"model.d_model={self.d_model} must be even for pos='sinusoidal'")
        if self.sinusoidal_scale is None:  # resolved, so it is saved with the run
            self.sinusoidal_scale = self.init_std * math.sqrt(2.0)
        self._check_rope_scaling()
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

    def _check_rope_scaling(self) -> None:
        if self.rope_original_max_seq_len is None:  # resolved, so it is saved with the run
            self.rope_original_max_seq_len = self.max_seq_len
        if self.rope_scaling == "none":
            if self.rope_scale != 1.0:
                raise ConfigError(f"model.rope_scale={self.rope_scale} needs model.rope_scaling "
                                  "('linear', 'ntk' or 'yarn'); it is 'none'")
            return
        if self.pos != "rope":
            raise ConfigError(f"model.rope_scaling={self.rope_scaling!r} needs pos='rope', got pos={self.pos!r}")
        if not self.rope_scale >= 1.0:
            raise ConfigError(f"model.rope_scale must be >= 1 (the context extension factor), got {self.rope_scale}")
        if self.rope_scaling == "ntk" and self.d_head <= 2:
            raise ConfigError(f"model.d_head={self.d_head} must be > 2 for rope_scaling='ntk'")
        if self.rope_scaling == "yarn":
            require_positive(self, ("rope_original_max_seq_len",))
            if not 0 < self.yarn_alpha < self.yarn_beta:
                raise ConfigError(f"model.yarn_alpha={self.yarn_alpha} and yarn_beta={self.yarn_beta} must "
                                  "satisfy 0 < yarn_alpha < yarn_beta")


class Block(nn.Module):
    """Pre-norm transformer block, (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, alpha0=cfg.dyt_alpha0)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, bias=cfg.bias,
                              dropout=cfg.dropout, causal=True)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, alpha0=cfg.dyt_alpha0)
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
        self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, alpha0=cfg.dyt_alpha0)
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
        self.rope_mscale = 1.0  # YaRN's factor on q and k, folded into the cos/sin tables
        # derived, not saved either: the sinusoidal table (max_seq_len, D) and ALiBi's slopes (H,)
        dev = self.tok_emb.weight.device
        self.register_buffer("pos_table", torch.empty(cfg.max_seq_len, cfg.d_model, device=dev)
                             if cfg.pos == "sinusoidal" else None, persistent=False)
        self.register_buffer("alibi_slopes", torch.empty(cfg.n_heads, device=dev)
                             if cfg.pos == "alibi" else None, persistent=False)
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialization with depth-scaled residual projections (see module docstring)."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.alpha"):  # DyT's scalar
                nn.init.constant_(p, self.config.dyt_alpha0)
            elif p.dim() == 1:  # norm gains and biases
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
        """Recompute the non-persistent buffers: RoPE's ``inv_freq`` (d_head/2,) (after ``rope_scaling``)
        and the cos/sin tables (max_seq_len, d_head) that the forward pass slices instead of recomputing
        them every call (a decode step is dominated by per-op overhead on CPU); the sinusoidal table
        (max_seq_len, d_model); ALiBi's slopes (n_heads,). Call after materializing from meta."""
        cfg = self.config
        dev = self.tok_emb.weight.device
        if self.pos_table is not None:
            self.pos_table = cfg.sinusoidal_scale * sinusoidal_embedding(torch.arange(cfg.max_seq_len, device=dev),
                                                                         cfg.d_model)
        if self.alibi_slopes is not None:
            self.alibi_slopes = alibi_slopes(cfg.n_heads).to(dev)
        if self.inv_freq is None:
            return
        if cfg.rope_scaling == "none":
            self.inv_freq = rope_frequencies(cfg.d_head, cfg.rope_theta).to(dev)
        else:
            inv_freq, self.rope_mscale = scaled_rope_frequencies(
                cfg.d_head, cfg.rope_theta, scaling=cfg.rope_scaling, scale=cfg.rope_scale,
                original_max_seq_len=cfg.rope_original_max_seq_len, yarn_alpha=cfg.yarn_alpha,
                yarn_beta=cfg.yarn_beta)
            self.inv_freq = inv_freq.to(dev)
        self.rope_cos, self.rope_sin = self.rope_tables(torch.arange(cfg.max_seq_len, device=dev))

    def rope_tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions ``pos`` (T,) or (B, T), each ``pos.shape + (d_head,)``, with YaRN's
        ``rope_mscale`` folded in (it scales q and k, so the logits by its square)."""
        cos, sin = rope_cos_sin(pos, self.inv_freq)
        if self.rope_mscale != 1.0:
            cos, sin = cos * self.rope_mscale, sin * self.rope_mscale
        return cos, sin

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
            pos: explicit positions (T,) or (B, T) for RoPE, learned or sinusoidal embeddings, e.g.
                per-sequence positions of a left-padded batch; default ``start + arange(T)``. ALiBi reads
                column distances ``(start + i) - j`` instead, which equal position distances whenever each
                row's positions are its columns shifted by a constant (left padding); ``"none"`` ignores it.
            attn_mask: boolean (B, 1, T, start + T) mask, True = attend; replaces the causal mask (ALiBi
                adds its bias where it is True).
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
        elif self.inv_freq is not None:
            if pos is None and start + T <= max_len:  # the common case: slice the precomputed tables
                rope = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, d_head) each
            else:  # per-sequence positions, or past max_seq_len (RoPE extrapolates)
                if pos is None:
                    pos = torch.arange(start, start + T, device=idx.device)
                rope = self.rope_tables(pos)  # (T, d_head) or (B, T, d_head)
        elif self.pos_table is not None:
            if pos is None and start + T <= max_len:
                x = x + self.pos_table[start:start + T]  # (T, D), broadcast over B
            else:  # per-sequence positions, or past max_seq_len
                if pos is None:
                    pos = torch.arange(start, start + T, device=idx.device)
                x = x + (self.config.sinusoidal_scale * sinusoidal_embedding(pos, self.config.d_model)).to(x.dtype)
        elif self.alibi_slopes is not None:  # one (1 or B, H, T, S) bias, shared by every layer
            q_col = torch.arange(start, start + T, device=idx.device)  # (T,)
            k_col = torch.arange(start + T if cache is not None else T, device=idx.device)  # (S,) cache columns
            if cache is None:
                k_col = k_col + start
            attn_mask = alibi_bias(self.alibi_slopes, q_col, k_col, attn_mask=attn_mask, dtype=x.dtype)
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
