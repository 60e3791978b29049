"""Span corruption (T5 pretraining): reconstruct the spans dropped from a window.

Raffel et al. 2020, section 3.1.4 and the ``random_spans_noise_mask`` of the T5 code: in a window of
L tokens, ``n_noise = round(L * noise_density)`` tokens (the paper's 15%) form
``n_spans = round(n_noise / mean_span_length)`` spans (mean length 3). Both counts depend on L only;
the span lengths and placement are random: the noise tokens and the kept tokens are each split into
``n_spans`` segments of random positive length (uniform over the compositions), interleaved kept
first, so a window always starts with kept text and ends with a noise span. Each noise span is
replaced by one sentinel in the encoder input; the target lists, per span, its sentinel and its
tokens, then a closing sentinel (the paper's Figure 2)::

    window   a b c d e f g h i j          (noise: c d, h i j)
    src      a b <0> e f g <1>            (L - n_noise + n_spans tokens)
    target   <0> c d <1> h i j <2>        (n_noise + n_spans + 1 tokens)
    tgt_in   <s> <0> c d <1> h i j        (target shifted right, starting with the start id)

With fixed-length windows every batch has the same source and target lengths, so nothing is padded.

Ids: the tokenizer's ``0 .. V_tok - 1``, then the decoder start id ``V_tok`` (T5's pad, which starts its
decoder; no padding ever occurs here), then ``N_SENTINELS = 64`` sentinels ``V_tok + 1 + i`` in the order
they appear (T5's ``<extra_id_i>`` count down from the top of its vocabulary; ours count up). A
tokenizer with T5's own ``<pad>`` and ``<extra_id_0>`` .. ``<extra_id_63>`` (an imported T5) keeps those
ids and nothing is appended. 64 allow
63 spans plus the closing sentinel: windows of up to ~1,260 tokens at the default density and span
length; :meth:`SpanCorruption.check_model` refuses longer ones. The model's ``vocab_size`` is
``V_tok + 65``.

Batches are random windows of ``train.seq_len`` tokens (default ``model.max_seq_len``) of the training
shard; offsets and spans come from one seeded, checkpointed ``torch.Generator``. Units: ``loss`` is the
mean cross-entropy per target token (sentinels included, as in T5), in nats; ``count`` is B x L window
tokens (text consumed, comparable with the other language-model tasks). Models follow
``forward(src (B, S), tgt_in (B, T)) -> logits (B, T, vocab_size)`` (``t5``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from weightsmith.errors import ConfigError
from weightsmith.tasks import register_task
from weightsmith.tasks.causal_lm import TextTask
from weightsmith.tasks.masked_lm import CorruptedWindows, eval_windows

N_SENTINELS = 64


class SpanBatch(NamedTuple):
    src: torch.Tensor  # (B, S) int64, encoder input: kept tokens and one sentinel per noise span
    tgt_in: torch.Tensor  # (B, T) int64, decoder input: start id + tgt_out[:, :-1]
    tgt_out: torch.Tensor  # (B, T) int64, target: sentinel + span tokens per span, closing sentinel


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of ``length`` tokens, as T5 computes them:
    ``round(length * density)`` clamped to ``[1, length - 1]``, and ``round(n_noise / mean_span_length)``
    clamped to ``[1, min(n_noise, length - n_noise)]`` (every span and every gap at least one token)."""
    if length < 2:
        raise ConfigError(f"span corruption needs windows of at least 2 tokens, got {length}")
    n_noise = min(max(int(length * noise_density + 0.5), 1), length - 1)
    n_spans = min(max(int(n_noise / mean_span_length + 0.5), 1), n_noise, length - n_noise)
    return n_noise, n_spans


