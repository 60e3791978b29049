"""Image generators side by side: samplers of a DDPM run, a flow-matching run and a VAE run.

    python bench/generative.py --classifier runs/fmnist-resnet --ddpm runs/fmnist-ddpm \
        --flow runs/fmnist-flow --vae runs/fmnist-vae --n 2048 --out bench/results/generative

Any of --ddpm, --flow, --vae may be left out. Rows (guided ones only for a class-conditional model):

- ``ddpm-ancestral``: DDPM ancestral sampling (Ho et al. 2020), ``--ddpm-steps`` steps (default 100: 1000
  steps with guidance cost 2,000 forwards per image, hours for n = 2048 on a 2-core CPU), guided;
- ``ddim``: DDIM (Song et al. 2021) ``--ddim-steps`` (default 50) steps, eta = 0, without guidance (w = 1,
  still class-conditional);
- ``ddim-guided``: the same with classifier-free guidance ``--guidance`` (our w; the paper's w - 1);
- ``flow-euler``: flow matching, Euler, ``--flow-nfe`` (default 50) steps, guided;
- ``flow-heun``: flow matching, Heun, half as many steps (the same NFE), guided;
- ``vae-prior``: decoder means of z ~ N(0, I).

Every row samples ``--n`` images from ``--seed``, balanced over the classes (0, 1, ..., K-1, 0, ...) with
the library's samplers (:meth:`ImageGenerationTask.generate`, i.e. :mod:`weightsmith.tasks.diffusion` and
:mod:`weightsmith.tasks.vae`) in batches of 64 with the run's EMA weights, and reports:

- ``nfe``: evaluations of the (guided) vector field per image: steps, x2 for Heun;
- ``forwards``: network forwards per image: nfe, x2 with guidance (conditional and null label);
- ``s_per_64``: wall seconds of the sampler alone per 64 images (the sum over batches of 64, scaled to
  64 images), at ``torch_threads`` threads;
- ``fid``, ``kid``, ``fid_floor``, ``kid_floor``, ``fid_over_floor``: :func:`weightsmith.eval.fid.sample_quality`
  on the classifier's penultimate features, samples against the first n test images, and the floor of
  the first n training images against the same test images;
- ``conditional_accuracy``: the classifier's accuracy on the samples against the class each was asked for.

Outputs in ``--out``: ``generative.json`` and ``generative.md`` (rewritten after every row, so a run that
is cut keeps its finished rows; a rerun skips the rows present unless ``--force``), ``<row>.png`` (a grid
of the first 10 samples of every class) and ``samples/<row>.npy`` (uint8 (n, C, H, W), all samples).
Run it alone: two cores shared with anything else give wrong speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightsmith.errors import ConfigError, WeightsmithError

BATCH = 64
JSON_FILE, MD_FILE = "generative.json", "generative.md"


def method_rows(kind: str, task: Any, model: torch.nn.Module, *, ddpm_steps: int, guidance: float,
                ddim_steps: int = 50, flow_nfe: int = 50) -> list[dict[str, Any]]:
    """The rows of one run: ``{"key", "method", "options", "guided"}``, ``options`` as ``task.generate`` takes
    them. ``kind`` is ``ddpm``, ``flow`` or ``vae``; guided rows need ``model.config.n_classes > 0``."""
    conditional = bool(getattr(model.config, "n_classes", 0))
    w = guidance if conditional else 1.0
    g = f", w={w:g}" if w != 1.0 else ""
    if kind == "ddpm":
        rows = [("ddpm-ancestral", f"DDPM ancestral {ddpm_steps} steps{g}",
                 {"sampler": "ddpm", "steps": ddpm_steps, "eta": 0.0, "guidance": w}),
                ("ddim", f"DDIM {ddim_steps} steps, eta=0" + (", w=1" if conditional else ""),
                 {"sampler": "ddim", "steps": ddim_steps, "eta": 0.0, "guidance": 1.0})]
        if conditional:
            rows.append(("ddim-guided", f"DDIM {ddim_steps} steps, eta=0{g}",
                         {"sampler": "ddim", "steps": ddim_steps, "eta": 0.0, "guidance": w}))
    elif kind == "flow":
        rows = [("flow-euler", f"flow Euler {flow_nfe} steps{g}",
                 {"sampler": "euler", "steps": flow_nfe, "guidance": w}),
                ("flow-heun", f"flow Heun {max(flow_nfe // 2, 1)} steps{g}",
                 {"sampler": "heun", "steps": max(flow_nfe // 2, 1), "guidance": w})]
    elif kind == "vae":
        rows = [("vae-prior", "VAE prior, z ~ N(0, I)", {"sampler": "prior"})]
    else:
        raise ConfigError(f"kind {kind!r}; choose ddpm, flow or vae")
    return [{"key": k, "method": m, "options": o, "guided": o.get("guidance", 1.0) != 1.0} for k, m, o in rows]


def _generate_options(task: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without the sampler name for a task with one sampler (vae takes no options)."""
    return {} if task.name == "vae" else dict(options)


