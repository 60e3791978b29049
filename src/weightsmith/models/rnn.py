"""Recurrent language models: a stacked LSTM or GRU between a token embedding and a tied softmax.

Sources:
- Hochreiter & Schmidhuber 1997, "Long Short-Term Memory" (with the forget gate of Gers et al. 2000).
- Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder for Statistical Machine
  Translation" (the GRU).
- Zaremba et al. 2014, "Recurrent Neural Network Regularization" (dropout on the non-recurrent
  connections only); Press & Wolf 2017 (tied input and output embeddings).
- The PyTorch ``nn.LSTM`` / ``nn.GRU`` docs for gate order and parameter names: ``weight_ih_l{k}``
  (G D, D), ``weight_hh_l{k}`` (G D, D), ``bias_ih_l{k}``, ``bias_hh_l{k}`` (G D,), with G = 4 gates
  (i, f, g, o) for the LSTM and 3 (r, z, n) for the GRU. The papers' (and PyTorch's) hidden size is our
  ``d_model``; every layer's input is ``d_model`` wide too.

Data flow, shape legend B batch, T sequence, D = d_model, V = vocab_size, L = n_layers::

    idx (B, T) -> tok_emb (B, T, D) -> dropout
      -> nn.LSTM / nn.GRU, L layers, batch_first   (B, T, D)   state h [, c]: (L, B, D) each, in and out
      -> dropout -> final_norm (LayerNorm) -> lm_head (tied to tok_emb) -> logits (B, T, V)

The L layers are one torch module so that one fused kernel runs the whole stack (cuDNN on CUDA, oneDNN
for the LSTM on CPU). The final LayerNorm rescales the bounded hidden state (|h| < 1) before the tied
head, so the logit scale is learned apart from the embedding's.

State instead of a KV cache: :class:`RNNState` holds h (and the LSTM's cell c), ``L * D`` elements each
per sequence whatever the length: ``2 L D`` (LSTM) or ``L D`` (GRU) elements, times the dtype's bytes.
It summarizes every token fed so far, so generation never slides a window (``recurrent = True``, see
weightsmith.ship.generate) and each new token costs the same; ``max_seq_len`` is only the training
window (``train.seq_len`` <= ``max_seq_len``).

Initialization: the token embedding ~ N(0, init_std), with a default of 0.05 rather than the
transformer's 0.02: it is the cells' input, and through the tied head and the final norm the initial
logits have a standard deviation of ``init_std * sqrt(d_model)`` (0.72 at d_model = 208, near-uniform
predictions). The cell weights keep PyTorch's U(-1/sqrt(D), 1/sqrt(D)); every bias starts at zero. A
forget-gate bias of 1 (Jozefowicz et al. 2015) is not used: on the tests' tiny corpus it halved the
loss drop of a 40-step run, and 0.02 instead of 0.05 cost a quarter of it (measured, char level, D = 48).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.registry import register_family, register_preset


def _doc(default, text: str):
    return field(default=default, metadata={"doc": text})


@dataclass(kw_only=True)
class RNNConfig:
    """Recurrent LM config shared by the ``lstm`` and ``gru`` families; the family fixes the cell."""

    cell: ClassVar[str]
    vocab_size: int = _doc(256, "number of token ids; a recipe that leaves it out takes the tokenizer's")
    d_model: int = _doc(128, "embedding width and hidden size of every layer (the papers' hidden size)")
    n_layers: int = _doc(2, "stacked recurrent layers, run as one fused module")
    max_seq_len: int = _doc(256, "the training window only (train.seq_len <= max_seq_len); generation carries "
                                 "the state and is not limited by it")
    tie_embeddings: bool = _doc(True, "the lm_head shares the token embedding's weight (Press & Wolf 2017)")
    dropout: float = _doc(0.0, "on the embedding output, between layers and on the last layer's output, never "
                               "on the recurrent connections (Zaremba et al. 2014)")
    norm_eps: float = _doc(1e-5, "epsilon of the final LayerNorm")
    init_std: float = _doc(0.05, "standard deviation of the token embedding (see the module docstring)")

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "d_model", "n_layers", "max_seq_len"))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be positive, got {self.init_std}")


@dataclass(kw_only=True)
class LSTMConfig(RNNConfig):
    """Stacked-LSTM language model (Hochreiter & Schmidhuber 1997); the state is (h, c) per layer."""

    cell: ClassVar[str] = "lstm"


@dataclass(kw_only=True)
class GRUConfig(RNNConfig):
    """Stacked-GRU language model (Cho et al. 2014); the state is h per layer."""

    cell: ClassVar[str] = "gru"


@dataclass
class RNNState:
    """The recurrent state of B sequences: ``h`` (n_layers, B, d_model) and, for the LSTM, the cell
    state ``c`` of the same shape (None for the GRU). :meth:`RNNLM.forward` replaces them by the state
    after the tokens it read; rows are independent sequences."""

    h: torch.Tensor
    c: torch.Tensor | None = None

    def hx(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The state in the form ``nn.LSTM`` / ``nn.GRU`` take it."""
        return self.h if self.c is None else (self.h, self.c)

    def update(self, hn: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> None:
        if isinstance(hn, tuple):
            self.h, self.c = hn
        else:
            self.h = hn

    def set_rows(self, rows: torch.Tensor, other: RNNState) -> None:
        """Copy ``other``'s sequences into rows ``rows`` (len(rows),) of this state."""
        self.h[:, rows] = other.h
        if self.c is not None:
            self.c[:, rows] = other.c

    @property
    def nbytes(self) -> int:
        """Bytes of the whole state (all B sequences)."""
        return sum(t.numel() * t.element_size() for t in (self.h, self.c) if t is not None)


class RNNLM(nn.Module):
    """Recurrent language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    recurrent = True  # the state summarizes all context: generation never needs a sliding window

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.config = cfg
        D = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.drop = nn.Dropout(cfg.dropout)
        cell = {"lstm": nn.LSTM, "gru": nn.GRU}[cfg.cell]
        self.rnn = cell(D, D, num_layers=cfg.n_layers, batch_first=True,
                        dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)  # between layers only
        self.final_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialization of the module docstring."""
        cfg = self.config
        D = cfg.d_model
        nn.init.normal_(self.tok_emb.weight, 0.0, cfg.init_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(p, -1 / math.sqrt(D), 1 / math.sqrt(D))
            else:
                nn.init.zeros_(p)
        self.final_norm.reset_parameters()

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> RNNState:
        """A zero :class:`RNNState` for ``batch_size`` sequences; ``max_len`` is ignored (the state does
        not grow). The same protocol as the GPT's KV caches, so generation code takes either."""
        cfg = self.config
        w = self.tok_emb.weight
        shape = (cfg.n_layers, batch_size, cfg.d_model)
        h = torch.zeros(shape, dtype=dtype or w.dtype, device=w.device)
        return RNNState(h, torch.zeros_like(h) if cfg.cell == "lstm" else None)

    def forward(self, idx: torch.Tensor, *, cache: RNNState | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Logits for every position.

        Args:
            idx: token ids (B, T), int64.
            cache: an :class:`RNNState` from :meth:`new_cache` holding the tokens fed before ``idx``;
                replaced by the state after ``idx``. None starts from the zero state and keeps nothing.
            start: accepted for the causal-LM protocol and ignored: the state, not a position, carries
                the context (feeding each token once, in order, is the caller's part).
            last_only: return logits for the last position only, (B, 1, V).

        Returns:
            logits (B, T, vocab_size), float.
        """
        x = self.tok_emb(idx)  # (B, T, D)
        if self.drop.p:
            x = self.drop(x)
        y, hn = self.rnn(x, None if cache is None else cache.hx())  # (B, T, D); hn (L, B, D) [x 2]
        if cache is not None:
            cache.update(hn)
        if last_only:
            y = y[:, -1:]
        if self.drop.p:
            y = self.drop(y)
        return self.lm_head(self.final_norm(y))  # (B, T, V)


register_family("lstm", LSTMConfig)(RNNLM)
register_family("gru", GRUConfig)(RNNLM)

# Presets. The *-shakespeare shapes match the main job's GPT (recipes/shakespeare.toml: 918,656
# parameters at vocab_size 1024) within 3%: LSTM 2 x 208 has 908,960, GRU 2 x 240 940,320.
register_preset("lstm-tiny", "lstm", doc="a 2x64 byte-level LSTM for smoke tests",
                vocab_size=256, d_model=64, n_layers=2, max_seq_len=128)
register_preset("gru-tiny", "gru", doc="a 2x64 byte-level GRU for smoke tests",
                vocab_size=256, d_model=64, n_layers=2, max_seq_len=128)
register_preset("lstm-shakespeare", "lstm", doc="2x208 LSTM, the size of the shakespeare GPT (0.91M)",
                vocab_size=1024, d_model=208, n_layers=2, max_seq_len=128)
register_preset("gru-shakespeare", "gru", doc="2x240 GRU, the size of the shakespeare GPT (0.94M)",
                vocab_size=1024, d_model=240, n_layers=2, max_seq_len=128)
