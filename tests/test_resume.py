"""Exact resume: SIGKILL after a checkpoint, --resume, and every later loss equals the uninterrupted run,
for every optimizer (its state is part of the checkpoint)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_cli import RECIPE, run_cli


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "lion"])
def test_sigkill_then_resume_gives_identical_losses(tmp_path, tiny_corpus, optimizer):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(corpus=tiny_corpus, tokenizer="char").replace("max_steps = 30", "max_steps = 120")
                      .replace("log_every = 5", "log_every = 1").replace("ckpt_every = 10", "ckpt_every = 20")
                      )
    env = dict(os.environ, WEIGHTSMITH_CACHE=str(tmp_path / "cache"))
    # dropout makes the global RNG state part of what must be restored
    overrides = ["--model.dropout=0.1", f"--train.optimizer={optimizer}"]
    ref = tmp_path / "ref"
    proc = run_cli("train", recipe, "--out", ref, *overrides, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]

    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "weightsmith.cli", "train", str(recipe), "--out", str(run),
                          *overrides], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_000040").exists():
        assert p.poll() is None, "training finished before it could be killed; make the run longer"
        assert time.time() < deadline
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = max(losses(run))
    assert killed_at < 120, "the process was not interrupted"
    with open(run / "metrics.jsonl", "a") as f:  # a process killed mid-write leaves a torn last line
        f.write('{"step": 999, "lo')

    proc = run_cli("train", recipe, "--out", run, "--resume", *overrides, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 121))
    assert a == b  # bit-identical losses at every step, before and after the kill
    ev_a = json.loads((ref / "eval.json").read_text())
    ev_b = json.loads((run / "eval.json").read_text())
    assert ev_a["val_loss"] == ev_b["val_loss"]
