"""Benchmark the main job against nanoGPT's CPU "baby" configuration, side by side in one run.

    python bench/main_job.py [--out bench/results/main_job.json] [--recipes RECIPE ...] [--keep runs]

The default recipes are the main job (recipes/shakespeare-muon.toml, README command 1, since 2026-12-04)
and nanoGPT's baby configuration; recipes/shakespeare.toml is the AdamW main job before that.

For each recipe it runs ``weightsmith train`` in a fresh process (data preparation included, from a
cold data cache unless --warm-cache), measures the wall-clock time of the whole command, and collects
val_bpb from eval.json and tokens/s and MFU from mfu.json. Results go to a JSON file and a markdown
table beside it.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(recipe: Path, workdir: Path, cache: Path) -> dict:
    out = workdir / recipe.stem
    env = dict(os.environ, WEIGHTSMITH_CACHE=str(cache))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "weightsmith.cli", "train", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{proc.stderr[-2000:]}")
    ev = json.loads((out / "eval.json").read_text())
    mfu = json.loads((out / "mfu.json").read_text())
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in steps if "loss" in r][-1]
    return {"recipe": str(recipe.relative_to(ROOT)), "wall_s": round(wall, 1), "val_bpb": ev["val_bpb"],
            "val_loss": ev["val_loss"], "steps": last["step"], "train_tokens": last["tokens"],
            "tok_per_s": mfu["tok_per_s"], "mfu": mfu["mfu"],
            "matmul_peak_gflops": mfu["matmul_peak_flops_per_s"] / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/main_job.json"))
    ap.add_argument("--recipes", nargs="+",
                    default=[str(ROOT / "recipes/shakespeare-muon.toml"), str(ROOT / "recipes/baby-char.toml")])
    ap.add_argument("--warm-cache", action="store_true", help="reuse $WEIGHTSMITH_CACHE instead of a cold cache")
    ap.add_argument("--keep", help="move the run directories here (as DIR/<recipe stem>) instead of deleting them")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    cache = Path(os.environ.get("WEIGHTSMITH_CACHE", work / "cache")) if args.warm_cache else work / "cache"
    rows = []
    for r in args.recipes:
        if not args.warm_cache and cache.exists():
            shutil.rmtree(cache)  # every recipe pays for its own data preparation, as on a fresh machine
        rows.append(run_one(Path(r).resolve(), work, cache))
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = ["| recipe | wall (s) | steps | train tokens | val_bpb | tok/s | MFU |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['recipe']} | {x['wall_s']} | {x['steps']} | {x['train_tokens']:,} | {x['val_bpb']:.4f} "
                     f"| {x['tok_per_s']:,.0f} | {x['mfu']:.1%} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        for r in args.recipes:
            shutil.move(str(work / Path(r).stem), str(Path(args.keep) / Path(r).stem))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
