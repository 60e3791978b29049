"""Image classification: cross-entropy (optionally label-smoothed) over class logits.

Data: the image stage (:mod:`weightsmith.data.images`): Fashion-MNIST or an image folder, split into
train / validation (held out from train) / test, stored as uint8 ``(N, C, H, W)``. Batches draw the
training split in epochs: a seeded permutation per epoch, consumed in order, so every image is seen
once per epoch. Random crop with zero padding and horizontal flip run on the batch as tensor ops with
their own seeded generator. Both generators and the position in the epoch are checkpointed, so resume
is exact. Images are scaled to [0, 1] and normalized with the training split's per-channel mean and std.

Units: ``loss`` in nats per image; ``count`` is images; MFU uses the analytic FLOPs per image. The
end-of-run report (``eval.json``) has validation and test loss and accuracy, accuracy per class (the
slices), the most-confused class pairs and the expected calibration error (Guo et al. 2017, "On
Calibration of Modern Neural Networks": 15 equal-width confidence bins, ``sum_b |B_b|/n * |acc_b -
conf_b|``). The test split is scored once, at the end; during training only validation is used.
Artifacts: ``confusion.json`` and ``confusion.png`` (rows true class, columns predicted, test split)
and ``labels.json`` (class names and the normalization that ``weightsmith predict`` applies).

Models follow ``forward(x: (B, in_channels, image_size, image_size) float32) -> logits (B, n_classes)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from weightsmith.data.images import ImageDataConfig
from weightsmith.errors import ConfigError, DataError
from weightsmith.tasks import register_task
from weightsmith.tasks.base import Task


@dataclass(kw_only=True)
class ClassificationConfig:
    """``[task]`` of ``classification``. ``label_smoothing`` in [0, 1) (Szegedy et al. 2016)."""

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}")


class Normalize:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std, per channel."""

    def __init__(self, mean: list[float], std: list[float], device: str) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


class EpochBatches:
    """(images, labels) batches in seeded epochs, with seeded crop-and-flip augmentation.

    Batches never straddle an epoch: the last ``N mod B`` images of a permutation are dropped and the
    next epoch starts with a fresh permutation (as ``DataLoader(drop_last=True)``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, device: str,
                 normalize: Normalize, augment: dict[str, Any] | None) -> None:
        if len(x) < batch_size:
            raise ConfigError(f"training split has {len(x)} images; train.batch_size={batch_size} is larger")
        self.x, self.y, self.batch_size, self.device = x, y, batch_size, device
        self.normalize, self.augment = normalize, augment
        self.order_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator().manual_seed(seed + 1)
        self.epoch, self.pos, self.perm = 0, 0, torch.randperm(len(x), generator=self.order_gen)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) float32 normalized, labels (B,) int64."""
        if self.pos + self.batch_size > len(self.perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self.perm = torch.randperm(len(self.x), generator=self.order_gen)
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        xb, yb = self.x[idx], self.y[idx]
        if self.augment is not None:
            from weightsmith.data.images import random_crop_flip

            xb = random_crop_flip(xb, self.aug_gen, **self.augment)
        return self.normalize(xb.to(self.device)), yb.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"order_gen": self.order_gen.get_state(), "aug_gen": self.aug_gen.get_state(),
                "epoch": self.epoch, "pos": self.pos, "perm": self.perm.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order_gen.set_state(state["order_gen"])
        self.aug_gen.set_state(state["aug_gen"])
        self.epoch, self.pos, self.perm = state["epoch"], state["pos"], state["perm"]


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of softmax probabilities (N, K) against labels (N,), equal-width confidence bins (Guo et al. 2017)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)  # bin b holds conf in [b/n, (b+1)/n)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.float().mean().item() * abs(correct[sel].mean().item() - conf[sel].mean().item())
    return ece


@torch.no_grad()
def predict_split(model: torch.nn.Module, x: torch.Tensor, normalize: Normalize, batch_size: int, device: str,
                  autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits (N, n_classes) float32 for uint8 images (N, C, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            out.append(model(normalize(x[i:i + batch_size].to(device))).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def classification_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                          prefix: str) -> tuple[dict[str, Any], np.ndarray]:
    """Loss (nats per image), accuracy, per-class accuracy, ECE and the confusion matrix (K, K)."""
    k = len(class_names)
    loss = F.cross_entropy(logits, labels).item()
    pred = logits.argmax(-1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), pred.numpy()), 1)
    per_class = {name: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, name in enumerate(class_names)}
    report = {f"{prefix}_loss": loss, f"{prefix}_acc": float((pred == labels).float().mean()),
              f"{prefix}_images": len(labels), f"{prefix}_per_class_acc": per_class,
              f"{prefix}_ece": expected_calibration_error(logits.softmax(-1), labels)}
    return report, confusion


