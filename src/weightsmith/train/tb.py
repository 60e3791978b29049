"""Optional TensorBoard logging (``[train] tensorboard = true``): the metrics.jsonl rows, mirrored.

metrics.jsonl stays the record; this writes the same numbers as TensorBoard scalars with
``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tb/`` (``tensorboard --logdir RUN/tb``). Under
torchrun only rank 0 writes, as for every other log. Tags, one per numeric key of a row:

- a training row (it has ``lr``): ``train/<key>`` for ``loss``, the task's loss parts, ``lr``,
  ``grad_norm_total``, the unit count and rate (``tokens``, ``tok_per_s``...), ``elapsed_s``; the
  per-layer gradient norms of ``log_grad_norms`` as ``grad_norm/<group>``;
- a validation row: ``val/<key>`` (``val/val_loss_partial``, ``val/val_acc``...);
- the end-of-run ``eval.json``: ``eval/<key>`` for its top-level numbers, at the final step.

TensorBoard stores scalars as float32, so a read-back value equals ``numpy.float32`` of the JSON number.
A resume (and a rewind) reopens the writer with ``purge_step`` = the restored step + 1, so TensorBoard
drops the events the interrupted process logged after that checkpoint, as metrics.jsonl drops its rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from weightsmith.errors import ConfigError

TB_DIR = "tb"


def scalar_tags(row: dict[str, Any], kind: str) -> dict[str, float]:
    """{tag: value} for the finite numbers of one metrics row; ``kind`` is ``train``, ``val`` or ``eval``.

    ``step`` is the x-axis, not a tag; booleans, strings, lists and non-finite values are left out.
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if key == "grad_norm" and isinstance(value, dict):
            out.update({f"grad_norm/{g}": float(v) for g, v in value.items()})
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class TensorBoardLog:
    """A SummaryWriter on ``run_dir/tb`` that takes metrics.jsonl rows.

    Raises:
        ConfigError: the ``tensorboard`` package is not installed (``pip install 'weightsmith[tb]'``).
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard = true needs the tensorboard package: "
                              "pip install 'weightsmith[tb]' (or set train.tensorboard = false)") from None
        self._cls = SummaryWriter
        self.log_dir = Path(run_dir) / TB_DIR
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def add(self, row: dict[str, Any], kind: str) -> None:
        """Write one row's numbers at ``row["step"]`` (see :func:`scalar_tags`)."""
        for tag, value in scalar_tags(row, kind).items():
            self.writer.add_scalar(tag, value, row["step"])
        self.writer.flush()

    def restart(self, step: int) -> None:
        """After a rewind to ``step``: later events in the files are dropped by TensorBoard on reading."""
        self.writer.close()
        self.writer = self._cls(str(self.log_dir), purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()
