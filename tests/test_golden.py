"""The causal-LM path through the task-based trainer is the old trainer, bit for bit.

tests/data/golden_losses.json holds the losses at every step and the final eval recorded with the
trainer as it was before tasks existed (commit bd0c3f4), for the same seeds and step budgets.
"""

import json
import tomllib
from pathlib import Path

import pytest
from test_cli import RECIPE

from weightsmith.config import apply_overrides, load_toml
from weightsmith.recipe import recipe_from_tree
from weightsmith.train.loop import run_training

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_losses.json").read_text())
ROOT = Path(__file__).resolve().parents[1]


def _run(tree, out):
    run_training(recipe_from_tree(tree), out, log=lambda *a: None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in rows if "loss" in r], "eval": json.loads((out / "eval.json").read_text())}


def test_tiny_recipe_losses_are_bit_identical_to_the_old_trainer(tmp_path, tiny_corpus, cache_dir):
    tree = tomllib.loads(RECIPE.format(corpus=tiny_corpus, tokenizer="bpe"))
    apply_overrides(tree, ["--train.log_every=1", "--model.dropout=0.1"])
    got = _run(tree, tmp_path / "run")
    assert got["losses"] == GOLDEN["tiny"]["losses"]
    assert got["eval"] == GOLDEN["tiny"]["eval"]


@pytest.mark.slow
def test_main_job_losses_are_bit_identical_to_the_old_trainer(tmp_path):
    """The main recipe with a 40-step budget instead of its wall-clock one (which makes the schedule
    depend on time); uses the real Shakespeare data (downloaded once into the cache)."""
    tree = load_toml(ROOT / "recipes" / "shakespeare.toml")
    del tree["train"]["max_time"]
    apply_overrides(tree, ["--train.max_steps=40", "--train.warmup_steps=10", "--train.log_every=1",
                           "--train.eval_every=20", "--train.ckpt_every=1000", "--sample.max_new_tokens=5"])
    got = _run(tree, tmp_path / "run")
    assert got["losses"] == GOLDEN["main"]["losses"]
    assert got["eval"] == GOLDEN["main"]["eval"]
