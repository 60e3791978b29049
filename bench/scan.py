"""Mamba-1 selective scan on CPU: the blocked and sequential schedules against the step-by-step loop.

    .venv/bin/python bench/scan.py --out bench/results/scan [--repeats 5]

Times forward + backward of :func:`weightsmith.models.mamba.selective_scan` (both schedules, forced by
setting the schedule threshold) and of :func:`~weightsmith.models.mamba.selective_scan_ref` (the oracle
of the tests: one autograd node per step), fp32, at the Mamba layer shapes the recipes train and a long
one: the loss is ``y.sum() + h.sum()``. Each shape also records the largest |difference| of y and of the
input gradients from the loop (fp32). The best of ``--repeats`` rounds, schedules alternating within a
round. Writes OUT.json and OUT.md. Run it alone: two cores shared with anything else give wrong speeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from weightsmith.models import mamba as mamba_mod
from weightsmith.models.mamba import selective_scan, selective_scan_ref

# (name, B, T, E, N): the shakespeare-mamba layer at its batch, the E4 model at batch 16 and L=1024
SHAPES = [("shakespeare-mamba (B 32, T 128)", 32, 128, 256, 12),
          ("e4 mamba (B 16, T 256)", 16, 256, 128, 16),
          ("long (B 1, T 2048)", 1, 2048, 256, 16)]


def _inputs(b, T, E, N):
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(b, T, E, generator=g), torch.rand(b, T, E, generator=g) * 0.1 + 1e-3
    A = -torch.arange(1, N + 1, dtype=torch.float32).expand(E, N).contiguous()
    B, C = torch.randn(b, T, N, generator=g), torch.randn(b, T, N, generator=g)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


def _run(schedule: str, inputs, Q: int = 64):
    for t in inputs:
        t.grad = None
    if schedule == "loop":
        y, h = selective_scan_ref(*inputs)
    else:
        mamba_mod._MIN_STEP_ELEMENTS = 1 << 40 if schedule == "blocked" else 0
        y, h = selective_scan(*inputs, chunk_size=Q)
    (y.sum() + h.sum()).backward()
    return y.detach(), [t.grad.clone() for t in inputs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="path without suffix: writes OUT.json and OUT.md")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    default_threshold = mamba_mod._MIN_STEP_ELEMENTS
    rows = []
    for name, b, T, E, N in SHAPES:
        inputs = _inputs(b, T, E, N)
        schedules = ["blocked", "sequential"] + (["loop"] if T * b <= 4096 else [])
        ref_y, ref_g = _run("loop", inputs) if "loop" in schedules else (None, None)
        best = {s: float("inf") for s in schedules}
        diffs = {}
        for s in schedules:
            y, g = _run(s, inputs)  # warm-up, and the differences from the loop
            if ref_y is not None and s != "loop":
                diffs[s] = (float((y - ref_y).abs().max()), max(float((a - r).abs().max()) for a, r in zip(g, ref_g)))
        for _ in range(args.repeats):
            for s in schedules:
                t0 = time.perf_counter()
                _run(s, inputs)
                best[s] = min(best[s], time.perf_counter() - t0)
        mamba_mod._MIN_STEP_ELEMENTS = default_threshold
        chosen = "sequential" if b * E * N >= default_threshold or T // 64 <= 1 else "blocked"
        rows.append({"shape": name, "B": b, "T": T, "E": E, "N": N, "seconds": best, "default": chosen,
                     "max_abs_diff_vs_loop": diffs})
        print(name, {k: f"{v * 1e3:.1f} ms" for k, v in best.items()}, diffs, flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": args.threads,
            "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"`{meta['command']}` on {meta['date']}, torch {meta['torch']}, {args.threads} threads; forward + "
             "backward, fp32, best of "
             f"{args.repeats}. Speed-up is the loop's time over the schedule's.", "",
             "| shape | B x T x E x N | blocked (ms) | sequential (ms) | loop (ms) | blocked vs loop "
             "| sequential vs loop | default schedule | max abs dy, dgrad vs loop |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        loop = s.get("loop")
        cells = [f"{s['blocked'] * 1e3:.1f}", f"{s['sequential'] * 1e3:.1f}",
                 f"{loop * 1e3:.1f}" if loop else "n/a",
                 f"{loop / s['blocked']:.1f}x" if loop else "n/a", f"{loop / s['sequential']:.1f}x" if loop else "n/a"]
        d = "; ".join(f"{k}: {v[0]:.1e}, {v[1]:.1e}" for k, v in r["max_abs_diff_vs_loop"].items()) or "n/a"
        lines.append(f"| {r['shape']} | {r['B']} x {r['T']} x {r['E']} x {r['N']} | " + " | ".join(cells)
                     + f" | {r['default']} | {d} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
