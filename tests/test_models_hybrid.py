"""The hybrid family (attention + Mamba-2, Jamba-style): layer pattern, the cache against full forwards,
causality, all-attention parity with the GPT, the analytic model against numel / FlopCounterMode / saved
tensors, generation with a sliding window against the naive loop, and a short run through the trainer."""

import json
from pathlib import Path

import pytest
import torch
from test_analysis import _measured_forward_flops, _saved_activation_bytes

from weightsmith.analysis import count_params, format_report, forward_flops, inspect_model, memory_estimate
from weightsmith.analysis.components import rows_for
from weightsmith.analysis.memory import row_activation_elements
from weightsmith.config import load_toml
from weightsmith.errors import ConfigError
from weightsmith.models.layers.attention import Attention, KVCache
from weightsmith.models.mamba2 import Mamba2Mixer, Mamba2State
from weightsmith.recipe import recipe_from_tree
from weightsmith.registry import create_model, list_models, resolve
from weightsmith.ship.batch import generate_batch
from weightsmith.ship.generate import generate
from weightsmith.train.loop import run_training

# distinct sizes: vocab 53, d_model 40, 4 heads of 10, 2 kv heads, d_ff 56; Mamba-2 5 heads of 16, state 7
TINY = dict(vocab_size=53, d_model=40, n_layers=5, attn_every=2, n_heads=4, n_kv_heads=2, d_ff=56, d_state=7,
            d_conv=3, ssm_d_head=16, chunk_size=8, max_seq_len=16)
MOE = dict(n_experts=5, n_experts_per_token=2, d_ff=24)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("hybrid", **{**TINY, **kw}).eval()


# ---------------------------------------------------------------------------------------------------
# structure and the cache

@pytest.mark.parametrize("n_layers, attn_every, pattern", [(5, 2, "MAMAM"), (8, 4, "MMMAMMMA"), (3, 1, "AAA"),
                                                          (3, 4, "MMM")])
def test_layer_i_is_attention_when_i_mod_attn_every_is_attn_every_minus_1(n_layers, attn_every, pattern):
    model = create_model("hybrid", device="meta", **{**TINY, "n_layers": n_layers, "attn_every": attn_every})
    kinds = "".join("A" if isinstance(b.mixer, Attention) else "M" for b in model.blocks)
    assert kinds == pattern == "".join("A" if model.config.is_attention(i) else "M" for i in range(n_layers))
    cache = model.new_cache(2, 12)
    assert [isinstance(c, KVCache) for c in cache] == [k == "A" for k in pattern]
    assert all(isinstance(c, Mamba2State) for c, k in zip(cache, pattern) if k == "M")


@pytest.mark.parametrize("kw", [{}, MOE])
def test_full_forward_equals_steps_and_prefill_plus_steps(kw):
    model = tiny(**kw)
    idx = torch.randint(0, 53, (3, 16))  # max_seq_len, two chunks
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(3, 16)
        steps = torch.cat([model(idx[:, t:t + 1], cache=cache, start=t) for t in range(16)], 1)
        torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
        cache, parts, t = model.new_cache(3, 16), [], 0
        for n in (9, 1, 4, 1, 1):  # a prefill, steps, a chunk after a filled cache
            parts.append(model(idx[:, t:t + n], cache=cache, start=t))
            t += n
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        last = model(idx, cache=model.new_cache(3, 16), last_only=True)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    assert not model.recurrent


def test_causality():
    model = tiny()
    idx = torch.randint(0, 53, (2, 14))
    changed = idx.clone()
    changed[:, 6] = (idx[:, 6] + 1) % 53
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-4


@pytest.mark.parametrize("kw", [{}, MOE])
def test_all_attention_equals_the_gpt_with_the_same_weights(kw):
    """attn_every = 1: every layer is the GPT's block (RMSNorm, RoPE GQA attention, SwiGLU or MoE)."""
    hybrid = tiny(**kw, n_layers=3, attn_every=1)
    gpt = create_model("gpt", vocab_size=53, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16,
                       **{"d_ff": 56, **kw}).eval()
    rename = {".norm.": ".attn_norm.", ".mixer.": ".attn."}
    sd = {}
    for k, v in hybrid.state_dict().items():
        for a, b in rename.items():
            k = k.replace(a, b)
        sd[k] = v
    gpt.load_state_dict(sd, strict=True)
    idx = torch.randint(0, 53, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hybrid(idx), gpt(idx))


