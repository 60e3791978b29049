"""Compression benchmark: distillation against training the student from scratch, and pruning.

    python bench/compress.py --teacher runs/shakespeare --root runs/compress

1. Distillation (Hinton et al. 2015). The student of recipes/shakespeare-student.toml (the main-job GPT
   at half width) is trained twice for the same number of steps: from scratch (causal-lm) and from
   the teacher's logits (recipes/shakespeare-distill.toml). Same steps, batch and schedule; the
   distilled one also pays one teacher forward per step. Both students' val_bpb (whole validation
   split) is reported.
2. Pruning. The teacher is pruned with magnitude and Wanda (Sun et al. 2023), unstructured 50% and
   2:4 (`weightsmith prune`), then given a short recovery fine-tune that keeps the zeros
   (task sparse-finetune, ``train.init_from`` = the pruned run, ``--recovery-steps`` steps, lr 3e-4).
   val_bpb before, after pruning and after recovery.

Writes bench/results/compress.json and compress.md (or ``--results``). ``--set`` passes dotted
overrides to every student training (the tests shrink the runs with it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _eval(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text())


def _seconds(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return max((r.get("elapsed_s", 0.0) for r in rows), default=0.0)


def distill_rows(teacher: Path, root: Path, overrides: list[str], log) -> list[dict]:
    from weightsmith.train.loop import train

    rows = []
    for label, recipe, extra in (("student from scratch", "shakespeare-student.toml", []),
                                 ("distilled student", "shakespeare-distill.toml", [f"--task.teacher_run={teacher}"])):
        out = root / recipe.removesuffix(".toml")
        if not (out / "eval.json").is_file():
            t0 = time.perf_counter()
            train(ROOT / "recipes" / recipe, [*overrides, *extra], out=out, log=log)
            log(f"{label}: {time.perf_counter() - t0:.0f} s")
        cfg = tomllib.loads((out / "config.toml").read_text())
        rows.append({"row": label, "run": str(out), "val_bpb": _eval(out)["val_bpb"],
                     "steps": cfg["train"]["max_steps"], "train_seconds": _seconds(out),
                     "task": cfg["task"]})
    return rows


def prune_rows(teacher: Path, root: Path, recovery_steps: int, n_calibration: int, log) -> list[dict]:
    from weightsmith.ship.prune import prune_run
    from weightsmith.train.loop import train

    rows = []
    for method in ("magnitude", "wanda"):
        for sparsity in ("0.5", "2:4"):
            tag = f"{method}-{sparsity.replace(':', 'of').replace('.', '')}"
            pruned, rec = root / f"prune-{tag}", root / f"prune-{tag}-recovered"
            if not (pruned / "prune.json").is_file():
                prune_run(teacher, method, sparsity, pruned, n_calibration=n_calibration, log=log)
            report = json.loads((pruned / "prune.json").read_text())
            if not (rec / "eval.json").is_file():
                train(pruned / "config.toml", ["--task.name=sparse-finetune", f"--train.init_from={pruned}",
                                               f"--train.max_steps={recovery_steps}", "--train.max_time=1e9",
                                               "--train.lr=3e-4", "--train.min_lr=3e-5",
                                               f"--train.warmup_steps={max(1, recovery_steps // 10)}",
                                               f"--train.eval_every={recovery_steps + 1}",
                                               f"--train.ckpt_every={recovery_steps + 1}",
                                               "--sample.max_new_tokens=1"], out=rec, log=log)
            rows.append({"method": method, "sparsity": sparsity, "before": report["before"]["val_bpb"],
                         "after": report["after"]["val_bpb"], "recovered": _eval(rec)["val_bpb"],
                         "block_linear_sparsity": report["block_linear_sparsity"],
                         "recovery_steps": recovery_steps, "magnitude_fallback": report["magnitude_fallback"]})
    return rows


def markdown(result: dict) -> str:
    lines = ["# Compression: distillation and pruning", "",
             f"Command: `{result['command']}`", "", "## Distillation (same steps)", "",
             "| student | val_bpb | steps | train s |", "|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['val_bpb']:.4f} | {r['steps']} | {r['train_seconds']:.0f} |"
              for r in result["distillation"]]
    lines += ["", f"Teacher: {result['teacher']} (val_bpb {result['teacher_val_bpb']:.4f}).", "",
              "## Pruning of the teacher's block linears", "",
              "| method | pattern | sparsity reached | val_bpb before | after | after recovery |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['sparsity']} | {r['block_linear_sparsity']:.3f} | {r['before']:.4f} | "
              f"{r['after']:.4f} | {r['recovered']:.4f} |" for r in result["pruning"]]
    steps = result["pruning"][0]["recovery_steps"] if result["pruning"] else 0
    lines += ["", f"Recovery: {steps} steps of sparse-finetune (zeros kept), lr 3e-4.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="runs/shakespeare")
    p.add_argument("--root", default="runs/compress", help="where the bench's runs go (reruns skip finished ones)")
    p.add_argument("--recovery-steps", type=int, default=100)
    p.add_argument("--n-calibration", type=int, default=128)
    p.add_argument("--set", action="append", default=[], metavar="--section.key=value",
                   help="override for both student trainings (repeatable)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "compress"), help="path stem of .json/.md")
    args = p.parse_args(argv)
    log = print
    teacher, root = Path(args.teacher), Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    result = {"command": "python bench/compress.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "teacher": str(teacher), "teacher_val_bpb": _eval(teacher)["val_bpb"],
              "distillation": distill_rows(teacher, root, args.set, log),
              "pruning": prune_rows(teacher, root, args.recovery_steps, args.n_calibration, log)}
    stem = Path(args.results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
