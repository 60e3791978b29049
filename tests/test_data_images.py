"""Image data stage: IDX files, Fashion-MNIST sourcing and pinned hashes, splits, cache, image folders,
augmentation."""

import gzip
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weightsmith.data import images
from weightsmith.data.idx import read_idx, write_idx
from weightsmith.data.images import (
    DEBIAN_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_URL,
    ImageDataConfig,
    channel_stats,
    load_images,
    prepare_images,
    random_crop_flip,
    read_fashion_mnist,
    split_indices,
)
from weightsmith.errors import ConfigError, DataError

PIL = pytest.importorskip("PIL.Image")


def quiet(*_):
    pass


# ------------------------------------------------------------------------------------------------ IDX

@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((2, 3, 5)) * 100).astype(dtype)
    path = write_idx(tmp_path / f"a-idx3{suffix}", arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 5)
    np.testing.assert_array_equal(back, arr)
    labels = np.arange(7, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / f"l{suffix}", labels)), labels)


def test_idx_layout_is_big_endian(tmp_path):
    raw = write_idx(tmp_path / "x", np.array([[1, 2, 3]], dtype=np.int16)).read_bytes()
    assert raw == bytes([0, 0, 0x0B, 2, 0, 0, 0, 1, 0, 0, 0, 3, 0, 1, 0, 2, 0, 3])


def test_idx_corrupt_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((3, 5, 7), dtype=np.uint8)).read_bytes()
    cases = {"badmagic": (b"\x01\x02" + good[2:], "bad magic"),
             "empty": (b"", "bad magic"),
             "badcode": (good[:2] + b"\x07" + good[3:], "dtype code 0x07"),
             "truncated": (good[:-5], "size mismatch"),
             "longer": (good + b"\x00", "size mismatch"),
             "header": (good[:9], "truncated header"),
             "badgzip.gz": (gzip.compress(good)[:-20], "gzip")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=msg) as e:
            read_idx(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="missing"):
        read_idx(tmp_path / "missing")


# -------------------------------------------------------------------------------------- fashion-mnist

