"""Where one training step's time goes, and the most that fusing the rest could buy (Amdahl's bound).

    python bench/step_profile.py [--recipe recipes/baby-char.toml] [--steps 200]
                                 [--out bench/results/step_profile_baby_char]

Builds the recipe's model (its data decides vocab_size) and times a bare training step on random
tokens at the recipe's batch: forward and loss, backward, gradient clipping, AdamW. Then:

- ``torch.profiler`` over ``--profile-steps`` steps splits the self CPU time of the forward and backward
  into matmuls (``aten::mm``/``bmm``/``addmm``), attention (the SDPA kernels), and everything else
  (norms, activations, adds, views, autograd bookkeeping: what a compiler can fuse);
- the matmul rate at the model's own shapes (the step's matmul FLOPs, counted by ``FlopCounterMode`` at
  2 per multiply-add, over the profiled matmul time) is set against a 1024^3 fp32 matmul in the same run;
- the bound: if a compiler removed *all* non-matmul, non-attention time and left the matmuls and
  attention as fast as they are, the step would speed up by at most ``total / (matmul + attention)``
  (the profiler's own per-op overhead inflates "everything else", so the bound is generous).
- The same bare step under ``torch.compile`` is timed beside eager for reference.

Writes OUT.json and OUT.md. Run it alone: two cores shared with anything else give wrong speeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def build(recipe_path: Path):
    """The recipe's model (vocab_size from its prepared data) and its TrainConfig."""
    from weightsmith.recipe import load_recipe
    from weightsmith.registry import model_from_config

    recipe = load_recipe(recipe_path, [])
    task = recipe.task_cls(recipe.task, recipe.data, recipe.train, recipe.sample)
    with tempfile.TemporaryDirectory() as tmp:
        task.setup(Path(tmp), resume=False, log=lambda *a: None)
    cfg = recipe.model_config(task.model_fields())
    torch.manual_seed(recipe.train.seed)
    return model_from_config(recipe.family, cfg, device="cpu"), cfg, recipe.train


def make_step(model, tc, x, y, compiled: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    fwd = torch.compile(model) if compiled else model
    times = {"forward": 0.0, "backward": 0.0, "clip": 0.0, "optimizer": 0.0}

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        logits = fwd(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        t1 = time.perf_counter()
        loss.backward()
        loss.item()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if record:
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k] += dt

    return step, times, fwd


def matmul_rate(n: int = 1024, reps: int = 50) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(5):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "baby-char.toml")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per variant (after 20 warmup)")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_profile_baby_char")
    args = ap.parse_args(argv)
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    model, cfg, tc = build(args.recipe)
    B, T = tc.batch_size, cfg.max_seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)

    variants = {}
    for name, compiled in (("eager", False), ("compiled", True), ("eager again", False)):
        m, _, _ = build(args.recipe) if name != "eager" else (model, cfg, tc)
        step, times, _ = make_step(m, tc, x, y, compiled)
        for _ in range(20):
            step(False)
        for _ in range(args.steps):
            step(True)
        total = sum(times.values())
        variants[name] = {"ms_per_step": {k: 1e3 * v / args.steps for k, v in times.items()},
                          "ms_total": 1e3 * total / args.steps, "tokens_per_s": B * T * args.steps / total}
        print(name, f"{variants[name]['ms_total']:.2f} ms/step, {variants[name]['tokens_per_s']:,.0f} tok/s",
              flush=True)

    # the profiled split of forward + backward, eager
    def fwd_bwd():
        logits = model(x)
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()

    for _ in range(3):
        fwd_bwd()
    with profile() as prof:
        for _ in range(args.profile_steps):
            fwd_bwd()
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        key = "matmul" if ev.key in MATMUL_OPS else "attention" if ev.key in ATTENTION_OPS else "other"
        split[key] += ev.self_cpu_time_total / 1e3 / args.profile_steps  # ms per step
    total_ms = sum(split.values())
    with FlopCounterMode(display=False) as fc:
        fwd_bwd()
    counts = fc.get_flop_counts().get("Global", {})
    mm_flops = sum(v for k, v in counts.items() if str(k).split(".")[-1] in ("mm", "bmm", "addmm", "baddbmm"))
    model.zero_grad(set_to_none=True)
    peak_rate = matmul_rate()
    result = {
        "command": " ".join(["python bench/step_profile.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "machine": platform.processor(),
        "threads": torch.get_num_threads(), "recipe": str(args.recipe.relative_to(ROOT)), "batch": [B, T],
        "variants": variants, "profiled_ms_per_step": split,
        "shares": {k: v / total_ms for k, v in split.items()},
        "matmul_flops_per_step": mm_flops, "matmul_gflops_at_model_shapes": mm_flops / (split["matmul"] / 1e3) / 1e9,
        "matmul_gflops_1024": peak_rate / 1e9,
        "ceiling_forward_backward": total_ms / (split["matmul"] + split["attention"]),
        "ceiling_step": variants["eager"]["ms_total"] / (split["matmul"] + split["attention"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    e, c = variants["eager"], variants["compiled"]
    sh = result["shares"]
    lines = [f"`{result['command']}` on {result['date']}, torch {result['torch']}, {result['threads']} threads; "
             f"{result['recipe']} at batch {B} x {T}, random tokens, {args.steps} timed steps per variant.", "",
             "| variant | forward ms | backward ms | clip ms | AdamW ms | step ms | tok/s |",
             "|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        p = v["ms_per_step"]
        lines.append(f"| {name} | {p['forward']:.2f} | {p['backward']:.2f} | {p['clip']:.2f} | {p['optimizer']:.2f} "
                     f"| {v['ms_total']:.2f} | {v['tokens_per_s']:,.0f} |")
    lines += ["", f"Profiled forward + backward (eager, self CPU time, {args.profile_steps} steps): "
              f"matmuls {sh['matmul']:.0%}, SDPA attention {sh['attention']:.0%}, everything else {sh['other']:.0%}.",
              f"The matmuls run at {result['matmul_gflops_at_model_shapes']:.0f} GFLOP/s at the model's shapes "
              f"against {result['matmul_gflops_1024']:.0f} GFLOP/s for a 1024^3 matmul in this run.",
              f"Removing every non-matmul, non-attention microsecond would speed forward + backward up by at most "
              f"{result['ceiling_forward_backward']:.2f}x (profiled), and the whole step, clipping and AdamW "
              f"included, by at most {result['ceiling_step']:.2f}x (the eager step time over the profiled "
              f"matmul and attention time); measured compiled / eager: "
              f"{c['tokens_per_s'] / e['tokens_per_s']:.2f}x."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
