"""The E2 / E5 variants of the gpt family: positions (RoPE scaling, sinusoidal, ALiBi, none) and norms
(DyT, none), against their formulas, a naive attention loop, the KV cache, and the exporters."""

import math

import pytest
import torch
import torch.nn.functional as F

from weightsmith.analysis import count_params
from weightsmith.errors import ConfigError
from weightsmith.models.gpt import GPT, GPTConfig
from weightsmith.models.layers.attention import Attention
from weightsmith.models.layers.norms import DyT, make_norm
from weightsmith.models.layers.positions import alibi_bias, alibi_slopes, sinusoidal_embedding
from weightsmith.models.layers.rope import (
    apply_rope,
    ntk_rope_theta,
    rope_cos_sin,
    rope_frequencies,
    scaled_rope_frequencies,
    yarn_mscale,
)
from weightsmith.ship.batch import generate_batch
from weightsmith.ship.generate import generate

POS = ["learned", "rope", "sinusoidal", "alibi", "none"]
VARIANTS = [dict(pos=p) for p in POS] + [
    dict(rope_scaling="linear", rope_scale=2.0), dict(rope_scaling="ntk", rope_scale=3.0),
    dict(rope_scaling="yarn", rope_scale=4.0, rope_original_max_seq_len=8),
    dict(norm="dyt", bias=True), dict(norm="dyt"), dict(norm="none"),
]


def _tiny(**kw):
    base = dict(vocab_size=53, d_model=30, n_layers=2, n_heads=3, n_kv_heads=1, max_seq_len=16)
    base.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**base))


def _ids(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items())


# ---------------------------------------------------------------------------------------------------
# RoPE and its scalings

SCALINGS = [("none", 1.0), ("linear", 4.0), ("ntk", 4.0), ("yarn", 4.0)]


def _freqs(scaling, scale, d_head=14, theta=10000.0, L=64):
    return scaled_rope_frequencies(d_head, theta, scaling=scaling, scale=scale, original_max_seq_len=L)


@pytest.mark.parametrize("scaling, scale", SCALINGS)
def test_rope_scores_depend_only_on_relative_position(scaling, scale):
    torch.manual_seed(0)
    inv, mscale = _freqs(scaling, scale)
    q, k = torch.randn(1, 1, 1, 14), torch.randn(1, 1, 1, 14)

    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([m]), inv)
        cn, sn = rope_cos_sin(torch.tensor([n]), inv)
        return (apply_rope(q, cm * mscale, sm * mscale) * apply_rope(k, cn * mscale, sn * mscale)).sum()

    for m, n in [(3, 1), (10, 5), (7, 7), (40, 2)]:
        for shift in (1, 17, 250, 1000):
            torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=2e-4, rtol=1e-4)
    assert not torch.allclose(score(3, 1), score(4, 1))


def test_yarn_and_every_scaling_at_scale_1_is_plain_rope_exactly():
    plain = rope_frequencies(14, 10000.0)
    for scaling in ("linear", "ntk", "yarn"):
        inv, mscale = _freqs(scaling, 1.0)
        assert torch.equal(inv, plain) and mscale == 1.0, scaling
    # a whole model: bit-identical logits, from the cached tables and from the on-the-fly path
    ref = _tiny().eval()
    yarn = _tiny(rope_scaling="yarn", rope_scale=1.0).eval()
    yarn.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 53, (2, 12))
    assert torch.equal(yarn(idx), ref(idx))
    assert torch.equal(yarn(idx, pos=torch.arange(12) + 3), ref(idx, pos=torch.arange(12) + 3))


def test_linear_scaling_is_rope_at_positions_divided_by_the_scale():
    s = 4.0
    inv, mscale = _freqs("linear", s)
    assert mscale == 1.0
    pos = torch.arange(0, 200, 7)
    for a, b in zip(rope_cos_sin(pos, inv), rope_cos_sin(pos / s, rope_frequencies(14, 10000.0))):
        torch.testing.assert_close(a, b)


def test_ntk_theta_formula():
    d, theta, s = 14, 10000.0, 4.0
    assert ntk_rope_theta(theta, d, s) == pytest.approx(theta * s ** (d / (d - 2)))
    inv, mscale = _freqs("ntk", s)
    torch.testing.assert_close(inv, rope_frequencies(d, theta * s ** (d / (d - 2))))
    plain = rope_frequencies(d, theta)
    # the base change stretches the lowest frequency by exactly s and keeps the highest (i = 0)
    torch.testing.assert_close(inv[-1], plain[-1] / s)
    assert inv[0] == plain[0] and mscale == 1.0


