"""Data-parallel training under real ``torchrun --nproc_per_node=2`` on CPU (gloo), against one process.

Every run trains the tiny GPT of tests/test_cli.py (global batch 4 x grad_accum 2, constant lr) for 6
steps; with 2 ranks each takes 2 rows of every micro-batch. Tolerance for the logged losses, which differ
only in fp32 reduction order (gloo adds the two ranks' gradients instead of one backward summing all
rows): 1e-5 absolute on losses near 3.8. Measured max |difference| over the 6 steps, CPU, torch 2.13:
DDP vs one process 2.4e-7 (one fp32 ulp at 3.8); FSDP2 vs DDP 6.0e-8; resumed 2 -> 1 (DDP, then a plain
process) and 1 -> 2 (a plain process, then FSDP2), 3 steps each side, vs the uninterrupted one-process
run: 2.4e-7 and 2.4e-7.

The multi-process tests carry the ``dist`` marker (``pytest -m dist``): about 65 s in the default run
on 2 cores; the hang test (~45 s, most of it torchrun's own 30 s grace period) is also ``slow``.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from test_cli import RECIPE

from weightsmith.errors import ConfigError
from weightsmith.train import distributed
from weightsmith.train.checkpoint import verify_checkpoint
from weightsmith.train.config import TrainConfig
from weightsmith.train.faults import _parse

TOL = 1e-5
# constant lr: it does not depend on max_steps; grad_accum 2: every step accumulates two micro-batches
CONST = ["--train.schedule=constant", "--train.warmup_steps=0", "--train.grad_accum=2"]


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def max_diff(a, b):
    assert sorted(a) == sorted(b) == list(range(1, 7))
    return max(abs(a[k] - b[k]) for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("dist")
    recipe = root / "r.toml"
    recipe.write_text(RECIPE.format(corpus=tiny_corpus, tokenizer="char").replace("max_steps = 30", "max_steps = 6")
                      .replace("log_every = 5", "log_every = 1").replace("ckpt_every = 10", "ckpt_every = 3")
                      .replace("eval_every = 10", "eval_every = 4"))
    env = dict(os.environ, WEIGHTSMITH_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    env.pop("WEIGHTSMITH_TEST_FAULTS", None)
    return root, recipe, env


def run(setup, out, *args, nproc=None, env=None, timeout=300):
    """``python -m weightsmith train`` in one process (nproc None) or under torchrun."""
    root, recipe, base_env = setup
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                                         "--monitor-interval=1"]
    cmd = [sys.executable, *launcher, "-m", "weightsmith", "train", str(recipe), "--out", str(root / out),
           *CONST, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**base_env, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def reference(setup):
    proc = run(setup, "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return setup[0] / "ref"


@pytest.mark.dist
def test_ddp_equals_one_process_and_fsdp_equals_ddp(setup, reference):
    root = setup[0]
    for mode in ("ddp", "fsdp"):
        proc = run(setup, mode, f"--train.parallel={mode}", nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("run directory:") == 1  # rank 0 alone prints
    ref, ddp, fsdp = losses(reference), losses(root / "ddp"), losses(root / "fsdp")
    assert max_diff(ref, ddp) < TOL
    assert max_diff(ddp, fsdp) < TOL
    for mode in ("ddp", "fsdp"):
        ckpt = root / mode / "checkpoints" / "step_000006"
        files = verify_checkpoint(ckpt)["files"]  # DCP files are hashed with the rest
        assert {".metadata", "__0_0.distcp", "__1_0.distcp", "model.safetensors"} <= set(files)
        ev = json.loads((root / mode / "eval.json").read_text())
        assert abs(ev["val_loss"] - json.loads((reference / "eval.json").read_text())["val_loss"]) < TOL
        assert not any(p.name.startswith(".tmp-") for p in (root / mode / "checkpoints").iterdir())
        assert json.loads((root / mode / "manifest.json").read_text())["world_size"] == 2


@pytest.mark.dist
def test_resume_across_world_sizes_continues_the_curve(setup, reference):
    root = setup[0]
    ref = losses(reference)
    # 2 -> 1: DDP to step 3, then a plain process (no process group) reads the DCP checkpoint
    proc = run(setup, "a21", "--train.parallel=ddp", "--train.max_steps=3", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(setup, "a21", "--resume", "--train.max_steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_000003" in proc.stdout
    assert max_diff(ref, losses(root / "a21")) < TOL
    # 1 -> 2: one process to step 3 (the single-process checkpoint format), then FSDP2 on 2 ranks
    proc = run(setup, "a12", "--train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (root / "a12" / "checkpoints" / "step_000003" / ".metadata").exists()
    proc = run(setup, "a12", "--resume", "--train.max_steps=6", "--train.parallel=fsdp", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(ref, losses(root / "a12")) < TOL


@pytest.mark.dist
def test_killing_one_rank_stops_the_run_with_one_line(setup):
    t0 = time.time()
    proc = run(setup, "killed", "--train.dist_timeout=30", nproc=2, env={"WEIGHTSMITH_TEST_FAULTS": "rank_kill@1:3"},
               timeout=120)
    assert time.time() - t0 < 100
    assert proc.returncode != 0
    assert "fault: SIGKILL of rank 1 at micro-batch 3" in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "rank 0: another rank of this torchrun job died or stopped answering" in errors[0]
    assert "[rank0]: Traceback" not in proc.stderr  # the survivor reports one line, no traceback
    assert max(losses(setup[0] / "killed")) == 1  # micro-batch 3 is the second of step 2


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_that_hangs_times_out_with_one_line(setup):
    """rank 1 SIGSTOPs itself: rank 0 fails its collective after train.dist_timeout (8 s) instead of
    waiting forever; torchrun then needs its own 30 s grace period to SIGKILL the stopped rank (~45 s)."""
    proc = run(setup, "hung", "--train.dist_timeout=8", nproc=2, env={"WEIGHTSMITH_TEST_FAULTS": "rank_stop@1:3"},
               timeout=150)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Timed out waiting 8000ms" in errors[0], proc.stderr[-3000:]


# ---- without torchrun ----

def test_batch_must_divide_by_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="train.batch_size=4 is not divisible by the world size 3"):
        distributed.setup(TrainConfig(batch_size=4, parallel="ddp"))
    with pytest.raises(ConfigError, match="muon"):
        distributed.setup(TrainConfig(batch_size=6, parallel="fsdp", optimizer="muon"))


def test_parallel_field_is_checked():
    with pytest.raises(ConfigError, match=r"train.parallel = 'zero3' is not allowed; choose one of \['none'"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ConfigError, match="train.dist_timeout"):
        TrainConfig(dist_timeout=0)


def test_without_torchrun_the_trainer_is_the_single_process_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed.setup(TrainConfig(parallel="fsdp"))
    assert not d.active and d.world == 1 and d.is_main
    batch = (torch.arange(12).reshape(4, 3), {"y": torch.arange(4)})
    assert d.shard(batch) is batch


def test_ranks_take_disjoint_contiguous_rows_covering_the_batch():
    x = torch.arange(8 * 3).reshape(8, 3)
    y = torch.arange(8)
    parts = [distributed.Dist(mode="ddp", rank=r, world=4).shard((x, {"y": y, "n": 7})) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert [p[1]["y"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(p[1]["n"] == 7 for p in parts)
    with pytest.raises(ConfigError, match="cannot be split over 3 ranks"):
        distributed.Dist(mode="ddp", rank=0, world=3).shard(x)


def test_rank_kill_fault_parses():
    f = _parse("rank_kill@1:3")
    assert f.rank_kill == (1, 3)
    assert f.poison(torch.tensor(2.0), 3).item() == 2.0  # RANK unset is rank 0: not this process


@pytest.mark.dist
def test_fsdp_skips_and_rewinds_like_one_process(setup):
    """NaN losses at micro-batches 7-9 (the fault hook): three skips, then a rewind to step 6 (the
    checkpoint is DCP under FSDP), on both ranks in step; events and losses equal one process's."""
    root = setup[0]
    env = {"WEIGHTSMITH_TEST_FAULTS": "nan_loss@7-9"}
    args = ["--train.max_steps=8", "--train.grad_accum=1"]
    assert run(setup, "rw1", *args, env=env).returncode == 0
    proc = run(setup, "rw2", *args, "--train.parallel=fsdp", nproc=2, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(x) for x in (root / "rw2" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["skip"] * 3 + ["rewind"]
    assert events[3]["checkpoint"] == "step_000006"
    assert (root / "rw1" / "events.jsonl").read_text() == (root / "rw2" / "events.jsonl").read_text()
    a, b = losses(root / "rw1"), losses(root / "rw2")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert max(abs(a[k] - b[k]) for k in a) < TOL


def test_fsdp_refuses_a_task_that_keeps_an_ema_of_the_weights():
    from weightsmith.tasks import get_task

    d = distributed.Dist(mode="fsdp", rank=0, world=2)
    with pytest.raises(ConfigError, match="train.parallel='fsdp' does not support yet; use train.parallel='ddp'"):
        d.check_task(get_task("ddpm").for_contract_tests())
    with pytest.raises(ConfigError, match="'sparse-finetune' updates the full weights .* sparsity mask"):
        d.check_task(get_task("sparse-finetune").for_contract_tests())
    d.check_task(get_task("causal-lm").for_contract_tests())  # no after_step: fine
    distributed.Dist(mode="ddp", rank=0, world=2).check_task(get_task("ddpm").for_contract_tests())
