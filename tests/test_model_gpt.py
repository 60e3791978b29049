"""Decoder invariants: attention vs a naive loop, causality, RoPE relativity, GQA, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from weightsmith.errors import ConfigError
from weightsmith.models.gpt import GPT, GPTConfig
from weightsmith.models.layers.attention import Attention
from weightsmith.models.layers.rope import apply_rope, rope_cos_sin, rope_frequencies


def naive_attention(attn: Attention, x, rope=None):
    """Per-head loops over explicit softmax(q k^T / sqrt(d)) v with a causal mask."""
    B, T, _ = x.shape
    H, Hkv, dh = attn.n_heads, attn.n_kv_heads, attn.d_head
    q = attn.q_proj(x).view(B, T, H, dh).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, Hkv, dh).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, Hkv, dh).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = torch.zeros(B, H, T, dh)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for t in range(T):
                scores = torch.stack([q[b, h, t] @ k[b, kv, s] for s in range(t + 1)]) / math.sqrt(dh)
                w = scores.softmax(0)
                out[b, h, t] = sum(w[s] * v[b, kv, s] for s in range(t + 1))
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * dh))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(6, 6), (6, 3), (6, 1)])
def test_attention_matches_naive_loop(n_heads, n_kv_heads):
    torch.manual_seed(0)
    attn = Attention(36, n_heads, n_kv_heads, bias=True, dropout=0.0)
    x = torch.randn(2, 7, 36)
    cos_sin = rope_cos_sin(torch.arange(7), rope_frequencies(36 // n_heads, 10000.0))
    torch.testing.assert_close(attn(x, cos_sin), naive_attention(attn, x, cos_sin), atol=1e-5, rtol=1e-5)


def test_gqa_with_all_kv_heads_equals_mha():
    """n_kv_heads == n_heads is plain multi-head attention: compare with torch's nn.MultiheadAttention."""
    torch.manual_seed(0)
    D, H, T = 28, 4, 9
    attn = Attention(D, H, H, bias=True, dropout=0.0)
    mha = torch.nn.MultiheadAttention(D, H, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        mha.out_proj.weight.copy_(attn.o_proj.weight)
        mha.out_proj.bias.copy_(attn.o_proj.bias)
    x = torch.randn(3, T, D)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    ref, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA == MHA whose k/v projections repeat each kv head n_heads / n_kv_heads times."""
    torch.manual_seed(1)
    D, H, Hkv = 24, 6, 2
    gqa = Attention(D, H, Hkv, bias=False, dropout=0.0)
    mha = Attention(D, H, H, bias=False, dropout=0.0)
    dh = D // H
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for proj in ("k_proj", "v_proj"):
            w = getattr(gqa, proj).weight.view(Hkv, dh, D).repeat_interleave(H // Hkv, 0).reshape(H * dh, D)
            getattr(mha, proj).weight.copy_(w)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def _tiny(**kw):
    base = dict(vocab_size=53, d_model=30, n_layers=2, n_heads=3, max_seq_len=16)
    base.update(kw)
    return GPT(GPTConfig(**base))


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_causality(pos):
    torch.manual_seed(0)
    model = _tiny(pos=pos, n_kv_heads=1).eval()
    idx = torch.randint(0, 53, (2, 11))
    base = model(idx)
    for t in range(10):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 53
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    d_head = 14
    inv = rope_frequencies(d_head, 10000.0)
    q, k = torch.randn(1, 1, 1, d_head), torch.randn(1, 1, 1, d_head)

    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([m]), inv)
        cn, sn = rope_cos_sin(torch.tensor([n]), inv)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum()

    for m, n in [(3, 1), (10, 5), (7, 7)]:
        for shift in (1, 17, 250):
            torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(3, 1), score(4, 1))
    # a whole RoPE model: shifting every position leaves the logits unchanged
    model = _tiny().eval()
    idx = torch.randint(0, 53, (1, 8))
    torch.testing.assert_close(model(idx), model(idx, pos=torch.arange(8) + 5), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=1), dict(norm="layernorm", mlp="gelu", pos="learned",
                                                                  bias=True)])
def test_kv_cache_matches_full_forward(kw):
    torch.manual_seed(0)
    model = _tiny(**kw).eval()
    idx = torch.randint(0, 53, (2, 12))
    full = model(idx)
    cache = model.new_cache(2, 12)
    parts = [model(idx[:, :5], cache=cache, start=0)]
    parts.append(model(idx[:, 5:8], cache=cache, start=5))  # multi-token chunk after a prefix
    for t in range(8, 12):
        parts.append(model(idx[:, t:t + 1], cache=cache, start=t))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_param_count():
    model = _tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    untied = _tiny(tie_embeddings=False)
    n_tied = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 53 * 30


def test_depth_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, d_model=96, n_layers=8, n_heads=4, d_ff=384))
    std_q = model.blocks[0].attn.q_proj.weight.std().item()
    std_o = model.blocks[0].attn.o_proj.weight.std().item()
    assert abs(std_q - 0.02) < 0.002
    assert abs(std_o - 0.02 / math.sqrt(16)) < 0.001


@pytest.mark.parametrize("kw,field", [(dict(d_model=30, n_heads=4), "n_heads"),
                                      (dict(n_heads=6, n_kv_heads=4), "n_kv_heads"),
                                      (dict(n_layers=0), "n_layers")])
def test_impossible_shapes_name_the_field(kw, field):
    base = dict(vocab_size=10, d_model=24, n_layers=1, n_heads=6)
    base.update(kw)
    with pytest.raises(ConfigError, match=field):
        GPTConfig(**base)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 53, (4, 16))
    losses = []
    for _ in range(30):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 53), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
