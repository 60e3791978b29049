"""What the image-generation tasks share: data, batches, a noise generator, the EMA, sample grids.

The tasks (``ddpm`` and ``flow-matching`` in :mod:`weightsmith.tasks.diffusion`, ``vae`` in
:mod:`weightsmith.tasks.vae`) train on the image stage's data (:mod:`weightsmith.data.images`:
Fashion-MNIST or an image folder), with pixels scaled to [-1, 1] (``x / 127.5 - 1``, so the 256 levels
sit on a grid of step 2/255). Batches are the classification task's seeded epochs
(:class:`~weightsmith.tasks.classification.EpochBatches`); the default augmentation is a horizontal flip
only (a random crop would teach the model shifted garments, so ``crop_padding`` defaults to 0 here).

Randomness of the objective (noise, diffusion times, dropped labels, a VAE's latent noise) comes from
the task's own ``torch.Generator`` (CPU, seeded with ``train.seed + 2``), never from the global RNG.
Its state and the EMA are the task's :meth:`state_dict`, saved in every checkpoint's
``train_state.pt`` under ``"task"``, so a run killed and resumed continues bit-identically.

EMA (Polyak averaging; the diffusion papers sample with it, Ho et al. 2020 use decay 0.9999): after
each optimizer step, ``ema = d * ema + (1 - d) * weights`` with ``d = min(ema_decay, (1 + n) / (10 + n))``
after n updates (the warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), in float32.
Evaluation, the end-of-run samples and ``weightsmith sample`` use the EMA weights.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightsmith.data.images import ImageDataConfig
from weightsmith.errors import CheckpointError, ConfigError, DataError
from weightsmith.tasks.base import Task


@dataclass(kw_only=True)
class GenerativeImageDataConfig(ImageDataConfig):
    """``[data]`` of the image-generation tasks: :class:`~weightsmith.data.images.ImageDataConfig`, with
    flips but no crops by default.

    source: ``"fashion-mnist"`` or a path to an image folder (one subfolder per class).
    val_size: validation images held out of the training pool; default 5,000 for Fashion-MNIST and 10%
        of a folder.
    split_seed: seed of the train/val(/test) permutation.
    image_size: resize a folder's images to image_size x image_size (Fashion-MNIST is 28); set it for a
        folder so that the model section is checked against it before the data is read.
    channels: 1 (grayscale) or 3 (RGB); unset: from the first image.
    augment: random horizontal flips (``flip``) and translations (``crop_padding`` pixels) of the batch.
    crop_padding: translation range in pixels; 0 (default) keeps images where they are.
    flip: mirror left-right with probability 1/2 when ``augment``.
    cache_dir: default ``$WEIGHTSMITH_CACHE`` or ``~/.cache/weightsmith``.
    """

    crop_padding: int = 0


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(kw_only=True)
class GenerativeConfig:
    """Fields every image-generation task has (sampling and measuring at the end of the run)."""

    ema_decay: float = field(default=0.999, metadata=_doc(
        "decay of the EMA of the weights that evaluation and sampling use; 0 = no EMA (the raw weights)"))
    n_samples: int = field(default=64, metadata=_doc(
        "images in the end-of-run grid, samples.png and samples.npy (classes in turn if conditional)"))
    sample_seed: int = field(default=0, metadata=_doc("seed of the end-of-run samples and of evaluation noise"))
    eval_images: int = field(default=1000, metadata=_doc(
        "validation images of the quick evaluation during training (at most the split)"))
    classifier_run: str | None = field(default=None, metadata=_doc(
        "a classification run directory (e.g. of recipes/fmnist-resnet.toml): with it the end of the run "
        "reports FID / KID on its penultimate features and the class-conditional accuracy"))
    fid_samples: int = field(default=2048, metadata=_doc("n of the FID / KID at the end (with classifier_run)"))

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"task.ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("n_samples", "eval_images", "fid_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"task.{name} must be >= 1, got {getattr(self, name)}")


class EMA:
    """Float32 exponential moving average of a model's floating-point parameters and buffers, by name."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.n_updates = decay, 0
        self.shadow = {k: v.detach().float().clone() for k, v in _float_state(model).items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.n_updates) / (10 + self.n_updates))
        for k, v in _float_state(model).items():
            s = self.shadow[k]
            if s.device != v.device:
                s = self.shadow[k] = s.to(v.device)
            s.lerp_(v.detach().float(), 1.0 - d)  # s = d s + (1 - d) v
        self.n_updates += 1

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """Within the block ``model`` holds the EMA weights; its own come back afterwards."""
        state = _float_state(model)
        saved = {k: v.detach().clone() for k, v in state.items()}
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(self.shadow[k].to(v.device, v.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(saved[k])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "n_updates": self.n_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise CheckpointError(f"the checkpoint's EMA does not match the model: {sorted(missing)[:3]}")
        self.n_updates = int(state["n_updates"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the same tensors
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {k: v for k, v in named if v.is_floating_point()}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) float -> uint8 (N, C, H, W), rounded to the nearest of 256 levels."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, n_cols: int | None = None) -> None:
    """uint8 (N, C, H, W) images as one PNG grid (Pillow; rows of ``n_cols``, 2-pixel gaps), atomically."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = n_cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    gap = 2
    canvas = np.zeros((rows * (h + gap) + gap, cols * (w + gap) + gap, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        canvas[gap + r * (h + gap):gap + r * (h + gap) + h, gap + k * (w + gap):gap + k * (w + gap) + w] = \
            img.transpose(1, 2, 0)
    mode_img = Image.fromarray(canvas[:, :, 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")
    tmp = path.with_name(f".{path.name}.tmp")
    mode_img.save(tmp, format="PNG")
    tmp.replace(path)


class ImageGenerationTask(Task):
    """Base of ``ddpm``, ``flow-matching`` and ``vae``: the shared data, batches, noise generator and EMA.

    Subclasses implement ``loss``, ``evaluate``, :meth:`generate` and set ``conditional_fields``
    (``("n_classes",)`` for a model with a class embedding)."""

    data_config_cls = GenerativeImageDataConfig
    unit = "images"
    rate_key = "img_per_s"
    conditional_fields: tuple[str, ...] = ()
    samplers: tuple[str, ...] = ()  # names :meth:`generate` takes as ``sampler``, the default first

    def __init__(self, cfg: Any, data_cfg: Any, train_cfg: Any, sample_cfg: Any = None) -> None:
        super().__init__(cfg, data_cfg, train_cfg, sample_cfg)
        self.generator = torch.Generator().manual_seed(train_cfg.seed + 2)  # +0, +1: batch order, augmentation
        self.ema: EMA | None = None
        self._ema_state: dict[str, Any] | None = None

    # ---- data ----
    @classmethod
    def placeholder_fields(cls, data_cfg) -> dict[str, Any]:
        fields = {"in_channels": 1, "image_size": data_cfg.image_size or 28, "n_classes": 10}
        if data_cfg.source != "fashion-mnist":
            fields.update(in_channels=data_cfg.channels or 3, image_size=data_cfg.image_size or 32, n_classes=2)
        return {k: v for k, v in fields.items() if k in ("in_channels", "image_size") + cls.conditional_fields}

    def setup(self, run_dir: Path, *, resume: bool, log=print) -> None:
        from weightsmith.data.images import prepare_images

        self.data = prepare_images(self.data_cfg, log=log)
        if resume:
            self._check_same_data(run_dir)

    def _check_same_data(self, run_dir: Path) -> None:
        path = Path(run_dir) / "manifest.json"
        if not path.is_file():
            return
        want = json.loads(path.read_text()).get("data", {}).get("arrays", {})
        got = self.data.manifest.get("arrays", {})
        for name, info in want.items():
            found = got.get(name, {}).get("sha256")
            if found != info.get("sha256"):
                raise DataError(f"the data rebuilt from {run_dir}/config.toml is not what the run was trained on: "
                                f"{name} sha256 {found} != {info.get('sha256')} recorded in {path}")

    def model_fields(self) -> dict[str, Any]:
        d = self.data
        fields = {"in_channels": d.in_channels, "image_size": d.image_size, "n_classes": d.n_classes}
        return {k: v for k, v in fields.items() if k in ("in_channels", "image_size") + self.conditional_fields}

    def check_model(self, model_cfg: Any) -> None:
        for key, value in self.model_fields().items():
            got = getattr(model_cfg, key)
            if got != value and not (key == "n_classes" and got == 0):  # 0: an unconditional model
                raise ConfigError(f"model.{key}={got} but the data has {key}={value}; remove model.{key} from "
                                  f"the recipe to take it from the data" + (" (or set 0: unconditional)"
                                                                             if key == "n_classes" else ""))

    def write_artifacts(self, run_dir: Path) -> None:
        from weightsmith.fsio import atomic_write_text

        d = self.data
        labels = {"class_names": d.class_names, "in_channels": d.in_channels, "image_size": d.image_size,
                  "pixels": "x / 127.5 - 1, in [-1, 1]"}
        atomic_write_text(run_dir / "labels.json", json.dumps(labels, indent=2))

    def data_manifest(self) -> dict[str, Any]:
        return {"directory": str(self.data.directory), **self.data.manifest}

    def batches(self, device: str):
        """(images (B, C, S, S) float32 in [-1, 1], labels (B,) int64) in seeded epochs."""
        from weightsmith.tasks.classification import EpochBatches, Normalize

        d, dc, tc = self.data, self.data_cfg, self.train_cfg
        self.device = device
        augment = {"padding": dc.crop_padding, "flip": dc.flip} if dc.augment else None
        half = [0.5] * d.in_channels  # (x / 255 - 0.5) / 0.5 = x / 127.5 - 1
        return EpochBatches(torch.from_numpy(np.ascontiguousarray(d.train_x)), torch.from_numpy(d.train_y).long(),
                            tc.batch_size, tc.seed, device, Normalize(half, half, device), augment)

    def split(self, name: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (N, C, S, S), labels (N,)) of split ``name`` (train | val | test), the first ``n``."""
        x, y = getattr(self.data, f"{name}_x"), getattr(self.data, f"{name}_y")
        return (x, y) if n is None else (x[:n], y[:n])

    def count(self, batch) -> int:
        return batch[0].shape[0]

    # ---- randomness and EMA (the checkpointed task state) ----
    def randn(self, shape: tuple[int, ...], device: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise from the task's generator (CPU, then moved: the same numbers on any device)."""
        return torch.randn(shape, generator=generator or self.generator).to(device)

    def _ensure_ema(self, model: torch.nn.Module) -> EMA | None:
        if self.cfg.ema_decay <= 0:
            return None
        if self.ema is None:
            self.ema = EMA(model, self.cfg.ema_decay)
            if self._ema_state is not None:
                self.ema.load_state_dict(self._ema_state)
                self._ema_state = None
        return self.ema

    def after_step(self, model: torch.nn.Module) -> None:
        ema = self._ensure_ema(model)
        if ema is not None:
            ema.update(model)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        elif self._ema_state is not None:
            state["ema"] = self._ema_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.ema, self._ema_state = None, state.get("ema")  # applied when the model is first seen

    def load_ema_from(self, ckpt: Path) -> bool:
        """Take the EMA from checkpoint ``ckpt``'s train_state.pt (for evaluation after training).
        Returns False when the checkpoint has none."""
        from weightsmith.train.checkpoint import STATE, load_train_state

        if not (Path(ckpt) / STATE).is_file():
            return False
        task_state = load_train_state(Path(ckpt)).get("task", {})
        if "ema" not in task_state:
            return False
        self.ema, self._ema_state = None, task_state["ema"]
        return True

    @contextlib.contextmanager
    def sampling_weights(self, model: torch.nn.Module):
        """The model in eval mode with the EMA weights swapped in (when there is an EMA)."""
        was_training = model.training
        model.eval()
        ema = self._ensure_ema(model) if (self.ema is not None or self._ema_state is not None) else None
        try:
            if ema is None:
                yield model
            else:
                with ema.swapped_in(model):
                    yield model
        finally:
            model.train(was_training)

    # ---- sampling and the end-of-run report ----
    def sample_labels(self, model_cfg: Any, n: int) -> torch.Tensor | None:
        """Labels of an n-image grid: 0, 1, ..., K-1, 0, 1... for a conditional model, else None."""
        k = getattr(model_cfg, "n_classes", 0)
        return torch.arange(n) % k if k else None

    def generate(self, model: torch.nn.Module, n: int, labels: torch.Tensor | None, generator: torch.Generator,
                 **options: Any) -> torch.Tensor:
        """n images (n, C, S, S) in [-1, 1] from ``model`` (already in its sampling weights)."""
        raise NotImplementedError

    def nfe(self, **options: Any) -> int:
        """Network evaluations per image of :meth:`generate` with these options."""
        raise NotImplementedError

    def write_samples(self, model: torch.nn.Module, run_dir: Path, device: str, log=print) -> dict[str, Any]:
        """The end-of-run grid: samples.png and samples.npy (uint8 (n, C, S, S)); returns n, NFE and time."""
        import time

        n, cfg = self.cfg.n_samples, model.config
        labels = self.sample_labels(cfg, n)
        g = torch.Generator().manual_seed(self.cfg.sample_seed)
        t0 = time.perf_counter()
        with self.sampling_weights(model):
            x = self.generate(model, n, None if labels is None else labels.to(device), g)
        seconds = time.perf_counter() - t0
        images = to_uint8(x)
        np.save(run_dir / "samples.npy", images)
        k = getattr(cfg, "n_classes", 0)
        save_grid(images, run_dir / "samples.png", n_cols=k if k and n % k == 0 else None)
        return {"samples": n, "samples_nfe": self.nfe(), "sampling_s_per_64": seconds * 64 / n}

    def quality(self, model: torch.nn.Module, device: str, log=print) -> dict[str, Any]:
        """FID / KID at n = fid_samples beside the real-vs-real floor, and the class-conditional accuracy,
        with ``classifier_run``'s features; {} without one."""
        from weightsmith.eval.fid import conditional_accuracy, load_feature_extractor, sample_quality

        if self.cfg.classifier_run is None:
            return {}
        features = load_feature_extractor(self.cfg.classifier_run)
        n, cfg = self.cfg.fid_samples, model.config
        labels = self.sample_labels(cfg, n)
        g = torch.Generator().manual_seed(self.cfg.sample_seed + 1)
        chunks = []
        with self.sampling_weights(model):
            for i in range(0, n, 256):
                lab = None if labels is None else labels[i:i + 256].to(device)
                chunks.append(to_uint8(self.generate(model, min(256, n - i), lab, g)))
        samples = np.concatenate(chunks)
        out = sample_quality(samples, self.split("test")[0], self.split("train")[0], features)
        if labels is not None:
            out["conditional_accuracy"] = conditional_accuracy(samples, labels, features)
        log(f"FID {out['fid']:.2f} (real-vs-real floor {out['fid_floor']:.2f}, n = {n}), KID {out['kid']:.4f}"
            + (f", conditional accuracy {out['conditional_accuracy']:.3f}" if labels is not None else ""))
        return out
