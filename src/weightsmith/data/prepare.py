"""The data stage: corpus -> tokenizer -> flat token shards + manifest, cached and verified.

Layout of a prepared dataset (``<cache_dir>/data/<key>/``, key = hash of corpus text and tokenizer
settings)::

    manifest.json     source, file list, sha256 of the text and of each shard, tokenizer, counts
    tokenizer.json    see weightsmith.data.tokenizers
    train.bin         token ids of the training split, flat little-endian uint16 (uint32 if V > 65536)
    val.bin           token ids of the validation split

Shards are read with ``numpy.memmap``. Every load checks each shard's sha256 against the manifest, so
a truncated or corrupted shard is an error, never silently wrong data. Preparation writes into a
temporary directory and renames it into place, so a reader never sees half a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from weightsmith.data.corpus import load_corpus, split_text
from weightsmith.data.tokenizers import Tokenizer, load_tokenizer, save_tokenizer, train_tokenizer
from weightsmith.errors import DataError

FORMAT_VERSION = 1


@dataclass(kw_only=True)
class DataConfig:
    """``[data]`` section of a recipe.

    corpus: ``"shakespeare"``, ``"milton"`` or a path to a ``.txt`` file or directory of ``.txt`` files.
    tokenizer: ``byte`` (256 ids), ``char`` or ``bpe`` (trained on the training split).
    vocab_size: BPE vocabulary size (ignored by byte and char).
    cache_dir: where prepared data is cached; default ``$WEIGHTSMITH_CACHE`` or ``~/.cache/weightsmith``.
    """

    corpus: str = "shakespeare"
    tokenizer: Literal["byte", "char", "bpe"] = "bpe"
    vocab_size: int = 1024
    cache_dir: str | None = None
    tokenizer_from: str | None = field(default=None, metadata={"doc": (
        "a run directory (or its `tokenizer.json`) whose tokenizer is reused instead of training one, e.g. "
        "to train from scratch on another corpus with that run's ids; `tokenizer` (and for bpe "
        "`vocab_size`) must describe it. `train.init_from` implies it")})


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("WEIGHTSMITH_CACHE") or "~/.cache/weightsmith"
    return Path(root).expanduser()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class PreparedData:
    """A verified prepared dataset. ``train`` and ``val`` are read-only memmaps of token ids."""

    directory: Path
    manifest: dict
    tokenizer: Tokenizer
    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)

    @property
    def val_bytes(self) -> int:
        return self.manifest["shards"]["val"]["bytes"]


def _dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _write_shard(ids: list[int], dtype: str, path: Path) -> dict:
    arr = np.asarray(ids, dtype=np.dtype(dtype).newbyteorder("<"))
    with open(path, "wb") as f:
        f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "dtype": dtype, "tokens": int(arr.size), "sha256": sha256_file(path)}


def prepare(cfg: DataConfig, *, force: bool = False, log=print, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Prepare (or load from cache) the dataset described by ``cfg``. Idempotent.

    ``tokenizer``, when given, is used as is instead of training one (``train.init_from``: the source
    run's tokenizer); the cache key then holds its sha256 rather than ``cfg.tokenizer``/``vocab_size``.

    Raises:
        DataError: missing corpus, failed download, or a cached shard whose hash does not match its
            manifest (rerun with ``force=True`` / ``weightsmith prepare --force`` to rebuild it).
    """
    root = cache_root(cfg)
    corpus = load_corpus(cfg.corpus, root)
    settings = {"format": FORMAT_VERSION, "text_sha256": corpus.sha256, "tokenizer": cfg.tokenizer,
                "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None}
    if tokenizer is not None:  # a fixed tokenizer: keyed by its content (existing keys stay unchanged)
        canonical = json.dumps(tokenizer.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        settings.update(tokenizer=tokenizer.kind, vocab_size=None,
                        fixed_tokenizer_sha256=hashlib.sha256(canonical.encode("utf-8")).hexdigest())
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    target = root / "data" / f"{corpus.name}-{settings['tokenizer']}-{key}"
    if target.exists() and force:
        shutil.rmtree(target)
    if target.exists():
        return load_prepared(target)

    log(f"preparing {corpus.name}: {len(corpus.text):,} characters from {len(corpus.files)} file(s)")
    train_text, val_text = split_text(corpus.text)
    tok = tokenizer or train_tokenizer(cfg.tokenizer, train_text, corpus.text, cfg.vocab_size)
    dtype = _dtype_for(tok.vocab_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        save_tokenizer(tok, tmp)
        shards = {}
        for name, text in (("train", train_text), ("val", val_text)):
            info = _write_shard(tok.encode(text), dtype, tmp / f"{name}.bin")
            info.update(chars=len(text), bytes=len(text.encode("utf-8")))
            shards[name] = info
        manifest = {
            "format": FORMAT_VERSION, "corpus": corpus.name, "source": corpus.source, "files": corpus.files,
            "text_sha256": corpus.sha256, "chars": len(corpus.text), "bytes": len(corpus.text.encode("utf-8")),
            "split": "validation = characters [floor(0.9 n), n); training = the rest",
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size}, "shards": shards,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t, v = shards["train"], shards["val"]
    log(f"prepared {target}: train {t['tokens']:,} tokens ({t['bytes']:,} bytes), "
        f"val {v['tokens']:,} tokens ({v['bytes']:,} bytes), vocab {tok.vocab_size}")
    return load_prepared(target)


def load_prepared(directory: Path) -> PreparedData:
    """Open a prepared dataset, verifying every shard's sha256 and length against the manifest.

    Raises:
        DataError: naming the missing or corrupt file and how to rebuild it.
    """
    directory = Path(directory)
    mpath = directory / "manifest.json"
    if not mpath.is_file():
        raise DataError(f"prepared data not found: {mpath} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath} is corrupt ({e}); rebuild with `weightsmith prepare RECIPE --force`") from None
    arrays = {}
    for name in ("train", "val"):
        info = manifest["shards"][name]
        path = directory / info["file"]
        if not path.is_file():
            raise DataError(f"shard missing: {path}; rebuild with `weightsmith prepare RECIPE --force`")
        if sha256_file(path) != info["sha256"]:
            raise DataError(f"shard {path} is corrupt or truncated (sha256 does not match manifest.json); "
                            "rebuild with `weightsmith prepare RECIPE --force`")
        arrays[name] = np.memmap(path, dtype=np.dtype(info["dtype"]).newbyteorder("<"), mode="r")
    return PreparedData(directory, manifest, load_tokenizer(directory), arrays["train"], arrays["val"])
