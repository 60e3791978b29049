"""SIGKILL inside checkpoint writing, many times: every visible checkpoint stays intact, the run resumes
from the newest one, and the finished run's losses and events equal an uninterrupted run's.

checkpoint.save_checkpoint writes into a hidden ``.tmp-*`` directory and renames it into place, so
what a kill can leave visible is decided at its few renames. The first test kills the writer at random
ones of its fault points (weightsmith.train.faults ``ckpt_kill@N``, between every write, fsync, rename
and deletion), including a re-save of a step after a rewind (old copy moved aside, new one renamed in),
and states, for each kill, which checkpoint the resume must pick. The second kills at random *times*
while a checkpoint is written every step, so kills also land inside a file being written.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_cli import RECIPE, run_cli
from test_resume import losses

from weightsmith.train.checkpoint import list_checkpoints, verify_checkpoint
from weightsmith.train.faults import ENV
from weightsmith.train.loop import _read_metrics

AFTER_RENAME = {"renamed into place", "root fsynced", "old checkpoint hidden", "old checkpoint deleted",
                "old step moved aside"}  # the last: the old copy is moved back on resume


def _recipe(tmp_path, corpus, steps, ckpt_every):
    recipe = tmp_path / "r.toml"
    text = RECIPE.format(corpus=corpus, tokenizer="char").replace("max_steps = 30", f"max_steps = {steps}")
    text = text.replace("log_every = 5", "log_every = 1").replace("ckpt_every = 10", f"ckpt_every = {ckpt_every}")
    recipe.write_text(text.replace("eval_every = 10", "eval_every = 1000"))
    return recipe


def _events(run):
    path = run / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _last_logged(run):
    return max((r["step"] for r in _read_metrics(run / "metrics.jsonl") if "loss" in r), default=0)


def _visible_steps(run):
    """Steps of the listed checkpoints, each of which must verify (no torn checkpoint is ever visible)."""
    steps = []
    for ckpt in list_checkpoints(run):
        steps.append(verify_checkpoint(ckpt)["step"])  # raises CheckpointError if torn
    return steps


def _train(recipe, run, env, resume):
    args = [sys.executable, "-m", "weightsmith.cli", "train", str(recipe), "--out", str(run),
            "--model.dropout=0.1", *(["--resume"] if resume else [])]
    return subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


LABELS = ["tmp dir made", "weights written", "train state written", "files fsynced", "meta written",
          "tmp dir fsynced", "renamed into place", "root fsynced", "old checkpoint hidden", "old checkpoint deleted"]


def _plan(full: bool) -> list[str]:
    """Kill points, one process each: the re-save's rename window first (it happens once per run, at the
    rewind to step 12), then labels in a random order, each at its first or second occurrence in that
    process, and with ``full`` every label plus random point counts."""
    rng = random.Random(13)
    labels = LABELS[:] if full else ["tmp dir made", "renamed into place", "old checkpoint hidden"]
    rng.shuffle(labels)
    plan = ["old step moved aside#1"] + [f"{lab}#{rng.randint(1, 2)}" for lab in labels]
    return plan + ([str(rng.randint(1, 16)) for _ in range(4)] if full else [])


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_kill_at_points_inside_checkpoint_writing(tmp_path, tiny_corpus, full):
    steps, every = (64 if full else 24), 4  # each kill costs up to two saves of progress
    recipe = _recipe(tmp_path, tiny_corpus, steps, every)
    bad = "nan_loss@13-15"  # three NaNs at step 14: a rewind to step 12, which is then re-saved
    env = {"WEIGHTSMITH_CACHE": str(tmp_path / "cache")}
    ref = tmp_path / "ref"
    proc = _train(recipe, ref, {**env, ENV: bad}, resume=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [e["event"] for e in _events(ref)][-1] == "rewind"

    run, labels, resume = tmp_path / "run", [], False
    for kill in _plan(full) + [None]:
        proc = _train(recipe, run, {**env, ENV: bad + (f",ckpt_kill@{kill}" if kill else "")}, resume)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        label = re.search(r"fault: SIGKILL inside checkpoint writing at (.+)", proc.stderr).group(1)
        labels.append(label)
        saving = _last_logged(run)  # the checkpoint of the last logged step was being written
        resave = saving == 12 and any(e["event"] == "rewind" for e in _events(run))
        expected = saving if (label in AFTER_RENAME or resave) else saving - every
        visible = _visible_steps(run)  # every listed checkpoint verifies
        if expected == 0:  # killed inside the very first save: nothing to resume, and a new run is needed
            assert visible == []
            proc = run_cli("train", recipe, "--out", run, "--resume", env=env)
            assert proc.returncode == 2 and "no intact checkpoint" in proc.stderr
            shutil.rmtree(run)
            resume = False
            continue
        # the newest intact checkpoint (a moved-aside one is put back on resume) is the expected one
        assert max(visible + [int(p.name[5:]) for p in (run / "checkpoints").glob(".old-*/step_*")]) == expected
        resume = True
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "old step moved aside" in labels and "renamed into place" in labels and "tmp dir made" in labels
    if full:
        assert set(LABELS) <= set(labels), labels
    assert not resume or "resumed from" in proc.stdout
    assert losses(run) == losses(ref) and sorted(losses(run)) == list(range(1, steps + 1))
    assert _events(run) == _events(ref)  # skips and the rewind recorded once each, as in the uninterrupted run
    assert json.loads((run / "eval.json").read_text()) == json.loads((ref / "eval.json").read_text())
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers cleaned


@pytest.mark.slow
def test_kill_at_random_times_while_checkpointing_every_step(tmp_path, tiny_corpus):
    """Kills at random instants until three have landed inside a checkpoint being written (a hidden
    directory left behind; about a third do on a 2-core machine), checking each time that an intact
    checkpoint remains; then the run finishes and must equal the uninterrupted one."""
    steps = 300
    recipe = _recipe(tmp_path, tiny_corpus, steps, 1)  # a checkpoint every step: much of the time is saving
    env = {"WEIGHTSMITH_CACHE": str(tmp_path / "cache")}
    ref = tmp_path / "ref"
    assert _train(recipe, ref, env, resume=False).returncode == 0
    rng = random.Random(7)
    run, kills, inside = tmp_path / "run", 0, 0
    while inside < 3 and kills < 40:
        args = [sys.executable, "-m", "weightsmith.cli", "train", str(recipe), "--out", str(run),
                "--model.dropout=0.1", *(["--resume"] if kills else [])]
        p = subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start, deadline = _last_logged(run), time.time() + 300
        while p.poll() is None and not (list_checkpoints(run) and _last_logged(run) > start):
            assert time.time() < deadline
            time.sleep(0.002)  # training has started (past imports and data)
        time.sleep(rng.uniform(0.0, 0.3))  # then a random instant: inside a step, a save, or a rotation
        assert p.poll() is None, "the run finished before it could be killed; make it longer"
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        inside += any(q.name.startswith(".") for q in (run / "checkpoints").iterdir())
        assert _visible_steps(run), "a checkpoint existed before the kill; one must stay intact"
    assert inside >= 3, f"only {inside} of {kills} kills landed inside checkpoint writing"
    proc = _train(recipe, run, env, resume=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert losses(run) == losses(ref) and sorted(losses(run)) == list(range(1, steps + 1))
