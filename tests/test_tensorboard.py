"""train.tensorboard: the event files in RUN/tb hold exactly the numbers of metrics.jsonl and eval.json,
read back with TensorBoard's own EventAccumulator (float32, as TensorBoard stores scalars)."""

import json
import math

import numpy as np
import pytest
from test_distributed import run, setup  # noqa: F401  (setup is a fixture)
from test_trainer import _recipe

from weightsmith.train.faults import ENV
from weightsmith.train.loop import _read_metrics, train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

QUIET = lambda *a: None  # noqa: E731


def _read_tb(run):
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(run):
    """{tag: [(step, float32 value)]} built from metrics.jsonl and eval.json by hand."""
    want: dict[str, list] = {}
    rows = _read_metrics(run / "metrics.jsonl")
    for r in rows:
        kind = "train" if "lr" in r else "val"
        for k, v in r.items():
            if k == "grad_norm":
                for g, x in v.items():
                    want.setdefault(f"grad_norm/{g}", []).append((r["step"], np.float32(x)))
            elif k != "step":
                want.setdefault(f"{kind}/{k}", []).append((r["step"], np.float32(v)))
    last = max(r["step"] for r in rows)
    for k, v in json.loads((run / "eval.json").read_text()).items():
        if isinstance(v, int | float) and math.isfinite(v):
            want[f"eval/{k}"] = [(last, np.float32(v))]
    return want


def test_event_files_equal_metrics_jsonl_and_eval_json(tmp_path, tiny_corpus, cache_dir):
    run = train(_recipe(tmp_path, tiny_corpus, steps=12, ckpt_every=100),
                ["--train.tensorboard=true", "--train.log_grad_norms=true", "--train.eval_every=5"],
                out=tmp_path / "run", log=QUIET)
    got, want = _read_tb(run), _expected(run)
    assert {"train/loss", "train/lr", "train/grad_norm_total", "train/tok_per_s", "val/val_loss_partial",
            "eval/val_bpb", "grad_norm/blocks.0"} <= set(want)
    assert set(got) == set(want)
    for tag in want:
        assert got[tag] == want[tag], tag  # same steps, same float32 values
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))
    assert [s for s, _ in got["val/val_loss_partial"]] == [5, 10]


def test_a_rewind_purges_the_rewound_steps_from_tensorboard_too(tmp_path, tiny_corpus, cache_dir, monkeypatch):
    # steps 5-8 are logged, then the third NaN (micro-batch 10) rewinds to the checkpoint at step 4 and
    # steps 5.. are trained again on later data: TensorBoard must show only the second version
    monkeypatch.setenv(ENV, "nan_loss@6,nan_loss@8,nan_loss@10")
    run = train(_recipe(tmp_path, tiny_corpus, steps=12, ckpt_every=4),
                ["--train.tensorboard=true", "--train.eval_every=6", "--train.rewind_events=3",
                 "--train.rewind_window=20", "--train.keep_checkpoints=0"], out=tmp_path / "run", log=QUIET)
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "rewind" and events[-1]["to_step"] == 4
    got, want = _read_tb(run), _expected(run)
    assert set(got) == set(want)
    for tag in want:
        assert got[tag] == want[tag], tag
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))  # once each, though 5-8 were logged twice


@pytest.mark.dist
def test_under_torchrun_only_rank_0_writes_events(setup):  # noqa: F811
    proc = run(setup, "ddp-tb", "--train.parallel=ddp", "--train.tensorboard=true", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = setup[0] / "ddp-tb"
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    got, want = _read_tb(run_dir), _expected(run_dir)
    assert set(got) == set(want) and all(got[t] == want[t] for t in want)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 7))


def test_a_resume_purges_the_steps_logged_after_its_checkpoint(tmp_path, tiny_corpus, cache_dir):
    import shutil

    recipe = _recipe(tmp_path, tiny_corpus, steps=8, ckpt_every=4)
    args = ["--train.tensorboard=true", "--train.keep_checkpoints=0"]
    run = train(recipe, args, out=tmp_path / "run", log=QUIET)
    shutil.rmtree(run / "checkpoints" / "step_000008")  # as if killed after logging steps 5-8, before saving 8
    train(recipe, args, out=run, resume=True, log=QUIET)
    got, want = _read_tb(run), _expected(run)
    assert set(got) == set(want) and all(got[t] == want[t] for t in want)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))  # steps 5-8 once, not twice
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2
