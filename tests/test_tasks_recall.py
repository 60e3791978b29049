"""The synthetic recall task (E4): MQAR and needle sequences, the accuracy metric, and a short run.

The generators are checked against their definition (every query's target is the value its key was
paired with; keys distinct; the needle's answer is the value after the needle), the metric against
an oracle model that looks values up (accuracy 1) and a constant model (chance), and the task trains
a causal-LM family through the generic trainer with exact resume.
"""

import json
import shutil

import pytest
import torch

from weightsmith.errors import ConfigError
from weightsmith.recipe import recipe_from_tree
from weightsmith.tasks import task_for
from weightsmith.tasks.recall import (
    IGNORE,
    RecallDataConfig,
    make_batch,
    mqar_batch,
    needle_batch,
    recall_accuracy,
)
from weightsmith.train.loop import run_training


def test_mqar_targets_are_the_values_paired_with_each_query_key():
    cfg = RecallDataConfig(n_keys=40, n_values=30, n_noise=5)
    g = torch.Generator().manual_seed(0)
    n_pairs = torch.tensor([1, 3, 8, 16])
    x, y = mqar_batch(4, 64, n_pairs, cfg, g)
    for b, D in enumerate(n_pairs.tolist()):
        keys, values = x[b, 0:2 * D:2], x[b, 1:2 * D:2]
        assert len(set(keys.tolist())) == D and ((keys >= 1) & (keys <= 40)).all()
        assert ((values > 40) & (values <= 70)).all()
        table = dict(zip(keys.tolist(), values.tolist()))
        answers = (y[b] != IGNORE).nonzero().flatten()
        assert len(answers) == D and (answers >= 2 * D).all()
        for t in answers.tolist():
            assert y[b, t] == table[int(x[b, t])] == x[b, t + 1]  # teacher-forced: the value follows
        assert sorted(x[b, answers].tolist()) == sorted(keys.tolist())  # each key queried once
        rest = torch.ones(64, dtype=torch.bool)
        rest[:2 * D], rest[answers], rest[answers + 1] = False, False, False
        assert (x[b, rest] == 0).all()  # filler everywhere else


def test_needle_answer_is_the_value_after_the_needle_key():
    cfg = RecallDataConfig(kind="needle", n_keys=10, n_values=10, n_noise=50)
    x, y = needle_batch(32, 40, cfg, torch.Generator().manual_seed(1))
    for b in range(32):
        key = int(x[b, -1])
        assert 1 <= key <= 10
        at = [t for t in range(39) if x[b, t] == key]
        assert len(at) == 1 and y[b, -1] == x[b, at[0] + 1]
        assert (y[b, :-1] == IGNORE).all()
        hay = torch.ones(40, dtype=torch.bool)
        hay[[at[0], at[0] + 1, 39]] = False
        assert (x[b, hay] > 10).all()  # value and noise ids in the haystack, never a key
    assert ((x[:, :-1] > 10) & (x[:, :-1] <= 20)).sum() > 32 * 5  # distractor values: no "copy the value" shortcut
    for depth, at in ((0.0, 0), (0.5, 18), (1.0, 37)):  # p = round(depth * (L - 3))
        x, y = needle_batch(4, 40, cfg, torch.Generator().manual_seed(2), depth=depth)
        assert (x[:, at] == x[:, -1]).all() and (x[:, at + 1] == y[:, -1]).all()


class _CopyLastValue(torch.nn.Module):
    """The shortcut a needle without distractors allows: answer with the latest value id seen so far."""

    def __init__(self, cfg: RecallDataConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, x):
        v0, v1 = 1 + self.cfg.n_keys, 1 + self.cfg.n_keys + self.cfg.n_values
        logits = torch.zeros(*x.shape, self.cfg.vocab_size)
        for b in range(x.shape[0]):
            last = v0
            for t in range(x.shape[1]):
                if v0 <= int(x[b, t]) < v1:
                    last = int(x[b, t])
                logits[b, t, last] = 1.0
        return logits


def test_needle_needs_the_key_a_value_copier_is_near_chance():
    cfg = RecallDataConfig(kind="needle", n_keys=8, n_values=8, n_noise=8)
    assert recall_accuracy(_Oracle(cfg.vocab_size), cfg, 64, 1, 64, 0, 32, "cpu", depth=0.5) == 1.0
    assert recall_accuracy(_CopyLastValue(cfg), cfg, 64, 1, 256, 0, 64, "cpu") < 0.25  # chance 1/8


