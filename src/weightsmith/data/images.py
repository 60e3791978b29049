"""The image data stage: Fashion-MNIST or a folder of images -> uint8 arrays + manifest, cached and verified.

Sources (``data.source``):

- ``fashion-mnist`` (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747): 28x28 grayscale, 60,000 training
  and 10,000 test images, 10 classes. The four IDX files are looked for, in order, in ``source_dir`` /
  ``$WEIGHTSMITH_FASHION_MNIST_DIR`` (if given, nowhere else), in ``/usr/share/datasets/fashion-mnist/``
  (Debian package ``dataset-fashion-mnist``), in ``<cache_root>/downloads/fashion-mnist/``; else they are
  fetched there with ``apt-get download dataset-fashion-mnist`` + ``dpkg-deb -x`` (when both tools exist),
  else from the dataset's release URLs. Each file is checked against :data:`FASHION_MNIST_FILES`.
- any other value: a directory of images, see :func:`read_image_folder`.

Splits. Fashion-MNIST: test is the official t10k set; validation is ``val_size`` (default 5,000) training
images chosen by :func:`split_indices` with ``split_seed``; training is the rest. Image folder: test and
validation are each 10% of the images (``val_size`` overrides the validation count) chosen the same way,
unless the folder has ``train/`` and ``test/`` subfolders, which are used as given.

Layout of a prepared dataset (``<cache_root>/data/<source>-<key>/``, key = hash of the source files'
contents and of the settings)::

    manifest.json     source, source files and their hashes, split, class names, mean/std, array list
    {train,val,test}_x.npy       images, uint8 (N, C, H, W), H = W
    {train,val,test}_y.npy       labels, int64 (N,), 0 <= y < n_classes
    {train,val,test}_index.npy   int64 (N,): position of each image in its source pool (see split_indices)

Every load checks each array's sha256 against the manifest. Preparation writes into a temporary
directory and renames it into place, so a reader never sees half a dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weightsmith.data.idx import parse_idx, read_idx_bytes
from weightsmith.data.prepare import cache_root, sha256_file
from weightsmith.errors import ConfigError, DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
REBUILD = "rebuild with `weightsmith prepare RECIPE --force`"

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
FASHION_MNIST_ENV = "WEIGHTSMITH_FASHION_MNIST_DIR"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# sha256 of each file's IDX content (after gunzip). Checked by hand, Dec 2025: the Debian package's .gz files
# (0.0~git20200523.55506a9-1) differ from the release files only in the gzip header (file name dropped,
# mtime set to the build date); restoring the header (FNAME + mtimes 1504176606 / 1504176627) gives files
# whose MD5s equal those published in the zalandoresearch/fashion-mnist README and in the upstream repository's
# data/fashion/ (train-images 8d4fb7e6..., train-labels 25c81989..., t10k-images bef4ecab...,
# t10k-labels bb300cfd...), and whose sha256s are the release files' (3aede38d..., a04f1713..., 346e55b9...,
# 67da17c7...). Hashing the content, not the .gz, accepts both and uncompressed copies.
FASHION_MNIST_FILES = {                 # labels first: a bad label file fails before 47 MB of images are read
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(kw_only=True)
class ImageDataConfig:
    """``[data]`` section of an image task.

    source: ``"fashion-mnist"`` or a path to an image folder (:func:`read_image_folder`).
    val_size: validation images held out of the training pool; default 5,000 for Fashion-MNIST and 10% of
        the (training) images for a folder.
    split_seed: seed of the train/val(/test) permutation (:func:`split_indices`).
    image_size: resize every image of a folder to image_size x image_size (bilinear); unset: all images
        must share the first image's size, which must be square. Fashion-MNIST is 28 (unset or 28).
    channels: 1 (grayscale) or 3 (RGB); unset: taken from the first image. Fashion-MNIST is 1.
    augment, crop_padding, flip: training-time :func:`random_crop_flip`; read by the task, not stored.
    cache_dir: as ``DataConfig.cache_dir``: default ``$WEIGHTSMITH_CACHE`` or ``~/.cache/weightsmith``.
    """

    source: str = "fashion-mnist"
    val_size: int | None = None
    split_seed: int = 0
    image_size: int | None = None
    channels: int | None = None
    augment: bool = True
    crop_padding: int = 4
    flip: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"data.source must be 'fashion-mnist' or a path to an image folder, got {self.source!r}")
        if self.val_size is not None and self.val_size < 0:
            raise ConfigError(f"data.val_size must be >= 0, got {self.val_size}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"data.image_size must be positive, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.crop_padding < 0:
            raise ConfigError(f"data.crop_padding must be >= 0, got {self.crop_padding}")
        if self.source == "fashion-mnist":
            if self.image_size not in (None, 28):
                raise ConfigError(f"data.image_size={self.image_size}: fashion-mnist images are 28x28; "
                                  "leave image_size unset (resizing applies to image folders)")
            if self.channels not in (None, 1):
                raise ConfigError(f"data.channels={self.channels}: fashion-mnist is grayscale; use 1 or leave unset")


@dataclass
class PreparedImages:
    """A verified prepared image dataset: uint8 images (N, C, H, W) with H = W, int64 labels (N,)."""

    directory: Path
    manifest: dict = field(repr=False)
    class_names: list[str]
    train_x: np.ndarray = field(repr=False)
    train_y: np.ndarray = field(repr=False)
    val_x: np.ndarray = field(repr=False)
    val_y: np.ndarray = field(repr=False)
    test_x: np.ndarray = field(repr=False)
    test_y: np.ndarray = field(repr=False)
    train_index: np.ndarray = field(repr=False)
    val_index: np.ndarray = field(repr=False)
    test_index: np.ndarray = field(repr=False)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[2])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of ``train_x / 255`` (pixels scaled to [0, 1])."""
        return tuple(self.manifest["normalize"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel (population) standard deviation of ``train_x / 255``."""
        return tuple(self.manifest["normalize"]["std"])


# ----------------------------------------------------------------------------------------------- splits

def split_indices(n: int, n_val: int, seed: int, n_test: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) int64 index arrays partitioning ``range(n)``, each sorted ascending.

    ``p = numpy.random.default_rng(seed).permutation(n)``; test is ``p[:n_test]``, validation
    ``p[n_test:n_test + n_val]``, training the rest.
    """
    perm = np.random.default_rng(seed).permutation(n)
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return tuple(np.sort(a).astype(np.int64) for a in (train, val, test))


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and population std of ``x / 255`` for uint8 ``x`` (N, C, H, W), from histograms."""
    means, stds = [], []
    levels = np.arange(256, dtype=np.float64) / 255.0
    for c in range(x.shape[1]):
        counts = np.bincount(np.ascontiguousarray(x[:, c]).ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * levels).sum() / total) if total else 0.0
        var = float((counts * (levels - mean) ** 2).sum() / total) if total else 0.0
        means.append(mean)
        stds.append(var ** 0.5)
    return means, stds


# ------------------------------------------------------------------------------------------ fashion-mnist

def _find_file(directory: Path, name: str) -> Path | None:
    """``name`` (``*.gz``) in ``directory``, or its uncompressed twin."""
    for p in (directory / name, directory / name.removesuffix(".gz")):
        if p.is_file():
            return p
    return None


def _has_all(directory: Path) -> bool:
    return all(_find_file(directory, f) for f in FASHION_MNIST_FILES)


def _fetch_with_apt(dest: Path, log) -> bool:
    """Download the Debian package with ``apt-get download`` (no root needed) and unpack its four files."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return False
    with tempfile.TemporaryDirectory(prefix=".apt-", dir=dest) as tmp:
        try:
            proc = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, capture_output=True,
                                  text=True, timeout=900)
            debs = sorted(Path(tmp).glob("*.deb"))
            if proc.returncode != 0 or not debs:
                log(f"apt-get download {DEBIAN_PACKAGE} failed: "
                    f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
                return False
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True,
                           capture_output=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as e:
            log(f"apt-get download {DEBIAN_PACKAGE} failed: {e}")
            return False
        unpacked = Path(tmp) / "x" / DEBIAN_DIR.relative_to("/")
        if not _has_all(unpacked):
            log(f"{debs[0].name} does not contain the four Fashion-MNIST files under {DEBIAN_DIR}")
            return False
        for name in FASHION_MNIST_FILES:
            os.replace(_find_file(unpacked, name), dest / name)
    return True


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` atomically (tests replace this function)."""
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    os.replace(tmp, dest)


def locate_fashion_mnist(root: Path, source_dir: str | Path | None = None, *, log=print) -> tuple[Path, str]:
    """(directory holding the four files, how it was found), fetching them into the cache if needed.

    Raises:
        DataError: an explicit directory lacks a file, or every way of obtaining the files failed.
    """
    explicit = source_dir or os.environ.get(FASHION_MNIST_ENV)
    if explicit:
        d = Path(explicit).expanduser()
        missing = [f for f in FASHION_MNIST_FILES if not _find_file(d, f)]
        if missing:
            raise DataError(f"fashion-mnist directory {d} lacks {', '.join(missing)}")
        return d, "given directory" if source_dir else f"${FASHION_MNIST_ENV}"
    if _has_all(DEBIAN_DIR):
        return DEBIAN_DIR, f"Debian package {DEBIAN_PACKAGE}"
    cache = root / "downloads" / "fashion-mnist"
    if _has_all(cache):
        return cache, "download cache"
    cache.mkdir(parents=True, exist_ok=True)
    log(f"fashion-mnist: {DEBIAN_DIR} not found; fetching into {cache}")
    if _fetch_with_apt(cache, log):
        return cache, f"apt-get download {DEBIAN_PACKAGE}"
    for name in FASHION_MNIST_FILES:
        if (cache / name).is_file():
            continue
        try:
            _download(FASHION_MNIST_URL + name, cache / name)
        except OSError as e:
            raise DataError(f"could not download {FASHION_MNIST_URL + name} ({e}); install the Debian package "
                            f"{DEBIAN_PACKAGE} or put the four files in a directory named by ${FASHION_MNIST_ENV}"
                            ) from None
    return cache, FASHION_MNIST_URL


def read_fashion_mnist(directory: Path, *, verify: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays ``{"train_images": (N, H, W) uint8, "train_labels": (N,) uint8, "test_images", "test_labels"}``
    and per-file provenance (path, sha256 of the file and of its IDX content).

    Raises:
        DataError: a file is corrupt, has the wrong shape, or (``verify``) its content hash differs from
            :data:`FASHION_MNIST_FILES`.
    """
    arrays, files = {}, {}
    for name, pinned in FASHION_MNIST_FILES.items():
        path = _find_file(directory, name)
        data = read_idx_bytes(path)
        found = hashlib.sha256(data).hexdigest()
        if verify and found != pinned:
            raise DataError(f"{path}: sha256 of its IDX content is {found}, expected {pinned} (the published "
                            "Fashion-MNIST file); it is corrupt or altered: delete or replace it")
        key = name.split("-idx")[0].replace("t10k", "test").replace("-", "_")     # train_images ... test_labels
        arrays[key] = parse_idx(data, str(path))
        files[name] = {"path": str(path), "sha256": sha256_file(path), "idx_sha256": found,
                       "verified": "pinned" if verify else "not checked"}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or y.dtype != np.uint8 or len(x) != len(y):
            raise DataError(f"fashion-mnist in {directory}: {split} images {x.dtype}{list(x.shape)} and labels "
                            f"{y.dtype}{list(y.shape)}; expected uint8 (N, H, W) and (N,)")
        if y.size and int(y.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"fashion-mnist in {directory}: {split} label {int(y.max())} is out of range 0..9")
    return arrays, files


# ------------------------------------------------------------------------------------------- image folder

def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def list_image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label)]) of a folder with one subfolder per class, sorted by class then file name.

    Raises:
        DataError: fewer than 2 classes, or a class folder with no PNG/JPEG file.
    """
    classes = _class_dirs(folder)
    if len(classes) < 2:
        raise DataError(f"image folder {folder} has {len(classes)} class{'es' * (len(classes) != 1)}; "
                        "need at least 2 (one subfolder per class)")
    items = []
    for label, d in enumerate(classes):
        files = sorted((p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                        and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
        if not files:
            raise DataError(f"class folder {d} has no .png/.jpg/.jpeg files")
        items += [(p, label) for p in files]
    return [d.name for d in classes], items


def fingerprint(items: list[tuple[Path, int]], base: Path) -> str:
    """sha256 over every file's relative path and content hash, in order."""
    h = hashlib.sha256()
    for p, _ in items:
        h.update(f"{p.relative_to(base).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def read_images(items: list[tuple[Path, int]], image_size: int | None, channels: int | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``items`` with Pillow -> (uint8 (N, C, S, S), int64 (N,)).

    Each image is converted to ``L`` (C = 1) or ``RGB`` (C = 3; alpha is dropped, palettes expanded); with
    ``channels`` unset, C is 1 if the first image is grayscale (modes 1, L, LA, I, I;16, F) and 3 otherwise.
    With ``image_size`` set every image is resized to S x S (bilinear, antialiased; aspect ratio not kept);
    unset, S is the first image's size and every image must be S x S.

    Raises:
        DataError: an unreadable image, or a size mismatch without ``image_size`` (naming file and sizes).
    """
    from PIL import Image

    x = y = None
    for i, (path, label) in enumerate(items):
        try:
            with Image.open(path) as img:
                img.load()
                if x is None:
                    channels = channels or (1 if img.mode in GRAY_MODES else 3)
                    size = image_size or img.width
                    if image_size is None and img.width != img.height:
                        raise DataError(f"image {path} is {img.width}x{img.height}; images must be square "
                                        "unless data.image_size is set to resize them")
                    x = np.empty((len(items), channels, size, size), dtype=np.uint8)
                    y = np.empty(len(items), dtype=np.int64)
                img = img.convert("L" if channels == 1 else "RGB")
                if image_size is not None and img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
                elif img.size != (size, size):
                    raise DataError(f"image {path} is {img.width}x{img.height}, but {items[0][0]} is "
                                    f"{size}x{size}; set data.image_size to resize all images")
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        x[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        y[i] = label
    return x, y


def _folder_pools(folder: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and the file pools: ``{"train": ...}`` or, with train/ and test/ subfolders, both."""
    names = {p.name for p in _class_dirs(folder)}
    if not {"train", "test"} <= names:
        classes, items = list_image_folder(folder)
        return classes, {"all": items}
    classes, train = list_image_folder(folder / "train")
    test_classes, test = list_image_folder(folder / "test")
    if test_classes != classes:
        raise DataError(f"image folder {folder}: test/ classes {test_classes} differ from train/ classes {classes}")
    return classes, {"train": train, "test": test}


# ------------------------------------------------------------------------------------------ prepare, load

def _save(directory: Path, name: str, arr: np.ndarray) -> dict:
    path = directory / f"{name}.npy"
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "dtype": str(arr.dtype), "shape": list(arr.shape), "sha256": sha256_file(path)}


def _check_val(val_size: int, held_out: int, pool: int, what: str) -> None:
    if held_out >= pool:
        raise ConfigError(f"data.val_size={val_size} leaves no training images: {what} has {pool} images "
                          f"and {held_out} would be held out")


def prepare_images(cfg: ImageDataConfig, *, force: bool = False, log=print, source_dir: str | Path | None = None,
                   verify: bool = True) -> PreparedImages:
    """Prepare (or load from cache) the image dataset described by ``cfg``. Idempotent.

    ``source_dir`` (or ``$WEIGHTSMITH_FASHION_MNIST_DIR``) points Fashion-MNIST at a directory of the four
    IDX files; ``verify=False`` skips their pinned hashes (tests with fake files). Both are ignored for an
    image folder.

    Raises:
        DataError: missing or corrupt source, failed download, unreadable image, or a cached array whose
            hash does not match its manifest (rerun with ``force=True`` / ``weightsmith prepare --force``).
        ConfigError: ``data.val_size`` too large for the source.
    """
    root = cache_root(cfg)
    if cfg.source == "fashion-mnist":
        name, located = "fashion-mnist", None
        hashes = dict(FASHION_MNIST_FILES)
        if not verify:
            located = locate_fashion_mnist(root, source_dir, log=log)
            hashes = {f: hashlib.sha256(read_idx_bytes(_find_file(located[0], f))).hexdigest()
                      for f in FASHION_MNIST_FILES}
        settings = {"files": hashes}
        n_val = 5000 if cfg.val_size is None else cfg.val_size
    else:
        folder = Path(cfg.source).expanduser()
        if not folder.is_dir():
            raise DataError(f"image folder not found: {folder} (data.source must be 'fashion-mnist' or a "
                            "directory with one subfolder per class)")
        name = folder.resolve().name
        class_names, pools = _folder_pools(folder)
        settings = {"files": {k: fingerprint(v, folder) for k, v in pools.items()},
                    "image_size": cfg.image_size, "channels": cfg.channels}
        n = len(pools.get("train", pools.get("all")))
        n_test = 0 if "test" in pools else max(1, n // 10)
        n_val = max(1, n // 10) if cfg.val_size is None else cfg.val_size
        _check_val(n_val, n_val + n_test, n, f"image folder {folder}")
    settings.update(format=FORMAT_VERSION, source=name, val_size=n_val, split_seed=cfg.split_seed)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    target = root / "data" / f"{name}-{key}"
    if target.exists() and force:
        shutil.rmtree(target)
    if target.exists():
        return load_images(target)

    if cfg.source == "fashion-mnist":
        located = located or locate_fashion_mnist(root, source_dir, log=log)
        data, class_names, source, split = _build_fashion(cfg, located, n_val, verify, log)
    else:
        data, class_names, source, split = _build_folder(cfg, folder, class_names, pools, settings["files"],
                                                          n_val, n_test, log)
    _write_prepared(target, data, class_names, source, split, n_val, cfg.split_seed, log)
    return load_images(target)


def _pack(pool_x, pool_y, tr, va, test_x, test_y, te) -> dict[str, np.ndarray]:
    return {"train_x": pool_x[tr], "train_y": pool_y[tr], "val_x": pool_x[va], "val_y": pool_y[va],
            "test_x": test_x, "test_y": test_y, "train_index": tr, "val_index": va, "test_index": te}


def _build_fashion(cfg: ImageDataConfig, located: tuple[Path, str], n_val: int, verify: bool, log):
    """(arrays, class names, source record, split description) of Fashion-MNIST."""
    directory, how = located
    log(f"preparing fashion-mnist from {directory} ({how})")
    arrays, source_files = read_fashion_mnist(directory, verify=verify)
    n = len(arrays["train_images"])
    _check_val(n_val, n_val, n, "fashion-mnist train")
    tr, va, _ = split_indices(n, n_val, cfg.split_seed)
    test_x = arrays["test_images"][:, None]                                    # (N, 1, 28, 28)
    te = np.arange(len(test_x), dtype=np.int64)
    data = _pack(arrays["train_images"][:, None], arrays["train_labels"].astype(np.int64), tr, va,
                 test_x, arrays["test_labels"].astype(np.int64), te)
    source = {"name": "fashion-mnist", "directory": str(directory), "found_by": how, "files": source_files}
    split = (f"test = the official t10k set ({len(te)} images); validation = {n_val} training images, "
             f"training = the rest; chosen by split_indices(n={n}, n_val={n_val}, seed={cfg.split_seed})")
    return data, list(FASHION_MNIST_CLASSES), source, split


def _build_folder(cfg: ImageDataConfig, folder: Path, class_names: list[str], pools: dict, fingerprints: dict,
                  n_val: int, n_test: int, log):
    """(arrays, class names, source record, split description) of an image folder."""
    log(f"preparing image folder {folder}: {sum(len(v) for v in pools.values())} images, "
        f"{len(class_names)} classes")
    pool_x, pool_y = read_images(pools.get("train", pools.get("all")), cfg.image_size, cfg.channels)
    n = len(pool_x)
    tr, va, te = split_indices(n, n_val, cfg.split_seed, n_test)
    if "test" in pools:
        s, c = pool_x.shape[2], pool_x.shape[1]
        test_x, test_y = read_images(pools["test"], cfg.image_size, c)
        if test_x.shape[2] != s:
            raise DataError(f"image folder {folder}: test/ images are {test_x.shape[2]}px, train/ are {s}px; "
                            "set data.image_size to resize all images")
        te = np.arange(len(test_x), dtype=np.int64)
    else:
        test_x, test_y = pool_x[te], pool_y[te]
    source = {"name": "image-folder", "directory": str(folder.resolve()),
              "files": fingerprints, "n_images": {k: len(v) for k, v in pools.items()}}
    layout = "train/ and test/ subfolders" if "test" in pools else "one subfolder per class"
    split = (f"{layout}; files sorted by (class, name); "
             + ("test = test/; " if "test" in pools else f"test = {n_test} images, ")
             + f"validation = {n_val} images, training = the rest; chosen by split_indices(n={n}, "
             f"n_val={n_val}, seed={cfg.split_seed}, n_test={n_test})")
    return _pack(pool_x, pool_y, tr, va, test_x, test_y, te), class_names, source, split


def _write_prepared(target: Path, data: dict[str, np.ndarray], class_names: list[str], source: dict, split: str,
                    n_val: int, split_seed: int, log) -> None:
    """Write arrays + manifest.json into a temporary directory, then rename it to ``target``."""
    mean, std = channel_stats(data["train_x"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        files = {k: _save(tmp, k, np.ascontiguousarray(v)) for k, v in data.items()}
        manifest = {
            "format": FORMAT_VERSION, "kind": "images", "source": source, "class_names": class_names,
            "split": {"description": split, "val_size": n_val, "split_seed": split_seed,
                      "sizes": {s: len(data[f"{s}_y"]) for s in SPLITS}},
            "in_channels": int(data["train_x"].shape[1]), "image_size": int(data["train_x"].shape[2]),
            "normalize": {"mean": mean, "std": std, "of": "train_x / 255, per channel (population std)"},
            "arrays": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():     # not a concurrent preparer that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = manifest["split"]["sizes"]
    log(f"prepared {target}: train {sizes['train']:,}, val {sizes['val']:,}, test {sizes['test']:,} images of "
        f"{manifest['in_channels']}x{manifest['image_size']}x{manifest['image_size']}, {len(class_names)} classes")


def load_images(directory: Path) -> PreparedImages:
    """Open a prepared image dataset, verifying every array's sha256, dtype and shape against the manifest.

    Raises:
        DataError: naming the missing or corrupt file and how to rebuild it.
    """
    directory = Path(directory)
    mpath = directory / "manifest.json"
    if not mpath.is_file():
        raise DataError(f"prepared images not found: {mpath} is missing")
    try:
        manifest = json.loads(mpath.read_text())
        entries = {name: manifest["arrays"][name] for name in
                   [f"{s}_{k}" for s in SPLITS for k in ("x", "y", "index")]}
        class_names = list(manifest["class_names"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{mpath} is corrupt ({type(e).__name__}: {e}); {REBUILD}") from None
    arrays = {}
    for name, info in entries.items():
        path = directory / info["file"]
        if not path.is_file():
            raise DataError(f"array missing: {path}; {REBUILD}")
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != info["sha256"]:
            raise DataError(f"array {path} is corrupt or truncated (sha256 does not match manifest.json); {REBUILD}")
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        if str(arr.dtype) != info["dtype"] or list(arr.shape) != info["shape"]:
            raise DataError(f"array {path} is {arr.dtype}{list(arr.shape)}, manifest says "
                            f"{info['dtype']}{info['shape']}; {REBUILD}")
        arrays[name] = arr
    return PreparedImages(directory, manifest, class_names, **arrays)


# ------------------------------------------------------------------------------------------- augmentation

def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True
                     ) -> torch.Tensor:
    """Random translation by up to ``padding`` pixels and random horizontal flip, per image, in one gather.

    Equivalent to zero-padding each image by ``padding`` on all sides, cropping a random H x W window
    (offsets uniform in [0, 2 * padding] per axis), then mirroring it left-right with probability 1/2.
    Zero padding, not reflection: after normalization the border is the dark background of Fashion-MNIST.

    x: (B, C, H, W), any dtype and device. Random numbers come from ``generator`` (on its own device) in a
    fixed order (row offsets, column offsets, flips), so the output is a function of x and the generator's
    state, which the caller checkpoints. Returns a new tensor of x's shape, dtype and device.
    """
    if x.ndim != 4:
        raise ValueError(f"random_crop_flip expects (B, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    B, C, H, W = x.shape
    gdev, dev = generator.device, x.device
    rows = torch.arange(H, device=dev).expand(B, H)                            # (B, H) source row of each output row
    cols = torch.arange(W, device=dev).expand(B, W)                            # (B, W)
    if padding:
        oy = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator, device=gdev).to(dev)
        ox = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator, device=gdev).to(dev)
        rows, cols = rows + oy - padding, cols + ox - padding
    if flip:
        flips = torch.rand(B, 1, generator=generator, device=gdev).to(dev) < 0.5
        cols = torch.where(flips, cols.flip(1), cols)
    inside = (((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :])  # (B, H, W)
    r, c = rows.clamp(0, H - 1), cols.clamp(0, W - 1)
    b = torch.arange(B, device=dev)[:, None, None]
    out = x[b, :, r[:, :, None], c[:, None, :]]                                # (B, H, W, C): advanced dims first
    out = out.masked_fill(~inside[..., None], 0)
    return out.permute(0, 3, 1, 2).contiguous()                               # (B, C, H, W)
