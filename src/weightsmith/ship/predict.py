"""Top-k predictions of a trained image classifier on the user's own image files.

Each image is read with Pillow, converted to the run's channel count (``L`` for 1, ``RGB`` for 3),
resized to ``image_size`` x ``image_size`` (bilinear) when its size differs, scaled to [0, 1] and
normalized with the training split's mean and std from the run's ``labels.json``, exactly as the
training images were.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from weightsmith.errors import CheckpointError, ConfigError, DataError


def load_image(path: str | Path, in_channels: int, image_size: int) -> np.ndarray:
    """uint8 (in_channels, image_size, image_size) from an image file.

    Raises:
        DataError: the file is missing or Pillow cannot read it.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im = im.convert("L" if in_channels == 1 else "RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {p}: {e}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@torch.no_grad()
def predict_images(run_dir: str | Path, paths: list[str], top_k: int = 3) -> list[dict]:
    """``[{"file", "top": [(class name, probability), ...]}]`` for each image, most probable first.

    Raises:
        CheckpointError: ``run_dir`` is not a classifier run (no ``labels.json``).
        ConfigError: ``top_k`` < 1.
        DataError: an image cannot be read.
    """
    from weightsmith.tasks.classification import Normalize
    from weightsmith.train.checkpoint import load_run

    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    run_dir = Path(run_dir)
    labels_path = run_dir / "labels.json"
    if not labels_path.is_file():
        raise CheckpointError(f"{run_dir} is not an image-classifier run (no labels.json)")
    labels = json.loads(labels_path.read_text())
    images = np.stack([load_image(p, labels["in_channels"], labels["image_size"]) for p in paths])
    run = load_run(run_dir)
    probs = run.model(Normalize(labels["mean"], labels["std"], "cpu")(torch.from_numpy(images))).softmax(-1)
    k = min(top_k, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    names = labels["class_names"]
    return [{"file": str(p), "top": [(names[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]}
            for p, vs, ix in zip(paths, values, indices)]
