"""The task contract: what a run optimizes, beside a plain model.

The trainer (:mod:`weightsmith.train.loop`) owns steps, the learning-rate schedule, accumulation,
clipping, checkpoints, the time budget and resume. A task owns everything that depends on the
objective: its data, the model fields the data decides, batches (with checkpointed state), the loss
with named parts to log, what throughput counts, evaluation and the end-of-run artifacts. The model
stays an ``nn.Module`` whose ``forward`` returns outputs, never a loss, so exporters, quantization and
generation work on it unchanged. This is the forward/loss split of Composer's ``ComposerModel``
without the wrapper module (a wrapper would rename every state-dict key), with Lightning's
``LightningDataModule`` folded into the task (see ``shared/DESIGN.md``).

One step of the trainer, with ``task`` an instance of a :class:`Task` subclass::

    for _ in range(grad_accum):
        batch = batches.next()
        loss, parts = task.loss(model, batch)       # scalar tensor to backpropagate, floats to log
        (loss / grad_accum).backward()
        seen += task.count(batch)                   # tokens or images, for throughput

A recipe's ``[task]`` table names the task (``name = "classification"``; default: the model family's
task) and sets the fields of the task's ``config_cls``; ``[data]`` is parsed with ``data_config_cls``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch


class BatchStream(Protocol):
    """An endless, seeded stream of training batches whose position is part of the checkpoint."""

    def next(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task:
    """Base class of every registered task. Subclasses set the class attributes and override the
    methods that raise here; the defaults below are right for most tasks.

    Class attributes:
        name: registry name (``causal-lm``, ``classification``...).
        config_cls: dataclass of the ``[task]`` table (without ``name``).
        data_config_cls: dataclass of the ``[data]`` table.
        unit: what :meth:`count` counts, plural (``tokens``, ``images``); metrics.jsonl logs the running
            total under this key and the rate under ``rate_key``.
        rate_key: metrics.jsonl key of units per second (``tok_per_s``, ``img_per_s``).
        also_trains: default tasks of other families this task can train too (their models follow the
            same forward protocol), e.g. ``("causal-lm",)`` for ``recall``.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    data_config_cls: ClassVar[type]
    unit: ClassVar[str] = "tokens"
    rate_key: ClassVar[str] = "tok_per_s"
    also_trains: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, data_cfg: Any, train_cfg: Any, sample_cfg: Any = None) -> None:
        self.cfg, self.data_cfg, self.train_cfg, self.sample_cfg = cfg, data_cfg, train_cfg, sample_cfg

    # ---- data and model fields ----
    @classmethod
    def placeholder_fields(cls, data_cfg: Any) -> dict[str, Any]:
        """Stand-in values of the data-decided model fields, to validate a recipe before any data work."""
        return {}

    def setup(self, run_dir: Path, *, resume: bool, log=print) -> None:
        """Prepare (or load from cache) the data. With ``resume``, check it is the data the run in
        ``run_dir`` was trained on (raises DataError otherwise)."""
        raise NotImplementedError(f"task {self.name} must implement setup")

    def model_fields(self) -> dict[str, Any]:
        """Model config fields the data decides (``{"vocab_size": V}``), filled in where the recipe
        leaves them out."""
        return {}

    def check_model(self, model_cfg: Any) -> None:
        """Raise ConfigError if the model cannot be trained on this data (e.g. too few classes)."""

    def write_artifacts(self, run_dir: Path) -> None:
        """Files a new run needs besides config, manifest and checkpoints (``tokenizer.json``)."""

    def data_manifest(self) -> dict[str, Any]:
        """Provenance of the data for the run's ``manifest.json``."""
        return {}

    # ---- training ----
    def batches(self, device: str) -> BatchStream:
        """The training batch stream, seeded from ``train.seed``."""
        raise NotImplementedError(f"task {self.name} must implement batches")

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss to backpropagate, named parts to log as floats). The trainer adds the models'
        auxiliary losses (MoE load balancing) to the backpropagated loss; the logged ``loss`` is this one."""
        raise NotImplementedError(f"task {self.name} must implement loss")

    def count(self, batch: Any) -> int:
        """Units (``unit``) in one micro-batch, for throughput."""
        raise NotImplementedError(f"task {self.name} must implement count")

    def after_step(self, model: torch.nn.Module) -> None:
        """Called by the trainer after every optimizer step (the weights just changed); a task that
        keeps an exponential moving average of the weights updates it here. Default: nothing."""

    def flops_per_unit(self, family: str, model_cfg: Any) -> float:
        """Analytic training FLOPs per unit (2 per multiply-add, backward = 2x forward), for MFU.

        Raises:
            ConfigError: when the family's FLOPs are not modelled (the trainer then skips MFU).
        """
        from weightsmith.analysis import flops_per_token

        return flops_per_token(family, model_cfg, 1, training=True)

    # ---- evaluation and artifacts ----
    def evaluate(self, model: torch.nn.Module, *, device: str, autocast_dtype: torch.dtype | None) -> dict[str, Any]:
        """A quick validation estimate during training (one metrics.jsonl row with ``step`` added)."""
        return {}

    def describe_eval(self, result: dict[str, Any]) -> str:
        """One phrase for the progress line, e.g. ``val_loss 4.2``."""
        return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())

    def finish(self, model: torch.nn.Module, run_dir: Path, *, device: str, autocast_dtype: torch.dtype | None,
               log=print) -> dict[str, Any]:
        """Full evaluation -> ``eval.json``, and the task's artifacts (a sample, a confusion matrix)."""
        raise NotImplementedError(f"task {self.name} must implement finish")

    def headline(self, summary: dict[str, Any]) -> str:
        """The figure printed with the run directory at the end (``val_bpb 2.1254``)."""
        return ""

    # ---- state the checkpoint carries beyond weights, optimizer and batches (EMA, noise RNG) ----
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---- contract tests ----
    @classmethod
    def example_batch(cls, model_cfg: Any, batch_size: int, generator: torch.Generator) -> Any:
        """A small random batch for ``model_cfg``, so contract tests can run :meth:`loss` on every
        registered family without data."""
        raise NotImplementedError(f"task {cls.name} must implement example_batch")

    @classmethod
    def for_contract_tests(cls) -> Task:
        """An instance with default configs and no data, enough for :meth:`loss` on an example batch."""
        from weightsmith.train.config import TrainConfig

        return cls(cls.config_cls(), cls.data_config_cls(), TrainConfig())
