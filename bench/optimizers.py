"""AdamW, Muon and Lion on the main job at equal wall time, side by side in one run.

    python bench/optimizers.py [--out bench/results/optimizers.json] [--recipe recipes/shakespeare.toml]
                               [--variant NAME:--train.key=value,--train.key=value ...] [--only NAME ...]

Every variant trains the same recipe (the main job by default, whose ``train.max_time`` is the equal
wall-clock budget of the training loop, 230 s) in a fresh process, one after another, with the data
prepared once beforehand so that no variant pays for it. The default variants:

- ``adamw``: the recipe as it is (AdamW, lr 2e-3);
- ``muon``: Muon at its usual ``muon_lr = 0.02`` for the hidden matrices, AdamW at the recipe's lr for
  embeddings, norms and the (tied) head;
- ``lion``: lr 3x smaller and weight decay 3x larger than AdamW's, the low end of Chen et al.'s advice.

``--variant`` adds (or replaces) one, e.g. ``--variant muon-0.04:--train.optimizer=muon,--train.muon_lr=0.04``.
It records val_bpb from eval.json, steps and tokens trained from metrics.jsonl, tokens/s and MFU from
mfu.json and the wall time of the whole command. Results go to a JSON file and a markdown table beside
it. Run it alone: two cores shared with anything else give wrong speeds, and the equal-time
comparison then measures the neighbour.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = {
    "adamw": [],
    "muon": ["--train.optimizer=muon", "--train.muon_lr=0.02"],
    "lion": ["--train.optimizer=lion", "--train.lr=6.7e-4", "--train.min_lr=3.3e-5", "--train.weight_decay=0.3"],
}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME:--a.b=1,--c.d=2"`` -> ``("NAME", ["--a.b=1", "--c.d=2"])``. Raises SystemExit if malformed."""
    name, sep, rest = text.partition(":")
    overrides = [o for o in rest.split(",") if o]
    if not sep or not name or not all(o.startswith("--") and "=" in o for o in overrides):
        raise SystemExit(f"--variant {text!r}: expected NAME:--section.key=value[,--section.key=value...]")
    return name, overrides


def run_one(name: str, overrides: list[str], recipe: Path, workdir: Path, cache: Path) -> dict:
    out = workdir / name
    env = dict(os.environ, WEIGHTSMITH_CACHE=str(cache))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "weightsmith.cli", "train", str(recipe), "--out", str(out),
                           *overrides], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{proc.stderr[-2000:]}")
    ev = json.loads((out / "eval.json").read_text())
    mfu = json.loads((out / "mfu.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    events = (out / "events.jsonl").read_text().splitlines() if (out / "events.jsonl").is_file() else []
    return {"variant": name, "overrides": overrides, "wall_s": round(wall, 1), "train_s": round(last["elapsed_s"], 1),
            "steps": last["step"], "train_tokens": last["tokens"], "val_bpb": ev["val_bpb"],
            "val_loss": ev["val_loss"], "tok_per_s": mfu["tok_per_s"], "mfu": mfu["mfu"],
            "stability_events": len(events)}


def prepare_data(recipe: Path, workdir: Path, cache: Path) -> None:
    """Fill the data cache with a one-step run, so the timed runs share prepared data."""
    run_one("prepare", ["--train.max_steps=1", "--train.eval_every=1000", "--sample.max_new_tokens=1"],
            recipe, workdir, cache)
    shutil.rmtree(workdir / "prepare")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/optimizers.json"))
    ap.add_argument("--recipe", default=str(ROOT / "recipes/shakespeare.toml"))
    ap.add_argument("--variant", action="append", default=[], help="NAME:--train.key=value,... (repeatable)")
    ap.add_argument("--only", nargs="+", help="run only these variants")
    ap.add_argument("--keep", help="move the run directories here (as DIR/<variant>) instead of deleting them")
    args = ap.parse_args()
    variants = dict(DEFAULT_VARIANTS)
    variants.update(parse_variant(v) for v in args.variant)
    if args.only:
        unknown = set(args.only) - set(variants)
        if unknown:
            raise SystemExit(f"--only: unknown variants {sorted(unknown)}; known: {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
    recipe = Path(args.recipe).resolve()
    budget = tomllib.loads(recipe.read_text()).get("train", {}).get("max_time")
    work = Path(tempfile.mkdtemp(prefix="ws-bench-opt-"))
    cache = work / "cache"
    prepare_data(recipe, work, cache)
    rows = []
    for name, overrides in variants.items():
        rows.append(run_one(name, overrides, recipe, work, cache))
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "recipe": str(recipe.relative_to(ROOT)),
              "train_budget_s": budget, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    limit = f"{budget} s of training each" if budget else "the recipe's max_steps each (no time budget)"
    lines = [f"{result['recipe']}, {limit} unless a row overrides it, data prepared beforehand (wall time "
             "excludes data preparation).", "",
             "| variant | overrides | steps | train tokens | val_bpb | tok/s | MFU | events | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['variant']} | {' '.join(x['overrides']) or '(recipe)'} | {x['steps']} | "
                     f"{x['train_tokens']:,} | {x['val_bpb']:.4f} | {x['tok_per_s']:,.0f} | {x['mfu']:.1%} | "
                     f"{x['stability_events']} | {x['wall_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        for name in variants:
            shutil.move(str(work / name), str(Path(args.keep) / name))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
