"""Hyperparameter sweeps on Optuna: ``weightsmith sweep RECIPE --param KEY=SPEC ... --trials N --out DIR``.

Each trial is an ordinary run of the recipe through :func:`weightsmith.train.loop.train`, with the
sampled values as dotted overrides, into ``DIR/trial_K`` (K is Optuna's trial number). Its objective is
one number of the run's ``eval.json`` (``--metric``; default ``val_bpb`` for language models, ``val_acc``
for classifiers, else ``val_loss``). Sampling is Optuna's TPE (Bergstra et al. 2011) with a seed; with
``--prune``, Optuna's MedianPruner stops a trial whose quick-eval value at some step is worse than the
median of earlier trials' at that step (the trainer's ``on_eval`` hook; the value reported is the
metric itself when the quick eval has it, else its validation loss, e.g. ``val_loss_partial``).

``DIR`` holds:

- ``study.db``: the Optuna study (sqlite storage). Rerunning the same command resumes it: finished
  trials (complete, pruned or failed) are kept, and only the missing ones run. A trial cut short by
  Ctrl-C or a kill is run again with the same values, under a new number;
- ``sweep.json``: the settings, every trial (number, state, value, values, run directory) and the best;
- ``results.md``: the same as a table, best first; ``best_config.toml``: the best trial's resolved config.

Search space specs (``--param KEY=SPEC``, KEY a dotted recipe field such as ``train.lr``):
``log:LO:HI`` (float, log-uniform), ``float:LO:HI`` (uniform), ``int:LO:HI`` (inclusive),
``choice:A,B,...`` (values read as TOML, else as strings).
"""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.errors import ConfigError, TrainingInterrupted, WeightsmithError

KINDS = ("log", "float", "int", "choice")
DEFAULT_METRICS = {"causal-lm": "val_bpb", "distill": "val_bpb", "classification": "val_acc"}
STUDY = "weightsmith-sweep"


@dataclass(frozen=True)
class Param:
    """One searched field: ``key`` (dotted, ``train.lr``), ``kind`` (one of KINDS), ``low``/``high``
    (log, float, int) or ``choices`` (choice)."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    spec: str = ""


def _toml_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_param(spec: str) -> Param:
    """``"train.lr=log:1e-4:1e-2"`` -> :class:`Param`.

    Raises:
        ConfigError: one line naming the spec and the allowed forms.
    """
    forms = "log:LO:HI, float:LO:HI, int:LO:HI or choice:A,B,..."
    key, _, body = spec.partition("=")
    kind, _, rest = body.partition(":")
    key = key.strip()
    if not body or len(key.split(".")) != 2 or not all(key.split(".")):
        raise ConfigError(f"--param {spec!r} must look like SECTION.KEY=SPEC with SPEC {forms}, "
                          "e.g. train.lr=log:1e-4:1e-2")
    if kind not in KINDS:
        raise ConfigError(f"--param {spec!r}: unknown kind {kind!r}; SPEC is {forms}")
    if kind == "choice":
        choices = tuple(_toml_scalar(x.strip()) for x in rest.split(",") if x.strip())
        if not choices or not all(isinstance(c, bool | int | float | str) for c in choices):
            raise ConfigError(f"--param {spec!r}: choice needs one or more comma-separated numbers, booleans "
                              "or strings, e.g. train.schedule=choice:cosine,wsd")
        return Param(key, kind, choices=choices, spec=spec)
    bounds = rest.split(":")
    try:
        if len(bounds) != 2:
            raise ValueError
        low, high = (int(b) for b in bounds) if kind == "int" else (float(b) for b in bounds)
    except ValueError:
        raise ConfigError(f"--param {spec!r}: {kind} needs two {'integer' if kind == 'int' else 'number'} "
                          f"bounds, {kind}:LO:HI (e.g. {key}={kind}:{'1:8' if kind == 'int' else '1e-4:1e-2'})"
                          ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high or (kind == "log" and low <= 0):
        raise ConfigError(f"--param {spec!r}: need LO < HI{' and LO > 0 for log' if kind == 'log' else ''}, "
                          f"got {low} and {high}")
    return Param(key, kind, low, high, spec=spec)


def _override(key: str, value: Any) -> str:
    """A dotted override whose TOML value reads back as ``value``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value)
    else:
        text = repr(value)
    return f"--{key}={text}"


