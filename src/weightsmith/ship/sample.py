"""Images from an image-generation run (``ddpm``, ``flow-matching``, ``vae``): a PNG grid and the raw samples.

``weightsmith sample RUN --n N --sampler ddim --steps S [--eta E] [--guidance W] [--class C] --out grid.png``
loads the run's newest checkpoint with its EMA weights (weightsmith.tasks.generative), draws N images
with the task's sampler (weightsmith.tasks.diffusion: ``ddpm``, ``ddim`` / ``euler``, ``heun``;
weightsmith.tasks.vae: ``prior``) and writes ``grid.png`` (Pillow) and ``grid.npy`` beside it: uint8
(N, C, H, W). A class-conditional model samples every class in turn unless ``--class`` names one.
Nothing is overwritten: an existing output is a one-line error before any work.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightsmith.errors import CheckpointError, ConfigError


def _outputs(out: str | Path) -> tuple[Path, Path]:
    png = Path(out)
    if png.suffix.lower() != ".png":
        raise ConfigError(f"--out {png} must name a .png file (the .npy of the samples is written beside it)")
    npy = png.with_suffix(".npy")
    for p in (png, npy):
        if p.exists():
            raise CheckpointError(f"{p} already exists; choose another --out (nothing is overwritten)")
    if not png.parent.is_dir():
        raise CheckpointError(f"--out {png}: directory {png.parent} does not exist")
    return png, npy


def open_generative_run(run_dir: str | Path, device: str = "cpu"):
    """(task, model) of an image-generation run: the newest checkpoint's weights, the task's EMA state
    loaded from it (used by ``task.sampling_weights``).

    Raises:
        CheckpointError: not a run, no checkpoint, or a run of a task that does not generate images.
    """
    from weightsmith.recipe import recipe_from_tree
    from weightsmith.tasks.generative import ImageGenerationTask
    from weightsmith.train.checkpoint import load_run

    run = load_run(run_dir, device=device)
    recipe = recipe_from_tree(run.config, name=Path(run_dir).name)
    if not issubclass(recipe.task_cls, ImageGenerationTask):
        raise CheckpointError(f"{run_dir} is a {recipe.task_name} run; `weightsmith sample` needs a run of "
                              "ddpm, flow-matching or vae")
    task = recipe.task_cls(recipe.task, recipe.data, recipe.train, None)
    task.load_ema_from(run.checkpoint)
    return task, run.model


def sample_run(run_dir: str | Path, n: int, out: str | Path, *, sampler: str | None = None, steps: int | None = None,
               eta: float | None = None, guidance: float | None = None, class_id: int | None = None, seed: int = 0,
               device: str = "cpu") -> dict[str, Any]:
    """Write ``n`` samples of the run in ``run_dir`` to ``out`` (PNG grid) and ``out`` with ``.npy``.

    Unset options take the run's ``[task]`` values. Returns ``{"n", "sampler", "steps", "nfe",
    "seconds", "seconds_per_64", "png", "npy"}``; NFE counts network evaluations per image.

    Raises:
        ConfigError: n < 1, a sampler or option the run's task does not have, a class out of range.
        CheckpointError: an existing output, or a run that cannot be loaded.
    """
    from weightsmith.tasks.generative import save_grid, to_uint8

    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    png, npy = _outputs(out)
    task, model = open_generative_run(run_dir, device)
    sampler = sampler or (task.cfg.sampler if hasattr(task.cfg, "sampler") else task.samplers[0])
    if sampler not in task.samplers:
        raise ConfigError(f"--sampler {sampler}: a {task.name} run samples with {', '.join(task.samplers)}")
    options: dict[str, Any] = {"sampler": sampler}
    given = {"steps": steps, "eta": eta, "guidance": guidance}
    takes = {"ddpm": ("steps", "eta", "guidance"), "flow-matching": ("steps", "guidance"), "vae": ()}[task.name]
    for key, value in given.items():
        if value is None:
            continue
        if key not in takes:
            raise ConfigError(f"--{key} does not apply to a {task.name} run (it takes "
                              f"{', '.join('--' + k for k in takes) or 'no sampler options'})")
        options[key] = value
    cfg = model.config
    k = getattr(cfg, "n_classes", 0)
    if class_id is not None:
        if not k:
            raise ConfigError(f"--class {class_id}: this model is unconditional (model.n_classes = 0)")
        if not 0 <= class_id < k:
            raise ConfigError(f"--class must be in [0, {k - 1}], got {class_id}")
        labels = torch.full((n,), class_id, dtype=torch.long)
    else:
        labels = task.sample_labels(cfg, n)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with task.sampling_weights(model):
        x = task.generate(model, n, None if labels is None else labels.to(device), g, **options)
    seconds = time.perf_counter() - t0
    images = to_uint8(x)
    fd, tmp = tempfile.mkstemp(suffix=".npy", dir=npy.parent, prefix=f".{npy.stem}.")
    os.close(fd)
    np.save(tmp, images)
    os.replace(tmp, npy)
    save_grid(images, png, n_cols=k if k and class_id is None and n % k == 0 else None)
    nfe = task.nfe(**options)
    return {"n": n, "sampler": sampler, "steps": options.get("steps", getattr(task.cfg, "sample_steps", 1)),
            "nfe": nfe, "seconds": seconds, "seconds_per_64": seconds * 64 / n, "png": str(png), "npy": str(npy)}
