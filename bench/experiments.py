"""The experiments of the deep-learning chapter this project follows, each a markdown report with plots.

    python bench/experiments.py e2 --out runs/e2 [--seeds 3] [--steps 300]
    python bench/experiments.py e4 --out runs/e4 [--seeds 3] [--steps 2000]
    python bench/experiments.py e4-needle --out runs/e4-needle [--seeds 3] [--steps 2000]
    python bench/experiments.py e5 --out runs/e5 [--seeds 3] [--max-time 60]

E2, normalization ablation: an 8-layer GPT (d_model 64) on the main job's Shakespeare BPE-1024 data
with LayerNorm, RMSNorm, DyT and no normalization, the same number of steps each, per-layer gradient
norms logged (``train.log_grad_norms``). Report: loss curves, time per step, final val_bpb, and the
per-layer gradient norms early and late in training (``e2_loss.png``, ``e2_grad_norms.png``). A run
whose loss turns non-finite is reported as diverged at that step.

E5, positional-encoding extrapolation: the main job's GPT shape trained at context 128 with
sinusoidal, learned, RoPE and ALiBi positions (same wall-clock budget), then perplexity on the same
first 65,536 validation tokens in non-overlapping windows of 1x, 2x, 4x and 8x the training length,
with no further training; the RoPE model also with position interpolation, NTK-aware scaling and YaRN
at scale = length / 128. A learned table has no rows past its training length, so it has no entry
there. Perplexity is per token over every position of each window (``e5_ppl.png``).

E4, attention versus state space on retrieval: a small transformer, Mamba, Mamba-2 and a hybrid at
matched parameters are trained on synthetic MQAR (the ``recall`` task, weightsmith/tasks/recall.py)
at sequence length 64 with 1..8 key-value pairs (32 keys, 32 values, batch 64, lr 1e-3), for the
same number of optimizer steps each (``--steps``; steps, not seconds, so a busy machine does not favour
the fastest family), then scored on a grid of sequence length 64..1024 x 2..16 pairs: lengths and pair
counts past the training ones test generalization. The report (``report.md``) gives mean ± std over
seeds per cell, a heatmap per family (``e4_<family>.png``, seed mean), accuracy against sequence length
at 8 pairs (``e4_by_length.png``) beside the 1/D accuracy of a model that answers with a random value
from its context (the "copy" floor; chance is 1/32), and the seed-to-seed spread beside each difference.

E4's needle probe (``e4-needle``): the same families trained on needle-in-a-haystack sequences of
length 64 (batch 64, the needle pair at a uniform depth in a haystack of value and noise ids), scored at
lengths 64..1024 x needle depths 0, 0.25, 0.5, 0.75, 1 (``needle_<family>.png``, ``needle_by_length.png``).

Every run is an ordinary run directory under ``--out``/<variant>-s<seed> (config, checkpoints,
metrics.jsonl, eval.json, recall.png), trained in this process by the generic trainer. Run it alone:
E2 (steps) aside, the budgets are wall-clock, so a busy machine trains less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

LENGTHS = [64, 128, 256, 512, 1024]
PAIRS = [2, 4, 8, 16]
E4_TRAIN_LEN = 64
E4_KEYS = 32

# matched at about 0.1M parameters (printed in the report); d_model 64, 2 layers, vocab 769
E4_MODELS = {  # about 113k-127k parameters each (vocab 100 of the recall task); Mamba layers have no MLP
    "transformer": {"family": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 1024},
    "mamba": {"family": "mamba", "d_model": 64, "n_layers": 4, "d_state": 16, "max_seq_len": 1024},
    "mamba2": {"family": "mamba2", "d_model": 64, "n_layers": 4, "d_state": 32, "d_head": 32, "max_seq_len": 1024},
    "hybrid": {"family": "hybrid", "d_model": 64, "n_layers": 2, "attn_every": 2, "n_heads": 2, "d_state": 32,
               "ssm_d_head": 32, "max_seq_len": 1024},  # a Mamba-2 layer, then an attention layer
}


def e4_tree(model: dict, seed: int, steps: int) -> dict:
    """E4's MQAR runs: batch 64 at length 64 with 1..8 pairs, lr 1e-3. An earlier design (batch 16,
    lengths cycling over 64, 128 and 256, lr 3e-3) left every transformer seed on the copy floor after
    2,000 steps; in this one two of three transformer seeds learn recall (see docs/experiments.md)."""
    return {"task": {"name": "recall"},
            "data": {"kind": "mqar", "seq_len": E4_TRAIN_LEN, "n_pairs": 8,
                     "n_keys": E4_KEYS, "n_values": E4_KEYS, "n_noise": E4_KEYS,
                     "eval_seq_lens": LENGTHS, "eval_n_pairs": PAIRS, "eval_examples": 64},
            "model": dict(model),
            "train": {"seed": seed, "batch_size": 64, "max_steps": steps, "max_time": 100000.0, "lr": 1e-3,
                      "min_lr": 1e-4, "warmup_steps": 50, "weight_decay": 0.1, "grad_clip": 1.0,
                      "eval_every": 100000, "ckpt_every": 100000, "log_every": 10, "eval_batch_size": 32}}


NEEDLE_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
NEEDLE_TRAIN_LEN = 64


def needle_tree(model: dict, seed: int, steps: int) -> dict:
    """E4's needle probe: trained at length 64 (uniform depth), scored at 64..1024 x five depths."""
    tree = e4_tree(model, seed, steps)
    tree["data"] = {"kind": "needle", "seq_len": NEEDLE_TRAIN_LEN, "n_keys": E4_KEYS, "n_values": E4_KEYS,
                    "n_noise": E4_KEYS, "eval_seq_lens": LENGTHS, "eval_depths": NEEDLE_DEPTHS, "eval_examples": 64}
    tree["train"].update(batch_size=64, lr=3e-3, min_lr=3e-4)  # as bench/results/e4_needle* were run
    return tree


