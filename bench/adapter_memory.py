"""Training memory with adapters: measured peak vs ``weightsmith inspect``'s estimate, per method.

    python bench/adapter_memory.py                                   # d_model 512, 8 layers, B 8, T 256
    python bench/adapter_memory.py --d-model 64 --n-layers 2 --batch-size 2 --seq-len 32   # seconds

For each of full fine-tuning, ``lora``, ``dora`` and ``qlora`` (rank ``--rank`` on ``--targets``), a
``gpt`` model (LLaMA-style, float32, CPU) runs ``--steps`` AdamW steps on random tokens. The peak is
the model's own tensors after the pass (base, NF4 buffers, adapters) plus the running peak of the
profiler's allocator events over the steps (activations, gradients, optimizer state, transients), in
bytes. The estimate is weightsmith.adapters.adapter_cost (the full fine-tune row: memory_estimate's
``train_peak``). Writes bench/results/adapter_memory.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "dora", "qlora")


def profiled_train_peak(model, opt, batches) -> tuple[int, int]:
    """(model bytes, training peak bytes): the storage of ``model``'s parameters and buffers, and that plus
    the running peak of ``torch.profiler``'s allocator events over one next-token cross-entropy step
    (forward, backward, ``opt.step()``, zero_grad) per (B, T + 1) token batch in ``batches``."""
    from torch.profiler import ProfilerActivity, profile

    own = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in (*model.parameters(), *model.buffers())}.values())
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for x in batches:
                logits = model(x[:, :-1])
                F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
                opt.step()
                opt.zero_grad(set_to_none=False)
    finally:
        gc.enable()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return own, own + peak


def measure(method: str, fields: dict, args) -> dict:
    from weightsmith.adapters import adapter_cost, apply_adapters, trainable_parameters
    from weightsmith.analysis.memory import memory_estimate
    from weightsmith.recipe import AdapterConfig
    from weightsmith.registry import build_config, create_model
    from weightsmith.train.config import TrainConfig
    from weightsmith.train.optim import build_optimizer

    torch.manual_seed(0)
    model = create_model("gpt", **fields)
    cfg = build_config("gpt", fields)
    est_base = memory_estimate("gpt", cfg, batch_size=args.batch_size, seq_len=args.seq_len)
    if method == "full":
        estimate, trainable = est_base["train_peak"], sum(p.numel() for p in model.parameters())
    else:
        adapter = AdapterConfig(method=method, rank=args.rank, alpha=2.0 * args.rank, target_modules=args.targets)
        apply_adapters(model, adapter)
        trainable = trainable_parameters(model)
        estimate = adapter_cost("gpt", cfg, adapter, batch_size=args.batch_size, seq_len=args.seq_len,
                                dtype="float32", optimizer="adamw", base_memory=est_base)["memory_train_bytes"]
    opt = build_optimizer("adamw", model, TrainConfig(lr=1e-4))
    x = torch.randint(0, fields["vocab_size"], (args.batch_size, args.seq_len + 1))
    own, measured = profiled_train_peak(model, opt, [x] * args.steps)
    return {"method": method, "trainable_params": trainable, "model_bytes": own,
            "train_peak_measured_bytes": measured, "train_peak_estimated_bytes": estimate,
            "estimate_over_measured": estimate / measured}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adapter_memory")
    args = p.parse_args()
    fields = dict(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
                  n_heads=max(1, args.d_model // 64), max_seq_len=args.seq_len, tie_embeddings=False)
    rows = []
    for method in METHODS:
        rows.append(measure(method, fields, args))
        r = rows[-1]
        print(f"{method:6s} trainable {r['trainable_params']:>11,}  peak measured "
              f"{r['train_peak_measured_bytes'] / 2**20:8.2f} MiB  estimated "
              f"{r['train_peak_estimated_bytes'] / 2**20:8.2f} MiB")
    out = {"config": {**fields, "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank,
                      "targets": args.targets, "steps": args.steps, "dtype": "float32", "device": "cpu"},
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| method | trainable params | model tensors (MiB) | train peak measured (MiB) | estimated (MiB) "
             "| est / meas |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['model_bytes'] / 2**20:.2f} | "
                     f"{r['train_peak_measured_bytes'] / 2**20:.2f} | {r['train_peak_estimated_bytes'] / 2**20:.2f} | "
                     f"{r['estimate_over_measured']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