def test_moe_leaves_its_aux_loss_for_the_trainer():
    model = tiny(**MOE)
    model(torch.randint(0, 53, (2, 8)))
    assert all(b.mlp.aux_loss is not None for b in model.blocks)


def test_init():
    torch.manual_seed(0)
    model = create_model("hybrid", vocab_size=300, d_model=64, n_layers=8, n_heads=4, ssm_d_head=16)
    resid = 0.02 / 4  # / sqrt(2 * 8 layers)
    m, a = model.blocks[0], model.blocks[3]
    assert isinstance(m.mixer, Mamba2Mixer) and isinstance(a.mixer, Attention)
    assert m.mixer.out_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert a.mixer.o_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert m.mlp.down.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert m.mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert (m.mixer.D == 1).all() and torch.exp(m.mixer.A_log).min() >= 1
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("kw, field", [({"attn_every": 0}, "model.attn_every"), ({"n_heads": 3}, "model.n_heads"),
                                       ({"ssm_d_head": 48}, "model.ssm_d_head"),
                                       ({"n_experts": 2, "n_experts_per_token": 3}, "model.n_experts_per_token")])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        resolve("hybrid", kw)


# ---------------------------------------------------------------------------------------------------
# the analytic model

@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("hybrid")])
def test_analytic_params_equal_numel(name):
    fam, cfg = resolve(name)
    model = create_model(name, device="meta")
    assert count_params(fam.name, cfg) == sum(p.numel() for p in model.parameters())
    names = {n for r in rows_for(fam.name, cfg) for n, _ in r.weights}
    assert names == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("kw", [{}, MOE, dict(attn_every=3, n_groups=5, bias=True, tie_embeddings=False)])
def test_analytic_params_equal_numel_for_variants(kw):
    model = create_model("hybrid", device="meta", **{**TINY, **kw})
    assert count_params("hybrid", model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kw", [{}, MOE, dict(attn_every=3, n_groups=5, bias=True)])
@pytest.mark.parametrize("B, T", [(1, 8), (3, 16), (2, 32)])
def test_forward_flops_match_flop_counter(kw, B, T):
    """Attention is dense over T; the SSD matmuls are counted at chunk_size (exact at multiples of it)."""
    model = tiny(**kw, max_seq_len=32)
    x = torch.randint(0, 53, (B, T))
    measured = _measured_forward_flops("hybrid", model, x)
    predicted = forward_flops("hybrid", model.config, T)["total"] * B * T
    assert predicted == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("kw", [{}, MOE])
def test_activation_count_matches_saved_tensors(kw):
    model = tiny(**kw)
    model.train()
    B, T = 3, 16  # T = max_seq_len: the RoPE tables saved are whole
    x = torch.randint(0, 53, (B, T))
    measured = _saved_activation_bytes("hybrid", model, x)
    rows = rows_for("hybrid", model.config)
    predicted = 4 * sum(row_activation_elements(r, B, T) - B * T * r.act_held for r in rows)
    assert predicted == pytest.approx(measured, rel=0.03)


def test_kv_cache_for_attention_layers_and_state_for_mamba_layers():
    cfg = resolve("hybrid", TINY)[1]  # MAMAM: 2 attention, 3 Mamba-2 layers
    mem = memory_estimate("hybrid", cfg, batch_size=3, seq_len=16)
    assert mem["kv_cache_per_token"] == 2 * (2 * 2 * 10) * 4  # layers x (k, v) x kv heads x d_head x fp32
    conv_dim = 80 + 2 * 7
    assert mem["state_per_seq"] == 3 * (conv_dim * 2 + 5 * 16 * 7) * 4
    model = tiny()
    cache = model.new_cache(3, 16)
    assert cache.nbytes == mem["kv_cache"] + mem["state"]
    report = format_report(inspect_model("hybrid-shakespeare"))
    assert "KV cache" in report and "state" in report


def test_shakespeare_preset_matches_the_main_job_gpt_and_the_recipe():
    root = Path(__file__).parents[1] / "recipes"
    main, ours = load_toml(root / "shakespeare.toml"), load_toml(root / "shakespeare-hybrid.toml")
    assert ours["data"] == main["data"] and ours["train"]["max_time"] == main["train"]["max_time"]
    vocab = {"vocab_size": main["data"]["vocab_size"]}
    gpt = recipe_from_tree(main).model_config(vocab)
    cfg = recipe_from_tree(ours).model_config(vocab)
    assert cfg == resolve("hybrid-shakespeare")[1]
    n_gpt, n = count_params("gpt", gpt), count_params("hybrid", cfg)
    assert n_gpt == 918_656 and abs(n / n_gpt - 1) < 0.02


# ---------------------------------------------------------------------------------------------------
# generation: the GPT's sliding window

def naive_greedy(model, prompt, n):
    """Reference: n greedy tokens, each from a fresh full forward over the last max_seq_len tokens."""
    ids, L = list(prompt), model.config.max_seq_len
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-L:]]))[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("kw", [{}, MOE])
def test_generate_past_the_window_equals_the_naive_loop(kw):
    model = tiny(init_std=0.3, **kw)  # peaked logits: no near-ties under greedy
    for prompt in ([3, 1, 4, 1, 5], list(range(1, 21))):  # 5 tokens, and a prompt longer than the window
        out = generate(model, torch.tensor([prompt]), 30, temperature=0.0)[0].tolist()
        assert len(out) == len(prompt) + 30 and out == naive_greedy(model, prompt, 30)


PROMPTS = [[5], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [4, 4, 4], [11] * 12, list(range(30, 50))]


@pytest.mark.parametrize("kw", [{}, MOE])
def test_batched_greedy_equals_one_at_a_time(kw):
    """Left-padded prompts (one longer than the window), past the window: the pads never reach a state."""
    model = tiny(init_std=0.3, **kw)
    out = generate_batch(model, PROMPTS, 22, temperature=0.0)
    for p, o in zip(PROMPTS, out):
        assert o == generate(model, torch.tensor([p]), 22, temperature=0.0)[0].tolist()


def test_speculative_decoding_and_rewinding_are_refused():
    from weightsmith.ship.speculative import speculative_generate

    model, draft = tiny(), tiny(seed=1)
    with pytest.raises(ValueError, match="cannot be rewound"):  # the first rejected draft
        speculative_generate(model, draft, torch.tensor([[1, 2, 3]]), 10, temperature=0.0)
    cache = model.new_cache(1, 16)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="read 3 tokens"):
        model(torch.tensor([[4]]), cache=cache, start=2)
    gpt_like = tiny(attn_every=1)  # attention only: a KV cache rewinds by rewriting
    cache = gpt_like.new_cache(1, 16)
    gpt_like(torch.tensor([[1, 2, 3]]), cache=cache)
    gpt_like(torch.tensor([[4]]), cache=cache, start=2)


