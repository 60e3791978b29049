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


def evaluate_on(run_dir: str | Path, data_overrides: list[str], out: str | Path | None = None,
                log=lambda *a: None) -> dict:
    """Evaluate a language-model run on *other* text: the run's ``[data]`` with ``data_overrides``
    (``--data.corpus=milton``, ``--data.val_fraction=...``) applied, tokenized with the run's own
    tokenizer. Measures forgetting after fine-tuning, or transfer to a new domain.

    The run's ``eval.json`` is never touched; the result (the task's full validation report, plus
    ``checkpoint`` and ``data``: the overrides) is returned, and also written to ``out`` when given
    (a new file: an existing one is not overwritten).

    Raises:
        ConfigError: an override outside ``[data]``, a tokenizer override, a run whose task is not a
            text task, or an ``out`` that exists. CheckpointError / DataError: as :func:`evaluate_run`.
    """
    import tempfile

    from weightsmith.config import apply_overrides, from_dict
    from weightsmith.data.prepare import DataConfig, prepare
    from weightsmith.errors import ConfigError
    from weightsmith.recipe import recipe_from_tree
    from weightsmith.tasks.causal_lm import TextTask

    bad = [o for o in data_overrides if not o.startswith("--data.")]
    if bad:
        raise ConfigError(f"eval takes only --data.* overrides (the data to measure on); got {' '.join(bad)}")
    if any(o.split("=", 1)[0] in ("--data.tokenizer", "--data.vocab_size", "--data.tokenizer_from")
           for o in data_overrides):
        raise ConfigError("eval keeps the run's own tokenizer; drop --data.tokenizer, --data.vocab_size and "
                          "--data.tokenizer_from")
    if out is not None and Path(out).exists():
        raise ConfigError(f"{out} already exists; eval --out writes a new file and never overwrites one")
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    config = apply_overrides(run.config, data_overrides)
    recipe = recipe_from_tree(config, name=run_dir.name)
    task = recipe.task_cls(recipe.task, recipe.data, recipe.train, None)
    if not isinstance(task, TextTask):
        raise ConfigError(f"eval --data.* measures text tasks only; {run_dir} is a {task.name} run")
    section = dict(config["data"])
    section.pop("tokenizer_from", None)  # the run's own tokenizer below
    task.data = prepare(from_dict(DataConfig, section, "data"), tokenizer=run.tokenizer, log=log)
    task.check_model(run.model.config)
    with tempfile.TemporaryDirectory() as scratch:  # finish writes its eval.json there, not into the run
        result = task.finish(run.model, Path(scratch), device="cpu", autocast_dtype=None, log=log)
    result = {**result, "checkpoint": run.checkpoint.name, "data": list(data_overrides)}
    if out is not None:
        atomic_write_text(Path(out), json.dumps(result, indent=2))
    return result
