"""Sequence families side by side: train each on the main job's data and budget, then time decoding.

    python bench/sequence_families.py train --out bench/results/sequence_families.json \
        recipes/shakespeare.toml recipes/shakespeare-lstm.toml recipes/shakespeare-gru.toml \
        recipes/shakespeare-mamba.toml recipes/shakespeare-mamba2.toml recipes/shakespeare-hybrid.toml
    python bench/sequence_families.py decode --out bench/results/decode_context.json \
        recipes/shakespeare.toml recipes/shakespeare-mamba.toml [--contexts 256 512 ... 8192]

``train``: each recipe runs ``weightsmith train`` in a fresh process from a cold data cache (so wall time
includes data preparation, as in bench/main_job.py) and the row records parameters, val_bpb, tok/s and
MFU (or "n/a" where the family's FLOPs are not modelled), plus decode tokens/s at context 128 and 4096.
The unigram baseline's bits per byte (the entropy of the training split's token frequencies, scored on
the validation split) is recorded once, for the "beats the unigram baseline" bar.

``decode``: tokens/s of single-token decode steps after a prefill of C tokens, batch 1, for each
recipe's architecture at random init (the cost of a step does not depend on the weights). Transformers
and hybrids are built with ``max_seq_len`` = max(contexts) + new tokens so the KV cache holds the whole
context; recurrent families (``recurrent = True``) carry a fixed-size state. The crossover is the first
context at which the recurrent family decodes faster than the transformer.

Decode timing: a prefill of C random tokens, then ``--new-tokens`` greedy steps through the cache, timed
from the first step to the last; the best of ``--repeats`` rounds, engines alternating within a round.
Run it alone: two cores shared with anything else give wrong speeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def build_for_decode(recipe_path: Path, context: int):
    """The recipe's model at random init, with room for ``context`` positions if it has a positional limit."""
    from weightsmith.recipe import load_recipe
    from weightsmith.registry import get_family, model_from_config

    recipe = load_recipe(recipe_path)
    fields = recipe.task_cls.placeholder_fields(recipe.data)
    cfg = recipe.model_config(fields)
    model_cls = get_family(recipe.family).model_cls
    if not getattr(model_cls, "recurrent", False):
        recipe.model["max_seq_len"] = context
        cfg = recipe.model_config(fields)
    torch.manual_seed(0)
    return model_from_config(recipe.family, cfg).eval()


@torch.inference_mode()
def decode_seconds(model, context: int, n_new: int) -> float:
    """Seconds for ``n_new`` single-token steps after a prefill of ``context`` tokens (batch 1)."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(V, (1, context), generator=g)
    cache = model.new_cache(1, context + n_new)
    nxt = model(prompt, cache=cache, start=0, last_only=True)[:, -1].argmax(-1)
    t0 = time.perf_counter()
    for t in range(context, context + n_new):
        nxt = model(nxt[:, None], cache=cache, start=t)[:, -1].argmax(-1)
    return time.perf_counter() - t0


def decode_rates(recipes: list[Path], contexts: list[int], n_new: int, repeats: int) -> dict[str, dict[int, float]]:
    """{recipe: {context: best decode tokens/s}}."""
    out: dict[str, dict[int, float]] = {str(r.relative_to(ROOT)): {} for r in recipes}
    for c in contexts:
        models = {str(r.relative_to(ROOT)): build_for_decode(r, c + n_new) for r in recipes}
        for m in models.values():
            decode_seconds(m, min(c, 64), 4)  # warm-up
        best = {k: math.inf for k in models}
        for _ in range(repeats):
            for k, m in models.items():
                best[k] = min(best[k], decode_seconds(m, c, n_new))
        for k in models:
            out[k][c] = n_new / best[k]
        print(json.dumps({"context": c, **{k: round(out[k][c], 1) for k in models}}), flush=True)
    return out


def unigram_bpb(recipe_path: Path, cache: Path) -> float:
    """Bits per byte of a unigram model of the training split's tokens, scored on the validation split."""
    import numpy as np

    from weightsmith.data.prepare import prepare
    from weightsmith.recipe import load_recipe

    os.environ["WEIGHTSMITH_CACHE"] = str(cache)
    data = prepare(load_recipe(recipe_path).data, log=lambda *a: None)
    train, val = np.asarray(data.train, dtype=np.int64), np.asarray(data.val, dtype=np.int64)
    counts = np.bincount(train, minlength=int(max(train.max(), val.max())) + 1).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    bits = -logp[val].sum()
    return float(bits / data.val_bytes)


