"""Causal language modelling: next-token cross-entropy on random windows of a token stream.

Data: the text stage (:mod:`weightsmith.data.prepare`): a corpus, a tokenizer and flat token shards.
Batches are random windows of ``seq_len + 1`` tokens from the *training* shard, drawn by a seeded
``torch.Generator`` whose state is checkpointed, so a resumed run sees exactly the batches an
uninterrupted run would.

Units: ``loss`` is the mean next-token cross-entropy of a micro-batch in nats per token; ``count`` is
B x T tokens; the final evaluation reports bits per byte over the whole validation split
(:func:`weightsmith.eval.metrics.evaluate_lm`). Models follow the causal-LM protocol
``forward(idx: (B, T) int64) -> logits (B, T, vocab_size)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from weightsmith.data.prepare import DataConfig
from weightsmith.errors import ConfigError
from weightsmith.tasks import register_task
from weightsmith.tasks.base import Task


class TokenWindows:
    """Random (x, y) windows from a token shard; its generator state is part of the checkpoint."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, device: str) -> None:
        if len(tokens) <= seq_len + 1:
            raise ConfigError(f"training split has {len(tokens)} tokens; need more than train.seq_len + 1 "
                              f"= {seq_len + 1} (lower train.seq_len or use a bigger corpus)")
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64, y shifted by one."""
        ix = torch.randint(len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        rows = np.stack([np.asarray(self.tokens[i:i + self.seq_len + 1], dtype=np.int64) for i in ix.tolist()])
        chunk = torch.from_numpy(rows).to(self.device)
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@dataclass(kw_only=True)
class CausalLMConfig:
    """``[task]`` of ``causal-lm``: no fields yet (window length is ``train.seq_len``)."""


class TextTask(Task):
    """Shared by the language-model tasks: the text data stage, its tokenizer and run checks."""

    data_config_cls = DataConfig

    @classmethod
    def placeholder_fields(cls, data_cfg: DataConfig) -> dict[str, Any]:
        return {"vocab_size": (data_cfg.vocab_size if data_cfg.tokenizer == "bpe" else 256) + cls.n_special()}

    @classmethod
    def n_special(cls) -> int:
        """Ids the task appends after the tokenizer's (a mask token, sentinels)."""
        return 0

    def n_appended(self) -> int:
        """Ids this run appends after its tokenizer's: ``n_special()``, or 0 where the tokenizer has the
        task's special tokens itself (an imported BERT's ``[MASK]``, T5's ``<extra_id_i>``)."""
        return self.n_special()

    def own_token_id(self, token: str) -> int | None:
        """The tokenizer's own id of ``token`` (only imported Hugging Face vocabularies have one), or None."""
        lookup = getattr(self.tokenizer, "token_id", None)
        return None if lookup is None else lookup(token)

    def setup(self, run_dir: Path, *, resume: bool, log=print) -> None:
        from weightsmith.data.prepare import prepare
        from weightsmith.train.init_from import run_tokenizer

        # train.init_from: the source's tokenizer (the run's own on resume/eval), not a new one
        fixed = run_tokenizer(self.train_cfg, self.data_cfg, run_dir, resume)
        self.data = prepare(self.data_cfg, log=log, tokenizer=fixed)
        if resume:
            from weightsmith.runs import check_run_data

            check_run_data(run_dir, self.data)

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def model_fields(self) -> dict[str, Any]:
        return {"vocab_size": self.tokenizer.vocab_size + self.n_appended()}

    def check_model(self, model_cfg: Any) -> None:
        need = self.tokenizer.vocab_size + self.n_appended()
        if model_cfg.vocab_size < need:
            raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the {need} ids the data "
                              f"needs; remove it from the recipe to use the tokenizer's")
        if self.seq_len(model_cfg) > model_cfg.max_seq_len:
            raise ConfigError(f"train.seq_len={self.seq_len(model_cfg)} exceeds "
                              f"model.max_seq_len={model_cfg.max_seq_len}")
        self._seq_len = self.seq_len(model_cfg)

    def seq_len(self, model_cfg: Any) -> int:
        return self.train_cfg.seq_len or model_cfg.max_seq_len

    def write_artifacts(self, run_dir: Path) -> None:
        from weightsmith.data.tokenizers import save_tokenizer

        save_tokenizer(self.tokenizer, run_dir)

    def data_manifest(self) -> dict[str, Any]:
        return {"directory": str(self.data.directory), **self.data.manifest}

    @classmethod
    def for_contract_tests(cls):
        task = super().for_contract_tests()
        task._seq_len = 8  # the example batches' window length
        return task


@register_task("causal-lm")
class CausalLM(TextTask):
    """Next-token prediction (GPT-style pretraining)."""

    config_cls = CausalLMConfig

    def batches(self, device: str) -> TokenWindows:
        tc = self.train_cfg
        return TokenWindows(self.data.train, tc.batch_size, self._seq_len, tc.seed, device)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        return loss, {}

    def count(self, batch) -> int:
        return batch[0].numel()

    def flops_per_unit(self, family: str, model_cfg: Any) -> float:
        from weightsmith.analysis import flops_per_token

        return flops_per_token(family, model_cfg, self._seq_len, training=True)

    def evaluate(self, model, *, device, autocast_dtype):
        from weightsmith.eval.metrics import stream_loss

        tc = self.train_cfg
        total, count, _ = stream_loss(model, self.data.val, self._seq_len, tc.eval_batch_size, tc.eval_tokens,
                                      device, autocast_dtype)
        return {"val_loss_partial": total / count, "val_tokens": count}

    def describe_eval(self, result):
        return f"val_loss (first {result['val_tokens']:,} val tokens) {result['val_loss_partial']:.4f}"

    def finish(self, model, run_dir, *, device, autocast_dtype, log=print):
        """Full validation eval -> eval.json, and a sample -> samples.txt."""
        from weightsmith.eval.metrics import evaluate_lm
        from weightsmith.fsio import atomic_write_text
        from weightsmith.ship.generate import generate_text

        result = evaluate_lm(model, self.data.val, self.tokenizer.token_bytes(), self._seq_len,
                             self.train_cfg.eval_batch_size, device, autocast_dtype)
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
        log("eval: " + json.dumps(result))
        s = self.sample_cfg
        if s is not None:
            model.eval()
            text = generate_text(model, self.tokenizer, s.prompt, s.max_new_tokens, s.temperature, s.top_k,
                                 s.top_p, s.seed)
            atomic_write_text(run_dir / "samples.txt", text + "\n")
            log("sample:\n" + text)
        return result

    def headline(self, summary):
        return f"val_bpb {summary['val_bpb']:.4f}"

    @classmethod
    def example_batch(cls, model_cfg, batch_size, generator):
        T = min(model_cfg.max_seq_len, 8)
        idx = torch.randint(model_cfg.vocab_size, (batch_size, T + 1), generator=generator)
        return idx[:, :-1], idx[:, 1:]
