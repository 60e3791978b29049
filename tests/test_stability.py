"""Instability before the optimizer step: injected NaNs and spikes are skipped, repeated ones rewind the
run past their data, every event is in events.jsonl, and the run ends finite (weightsmith.train.stability,
faults injected through weightsmith.train.faults)."""

import json
import math

import pytest
from test_cli import one_line_error, run_cli
from test_resume import losses
from test_trainer import _recipe

from weightsmith.errors import TrainingDiverged
from weightsmith.train.checkpoint import list_checkpoints, load_train_state
from weightsmith.train.faults import ENV
from weightsmith.train.loop import train

QUIET = lambda *a: None  # noqa: E731


def _events(run):
    return [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]


def test_nans_and_spikes_are_skipped_and_repetition_rewinds_past_the_data(tmp_path, tiny_corpus, cache_dir,
                                                                          monkeypatch):
    # one NaN loss and one NaN gradient far apart (skipped only), then two spikes and a NaN within
    # rewind_window steps: the third event rewinds to the checkpoint at step 40
    monkeypatch.setenv(ENV, "nan_loss@5,nan_grad@15,spike@45,spike@48:1000,nan_loss@50")
    run = train(_recipe(tmp_path, tiny_corpus, steps=60, ckpt_every=20),
                ["--train.spike_zscore=4", "--train.spike_window=10", "--train.rewind_events=3",
                 "--train.rewind_window=20", "--train.keep_checkpoints=0"], out=tmp_path / "run", log=QUIET)
    got = losses(run)
    assert sorted(got) == list(range(1, 61)) and all(math.isfinite(v) and v < 10 for v in got.values())
    ev = _events(run)
    assert [e.get("reason", e["event"]) for e in ev] == [
        "nonfinite_loss", "nonfinite_grad_norm", "loss_spike", "loss_spike", "nonfinite_loss", "rewind"]
    assert [e["batches"] for e in ev[:5]] == [[5, 6], [15, 16], [45, 46], [48, 49], [50, 51]]
    assert ev[0]["loss"] == "nan" and ev[1]["grad_norm"] == "nan" and math.isfinite(ev[1]["loss"])
    assert ev[2]["zscore"] > 4 and ev[3]["loss"] > 5 * ev[2]["loss"]
    rewind = ev[5]
    assert rewind["to_step"] == 40 and rewind["checkpoint"] == "step_000040" and rewind["rewinds"] == 1
    # micro-batches 42..50 (drawn after the step-40 checkpoint: 40 kept + 2 skipped before it) are skipped
    assert rewind["skipped_batches"] == [42, 51] and rewind["skipped_steps"] == [41, 47]
    assert [e["step"] for e in ev] == [6, 15, 44, 46, 47, 47]
    resaved = load_train_state(run / "checkpoints" / "step_000040")
    assert resaved["draws"] == 51 and resaved["stability"]["rewinds"] == 1  # a resume starts past the window
    final = load_train_state(list_checkpoints(run)[-1])
    assert final["step"] == 60 and final["draws"] == 51 + 20
    assert math.isfinite(json.loads((run / "eval.json").read_text())["val_loss"])


def test_spikes_pass_unless_the_check_is_on(tmp_path, tiny_corpus, cache_dir, monkeypatch):
    monkeypatch.setenv(ENV, "spike@12:50")
    run = train(_recipe(tmp_path, tiny_corpus, steps=15, ckpt_every=1000), [], out=tmp_path / "run", log=QUIET)
    assert losses(run)[13] > 50 and not (run / "events.jsonl").exists()  # spike_zscore unset: trained on


def test_repeated_instability_after_the_allowed_rewinds_stops_the_run(tmp_path, tiny_corpus, cache_dir,
                                                                      monkeypatch):
    monkeypatch.setenv(ENV, "nan_loss@30-39")  # a bad stretch longer than one rewind skips
    with pytest.raises(TrainingDiverged, match=r"after 1 rewinds \(train.max_rewinds=1\)"):
        train(_recipe(tmp_path, tiny_corpus, steps=60, ckpt_every=10), ["--train.max_rewinds=1"],
              out=tmp_path / "run", log=QUIET)
    ev = _events(tmp_path / "run")
    assert [e["event"] for e in ev] == ["skip"] * 3 + ["rewind"] + ["skip"] * 3
    assert ev[3]["to_step"] == 30 and ev[3]["skipped_batches"] == [30, 33]


def test_instability_with_no_checkpoint_to_rewind_to_is_a_one_line_error(tmp_path, tiny_corpus):
    proc = run_cli("train", _recipe(tmp_path, tiny_corpus, steps=20), "--out", tmp_path / "run",
                   env={"WEIGHTSMITH_CACHE": str(tmp_path / "cache"), ENV: "nan_loss@0-5"})
    one_line_error(proc, "no intact checkpoint before step 1", "train.ckpt_every")
