"""Domain adaptation benchmark: the Shakespeare main job's model adapted to Milton at one wall-clock budget.

    python bench/adapt.py --source runs/shakespeare --root runs/adapt --time 120

Rows, each trained for ``--time`` seconds of training wall-clock (``train.max_time``; ``max_steps`` is
lifted so the budget is what stops every row, and the learning-rate schedule follows the time):

- untouched: the source model, not trained;
- full fine-tune: recipes/milton-finetune.toml (every weight trains, AdamW, lr 5e-4);
- LoRA rank 8 and rank 32, DoRA, QLoRA: recipes/milton-lora.toml (adapters on every linear of the
  blocks, base frozen, lr 1e-2), with ``--adapter.rank=32 --adapter.alpha=64``,
  ``--adapter.method=dora`` and ``--adapter.method=qlora`` (an NF4 base, block 64, double quantization),
  and each of LoRA r8, LoRA r32, DoRA and QLoRA again with the (tied) embedding trained in full,
  ``--adapter.train_modules=["tok_emb"]`` (peft's ``modules_to_save``);
- from scratch: recipes/milton-scratch.toml (the main job's shape, the main job's tokenizer).

Columns:

- Milton val_bpb: bits per byte over the whole held-out last 10% of Milton (the run's eval.json);
- Shakespeare val_bpb: the same model over the main job's whole Shakespeare validation split, with the
  main job's tokenizer (forgetting; the source's own number is the untouched row), as
  ``weightsmith eval RUN --data.corpus=shakespeare`` measures it;
- trainable parameters: parameters with ``requires_grad`` in the trained model;
- peak training memory: a profiled training peak in bytes, the model's own tensors (base, NF4 buffers,
  adapters) plus the running peak of ``torch.profiler``'s allocator events over ``--profile-steps``
  AdamW steps at the recipe's batch (B 32, T 128) on Milton training windows, as bench/adapter_memory.py
  measures it;
- steps and seconds: the final training state's.

``gain recovered`` is (untouched - row) / (untouched - full fine-tune) on Milton val_bpb. Writes
bench/results/adapt.json and adapt.md (or ``--results``). ``--set`` passes dotted overrides to every
training (the tests shrink the runs with it). Runs already finished under ``--root`` are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

ROWS = (  # label, recipe, extra overrides
    ("full fine-tune", "milton-finetune.toml", []),
    ("LoRA r8", "milton-lora.toml", []),
    ("LoRA r32", "milton-lora.toml", ["--adapter.rank=32", "--adapter.alpha=64.0"]),
    ("DoRA r8", "milton-lora.toml", ["--adapter.method=dora"]),
    ("QLoRA r8", "milton-lora.toml", ["--adapter.method=qlora"]),
    ("LoRA r8 + embedding", "milton-lora.toml", ['--adapter.train_modules=["tok_emb"]']),
    ("LoRA r32 + embedding", "milton-lora.toml", ["--adapter.rank=32", "--adapter.alpha=64.0",
                                                  '--adapter.train_modules=["tok_emb"]']),
    ("DoRA r8 + embedding", "milton-lora.toml", ["--adapter.method=dora", '--adapter.train_modules=["tok_emb"]']),
    ("QLoRA r8 + embedding", "milton-lora.toml", ["--adapter.method=qlora", '--adapter.train_modules=["tok_emb"]']),
    ("from scratch", "milton-scratch.toml", []),
)


def _slug(label: str) -> str:
    return label.lower().replace(" + ", "-").replace(" ", "-").replace("/", "")


def _final_state(run: Path) -> tuple[int, float]:
    """(steps, training seconds) from the last logged row of metrics.jsonl."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    return (rows[-1]["step"], rows[-1]["elapsed_s"]) if rows else (0, 0.0)


def bpb_on(run: Path, corpus: str) -> float:
    """val_bpb of ``run``'s model over the whole validation split of ``corpus``, tokenized with the run's
    own tokenizer (``weightsmith eval RUN --data.corpus=CORPUS``)."""
    from weightsmith.eval.run import evaluate_on

    return evaluate_on(run, [f"--data.corpus={corpus}"])["val_bpb"]


def profiled_peak(model, config: dict, tokenizer, steps: int) -> int:
    """Bytes: the model's own tensors plus the profiler's peak of live allocations over ``steps`` AdamW
    steps on Milton training windows at the run's batch size and ``max_seq_len``
    (bench/adapter_memory.py's :func:`profiled_train_peak`)."""
    from adapter_memory import profiled_train_peak

    from weightsmith.config import from_dict
    from weightsmith.data.prepare import DataConfig, prepare
    from weightsmith.train.config import TrainConfig
    from weightsmith.train.optim import build_optimizer

    section = dict(config["data"])
    section.pop("tokenizer_from", None)
    data = prepare(from_dict(DataConfig, section, "data"), tokenizer=tokenizer, log=lambda *a: None)
    batch, seq = config["train"]["batch_size"], model.config.max_seq_len
    train = torch.as_tensor(data.train[: batch * (seq + 1) * steps].astype("int64"))
    model.train()
    opt = build_optimizer("adamw", model, TrainConfig(lr=1e-6))
    return profiled_train_peak(model, opt, list(train.view(steps, batch, seq + 1)))[1]


