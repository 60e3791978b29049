"""The mamba (Mamba-1) family: the selective scan against the step-by-step loop (values and gradients,
both schedules, from a given state), the recurrent state against full forwards, causality, the analytic
model against numel / FlopCounterMode / saved tensors / transformers' published shapes, generation with
no window, and a short run through the generic trainer."""

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
from weightsmith.models import mamba as mamba_mod
from weightsmith.models.mamba import selective_scan, selective_scan_ref
from weightsmith.recipe import recipe_from_tree
from weightsmith.registry import create_model, list_models, resolve
from weightsmith.ship.batch import generate_batch
from weightsmith.ship.generate import generate
from weightsmith.train.loop import run_training

# distinct sizes: vocab 53, d_model 40, d_inner 80, state 7, conv 3, dt_rank 5, blocks of 8
TINY = dict(vocab_size=53, d_model=40, n_layers=2, d_state=7, d_conv=3, dt_rank=5, chunk_size=8, max_seq_len=16)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("mamba", **{**TINY, **kw}).eval()


def _scan_inputs(b, T, E, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    x, dt = torch.randn(b, T, E, **f64), torch.rand(b, T, E, **f64) * 0.5 + 0.01
    A = -torch.rand(E, N, **f64) * 4 - 0.1
    B, C = torch.randn(b, T, N, **f64), torch.randn(b, T, N, **f64)
    return x, dt, A, B, C, torch.randn(b, E, N, **f64)


# ---------------------------------------------------------------------------------------------------
# the scan and the state

@pytest.mark.parametrize("T, Q", [(24, 8), (23, 8), (5, 8), (1, 4), (16, 16), (13, 1)])
@pytest.mark.parametrize("blocked", [True, False])
def test_selective_scan_equals_the_loop_values_and_gradients(T, Q, blocked, monkeypatch):
    """Both schedules (blocked: several blocks and a tail; sequential), from zeros and from a state."""
    monkeypatch.setattr(mamba_mod, "_MIN_STEP_ELEMENTS", 1 << 30 if blocked else 0)
    for with_state in (False, True):
        *inputs, h0 = [t.requires_grad_() for t in _scan_inputs(2, T, 6, 5)]
        if with_state:
            inputs.append(h0)
        y, h = selective_scan(*inputs[:5], state=h0 if with_state else None, chunk_size=Q)
        y_ref, h_ref = selective_scan_ref(*inputs[:5], state=h0 if with_state else None)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
        grads = torch.autograd.grad(y.sin().sum() + h.cos().sum(), inputs)
        grads_ref = torch.autograd.grad(y_ref.sin().sum() + h_ref.cos().sum(), inputs)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_selective_scan_gradcheck():
    inputs = [t.requires_grad_() for t in _scan_inputs(1, 9, 3, 2, seed=1)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk_size=4), inputs)


def test_selective_scan_refuses_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(*_scan_inputs(1, 3, 2, 2)[:5], chunk_size=0)


def test_full_forward_equals_token_by_token_steps_and_prefill_plus_steps():
    model = tiny()
    idx = torch.randint(0, 53, (3, 21))  # longer than max_seq_len, not a multiple of the block
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(3)
        steps = torch.cat([model(idx[:, t:t + 1], cache=cache, start=t) for t in range(21)], 1)
        torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
        cache, parts, t = model.new_cache(3), [], 0
        for n in (13, 1, 5, 2):  # a prefill, a step, a scan from a state, a step of 2
            parts.append(model(idx[:, t:t + n], cache=cache, start=t))
            t += n
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        assert model(idx, cache=model.new_cache(3), last_only=True).shape == (3, 1, 53)
    # per layer: conv (B, E, K - 1) and ssm (B, E, N), fp32
    assert cache[0].conv.shape == (3, 80, 2) and cache[0].ssm.shape == (3, 80, 7)
    assert cache.nbytes == 2 * 3 * (80 * 2 + 80 * 7) * 4


def test_causality():
    model = tiny()
    idx = torch.randint(0, 53, (2, 20))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 53
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-4


def test_init():
    model = tiny()
    m = model.blocks[0].mixer
    torch.testing.assert_close(m.A_log, torch.arange(1, 8, dtype=torch.float32).log().expand(80, 7))
    assert (m.D == 1).all()
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("kw, field", [(dict(dt_rank=0), "dt_rank"), (dict(dt_min=0.2), "dt_min"),
                                       (dict(d_state=0), "d_state"), (dict(dt_init_floor=0.0), "dt_init_floor")])