def train_one(recipe: Path, workdir: Path, cache: Path) -> dict:
    out = workdir / recipe.stem
    env = dict(os.environ, WEIGHTSMITH_CACHE=str(cache))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "weightsmith.cli", "train", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{proc.stderr[-2000:]}")
    import tomllib

    from weightsmith.analysis import count_params
    from weightsmith.registry import build_config

    model = dict(tomllib.loads((out / "config.toml").read_text())["model"])
    family = model.pop("family")
    ev = json.loads((out / "eval.json").read_text())
    mfu = json.loads((out / "mfu.json").read_text()) if (out / "mfu.json").is_file() else {}
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in steps if "loss" in r][-1]
    return {"recipe": str(recipe.relative_to(ROOT)), "family": family,
            "params": count_params(family, build_config(family, model)), "wall_s": round(wall, 1),
            "steps": last["step"], "val_bpb": ev["val_bpb"], "tok_per_s": mfu.get("tok_per_s", last.get("tok_per_s")),
            "mfu": mfu.get("mfu")}


def render_train(result: dict, out: Path) -> None:
    lines = [f"`{result['command']}` on {result['date']}; unigram baseline {result['unigram_bpb']:.3f} bpb", "",
             "| recipe | family | params | wall (s) | steps | val_bpb | Δ vs first row | tok/s | MFU | "
             "decode tok/s @128 | decode tok/s @4096 |", "|---" * 11 + "|"]
    ref = result["rows"][0]["val_bpb"]
    for x in result["rows"]:
        mfu = f"{x['mfu']:.1%}" if x.get("mfu") else "n/a"
        lines.append(f"| {x['recipe']} | {x['family']} | {x['params']:,} | {x['wall_s']} | {x['steps']} | "
                     f"{x['val_bpb']:.4f} | {x['val_bpb'] - ref:+.4f} | {x['tok_per_s']:,.0f} | {mfu} | "
                     f"{x['decode_128']:.0f} | {x['decode_4096']:.0f} |")
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def render_decode(result: dict, out: Path) -> None:
    names = list(result["rates"])
    lines = [f"`{result['command']}` on {result['date']}: decode tokens/s (batch 1, {result['new_tokens']} steps "
             f"after a prefill of C tokens, best of {result['repeats']})", "",
             "| context C | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for c in result["contexts"]:
        lines.append(f"| {c} | " + " | ".join(f"{result['rates'][n][str(c)]:.0f}" for n in names) + " |")
    lines += ["", f"crossover: {result['crossover']}"]
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("train", "decode"))
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", help="move the trained run directories here (as DIR/<recipe stem>)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    recipes = [Path(r).resolve() for r in args.recipes]
    stamp = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
             "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.mode == "decode":
        rates = decode_rates(recipes, args.contexts, args.new_tokens, args.repeats)
        names = list(rates)
        base = names[0]
        cross = {}
        for n in names[1:]:
            faster = [c for c in args.contexts if rates[n][c] > rates[base][c]]
            cross[n] = (f"{n} decodes faster than {base} from context {faster[0]}" if faster
                        else f"{n} never decodes faster than {base} up to context {args.contexts[-1]}")
        render_decode({**stamp, "new_tokens": args.new_tokens, "repeats": args.repeats, "contexts": args.contexts,
                       "rates": {n: {str(c): v for c, v in r.items()} for n, r in rates.items()},
                       "crossover": "; ".join(cross.values())}, out)
        return
    work = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    cache = work / "cache"
    rows = []
    for r in recipes:
        if cache.exists():
            shutil.rmtree(cache)  # every recipe pays for its own data preparation
        rows.append(train_one(r, work, cache))
        print(json.dumps(rows[-1]), flush=True)
    rates = decode_rates(recipes, [128, 4096], args.new_tokens, args.repeats)
    for row in rows:
        row["decode_128"], row["decode_4096"] = rates[row["recipe"]][128], rates[row["recipe"]][4096]
    render_train({**stamp, "unigram_bpb": unigram_bpb(recipes[0], cache), "rows": rows}, out)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        for r in recipes:
            shutil.move(str(work / r.stem), str(Path(args.keep) / r.stem))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
