"""Predicted vs profiled CPU training peak for small gpt, bert and t5 configs, with and without
activation checkpointing.

    python bench/memory_estimate.py [--out bench/results/memory_estimate.json]

Predicted: ``weightsmith.analysis.memory_estimate`` (``train_peak``; ``train_peak_checkpointed`` with
every block checkpointed), float32, AdamW. Profiled: ``weightsmith.analysis.memory.profiled_train_peak``,
the peak of torch.profiler's allocator events over three AdamW steps on CPU. The configs are the ones
tests/test_analysis.py checks (distinct sizes; the "deep" ones have activations that dominate the
weights). error = predicted / profiled - 1. Writes ``--out`` (JSON) and the same name with ``.md``.
Takes about half a minute on 2 cores; the byte counts do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# (name, family, config, batch_size, seq_len); checkpointing is measured for the deep ones
SMALL = [
    ("gpt2-style", "gpt", dict(vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=64,
                               norm="layernorm", mlp="gelu", pos="learned", bias=True), 8, 48),
    ("llama-style", "gpt", dict(vocab_size=53, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=56,
                                max_seq_len=64, tie_embeddings=False), 8, 48),
    ("bert", "bert", dict(vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=64), 8, 48),
    ("t5", "t5", dict(vocab_size=53, d_model=40, n_layers=2, n_decoder_layers=3, n_heads=4, d_head=7, d_ff=56,
                      rel_buckets=8, rel_max_distance=16), 8, 48),
]
DEEP = [
    ("deep llama-style", "gpt", dict(vocab_size=53, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=64,
                                     max_seq_len=64), 16, 64),
    ("deep gpt2-style", "gpt", dict(vocab_size=53, d_model=32, n_layers=6, n_heads=4, d_ff=64, max_seq_len=64,
                                    norm="layernorm", mlp="gelu", pos="learned", bias=True), 16, 64),
    ("deep bert", "bert", dict(vocab_size=53, d_model=32, n_layers=6, n_heads=4, d_ff=64, max_seq_len=64), 16, 64),
    ("deep t5", "t5", dict(vocab_size=53, d_model=32, n_layers=4, n_decoder_layers=4, n_heads=4, d_ff=64,
                           rel_buckets=8, rel_max_distance=16), 16, 64),
]


def measure(name: str, family: str, kw: dict, B: int, T: int, checkpointing: bool) -> dict:
    from weightsmith.analysis import memory_estimate
    from weightsmith.analysis.memory import profiled_train_peak
    from weightsmith.registry import resolve

    _, cfg = resolve(family, kw)
    est = memory_estimate(family, cfg, batch_size=B, seq_len=T)
    predicted = est["train_peak_checkpointed" if checkpointing else "train_peak"]
    profiled = profiled_train_peak(family, kw, batch_size=B, seq_len=T, checkpointing=checkpointing)
    row = {"name": name, "family": family, "config": kw, "batch_size": B, "seq_len": T,
           "checkpointing": checkpointing, "predicted_bytes": int(predicted), "profiled_bytes": int(profiled),
           "error": predicted / profiled - 1}
    print(f"{name:18s} {'ckpt' if checkpointing else 'full':4s} predicted {predicted / 2**20:7.2f} MiB, "
          f"profiled {profiled / 2**20:7.2f} MiB, error {row['error']:+.1%}", flush=True)
    return row


def markdown(report: dict) -> str:
    lines = ["# Training peak memory: predicted vs profiled (CPU, float32, AdamW)", "",
             "Command: `python bench/memory_estimate.py`", "",
             "| config | B x T | checkpointing | predicted (MiB) | profiled (MiB) | error |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ckpt = "every block" if r["checkpointing"] else "-"
        lines.append(f"| {r['name']} | {r['batch_size']} x {r['seq_len']} | {ckpt} | "
                     f"{r['predicted_bytes'] / 2**20:.2f} | {r['profiled_bytes'] / 2**20:.2f} | {r['error']:+.1%} |")
    full = [r["error"] for r in report["rows"] if not r["checkpointing"]]
    ckpt = [r["error"] for r in report["rows"] if r["checkpointing"]]
    lines += ["", f"Without checkpointing: {min(full):+.1%} to {max(full):+.1%}. "
              f"With every block checkpointed (an upper-side estimate): {min(ckpt):+.1%} to {max(ckpt):+.1%}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_estimate.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    rows = [measure(*c, checkpointing=False) for c in SMALL + DEEP]
    rows += [measure(*c, checkpointing=True) for c in DEEP]
    report = {"definition": "error = predicted train peak / profiled peak - 1; profiled = max running sum of "
                            "torch.profiler [memory] events over 3 AdamW steps (weightsmith.analysis.memory."
                            "profiled_train_peak)",
              "dtype": "float32", "optimizer": "adamw", "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
              "torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(report, indent=2) + "\n"), (out.with_suffix(".md"), markdown(report))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
