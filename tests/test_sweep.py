"""weightsmith sweep on Optuna: each trial is a normal run in OUT/trial_K, the best value is its eval.json
number, a rerun resumes the study without rerunning finished trials (and reruns one cut short), pruning
reports the quick-eval rows, and a bad --param is one line."""

import json

import pytest
from test_cli import one_line
from test_tasks_classification import _tree, folder  # noqa: F401  (folder is a fixture)
from test_trainer import _recipe

from weightsmith.cli import main
from weightsmith.errors import ConfigError
from weightsmith.sweep import parse_param, run_sweep
from weightsmith.train.loop import _read_metrics

optuna = pytest.importorskip("optuna")
QUIET = lambda *a: None  # noqa: E731
SPACE = ["train.lr=log:1e-4:1e-2", "train.warmup_steps=int:0:4"]


def _sweep(out, recipe, trials, **kw):
    return run_sweep(recipe, SPACE, trials=trials, out=out, seed=3, log=QUIET, **kw)


def _study(out):
    return optuna.load_study(study_name="weightsmith-sweep", storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture()
def recipe(tmp_path, tiny_corpus, cache_dir):
    return _recipe(tmp_path, tiny_corpus, steps=8, ckpt_every=100)


def test_three_trials_best_value_is_its_eval_json_and_a_rerun_only_adds_trials(tmp_path, recipe):
    out = tmp_path / "sw"
    res = _sweep(out, recipe, 3)
    assert [t["state"] for t in res["trials"]] == ["complete"] * 3 and res["metric"] == "val_bpb"
    values = {}
    for t in res["trials"]:
        run = tmp_path / "sw" / f"trial_{t['number']}"
        assert t["run_dir"] == str(run)
        ev = json.loads((run / "eval.json").read_text())
        assert t["value"] == ev["val_bpb"]
        cfg = (run / "config.toml").read_text()
        assert f"lr = {t['params']['train.lr']!r}" in cfg
        assert f"warmup_steps = {t['params']['train.warmup_steps']}" in cfg
        values[t["number"]] = t["value"]
    best = res["best"]
    assert best["value"] == min(values.values()) == json.loads((out / f"trial_{best['number']}" / "eval.json")
                                                               .read_text())["val_bpb"]
    assert (out / "best_config.toml").read_text() == (out / f"trial_{best['number']}" / "config.toml").read_text()
    assert json.loads((out / "sweep.json").read_text()) == res
    assert len({json.dumps(t["params"]) for t in res["trials"]}) == 3

    # resume: a trial left RUNNING (the process was killed) is failed and its point run again, and one
    # new trial is added; trials 0-2 are not rerun (their files are untouched)
    stamps = {n: (out / f"trial_{n}" / "eval.json").stat().st_mtime_ns for n in values}
    study = _study(out)
    killed = study.ask()
    lr = killed.suggest_float("train.lr", 1e-4, 1e-2, log=True)
    warm = killed.suggest_int("train.warmup_steps", 0, 4)
    res2 = _sweep(out, recipe, 4)
    assert {n: (out / f"trial_{n}" / "eval.json").stat().st_mtime_ns for n in values} == stamps
    states = [(t["number"], t["state"], t["rerun"]) for t in res2["trials"]]
    assert states == [(0, "complete", False), (1, "complete", False), (2, "complete", False),
                      (3, "fail", True), (4, "complete", False)]
    assert res2["trials"][4]["params"] == {"train.lr": lr, "train.warmup_steps": warm}
    assert [t["params"] for t in res2["trials"][:3]] == [t["params"] for t in res["trials"]]
    assert _sweep(out, recipe, 4)["trials"] == res2["trials"]  # nothing left to run
    with pytest.raises(ConfigError, match="other settings"):
        run_sweep(recipe, SPACE[:1], trials=5, out=out, log=QUIET)


def test_pruning_stops_a_trial_below_the_median_and_reports_the_quick_eval_rows(tmp_path, recipe):
    out = tmp_path / "sw"
    out.mkdir()
    study = optuna.create_study(study_name="weightsmith-sweep", storage=f"sqlite:///{out / 'study.db'}")
    for lr in (1e-2, 1e-2, 1e-6):  # two trials that learn, then one that barely moves: pruned at its first report
        study.enqueue_trial({"train.lr": lr, "train.warmup_steps": 0})
    space = ["train.lr=log:1e-6:1e-2", "train.warmup_steps=int:0:4"]
    res = run_sweep(recipe, space, trials=3, out=out, prune=True, overrides=["--train.eval_every=2"], log=QUIET)
    assert [(t["state"], t["pruned_at_step"]) for t in res["trials"]] == [("complete", None), ("complete", None),
                                                                          ("pruned", 2)]
    for t, ft in zip(res["trials"], _study(out).trials):
        rows = _read_metrics(out / f"trial_{t['number']}" / "metrics.jsonl")
        assert ft.intermediate_values == {r["step"]: r["val_loss_partial"] for r in rows if "val_loss_partial" in r}
        ev = json.loads((out / f"trial_{t['number']}" / "eval.json").read_text())
        if t["state"] == "pruned":  # stopped at the pruned step, still evaluated; no value beside complete ones
            assert max(r["step"] for r in rows) == 2 and t["value"] is None and t["value_at_prune"] == ev["val_bpb"]
        else:
            assert max(ft.intermediate_values) == 6 and t["value"] == ev["val_bpb"]
    assert res["best"]["number"] in (0, 1)
    assert "(" in (out / "results.md").read_text().splitlines()[-1]  # the pruned row sorts last, value in ()


@pytest.mark.parametrize("spec, needle", [
    ("train.lr=log:1e-4", "two number bounds"),
    ("train.lr=log:0:1e-2", "LO > 0"),
    ("train.lr=log:1e-2:1e-4", "LO < HI"),
    ("lr=log:1e-4:1e-2", "SECTION.KEY=SPEC"),
    ("train.lr=gauss:1:2", "unknown kind 'gauss'"),
    ("train.max_steps=int:1.5:4", "two integer bounds"),
    ("train.schedule=choice:", "choice needs"),
])
def test_bad_param_is_one_line(spec, needle, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--param"):
        parse_param(spec)
    one_line(capsys, "sweep", "recipes/tiny.toml", "--param", spec, "--trials", "2", "--out", str(tmp_path / "s"),
             needles=(needle, spec))
    assert not (tmp_path / "s").exists()


def test_unknown_field_and_bad_trials_are_one_line(tmp_path, capsys):
    one_line(capsys, "sweep", "recipes/tiny.toml", "--param", "train.lrr=log:1e-4:1e-2", "--trials", "2",
             "--out", str(tmp_path / "s"), needles=("lrr",))
    one_line(capsys, "sweep", "recipes/tiny.toml", "--param", "train.lr=log:1e-4:1e-2", "--trials", "0",
             "--out", str(tmp_path / "s"), needles=("--trials",))
    assert not (tmp_path / "s").exists()


def test_choice_values_are_read_as_toml():
    p = parse_param("train.schedule=choice:cosine, wsd")
    assert p.choices == ("cosine", "wsd")
    assert parse_param("model.n_layers=choice:1,2,4").choices == (1, 2, 4)
    assert parse_param("train.compile=choice:true,false").choices == (True, False)


def test_cli_sweep_passes_overrides_to_every_trial_and_prints_the_best(tmp_path, recipe, capsys):
    out = tmp_path / "sw"
    code = main(["sweep", str(recipe), "--param", "train.lr=log:1e-4:1e-2", "--trials", "1", "--out", str(out),
                 "--train.max_steps=4", "--metric", "val_loss"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    ev = json.loads((out / "trial_0" / "eval.json").read_text())
    assert printed.startswith(f"sweep {out}: 1 trials; best trial 0 val_loss {ev['val_loss']:.6g} with")
    assert max(r["step"] for r in _read_metrics(out / "trial_0" / "metrics.jsonl")) == 4
    assert json.loads((out / "sweep.json").read_text())["best"]["value"] == ev["val_loss"]


def test_a_classifier_sweep_maximizes_val_acc_and_reports_it_for_pruning(tmp_path, folder, cache_dir):  # noqa: F811
    from weightsmith.config import dump_toml

    recipe = tmp_path / "clf.toml"
    recipe.write_text(dump_toml(_tree(folder, max_steps=10, eval_every=5)))
    out = tmp_path / "sw"
    res = run_sweep(recipe, ["train.lr=log:1e-3:1e-2"], trials=1, out=out, prune=True, log=QUIET)
    assert (res["metric"], res["direction"]) == ("val_acc", "maximize")
    ev = json.loads((out / "trial_0" / "eval.json").read_text())
    assert res["best"]["value"] == ev["val_acc"]
    rows = [r for r in _read_metrics(out / "trial_0" / "metrics.jsonl") if "val_acc" in r]
    assert _study(out).trials[0].intermediate_values == {5: rows[0]["val_acc"]}


def test_ctrl_c_in_a_trial_stops_the_sweep_and_a_rerun_runs_that_point_again(tmp_path, recipe, monkeypatch):
    import weightsmith.train.loop as loop
    from weightsmith.errors import TrainingInterrupted

    real, calls = loop.train, []

    def train(*args, **kw):  # the second trial is interrupted (as SIGINT makes the trainer raise)
        calls.append(args[1])
        if len(calls) == 2:
            raise TrainingInterrupted("SIGINT at step 3: checkpoint written", exit_code=130)
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train", train)
    out = tmp_path / "sw"
    with pytest.raises(TrainingInterrupted, match="rerun the same `weightsmith sweep` command") as e:
        _sweep(out, recipe, 3)
    assert e.value.exit_code == 130
    monkeypatch.setattr(loop, "train", real)
    res = _sweep(out, recipe, 3)
    assert [(t["number"], t["state"]) for t in res["trials"]] == [(0, "complete"), (1, "fail"), (2, "complete"),
                                                                  (3, "complete")]
    assert res["trials"][1]["rerun"] and res["trials"][2]["params"] == res["trials"][1]["params"]
    assert res["best"]["number"] != 1


def test_a_metric_missing_from_eval_json_is_one_line(tmp_path, recipe, capsys):
    one_line(capsys, "sweep", str(recipe), "--param", "train.lr=log:1e-4:1e-2", "--trials", "1", "--out",
             str(tmp_path / "sw"), "--metric", "val_nope", needles=("val_nope", "val_bpb"))
