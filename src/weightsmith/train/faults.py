"""Test-only fault injection, read from one environment variable, here and nowhere else.

``WEIGHTSMITH_TEST_FAULTS`` is unset in real runs, and then nothing in this module changes anything.
Tests set it to a comma-separated list of faults:

- ``nan_loss@K``: micro-batch K's loss (and so its gradients) becomes NaN;
- ``nan_grad@K``: micro-batch K's loss stays finite but its gradients become NaN;
- ``spike@K`` or ``spike@K:F``: micro-batch K's loss (and its gradients) is multiplied by F (default 100);
- ``ckpt_kill@N``: the process SIGKILLs itself at the N-th fault point (1-based, counted over the whole
  process) reached inside checkpoint writing (:func:`checkpoint_point`, called by
  weightsmith.train.checkpoint.save_checkpoint between its writes, fsyncs and renames);
  ``ckpt_kill@LABEL#K``: at the K-th time the point named LABEL (e.g. ``renamed into place``) is reached;
- ``rank_kill@R:K``: the process of rank R (torchrun's ``RANK``; 0 without torchrun) SIGKILLs itself
  when it draws micro-batch K, as a node lost mid-run would (weightsmith.train.distributed);
  ``rank_stop@R:K``: it SIGSTOPs itself there instead, a rank that hangs without dying.

K may be a range ``K-L`` (inclusive). K counts micro-batches drawn since the run began, skipped and
rewound ones included (the trainer's ``draws``, saved in checkpoints), so a fault is attached to a
position in the data stream, like a bad batch, and does not come back once the trainer skips past it.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from functools import lru_cache

import torch

ENV = "WEIGHTSMITH_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    nan_loss: frozenset[int] = frozenset()
    nan_grad: frozenset[int] = frozenset()
    spike: dict[int, float] = field(default_factory=dict)
    ckpt_kill: int | tuple[str, int] | None = None
    rank_kill: tuple[int, int] | None = None
    rank_stop: tuple[int, int] | None = None

    def poison(self, loss: torch.Tensor, draw: int) -> torch.Tensor:
        """``loss`` (a scalar) of micro-batch ``draw``, with this micro-batch's fault applied."""
        if self.rank_kill is not None and self.rank_kill == (int(os.environ.get("RANK", 0)), draw):
            print(f"fault: SIGKILL of rank {self.rank_kill[0]} at micro-batch {draw}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.rank_stop is not None and self.rank_stop == (int(os.environ.get("RANK", 0)), draw):
            print(f"fault: SIGSTOP of rank {self.rank_stop[0]} at micro-batch {draw}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        if draw in self.nan_loss:
            return loss * float("nan")
        if draw in self.nan_grad:
            return _NanGrad.apply(loss)
        if draw in self.spike:
            return loss * self.spike[draw]
        return loss


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def _positions(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


@lru_cache(maxsize=4)
def _parse(spec: str) -> Faults | None:
    nan_loss, nan_grad, spike, kill, rank_kill, rank_stop = set(), set(), {}, None, None, None
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        if kind == "nan_loss":
            nan_loss.update(_positions(where))
        elif kind == "nan_grad":
            nan_grad.update(_positions(where))
        elif kind == "spike":
            pos, _, factor = where.partition(":")
            spike.update(dict.fromkeys(_positions(pos), float(factor or 100.0)))
        elif kind == "ckpt_kill":
            label, _, k = where.rpartition("#")
            kill = (label, int(k)) if label else int(where)
        elif kind in ("rank_kill", "rank_stop"):
            rank, _, k = where.partition(":")
            if kind == "rank_kill":
                rank_kill = (int(rank), int(k))
            else:
                rank_stop = (int(rank), int(k))
        else:
            raise ValueError(f"{ENV}: unknown fault {item!r}; known: nan_loss@K, nan_grad@K, spike@K[:F], "
                             "ckpt_kill@N, rank_kill@R:K, rank_stop@R:K")
    return Faults(frozenset(nan_loss), frozenset(nan_grad), spike, kill, rank_kill, rank_stop)


def active() -> Faults | None:
    """The faults ``WEIGHTSMITH_TEST_FAULTS`` asks for, or None (the normal case) when it is unset."""
    spec = os.environ.get(ENV, "")
    return _parse(spec) if spec else None


_points_reached: dict[str, int] = {}  # label -> times reached in this process ("" counts all)


def checkpoint_point(label: str) -> None:
    """A place inside checkpoint writing where a ``ckpt_kill@N`` fault may kill the process."""
    faults = active()
    if faults is None or faults.ckpt_kill is None:
        return
    for key in ("", label):
        _points_reached[key] = _points_reached.get(key, 0) + 1
    kill = faults.ckpt_kill
    if isinstance(kill, int):
        hit = _points_reached[""] == kill
    else:
        hit = label == kill[0] and _points_reached[label] == kill[1]
    if hit:
        print(f"fault: SIGKILL inside checkpoint writing at {label}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
