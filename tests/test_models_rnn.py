"""The lstm and gru families: the analytic model against numel / FlopCounterMode / saved tensors, logits
against a naive nn.LSTMCell / nn.GRUCell loop, causality, the state against full forwards, generation
with no window (single, batched, text), and a short run through the generic trainer."""

import json
from pathlib import Path

import pytest
import torch
from test_analysis import _measured_forward_flops, _saved_activation_bytes
from torch import nn

from weightsmith.analysis import count_params, forward_flops, inspect_model, memory_estimate
from weightsmith.analysis.components import rows_for
from weightsmith.analysis.memory import row_activation_elements
from weightsmith.config import load_toml
from weightsmith.errors import ConfigError
from weightsmith.recipe import recipe_from_tree
from weightsmith.registry import create_model, list_models, resolve
from weightsmith.ship.batch import generate_batch, generate_texts
from weightsmith.ship.generate import generate, generate_text
from weightsmith.ship.speculative import speculative_generate
from weightsmith.train.loop import run_training

# torch.backends.mkldnn.flags() warns about Intel-GPU TF32 on every use
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")

CELLS = ["lstm", "gru"]
TINY = dict(vocab_size=53, d_model=11, n_layers=3, max_seq_len=8)  # distinct sizes; a short training window


def tiny(cell, seed=0, **kw):
    torch.manual_seed(seed)
    # a large embedding init gives peaked, varied next-token distributions (no near-ties under greedy)
    return create_model(cell, **{**TINY, "init_std": 1.0, **kw}).eval()


def no_onednn():
    """oneDNN off: the LSTM runs PyTorch's native CPU kernel (mm / addmm per step) instead of the fused
    ``aten.mkldnn_rnn_layer``, which FlopCounterMode does not count and whose saved workspace is opaque."""
    return torch.backends.mkldnn.flags(enabled=False)


# ---------------------------------------------------------------------------------------------------
# the analytic model

@pytest.mark.parametrize("name", [n for n in list_models() if n.split("-")[0] in CELLS])
def test_analytic_params_equal_numel(name):
    fam, cfg = resolve(name)
    model = create_model(name, device="meta")
    assert count_params(fam.name, cfg) == sum(p.numel() for p in model.parameters())
    names = {n for r in rows_for(fam.name, cfg) for n, _ in r.weights}
    assert names == {n for n, _ in model.named_parameters()}  # nn.LSTM's weight_ih_l0 ... exactly


@pytest.mark.parametrize("cell", CELLS)
def test_shakespeare_preset_matches_the_main_job_gpt_and_the_recipe(cell):
    root = Path(__file__).parents[1] / "recipes"
    main, ours = load_toml(root / "shakespeare.toml"), load_toml(root / f"shakespeare-{cell}.toml")
    assert ours["data"] == main["data"] and ours["train"]["max_time"] == main["train"]["max_time"]
    vocab = {"vocab_size": main["data"]["vocab_size"]}
    gpt = recipe_from_tree(main).model_config(vocab)
    cfg = recipe_from_tree(ours).model_config(vocab)
    assert cfg == resolve(f"{cell}-shakespeare")[1]
    n_gpt, n = count_params("gpt", gpt), count_params(cell, cfg)
    assert n_gpt == 918_656 and abs(n / n_gpt - 1) < 0.1


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B, T", [(1, 5), (3, 17)])
def test_forward_flops_match_flop_counter(cell, B, T):
    """2 G d^2 multiply-adds per token per layer (G = 4 LSTM gates, 3 GRU) + the lm_head, exactly as
    FlopCounterMode counts PyTorch's native kernels (the LSTM with oneDNN off, see :func:`no_onednn`)."""
    model = tiny(cell)
    _, cfg = resolve(cell, TINY)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with no_onednn():
        measured = _measured_forward_flops(cell, model, x)
    predicted = forward_flops(cell, cfg, T)["total"] * B * T
    assert predicted == pytest.approx(measured, rel=0.01)
    D, V, G, L = 11, 53, {"lstm": 4, "gru": 3}[cell], 3
    assert predicted == 2 * B * T * (L * 2 * G * D * D + D * V)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built")