def with_lr(trees: dict[str, list[dict]], lr: float | None) -> dict[str, list[dict]]:
    """``trees`` with peak lr ``lr`` and min_lr ``lr / 10`` (unchanged when ``lr`` is None)."""
    if lr is not None:
        for runs in trees.values():
            for tree in runs:
                tree["train"].update(lr=lr, min_lr=lr / 10)
    return trees


def text_tree(model: dict, seed: int, train: dict) -> dict:
    return {"data": {"corpus": "shakespeare", "tokenizer": "bpe", "vocab_size": 1024},
            "model": {"family": "gpt", **model},
            "train": {"seed": seed, "batch_size": 16, "lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 30,
                      "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 100000, "ckpt_every": 100000,
                      "log_every": 10, **train},
            "sample": {"max_new_tokens": 1}}


E2_NORMS = ["layernorm", "rmsnorm", "dyt", "none"]
E5_POS = ["sinusoidal", "learned", "rope", "alibi"]
E5_BASE = {"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}


def e2_variant(name: str) -> dict:
    """``"dyt"`` -> {"norm": "dyt"}; ``"dyt,dyt_alpha0=2"`` -> {"norm": "dyt", "dyt_alpha0": 2.0} (a norm
    with [model] overrides, numbers parsed as float)."""
    norm, *pairs = name.split(",")
    model = {"norm": norm}
    for pair in pairs:
        key, _, value = pair.partition("=")
        model[key] = float(value)
    return model


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_variants(trees: dict[str, list[dict]], out: Path) -> dict[str, list[dict]]:
    """Train every (variant, seed) tree into out/<variant>-s<seed>; {variant: [eval.json per seed]}.

    A run that stops on a non-finite loss gets ``{"diverged_at": step}`` instead of its evaluation."""
    from weightsmith.analysis import count_params
    from weightsmith.errors import CheckpointError
    from weightsmith.recipe import recipe_from_tree
    from weightsmith.train.loop import run_training

    results: dict[str, list[dict]] = {}
    for name, seed_trees in trees.items():
        for tree in seed_trees:
            run = out / f"{name}-s{tree['train']['seed']}"
            recipe = recipe_from_tree(tree, name=name)
            if not (run / "eval.json").is_file() and not (run / "diverged.json").is_file():
                try:
                    run_training(recipe, run, log=lambda *a: None)
                except CheckpointError as e:
                    if "loss became" not in str(e):
                        raise
                    step = int(str(e).split(" at step ")[1].split(";")[0])
                    (run / "diverged.json").write_text(json.dumps({"diverged_at": step, "error": str(e)}))
            ev = json.loads((run / ("eval.json" if (run / "eval.json").is_file() else "diverged.json")).read_text())
            ev["run"] = str(run)
            cfg = recipe.model_config(recipe.task_cls.placeholder_fields(recipe.data))
            ev["params"] = count_params(recipe.family, cfg)
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            ev["steps"] = max((r["step"] for r in rows), default=0)
            results.setdefault(name, []).append(ev)
            head = {k: round(ev[k], 4) for k in ("mean_acc", "val_bpb", "diverged_at") if k in ev}
            print(f"{run.name}: {head}, {ev['steps']} steps, {ev['params']:,} params", flush=True)
    return results


def read_rows(run: str) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def e2_report(results: dict[str, list[dict]], out: Path, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    lines = ["# E2: normalization ablation in an 8-layer transformer", "",
             f"Command: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d %H:%M')}). GPT d_model 64, 8 layers, "
             f"4 heads, context 128, batch 16, {args.steps} steps, lr 2e-3 (cosine, warmup 30), grad clip 1.0 "
             f"(norms are logged before clipping), Shakespeare BPE-1024; {len(results[names[0]])} seeds.", "",
             "| norm | params | final val_bpb | time per step (ms) | diverged |", "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    fig2, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True)
    grad_table = {}
    for i, n in enumerate(names):
        evs = results[n]
        ok = [e for e in evs if "val_bpb" in e]
        bpb = mean_std([e["val_bpb"] for e in ok]) if ok else None
        ms = []
        curves, norms_by_step = [], {}
        for e in evs:
            rows = [r for r in read_rows(e["run"]) if "loss" in r]
            for a, b in zip(rows, rows[1:]):
                ms.append(1000 * (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]))
            curves.append(rows)
            for r in rows:
                for g, v in r.get("grad_norm", {}).items():
                    norms_by_step.setdefault(g, {}).setdefault(r["step"], []).append(v)
        div = [e["diverged_at"] for e in evs if "diverged_at" in e]
        lines.append(f"| {n} | {evs[0]['params']:,} | " + (f"{bpb[0]:.4f} ± {bpb[1]:.4f}" if bpb else "–") +
                     f" | {statistics.median(ms):.1f} | " + (f"{len(div)}/{len(evs)} (steps {div})" if div else "0")
                     + " |")
        steps = sorted({r["step"] for c in curves for r in c})
        mean_loss = [statistics.fmean(r["loss"] for c in curves for r in c if r["step"] == s) for s in steps]
        ax.plot(steps, mean_loss, label=n)
        blocks = [g for g in norms_by_step if g.startswith("blocks.")]
        for g in blocks:
            xs = sorted(norms_by_step[g])
            axes[i].plot(xs, [statistics.fmean(norms_by_step[g][x]) for x in xs], label=g.split(".")[1],
                         color=plt.cm.viridis(int(g.split(".")[1]) / max(len(blocks) - 1, 1)))
        axes[i].set_yscale("log")
        axes[i].set_title(n)
        axes[i].set_xlabel("step")
        early = {g: statistics.fmean(v for s2, vs in norms_by_step[g].items() if s2 <= steps[len(steps) // 10]
                                     for v in vs) for g in blocks}
        late = {g: statistics.fmean(v for s2, vs in norms_by_step[g].items() if s2 >= steps[-(len(steps) // 10) - 1]
                                    for v in vs) for g in blocks}
        grad_table[n] = (early, late)
    axes[0].set_ylabel("gradient L2 norm per block")
    axes[-1].legend(title="block", fontsize=6, ncol=2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token), seed mean")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "e2_loss.png", dpi=110)
    fig2.tight_layout()
    fig2.savefig(out / "e2_grad_norms.png", dpi=110)
    plt.close("all")
    lines += ["", "Gradient L2 norm per block (seed mean), over the first and last 10% of logged steps:", "",
              "| norm | phase | " + " | ".join(f"block {j}" for j in range(8)) + " | block 0 / block 7 |",
              "|---" * 11 + "|"]
    for n, (early, late) in grad_table.items():
        for phase, d in (("early", early), ("late", late)):
            vals = [d.get(f"blocks.{j}", float("nan")) for j in range(8)]
            ratio = f"{vals[0] / vals[7]:.2f}" if vals[7] else "–"
            lines.append(f"| {n} | {phase} | " + " | ".join(f"{v:.3g}" for v in vals) + f" | {ratio} |")
    lines += ["", "The residual stream at the final norm of the trained models (8 x 128 validation tokens, seed mean): "
              "its RMS, the fraction of DyT's tanh outputs with |tanh| > 0.995 (saturated), and the std over "
              "positions of the logits (0: the output no longer depends on the input).", "",
              "| norm | residual RMS | saturated | logits std over positions |", "|---|---|---|---|"]
    for n in names:
        probes = [e2_probe(e["run"]) for e in results[n] if "val_bpb" in results[n][0]]
        rms, sat, lstd = (statistics.fmean(p[k] for p in probes) if probes[0][k] is not None else None
                          for k in range(3))
        lines.append(f"| {n} | {rms:.3g} | " + ("–" if sat is None else f"{sat:.3f}") + f" | {lstd:.3g} |")
    lines += ["", "![loss](e2_loss.png)", "", "![gradient norms](e2_grad_norms.png)", ""]
    return write_report(lines, results, out)


def e2_probe(run: str) -> tuple[float, float | None, float]:
    """(RMS of the final norm's input, fraction of DyT outputs with |tanh| > 0.995 or None, mean over
    vocabulary of the logits' std over positions) on the first 8 x 128 validation tokens of ``run``."""
    import torch

    from weightsmith.config import from_dict
    from weightsmith.data.prepare import DataConfig, prepare
    from weightsmith.train.checkpoint import load_run

    loaded = load_run(run)
    model = loaded.model.eval()
    val = prepare(from_dict(DataConfig, loaded.config["data"], "data"), log=lambda *a: None).val
    idx = torch.as_tensor(val[:8 * 128].astype("int64")).view(8, 128)
    seen = {}
    hook = model.final_norm.register_forward_hook(lambda mod, i, o: seen.update(x=i[0].detach()))
    with torch.no_grad():
        logits = model(idx)
    hook.remove()
    x = seen["x"]
    alpha = getattr(model.final_norm, "alpha", None)
    sat = None if alpha is None else float((torch.tanh(alpha.detach() * x).abs() > 0.995).float().mean())
    return float(x.pow(2).mean().sqrt()), sat, float(logits.std(dim=(0, 1)).mean())


def e5_eval(run: str, pos: str, lengths: list[int], max_tokens: int) -> dict[str, dict[str, float]]:
    """{method: {length: perplexity}} for one trained run."""
    import math

    from weightsmith.config import from_dict
    from weightsmith.data.prepare import DataConfig, prepare
    from weightsmith.eval.metrics import stream_loss
    from weightsmith.train.checkpoint import load_run

    val = prepare(from_dict(DataConfig, load_run(run).config["data"], "data"), log=lambda *a: None).val
    train_len = E5_BASE["max_seq_len"]
    methods = {"sinusoidal": ["plain"], "learned": ["plain"], "alibi": ["plain"],
               "rope": ["plain", "linear", "ntk", "yarn"]}[pos]
    out: dict[str, dict[str, float]] = {}
    for m in methods:
        out[m] = {}
        for L in lengths:
            if pos == "learned" and L > train_len:
                continue
            over = {"max_seq_len": max(L, train_len)}
            if m != "plain" and L > train_len:
                over.update(rope_scaling=m, rope_scale=L / train_len)
            if m != "plain" and L <= train_len:
                continue  # scale 1 is plain RoPE (tested), not a separate point
            model = load_run(run, model_overrides=over).model.eval()
            total, count, _ = stream_loss(model, val, L, 8, max_tokens)
            out[m][str(L)] = math.exp(total / count)
    return out


def e5_report(results: dict[str, list[dict]], out: Path, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [128 * k for k in (1, 2, 4, 8)]
    lines = ["# E5: positional-encoding extrapolation", "",
             f"Command: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d %H:%M')}). GPT d_model 128, 4 layers, "
             f"GQA 4/2 heads, trained at context 128 for {args.max_time:.0f} s each on Shakespeare BPE-1024; "
             f"{len(next(iter(results.values())))} seeds. Perplexity per token on the first 65,536 validation tokens "
             "in non-overlapping windows of L tokens, no further training.", "",
             "| positions | method | val_bpb at 128 (training) | " + " | ".join(f"ppl @ {L}" for L in lengths) + " |",
             "|---" * (3 + len(lengths)) + "|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for pos, evs in results.items():
        per_seed = [e5_eval(e["run"], pos, lengths, 65536) for e in evs]
        bpb = mean_std([e["val_bpb"] for e in evs])
        for m in per_seed[0]:
            cells, xs, ys, es = [], [], [], []
            for L in lengths:
                vals = [p[m].get(str(L)) for p in per_seed if str(L) in p[m]]
                if vals:
                    mu, sd = mean_std(vals)
                    cells.append(f"{mu:.1f} ± {sd:.1f}")
                    xs.append(L), ys.append(mu), es.append(sd)
                else:
                    cells.append("–")
            lines.append(f"| {pos} | {m} | {bpb[0]:.4f} ± {bpb[1]:.4f} | " + " | ".join(cells) + " |")
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{pos}" + ("" if m == "plain" else f" + {m}"))
        for e, p in zip(evs, per_seed):
            e["perplexity"] = p
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length L (tokens; trained at 128)")
    ax.set_ylabel("perplexity (seed mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "e5_ppl.png", dpi=110)
    plt.close(fig)
    lines += ["", "![perplexity against length](e5_ppl.png)", ""]
    return write_report(lines, results, out)


def plot_by_length(by_len: dict[str, list[tuple]], path: Path, xlabel: str, ylabel: str, floor: float,
                   floor_label: str) -> None:
    """Accuracy against sequence length, one line per family: ``by_len[family] = [(L, mean, std), ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for n, pts in by_len.items():
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=n)
    ax.set_xscale("log", base=2)
    ax.axhline(floor, color="grey", ls="--", lw=0.8, label=floor_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def differences(results: dict[str, list[dict]]) -> list[str]:
    """Report lines: each family's mean accuracy minus the first family's, with both seed std's."""
    names = list(results)
    m0, s0 = mean_std([e["mean_acc"] for e in results[names[0]]])
    lines = ["", f"Differences from {names[0]} in mean accuracy (spread: the two seed std's):", ""]
    for n in names[1:]:
        m, s = mean_std([e["mean_acc"] for e in results[n]])
        lines.append(f"- {n}: {m - m0:+.3f} (std {s:.3f} vs {s0:.3f})")
    return lines


def write_report(lines: list[str], results: dict, out: Path) -> str:
    """Write ``out/report.md`` (the lines) and ``out/results.json``; returns the report text."""
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return text


def cell_table(name: str, evs: list[dict], row_label: str) -> list[str]:
    """Markdown lines: seed mean ± std of ``accuracy[row][L]`` per row (pairs or needle depth) and length;
    "–" where a cell was not scored (MQAR pairs that do not fit a length)."""
    lines = [f"**{name}**", "", f"| {row_label} \\ L | " + " | ".join(map(str, LENGTHS)) + " |",
             "|---" * (len(LENGTHS) + 1) + "|"]
    for row, by_len in evs[0]["accuracy"].items():
        cells = [("{:.2f} ± {:.2f}".format(*mean_std([e["accuracy"][row][str(L)] for e in evs]))
                  if str(L) in by_len else "–") for L in LENGTHS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def e4_report(results: dict[str, list[dict]], out: Path, args) -> str:
    from weightsmith.tasks.recall import save_heatmap

    names = list(results)
    lines = ["# E4: attention versus state space on multi-query associative recall", "",
             f"Command: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d %H:%M')}). "
             f"{len(results[names[0]])} seeds per family, {args.steps} optimizer steps of batch 64 each, MQAR "
             f"with {E4_KEYS} keys and {E4_KEYS} values, trained at length {E4_TRAIN_LEN} with 1..8 pairs; "
             "64 fixed-seed sequences per cell. "
             "A model that answers every query with a random value from its context scores 1/D at D pairs "
             f"(the copy floor); chance is 1/{E4_KEYS}. Peak lr {args.lr or 1e-3:g} (cosine to a tenth).", "",
             f"| family | params | mean accuracy over the grid | 8 pairs, L={E4_TRAIN_LEN} (trained) "
             f"| 16 pairs, L={E4_TRAIN_LEN} (2x the pairs) | 8 pairs, L=1024 (copy floor 0.125) |",
             "|---|---|---|---|---|---|"]
    by_len = {}
    for n in names:
        evs = results[n]
        m, s = mean_std([e["mean_acc"] for e in evs])
        cols = [mean_std([e["accuracy"][p][L] for e in evs])
                for p, L in (("8", str(E4_TRAIN_LEN)), ("16", str(E4_TRAIN_LEN)), ("8", "1024"))]
        lines.append(f"| {n} | {evs[0]['params']:,} | {m:.3f} ± {s:.3f} | "
                     + " | ".join(f"{a:.3f} ± {b:.3f}" for a, b in cols) + " |")
        grid = {p: {L: statistics.fmean(e["accuracy"][p][L] for e in evs) for L in evs[0]["accuracy"][p]}
                for p in evs[0]["accuracy"]}
        save_heatmap(grid, out / f"e4_{n}.png", f"E4 {n}: MQAR accuracy, mean of {len(evs)} seeds")
        by_len[n] = [(int(L), *mean_std([e["accuracy"]["8"][L] for e in evs])) for L in evs[0]["accuracy"]["8"]]
    plot_by_length(by_len, out / "e4_by_length.png", "sequence length (tokens)", "accuracy (8 pairs)",
                   1 / 8, "copy floor (1/8)")
    lines += differences(results)
    lines += ["", "Per-cell means ± std:", ""]
    for n in names:
        lines += cell_table(n, results[n], "pairs") + ["", f"![{n}](e4_{n}.png)", ""]
    return write_report(lines + ["![by length](e4_by_length.png)", ""], results, out)


def needle_report(results: dict[str, list[dict]], out: Path, args) -> str:
    from weightsmith.tasks.recall import save_heatmap

    names = list(results)
    depths = [f"{d:g}" for d in NEEDLE_DEPTHS]
    lines = ["# E4: needle in a haystack", "",
             f"Command: `python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d %H:%M')}). "
             f"{len(results[names[0]])} seeds per family, {args.steps} optimizer steps of batch 64 each at length "
             f"{NEEDLE_TRAIN_LEN} (needle at a uniform depth). The haystack is drawn from the {E4_KEYS} value and "
             f"{E4_KEYS} noise ids, so answering with a value from the context is no shortcut; chance is "
             f"1/{E4_KEYS}. Scored on 64 fixed-seed sequences per (length, depth) cell; lengths past "
             f"{NEEDLE_TRAIN_LEN} test length generalization. Peak lr {args.lr or 3e-3:g} (cosine to a tenth).", "",
             f"| family | params | mean accuracy over the grid | at L={NEEDLE_TRAIN_LEN} (trained) | at L=1024 |",
             "|---|---|---|---|---|"]
    by_len = {}
    for n in names:
        evs = results[n]
        m, s = mean_std([e["mean_acc"] for e in evs])
        at = {L: mean_std([statistics.fmean(e["accuracy"][d][str(L)] for d in depths) for e in evs])
              for L in LENGTHS}
        t, tl = at[NEEDLE_TRAIN_LEN], at[LENGTHS[-1]]
        lines.append(f"| {n} | {evs[0]['params']:,} | {m:.3f} ± {s:.3f} | {t[0]:.3f} ± {t[1]:.3f} | "
                     f"{tl[0]:.3f} ± {tl[1]:.3f} |")
        grid = {d: {str(L): statistics.fmean(e["accuracy"][d][str(L)] for e in evs) for L in LENGTHS} for d in depths}
        save_heatmap(grid, out / f"needle_{n}.png", f"E4 needle, {n}: accuracy, mean of {len(evs)} seeds",
                     "needle depth (fraction of the haystack)")
        by_len[n] = [(L, *at[L]) for L in LENGTHS]
    plot_by_length(by_len, out / "needle_by_length.png", f"sequence length (tokens; trained at {NEEDLE_TRAIN_LEN})",
                   "accuracy (mean over depths)", 1 / E4_KEYS, f"chance (1/{E4_KEYS})")
    lines += differences(results)
    lines += ["", "Per seed, mean accuracy over the grid: " + "; ".join(
        f"{n} " + ", ".join(f"{e['mean_acc']:.3f}" for e in results[n]) for n in names), ""]
    for n in names:
        lines += cell_table(n, results[n], "depth") + ["", f"![{n}](needle_{n}.png)", ""]
    return write_report(lines + ["![by length](needle_by_length.png)", ""], results, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=["e2", "e4", "e4-needle", "e5"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-time", type=float, default=None, help="training seconds per run (e4: 90, e5: 60)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (e2: 300, e4: 2000)")
    ap.add_argument("--models", nargs="+", help="e4: families to run (default all); e2: norms, each optionally with "
                    "model overrides (dyt,dyt_alpha0=2); e5: positions")
    ap.add_argument("--lr", type=float, default=None, help="e4, e4-needle: peak lr (min_lr a tenth of it) "
                    "instead of the tree's (e4 1e-3, e4-needle 3e-3)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = range(args.seeds)
    args.steps = args.steps or {"e2": 300, "e4": 2000, "e4-needle": 2000}.get(args.experiment)
    if args.experiment == "e2":
        trees = {n: [text_tree({"d_model": 64, "n_layers": 8, "n_heads": 4, "max_seq_len": 128, **e2_variant(n)}, s,
                               {"max_steps": args.steps, "log_grad_norms": True}) for s in seeds]
                 for n in (args.models or E2_NORMS)}
        print(e2_report(run_variants(trees, out), out, args))
    elif args.experiment == "e4":
        trees = {n: [e4_tree(E4_MODELS[n], s, args.steps) for s in seeds] for n in (args.models or E4_MODELS)}
        print(e4_report(run_variants(with_lr(trees, args.lr), out), out, args))
    elif args.experiment == "e4-needle":
        trees = {n: [needle_tree(E4_MODELS[n], s, args.steps) for s in seeds] for n in (args.models or E4_MODELS)}
        print(needle_report(run_variants(with_lr(trees, args.lr), out), out, args))
    else:
        args.max_time = args.max_time or 60.0
        trees = {p: [text_tree({**E5_BASE, "pos": p}, s, {"max_steps": 100000, "max_time": args.max_time,
                                                          "batch_size": 32}) for s in seeds]
                 for p in (args.models or E5_POS)}
        print(e5_report(run_variants(trees, out), out, args))


if __name__ == "__main__":
    main()