def sample_row(task: Any, model: torch.nn.Module, n: int, options: dict[str, Any], seed: int,
               device: str = "cpu") -> tuple[np.ndarray, np.ndarray | None, float]:
    """(samples uint8 (n, C, H, W), labels (n,) or None, sampler seconds) of one row, in batches of 64
    from one ``torch.Generator`` seeded with ``seed``; labels are ``task.sample_labels`` (balanced)."""
    from weightsmith.tasks.generative import to_uint8

    labels = task.sample_labels(model.config, n)
    g = torch.Generator().manual_seed(seed)
    opts = _generate_options(task, options)
    chunks, seconds = [], 0.0
    with task.sampling_weights(model):
        for i in range(0, n, BATCH):
            lab = None if labels is None else labels[i:i + BATCH].to(device)
            t0 = time.perf_counter()
            x = task.generate(model, min(BATCH, n - i), lab, g, **opts)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            chunks.append(to_uint8(x))
    return np.concatenate(chunks), None if labels is None else labels.numpy(), seconds


def counts(task: Any, options: dict[str, Any]) -> tuple[int, int]:
    """(nfe, forwards) per image: the task's own count (:meth:`nfe`, guidance doubled) is the forwards;
    nfe is the same count without guidance."""
    opts = _generate_options(task, options)
    forwards = task.nfe(**opts)
    nfe = task.nfe(**{**opts, "guidance": 1.0}) if "guidance" in opts else forwards
    return nfe, forwards


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def write_markdown(result: dict[str, Any], path: Path) -> None:
    """The one table of ``generative.md`` from the ``generative.json`` dict."""
    n = result["n"]
    lines = [f"# Image generators: FID / KID at n = {n:,} on {result['classifier']}'s features", "",
             f"torch {result['torch']}, {result['torch_threads']} threads, {result['device']}, seed "
             f"{result['seed']}; {result['machine']}. NFE: evaluations of the guided vector field per image; "
             "forwards: network forwards per image (x2 with guidance). s/64: sampler wall seconds per 64 "
             "images. Written by `python bench/generative.py`.", "",
             "| method | run | NFE | forwards | s/64 images | FID | KID | FID/floor | cond. acc. | test bits/dim |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    floor = result.get("floor")
    if floor:
        lines.append(f"| real vs real (train vs test) | – | – | – | – | {floor['fid']:.2f} | {floor['kid']:.4f} | "
                     f"1.00 | {_fmt(floor.get('accuracy'), '.3f')} | – |")
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {Path(r['run']).name} | {r['nfe']} | {r['forwards']} | {r['s_per_64']:.2f} | "
                     f"{r['fid']:.2f} | {r['kid']:.4f} | {r['fid_over_floor']:.2f} | "
                     f"{_fmt(r.get('conditional_accuracy'), '.3f')} | {_fmt(r.get('test_bpd'), '.4f')} |")
    lines += ["", "Floor: FID / KID of the first n training images against the first n test images; the "
              "cond. acc. of the floor row is the classifier's accuracy on those training images. "
              "VAE bits/dim: the run's eval.json (test -ELBO)."]
    _atomic_text(path, "\n".join(lines) + "\n")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_existing(path: Path, header: dict[str, Any], force: bool) -> dict[str, Any]:
    if force or not path.is_file():
        return {**header, "rows": []}
    old = json.loads(path.read_text())
    for key in ("n", "seed", "classifier"):
        if old.get(key) != header[key]:
            raise ConfigError(f"{path} was written with {key}={old.get(key)!r}, not {header[key]!r}; pass --force "
                              "to start it again or choose another --out")
    return {**header, "floor": old.get("floor"), "rows": old.get("rows", [])}


def _open(run_dir: Path, device: str):
    from weightsmith.ship.sample import open_generative_run

    task, model = open_generative_run(run_dir, device)
    task.setup(run_dir, resume=False, log=lambda *a: None)  # the data: test and train images for FID
    return task, model