def _suggest(trial, p: Param) -> Any:
    if p.kind == "choice":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high))
    return trial.suggest_float(p.key, p.low, p.high, log=p.kind == "log")


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("weightsmith sweep needs optuna: pip install 'weightsmith[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class _TrialFailed(Exception):
    """A trial's run raised a WeightsmithError (diverged, impossible shape): the trial fails, the sweep goes on."""


def run_sweep(recipe_path: str | Path, param_specs: list[str], *, trials: int, out: str | Path,
              metric: str | None = None, direction: str | None = None, seed: int = 0, prune: bool = False,
              overrides: list[str] | None = None, log=print) -> dict[str, Any]:
    """Run (or resume) a sweep in ``out`` until the study holds ``trials`` finished trials; returns
    what ``sweep.json`` holds.

    Raises:
        ConfigError: a bad ``--param``, an unknown recipe field, ``trials`` < 1, ``out`` holding a sweep
            with other settings, or a ``metric`` missing from the trials' eval.json.
        TrainingInterrupted: Ctrl-C / SIGTERM in a trial (that trial runs again on resume).
    """
    from weightsmith.recipe import load_recipe

    params = [parse_param(s) for s in param_specs]
    if len({p.key for p in params}) < len(params):
        raise ConfigError(f"--param names a field twice: {[p.key for p in params]}")
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    base = list(overrides or [])
    recipe = load_recipe(recipe_path, base)
    for p in params:  # every searched key must be a recipe field: build the recipe at the param's first value
        try:
            load_recipe(recipe_path, base + [_override(p.key, p.choices[0] if p.kind == "choice" else p.low)])
        except ConfigError as e:
            raise ConfigError(f"--param {p.spec!r}: {e}") from None
    metric = metric or DEFAULT_METRICS.get(recipe.task_name, "val_loss")
    direction = direction or ("maximize" if "acc" in metric else "minimize")
    settings = {"recipe": str(recipe_path), "params": [p.spec for p in params], "overrides": base,
                "metric": metric, "direction": direction, "prune": prune}

    optuna = _import_optuna()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a sweep directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "study.db").is_file():
        raise ConfigError(f"--out {out} exists, is not empty and holds no sweep (study.db); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if prune else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}", direction=direction,
                                pruner=pruner, load_if_exists=True)
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
    elif {k: v for k, v in saved.items() if k != "prune"} != {k: v for k, v in settings.items() if k != "prune"}:
        changed = [k for k in settings if k != "prune" and saved.get(k) != settings[k]]
        raise ConfigError(f"{out} holds a sweep with other settings ({', '.join(changed)}: {saved[changed[0]]!r}); "
                          "rerun it with the same recipe, --param, overrides and --metric, or choose another --out")
    TrialState = optuna.trial.TrialState
    rerun = set(study.user_attrs.get("rerun", []))  # trials cut short and queued again (one sweep process)
    for t in study.trials:  # cut short by a kill (still RUNNING) or by Ctrl-C: run the same point again
        if t.number in rerun:
            continue
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
            continue
        rerun.add(t.number)
        study.enqueue_trial(t.params)
    study.set_user_attr("rerun", sorted(rerun))
    finished = [t for t in study.trials if t.state.is_finished() and t.number not in rerun]
    # a fresh seed per session (seed + trials so far), so a resumed sweep does not repeat its first points
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))

    def objective(trial) -> float:
        values = {p.key: _suggest(trial, p) for p in params}
        run_dir = out / f"trial_{trial.number}"
        trial.set_user_attr("run_dir", str(run_dir))
        if run_dir.exists():  # a number reused after a crash of the study itself: start clean
            shutil.rmtree(run_dir)
        pruned = []

        def on_eval(step: int, result: dict) -> bool:
            value = result.get(metric)
            if value is None and direction == "minimize":
                value = next((v for k, v in result.items() if "loss" in k), None)
            if not isinstance(value, int | float):
                return False
            trial.report(float(value), step)
            if trial.should_prune():
                pruned.append(step)
                return True
            return False

        log(f"trial {trial.number}: {values} -> {run_dir}")
        try:
            train(recipe_path, base + [_override(k, v) for k, v in values.items()], out=run_dir, log=log,
                  on_eval=on_eval if prune else None)
        except TrainingInterrupted:
            trial.set_user_attr("interrupted", True)
            raise
        except WeightsmithError as e:
            trial.set_user_attr("error", str(e))
            log(f"trial {trial.number} failed: {e}")
            raise _TrialFailed(str(e)) from None
        result = json.loads((run_dir / "eval.json").read_text())
        if pruned:  # its eval.json is of the model at the pruned step: kept apart from complete trials' values
            trial.set_user_attr("pruned_at_step", pruned[0])
            trial.set_user_attr("value_at_prune", result.get(metric))
            raise optuna.TrialPruned(f"pruned at step {pruned[0]}")
        if not isinstance(result.get(metric), int | float):
            raise ConfigError(f"--metric {metric!r} is not a number in {run_dir / 'eval.json'}; choose one of "
                              f"{sorted(k for k, v in result.items() if isinstance(v, int | float))}")
        return float(result[metric])

    from weightsmith.train.loop import train

    remaining = trials - len(finished)
    if remaining > 0:
        try:
            study.optimize(objective, n_trials=remaining, catch=(_TrialFailed,),
                           callbacks=[lambda s, t: write_results(s, out, settings)])
        except TrainingInterrupted as e:
            write_results(study, out, settings)
            raise TrainingInterrupted(f"sweep {out} stopped in trial {len(study.trials) - 1}; rerun the same "
                                      "`weightsmith sweep` command to resume it (that trial runs again)",
                                      exit_code=e.exit_code) from None
    return write_results(study, out, settings)


