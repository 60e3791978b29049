"""Encoder-only (BERT), encoder-decoder (T5) and mixture-of-experts families: golden parameter counts,
registry contract tests, and invariants (bidirectionality, padding, causality, MoE routing)."""

import pytest
import torch
import torch.nn.functional as F

from weightsmith.analysis import count_params, param_counts
from weightsmith.errors import ConfigError
from weightsmith.registry import create_model, get_preset, list_families, list_models, resolve

GOLDEN = {  # published totals: HF GPT2LMHeadModel, BertModel (with pooler), T5ForConditionalGeneration
    "gpt2": 124_439_808, "bert-base": 109_482_240, "t5-base": 222_903_552, "llama2-7b": 6_738_415_616,
    "mixtral-8x7b": 46_702_792_704,
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_published_parameter_counts_on_meta(name):
    model = create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == GOLDEN[name]
    fam, cfg = resolve(name)
    assert count_params(fam.name, cfg) == GOLDEN[name]


def test_mixtral_active_parameters():
    fam, cfg = resolve("mixtral-8x7b")
    counts = param_counts(fam.name, cfg)
    assert counts["total"] == 46_702_792_704
    assert counts["active"] == 12_879_925_248  # router + 2 of 8 experts per layer


# ---------------------------------------------------------------------------------------------------
# contract over the registry

def _tiny_overrides(name):
    """Shrink any registered preset or family to distinct small sizes, keeping its structural choices."""
    fam, cfg = resolve(name)
    if fam.name == "gpt":
        kv = 2 if cfg.n_kv_heads != cfg.n_heads else 4
        o = dict(vocab_size=61, d_model=24, n_layers=2, n_heads=4, n_kv_heads=kv, d_ff=40, max_seq_len=32)
        if cfg.n_experts:
            o.update(n_experts=3, n_experts_per_token=2)
        return o
    if fam.name == "bert":
        return dict(vocab_size=61, d_model=24, n_layers=2, n_heads=3, d_ff=40, max_seq_len=32)
    if fam.name == "t5":
        return dict(vocab_size=61, d_model=24, n_layers=2, n_decoder_layers=3, n_heads=3, d_head=5, d_ff=40,
                    rel_buckets=8, rel_max_distance=16)
    raise AssertionError(f"no tiny config for family {fam.name}; add one here")


def _forward(model, fam, x):
    """Family-specific forward -> (tensor to check, expected shape, scalar loss)."""
    B, T = x.shape
    if fam == "gpt":
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1))
        for m in model.modules():  # MoE auxiliary loss joins the objective
            if getattr(m, "aux_loss", None) is not None:
                loss = loss + 0.01 * m.aux_loss
        return out, (B, T, model.config.vocab_size), loss
    if fam == "bert":
        hidden, pooled = model(x, token_types=x % 2)
        assert pooled.shape == (B, model.config.d_model)
        return hidden, (B, T, model.config.d_model), hidden.square().mean() + pooled.sum()
    if fam == "t5":
        tgt = x[:, : T - 2]
        out = model(x, tgt)
        return out, (B, T - 2, model.config.vocab_size), F.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                                          tgt.reshape(-1))
    raise AssertionError(fam)


TEXT_PRESETS = [n for n in list_models() if resolve(n)[0].name in ("gpt", "bert", "t5")]