def test_bad_config_is_one_line(kw, field):
    with pytest.raises(ConfigError, match=field):
        resolve("mamba", kw)


# ---------------------------------------------------------------------------------------------------
# the analytic model

@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("mamba-")])
def test_analytic_params_equal_numel(name):
    fam, cfg = resolve(name)
    model = create_model(name, device="meta")
    assert count_params(fam.name, cfg) == sum(p.numel() for p in model.parameters())
    names = {n for r in rows_for(fam.name, cfg) for n, _ in r.weights}
    assert names == {n for n, _ in model.named_parameters()} - {"lm_head.weight"}  # tied


@pytest.mark.parametrize("name", ["mamba-130m", "mamba-370m", "mamba-1.4b"])
def test_presets_have_the_published_parameter_counts(name):
    """Against transformers' MambaForCausalLM built on meta with the published shapes (mamba-130m:
    129,135,360 parameters)."""
    tr = pytest.importorskip("transformers")
    fam, cfg = resolve(name)
    with torch.device("meta"):
        hf = tr.MambaForCausalLM(tr.MambaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                                num_hidden_layers=cfg.n_layers, state_size=16, expand=2,
                                                conv_kernel=4, tie_word_embeddings=True))
    assert count_params("mamba", cfg) == sum(p.numel() for p in hf.parameters())
    if name == "mamba-130m":
        assert count_params("mamba", cfg) == 129_135_360


@pytest.mark.parametrize("kw", [{}, dict(bias=True, conv_bias=False, tie_embeddings=False, dt_rank=3)])
@pytest.mark.parametrize("B, T", [(1, 5), (3, 17), (2, 48)])
def test_forward_flops_match_flop_counter(kw, B, T):
    """Exact at every T: the matmuls of the projections, the depthwise conv and the readout h C."""
    model = tiny(**kw)
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (B, T))
    measured = _measured_forward_flops("mamba", model, x)
    assert forward_flops("mamba", cfg, T)["total"] * B * T == pytest.approx(measured, rel=1e-9)


@pytest.mark.parametrize("kw", [{}, dict(bias=True, tie_embeddings=False)])
@pytest.mark.parametrize("B, T", [(3, 32), (2, 40)])
def test_activation_count_matches_saved_tensors(kw, B, T):
    """Both schedules of the scan save the same tensors; A = -exp(A_log) (2 E N per layer) is added by
    hand, as the module docstring says it is not counted."""
    model = tiny(**kw)
    model.train()
    x = torch.randint(0, 53, (B, T))
    measured = _saved_activation_bytes("mamba", model, x)
    cfg = model.config
    predicted = 4 * sum(row_activation_elements(r, B, T) - B * T * r.act_held for r in rows_for("mamba", cfg))
    predicted += 4 * 2 * cfg.d_inner * cfg.d_state * cfg.n_layers
    assert predicted == pytest.approx(measured, rel=1e-3)


def test_state_replaces_the_kv_cache_in_inspect():
    r = inspect_model("mamba-shakespeare", batch_size=4, seq_len=128)
    c = r["config"]
    d_inner = c["expand"] * c["d_model"]
    per_layer = d_inner * (c["d_conv"] - 1) + d_inner * c["d_state"]
    assert r["state_bytes_per_seq"] == c["n_layers"] * per_layer * 4
    assert r["kv_cache_bytes"] == 0 and r["flops_fwd_attention_per_token"] == 0
    assert create_model("mamba-shakespeare").new_cache(4).nbytes == r["state_bytes"]


def test_shakespeare_preset_matches_the_main_job_gpt_and_the_recipe():
    root = Path(__file__).parents[1] / "recipes"
    main, ours = load_toml(root / "shakespeare.toml"), load_toml(root / "shakespeare-mamba.toml")
    assert ours["data"] == main["data"] and ours["train"] == main["train"]
    vocab = {"vocab_size": main["data"]["vocab_size"]}
    cfg = recipe_from_tree(ours).model_config(vocab)
    assert cfg == resolve("mamba-shakespeare")[1]
    n_gpt, n = count_params("gpt", recipe_from_tree(main).model_config(vocab)), count_params("mamba", cfg)
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
            "model": {"family": "mamba", "d_model": 32, "n_layers": 2, "d_state": 8, "chunk_size": 8,
                      "max_seq_len": 32},
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