def test_yarn_ramp_and_temperature():
    d, theta, s, L = 64, 10000.0, 8.0, 256
    inv, mscale = scaled_rope_frequencies(d, theta, scaling="yarn", scale=s, original_max_seq_len=L)
    plain = rope_frequencies(d, theta)
    rotations = L * plain / (2 * math.pi)
    fast, slow = rotations > 32, rotations < 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(inv[fast], plain[fast])  # extrapolated: unchanged
    torch.testing.assert_close(inv[slow], plain[slow] / s)  # interpolated
    mid = ~fast & ~slow
    gamma = (rotations[mid] - 1) / 31
    torch.testing.assert_close(inv[mid], (1 - gamma) * plain[mid] / s + gamma * plain[mid])
    assert mscale == pytest.approx(0.1 * math.log(s) + 1) == yarn_mscale(s)
    # in the model the temperature scales q and k, so the logits q.k by mscale^2
    model = _tiny(rope_scaling="yarn", rope_scale=s, rope_original_max_seq_len=L, d_model=3 * d, max_seq_len=32)
    cos, sin = rope_cos_sin(torch.arange(32), inv)
    torch.testing.assert_close(model.rope_cos, cos * mscale)
    torch.testing.assert_close(model.rope_sin, sin * mscale)


def test_a_longer_max_seq_len_loads_the_trained_weights():
    """E5: train at 16, evaluate at 8 x 16 with RoPE scaling; the tables are not saved state."""
    for kw in [dict(), dict(pos="sinusoidal"), dict(pos="alibi"), dict(pos="none")]:
        short = _tiny(**kw).eval()
        assert not any(k.startswith(("rope_", "inv_freq", "pos_table", "alibi")) for k in short.state_dict())
        scaled = dict(rope_scaling="yarn", rope_scale=8.0) if not kw else {}
        long = _tiny(max_seq_len=128, rope_original_max_seq_len=16 if not kw else None, **scaled, **kw).eval()
        long.load_state_dict(short.state_dict(), strict=True)
        idx = torch.randint(0, 53, (1, 128))
        out = long(idx)
        assert out.shape == (1, 128, 53) and torch.isfinite(out).all()
        if kw:  # unscaled: the first 16 positions are the trained model's
            torch.testing.assert_close(out[:, :16], short(idx[:, :16]), atol=1e-5, rtol=1e-5)
    # the training context is resolved and saved with the config, so a max_seq_len override keeps it
    assert GPTConfig(max_seq_len=16).rope_original_max_seq_len == 16


def test_load_run_with_model_overrides(tmp_path):
    from weightsmith.config import dump_toml, to_dict
    from weightsmith.train.checkpoint import load_run, save_checkpoint

    model = _tiny().eval()
    save_checkpoint(tmp_path, 0, model, None)
    (tmp_path / "config.toml").write_text(dump_toml({"model": {"family": "gpt", **to_dict(model.config)}}))
    run = load_run(tmp_path, model_overrides={"max_seq_len": 128, "rope_scaling": "yarn", "rope_scale": 8.0})
    cfg = run.model.config
    assert (cfg.max_seq_len, cfg.rope_original_max_seq_len, cfg.rope_scaling) == (128, 16, "yarn")
    assert run.config["model"]["max_seq_len"] == 16
    torch.testing.assert_close(run.model.tok_emb.weight, model.tok_emb.weight)


# ---------------------------------------------------------------------------------------------------
# sinusoidal and ALiBi

def test_sinusoidal_equals_the_formula():
    D = 10
    pe = sinusoidal_embedding(torch.arange(7), D)
    for p in range(7):
        for i in range(D // 2):
            angle = p / 10000 ** (2 * i / D)
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    model = _tiny(pos="sinusoidal", d_model=12, n_heads=2).eval()
    assert sum(p.numel() for p in model.parameters()) == count_params("gpt", model.config)
    idx = torch.randint(0, 53, (2, 9))
    # the table path, the on-the-fly path (explicit positions) and the formula agree
    assert model.config.sinusoidal_scale == pytest.approx(0.02 * 2 ** 0.5)  # the token embedding's init std
    torch.testing.assert_close(model.pos_table,
                               model.config.sinusoidal_scale * sinusoidal_embedding(torch.arange(16), 12))
    wide = _tiny(pos="sinusoidal", d_model=256, n_heads=4, max_seq_len=512)
    assert float(wide.pos_table.std()) == pytest.approx(float(wide.tok_emb.weight.std()), rel=0.1)
    torch.testing.assert_close(model(idx), model(idx, pos=torch.arange(9)))


def test_alibi_slopes_are_the_papers():
    assert alibi_slopes(8).tolist() == [2.0 ** -k for k in range(1, 9)]  # 1/2 ... 1/256
    # 6 heads: the 4 slopes of 4 heads (1/4 ... 1/256), then every other one of 8 heads' (1/2, 1/8)
    assert alibi_slopes(6).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    assert alibi_slopes(4).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    # 12 heads: 8 heads' slopes, then the odd-numbered ones of 16 heads' 2^(-k/2): 2^-0.5, 2^-1.5, ...
    assert alibi_slopes(12).tolist() == pytest.approx([2.0 ** -k for k in range(1, 9)]
                                                      + [2.0 ** -(k + 0.5) for k in range(4)])


def naive_alibi_attention(attn: Attention, x, slopes):
    """softmax(q k^T / sqrt(d) - m_h (i - j), causal) v with explicit loops."""
    B, T, _ = x.shape
    H, Hkv, dh = attn.n_heads, attn.n_kv_heads, attn.d_head
    q = attn.q_proj(x).view(B, T, H, dh).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, dh).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, dh).transpose(1, 2)
    out = torch.zeros(B, H, T, dh)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(T):
                scores = torch.stack([q[b, h, i] @ k[b, kv, j] / math.sqrt(dh) - slopes[h] * (i - j)
                                      for j in range(i + 1)])
                w = scores.softmax(0)
                out[b, h, i] = sum(w[j] * v[b, kv, j] for j in range(i + 1))
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * dh))


