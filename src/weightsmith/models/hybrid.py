"""Hybrid attention / Mamba-2 language model, Jamba-style.

Source: Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model" (interleaved attention
and Mamba layers, each followed by an MLP or a mixture of experts; the paper's attention-to-Mamba ratio
a:m = 1:7 is our ``attn_every = 8``). The Mamba layers here are Mamba-2 (Dao & Gu 2024,
:mod:`weightsmith.models.mamba2`, reused as is); attention is RoPE grouped-query attention with a KV
cache (:mod:`weightsmith.models.layers.attention`), the MLP SwiGLU or the top-k MoE of
:mod:`weightsmith.models.layers.moe`.

Layer i is attention if ``i % attn_every == attn_every - 1`` (the last layer of every group of
``attn_every``), else Mamba-2. With n_layers = 8, attn_every = 4, shape legend B batch, T sequence,
D = d_model::

    idx (B, T) -> tok_emb (B, T, D)
      -> [M M M A] [M M M A]     each layer: x + mixer(norm(x)) ; x + mlp(norm(x))
      -> final norm -> lm_head -> logits (B, T, V)

No positional embedding: RoPE in the attention layers only (Jamba has none at all: the Mamba layers
carry position; we keep RoPE so the attention layers are plain GPT attention).

Inference cache: one entry per layer, a :class:`~weightsmith.models.layers.attention.KVCache` for an
attention layer, a :class:`~weightsmith.models.mamba2.Mamba2State` for a Mamba-2 layer. The attention
layers' positions stop at the cache length, so the model is *not* ``recurrent``: generation slides a
window past ``max_seq_len`` as for the GPT (ship/generate.py), and the Mamba states are rebuilt from the
window by the cache-free forward. Left-padded batches (ship/batch.py) work: the Mamba-2 layers zero the
pad positions out of their state (``attn_mask`` tells them which). Speculative decoding does not: it
rolls rejected drafts back by rewriting KV-cache positions, and an SSM state cannot be rewound, so a
cached forward whose ``start`` is not the number of tokens already fed raises ValueError.

Initialization follows the GPT: weights ~ N(0, init_std), the projections writing into the residual
stream (attention ``o_proj``, Mamba ``out_proj``, MLP ``down``) N(0, init_std / sqrt(2 n_layers)); the
SSM parameters as in :mod:`weightsmith.models.mamba2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.models.layers.attention import Attention, KVCache
from weightsmith.models.layers.mlp import SwiGLU
from weightsmith.models.layers.moe import MoE
from weightsmith.models.layers.norms import RMSNorm
from weightsmith.models.layers.rope import rope_cos_sin, rope_frequencies
from weightsmith.models.mamba2 import Mamba2Mixer, Mamba2State
from weightsmith.registry import register_family, register_preset


def _doc(default, text: str):
    return field(default=default, metadata={"doc": text})


@dataclass(kw_only=True)
class HybridConfig:
    """Attention / Mamba-2 hybrid config (Jamba-style). ``d_head = d_model / n_heads``, the attention head width."""

    vocab_size: int = _doc(256, "number of token ids; a recipe that leaves it out takes the tokenizer's")
    d_model: int = _doc(128, "width of the residual stream")
    n_layers: int = _doc(4, "number of blocks (attention or Mamba-2 mixer, each with an MLP)")
    attn_every: int = _doc(4, "layer i is attention if i % attn_every == attn_every - 1, else Mamba-2 "
                              "(Jamba's 1:7 is 8; 1: all attention)")
    n_heads: int = _doc(4, "attention query heads")
    n_kv_heads: int | None = _doc(None, "attention key/value heads (grouped-query); None means n_heads")
    d_ff: int | None = _doc(None, "SwiGLU hidden width (of each expert); None means 8/3 d_model rounded up to 64")
    n_experts: int = _doc(0, "experts per MoE layer replacing every MLP; 0 keeps the dense SwiGLU")
    n_experts_per_token: int = _doc(2, "experts each token is routed to (top-k)")
    d_state: int = _doc(64, "SSM state size N per head of the Mamba-2 layers")
    d_conv: int = _doc(4, "kernel size of the Mamba-2 causal depthwise convolution")
    expand: int = _doc(2, "Mamba-2 inner width d_inner = expand * d_model")
    ssm_d_head: int = _doc(64, "Mamba-2 head dimension P (d_head is the attention head's)")
    n_groups: int = _doc(1, "Mamba-2 groups of heads sharing B and C")
    chunk_size: int = _doc(64, "Mamba-2 SSD chunk length")
    max_seq_len: int = _doc(256, "the attention context: training window, KV cache and generation window")
    rope_theta: float = _doc(10000.0, "RoPE base of the attention layers")
    norm_eps: float = _doc(1e-5, "epsilon of every RMSNorm")
    tie_embeddings: bool = _doc(True, "the lm_head shares the token embedding's weight")
    bias: bool = _doc(False, "biases on every linear layer (attention, Mamba projections, MLP)")
    conv_bias: bool = _doc(True, "bias on the Mamba-2 depthwise convolution")
    init_std: float = _doc(0.02, "standard deviation of the weights (see the module docstring)")
    d_head: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "d_model", "n_layers", "attn_every", "n_heads", "d_state", "d_conv",
                                "expand", "ssm_d_head", "n_groups", "chunk_size", "max_seq_len"))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}")
        self.d_head = self.d_model // self.n_heads
        if self.d_head % 2:
            raise ConfigError(f"model.d_head={self.d_head} must be even for RoPE")
        d_inner = self.expand * self.d_model
        if d_inner % self.ssm_d_head or (d_inner // self.ssm_d_head) % self.n_groups:
            raise ConfigError(f"model.ssm_d_head={self.ssm_d_head} must divide expand * d_model = {d_inner} into "
                              f"a number of heads divisible by model.n_groups={self.n_groups}")
        if self.d_ff is None:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.n_experts < 0:
            raise ConfigError(f"model.n_experts must be >= 0 (0 = dense MLP), got {self.n_experts}")
        if self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts:
            raise ConfigError(f"model.n_experts_per_token={self.n_experts_per_token} must be in "
                              f"[1, n_experts={self.n_experts}]")

    def is_attention(self, i: int) -> bool:
        """Whether layer ``i`` is an attention layer (else Mamba-2)."""
        return i % self.attn_every == self.attn_every - 1


class HybridBlock(nn.Module):
    """``x + mixer(norm(x)); x + mlp(mlp_norm(x))`` with an attention or Mamba-2 mixer, (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: HybridConfig, attention: bool) -> None:
        super().__init__()
        self.attention = attention
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if attention:
            self.mixer = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, bias=cfg.bias, dropout=0.0)
        else:
            self.mixer = Mamba2Mixer(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                                     d_head=cfg.ssm_d_head, n_groups=cfg.n_groups, chunk_size=cfg.chunk_size,
                                     norm_eps=cfg.norm_eps, bias=cfg.bias, conv_bias=cfg.conv_bias)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.n_experts:
            self.mlp = MoE(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.n_experts_per_token, bias=cfg.bias)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, cfg.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], *,
                cache: KVCache | Mamba2State | None = None, start: int = 0, attn_mask: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        if self.attention:
            x = x + self.mixer(h, rope, cache=cache, start=start, attn_mask=attn_mask)
        else:
            x = x + self.mixer(h, cache, token_mask)
        return x + self.mlp(self.mlp_norm(x))