def random_segmentation(n_items: int, n_segments: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, n_segments) int64 positive lengths summing to ``n_items`` per row, uniform over compositions:
    ``n_segments - 1`` distinct cut points among the ``n_items - 1`` gaps."""
    order = torch.rand(batch_size, n_items - 1, generator=generator).argsort(dim=1)
    cuts = (order[:, :n_segments - 1] + 1).sort(dim=1).values  # (B, n_segments - 1) in [1, n_items - 1]
    zero = torch.zeros(batch_size, 1, dtype=torch.long)
    return torch.cat([zero, cuts, zero + n_items], dim=1).diff(dim=1)


def corrupt_spans(tokens: torch.Tensor, *, sentinel_base: int | None = None, start_id: int,
                  noise_density: float = 0.15, mean_span_length: float = 3.0, generator: torch.Generator,
                  sentinel_ids: torch.Tensor | None = None) -> SpanBatch:
    """T5's span corruption of a batch of windows ``tokens`` (B, L) int64 (CPU); sentinel i is
    ``sentinel_base + i``, or ``sentinel_ids[i]`` when that (N,) int64 table is given instead (an imported
    T5's ``<extra_id_i>``). Shapes: src (B, L - n_noise + n_spans), tgt (B, n_noise + n_spans + 1)."""
    if sentinel_ids is None:
        if sentinel_base is None:
            raise ValueError("corrupt_spans needs sentinel_base or sentinel_ids")
        sentinel_ids = sentinel_base + torch.arange(N_SENTINELS)
    B, L = tokens.shape
    n_noise, n_spans = span_counts(L, noise_density, mean_span_length)
    noise_len = random_segmentation(n_noise, n_spans, B, generator)  # (B, k)
    kept_len = random_segmentation(L - n_noise, n_spans, B, generator)  # (B, k)
    seg_len = torch.stack([kept_len, noise_len], dim=2).reshape(B, 2 * n_spans)  # kept_0, noise_0, kept_1, ...
    seg_end = seg_len.cumsum(dim=1)  # (B, 2k) exclusive ends
    pos = torch.arange(L).expand(B, L)
    seg = torch.searchsorted(seg_end, pos.contiguous(), right=True)  # (B, L) segment of each position
    noise = seg % 2 == 1
    span = seg // 2  # which (kept, noise) pair a position belongs to
    first = pos == (seg_end - seg_len).gather(1, seg)  # first position of its segment
    sentinel = sentinel_ids[span]
    src = torch.where(noise & first, sentinel, tokens)[~noise | first].view(B, L - n_noise + n_spans)
    tgt = torch.where(~noise & first, sentinel, tokens)[noise | first].view(B, n_noise + n_spans)
    tgt_out = torch.cat([tgt, torch.full((B, 1), int(sentinel_ids[n_spans]))], dim=1)
    tgt_in = torch.cat([torch.full((B, 1), start_id), tgt_out[:, :-1]], dim=1)
    return SpanBatch(src, tgt_in, tgt_out)


def reconstruct(src: torch.Tensor, tgt_out: torch.Tensor, sentinel_base: int | None = None,
                sentinel_ids: torch.Tensor | None = None) -> list[int]:
    """The original window from one example's encoder input (S,) and target (T,): every sentinel of
    ``src`` (an id >= ``sentinel_base``, or one of ``sentinel_ids``) replaced by the tokens after the same
    sentinel in ``tgt_out``. The inverse of :func:`corrupt_spans`, for tests and for reading a model's output."""
    sentinels = set(sentinel_ids.tolist()) if sentinel_ids is not None else None

    def is_sentinel(t: int) -> bool:
        return t in sentinels if sentinels is not None else t >= sentinel_base

    spans: dict[int, list[int]] = {}
    current = None
    for t in tgt_out.tolist():
        if is_sentinel(t):
            current = t
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    out: list[int] = []
    for t in src.tolist():
        out.extend(spans[t] if is_sentinel(t) else [t])
    return out


@dataclass(kw_only=True)
class SpanCorruptionConfig:
    """``[task]`` of ``span-corruption``.

    noise_density: fraction of the tokens of each window dropped into spans (Raffel et al.: 0.15).
    mean_span_length: mean tokens per dropped span (3); the span count is round(noise tokens / this).
    eval_seed: seed of the fixed corruption every evaluation uses, so numbers compare across steps and runs.
    """

    noise_density: float = 0.15
    mean_span_length: float = 3.0
    eval_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"task.noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise ConfigError(f"task.mean_span_length must be >= 1, got {self.mean_span_length}")


@register_task("span-corruption")
class SpanCorruption(TextTask):
    """T5's denoising objective on the text data stage."""

    config_cls = SpanCorruptionConfig

    @classmethod
    def n_special(cls) -> int:
        return 1 + N_SENTINELS  # decoder start, then the sentinels

    @functools.cached_property
    def _own_ids(self) -> tuple[int, torch.Tensor] | None:
        """An imported T5 tokenizer's own (decoder start ``<pad>``, sentinels ``<extra_id_0..63>``), or None;
        looked up once (the tokenizer is fixed after setup), not per batch."""
        start = self.own_token_id("<pad>")
        sentinels = [self.own_token_id(f"<extra_id_{i}>") for i in range(N_SENTINELS)]
        if start is None or None in sentinels:
            return None
        return start, torch.tensor(sentinels)

    def n_appended(self) -> int:
        return 0 if self._own_ids is not None else self.n_special()

    @property
    def start_id(self) -> int:
        own = self._own_ids
        return self.tokenizer.vocab_size if own is None else own[0]

    @property
    def sentinel_ids(self) -> torch.Tensor:
        """(N_SENTINELS,) int64: sentinel i's id, appended (``V_tok + 1 + i``) or the tokenizer's own."""
        own = self._own_ids
        return self.tokenizer.vocab_size + 1 + torch.arange(N_SENTINELS) if own is None else own[1]

    def check_model(self, model_cfg: Any) -> None:
        super().check_model(model_cfg)
        _, n_spans = span_counts(self._seq_len, self.cfg.noise_density, self.cfg.mean_span_length)
        if n_spans + 1 > N_SENTINELS:
            raise ConfigError(f"train.seq_len={self._seq_len} makes {n_spans} noise spans per window, but there are "
                              f"{N_SENTINELS} sentinels for at most {N_SENTINELS - 1}; lower train.seq_len or "
                              f"raise task.mean_span_length")

    def _corrupt(self, rows: torch.Tensor, generator: torch.Generator) -> SpanBatch:
        return corrupt_spans(rows, sentinel_ids=self.sentinel_ids, start_id=self.start_id,
                             noise_density=self.cfg.noise_density, mean_span_length=self.cfg.mean_span_length,
                             generator=generator)

    def batches(self, device: str) -> CorruptedWindows:
        tc = self.train_cfg
        return CorruptedWindows(self.data.train, tc.batch_size, self._seq_len, tc.seed, device, self._corrupt)

    def loss(self, model, batch):
        """Mean cross-entropy (nats) per target token; ``denoise_acc``: top-1 accuracy over them."""
        logits = model(batch.src, batch.tgt_in).float()  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tgt_out.reshape(-1))
        acc = (logits.argmax(-1) == batch.tgt_out).float().mean()
        return loss, {"denoise_acc": float(acc)}

    def count(self, batch) -> int:
        return batch.src.shape[0] * self._seq_len

    def flops_per_unit(self, family: str, model_cfg: Any) -> float:
        """Training FLOPs per window token: the encoder over S source tokens and the decoder over T
        target tokens, divided by the L window tokens."""
        from weightsmith.analysis import forward_flops

        L = self._seq_len
        n_noise, n_spans = span_counts(L, self.cfg.noise_density, self.cfg.mean_span_length)
        S, T = L - n_noise + n_spans, n_noise + n_spans + 1
        return 3.0 * forward_flops(family, model_cfg, T, src_len=S)["total"] * T / L

    @torch.no_grad()
    def _denoise_eval(self, model, max_tokens: int | None, device: str, autocast_dtype) -> dict[str, float]:
        """Sums over the validation windows, corrupted with ``eval_seed``."""
        generator = torch.Generator().manual_seed(self.cfg.eval_seed)
        was_training = model.training
        model.eval()
        s = dict.fromkeys(("nats", "correct", "targets", "span_correct", "span_tokens", "tokens"), 0.0)
        for rows in eval_windows(self.data.val, self._seq_len, self.train_cfg.eval_batch_size, max_tokens):
            batch = self._corrupt(rows, generator)
            with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = model(batch.src.to(device), batch.tgt_in.to(device))
            logits, tgt = logits.float().cpu(), batch.tgt_out
            s["nats"] += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
            hit = logits.argmax(-1) == tgt
            text = ~torch.isin(tgt, self.sentinel_ids)  # the dropped text itself, without the sentinels
            s["correct"] += float(hit.sum())
            s["targets"] += tgt.numel()
            s["span_correct"] += float((hit & text).sum())
            s["span_tokens"] += float(text.sum())
            s["tokens"] += rows.numel()
        model.train(was_training)
        return s

    def evaluate(self, model, *, device, autocast_dtype):
        s = self._denoise_eval(model, self.train_cfg.eval_tokens, device, autocast_dtype)
        return {"val_loss_partial": s["nats"] / s["targets"], "val_denoise_acc_partial": s["correct"] / s["targets"],
                "val_tokens": int(s["tokens"])}

    def describe_eval(self, result):
        return (f"denoise val_loss (first {result['val_tokens']:,} val tokens) {result['val_loss_partial']:.4f}, "
                f"acc {result['val_denoise_acc_partial']:.3f}")

    def finish(self, model, run_dir, *, device, autocast_dtype, log=print):
        """Denoising loss and accuracy over the whole validation split (corrupted with ``eval_seed``)
        -> eval.json. ``span_acc`` counts only the dropped text tokens, not the sentinels."""
        from weightsmith.fsio import atomic_write_text

        s = self._denoise_eval(model, None, device, autocast_dtype)
        n = s["targets"]
        result = {"denoise_loss": s["nats"] / n, "denoise_ppl": math.exp(s["nats"] / n),
                  "denoise_acc": s["correct"] / n, "span_acc": s["span_correct"] / max(s["span_tokens"], 1),
                  "target_tokens": int(n), "val_tokens": int(s["tokens"]), "noise_density": self.cfg.noise_density,
                  "mean_span_length": self.cfg.mean_span_length, "seq_len": self._seq_len,
                  "eval_seed": self.cfg.eval_seed}
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
        log("eval: " + json.dumps(result))
        return result

    def headline(self, summary):
        return (f"denoise_loss {summary['denoise_loss']:.3f}, denoise_acc {summary['denoise_acc']:.3f} "
                f"(span tokens {summary['span_acc']:.3f})")

    @classmethod
    def example_batch(cls, model_cfg, batch_size, generator):
        L = min(model_cfg.max_seq_len, 16)
        n_real = model_cfg.vocab_size - cls.n_special()
        tokens = torch.randint(n_real, (batch_size, L), generator=generator)
        return corrupt_spans(tokens, sentinel_base=n_real + 1, start_id=n_real, generator=generator)

    @classmethod
    def for_contract_tests(cls):
        task = super().for_contract_tests()
        task._seq_len = 16
        return task
