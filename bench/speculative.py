"""Speculative decoding of the main-job model with a small draft, greedy, batch 1, side by side in one run.

    WEIGHTSMITH_CACHE=/tmp/wscache .venv/bin/python bench/speculative.py runs/shakespeare runs/draft \\
        [--k 1 2 3 4] [--prompts 8] [--prompt-len 16] [--new-tokens 96] [--threads 2]

For each draft length k: the acceptance rate (accepted / drafted tokens), tokens emitted per target
forward, and the wall-clock speedup over the target decoding alone (weightsmith.ship.generate.generate)
on the same prompts, each timed best of 3. Both models run as ``weightsmith generate`` runs them (fused
projections). The greedy outputs are checked to be identical to the target's. Prompts are cut from the
validation split. Writes bench/results/speculative.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def best_time(fn, repeats: int = 3):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target")
    ap.add_argument("draft")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from weightsmith.config import from_dict
    from weightsmith.data.prepare import DataConfig, prepare
    from weightsmith.ship.fuse import fuse_projections
    from weightsmith.ship.generate import generate
    from weightsmith.ship.speculative import speculative_generate
    from weightsmith.train.checkpoint import load_run

    target, draft = load_run(args.target), load_run(args.draft)
    if target.tokenizer.to_json() != draft.tokenizer.to_json():
        raise SystemExit("the draft and target runs have different tokenizers")
    tm, dm = fuse_projections(target.model), fuse_projections(draft.model)
    val = prepare(from_dict(DataConfig, target.config["data"], "data"), log=lambda *a: None).val
    prompts = [torch.from_numpy(np.asarray(val[i * 5003:i * 5003 + args.prompt_len], dtype=np.int64))[None]
               for i in range(args.prompts)]
    n = args.new_tokens
    with torch.inference_mode():
        generate(tm, prompts[0], n, temperature=0.0)  # warm-up
        t_target, refs = best_time(lambda: [generate(tm, p, n, temperature=0.0) for p in prompts])
        t_draft, _ = best_time(lambda: [generate(dm, p, n, temperature=0.0) for p in prompts])
    rows = []
    for k in args.k:
        def spec(k=k):
            return [speculative_generate(tm, dm, p, n, num_draft_tokens=k, temperature=0.0) for p in prompts]

        t, outs = best_time(spec)
        identical = all(torch.equal(o, r) for (o, _), r in zip(outs, refs))
        drafted = sum(s["drafted"] for _, s in outs)
        accepted = sum(s["accepted"] for _, s in outs)
        forwards = sum(s["target_forwards"] for _, s in outs)
        rows.append({"k": k, "acceptance_rate": accepted / drafted, "tokens_per_target_forward": n * len(prompts)
                     / forwards, "seconds": t, "target_alone_seconds": t_target, "speedup": t_target / t,
                     "identical_to_target": identical})
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": "python bench/speculative.py " + " ".join(sys.argv[1:]),
              "target": str(Path(args.target).resolve()), "draft": str(Path(args.draft).resolve()),
              "target_params": sum(p.numel() for p in tm.parameters()),
              "draft_params": sum(p.numel() for p in dm.parameters()),
              "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": n, "threads": args.threads,
              "target_tokens_per_s": n * len(prompts) / t_target, "draft_tokens_per_s": n * len(prompts) / t_draft,
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speculative.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Speculative decoding, greedy, batch 1 ({args.prompts} prompts x {n} new tokens, "
             f"{args.threads} threads, best of 3)", "", f"Command: `{report['command']}`", "",
             f"Target {report['target_params']:,} parameters decodes {report['target_tokens_per_s']:.0f} tok/s "
             f"alone; draft {report['draft_params']:,} parameters decodes {report['draft_tokens_per_s']:.0f} "
             "tok/s alone.", "",
             "| k (draft tokens) | acceptance rate | tokens per target forward | speedup vs target alone | "
             "greedy output identical |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['acceptance_rate']:.2f} | {r['tokens_per_target_forward']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['identical_to_target']} |")
    (RESULTS / "speculative.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