def run_bench(*, classifier: str | Path, runs: dict[str, str | Path | None], n: int, out: str | Path,
              seed: int = 0, ddpm_steps: int = 100, ddim_steps: int = 50, flow_nfe: int = 50,
              guidance: float = 2.0, force: bool = False,
              device: str = "cpu", log=print) -> dict[str, Any]:
    """Measure every row of every given run (``runs``: ``{"ddpm": dir, "flow": dir, "vae": dir}``, None
    skips one) and write the outputs in ``out``; returns the ``generative.json`` dict.

    Raises:
        ConfigError: n < 2, no run given, a run of the wrong task, an existing result of another n / seed.
    """
    from weightsmith.eval.fid import conditional_accuracy, fid_kid, load_feature_extractor, sample_quality
    from weightsmith.tasks.generative import save_grid

    if n < 2:
        raise ConfigError(f"--n must be >= 2 (FID needs two images), got {n}")
    want = {"ddpm": "ddpm", "flow": "flow-matching", "vae": "vae"}
    given = {k: Path(v) for k, v in runs.items() if v is not None}
    if not given:
        raise ConfigError("give at least one of --ddpm, --flow, --vae")
    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    features = load_feature_extractor(classifier)
    header = {"n": n, "seed": seed, "classifier": str(classifier), "device": device,
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    result = _load_existing(out / JSON_FILE, header, force)
    done = {r["key"] for r in result["rows"]}

    def save() -> None:
        _atomic_text(out / JSON_FILE, json.dumps(result, indent=2) + "\n")
        write_markdown(result, out / MD_FILE)

    for kind, run_dir in given.items():
        task, model = _open(run_dir, device)
        if task.name != want[kind]:
            raise ConfigError(f"--{kind} {run_dir} is a {task.name} run; --{kind} takes a {want[kind]} run")
        test, train = task.split("test")[0], task.split("train")[0]
        if result.get("floor") is None:
            fl = fid_kid(test[:n], train[:n], features, seed=0)
            acc = conditional_accuracy(train[:n], task.split("train")[1][:n], features)
            result["floor"] = {"fid": fl["fid"], "kid": fl["kid"], "kid_std": fl["kid_std"], "accuracy": acc,
                               "run": str(run_dir)}
            save()
        for row in method_rows(kind, task, model, ddpm_steps=ddpm_steps, guidance=guidance, ddim_steps=ddim_steps,
                               flow_nfe=flow_nfe):
            if row["key"] in done:
                log(f"{row['key']}: in {out / JSON_FILE} already (--force to measure it again)")
                continue
            samples, labels, seconds = sample_row(task, model, n, row["options"], seed, device)
            q = sample_quality(samples, test, train, features)
            nfe, forwards = counts(task, row["options"])
            entry = {"key": row["key"], "method": row["method"], "run": str(run_dir), "options": row["options"],
                     "nfe": nfe, "forwards": forwards, "sampler_seconds": seconds, "s_per_64": seconds * 64 / n,
                     **q, "conditional_accuracy": None if labels is None else
                     conditional_accuracy(samples, labels, features)}
            if kind == "vae":
                ev = Path(run_dir) / "eval.json"
                entry["test_bpd"] = json.loads(ev.read_text()).get("test_bpd") if ev.is_file() else None
            np.save(out / "samples" / f"{row['key']}.npy", samples)
            k = getattr(model.config, "n_classes", 0)
            save_grid(samples[:10 * k] if k else samples[:100], out / f"{row['key']}.png", n_cols=k or None)
            result["rows"].append(entry)
            save()
            log(f"{row['method']}: FID {q['fid']:.2f} (floor {q['fid_floor']:.2f}), KID {q['kid']:.4f}, "
                f"{entry['s_per_64']:.2f} s/64, NFE {nfe} ({forwards} forwards)")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classifier", required=True, help="classification run whose features FID / KID use")
    p.add_argument("--ddpm", default=None, help="a ddpm run")
    p.add_argument("--flow", default=None, help="a flow-matching run")
    p.add_argument("--vae", default=None, help="a vae run")
    p.add_argument("--n", type=int, default=2048, help="samples per row, and real images of the floor")
    p.add_argument("--seed", type=int, default=0, help="seed of every row's sampler")
    p.add_argument("--ddpm-steps", type=int, default=100, help="steps of the DDPM ancestral row")
    p.add_argument("--ddim-steps", type=int, default=50, help="steps of the DDIM rows")
    p.add_argument("--flow-nfe", type=int, default=50, help="NFE of the flow rows (Euler: steps; Heun: 2 x steps)")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance scale w of the guided rows")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="measure every row again")
    p.add_argument("--out", default="bench/results/generative", help="output directory")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_bench(classifier=args.classifier, runs={"ddpm": args.ddpm, "flow": args.flow, "vae": args.vae},
                  n=args.n, out=args.out, seed=args.seed, ddpm_steps=args.ddpm_steps, ddim_steps=args.ddim_steps,
                  flow_nfe=args.flow_nfe, guidance=args.guidance,
                  force=args.force, device=args.device)
    except WeightsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
