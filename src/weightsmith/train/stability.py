"""Instability caught before the optimizer step; repeated instability rewinds the run past its data.

Every step, after the backward pass and before ``optimizer.step()``, the trainer asks
:meth:`StabilityGuard.check` about the step's loss (mean over its micro-batches) and gradient norm (L2
over all parameters, before clipping). The step is **skipped** (gradients dropped, the step counter not
advanced, its micro-batches not retried) when

- the loss is not finite (``nonfinite_loss``), or the gradient norm is not (``nonfinite_grad_norm``);
- ``train.spike_zscore`` is set, the last ``spike_window`` kept losses fill the window, and
  ``z = (loss - mean) / std`` (population std of the window) exceeds it (``loss_spike``; upward only).

When ``rewind_events`` skips fall within ``rewind_window`` steps, the run **rewinds**: weights,
optimizer, task state (EMA, noise RNG) and the global RNG come back from the newest intact checkpoint
older than the first of those skips, while the data stream keeps its position, so the micro-batches
drawn since that checkpoint (the offending window) are never trained on. The trainer then re-saves that
checkpoint with the advanced data position, so a resume after a kill does not replay the window. This
is PaLM's remedy for loss spikes (Chowdhery et al. 2022, section 5.1: restart about 100 steps before the
spike and skip 200-500 batches), automated the way the OLMo trainers skip bad steps. A rewind beyond
``max_rewinds``, or one with no checkpoint to go back to, raises :class:`TrainingDiverged`.

``events.jsonl`` in the run directory holds one JSON object per event (non-finite numbers written as the
strings ``"nan"``, ``"inf"``, ``"-inf"``); micro-batches are counted by ``draws``, the number drawn
since the run began (skipped ones included), ranges are ``[first, end)``::

    {"event": "skip", "reason": "loss_spike", "step": 57, "loss": 412.3, "grad_norm": 88.1,
     "zscore": 31.2, "batches": [56, 57]}
    {"event": "rewind", "step": 61, "to_step": 40, "checkpoint": "step_000040",
     "skipped_steps": [41, 61], "skipped_batches": [40, 63], "rewinds": 1}

``step`` is the optimizer step being attempted (1-based, as in metrics.jsonl). The guard's state (loss
window, recent skips, counters) is checkpointed, and a resume keeps exactly the events logged up to its
checkpoint, so a resumed run writes the same events.jsonl as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from pathlib import Path
from typing import Any

from weightsmith.errors import TrainingDiverged
from weightsmith.fsio import atomic_write_text
from weightsmith.train.checkpoint import list_checkpoints, verify_checkpoint

EVENTS = "events.jsonl"


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


class StabilityGuard:
    """Decides skips and rewinds for one run and writes ``run_dir/events.jsonl``.

    Args: ``tc`` (TrainConfig: ``spike_zscore, spike_window, rewind_events, rewind_window,
    max_rewinds``), ``run_dir``, ``log`` (one line per event).
    """

    def __init__(self, tc: Any, run_dir: Path, log=print) -> None:
        self.tc, self.path, self.log = tc, Path(run_dir) / EVENTS, log
        self.losses: deque[float] = deque(maxlen=tc.spike_window)
        self.recent: list[int] = []  # steps of the skips since the last rewind, within rewind_window
        self.n_events = 0
        self.rewinds = 0

    # ---- per step ----
    def check(self, step: int, loss: float, grad_norm: float, batches: tuple[int, int]) -> dict | None:
        """None if step ``step`` may be applied (its loss joins the window), else the skip event (logged)."""
        reason, z = None, None
        if not math.isfinite(loss):
            reason = "nonfinite_loss"
        elif not math.isfinite(grad_norm):
            reason = "nonfinite_grad_norm"
        elif self.tc.spike_zscore is not None and len(self.losses) == self.losses.maxlen:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
            if std > 0 and (loss - mean) / std > self.tc.spike_zscore:
                reason, z = "loss_spike", (loss - mean) / std
        if reason is None:
            self.losses.append(loss)
            return None
        event = {"event": "skip", "reason": reason, "step": step, "loss": _num(loss),
                 "grad_norm": _num(grad_norm), **({"zscore": z} if z is not None else {}),
                 "batches": list(batches)}
        self._write(event)
        self.recent = [s for s in self.recent if s > step - self.tc.rewind_window] + [step]
        self.log(f"step {step}: skipped ({reason}, loss {loss:.4g}, grad norm {grad_norm:.4g})")
        return event

    def wants_rewind(self) -> bool:
        return len(self.recent) >= self.tc.rewind_events

    # ---- rewinding ----
    def rewind_target(self, run_dir: Path) -> Path:
        """The newest intact checkpoint older than the first recent skip.

        Raises:
            TrainingDiverged: ``max_rewinds`` are used up, or no such checkpoint exists.
        """
        first = min(self.recent)
        if self.rewinds >= self.tc.max_rewinds:
            raise TrainingDiverged(
                f"{len(self.recent)} unstable steps within {self.tc.rewind_window} steps at step {max(self.recent)} "
                f"after {self.rewinds} rewinds (train.max_rewinds={self.tc.max_rewinds}); lower train.lr or raise "
                f"train.warmup_steps (see {self.path})")
        for ckpt in reversed(list_checkpoints(run_dir)):
            try:
                step = verify_checkpoint(ckpt)["step"]
            except Exception:  # a corrupt checkpoint is no place to go back to
                continue
            if step < first:
                return ckpt
        raise TrainingDiverged(
            f"{len(self.recent)} unstable steps within {self.tc.rewind_window} steps from step {first}, and no "
            f"intact checkpoint before step {first} to rewind to; lower train.lr, raise train.warmup_steps or "
            f"checkpoint more often (train.ckpt_every); see {self.path}")

    def rewound(self, ckpt: Path, state: dict, step: int, draws: int, ckpt_draws: int) -> None:
        """Record the rewind from step ``step`` to checkpoint ``ckpt`` (train state ``state``): the loss
        window comes back from it, the recent skips are cleared, and the skipped window is logged."""
        to_step = state["step"]
        saved = state.get("stability", {})
        self.losses = deque(saved.get("losses", []), maxlen=self.tc.spike_window)
        self.recent = []
        self.rewinds += 1
        self._write({"event": "rewind", "step": step, "to_step": to_step, "checkpoint": ckpt.name,
                     "skipped_steps": [to_step + 1, step], "skipped_batches": [ckpt_draws, draws],
                     "rewinds": self.rewinds})
        self.log(f"step {step}: rewound to {ckpt.name}, skipping micro-batches {ckpt_draws}..{draws - 1}")

    # ---- persistence ----
    def _write(self, event: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.n_events += 1

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "recent": list(self.recent), "n_events": self.n_events,
                "rewinds": self.rewinds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's guard (resume) and cut events.jsonl to the events it had logged."""
        self.losses = deque(state.get("losses", []), maxlen=self.tc.spike_window)
        self.recent = list(state.get("recent", []))
        self.n_events, self.rewinds = state.get("n_events", 0), state.get("rewinds", 0)
        if self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)[:self.n_events]
            lines = [ln for ln in lines if ln.endswith("\n")]  # a torn last line is dropped
            self.n_events = len(lines)
            atomic_write_text(self.path, "".join(lines))
