"""The mamba2 family: SSD against the naive recurrence, the state against full forwards, causality,
fp32 parity with Hugging Face Mamba2ForCausalLM both ways, the analytic model against numel /
FlopCounterMode / saved tensors, generation with no window, and a short run through the generic trainer."""

import json
from pathlib import Path

import pytest
import torch
from test_analysis import _measured_forward_flops, _saved_activation_bytes

from weightsmith.analysis import count_params, forward_flops, inspect_model
from weightsmith.analysis.components import rows_for
from weightsmith.analysis.memory import row_activation_elements
from weightsmith.config import load_toml
from weightsmith.errors import ConfigError
from weightsmith.models.mamba2 import ssd_chunked, ssd_ref
from weightsmith.recipe import recipe_from_tree
from weightsmith.registry import create_model, list_models, resolve
from weightsmith.ship.batch import generate_batch
from weightsmith.ship.generate import generate
from weightsmith.train.loop import run_training

# distinct sizes: vocab 53, d_model 40, d_inner 80 = 5 heads of 16, state 7, conv 3, chunk 8
TINY = dict(vocab_size=53, d_model=40, n_layers=2, d_state=7, d_conv=3, d_head=16, chunk_size=8, max_seq_len=16)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("mamba2", **{**TINY, **kw}).eval()


def _ssd_inputs(b, T, H, P, G, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    x, dt = torch.randn(b, T, H, P, **f64), torch.rand(b, T, H, **f64) * 0.5
    A = -torch.rand(H, **f64) * 4 - 0.1
    B, C = torch.randn(b, T, G, N, **f64), torch.randn(b, T, G, N, **f64)
    return x, dt, A, B, C, torch.randn(b, H, P, N, **f64)


# ---------------------------------------------------------------------------------------------------
# SSD and the state

@pytest.mark.parametrize("T, Q", [(24, 8), (23, 8), (5, 8), (1, 4), (17, 17), (13, 1)])
@pytest.mark.parametrize("G", [1, 3])
def test_ssd_chunked_equals_the_naive_recurrence(T, Q, G):
    """Chunks of Q, a padded last chunk (T not a multiple of Q), one chunk (T <= Q); from a given state."""
    x, dt, A, B, C, h0 = _ssd_inputs(2, T, 6, 5, G, 7)
    for state in (None, h0):
        y, h = ssd_chunked(x, dt, A, B, C, Q, state)
        y_ref, h_ref = ssd_ref(x, dt, A, B, C, state)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_ssd_gradients_equal_the_naive_recurrence():
    *inputs, h0 = [t.requires_grad_() for t in _ssd_inputs(2, 11, 4, 3, 2, 5)]
    inputs.append(h0)
    y, h = ssd_chunked(*inputs[:5], 4, h0)
    grads = torch.autograd.grad((y.sin().sum() + h.cos().sum()), inputs)
    y_ref, h_ref = ssd_ref(*inputs)
    grads_ref = torch.autograd.grad((y_ref.sin().sum() + h_ref.cos().sum()), inputs)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_full_forward_equals_token_by_token_steps_and_prefill_plus_steps():
    model = tiny()
    idx = torch.randint(0, 53, (3, 21))  # longer than max_seq_len, not a multiple of the chunk
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(3)
        steps = torch.cat([model(idx[:, t:t + 1], cache=cache, start=t) for t in range(21)], 1)
        torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
        cache, parts, t = model.new_cache(3), [], 0
        for n in (13, 1, 5, 2):  # a prefill, a step, a chunk after a state, a step of 2
            parts.append(model(idx[:, t:t + n], cache=cache, start=t))
            t += n
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        assert model(idx, cache=model.new_cache(3), last_only=True).shape == (3, 1, 53)
    # per layer: conv (B, E + 2GN, K - 1) and ssm (B, H, P, N), fp32
    assert cache[0].conv.shape == (3, 94, 2) and cache[0].ssm.shape == (3, 5, 16, 7)
    assert cache.nbytes == 2 * 3 * (94 * 2 + 5 * 16 * 7) * 4


def test_causality():
    model = tiny()
    idx = torch.randint(0, 53, (2, 20))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 53
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-4


def test_groups_and_the_recurrent_step_in_bf16_stay_close():
    model = tiny(n_groups=5, chunk_size=4)
    idx = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        ref = model(idx)
        model.to(torch.bfloat16)
        cache = model.new_cache(2)
        out = torch.cat([model(idx[:, t:t + 1], cache=cache) for t in range(9)], 1)
    assert cache[0].ssm.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().amax() < 0.1


def test_init():
    torch.manual_seed(0)
    model = create_model("mamba2", vocab_size=300, d_model=64, n_layers=4, d_head=8)  # 16 heads
    mixer = model.blocks[0].mixer
    A = torch.exp(mixer.A_log)
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert A.min() >= 1 and A.max() <= 16 and dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert (mixer.D == 1).all() and model.lm_head.weight is model.tok_emb.weight
    assert mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert mixer.out_proj.weight.std().item() == pytest.approx(0.01, rel=0.05)  # 0.02 / sqrt(4 layers)


@pytest.mark.parametrize("kw, field", [({"d_head": 48}, "model.d_head"), ({"n_groups": 3}, "model.n_groups"),
                                       ({"chunk_size": 0}, "model.chunk_size"), ({"d_state": -1}, "model.d_state")])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        resolve("mamba2", kw)


# ---------------------------------------------------------------------------------------------------
# Hugging Face parity

tr = pytest.importorskip("transformers")


def _hf_config(**kw):
    base = dict(vocab_size=53, hidden_size=48, num_hidden_layers=2, state_size=7, expand=2, head_dim=16,
                num_heads=6, n_groups=3, conv_kernel=3, chunk_size=8)
    return tr.Mamba2Config(**{**base, **kw})


@pytest.mark.parametrize("tie, bias", [(False, True), (True, False)])
def test_hf_to_ours_parity(tmp_path, tie, bias):
    """A random HF Mamba2ForCausalLM, saved and imported with load_hf_checkpoint: the same fp32 logits."""
    from weightsmith.ship.hf_convert import load_hf_checkpoint

    torch.manual_seed(0)
    hf = tr.Mamba2ForCausalLM(_hf_config(tie_word_embeddings=tie, use_bias=bias)).eval()
    hf.save_pretrained(tmp_path)
    family, cfg, ours = load_hf_checkpoint(tmp_path)
    assert family == "mamba2" and cfg.n_heads == 6 and cfg.n_groups == 3 and cfg.tie_embeddings == tie
    x = torch.randint(0, 53, (2, 19))  # 2 chunks of 8 and a padded one
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), hf(x).logits)