def make_fake_fashion(directory, n_train=60, n_test=10, compress=True, size=28):
    """Four IDX files shaped like Fashion-MNIST; image i carries its index in pixels [0, 0] and [0, 1]."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        x[:, 0, 0], x[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = f"{split}-{kind}-ubyte" + (".gz" if compress else "")
            write_idx(directory / name, arr, compress=compress)
        out[split] = (x, y)
    return out


@pytest.fixture()
def fake_fashion(tmp_path):
    return tmp_path / "fm", make_fake_fashion(tmp_path / "fm")


def test_fashion_fake_prepare_splits_and_manifest(tmp_path, fake_fashion):
    src, arrays = fake_fashion
    cfg = ImageDataConfig(val_size=12, split_seed=3, cache_dir=str(tmp_path / "cache"))
    logs = []
    p = prepare_images(cfg, source_dir=src, verify=False, log=logs.append)
    assert p.directory.parent == tmp_path / "cache" / "data" and p.directory.name.startswith("fashion-mnist-")
    assert (p.train_x.shape, p.val_x.shape, p.test_x.shape) == ((48, 1, 28, 28), (12, 1, 28, 28), (10, 1, 28, 28))
    assert p.train_x.dtype == np.uint8 and p.train_y.dtype == np.int64
    assert (p.in_channels, p.image_size, p.n_classes) == (1, 28, 10)
    assert p.class_names == FASHION_MNIST_CLASSES == p.manifest["class_names"]
    # val and train partition the official training set; each image sits at its recorded index
    tr, va = set(p.train_index.tolist()), set(p.val_index.tolist())
    assert not tr & va and tr | va == set(range(60))
    x, y = arrays["train"]
    np.testing.assert_array_equal(p.train_x[:, 0], x[p.train_index])
    np.testing.assert_array_equal(p.val_x[:, 0], x[p.val_index])
    np.testing.assert_array_equal(p.val_y, y[p.val_index])
    np.testing.assert_array_equal(p.test_x[:, 0], arrays["t10k"][0])
    np.testing.assert_array_equal(p.test_y, arrays["t10k"][1])
    m = p.manifest
    assert m["split"]["val_size"] == 12 and m["split"]["split_seed"] == 3
    assert m["split"]["sizes"] == {"train": 48, "val": 12, "test": 10}
    assert set(m["source"]["files"]) == set(FASHION_MNIST_FILES)
    assert all(f["verified"] == "not checked" for f in m["source"]["files"].values())
    for name, info in m["arrays"].items():
        assert hashlib.sha256((p.directory / info["file"]).read_bytes()).hexdigest() == info["sha256"], name
    ref = p.train_x.astype(np.float64) / 255
    np.testing.assert_allclose(p.mean, [ref.mean()], rtol=1e-12)
    np.testing.assert_allclose(p.std, [ref.std()], rtol=1e-12)
    assert any("preparing" in line for line in logs)
    logs.clear()                                   # second call: from the cache, verified, no rebuild
    again = prepare_images(cfg, source_dir=src, verify=False, log=logs.append)
    assert again.directory == p.directory and not logs
    np.testing.assert_array_equal(again.train_x, p.train_x)


def test_fashion_default_val_size_and_too_large(tmp_path, fake_fashion):
    src, _ = fake_fashion
    with pytest.raises(ConfigError, match=r"data\.val_size=5000 leaves no training images"):
        prepare_images(ImageDataConfig(cache_dir=str(tmp_path / "c")), source_dir=src, verify=False, log=quiet)


def test_split_determinism(tmp_path, fake_fashion):
    a, b = split_indices(101, 13, seed=0, n_test=7), split_indices(101, 13, seed=0, n_test=7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert [len(s) for s in a] == [81, 13, 7]
    assert sorted(np.concatenate(a).tolist()) == list(range(101))
    assert not np.array_equal(split_indices(101, 13, seed=1, n_test=7)[1], a[1])
    src, _ = fake_fashion

    def run(seed, cache):
        return prepare_images(ImageDataConfig(val_size=9, split_seed=seed, cache_dir=str(cache)),
                              source_dir=src, verify=False, log=quiet)

    p1, p2, p3 = run(5, tmp_path / "c1"), run(5, tmp_path / "c2"), run(6, tmp_path / "c1")
    np.testing.assert_array_equal(p1.val_index, p2.val_index)
    np.testing.assert_array_equal(p1.train_x, p2.train_x)
    assert p1.manifest["arrays"] == p2.manifest["arrays"]          # byte-identical arrays
    assert p3.directory != p1.directory and not np.array_equal(p3.val_index, p1.val_index)


def test_fashion_pinned_hashes_reject_fake_or_tampered_files(tmp_path, fake_fashion, monkeypatch):
    src, _ = fake_fashion
    cfg = ImageDataConfig(val_size=12, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:                                  # fake files are not Fashion-MNIST
        prepare_images(cfg, source_dir=src, log=quiet)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte.gz" in msg and FASHION_MNIST_FILES["train-labels-idx1-ubyte.gz"] in msg
    assert "expected" in msg and "\n" not in msg
    # pin the fake files' content hashes: they now verify, and a one-byte change is caught
    pins = {n: hashlib.sha256(gzip.decompress((src / n).read_bytes())).hexdigest() for n in FASHION_MNIST_FILES}
    monkeypatch.setattr(images, "FASHION_MNIST_FILES", pins)
    p = prepare_images(cfg, source_dir=src, log=quiet)
    assert all(f["verified"] == "pinned" for f in p.manifest["source"]["files"].values())
    raw = bytearray(gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[-1] ^= 1
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    found = hashlib.sha256(bytes(raw)).hexdigest()
    with pytest.raises(DataError, match=f"t10k-labels-idx1-ubyte.gz: sha256 .* is {found}, "
                                        f"expected {pins['t10k-labels-idx1-ubyte.gz']}"):
        read_fashion_mnist(src)


def test_fashion_source_env_var_and_raw_files(tmp_path, monkeypatch):
    make_fake_fashion(tmp_path / "raw", n_train=30, n_test=5, compress=False, size=7)
    monkeypatch.setenv("WEIGHTSMITH_FASHION_MNIST_DIR", str(tmp_path / "raw"))
    p = prepare_images(ImageDataConfig(val_size=4, cache_dir=str(tmp_path / "c")), verify=False, log=quiet)
    assert p.train_x.shape == (26, 1, 7, 7) and p.manifest["source"]["found_by"] == "$WEIGHTSMITH_FASHION_MNIST_DIR"
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte.gz"):
        prepare_images(ImageDataConfig(val_size=5, cache_dir=str(tmp_path / "c")), verify=False, log=quiet)


def test_fashion_download_fallback(tmp_path, monkeypatch, fake_fashion):
    src, _ = fake_fashion
    monkeypatch.delenv("WEIGHTSMITH_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(images, "DEBIAN_DIR", tmp_path / "no-such-dir")
    monkeypatch.setattr(images, "_fetch_with_apt", lambda dest, log: False)
    urls = []

    def fake_download(url, dest):
        urls.append(url)
        shutil.copy(src / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(images, "_download", fake_download)
    p = prepare_images(ImageDataConfig(val_size=10, cache_dir=str(tmp_path / "c")), verify=False, log=quiet)
    assert urls == [FASHION_MNIST_URL + n for n in FASHION_MNIST_FILES]
    cached = tmp_path / "c" / "downloads" / "fashion-mnist"
    assert p.manifest["source"]["directory"] == str(cached) and sorted(f.name for f in cached.iterdir()) == sorted(
        FASHION_MNIST_FILES)

    def failing(url, dest):
        raise OSError("network unreachable")

    monkeypatch.setattr(images, "_download", failing)
    with pytest.raises(DataError, match=r"could not download http://fashion-mnist\.s3.*train-labels.*unreachable"):
        prepare_images(ImageDataConfig(val_size=10, cache_dir=str(tmp_path / "other")), verify=False, log=quiet)


def test_corrupt_cache_is_detected_and_force_rebuilds(tmp_path, fake_fashion):
    src, _ = fake_fashion
    cfg = ImageDataConfig(val_size=12, cache_dir=str(tmp_path / "cache"))
    p = prepare_images(cfg, source_dir=src, verify=False, log=quiet)
    path = p.directory / "val_x.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val_x\.npy is corrupt.*--force"):
        prepare_images(cfg, source_dir=src, verify=False, log=quiet)
    fresh = prepare_images(cfg, source_dir=src, verify=False, log=quiet, force=True)
    np.testing.assert_array_equal(fresh.val_x, p.val_x)
    (p.directory / "train_y.npy").unlink()
    with pytest.raises(DataError, match=r"array missing: .*train_y\.npy"):
        load_images(p.directory)
    (p.directory / "manifest.json").write_text(json.dumps({"arrays": {}}))
    with pytest.raises(DataError, match="manifest.json is corrupt"):
        load_images(p.directory)


def test_config_validation_names_the_field():
    for kwargs, field in [({"val_size": -1}, "val_size"), ({"channels": 2}, "channels"),
                          ({"image_size": 0, "source": "x"}, "image_size"), ({"crop_padding": -1}, "crop_padding"),
                          ({"image_size": 32}, "image_size"), ({"channels": 3}, "channels"),
                          ({"source": ""}, "source")]:
        with pytest.raises(ConfigError, match=rf"data\.{field}"):
            ImageDataConfig(**kwargs)
    with pytest.raises(TypeError):
        ImageDataConfig("fashion-mnist")                                 # keyword-only


# --------------------------------------------------------------------------------------- image folder

def write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(arr).save(path)


def make_folder(root, classes=("cat", "dog", "eel"), per_class=7, size=(5, 5), mode="RGB"):
    """One subfolder per class of tiny PNGs; pixel [0, 0] encodes (class, i). Returns {(class, i): array}."""
    made = {}
    rng = np.random.default_rng(2)
    for c, name in enumerate(classes):
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            arr[0, 0] = 10 * c + i
            write_png(root / name / f"img{i:02d}.png", arr)
            made[(c, i)] = arr
    return made


def test_image_folder_three_classes(tmp_path):
    made = make_folder(tmp_path / "pets")
    cfg = ImageDataConfig(source=str(tmp_path / "pets"), cache_dir=str(tmp_path / "cache"))
    p = prepare_images(cfg, log=quiet)
    assert p.directory.name.startswith("pets-") and p.class_names == ["cat", "dog", "eel"]
    assert (len(p.train_y), len(p.val_y), len(p.test_y)) == (17, 2, 2)                # 10% test, 10% val
    assert p.train_x.shape[1:] == (3, 5, 5) and (p.in_channels, p.image_size, p.n_classes) == (3, 5, 3)
    idx = [set(getattr(p, f"{s}_index").tolist()) for s in ("train", "val", "test")]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    assert set().union(*idx) == set(range(21))
    for split in ("train", "val", "test"):                    # PNG is lossless: pixels and labels survive
        for x, y, k in zip(getattr(p, f"{split}_x"), getattr(p, f"{split}_y"), getattr(p, f"{split}_index")):
            assert y == k // 7
            np.testing.assert_array_equal(x.transpose(1, 2, 0), made[(k // 7, k % 7)])
    gray = prepare_images(ImageDataConfig(source=str(tmp_path / "pets"), channels=1, val_size=3,
                                          cache_dir=str(tmp_path / "cache")), log=quiet)
    assert gray.train_x.shape[1:] == (1, 5, 5) and len(gray.val_y) == 3


def test_image_folder_grayscale_resize_and_layout(tmp_path):
    make_folder(tmp_path / "g", classes=("a", "b"), per_class=5, size=(6, 6), mode="L")
    p = prepare_images(ImageDataConfig(source=str(tmp_path / "g"), cache_dir=str(tmp_path / "c")), log=quiet)
    assert p.train_x.shape[1:] == (1, 6, 6)                                      # channels from the first image
    make_folder(tmp_path / "s" / "train", classes=("a", "b"), per_class=6, size=(9, 9))
    make_folder(tmp_path / "s" / "test", classes=("a", "b"), per_class=2, size=(9, 9))
    q = prepare_images(ImageDataConfig(source=str(tmp_path / "s"), image_size=4, cache_dir=str(tmp_path / "c")),
                       log=quiet)
    assert q.class_names == ["a", "b"] and q.train_x.shape[1:] == (3, 4, 4)
    assert (len(q.train_y), len(q.val_y), len(q.test_y)) == (11, 1, 4)            # test/ used as given
    np.testing.assert_array_equal(q.test_y, [0, 0, 1, 1])


def test_image_folder_errors(tmp_path):
    def cfg(d, **kw):
        return ImageDataConfig(source=str(d), cache_dir=str(tmp_path / "c"), **kw)

    make_folder(tmp_path / "one", classes=("only",), per_class=3)
    with pytest.raises(DataError, match=r"image folder .*one has 1 class; need at least 2"):
        prepare_images(cfg(tmp_path / "one"), log=quiet)
    with pytest.raises(DataError, match="image folder not found"):
        prepare_images(cfg(tmp_path / "nowhere"), log=quiet)
    made = tmp_path / "mixed"
    make_folder(made, classes=("a", "b"), per_class=4, size=(5, 5))
    write_png(made / "b" / "zz.png", np.zeros((7, 5, 3), dtype=np.uint8))
    with pytest.raises(DataError) as e:
        prepare_images(cfg(made), log=quiet)
    assert "zz.png is 5x7" in str(e.value) and "5x5" in str(e.value) and "data.image_size" in str(e.value)
    p = prepare_images(cfg(made, image_size=5), log=quiet)                        # resizing accepts it
    assert p.train_x.shape[1:] == (3, 5, 5)
    (made / "a" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        prepare_images(cfg(made, image_size=5), log=quiet)
    make_folder(tmp_path / "tiny", classes=("a", "b"), per_class=1)
    with pytest.raises(ConfigError, match="data.val_size"):
        prepare_images(cfg(tmp_path / "tiny"), log=quiet)


# --------------------------------------------------------------------------------------- augmentation

def reference_crop_flip(x, generator, padding, flip):
    """Per-image loop: zero-pad, crop at the drawn offsets, flip; same draw order as random_crop_flip."""
    B, C, H, W = x.shape
    oy = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator)[:, 0]
    ox = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator)[:, 0]
    flips = torch.rand(B, 1, generator=generator)[:, 0] < 0.5 if flip else torch.zeros(B, dtype=torch.bool)
    padded = F.pad(x.float(), (padding,) * 4)
    out = []
    for b in range(B):
        crop = padded[b, :, oy[b]:oy[b] + H, ox[b]:ox[b] + W]
        out.append(crop.flip(-1) if flips[b] else crop)
    return torch.stack(out).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_matches_per_image_reference(dtype):
    x = torch.randint(1, 256, (5, 3, 7, 11), generator=torch.Generator().manual_seed(0)).to(dtype)
    g, ref = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    out = random_crop_flip(x, g, padding=2, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, reference_crop_flip(x, ref, 2, True), rtol=0, atol=0)
    assert torch.equal(g.get_state(), ref.get_state())                  # consumed exactly the reference's draws
    out2 = random_crop_flip(x, g, 2, True)                              # positional padding/flip
    torch.testing.assert_close(out2, reference_crop_flip(x, ref, 2, True), rtol=0, atol=0)


def test_random_crop_flip_determinism_and_effect():
    x = torch.randint(1, 256, (16, 1, 7, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    a = random_crop_flip(x, g)
    g.set_state(state)
    assert torch.equal(random_crop_flip(x, g), a)                      # same state, same output
    assert not torch.equal(random_crop_flip(x, g), a)                  # advanced state, new output
    assert not torch.equal(a, x)
    assert torch.equal(random_crop_flip(x, g, padding=0, flip=False), x)
    flipped = random_crop_flip(x, g, padding=0, flip=True)             # each image is x or its mirror
    is_flip = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, x)]
    assert all(torch.equal(f, i) or m for f, i, m in zip(flipped, x, is_flip)) and 0 < sum(is_flip) < 16
    shifted = random_crop_flip(x, g, padding=3, flip=False)            # translation leaves zero borders
    assert (shifted == 0).any() and not (x == 0).any()
    with pytest.raises(ValueError, match="B, C, H, W"):
        random_crop_flip(x[0], g)


def test_channel_stats_exact():
    x = np.random.default_rng(3).integers(0, 256, (5, 3, 7, 11), dtype=np.uint8)
    mean, std = channel_stats(x)
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-12)


# ------------------------------------------------------------------------------------ real Debian files

@pytest.mark.skipif(not all((DEBIAN_DIR / n).is_file() for n in FASHION_MNIST_FILES),
                    reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_DIR})")
def test_real_fashion_mnist_verifies_and_parses(tmp_path):
    arrays, files = read_fashion_mnist(DEBIAN_DIR, verify=True)
    assert arrays["train_images"].shape == (60000, 28, 28) and arrays["test_images"].shape == (10000, 28, 28)
    assert arrays["train_images"].dtype == np.uint8
    for split, per_class in (("train", 6000), ("test", 1000)):
        y = arrays[f"{split}_labels"]
        assert y.min() == 0 and y.max() == 9
        np.testing.assert_array_equal(np.bincount(y, minlength=10), [per_class] * 10)
    assert all(f["verified"] == "pinned" for f in files.values())
    mean, std = channel_stats(arrays["train_images"][:, None])
    assert abs(mean[0] - 0.2860) < 1e-4 and abs(std[0] - 0.3530) < 1e-4      # the commonly quoted values
    tampered = tmp_path / "fm"                  # a copy with one label changed fails the pinned check
    tampered.mkdir()
    for n in FASHION_MNIST_FILES:
        (tampered / n).symlink_to(DEBIAN_DIR / n)
    labels = bytearray(gzip.decompress((DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10
    (tampered / "t10k-labels-idx1-ubyte.gz").unlink()
    (tampered / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 .*expected 0402a96d"):
        read_fashion_mnist(tampered)