def measure_run(run: Path, label: str, profile_steps: int, source_corpus: str) -> dict:
    from weightsmith.train.checkpoint import load_run

    ev = json.loads((run / "eval.json").read_text())
    loaded = load_run(run)
    model, config, tok = loaded.model, loaded.config, loaded.tokenizer
    shakespeare = bpb_on(run, source_corpus)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = profiled_peak(load_run(run).model, config, tok, profile_steps)
    steps, seconds = _final_state(run)
    return {"row": label, "run": str(run), "milton_val_bpb": ev["val_bpb"], "shakespeare_val_bpb": shakespeare,
            "trainable_params": trainable, "train_peak_bytes": peak, "steps": steps, "train_seconds": seconds,
            "adapter": config.get("adapter")}


def untouched_row(source: Path, source_corpus: str, target_corpus: str) -> dict:

    milton, shakespeare = bpb_on(source, target_corpus), bpb_on(source, source_corpus)
    return {"row": "untouched", "run": str(source), "milton_val_bpb": milton, "shakespeare_val_bpb": shakespeare,
            "trainable_params": 0, "train_peak_bytes": None, "steps": 0, "train_seconds": 0.0, "adapter": None}


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    base = rows[0]["milton_val_bpb"]
    full = next(r for r in rows if r["row"] == "full fine-tune")["milton_val_bpb"]
    lines = [f"`{result['command']}` on {result['date']}; budget {result['time']:g} s of training per row",
             "",
             "| row | Milton val_bpb | gain recovered | Shakespeare val_bpb | trainable params | train peak (MiB) "
             "| steps | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "" if r["row"] == "untouched" else f"{(base - r['milton_val_bpb']) / (base - full):.0%}"
        peak = "" if r["train_peak_bytes"] is None else f"{r['train_peak_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['row']} | {r['milton_val_bpb']:.4f} | {gain} | {r['shakespeare_val_bpb']:.4f} | "
                     f"{r['trainable_params']:,} | {peak} | {r['steps']} | {r['train_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", type=Path, default=ROOT / "runs" / "shakespeare")
    p.add_argument("--root", type=Path, default=ROOT / "runs" / "adapt")
    p.add_argument("--time", type=float, default=120.0, help="training seconds per row (train.max_time)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--source-corpus", default="shakespeare", help="data.corpus the source was trained on")
    p.add_argument("--target-corpus", default="milton", help="data.corpus to adapt to (the recipes' own)")
    p.add_argument("--set", action="append", default=[], help="dotted override for every training, e.g. "
                                                                "--set=--train.batch_size=4")
    p.add_argument("--only", nargs="+", help="train only the rows with these labels' slugs (e.g. lora-r8)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "adapt")
    args = p.parse_args(argv)
    from weightsmith.train.loop import train

    log = print
    common = [f"--data.corpus={args.target_corpus}", f"--train.init_from={args.source}",
              f"--train.max_time={args.time}", "--train.max_steps=1000000",
              *args.set]
    rows = [untouched_row(args.source, args.source_corpus, args.target_corpus)]
    log(f"untouched: Milton {rows[0]['milton_val_bpb']:.4f}, Shakespeare {rows[0]['shakespeare_val_bpb']:.4f}")
    for label, recipe, extra in ROWS:
        if args.only and _slug(label) not in args.only:
            continue
        out = args.root / _slug(label)
        overrides = list(common)
        if recipe == "milton-scratch.toml":  # no weights from the source: its tokenizer only
            overrides = [o for o in overrides if not o.startswith("--train.init_from")]
            overrides.append(f"--data.tokenizer_from={args.source}")
        if not (out / "eval.json").is_file():
            t0 = time.perf_counter()
            train(ROOT / "recipes" / recipe, [*overrides, *extra], out=out, log=log)
            log(f"{label}: {time.perf_counter() - t0:.0f} s wall")
        rows.append(measure_run(out, label, args.profile_steps, args.source_corpus))
        r = rows[-1]
        log(f"{label}: Milton {r['milton_val_bpb']:.4f}, Shakespeare {r['shakespeare_val_bpb']:.4f}, "
            f"trainable {r['trainable_params']:,}, peak {r['train_peak_bytes'] / 2**20:.1f} MiB, {r['steps']} steps")
    result = {"command": "python bench/adapt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "time": args.time, "torch": torch.__version__,
              "rows": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if any(r["row"] == "full fine-tune" for r in rows):
        args.results.with_suffix(".md").write_text(to_markdown(result))
    log(f"wrote {args.results.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
