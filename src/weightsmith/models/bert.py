"""Encoder-only transformer (BERT).

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding". Bidirectional self-attention, post-LN blocks (``LayerNorm(x + sublayer(x))``, as in
Vaswani et al. 2017), exact erf GELU, learned absolute positions, token-type (segment) embeddings and a
pooler ``tanh(W h_[CLS] + b)``. The paper's H is our d_model, L our n_layers, A our n_heads; its
"intermediate size" 4H is our d_ff. The encoder (family ``bert``) is a backbone with no objective of its
own; :class:`BertForMaskedLM` (family ``bert-mlm``) adds the masked-LM head of section 3.1 and is what
``weightsmith train`` pretrains (task ``masked-lm``, weightsmith.tasks.masked_lm). The NSP head is not built.

Data flow, B batch, T sequence, D = d_model::

    idx (B, T) -> tok_emb + pos_emb + type_emb -> LayerNorm -> (B, T, D)
      -> n_layers x [ x = norm(x + attn(x)) ; x = norm(x + mlp(x)) ]     (no causal mask)
      -> hidden (B, T, D);  pooled = tanh(pooler(hidden[:, 0]))  (B, D)

    bert-mlm: hidden -> dense (D -> D) -> GELU -> LayerNorm -> decoder (D -> V, weight tied to tok_emb,
              own bias) -> logits (B, T, V)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.models.layers.attention import Attention
from weightsmith.models.layers.mlp import GeluMLP
from weightsmith.registry import register_family, register_preset


@dataclass(kw_only=True)
class BertConfig:
    """Encoder-only config. ``d_head`` is derived; ``d_ff=None`` means ``4 * d_model``.

    ``pos="none"`` drops the learned positions, ``n_token_types=0`` the token-type embeddings,
    ``pooler=False`` the pooler. ``gelu="tanh"`` switches to the tanh approximation.
    """

    vocab_size: int = 30522
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int | None = None
    max_seq_len: int = 512
    pos: Literal["learned", "none"] = "learned"
    n_token_types: int = 2
    pooler: bool = True
    gelu: Literal["erf", "tanh"] = "erf"
    dropout: float = 0.0
    bias: bool = True
    norm_eps: float = 1e-12
    init_std: float = 0.02
    d_head: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"))
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if self.n_token_types < 0:
            raise ConfigError(f"model.n_token_types must be >= 0 (0 = none), got {self.n_token_types}")
        self.d_head = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.d_ff <= 0:
            raise ConfigError(f"model.d_ff must be positive, got {self.d_ff}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


class BertLayer(nn.Module):
    """Post-LN encoder block, (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, bias=cfg.bias, dropout=cfg.dropout,
                              causal=False)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = GeluMLP(cfg.d_model, cfg.d_ff, cfg.bias, cfg.dropout,
                           approximate="none" if cfg.gelu == "erf" else "tanh")
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, attn_mask=attn_mask))
        return self.mlp_norm(x + self.mlp(x))