@pytest.mark.parametrize("tie", [False, True])
def test_ours_to_hf_parity(tmp_path, tie):
    """Ours exported (config.json + safetensors) and loaded by transformers' from_pretrained."""
    from safetensors.torch import save_file

    from weightsmith.ship.hf_convert_mamba2 import mamba2_from_ours

    ours = tiny(d_model=48, n_groups=3, tie_embeddings=tie, bias=True)
    hf_config, hf_sd = mamba2_from_ours(ours.config, ours.state_dict())
    assert ("lm_head.weight" in hf_sd) != tie
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    hf = tr.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 53, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x))
    with pytest.raises(ConfigError, match="mamba2"):
        mamba2_from_ours(resolve("gpt-tiny")[1], {})


def test_hf_options_we_cannot_express_are_refused():
    from weightsmith.ship.hf_convert_mamba2 import mamba2_to_ours

    hf = _hf_config(time_step_limit=(0.0, 0.5)).to_dict()
    with pytest.raises(ConfigError, match="time_step_limit"):
        mamba2_to_ours(hf, {})


# ---------------------------------------------------------------------------------------------------
# the analytic model

@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("mamba2")])
def test_analytic_params_equal_numel(name):
    fam, cfg = resolve(name)
    model = create_model(name, device="meta")
    assert count_params(fam.name, cfg) == sum(p.numel() for p in model.parameters())
    names = {n for r in rows_for(fam.name, cfg) for n, _ in r.weights}
    assert names == {n for n, _ in model.named_parameters()} - {"lm_head.weight"}  # tied


@pytest.mark.parametrize("kw", [{}, dict(n_groups=5, bias=True, conv_bias=False, tie_embeddings=False)])
@pytest.mark.parametrize("B, T", [(1, 8), (3, 24), (2, 64)])
def test_forward_flops_match_flop_counter(kw, B, T):
    """Exact at T a multiple of chunk_size (the counting convention, analysis/components_mamba2.py)."""
    model = tiny(**kw)
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (B, T))
    measured = _measured_forward_flops("mamba2", model, x)
    predicted = forward_flops("mamba2", cfg, T)["total"] * B * T
    assert predicted == pytest.approx(measured, rel=0.01)


