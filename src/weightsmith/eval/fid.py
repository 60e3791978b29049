"""Sample quality of image generators, measured with a classifier that weightsmith trained.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"): the Fréchet distance between Gaussians fitted to the features of two image sets,
  ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased squared MMD with the cubic
  polynomial kernel ``(x.y / d + 1)^3``, averaged over random subsets; unbiased, so its floor is ~0.

Both come from ``torchmetrics`` (``FrechetInceptionDistance`` and ``KernelInceptionDistance``, with a
custom feature extractor), not from our own Fréchet code. There is no InceptionV3 (no internet): the
features are the *penultimate* activations (the input of ``head``) of a Fashion-MNIST classifier run
directory of the ``classification`` task (``weightsmith train recipes/fmnist-resnet.toml``), so the
numbers are comparable only with the same classifier and the same n. Every figure states n and sits
beside the real-vs-real floor at that n (:func:`sample_quality`): FID is biased upward at small n.

Images everywhere here are uint8 (N, C, H, W), the classifier's own input size and channels.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weightsmith.errors import CheckpointError, ConfigError


class ClassifierFeatures(nn.Module):
    """uint8 images (B, C, H, W) -> penultimate features (B, num_features) float32 of an image classifier.

    The images are normalized as the classifier's training images were (``labels.json``'s mean and std);
    the features are what the classifier's ``head`` reads (captured with a forward pre-hook), so any
    registered classifier family works (mlp, resnet, convnext, vit). ``logits(images)`` gives (B, K).
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if not isinstance(getattr(model, "head", None), nn.Linear):
            raise ConfigError(f"{type(model).__name__} has no linear `head`; FID features need a classifier")
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.num_features = model.head.in_features  # torchmetrics reads this instead of a dummy forward
        self._captured: torch.Tensor | None = None
        model.head.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._captured = args[0]

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std
        return self.model(x)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> class logits (B, n_classes)."""
        return self._run(images).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._run(images)
        return self._captured.float().flatten(1)


def load_feature_extractor(run_dir: str | Path) -> ClassifierFeatures:
    """The penultimate features of the classifier in ``run_dir`` (newest checkpoint, CPU, eval mode).

    Raises:
        CheckpointError: ``run_dir`` is not an image-classifier run (no ``labels.json``, no checkpoint).
    """
    from weightsmith.train.checkpoint import load_run

    run_dir = Path(run_dir)
    labels_path = run_dir / "labels.json"
    if not labels_path.is_file():
        raise CheckpointError(f"{run_dir} is not an image-classifier run (no labels.json); train one with "
                              "`weightsmith train recipes/fmnist-resnet.toml`")
    labels = json.loads(labels_path.read_text())
    if "mean" not in labels or "class_names" not in labels:
        raise CheckpointError(f"{labels_path} has no normalization; it is not a classifier run's labels.json")
    run = load_run(run_dir)
    for p in run.model.parameters():
        p.requires_grad_(False)
    return ClassifierFeatures(run.model, labels["mean"], labels["std"])


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


def _check(images: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ConfigError(f"{what} must be uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    return x


def fid_kid(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, features: ClassifierFeatures, *,
            batch_size: int = 256, kid_subsets: int = 100, seed: int = 0) -> dict[str, Any]:
    """FID and KID of ``fake`` against ``real`` (uint8 (N, C, H, W) each) in ``features``' space.

    KID uses ``kid_subsets`` random subsets of ``min(1000, n_real, n_fake)`` images each, drawn with
    ``seed`` (torchmetrics draws them from the global RNG; it is forked and restored here).

    Returns: ``{"fid", "kid", "kid_std", "n_real", "n_fake"}``.

    Raises:
        ConfigError: images that are not uint8 (N, C, H, W), or fewer than 2 of either.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _check(real, "real images"), _check(fake, "generated images")
    if len(real) < 2 or len(fake) < 2:
        raise ConfigError(f"FID needs at least 2 images of each set, got {len(real)} real and {len(fake)} generated")
    subset = min(1000, len(real), len(fake))
    fid = FrechetInceptionDistance(feature=features, reset_real_features=True)
    with warnings.catch_warnings():  # "KID will save all extracted features": a few thousand 128-vectors here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=features, subsets=kid_subsets, subset_size=subset)
    for xs, is_real in ((real, True), (fake, False)):
        for xb in _batches(xs, batch_size):
            fid.update(xb, real=is_real)
            kid.update(xb, real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "n_real": len(real), "n_fake": len(fake)}


def sample_quality(samples: np.ndarray, test: np.ndarray, train: np.ndarray, features: ClassifierFeatures,
                   *, seed: int = 0) -> dict[str, Any]:
    """FID / KID of ``samples`` against test images, beside the floor: test against training images, both
    at n = ``len(samples)`` (the first n of each split). Returns ``{"fid_n", "fid", "kid", "kid_std",
    "fid_floor", "kid_floor", "fid_over_floor"}``.

    Raises:
        ConfigError: a split has fewer than n images.
    """
    n = len(samples)
    if len(test) < n or len(train) < n:
        raise ConfigError(f"FID at n = {n} needs n test and n training images; the data has {len(test)} and "
                          f"{len(train)}")
    got = fid_kid(test[:n], samples, features, seed=seed)
    floor = fid_kid(test[:n], train[:n], features, seed=seed)
    return {"fid_n": n, "fid": got["fid"], "kid": got["kid"], "kid_std": got["kid_std"], "fid_floor": floor["fid"],
            "kid_floor": floor["kid"], "fid_over_floor": got["fid"] / max(floor["fid"], 1e-12)}


def conditional_accuracy(samples: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                         features: ClassifierFeatures, batch_size: int = 256) -> float:
    """Fraction of ``samples`` (uint8 (N, C, H, W)) that the classifier assigns to the class each was
    generated for (``labels`` (N,) int)."""
    x = _check(samples, "generated images")
    y = torch.as_tensor(np.asarray(labels)).long()
    pred = torch.cat([features.logits(xb).argmax(-1) for xb in _batches(x, batch_size)])
    return float((pred == y).float().mean())
