"""µTransfer: does a learning rate tuned at width 64 stay best at widths 256 and 512? SP against µP.

    python bench/mup_transfer.py [--out bench/results/mup_transfer.json] [--widths 64 256 512]
        [--base-width 64] [--lrs 1e-3 3e-3 ...] [--steps 150] [--batch-size 8] [--seq-len 128]
        [--n-layers 2] [--recipe recipes/shakespeare.toml]

Tensor Programs V (Yang et al. 2022), Figure 1's experiment at CPU scale: the main job's data and model
recipe with an untied head, ``--n-layers`` blocks and ``d_model`` from ``--widths`` (``d_head`` kept,
weightsmith.train.mup.width_config), trained with AdamW for ``--steps`` steps (10 warmup, cosine to
lr/10, clipping at 1) at every rate in ``--lrs``, under the model's standard parametrization (``sp``,
GPT-2's N(0, 0.02) init everywhere) and under µP with ``--base-width`` (weightsmith.train.mup). Every run
sees the same batches. The metric is the validation loss (nats per token) over the first 32,768 tokens
of the validation split; a diverged run counts as its last finite value or NaN.

It writes a JSON file, a markdown table beside it (loss per rate and width, the best rate per width,
and the *transfer regret*: the loss at the base width's best rate minus the width's own best loss) and
a PNG plot (loss against rate, one line per width, SP and µP side by side). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def train_one(task, family, cfg, *, mup_base: int | None, lr: float, steps: int, seed: int) -> dict:
    from weightsmith.eval.metrics import stream_loss
    from weightsmith.registry import model_from_config
    from weightsmith.train.mup import apply_mup
    from weightsmith.train.optim import build_optimizer, lr_at, set_lr

    task.check_model(cfg)
    torch.manual_seed(seed)
    model = model_from_config(family, cfg, device="cpu")
    scales = None
    if mup_base is not None:
        scales = apply_mup(model, family, cfg, mup_base)
    opt = build_optimizer("adamw", model, task.train_cfg, scales)
    batches = task.batches("cpu")
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        set_lr(opt, lr_at(step, lr=lr, min_lr=lr / 10, warmup_steps=10, total_steps=steps))
        loss, _ = task.loss(model, batches.next())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        total, count, _ = stream_loss(model, task.data.val, cfg.max_seq_len, 16, 32768)
    val = total / count
    return {"val_loss": val if math.isfinite(val) else None, "train_loss_last10": sum(losses[-10:]) / 10
            if len(losses) == steps else None, "steps_done": len(losses), "train_s": round(train_s, 1)}


def summarize(rows: list[dict], widths: list[int], base: int) -> dict:
    out = {}
    for param in ("sp", "mup"):
        best = {}
        for w in widths:
            ok = [r for r in rows if r["param"] == param and r["width"] == w and r["val_loss"] is not None]
            if ok:
                b = min(ok, key=lambda r: r["val_loss"])
                best[w] = (b["lr"], b["val_loss"])
        if base not in best:
            continue
        base_lr = best[base][0]
        regret = {}
        for w in widths:
            at = [r for r in rows if r["param"] == param and r["width"] == w and r["lr"] == base_lr]
            regret[w] = (at[0]["val_loss"] - best[w][1]) if at and at[0]["val_loss"] is not None else None
        out[param] = {"best_lr": {str(w): best[w][0] for w in best}, "best_loss": {str(w): best[w][1] for w in best},
                      "base_lr": base_lr, "regret_at_base_lr": {str(w): regret[w] for w in widths}}
    return out


def write_markdown(res: dict, path: Path) -> None:
    widths, lrs = res["widths"], res["lrs"]
    lines = [f"µTransfer on the main job's data: {res['n_layers']} layers, d_head {res['d_head']}, untied head, "
             f"AdamW, {res['steps']} steps of {res['batch_size']}x{res['seq_len']} tokens, validation loss "
             f"(nats/token, 32,768 tokens). Base width {res['base_width']}. {res['date']}, {res['machine']['cpus']} "
             f"CPU cores.", ""]
    for param, title in (("sp", "standard parametrization"), ("mup", "µP")):
        lines += [f"**{title}**", "", "| lr | " + " | ".join(f"width {w}" for w in widths) + " |",
                  "|---|" + "---|" * len(widths)]
        s = res["summary"].get(param, {})
        for lr in lrs:
            cells = []
            for w in widths:
                r = next(x for x in res["rows"] if x["param"] == param and x["width"] == w and x["lr"] == lr)
                v = "diverged" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
                cells.append(f"**{v}**" if s.get("best_lr", {}).get(str(w)) == lr else v)
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        if s:
            regret = {w: s["regret_at_base_lr"][str(w)] for w in widths}
            lines += ["", "best lr per width: " + ", ".join(f"{w}: {s['best_lr'][str(w)]:g}" for w in widths
                                                           if str(w) in s["best_lr"]),
                      f"regret at the base width's best lr ({s['base_lr']:g}): " + ", ".join(
                          f"{w}: " + ("n/a" if regret[w] is None else f"{regret[w]:+.4f}") for w in widths)]
        lines.append("")
    path.write_text("\n".join(lines))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (param, title) in zip(axes, (("sp", "standard parametrization"), ("mup", "µP")), strict=True):
        for w in res["widths"]:
            pts = [(r["lr"], r["val_loss"]) for r in res["rows"] if r["param"] == param and r["width"] == w
                   and r["val_loss"] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"width {w}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (AdamW)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/mup_transfer.json"))
    ap.add_argument("--recipe", default=str(ROOT / "recipes/shakespeare.toml"))
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--base-width", type=int, default=64)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from weightsmith.recipe import load_recipe
    from weightsmith.train.mup import width_config

    recipe = load_recipe(args.recipe, ["--model.tie_embeddings=false", f"--model.n_layers={args.n_layers}",
                                       f"--model.max_seq_len={args.seq_len}", f"--train.batch_size={args.batch_size}",
                                       "--train.weight_decay=0.0"])
    task = recipe.task_cls(recipe.task, recipe.data, recipe.train, recipe.sample)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    task.setup(out.parent, resume=False, log=lambda *a: None)
    cfg0 = recipe.model_config(task.model_fields())
    rows = []
    for param in ("sp", "mup"):
        for w in args.widths:
            cfg = width_config(cfg0, w)
            for lr in args.lrs:
                r = train_one(task, recipe.family, cfg, mup_base=args.base_width if param == "mup" else None,
                              lr=lr, steps=args.steps, seed=args.seed)
                rows.append({"param": param, "width": w, "lr": lr, **r})
                print(f"{param:>3} width {w:>4} lr {lr:<7g} val_loss {r['val_loss']} ({r['train_s']} s)", flush=True)
    res = {"machine": {"platform": platform.platform(), "cpus": torch.get_num_threads()},
           "date": time.strftime("%Y-%m-%d %H:%M"), "recipe": str(Path(args.recipe).resolve().relative_to(ROOT)),
           "widths": args.widths, "base_width": args.base_width, "lrs": args.lrs, "steps": args.steps,
           "batch_size": args.batch_size, "seq_len": args.seq_len, "n_layers": args.n_layers,
           "d_head": cfg0.d_head, "rows": rows}
    res["summary"] = summarize(rows, args.widths, args.base_width)
    out.write_text(json.dumps(res, indent=1))
    write_markdown(res, out.with_suffix(".md"))
    plot(res, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