@pytest.mark.parametrize("name", TEXT_PRESETS)
def test_text_presets_shrunk_keep_their_structure_and_train(name):
    """Every gpt/bert/t5 preset at distinct tiny sizes, with its structural choices (GQA, MoE, ...) kept.
    The family-independent contract over the whole registry is tests/test_contract.py."""
    torch.manual_seed(0)
    tiny = create_model(name, **_tiny_overrides(name))
    fam_t, cfg_t = resolve(name, _tiny_overrides(name))
    assert sum(p.numel() for p in tiny.parameters()) == count_params(fam_t.name, cfg_t)
    x = torch.randint(0, 61, (3, 11))
    out, shape, loss = _forward(tiny, fam_t.name, x)
    assert out.shape == shape
    assert torch.isfinite(out).all()
    loss.backward()
    missing = [n for n, p in tiny.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"


def test_every_family_has_a_preset():
    families = {get_preset(n).family for n in list_models() if n not in list_families()}
    assert {"gpt", "bert", "t5"} <= families


# ---------------------------------------------------------------------------------------------------
# BERT

def test_bert_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    model = create_model("bert", vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=16).eval()
    x = torch.randint(0, 53, (2, 9))
    h, _ = model(x)
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % 53
    h2, _ = model(y)
    assert not torch.allclose(h[:, 0], h2[:, 0])  # a later token changes the first position
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False
    a, _ = model(x, padding_mask=mask)
    z = x.clone()
    z[:, 6:] = 0  # different padding content
    b, _ = model(z, padding_mask=mask)
    torch.testing.assert_close(a[:, :6], b[:, :6])


def test_bert_options_drop_modules():
    fam, cfg = resolve("bert", dict(vocab_size=53, d_model=40, n_layers=1, n_heads=4, pos="none",
                                    n_token_types=0, pooler=False))
    model = create_model("bert", vocab_size=53, d_model=40, n_layers=1, n_heads=4, pos="none", n_token_types=0,
                         pooler=False)
    assert model.pos_emb is None and model.type_emb is None and model.pooler is None
    hidden, pooled = model(torch.randint(0, 53, (2, 5)))
    assert hidden.shape == (2, 5, 40) and pooled is None
    assert sum(p.numel() for p in model.parameters()) == count_params("bert", cfg)


# ---------------------------------------------------------------------------------------------------
# T5

def test_t5_decoder_is_causal_and_reads_the_source():
    torch.manual_seed(0)
    model = create_model("t5", vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, rel_buckets=8,
                         rel_max_distance=16).eval()
    src, tgt = torch.randint(0, 53, (2, 13)), torch.randint(0, 53, (2, 7))
    out = model(src, tgt)
    tgt2 = tgt.clone()
    tgt2[:, 4] = (tgt[:, 4] + 1) % 53
    torch.testing.assert_close(model(src, tgt2)[:, :4], out[:, :4])  # positions < 4 unchanged
    src2 = src.clone()
    src2[:, -1] = (src[:, -1] + 1) % 53
    assert not torch.allclose(model(src2, tgt)[:, 0], out[:, 0])  # every target sees the whole source


def test_t5_relative_buckets_are_monotone_and_bounded():
    from weightsmith.models.t5 import relative_position_bucket

    rel = torch.arange(-300, 301)
    for bidirectional in (True, False):
        b = relative_position_bucket(rel, bidirectional=bidirectional, n_buckets=32, max_distance=128)
        assert int(b.min()) >= 0 and int(b.max()) <= 31
    causal = relative_position_bucket(-torch.arange(0, 300), bidirectional=False, n_buckets=32, max_distance=128)
    assert (causal.diff() >= 0).all() and causal[:16].tolist() == list(range(16))  # exact near, log far


# ---------------------------------------------------------------------------------------------------
# mixture of experts

def test_moe_matches_a_naive_per_token_loop():
    from weightsmith.models.layers.moe import MoE

    torch.manual_seed(0)
    moe = MoE(d_model=12, d_ff=20, n_experts=5, n_experts_per_token=2)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 12)
    y = moe(x)
    flat = x.reshape(-1, 12)
    ref = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        logits = moe.router(flat[n])
        top, idx = logits.topk(2)
        w = torch.softmax(top, -1)  # softmax over the kept top-k logits (Mixtral)
        for j in range(2):
            ref[n] += w[j] * moe.experts[int(idx[j])](flat[n : n + 1])[0]
    torch.testing.assert_close(y.reshape(-1, 12), ref)
    # Switch/Mixtral load-balancing loss: E * sum_e (fraction of tokens routed to e) * (mean prob of e)
    logits = moe.router(flat)
    probs = torch.softmax(logits, -1)
    chosen = torch.zeros_like(probs).scatter(1, logits.topk(2).indices, 1.0)
    expected = 5 * (chosen.mean(0) * probs.mean(0)).sum()
    torch.testing.assert_close(moe.aux_loss, expected)


def test_moe_aux_loss_is_k_under_uniform_routing():
    from weightsmith.models.layers.moe import MoE

    moe = MoE(d_model=8, d_ff=6, n_experts=4, n_experts_per_token=2)
    torch.nn.init.zeros_(moe.router.weight)  # every expert equally probable
    moe(torch.randn(2, 5, 8))
    # topk of equal logits picks a fixed pair: f = (1, 1, 0, 0), P = 1/4 -> 4 * 2 / 4 = 2 = k
    torch.testing.assert_close(moe.aux_loss, torch.tensor(2.0))


@pytest.mark.parametrize("overrides, field", [
    (dict(n_experts=4, n_experts_per_token=5), "n_experts_per_token"),
    (dict(n_experts=4, mlp="gelu"), "model.mlp"),
    (dict(n_experts=-1), "n_experts"),
])
def test_moe_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        resolve("gpt", overrides)


@pytest.mark.parametrize("family, overrides, field", [
    ("bert", dict(d_model=30, n_heads=4), "n_heads"),
    ("bert", dict(n_token_types=-1), "n_token_types"),
    ("t5", dict(d_model=30, n_heads=4), "n_heads"),
    ("t5", dict(rel_buckets=2), "rel_buckets"),
])
def test_encoder_config_errors_name_the_field(family, overrides, field):
    with pytest.raises(ConfigError, match=field):
        resolve(family, overrides)
