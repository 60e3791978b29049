"""DPO against SFT at the same wall-clock budget, both started from the main-job model.

    python bench/dpo.py --init runs/shakespeare --time 180 --out bench/results/dpo.md

Three rows, all evaluated on the same held-out pairs and the same sampled prompts and seeds
(weightsmith.tasks.preference, docs/alignment.md):

- ``untouched``: the starting model. Its numbers are the reference's, ``ref_*`` in the DPO run's
  eval.json (the reference *is* the starting weights); the SFT run's ``ref_*`` must agree, and the bench
  stops if they do not.
- ``sft``: ``recipes/shakespeare-sft.toml`` with ``train.max_time = --time``.
- ``dpo``: ``recipes/shakespeare-dpo.toml`` with the same ``train.max_time``.

Each training run is ``python -m weightsmith train`` in a fresh process with ``--train.init_from=INIT``
(``--init none`` passes no override: the recipe's own ``train.init_from``, or its random init).
``--set KEY=VALUE`` adds an override to both runs. The bar: DPO's property rate above SFT's, with
DPO's ``kl_to_ref`` at most ``--kl-bound`` nats/token. Results: ``--out`` (markdown) and the same path
with ``.json``. Run it alone: two shared cores give other step counts at the same wall-clock budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("steps", "pairs_seen", "train_s", "pref_acc", "reward_acc", "property_rate", "kl_to_ref", "val_bpb")


def train_run(recipe: Path, out: Path, overrides: list[str]) -> float:
    """``weightsmith train`` in a fresh process; returns its wall time in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "weightsmith", "train", str(recipe), "--out", str(out), *overrides],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
    return time.perf_counter() - t0


def summarize(run: Path, batch_size: int) -> dict:
    """eval.json, plus the steps and training seconds of the final checkpoint's train state."""
    sys.path.insert(0, str(ROOT / "src"))
    from weightsmith.train.checkpoint import list_checkpoints, load_train_state

    ev = json.loads((run / "eval.json").read_text())
    state = load_train_state(list_checkpoints(run)[-1])
    return {**ev, "steps": state["step"], "pairs_seen": state["step"] * batch_size, "train_s": state["elapsed_s"]}


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", default="runs/shakespeare", help="run to start from, or 'none' (the recipe's own)")
    ap.add_argument("--time", type=float, default=180.0, help="train.max_time of each run, seconds")
    ap.add_argument("--dpo-recipe", default="recipes/shakespeare-dpo.toml")
    ap.add_argument("--sft-recipe", default="recipes/shakespeare-sft.toml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both runs")
    ap.add_argument("--workdir", default="runs/dpo-bench", help="where the two runs go (replaced)")
    ap.add_argument("--kl-bound", type=float, default=0.2, help="the bar's bound on DPO's kl_to_ref, nats/token")
    ap.add_argument("--out", default="bench/results/dpo.md")
    args = ap.parse_args(argv)

    import shutil
    import tomllib

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    common = [f"--train.max_time={args.time}", *(f"--{s}" for s in args.set)]
    if args.init != "none":
        common.append(f"--train.init_from={args.init}")
    results, wall = {}, {}
    for name, recipe in (("sft", args.sft_recipe), ("dpo", args.dpo_recipe)):
        wall[name] = train_run(Path(recipe), work / name, [f"--task.name={name}", *common])
        bs = tomllib.loads((work / name / "config.toml").read_text())["train"]["batch_size"]
        results[name] = summarize(work / name, bs)
    d, s = results["dpo"], results["sft"]
    for key in ("ref_property_rate", "ref_pref_acc"):
        if d[key] != s[key]:
            raise SystemExit(f"the two runs' references disagree on {key} ({d[key]} vs {s[key]}): they did not "
                             "start from the same weights or evaluate the same samples")
    results = {"untouched": {"steps": 0, "pairs_seen": 0, "train_s": 0.0, "pref_acc": d["ref_pref_acc"],
                             "reward_acc": "-", "property_rate": d["ref_property_rate"], "kl_to_ref": 0.0,
                             "val_bpb": d.get("ref_val_bpb", "-")}, **results}
    bar = d["property_rate"] > s["property_rate"] and d["kl_to_ref"] <= args.kl_bound
    lines = [
        "# DPO vs SFT on the verse-lineation property",
        "",
        f"Command: `python bench/dpo.py --init {args.init} --time {args.time:g}"
        + "".join(f" --set {x}" for x in args.set) + f" --out {args.out}`",
        f"Start: `{args.init}`. Budget: train.max_time = {args.time:g} s per run, same batch of pairs; "
        f"held-out pairs: {d['heldout_pairs']}, sampled continuations: {d['eval_samples']} x "
        f"{d['sample_tokens']} tokens at temperature 1 from held-out prompts (docs/alignment.md).",
        "",
        "| method | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt(r.get(c, "-")) for c in COLUMNS) + " |")
    lines += ["",
              f"Bar (DPO property_rate > SFT property_rate, DPO kl_to_ref <= {args.kl_bound:g} nats/token): "
              f"**{'met' if bar else 'missed'}** (DPO {d['property_rate']:.4f} at KL {d['kl_to_ref']:.4f}, "
              f"SFT {s['property_rate']:.4f} at KL {s['kl_to_ref']:.4f}).",
              "",
              "pref_acc: held-out pairs where log pi(chosen) > log pi(rejected); reward_acc: where the implicit "
              "DPO reward margin is > 0 (beta of the DPO recipe; 0.1 for SFT); property_rate: sampled "
              "continuations with the property; kl_to_ref: mean per-token KL(pi || pi_ref) on those samples, "
              "nats/token; val_bpb: bits per byte on the corpus' validation split (forgetting). "
              f"Wall seconds per run, data preparation and evaluation included: sft {wall['sft']:.0f}, "
              f"dpo {wall['dpo']:.0f}."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results, "bar_met": bar,
                                                    "wall_s": wall}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