def test_flops_below_the_chunk_size_are_the_documented_deviation():
    """T < Q runs one chunk of T: the two quadratic terms scale by T / Q."""
    model = tiny()
    cfg, T = model.config, 5
    measured = _measured_forward_flops("mamba2", model, torch.randint(0, 53, (1, T)))
    E, G, N, Q = cfg.d_inner, cfg.n_groups, cfg.d_state, cfg.chunk_size
    quadratic = 2 * cfg.n_layers * (Q * G * N + Q * E) * T  # FLOPs of one sequence, counted at Q
    assert forward_flops("mamba2", cfg, T)["total"] * T - measured == pytest.approx(quadratic * (1 - T / Q))


@pytest.mark.parametrize("kw", [{}, dict(n_groups=5)])
def test_activation_count_matches_saved_tensors(kw):
    model = tiny(**kw)
    model.train()
    B, T = 3, 32
    x = torch.randint(0, 53, (B, T))
    measured = _saved_activation_bytes("mamba2", model, x)
    predicted = 4 * sum(row_activation_elements(r, B, T) - B * T * r.act_held for r in rows_for("mamba2", model.config))
    assert predicted == pytest.approx(measured, rel=0.02)


def test_state_replaces_the_kv_cache_in_inspect():
    r = inspect_model("mamba2-shakespeare", batch_size=4, seq_len=128)
    c = r["config"]
    d_inner = c["expand"] * c["d_model"]
    conv_dim = d_inner + 2 * c["n_groups"] * c["d_state"]
    per_layer = conv_dim * (c["d_conv"] - 1) + d_inner * c["d_state"]  # conv inputs; H x P x N
    assert r["state_bytes_per_seq"] == c["n_layers"] * per_layer * 4
    assert r["state_bytes"] == 4 * r["state_bytes_per_seq"]
    assert r["kv_cache_bytes"] == 0 and r["flops_fwd_attention_per_token"] == 0
    model = create_model("mamba2-shakespeare")
    assert model.new_cache(4).nbytes == r["state_bytes"]


def test_shakespeare_preset_matches_the_main_job_gpt_and_the_recipe():
    root = Path(__file__).parents[1] / "recipes"
    main, ours = load_toml(root / "shakespeare.toml"), load_toml(root / "shakespeare-mamba2.toml")
    assert ours["data"] == main["data"] and ours["train"]["max_time"] == main["train"]["max_time"]
    vocab = {"vocab_size": main["data"]["vocab_size"]}
    gpt = recipe_from_tree(main).model_config(vocab)
    cfg = recipe_from_tree(ours).model_config(vocab)
    assert cfg == resolve("mamba2-shakespeare")[1]
    n_gpt, n = count_params("gpt", gpt), count_params("mamba2", cfg)
    assert n_gpt == 918_656 and abs(n / n_gpt - 1) < 0.02


# ---------------------------------------------------------------------------------------------------
# generation: no window

def naive_greedy(model, prompt, n):
    """Reference: n greedy tokens, each from a fresh full forward over *all* tokens so far (no window)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def test_generate_past_max_seq_len_equals_full_forwards():
    model = tiny(init_std=0.5)  # peaked logits: no near-ties under greedy
    for prompt in ([3, 1, 4], list(range(1, 21))):  # max_seq_len is 16: the second prompt is longer
        out = generate(model, torch.tensor([prompt]), 25, temperature=0.0)[0].tolist()
        assert out == naive_greedy(model, prompt, 25)


def test_batched_greedy_equals_one_at_a_time():
    model = tiny(init_std=0.5)
    prompts = [[5], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [4, 4, 4], list(range(30, 50))]
    for p, o in zip(prompts, generate_batch(model, prompts, 12, temperature=0.0)):
        assert o == generate(model, torch.tensor([p]), 12, temperature=0.0)[0].tolist()


# ---------------------------------------------------------------------------------------------------
# training through the generic trainer

def test_trains_through_the_generic_trainer(tmp_path, tiny_corpus, cache_dir):
    steps = 20
    tree = {"data": {"corpus": str(tiny_corpus), "tokenizer": "char"},
            "model": {"family": "mamba2", "d_model": 32, "n_layers": 2, "d_state": 8, "d_head": 16,
                      "chunk_size": 16, "max_seq_len": 32},
            "train": dict(batch_size=8, max_steps=steps, lr=1e-2, warmup_steps=3, grad_clip=1.0, log_every=1,
                          eval_every=steps, ckpt_every=steps, eval_tokens=600, eval_batch_size=8),
            "sample": {"prompt": "KING. " * 10, "max_new_tokens": 20}}  # a prompt longer than max_seq_len
    run = tmp_path / "run"
    run_training(recipe_from_tree(tree), run, log=lambda *a: None)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == steps and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert "val_bpb" in json.loads((run / "eval.json").read_text())
    assert (run / "samples.txt").read_text().startswith("KING. " * 10)