class Bert(nn.Module):
    """Bidirectional encoder: token ids (B, T) -> hidden states (B, T, d_model) and pooled (B, d_model)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.type_emb = nn.Embedding(cfg.n_token_types, cfg.d_model) if cfg.n_token_types else None
        self.emb_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layers))
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias) if cfg.pooler else None
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT initialization: weights ~ N(0, init_std), biases 0, LayerNorm gains 1."""
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, 0.0, self.config.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def forward(self, idx: torch.Tensor, *, token_types: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode a batch.

        Args:
            idx: token ids (B, T), int64.
            token_types: segment ids (B, T) in ``[0, n_token_types)``; default all 0.
            padding_mask: boolean (B, T), True for real tokens, False for padding (keys never attended).

        Returns:
            ``(hidden, pooled)``: hidden states (B, T, d_model) after the last block, and
            ``tanh(pooler(hidden[:, 0]))`` (B, d_model), or None without a pooler.

        Raises:
            ValueError: if T exceeds ``max_seq_len`` with learned positions.
        """
        B, T = idx.shape
        x = self.tok_emb(idx)  # (B, T, D)
        if self.pos_emb is not None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} > max_seq_len={self.config.max_seq_len}")
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        if self.type_emb is not None:
            types = token_types if token_types is not None else torch.zeros_like(idx)
            x = x + self.type_emb(types)
        x = self.drop(self.emb_norm(x))
        mask = None if padding_mask is None else padding_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, D)
        return x, pooled


@dataclass(kw_only=True)
class BertMLMConfig(BertConfig):
    """:class:`BertConfig` of the masked-LM pretraining model, the same fields with ``pooler=False`` by
    default: the MLM loss never reads the pooler (Hugging Face's ``BertForMaskedLM`` builds none either),
    so a pooler would be a parameter without a gradient. ``pooler=True`` keeps one for later fine-tuning."""

    pooler: bool = False


class MLMHead(nn.Module):
    """BERT's masked-LM head: hidden (B, T, D) -> logits (B, T, V).

    ``decoder(LayerNorm(gelu(dense(h))))``; the decoder's weight is the encoder's token embedding (tied,
    as in Devlin et al. and every released BERT), its bias is the head's own.
    """

    def __init__(self, cfg: BertConfig, tok_emb: nn.Embedding) -> None:
        super().__init__()
        self.approximate = "none" if cfg.gelu == "erf" else "tanh"
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.bias)
        self.decoder.weight = tok_emb.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(hidden), approximate=self.approximate))  # (B, T, D)
        return self.decoder(x)  # (B, T, V)


class BertForMaskedLM(nn.Module):
    """The BERT encoder plus the masked-LM head: token ids (B, T) -> logits (B, T, vocab_size).

    State-dict keys are the encoder's under ``encoder.`` and the head's under ``mlm_head.``
    (``mlm_head.decoder.weight`` is ``encoder.tok_emb.weight``).
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Bert(cfg)
        self.mlm_head = MLMHead(cfg, self.encoder.tok_emb)
        if self.encoder.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The encoder's BERT initialization, and the same for the head: dense ~ N(0, init_std), biases
        0, LayerNorm gains 1 (the tied decoder weight is the embedding, initialized once)."""
        self.encoder.reset_parameters()
        nn.init.normal_(self.mlm_head.dense.weight, 0.0, self.config.init_std)
        for name, p in self.mlm_head.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.ones_(self.mlm_head.norm.weight)

    def tie_weights(self) -> None:
        """Make the decoder weight the token embedding again (after ``load_state_dict(assign=True)``)."""
        self.mlm_head.decoder.weight = self.encoder.tok_emb.weight

    def forward(self, idx: torch.Tensor, *, token_types: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) of every position of ``idx`` (B, T) int64.

        ``token_types`` and ``padding_mask`` (B, T) are :meth:`Bert.forward`'s. The loss over the masked
        positions belongs to the task (weightsmith.tasks.masked_lm), not here.
        """
        hidden, _ = self.encoder(idx, token_types=token_types, padding_mask=padding_mask)  # (B, T, D)
        return self.mlm_head(hidden)


register_family("bert", BertConfig, task=None)(Bert)  # backbone; pretrained as bert-mlm

register_preset("bert-base", "bert", doc="BERT-base uncased (110M with pooler), Devlin et al. 2019",
                vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=512,
                n_token_types=2, pooler=True)
register_preset("bert-large", "bert", doc="BERT-large uncased (335M with pooler)",
                vocab_size=30522, d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_seq_len=512)
register_preset("bert-tiny", "bert", doc="a 2x128 encoder for smoke tests",
                vocab_size=256, d_model=128, n_layers=2, n_heads=2, max_seq_len=128)

register_family("bert-mlm", BertMLMConfig, task="masked-lm")(BertForMaskedLM)

register_preset("bert-mlm-base", "bert-mlm", doc="BERT-base uncased with the MLM head (HF BertForMaskedLM, "
                "109,514,298 parameters)", vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                max_seq_len=512, n_token_types=2)
register_preset("bert-mlm-small", "bert-mlm", doc="a 4x128 masked LM for the Shakespeare BPE data (1024 + [MASK])",
                vocab_size=1025, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=128, n_token_types=0)