@pytest.mark.parametrize("n_heads, n_kv_heads", [(6, 6), (6, 2), (5, 1)])
def test_alibi_attention_matches_naive_loop(n_heads, n_kv_heads):
    torch.manual_seed(0)
    D, T = 10 * n_heads, 7
    attn = Attention(D, n_heads, n_kv_heads, bias=True, dropout=0.0)
    x = torch.randn(2, T, D) * 3  # large scores, so a wrong bias shows
    slopes = alibi_slopes(n_heads)
    mask = alibi_bias(slopes, torch.arange(T), torch.arange(T))
    assert mask.shape == (1, n_heads, T, T)
    torch.testing.assert_close(attn(x, attn_mask=mask), naive_alibi_attention(attn, x, slopes),
                               atol=1e-5, rtol=1e-5)


def test_alibi_model_uses_the_bias_and_is_translation_invariant():
    """The bias changes the output (vs NoPE with the same weights), and, since it depends on i - j only,
    a left-padded row with its pad keys masked (as batched generation does) equals the unpadded row."""
    alibi, nope = _tiny(pos="alibi").eval(), _tiny(pos="none").eval()
    nope.load_state_dict(alibi.state_dict())
    idx = torch.randint(0, 53, (2, 10))
    assert not torch.allclose(alibi(idx), nope(idx))
    from weightsmith.ship.batch import padded_batch, prefill_mask

    prompts = [idx[0, :4].tolist(), idx[1].tolist()]
    ids, pads = padded_batch(prompts)
    out = alibi(ids, attn_mask=prefill_mask(pads, ids.shape[1]))
    torch.testing.assert_close(out[0, -4:], alibi(idx[:1, :4])[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# every variant: KV cache, causality, batched generation, parameters

@pytest.mark.parametrize("kw", VARIANTS, ids=_ids)
def test_kv_cache_matches_full_forward(kw):
    model = _tiny(**kw).eval()
    idx = torch.randint(0, 53, (2, 12))
    full = model(idx)
    cache = model.new_cache(2, 12)
    parts = [model(idx[:, :5], cache=cache, start=0), model(idx[:, 5:8], cache=cache, start=5)]
    for t in range(8, 12):
        parts.append(model(idx[:, t:t + 1], cache=cache, start=t))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", VARIANTS, ids=_ids)
def test_causality(kw):
    model = _tiny(**kw).eval()
    idx = torch.randint(0, 53, (2, 11))
    base = model(idx)
    for t in range(10):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 53
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize("pos", POS)
def test_batched_greedy_equals_one_at_a_time(pos):
    """Left padding, the padding masks and the KV cache, inside and past the window (max_seq_len 16)."""
    model = _tiny(pos=pos, init_std=0.3).eval()
    prompts = [[5], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3]]
    out = generate_batch(model, prompts, 14, temperature=0.0)
    for p, o in zip(prompts, out):
        assert o == generate(model, torch.tensor([p]), 14, temperature=0.0)[0].tolist()


@pytest.mark.parametrize("kw", VARIANTS, ids=_ids)
def test_analytic_params_and_every_parameter_gets_a_gradient(kw):
    model = _tiny(**kw)
    assert count_params("gpt", model.config) == sum(p.numel() for p in model.parameters())
    model(torch.randint(0, 53, (2, 9))).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# norms

def test_dyt_formula_init_and_parameter_count():
    torch.manual_seed(0)
    norm = DyT(7, alpha0=0.8)
    assert norm.alpha.item() == pytest.approx(0.8) and torch.equal(norm.weight, torch.ones(7))
    assert torch.equal(norm.bias, torch.zeros(7))
    with torch.no_grad():
        norm.alpha.fill_(1.3)
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 7) * 4
    torch.testing.assert_close(norm(x), norm.weight * torch.tanh(1.3 * x) + norm.bias)
    assert sum(p.numel() for p in norm.parameters()) == 1 + 7 + 7
    assert sum(p.numel() for p in make_norm("dyt", 7, 1e-5, False).parameters()) == 1 + 7
    assert list(make_norm("none", 7, 1e-5, True).parameters()) == []
    # in a model: 2 norms per block + the final one, each alpha + weight (+ bias); alpha starts at alpha0
    model = _tiny(norm="dyt", bias=True, dyt_alpha0=0.25)
    n_norms = 2 * 2 + 1
    base = _tiny(norm="none", bias=True)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters()) == n_norms * 61
    assert all(m.alpha.item() == 0.25 for m in model.modules() if isinstance(m, DyT))


