"""Inference-time projection fusion and the precomputed RoPE tables leave the model's function unchanged."""

import pytest
import torch

from weightsmith.models.gpt import GPT, GPTConfig
from weightsmith.models.layers.rope import rope_cos_sin
from weightsmith.ship.fuse import fuse_projections
from weightsmith.ship.generate import generate

CONFIGS = [
    dict(),  # LLaMA-style: RMSNorm, SwiGLU, RoPE, GQA
    dict(n_kv_heads=4),  # MHA
    dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),  # GPT-2 style (attention fuses, MLP has none)
    dict(n_experts=4, n_experts_per_token=2, d_ff=48),  # MoE: every expert's gate/up fuses
    dict(bias=True),
]


def model_pair(seed, **kw):
    cfg = dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48, init_std=0.2)
    cfg.update(kw)
    torch.manual_seed(seed)
    a = GPT(GPTConfig(**cfg)).eval()
    b = GPT(GPTConfig(**cfg)).eval()
    b.load_state_dict(a.state_dict())
    return a, fuse_projections(b)


@pytest.mark.parametrize("kw", CONFIGS)
def test_fused_logits_and_greedy_tokens_equal_unfused(kw):
    plain, fused = model_pair(0, **kw)
    names = {n for n, _ in fused.named_modules()}
    assert any(n.endswith("qkv_proj") for n in names) and not any(n.endswith("q_proj") for n in names)
    if kw.get("mlp", "swiglu") == "swiglu":
        assert any(n.endswith("gate_up") for n in names) and not any(n.endswith(".gate") for n in names)
    linears = [n for n, m in fused.named_modules() if type(m) is torch.nn.Linear]
    assert linears == (["lm_head"] if fused.config.tie_embeddings else [])  # the rest are TransposedLinear
    x = torch.randint(0, 101, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))
    prompt = torch.randint(0, 101, (2, 5))
    assert torch.equal(generate(fused, prompt, 30, temperature=0.0), generate(plain, prompt, 30, temperature=0.0))


def test_fusing_twice_is_harmless_and_skips_quantized_layers():
    from weightsmith.ship.quantize import QuantLinear, quantize_model

    plain, fused = model_pair(1)
    fuse_projections(fused)
    x = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))
    q = quantize_model(model_pair(1)[0], "int8")
    fuse_projections(q)
    assert isinstance(q.blocks[0].attn.q_proj, QuantLinear) and q.blocks[0].attn.qkv_proj is None


def test_rope_tables_equal_on_the_fly_rotation_and_extrapolate_past_max_seq_len():
    model, _ = model_pair(2)
    pos = torch.arange(model.config.max_seq_len)
    cos, sin = rope_cos_sin(pos, model.inv_freq)
    torch.testing.assert_close(model.rope_cos, cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, sin, rtol=0, atol=0)
    x = torch.randint(0, 101, (2, 12))
    with torch.no_grad():  # the sliced tables (pos=None) against angles computed for explicit positions
        torch.testing.assert_close(model(x), model(x, pos=torch.arange(12)))
    # a chunk that runs past max_seq_len uses computed angles: the same logits as explicit positions
    x = torch.randint(0, 101, (1, 8))
    start = model.config.max_seq_len - 4
    with torch.no_grad():
        cache = model.new_cache(1, start + 8)
        model(torch.zeros(1, start, dtype=torch.long), cache=cache)
        a = model(x, cache=cache, start=start)
        cache2 = model.new_cache(1, start + 8)
        model(torch.zeros(1, start, dtype=torch.long), cache=cache2)
        b = model(x, cache=cache2, start=start, pos=torch.arange(start, start + 8))
    torch.testing.assert_close(a, b)


def test_learned_positions_refuse_to_run_past_max_seq_len():
    model, _ = model_pair(3, pos="learned")
    with pytest.raises(ValueError, match="max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
