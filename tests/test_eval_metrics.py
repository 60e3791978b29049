"""Bits per byte and the evaluation windows, on cases with known answers."""

import math

import numpy as np
import pytest
import torch

from weightsmith.eval.metrics import bits_per_byte, evaluate_lm, stream_loss


class Uniform(torch.nn.Module):
    """Predicts the uniform distribution: loss is exactly ln V per token."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size) + self.dummy


class Oracle(torch.nn.Module):
    """Knows the stream: puts probability p on the true next token, the rest spread evenly."""

    def __init__(self, stream, vocab_size, p):
        super().__init__()
        self.stream, self.V, self.p = stream, vocab_size, p

    def forward(self, idx):
        # positions are recovered by matching windows; the test stream is i % V, so next = (x + 1) % V
        nxt = (idx + 1) % self.V
        probs = torch.full((*idx.shape, self.V), (1 - self.p) / (self.V - 1))
        probs.scatter_(-1, nxt[..., None], self.p)
        return probs.log()


def test_uniform_byte_model_is_eight_bits_per_byte():
    tokens = np.random.default_rng(0).integers(0, 256, 1001).astype(np.uint16)
    r = evaluate_lm(Uniform(256), tokens, [bytes([i]) for i in range(256)], seq_len=64)
    assert r["val_tokens"] == 1000 and r["val_bytes"] == 1000
    assert r["val_loss"] == pytest.approx(math.log(256))
    assert r["val_bpb"] == pytest.approx(8.0)
    assert r["val_ppl"] == pytest.approx(256.0, rel=1e-5)


def test_bpb_counts_bytes_of_multi_byte_tokens():
    # 4 tokens, each standing for 3 bytes: a uniform model over V=8 costs 3 bits per token = 1 bit per byte
    token_bytes = [b"abc"] * 8
    tokens = np.arange(101) % 8
    r = evaluate_lm(Uniform(8), tokens, token_bytes, seq_len=16)
    assert r["val_bytes"] == 300
    assert r["val_bpb"] == pytest.approx(1.0)


def test_known_probability_gives_known_loss():
    V, p = 10, 0.5
    tokens = np.arange(257) % V
    r = evaluate_lm(Oracle(tokens, V, p), tokens, [b"x"] * V, seq_len=32, batch_size=3)
    assert r["val_loss"] == pytest.approx(-math.log(p), rel=1e-6)
    assert r["val_bpb"] == pytest.approx(1.0, rel=1e-6)  # -log2(0.5) bits per 1-byte token


@pytest.mark.parametrize("n,seq_len", [(2, 4), (10, 3), (100, 7), (64, 63), (65, 64)])
def test_every_token_but_the_first_is_predicted_once(n, seq_len):
    tokens = np.arange(n) % 5
    total, count, predicted = stream_loss(Uniform(5), tokens, seq_len)
    assert count == n - 1
    assert predicted.tolist() == list(tokens[1:])
    assert total == pytest.approx((n - 1) * math.log(5))


def test_bits_per_byte_formula():
    assert bits_per_byte(math.log(2) * 100, 100) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2) * 300, 100) == pytest.approx(3.0)


# ---------------------------------------------------------------------------------- evaluating a run


def test_eval_refuses_a_run_whose_corpus_changed(tiny_corpus, tmp_path, cache_dir, capsys):
    """`weightsmith eval RUN` rebuilds the data from config.toml; if the corpus file changed since
    training it must not score the model on other text: one error line, exit 2, eval.json untouched."""
    import json
    import shutil

    from weightsmith.cli import main
    from weightsmith.train.loop import train

    corpus = tmp_path / "corpus.txt"
    shutil.copyfile(tiny_corpus, corpus)
    run = train("recipes/tiny.toml", [f"--data.corpus={corpus}", "--train.max_steps=3", "--sample.max_new_tokens=1"],
                out=tmp_path / "run", log=lambda *a: None)
    assert main(["eval", str(run)]) == 0  # the unchanged corpus evaluates
    before = (run / "eval.json").read_bytes()
    expected = json.loads((run / "manifest.json").read_text())["data"]["text_sha256"]
    capsys.readouterr()

    corpus.write_text(corpus.read_text().replace("KING", "DUKE"))  # same byte tokenizer, other text
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert str(run / "manifest.json") in err[0] and f"expected {expected}" in err[0] and "found " in err[0]
    assert (run / "eval.json").read_bytes() == before