def test_fused_cpu_lstm_is_invisible_to_the_flop_counter():
    """Why the FLOP test turns oneDNN off: its fused LSTM counts 0; only the lm_head is seen."""
    model = tiny("lstm")
    x = torch.randint(0, 53, (2, 9))
    assert _measured_forward_flops("lstm", model, x) == 2 * 2 * 9 * 11 * 53


@pytest.mark.parametrize("cell", CELLS)
def test_activation_count_matches_saved_tensors(cell):
    """8 d floats per token per layer, what the native kernel saves (the LSTM with oneDNN off; the fused
    kernels keep an opaque workspace instead, not modelled, see components_rnn)."""
    model = tiny(cell).train()
    _, cfg = resolve(cell, TINY)
    B, T = 3, 19
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with no_onednn():
        measured = _saved_activation_bytes(cell, model, x)
    predicted = 4 * sum(row_activation_elements(r, B, T) - B * T * r.act_held for r in rows_for(cell, cfg))
    assert predicted == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("cell, n_state", [("lstm", 2), ("gru", 1)])
def test_state_replaces_the_kv_cache_in_inspect(cell, n_state):
    from weightsmith.analysis import format_report

    r = inspect_model(f"{cell}-shakespeare", batch_size=4, seq_len=64)
    D = r["config"]["d_model"]
    assert r["state_bytes_per_seq"] == n_state * 2 * D * 4 and r["state_bytes"] == 4 * r["state_bytes_per_seq"]
    assert r["kv_cache_bytes"] == 0 and r["flops_fwd_attention_per_token"] == 0
    assert "state 3.25 KiB/sequence" in format_report(inspect_model("lstm-shakespeare"))  # 2 x 2 x 208 x 4 B
    _, gpt = resolve("gpt-tiny")
    assert memory_estimate("gpt", gpt, batch_size=2, seq_len=8)["state"] == 0


# ---------------------------------------------------------------------------------------------------
# the model against references

def naive_logits(model, idx):
    """Reference: nn.LSTMCell / nn.GRUCell per layer with the model's weights, one token at a time."""
    cfg, rnn = model.config, model.rnn
    B, T = idx.shape
    cell_cls = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}[cfg.cell]
    cells = []
    for k in range(cfg.n_layers):
        c = cell_cls(cfg.d_model, cfg.d_model)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(c, name).data.copy_(getattr(rnn, f"{name}_l{k}"))
        cells.append(c)
    h = [torch.zeros(B, cfg.d_model) for _ in cells]
    c_state = [torch.zeros(B, cfg.d_model) for _ in cells]
    outs = []
    for t in range(T):
        x = model.tok_emb(idx[:, t])  # (B, D)
        for k, cell in enumerate(cells):
            if cfg.cell == "lstm":
                h[k], c_state[k] = cell(x, (h[k], c_state[k]))
            else:
                h[k] = cell(x, h[k])
            x = h[k]
        outs.append(x)
    return model.lm_head(model.final_norm(torch.stack(outs, 1)))  # (B, T, V)