@pytest.mark.parametrize("norm", ["none", "dyt"])
def test_normalization_free_models_train_a_few_steps(norm):
    model = _tiny(norm=norm, pos="alibi" if norm == "none" else "rope")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 53, (4, 16))
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, 53), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------------
# config errors name the field

@pytest.mark.parametrize("kw, field", [
    (dict(pos="alibi", rope_scaling="yarn", rope_scale=2.0), "rope_scaling"),
    (dict(rope_scale=2.0), "rope_scale"),
    (dict(rope_scaling="linear", rope_scale=0.5), "rope_scale"),
    (dict(rope_scaling="yarn", rope_scale=2.0, yarn_alpha=40.0), "yarn_alpha"),
    (dict(pos="sinusoidal", d_model=15, n_heads=3), "d_model"),
    (dict(rope_scaling="ntk", rope_scale=2.0, d_model=6, n_heads=3), "d_head"),
])
def test_bad_options_name_the_field(kw, field):
    base = dict(vocab_size=10, d_model=24, n_layers=1, n_heads=4)
    base.update(kw)
    with pytest.raises(ConfigError, match=field):
        GPTConfig(**base)


# ---------------------------------------------------------------------------------------------------
# exporters: refuse with a one-line error naming the field, or export exactly (ONNX)

UNEXPORTABLE = [(dict(pos="sinusoidal"), "pos"), (dict(pos="alibi"), "pos"), (dict(pos="none"), "pos"),
                (dict(norm="dyt"), "norm"), (dict(norm="none"), "norm"),
                (dict(rope_scaling="linear", rope_scale=2.0), "rope_scaling"),
                (dict(rope_scaling="yarn", rope_scale=2.0), "rope_scaling")]


@pytest.mark.parametrize("kw, field", UNEXPORTABLE, ids=[_ids(k) for k, _ in UNEXPORTABLE])
def test_hf_and_gguf_refuse_what_they_cannot_express(kw, field):
    from weightsmith.ship.export_gguf import gguf_arch
    from weightsmith.ship.hf_convert import ours_to_hf

    model = _tiny(**kw)
    for fmt, fn in (("Hugging Face", lambda: ours_to_hf(model.config, model.state_dict())),
                    ("GGUF", lambda: gguf_arch(model.config))):
        with pytest.raises(ConfigError) as e:
            fn()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"model.{field}=") and fmt in msg and "supported: " in msg


def test_cli_export_of_an_alibi_run_fails_in_one_line(tmp_path, capsys):
    from weightsmith.cli import main
    from weightsmith.config import dump_toml, to_dict
    from weightsmith.data.tokenizers import save_tokenizer, train_tokenizer
    from weightsmith.train.checkpoint import save_checkpoint

    tok = train_tokenizer("byte", "abc", "abc", 300)
    model = _tiny(pos="alibi", vocab_size=tok.vocab_size)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, 0, model, None)
    save_tokenizer(tok, run)
    (run / "config.toml").write_text(dump_toml({"data": {"tokenizer": "byte"},
                                                "model": {"family": "gpt", **to_dict(model.config)}}))
    for fmt in ("hf", "gguf"):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "model.pos='alibi'" in err and "'learned', 'rope'" in err
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("kw", [dict(pos="alibi", norm="dyt", bias=True), dict(pos="sinusoidal", norm="none"),
                                dict(rope_scaling="yarn", rope_scale=4.0, rope_original_max_seq_len=8)],
                         ids=_ids)
def test_onnx_exports_every_variant_exactly(kw, tmp_path):
    import onnxruntime as ort

    from weightsmith.data.tokenizers import train_tokenizer
    from weightsmith.ship.export_onnx import export_onnx

    tok = train_tokenizer("byte", "abc", "abc", 300)
    model = _tiny(vocab_size=tok.vocab_size, n_layers=1, init_std=0.2, **kw).eval()
    path = export_onnx(model, tok, tmp_path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B, T in ((2, 11), (1, 1), (1, 16)):
        x = torch.randint(0, tok.vocab_size, (B, T))
        (logits,) = sess.run(None, {"input_ids": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-4)