def test_sampling_is_seeded():
    model = tiny()
    a, b = (generate(model, torch.tensor([[1, 2, 3]]), 20, top_k=10, generator=torch.Generator().manual_seed(7))
            for _ in range(2))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# training through the generic trainer

def test_trains_through_the_generic_trainer(tmp_path, tiny_corpus, cache_dir):
    steps = 20
    tree = {"data": {"corpus": str(tiny_corpus), "tokenizer": "char"},
            "model": {"family": "hybrid", "d_model": 32, "n_layers": 2, "attn_every": 2, "n_heads": 2,
                      "d_ff": 64, "d_state": 8, "ssm_d_head": 16, "chunk_size": 16, "max_seq_len": 32},
            "train": dict(batch_size=8, max_steps=steps, lr=1e-2, warmup_steps=3, grad_clip=1.0, log_every=1,
                          eval_every=steps, ckpt_every=steps, eval_tokens=600, eval_batch_size=8),
            "sample": {"prompt": "KING. ", "max_new_tokens": 40}}  # past max_seq_len: the window slides
    run = tmp_path / "run"
    run_training(recipe_from_tree(tree), run, log=lambda *a: None)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == steps and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert "val_bpb" in json.loads((run / "eval.json").read_text())
    assert (run / "samples.txt").read_text().startswith("KING. ")


@pytest.mark.parametrize("family", ["hybrid", "mamba2"])
def test_activation_checkpointing_leaves_the_gradients_unchanged(family):
    from weightsmith.train.activation_checkpointing import apply_activation_checkpointing

    kw = TINY if family == "hybrid" else dict(vocab_size=53, d_model=40, n_layers=2, d_state=7, d_head=16,
                                              chunk_size=8)
    x = torch.randint(0, 53, (2, 16))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_model(family, **kw)
        if ckpt:
            assert apply_activation_checkpointing(model) == model.config.n_layers
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
