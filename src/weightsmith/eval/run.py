"""Evaluate a run directory on its whole validation split."""

from __future__ import annotations

import json
from pathlib import Path

from weightsmith.eval.metrics import evaluate_lm
from weightsmith.runs import prepare_run_data
from weightsmith.train.checkpoint import atomic_write_text, load_run


def evaluate_run(run_dir: str | Path, log=lambda *a: None) -> dict:
    """Load the run's newest checkpoint, evaluate on the full validation split, write ``eval.json``.

    The validation split is rebuilt from the run's ``[data]`` and must be the data the run was trained
    on (weightsmith.runs.check_run_data); otherwise nothing is evaluated and ``eval.json`` is untouched.

    Returns the dict written: val_loss (nats/token), val_ppl, val_bpb (bits/byte), val_tokens, val_bytes.

    Raises:
        CheckpointError / DataError: missing or corrupt run, checkpoint or shard, or a corpus that changed
            since training.
    """
    run = load_run(run_dir)
    data = prepare_run_data(Path(run_dir), run.config, log=log)
    train_cfg = run.config.get("train", {})
    seq_len = train_cfg.get("seq_len") or run.model.config.max_seq_len
    result = evaluate_lm(run.model, data.val, run.tokenizer.token_bytes(), seq_len,
                         train_cfg.get("eval_batch_size", 16))
    result["checkpoint"] = run.checkpoint.name
    atomic_write_text(Path(run_dir) / "eval.json", json.dumps(result, indent=2))
    return result
