"""Evaluate a run directory with its task: the full validation (and, for classifiers, test) report."""

from __future__ import annotations

import json
from pathlib import Path

from weightsmith.runs import open_task
from weightsmith.train.checkpoint import atomic_write_text, load_run


def evaluate_run(run_dir: str | Path, log=lambda *a: None) -> dict:
    """Load the run's newest checkpoint, evaluate it with the run's task, write ``eval.json``.

    The data is rebuilt from the run's ``[data]`` and must be the data the run was trained on
    (weightsmith.runs.check_run_data for text, the array hashes for images); otherwise nothing is
    evaluated and ``eval.json`` is untouched.

    Returns the dict written, plus ``checkpoint``. Causal LM: val_loss (nats/token), val_ppl, val_bpb
    (bits/byte), val_tokens, val_bytes. Classification: val/test loss, accuracy, per-class accuracy,
    ECE, the most-confused pairs (and confusion.json / confusion.png are rewritten).

    Raises:
        CheckpointError / DataError: missing or corrupt run, checkpoint or data, or data that changed
            since training.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    task = open_task(run_dir, run.config, log=log)
    task.check_model(run.model.config)
    result = task.finish(run.model, run_dir, device="cpu", autocast_dtype=None, log=log)
    result["checkpoint"] = run.checkpoint.name
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    return result