class _Oracle(torch.nn.Module):
    """Looks every key up in the sequence so far: logits put all mass on the value that followed it."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, x):
        B, L = x.shape
        logits = torch.zeros(B, L, self.vocab_size)
        for b in range(B):
            seen = {}
            for t in range(L):
                k = int(x[b, t])
                if k in seen:
                    logits[b, t, seen[k]] = 1.0
                if t + 1 < L:
                    seen.setdefault(k, int(x[b, t + 1]))
        return logits


class _Constant(torch.nn.Module):
    def __init__(self, vocab_size: int, token: int):
        super().__init__()
        self.vocab_size, self.token = vocab_size, token

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab_size)
        logits[..., self.token] = 1.0
        return logits


@pytest.mark.parametrize("kind", ["mqar", "needle"])
def test_accuracy_is_one_for_a_lookup_oracle_and_chance_for_a_constant(kind):
    cfg = RecallDataConfig(kind=kind, n_keys=20, n_values=4, n_noise=30)
    assert recall_accuracy(_Oracle(cfg.vocab_size), cfg, 48, 6, 20, 0, 8, "cpu") == 1.0
    const = recall_accuracy(_Constant(cfg.vocab_size, 1 + cfg.n_keys), cfg, 48, 6, 200, 0, 50, "cpu")
    assert 0.15 < const < 0.35  # one of 4 values


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.n_pairs=20 needs data.seq_len >= 80"):
        RecallDataConfig(seq_len=64, n_pairs=20)
    with pytest.raises(ConfigError, match="data.kind"):
        RecallDataConfig(kind="copy")
    with pytest.raises(ConfigError, match="data.eval_depths"):
        RecallDataConfig(kind="needle", eval_depths=[0.5, 1.5])
    assert task_for("gpt", "recall").name == "recall"
    with pytest.raises(ConfigError, match="cannot train model.family='resnet'"):
        task_for("resnet", "recall")


def _tree(steps):
    return {"task": {"name": "recall"},
            "data": {"seq_len": 32, "train_seq_lens": [16, 32], "n_pairs": 4, "n_keys": 16, "n_values": 16,
                     "n_noise": 8,
                     "eval_seq_lens": [16, 32, 64], "eval_n_pairs": [2, 4], "eval_examples": 16},
            "model": {"family": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
            "train": {"seed": 3, "batch_size": 16, "max_steps": steps, "lr": 3e-3, "warmup_steps": 5,
                      "eval_every": steps // 2, "ckpt_every": steps // 2, "log_every": 1, "eval_batch_size": 16}}


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_recall_trains_a_gpt_writes_the_grid_and_resumes_exactly(tmp_path):
    steps = 30
    ref = tmp_path / "ref"
    run_training(recipe_from_tree(_tree(steps)), ref, log=lambda *a: None)
    ev = json.loads((ref / "eval.json").read_text())
    assert set(ev["accuracy"]) == {"2", "4"} and set(ev["accuracy"]["4"]) == {"16", "32", "64"}
    assert set(ev["accuracy"]["2"]) == {"16", "32", "64"}
    assert (ref / "recall.png").stat().st_size > 1000 and ev["train_seq_lens"] == [16, 32]
    losses = _losses(ref)
    assert sum(losses[s] for s in range(26, 31)) < sum(losses[s] for s in range(1, 6)) - 0.5

    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    for ckpt in (run / "checkpoints").iterdir():
        if ckpt.name != f"step_{steps // 2:06d}":
            shutil.rmtree(ckpt)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(x for x in lines if json.loads(x)["step"] <= steps // 2) + "\n")
    run_training(recipe_from_tree(_tree(steps)), run, resume=True, log=lambda *a: None)
    assert _losses(run) == losses


def test_needle_run_writes_a_depth_by_length_grid(tmp_path):
    tree = _tree(4)
    tree["data"] = {"kind": "needle", "seq_len": 16, "n_keys": 8, "n_values": 8, "n_noise": 8,
                    "eval_seq_lens": [16, 32], "eval_depths": [0.0, 1.0], "eval_examples": 8}
    run_training(recipe_from_tree(tree), tmp_path / "run", log=lambda *a: None)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["kind"] == "needle" and set(ev["accuracy"]) == {"0", "1"}
    assert all(set(row) == {"16", "32"} and all(0 <= a <= 1 for a in row.values()) for row in ev["accuracy"].values())


def test_make_batch_is_deterministic_given_the_seed():
    cfg = RecallDataConfig()
    a = make_batch(cfg, 4, 128, 8, torch.Generator().manual_seed(5))
    b = make_batch(cfg, 4, 128, 8, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
