"""Knowledge distillation: a student language model learns from a frozen teacher run's logits.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network". With student logits
``s``, teacher logits ``t`` (both (B, T, V)), next-token targets ``y`` (B, T), temperature ``tau``
(the paper's T) and mixing weight ``alpha``::

    loss = alpha * tau^2 * KL( softmax(t / tau) || softmax(s / tau) )  +  (1 - alpha) * CE(s, y)

Both terms are means over the B x T token positions, in nats per token (the KL is summed over the
vocabulary at each position). ``tau^2`` keeps the soft term's gradient on the scale of the hard one
as ``tau`` grows (the paper's section 2). ``alpha = 0`` is exactly the causal-LM loss; ``alpha = 1``
is pure distillation.

The teacher is another run directory (``task.teacher_run``), loaded from its newest checkpoint, put
in eval mode with ``requires_grad`` off, and kept by the task, not by the student: the student's
checkpoints hold the student alone, and the trainer's optimizer never sees the teacher. The student's
``[data]`` must rebuild the teacher's data exactly (same corpus text, the teacher's ``tokenizer.json``,
same shards; :func:`weightsmith.runs.check_run_data`), since the two models' vocabularies must be the
same ids; ``vocab_size`` is taken from the teacher. The teacher's weights (sha256 of its
``model.safetensors``) are recorded in the student's ``manifest.json`` and checked on resume, so a
resumed run distils from the same teacher and stays exactly resumable.

Compute: every training step runs one extra forward of the teacher (no backward). The student's
evaluation and artifacts are those of ``causal-lm`` (val_bpb over the whole validation split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from weightsmith.errors import ConfigError, DataError
from weightsmith.tasks import register_task
from weightsmith.tasks.causal_lm import CausalLM


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinton et al.'s mixed objective (module docstring), computed in float32.

    Args:
        student_logits: (B, T, V); teacher_logits: (B, T, V), no gradient needed; targets: (B, T) int64.
        temperature: tau > 0; alpha: weight of the soft (KL) term in [0, 1].

    Returns:
        (loss, kl, ce): scalars in nats per token; ``kl`` is at temperature tau, before the tau^2 factor.
    """
    V = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, V)
    t = teacher_logits.float().reshape(-1, V)
    ce = F.cross_entropy(s, targets.reshape(-1))
    # KL(p_t || p_s) summed over V, mean over the B*T positions ("batchmean" over the flattened rows)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean")
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return loss, kl, ce


@dataclass(kw_only=True)
class DistillConfig:
    """``[task]`` of ``distill``.

    teacher_run: run directory of the teacher (a causal LM trained on the same data and tokenizer).
    temperature: softmax temperature tau of both models' logits in the KL term (> 0).
    alpha: weight of the KL term; ``1 - alpha`` weighs the cross-entropy on the data (0 <= alpha <= 1).
    """

    teacher_run: str = ""
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and self.temperature > 0):
            raise ConfigError(f"task.temperature={self.temperature!r} must be a number > 0 (e.g. 2.0)")
        if not (isinstance(self.alpha, int | float) and 0 <= self.alpha <= 1):
            raise ConfigError(f"task.alpha={self.alpha!r} must be in [0, 1] (weight of the KL term)")


def _teacher_sha256(checkpoint: Path) -> str | None:
    meta = checkpoint / "meta.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("files", {}).get("model.safetensors")


@register_task("distill")
class Distill(CausalLM):
    """A causal-LM student trained on a frozen teacher's logits mixed with the data's next tokens."""

    config_cls = DistillConfig
    also_trains = ("causal-lm",)

    teacher: torch.nn.Module | None = None

    def setup(self, run_dir: Path, *, resume: bool, log=print) -> None:
        from weightsmith.errors import CheckpointError
        from weightsmith.runs import check_run_data
        from weightsmith.train.checkpoint import load_run

        cfg = self.cfg
        if not cfg.teacher_run:
            raise ConfigError("task.teacher_run is required by task 'distill': the teacher's run directory, "
                              "e.g. \"runs/shakespeare\"")
        teacher_dir = Path(cfg.teacher_run)
        try:
            teacher = load_run(teacher_dir)
        except CheckpointError as e:
            raise ConfigError(f"task.teacher_run={cfg.teacher_run!r}: {e}") from None
        super().setup(run_dir, resume=resume, log=log)
        try:
            check_run_data(teacher_dir, self.data)
        except DataError as e:
            raise DataError(f"task.teacher_run={cfg.teacher_run!r}: the student's [data] must rebuild the "
                            f"teacher's data and tokenizer: {e}") from None
        self.teacher = teacher.model.eval().requires_grad_(False)
        self.teacher_family = teacher.config["model"].get("family", "gpt")
        self.teacher_info = {"run": str(teacher_dir.resolve()), "checkpoint": teacher.checkpoint.name,
                             "model_sha256": _teacher_sha256(teacher.checkpoint)}
        if resume:
            self._check_same_teacher(run_dir)
        log(f"distilling from {teacher_dir} ({teacher.checkpoint.name}, "
            f"{sum(p.numel() for p in self.teacher.parameters()):,} parameters), "
            f"temperature {cfg.temperature}, alpha {cfg.alpha}")

    def _check_same_teacher(self, run_dir: Path) -> None:
        path = Path(run_dir) / "manifest.json"
        if not path.is_file():
            return
        saved = json.loads(path.read_text()).get("data", {}).get("teacher")
        if saved and saved.get("model_sha256") != self.teacher_info["model_sha256"]:
            raise DataError(f"task.teacher_run={self.cfg.teacher_run!r}: its newest checkpoint is not the teacher "
                            f"{run_dir} was distilled from: model.safetensors sha256 expected "
                            f"{saved.get('model_sha256')} (from {path}), found {self.teacher_info['model_sha256']}")

    def model_fields(self) -> dict[str, Any]:
        return {"vocab_size": self.teacher.config.vocab_size}

    def check_model(self, model_cfg: Any) -> None:
        super().check_model(model_cfg)
        tv = self.teacher.config.vocab_size
        if model_cfg.vocab_size != tv:
            raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} must equal the teacher's {tv} (the KL "
                              f"compares the two distributions id by id); remove it from the recipe")
        if self._seq_len > self.teacher.config.max_seq_len:
            raise ConfigError(f"train.seq_len={self._seq_len} exceeds the teacher's max_seq_len="
                              f"{self.teacher.config.max_seq_len}")

    def data_manifest(self) -> dict[str, Any]:
        return {**super().data_manifest(), "teacher": self.teacher_info}

    def batches(self, device: str):
        self.teacher.to(device)
        return super().batches(device)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> the frozen teacher's (B, T, V) logits, without autograd."""
        if next(self.teacher.parameters()).device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad():
            return self.teacher(x)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        loss, kl, ce = distillation_loss(logits, self.teacher_logits(x), y, temperature=self.cfg.temperature,
                                         alpha=self.cfg.alpha)
        return loss, {"kl": kl.item(), "ce": ce.item()}

    def flops_per_unit(self, family: str, model_cfg: Any) -> float:
        """The student's training FLOPs plus one teacher forward per token (2 per multiply-add)."""
        from weightsmith.analysis import flops_per_token

        student = super().flops_per_unit(family, model_cfg)
        return student + flops_per_token(self.teacher_family, self.teacher.config, self._seq_len, training=False)
