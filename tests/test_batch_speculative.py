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


# ------------------------------------------------------------------------------------------------
# past max_seq_len: a sliding window over the last max_seq_len tokens (nanoGPT's crop)


def naive_greedy(model, prompt, n):
    """Reference: n greedy tokens, each from a fresh full forward over the last max_seq_len tokens."""
    ids, L = list(prompt), model.config.max_seq_len
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-L:]]))[0, -1].argmax()))
    return ids


WINDOW_KW = [{}, {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}]


@pytest.mark.parametrize("kw", WINDOW_KW)
def test_generate_past_the_window_equals_the_naive_loop(kw):
    model = tiny_gpt(0, max_seq_len=16, **kw)
    for prompt in ([3, 1, 4, 1, 5], list(range(1, 21))):  # 5 tokens, and a prompt longer than the window
        out = generate(model, torch.tensor([prompt]), 40, temperature=0.0)[0].tolist()
        assert len(out) == len(prompt) + 40
        assert out == naive_greedy(model, prompt, 40)


@pytest.mark.parametrize("kw", WINDOW_KW)
def test_batched_past_the_window_equals_the_naive_loop(kw):
    model = tiny_gpt(0, max_seq_len=16, **kw)
    prompts = PROMPTS + [list(range(30, 50))]  # lengths 1, 3, 7, 12 and 20 (> max_seq_len)
    out = generate_batch(model, prompts, 40, temperature=0.0)
    for p, o in zip(prompts, out):
        assert len(o) == len(p) + 40
        assert o == naive_greedy(model, p, 40)


@pytest.mark.parametrize("d_max,k", [(16, 3), (8, 4), (32, 5)])
def test_speculative_past_the_window_equals_the_naive_loop(d_max, k):
    target = tiny_gpt(0, max_seq_len=16)
    draft = tiny_gpt(1, d_model=12, n_heads=2, n_layers=1, max_seq_len=d_max)
    prompt = [3, 1, 4, 1, 5]
    ref = naive_greedy(target, prompt, 40)
    for d in (draft, target):  # an unrelated draft, and the target as its own draft (all accepted)
        out, stats = speculative_generate(target, d, torch.tensor([prompt]), 40, num_draft_tokens=k,
                                          temperature=0.0)
        assert out[0].tolist() == ref
        assert stats["drafted"] > 0 and stats["target_forwards"] == stats["rounds"]


def test_sampling_past_the_window_follows_the_windowed_model():
    """The first token after a 20-token prompt (window 8) ~ softmax(model(last 8 tokens))."""
    model = tiny_gpt(0, vocab_size=5, init_std=0.5, max_seq_len=8)
    prompt = torch.tensor([[1, 2, 3, 4, 0] * 4])
    with torch.no_grad():
        p = model(prompt[:, -8:])[0, -1].softmax(-1)
        assert (p - model(prompt)[0, -1].softmax(-1)).abs().max() > 0.2  # the whole prompt would differ
    n = 4000
    g = torch.Generator().manual_seed(0)
    firsts = generate(model, prompt.expand(n, -1), 1, temperature=1.0, generator=g)[:, -1]  # n draws at once
    freq = torch.bincount(firsts, minlength=5).float() / n
    assert ((freq - p).abs() <= five_sigma(p, n)).all(), (freq, p)


def test_speculative_sampling_past_both_windows_is_the_target_sampling():
    """Past both windows nothing is drafted: with one seed, the target's own samples, token for token."""
    target, draft = tiny_gpt(0, max_seq_len=16), tiny_gpt(1, d_model=12, n_heads=2, n_layers=1, max_seq_len=8)
    prompt = torch.tensor([list(range(1, 21))])
    for temperature, top_k in ((1.0, None), (0.7, 5)):
        ref = generate(target, prompt, 30, temperature=temperature, top_k=top_k,
                       generator=torch.Generator().manual_seed(5))
        out, stats = speculative_generate(target, draft, prompt, 30, temperature=temperature, top_k=top_k,
                                          generator=torch.Generator().manual_seed(5))
        assert torch.equal(out, ref)
        assert stats["drafted"] == 0 and stats["rounds"] == stats["target_forwards"] == 30


def test_zero_and_negative_max_new_tokens():
    model = tiny_gpt(0)
    prompt = torch.tensor([[3, 1, 4]])
    assert torch.equal(generate(model, prompt, 0), prompt)
    assert generate_batch(model, PROMPTS, 0) == PROMPTS
    assert torch.equal(speculative_generate(model, model, prompt, 0)[0], prompt)
    for fn in (lambda: generate(model, prompt, -5), lambda: generate_batch(model, PROMPTS, -5),
               lambda: speculative_generate(model, model, prompt, -5)):
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
            fn()