def write_results(study, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """sweep.json, results.md and best_config.toml from the study; returns sweep.json's content."""
    from weightsmith.fsio import atomic_write_text

    rows = []
    for t in study.trials:
        # a pruned trial's own value is its last quick-eval report, not the metric: left out
        value = t.value if t.state.name == "COMPLETE" else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": value, "params": t.params,
                     "run_dir": t.user_attrs.get("run_dir"), "error": t.user_attrs.get("error"),
                     "pruned_at_step": t.user_attrs.get("pruned_at_step"),
                     "value_at_prune": t.user_attrs.get("value_at_prune"),
                     "rerun": t.number in study.user_attrs.get("rerun", [])})
    done = [r for r in rows if r["state"] == "complete"]
    best = None
    if done:
        bt = study.best_trial
        best = next(r for r in rows if r["number"] == bt.number)
        cfg = Path(best["run_dir"]) / "config.toml"
        if cfg.is_file():
            atomic_write_text(out / "best_config.toml", cfg.read_text())
    result = {**settings, "trials": rows, "best": best}
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2))
    sign = -1 if settings["direction"] == "maximize" else 1
    order = sorted(rows, key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0), r["number"]))
    keys = [s.split("=", 1)[0] for s in settings["params"]]
    lines = [f"# sweep {out}: {settings['metric']} ({settings['direction']})\n",
             "| trial | state | " + settings["metric"] + " | " + " | ".join(keys) + " | run |",
             "|" + "---|" * (len(keys) + 4)]
    for r in order:
        value = "" if r["value"] is None else f"{r['value']:.6g}"
        if r["value_at_prune"] is not None:
            value = f"({r['value_at_prune']:.6g} at step {r['pruned_at_step']})"
        cells = [f"{r['params'].get(k, ''):.6g}" if isinstance(r["params"].get(k), float)
                 else str(r["params"].get(k, "")) for k in keys]
        lines.append(f"| {r['number']} | {r['state']} | {value} | " + " | ".join(cells) + f" | {r['run_dir']} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    return result
