"""Batched generation (left padding) and speculative decoding against one-at-a-time target generation."""

import math

import pytest
import torch

from weightsmith.models.gpt import GPT, GPTConfig
from weightsmith.ship.batch import generate_batch
from weightsmith.ship.generate import generate
from weightsmith.ship.speculative import speculative_generate, verify


def tiny_gpt(seed, vocab_size=97, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, d_model=24, n_layers=2, n_heads=3, n_kv_heads=1, max_seq_len=64,
               init_std=0.3)  # a large init gives peaked, varied distributions (no near-ties)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


PROMPTS = [[5], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [11] * 12]  # lengths 1, 3, 7, 12


@pytest.mark.parametrize("kw", [{}, {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}])
def test_batched_greedy_equals_one_at_a_time(kw):
    model = tiny_gpt(0, **kw)
    out = generate_batch(model, PROMPTS, 15, temperature=0.0)
    for p, o in zip(PROMPTS, out):
        ref = generate(model, torch.tensor([p]), 15, temperature=0.0)[0].tolist()
        assert o == ref


def test_batched_logits_match_unpadded_logits():
    """The first generated step's logits of a padded row equal the unpadded prompt's last logits."""
    from weightsmith.ship.batch import padded_batch, prefill_mask

    model = tiny_gpt(1)
    ids, pads = padded_batch(PROMPTS)
    pos = (torch.arange(ids.shape[1])[None] - pads[:, None]).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, pos=pos, attn_mask=prefill_mask(pads, ids.shape[1]))[:, -1]
        assert torch.isfinite(logits).all()
        for b, p in enumerate(PROMPTS):
            torch.testing.assert_close(logits[b], model(torch.tensor([p]))[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_target(k):
    target, draft = tiny_gpt(0), tiny_gpt(1, d_model=12, n_heads=2, n_layers=1)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    ref = generate(target, prompt, 30, temperature=0.0)
    out, stats = speculative_generate(target, draft, prompt, 30, num_draft_tokens=k, temperature=0.0)
    assert torch.equal(out, ref)
    assert stats["target_forwards"] == stats["rounds"] <= 30  # an unrelated draft: few acceptances
    # the target as its own draft: every proposal is accepted, k + 1 tokens per target forward
    out, stats = speculative_generate(target, target, prompt, 30, num_draft_tokens=k, temperature=0.0)
    assert torch.equal(out, ref) and stats["acceptance_rate"] == 1.0


def five_sigma(p, n):
    """Per-token bound on |empirical - p| with n samples: 5 binomial standard deviations (plus 1/n)."""
    return 5 * torch.sqrt(p * (1 - p) / n) + 1.0 / n


def test_rejection_rule_reproduces_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.05, 0.1, 0.15, 0.2, 0.5]])  # the draft is badly wrong: many rejections
    n = 20000
    counts = torch.zeros(5)
    for _ in range(n):
        d = torch.multinomial(q[0], 1, generator=g)
        m, nxt = verify(p, q, d, g)
        counts[int(d) if m == 1 else nxt] += 1
    assert ((counts / n - p[0]).abs() <= five_sigma(p[0], n)).all(), counts / n


def test_speculative_sampling_first_token_follows_the_target():
    """End to end on a 5-token vocabulary: the first emitted token ~ softmax(target logits)."""
    target, draft = tiny_gpt(0, vocab_size=5, init_std=0.5), tiny_gpt(3, vocab_size=5, init_std=0.5, n_layers=1)
    prompt = torch.tensor([[1, 2]])
    with torch.no_grad():
        p = target(prompt)[0, -1].softmax(-1)
        q = draft(prompt)[0, -1].softmax(-1)
    assert (p - q).abs().sum() > 0.2  # the draft differs, so rejections happen
    g = torch.Generator().manual_seed(0)
    n = 1500
    counts = torch.zeros(5)
    for _ in range(n):
        out, _ = speculative_generate(target, draft, prompt, 2, num_draft_tokens=3, temperature=1.0, generator=g)
        counts[out[0, 2]] += 1
    assert ((counts / n - p).abs() <= five_sigma(p, n)).all(), (counts / n, p)


def test_cli_prompts_file_and_draft(tmp_path, tiny_corpus, monkeypatch, capsys):
    from weightsmith.cli import main

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "recipes/tiny.toml", "--out", str(run), f"--data.corpus={tiny_corpus}",
                 "--train.max_steps=10", "--sample.max_new_tokens=2"]) == 0
    prompts = ["KING. My", "a", "HAMLET. The queen"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    capsys.readouterr()
    args = ["--max-new-tokens", "8", "--temperature", "0"]
    assert main(["generate", str(run), "--prompts-file", str(tmp_path / "p.txt"), *args]) == 0
    batched = capsys.readouterr().out
    for i, prompt in enumerate(prompts):
        assert main(["generate", str(run), "--prompt", prompt, *args]) == 0
        single = capsys.readouterr().out.rstrip("\n")
        assert f"=== {i} ===\n{single}" in batched
    assert main(["generate", str(run), "--prompt", prompts[0], "--draft", str(run), "--num-draft-tokens", "3",
                 *args]) == 0
    text = capsys.readouterr().out
    assert "acceptance rate 1.00" in text and "speedup" in text
    assert math.isfinite(float(text.split("speedup ")[1].split("x")[0]))
    for bad, msg in ((["--prompts-file", str(tmp_path / "p.txt"), "--draft", str(run)], "one --prompt"),
                     (["--prompt", "a", "--draft", str(run), "--num-draft-tokens", "0"], "--num-draft-tokens"),
                     (["--prompts-file", str(tmp_path / "missing.txt")], "missing.txt")):
        assert main(["generate", str(run), *bad, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err