def most_confused(confusion: np.ndarray, class_names: list[str], n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` largest off-diagonal cells: true class, predicted class, count."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:n]
    pairs = []
    for f in flat:
        i, j = divmod(int(f), len(class_names))
        if off[i, j] > 0:
            pairs.append({"true": class_names[i], "predicted": class_names[j], "count": int(off[i, j])})
    return pairs


def save_confusion_png(confusion: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """The confusion matrix as a heat map with counts (matplotlib, Agg backend), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.55 * k), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = confusion.max() or 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if confusion[i, j] > top / 2 else "black")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


@register_task("classification")
class Classification(Task):
    """Supervised image classification (the vision families' default task)."""

    config_cls = ClassificationConfig
    data_config_cls = ImageDataConfig
    unit = "images"
    rate_key = "img_per_s"

    @classmethod
    def placeholder_fields(cls, data_cfg) -> dict[str, Any]:
        if data_cfg.source == "fashion-mnist":
            return {"in_channels": 1, "image_size": data_cfg.image_size or 28, "n_classes": 10}
        return {"in_channels": data_cfg.channels or 3, "image_size": data_cfg.image_size or 32, "n_classes": 2}

    def setup(self, run_dir: Path, *, resume: bool, log=print) -> None:
        from weightsmith.data.images import prepare_images

        self.data = prepare_images(self.data_cfg, log=log)
        if resume:
            self.check_same_data(run_dir)
        self.normalize_stats = {"mean": list(self.data.mean), "std": list(self.data.std)}

    def check_same_data(self, run_dir: Path) -> None:
        """Raise DataError if the prepared images differ from those the run in ``run_dir`` trained on."""
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
        return {"in_channels": d.in_channels, "image_size": d.image_size, "n_classes": d.n_classes}

    def check_model(self, model_cfg: Any) -> None:
        for key, value in self.model_fields().items():
            if getattr(model_cfg, key) != value:
                raise ConfigError(f"model.{key}={getattr(model_cfg, key)} but the data has {key}={value}; "
                                  f"remove model.{key} from the recipe to take it from the data")

    def write_artifacts(self, run_dir: Path) -> None:
        from weightsmith.fsio import atomic_write_text

        d = self.data
        labels = {"class_names": d.class_names, **self.normalize_stats, "in_channels": d.in_channels,
                  "image_size": d.image_size}
        atomic_write_text(run_dir / "labels.json", json.dumps(labels, indent=2))

    def data_manifest(self) -> dict[str, Any]:
        return {"directory": str(self.data.directory), **self.data.manifest}

    def _normalize(self, device: str) -> Normalize:
        return Normalize(self.normalize_stats["mean"], self.normalize_stats["std"], device)

    def batches(self, device: str) -> EpochBatches:
        d, dc, tc = self.data, self.data_cfg, self.train_cfg
        augment = {"padding": dc.crop_padding, "flip": dc.flip} if dc.augment else None
        return EpochBatches(torch.from_numpy(np.ascontiguousarray(d.train_x)), torch.from_numpy(d.train_y).long(),
                            tc.batch_size, tc.seed, device, self._normalize(device), augment)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        return loss, {"train_acc": (logits.argmax(-1) == y).float().mean().item()}

    def count(self, batch) -> int:
        return batch[0].shape[0]

    def _split(self, model, name: str, device: str, autocast_dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, K), labels (N,)) of split ``name`` (val | test)."""
        x = torch.from_numpy(np.ascontiguousarray(getattr(self.data, f"{name}_x")))
        y = torch.from_numpy(getattr(self.data, f"{name}_y")).long()
        return predict_split(model, x, self._normalize(device), self.train_cfg.eval_batch_size, device,
                             autocast_dtype), y

    def evaluate(self, model, *, device, autocast_dtype):
        """Loss and accuracy on the whole validation split."""
        logits, y = self._split(model, "val", device, autocast_dtype)
        acc = float((logits.argmax(-1) == y).float().mean())
        return {"val_loss": F.cross_entropy(logits, y).item(), "val_acc": acc}

    def describe_eval(self, result):
        return f"val_loss {result['val_loss']:.4f}, val_acc {result['val_acc']:.4f}"

    def finish(self, model, run_dir, *, device, autocast_dtype, log=print):
        """Validation and test reports -> eval.json; test confusion matrix -> confusion.json / .png."""
        from weightsmith.fsio import atomic_write_text

        names = self.data.class_names
        result: dict[str, Any] = {}
        for split in ("val", "test"):
            logits, y = self._split(model, split, device, autocast_dtype)
            report, confusion = classification_report(logits, y, names, split)
            result.update(report)
        result["test_most_confused"] = most_confused(confusion, names)
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
        atomic_write_text(run_dir / "confusion.json", json.dumps(
            {"split": "test", "rows": "true class", "columns": "predicted class", "class_names": names,
             "matrix": confusion.tolist()}, indent=2))
        save_confusion_png(confusion, names, run_dir / "confusion.png",
                           f"test accuracy {result['test_acc']:.4f} (n = {result['test_images']:,})")
        log(f"eval: val_acc {result['val_acc']:.4f}, test_acc {result['test_acc']:.4f}, "
            f"test_ece {result['test_ece']:.4f}; most confused: "
            + ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in result["test_most_confused"][:3]))
        return result

    def headline(self, summary):
        return f"test_acc {summary['test_acc']:.4f}, val_acc {summary['val_acc']:.4f}"

    @classmethod
    def example_batch(cls, model_cfg, batch_size, generator):
        c, s = model_cfg.in_channels, model_cfg.image_size
        return (torch.randn(batch_size, c, s, s, generator=generator),
                torch.randint(model_cfg.n_classes, (batch_size,), generator=generator))

    @classmethod
    def for_contract_tests(cls):
        from weightsmith.train.config import TrainConfig

        return cls(cls.config_cls(), None, TrainConfig())