@pytest.mark.parametrize("cell", CELLS)
def test_logits_match_a_naive_cell_loop(cell):
    model = tiny(cell, init_std=0.3)
    idx = torch.randint(0, 53, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), naive_logits(model, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_causality(cell):
    model = tiny(cell)
    idx = torch.randint(0, 53, (2, 12))
    changed = idx.clone()
    changed[:, 6] = (idx[:, 6] + 1) % 53
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-3


@pytest.mark.parametrize("cell", CELLS)
def test_state_in_chunks_equals_one_full_forward(cell):
    """Feeding 20 tokens (> max_seq_len) as chunks of 5, 1, 8, 6 through one state = one forward."""
    model = tiny(cell)
    idx = torch.randint(0, 53, (3, 20))
    with torch.no_grad():
        full = model(idx)
        state, parts, t = model.new_cache(3), [], 0
        for n in (5, 1, 8, 6):
            parts.append(model(idx[:, t:t + n], cache=state, start=t))
            t += n
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        last = model(idx[:, -1:], cache=model.new_cache(3), last_only=True)
    assert last.shape == (3, 1, 53)
    assert state.h.shape == (3, 3, 11) and (state.c is None) == (cell == "gru")
    assert state.nbytes == (2 if cell == "lstm" else 1) * 3 * 3 * 11 * 4


@pytest.mark.parametrize("cell", CELLS)
def test_init(cell):
    torch.manual_seed(0)
    model = create_model(cell, vocab_size=300, d_model=64, n_layers=2)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.lm_head.weight is model.tok_emb.weight
    for name, p in model.rnn.named_parameters():
        if name.startswith("bias"):
            assert not p.any(), name
        else:
            assert p.abs().max() <= 1 / 8 and p.std().item() == pytest.approx(1 / 8 / 3 ** 0.5, rel=0.05)


@pytest.mark.parametrize("kw, field", [({"d_model": 0}, "model.d_model"), ({"n_layers": -1}, "model.n_layers"),
                                       ({"dropout": 1.0}, "model.dropout"), ({"cell": "gru"}, "model.cell")])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        resolve("lstm", kw)


# ---------------------------------------------------------------------------------------------------
# generation: no window


def naive_greedy(model, prompt, n):
    """Reference: n greedy tokens, each from a fresh full forward over *all* tokens so far (no window)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("cell", CELLS)
def test_generate_past_max_seq_len_equals_full_forwards(cell):
    model = tiny(cell)
    for prompt in ([3, 1, 4], list(range(1, 21))):  # max_seq_len is 8: the second prompt is longer
        out = generate(model, torch.tensor([prompt]), 30, temperature=0.0)[0].tolist()
        assert out == naive_greedy(model, prompt, 30)
    assert torch.equal(generate(model, torch.tensor([[3, 1]]), 0), torch.tensor([[3, 1]]))


PROMPTS = [[5], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [4, 4, 4], [11] * 12, list(range(30, 50))]  # two of length 3


@pytest.mark.parametrize("cell", CELLS)
def test_batched_greedy_equals_one_at_a_time(cell):
    model = tiny(cell)
    out = generate_batch(model, PROMPTS, 25, temperature=0.0)
    for p, o in zip(PROMPTS, out):
        assert o == generate(model, torch.tensor([p]), 25, temperature=0.0)[0].tolist()
    assert generate_batch(model, PROMPTS, 0) == PROMPTS


def test_text_prompts_longer_than_max_seq_len_are_read_whole():
    from weightsmith.data.tokenizers import ByteTokenizer

    model, tok = tiny("gru", vocab_size=256), ByteTokenizer()
    prompt = "a prompt far longer than the eight-token training window"
    text = generate_text(model, tok, prompt, 10, temperature=0.0)
    ids = tok.encode(prompt)
    assert text == tok.decode(generate(model, torch.tensor([ids]), 10, temperature=0.0)[0].tolist())
    assert generate_texts(model, tok, [prompt, "ab"], 10, temperature=0.0)[0] == text


def test_speculative_decoding_refuses_recurrent_models():
    model = tiny("lstm")
    with pytest.raises(ValueError, match="recurrent"):
        speculative_generate(model, model, torch.tensor([[1, 2]]), 5)


# ---------------------------------------------------------------------------------------------------
# training through the generic trainer


@pytest.mark.parametrize("cell", CELLS)
def test_trains_through_the_generic_trainer(tmp_path, tiny_corpus, cache_dir, cell):
    steps = 30
    tree = {"data": {"corpus": str(tiny_corpus), "tokenizer": "char"},
            "model": {"family": cell, "d_model": 48, "n_layers": 2, "max_seq_len": 32},
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
