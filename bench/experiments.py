"""The experiments of the deep-learning chapter this project follows, each a markdown report with plots.

    python bench/experiments.py e4 --out runs/e4 [--seeds 3] [--max-time 90]

E4, attention versus state space on retrieval: a small transformer, Mamba, Mamba-2 and a hybrid at
matched parameters are trained on synthetic MQAR (the ``recall`` task, weightsmith/tasks/recall.py)
with sequence lengths cycling over 64..1024 and 1..16 key-value pairs, for the same wall-clock budget
each, then scored on a grid of sequence length x number of pairs. The report (``report.md``) gives mean
± std over seeds per cell, a heatmap per family (``e4_<family>.png``, seed mean) and accuracy against
sequence length at 16 pairs (``e4_by_length.png``), and the seed-to-seed spread beside each difference.

Every run is an ordinary run directory under ``--out``/<variant>-s<seed> (config, checkpoints,
metrics.jsonl, eval.json, recall.png), trained in this process by the generic trainer. Run it alone:
the budgets are wall-clock, so a busy machine trains less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

LENGTHS = [64, 128, 256, 512, 1024]
PAIRS = [4, 8, 16, 32]

# matched at about 0.1M parameters (printed in the report); d_model 64, 2 layers, vocab 769
E4_MODELS = {
    "transformer": {"family": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 1024},
    "mamba": {"family": "mamba", "d_model": 64, "n_layers": 2, "d_state": 16, "max_seq_len": 1024},
    "mamba2": {"family": "mamba2", "d_model": 64, "n_layers": 2, "d_state": 32, "d_head": 32, "max_seq_len": 1024},
    "hybrid": {"family": "hybrid", "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 1024},
}


def e4_tree(model: dict, seed: int, max_time: float) -> dict:
    return {"task": {"name": "recall"},
            "data": {"kind": "mqar", "seq_len": 256, "train_seq_lens": LENGTHS, "n_pairs": 16,
                     "eval_seq_lens": LENGTHS, "eval_n_pairs": PAIRS, "eval_examples": 64},
            "model": dict(model),
            "train": {"seed": seed, "batch_size": 16, "max_steps": 100000, "max_time": max_time, "lr": 3e-3,
                      "min_lr": 3e-4, "warmup_steps": 50, "weight_decay": 0.1, "grad_clip": 1.0,
                      "eval_every": 100000, "ckpt_every": 100000, "log_every": 10, "eval_batch_size": 32}}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_variants(trees: dict[str, list[dict]], out: Path) -> dict[str, list[dict]]:
    """Train every (variant, seed) tree into out/<variant>-s<seed>; {variant: [eval.json per seed]}."""
    from weightsmith.analysis import count_params
    from weightsmith.recipe import recipe_from_tree
    from weightsmith.train.loop import run_training

    results: dict[str, list[dict]] = {}
    for name, seed_trees in trees.items():
        for tree in seed_trees:
            run = out / f"{name}-s{tree['train']['seed']}"
            recipe = recipe_from_tree(tree, name=name)
            if not (run / "eval.json").is_file():
                run_training(recipe, run, log=lambda *a: None)
            ev = json.loads((run / "eval.json").read_text())
            cfg = recipe.model_config(recipe.task_cls.placeholder_fields(recipe.data))
            ev["params"] = count_params(recipe.family, cfg)
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            ev["steps"] = max((r["step"] for r in rows), default=0)
            results.setdefault(name, []).append(ev)
            print(f"{run.name}: mean_acc {ev['mean_acc']:.3f}, {ev['steps']} steps, {ev['params']:,} params",
                  flush=True)
    return results


def e4_report(results: dict[str, list[dict]], out: Path, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from weightsmith.tasks.recall import save_heatmap

    names = list(results)
    lines = ["# E4: attention versus state space on multi-query associative recall", "",
             f"Command: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d %H:%M')}). "
             f"{len(results[names[0]])} seeds per family, {args.max_time:.0f} s of training each on one "
             "machine, MQAR with training lengths cycling over " + ", ".join(map(str, LENGTHS)) +
             " and 1..16 pairs; 64 fixed-seed sequences per cell.", "",
             "| family | params | steps | mean accuracy over the grid | accuracy at L=1024, 16 pairs |",
             "|---|---|---|---|---|"]
    by_len = {}
    for n in names:
        evs = results[n]
        m, s = mean_std([e["mean_acc"] for e in evs])
        m16, s16 = mean_std([e["accuracy"]["16"]["1024"] for e in evs])
        lines.append(f"| {n} | {evs[0]['params']:,} | {statistics.fmean(e['steps'] for e in evs):.0f} | "
                     f"{m:.3f} ± {s:.3f} | {m16:.3f} ± {s16:.3f} |")
        grid = {p: {L: statistics.fmean(e["accuracy"][p][L] for e in evs) for L in evs[0]["accuracy"][p]}
                for p in evs[0]["accuracy"]}
        save_heatmap(grid, out / f"e4_{n}.png", f"E4 {n}: MQAR accuracy, mean of {len(evs)} seeds")
        by_len[n] = [(int(L), *mean_std([e["accuracy"]["16"][L] for e in evs])) for L in evs[0]["accuracy"]["16"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for n, pts in by_len.items():
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=n)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("accuracy (16 pairs)")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "e4_by_length.png", dpi=110)
    plt.close(fig)
    ref = names[0]
    m0, s0 = mean_std([e["mean_acc"] for e in results[ref]])
    lines += ["", f"Differences from {ref} in mean accuracy (spread: the two seed std's):", ""]
    for n in names[1:]:
        m, s = mean_std([e["mean_acc"] for e in results[n]])
        lines.append(f"- {n}: {m - m0:+.3f} (std {s:.3f} vs {s0:.3f})")
    lines += ["", "Per-cell means ± std:", ""]
    for n in names:
        evs = results[n]
        lines += [f"**{n}**", "", "| pairs \\ L | " + " | ".join(map(str, LENGTHS)) + " |",
                  "|---" * (len(LENGTHS) + 1) + "|"]
        for p in evs[0]["accuracy"]:
            cells = []
            for L in LENGTHS:
                if str(L) in evs[0]["accuracy"][p]:
                    m, s = mean_std([e["accuracy"][p][str(L)] for e in evs])
                    cells.append(f"{m:.2f} ± {s:.2f}")
                else:
                    cells.append("–")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines += ["", f"![{n}](e4_{n}.png)", ""]
    lines += ["![by length](e4_by_length.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=["e4"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-time", type=float, default=90.0, help="training seconds per run")
    ap.add_argument("--models", nargs="+", default=list(E4_MODELS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trees = {n: [e4_tree(E4_MODELS[n], seed, args.max_time) for seed in range(args.seeds)] for n in args.models}
    print(e4_report(run_variants(trees, out), out, args))


if __name__ == "__main__":
    main()
