"""Masked language modelling (BERT pretraining): predict selected tokens from a corrupted window.

Devlin et al. 2019, section 3.1 and appendix A.1: 15% of the positions of each window are selected
(the paper's ``masked_lm_prob``; ours ``mask_prob``); a selected token becomes ``[MASK]`` 80% of the
time, a random token 10% and stays itself 10%; the loss is the cross-entropy of the original token at
the selected positions only. As in the reference implementation (``create_pretraining_data.py``) every
window has exactly ``max(1, round(mask_prob * T))`` selected positions, drawn uniformly without
replacement, so a micro-batch's loss always averages the same number of predictions.

Ids: the tokenizer's ``0 .. V_tok - 1``, then ``[MASK] = V_tok`` (``n_special() = 1``); the model's
``vocab_size`` is ``V_tok + 1``. Random replacements are drawn from the real vocabulary ``[0, V_tok)``.
A tokenizer that has a mask token of its own (an imported BERT's ``[MASK]``, RoBERTa's ``<mask>``) keeps
its id and nothing is appended, so an imported checkpoint is evaluated and fine-tuned on its own ids.
There is no [CLS]/[SEP] and no next-sentence prediction: a window is one stretch of the corpus (the
NSP ablation of Liu et al. 2019, RoBERTa, found it unnecessary).

Batches are random windows of ``train.seq_len`` tokens (default ``model.max_seq_len``) from the
training shard. Window offsets *and* masking are drawn from one seeded ``torch.Generator`` whose state
is checkpointed, so a resumed run sees exactly the batches of an uninterrupted one.

Units: ``loss`` is nats per selected token; ``count`` is B x T input tokens; evaluation masks the
validation split with a fixed seed (``eval_seed``), so its numbers are comparable across steps and
runs, and compares with a unigram baseline from the training split's token frequencies. Models follow
``forward(idx: (B, T) int64) -> logits (B, T, vocab_size)`` (``bert-mlm``).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from weightsmith.errors import ConfigError
from weightsmith.tasks import register_task
from weightsmith.tasks.causal_lm import TextTask

IGNORE = -100  # target of an unselected position (F.cross_entropy's default ignore_index)


class MaskedBatch(NamedTuple):
    inputs: torch.Tensor  # (B, T) int64, the corrupted window
    targets: torch.Tensor  # (B, T) int64, the original token at selected positions, IGNORE elsewhere


def n_selected(seq_len: int, mask_prob: float) -> int:
    """Positions selected per window of ``seq_len`` tokens: ``round(mask_prob * seq_len)``, at least 1."""
    return min(seq_len, max(1, int(mask_prob * seq_len + 0.5)))


def mask_tokens(tokens: torch.Tensor, *, mask_id: int, n_real: int, mask_prob: float = 0.15,
                mask_token_prob: float = 0.8, random_token_prob: float = 0.1,
                generator: torch.Generator) -> MaskedBatch:
    """BERT's corruption of a batch of windows ``tokens`` (B, T) int64 (CPU).

    Selects :func:`n_selected` positions per window uniformly without replacement; of those,
    ``mask_token_prob`` become ``mask_id``, ``random_token_prob`` a uniform token of ``[0, n_real)`` and
    the rest keep their token. Draws the same amount of randomness from ``generator`` for every batch
    of the same shape.
    """
    B, T = tokens.shape
    order = torch.rand(B, T, generator=generator).argsort(dim=1)  # a random permutation per window
    selected = torch.zeros(B, T, dtype=torch.bool).scatter_(1, order[:, :n_selected(T, mask_prob)], True)
    u = torch.rand(B, T, generator=generator)
    random_ids = torch.randint(n_real, (B, T), generator=generator)
    inputs = torch.where(selected & (u < mask_token_prob), mask_id, tokens)
    use_random = selected & (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
    inputs = torch.where(use_random, random_ids, inputs)
    return MaskedBatch(inputs, torch.where(selected, tokens, IGNORE))


class CorruptedWindows:
    """Random windows of ``seq_len`` tokens from a shard, corrupted by ``corrupt(rows, generator)``.

    One generator draws both the window offsets and the corruption; its state is the checkpoint."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, device: str,
                 corrupt: Callable[[torch.Tensor, torch.Generator], tuple]) -> None:
        if len(tokens) < seq_len:
            raise ConfigError(f"training split has {len(tokens)} tokens; need at least train.seq_len = {seq_len} "
                              f"(lower train.seq_len or use a bigger corpus)")
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        self.corrupt = corrupt
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple:
        ix = torch.randint(len(self.tokens) - self.seq_len + 1, (self.batch_size,), generator=self.generator)
        rows = np.stack([np.asarray(self.tokens[i:i + self.seq_len], dtype=np.int64) for i in ix.tolist()])
        batch = self.corrupt(torch.from_numpy(rows), self.generator)
        return type(batch)(*(t.to(self.device) for t in batch))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int,
                 max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """Non-overlapping windows covering ``tokens[:max_tokens]`` in order, as (B, T) int64 CPU batches:
    full windows ``batch_size`` at a time, then the shorter tail (at least 2 tokens) on its own."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    n_full = n // seq_len
    for i in range(0, n_full, batch_size):
        rows = [np.asarray(tokens[s * seq_len:(s + 1) * seq_len], dtype=np.int64)
                for s in range(i, min(i + batch_size, n_full))]
        yield torch.from_numpy(np.stack(rows))
    if n - n_full * seq_len >= 2:
        yield torch.from_numpy(np.asarray(tokens[n_full * seq_len:n], dtype=np.int64))[None]


@dataclass(kw_only=True)
class MaskedLMConfig:
    """``[task]`` of ``masked-lm``.

    mask_prob: fraction of the positions of each window selected for prediction (Devlin et al.: 0.15).
    mask_token_prob: fraction of the selected tokens replaced by [MASK] (0.8).
    random_token_prob: fraction of the selected tokens replaced by a random token (0.1); the rest stay.
    eval_seed: seed of the fixed masking every evaluation uses, so numbers compare across steps and runs.
    """

    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    eval_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"task.mask_prob must be in (0, 1), got {self.mask_prob}")
        for name in ("mask_token_prob", "random_token_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"task.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ConfigError(f"task.mask_token_prob + task.random_token_prob = "
                              f"{self.mask_token_prob + self.random_token_prob} must be <= 1")


@register_task("masked-lm")
class MaskedLM(TextTask):
    """BERT's masked-token prediction on the text data stage."""

    config_cls = MaskedLMConfig

    @classmethod
    def n_special(cls) -> int:
        return 1  # [MASK]

    def n_appended(self) -> int:
        return 0 if self._own_mask is not None else 1

    @functools.cached_property
    def _own_mask(self) -> int | None:
        """An imported tokenizer's own mask token: BERT's ``[MASK]`` or RoBERTa's ``<mask>`` (looked up once)."""
        for token in ("[MASK]", "<mask>"):
            if (i := self.own_token_id(token)) is not None:
                return i
        return None

    @property
    def mask_id(self) -> int:
        own = self._own_mask
        return self.tokenizer.vocab_size if own is None else own

    def _corrupt(self, rows: torch.Tensor, generator: torch.Generator) -> MaskedBatch:
        c = self.cfg
        return mask_tokens(rows, mask_id=self.mask_id, n_real=self.tokenizer.vocab_size, mask_prob=c.mask_prob,
                           mask_token_prob=c.mask_token_prob, random_token_prob=c.random_token_prob,
                           generator=generator)

    def batches(self, device: str) -> CorruptedWindows:
        tc = self.train_cfg
        return CorruptedWindows(self.data.train, tc.batch_size, self._seq_len, tc.seed, device, self._corrupt)

    def loss(self, model, batch):
        """Mean cross-entropy (nats) over the selected positions; ``masked_acc``: top-1 accuracy there."""
        logits = model(batch.inputs)  # (B, T, V)
        selected = batch.targets != IGNORE
        logits, targets = logits[selected].float(), batch.targets[selected]  # (N, V), (N,)
        loss = F.cross_entropy(logits, targets)
        acc = (logits.argmax(-1) == targets).float().mean()
        return loss, {"masked_acc": float(acc)}

    def count(self, batch) -> int:
        return batch.inputs.numel()

    def flops_per_unit(self, family: str, model_cfg: Any) -> float:
        from weightsmith.analysis import flops_per_token

        return flops_per_token(family, model_cfg, self._seq_len, training=True)

    @torch.no_grad()
    def _masked_eval(self, model, max_tokens: int | None, device: str, autocast_dtype,
                     unigram: tuple[int, torch.Tensor] | None = None) -> dict[str, float]:
        """Sums over the validation windows, masked with ``eval_seed``: nats, correct, selected, tokens
        (and the unigram baseline's correct and nats when ``unigram = (top id, log-probs)`` is given)."""
        generator = torch.Generator().manual_seed(self.cfg.eval_seed)
        was_training = model.training
        model.eval()
        s = dict.fromkeys(("nats", "correct", "selected", "tokens", "uni_correct", "uni_nats"), 0.0)
        for rows in eval_windows(self.data.val, self._seq_len, self.train_cfg.eval_batch_size, max_tokens):
            batch = self._corrupt(rows, generator)
            with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = model(batch.inputs.to(device))
            selected = batch.targets != IGNORE
            targets = batch.targets[selected]
            logits = logits[selected.to(device)].float().cpu()
            s["nats"] += float(F.cross_entropy(logits, targets, reduction="sum"))
            s["correct"] += float((logits.argmax(-1) == targets).sum())
            s["selected"] += targets.numel()
            s["tokens"] += rows.numel()
            if unigram is not None:
                top, logp = unigram
                s["uni_correct"] += float((targets == top).sum())
                s["uni_nats"] -= float(logp[targets].sum())
        model.train(was_training)
        return s

    def evaluate(self, model, *, device, autocast_dtype):
        s = self._masked_eval(model, self.train_cfg.eval_tokens, device, autocast_dtype)
        return {"val_loss_partial": s["nats"] / s["selected"], "val_masked_acc_partial": s["correct"] / s["selected"],
                "val_tokens": int(s["tokens"])}

    def describe_eval(self, result):
        return (f"masked val_loss (first {result['val_tokens']:,} val tokens) {result['val_loss_partial']:.4f}, "
                f"masked_acc {result['val_masked_acc_partial']:.3f}")

    def unigram(self) -> tuple[int, torch.Tensor]:
        """(most frequent training token, log-probabilities (V_tok,) of the add-one-smoothed training
        unigram distribution): the baseline a model that ignores context can reach."""
        n_real = self.tokenizer.vocab_size
        counts = np.bincount(np.asarray(self.data.train), minlength=n_real)[:n_real]
        counts = torch.from_numpy(counts.astype(np.float64))
        return int(counts.argmax()), torch.log((counts + 1) / (counts.sum() + n_real))

    def finish(self, model, run_dir, *, device, autocast_dtype, log=print):
        """Masked loss and accuracy over the whole validation split (masked with ``eval_seed``) and the
        unigram baseline at the same positions -> eval.json."""
        from weightsmith.fsio import atomic_write_text

        s = self._masked_eval(model, None, device, autocast_dtype, unigram=self.unigram())
        n = s["selected"]
        result = {"masked_loss": s["nats"] / n, "masked_ppl": math.exp(s["nats"] / n), "masked_acc": s["correct"] / n,
                  "unigram_loss": s["uni_nats"] / n, "unigram_acc": s["uni_correct"] / n,
                  "masked_tokens": int(n), "val_tokens": int(s["tokens"]), "mask_prob": self.cfg.mask_prob,
                  "seq_len": self._seq_len, "eval_seed": self.cfg.eval_seed}
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
        log("eval: " + json.dumps(result))
        return result

    def headline(self, summary):
        return (f"masked_acc {summary['masked_acc']:.3f} (unigram {summary['unigram_acc']:.3f}), "
                f"masked_loss {summary['masked_loss']:.3f} (unigram {summary['unigram_loss']:.3f})")

    @classmethod
    def example_batch(cls, model_cfg, batch_size, generator):
        T = min(model_cfg.max_seq_len, 8)
        n_real = model_cfg.vocab_size - cls.n_special()
        tokens = torch.randint(n_real, (batch_size, T), generator=generator)
        return mask_tokens(tokens, mask_id=n_real, n_real=n_real, generator=generator)