class HybridCache(list):
    """One entry per layer: a :class:`KVCache` (attention) or a :class:`Mamba2State` (Mamba-2).
    ``n_tokens`` counts the tokens the Mamba-2 states have read: a KV cache can be rewound by writing
    from an earlier ``start``, an SSM state cannot."""

    n_tokens: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self for t in c.buffers())


class HybridLM(nn.Module):
    """Hybrid language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    recurrent = False  # the attention layers see at most max_seq_len positions: generation slides a window

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(HybridBlock(cfg, cfg.is_attention(i)) for i in range(cfg.n_layers))
        self.all_attention = all(b.attention for b in self.blocks)  # then a cache can be rewound
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        dev = self.tok_emb.weight.device  # derived, not saved: RoPE's inverse frequencies and cos/sin tables
        self.register_buffer("inv_freq", torch.empty(cfg.d_head // 2, device=dev), persistent=False)
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.d_head, device=dev), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.d_head, device=dev), persistent=False)
        if dev.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialization of the module docstring."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm gains and biases; the SSM's own vectors are set below
                (nn.init.zeros_ if name.endswith("bias") else nn.init.ones_)(p)
            elif name.endswith(("o_proj.weight", "out_proj.weight", "down.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            elif not name.endswith("conv1d.weight"):
                nn.init.normal_(p, 0.0, std)
        for block in self.blocks:
            if not block.attention:
                block.mixer.reset_ssm_parameters()
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute RoPE's ``inv_freq`` and the (max_seq_len, d_head) cos/sin tables; call after
        materializing from meta."""
        cfg = self.config
        dev = self.tok_emb.weight.device
        self.inv_freq = rope_frequencies(cfg.d_head, cfg.rope_theta).to(dev)
        self.rope_cos, self.rope_sin = rope_cos_sin(torch.arange(cfg.max_seq_len, device=dev), self.inv_freq)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> HybridCache:
        """Per layer a :class:`KVCache` (B, n_kv_heads, max_len, d_head) or a zero :class:`Mamba2State`."""
        cfg = self.config
        dev, dtype = self.tok_emb.weight.device, dtype or self.tok_emb.weight.dtype
        return HybridCache(
            KVCache(batch_size, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.d_head, dtype, dev)
            if b.attention else b.mixer.new_state(batch_size, dtype, dev) for b in self.blocks)

    def forward(self, idx: torch.Tensor, *, cache: HybridCache | None = None, start: int = 0,
                pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for every position.

        Args:
            idx: token ids (B, T), int64.
            cache: from :meth:`new_cache`; the attention layers' positions ``[0, start)`` are filled and
                the Mamba-2 states hold the same ``start`` tokens.
            start: absolute position of ``idx[:, 0]`` (RoPE and the KV cache); with a cache it must equal
                the number of tokens already fed (the Mamba-2 states cannot be rewound).
            pos: explicit RoPE positions (T,) or (B, T), e.g. of a left-padded batch; default
                ``start + arange(T)``.
            attn_mask: boolean (B, 1, T, start + T), True = attend, replacing the causal mask (as the GPT's).
                For the Mamba-2 layers a column of this chunk is a real token iff the chunk's last query
                attends to it (true of left padding, ship/batch.py): the others are masked out of the state.
            last_only: return logits for the last position only, (B, 1, V).

        Returns:
            logits (B, T, vocab_size), float.

        Raises:
            ValueError: with a cache, if ``start`` differs from the tokens its Mamba-2 states have read
                (e.g. speculative decoding's rollback of rejected drafts).
        """
        T = idx.shape[1]
        if cache is not None and not self.all_attention:
            if start != cache.n_tokens:
                raise ValueError(f"the Mamba-2 states have read {cache.n_tokens} tokens, asked to continue at "
                                 f"start={start}: an SSM state cannot be rewound (no speculative decoding)")
            cache.n_tokens = start + T
        x = self.tok_emb(idx)  # (B, T, D)
        if pos is None and start + T <= self.config.max_seq_len:  # slice the precomputed tables
            rope = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, d_head) each
        else:  # per-sequence positions, or past max_seq_len (RoPE extrapolates)
            if pos is None:
                pos = torch.arange(start, start + T, device=idx.device)
            rope = rope_cos_sin(pos, self.inv_freq)  # (T, d_head) or (B, T, d_head)
        token_mask = None if attn_mask is None else attn_mask[:, 0, -1, -T:]  # (B, T), True = real token
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache=None if cache is None else cache[i], start=start, attn_mask=attn_mask,
                      token_mask=token_mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_norm(x))  # (B, T, V)


register_family("hybrid", HybridConfig)(HybridLM)

register_preset("hybrid-tiny", "hybrid", doc="a 4-layer M M M A hybrid (d_model 64) for smoke tests",
                vocab_size=256, d_model=64, n_layers=4, attn_every=4, n_heads=4, n_kv_heads=2, d_state=16,
                ssm_d_head=32, chunk_size=16, max_seq_len=128)
register_preset("hybrid-shakespeare", "hybrid",
                doc="M A M A hybrid sized to the main-job GPT (recipes/shakespeare-hybrid.toml)",
                vocab_size=1024, d_model=128, n_layers=4, attn_every=2, n_heads=4, n_kv_heads=2, d_ff=320,
                d_state=16, ssm_d_head=64, chunk_size=64, max_seq_len=128)
