"""The text pretraining tasks beside causal LM: BERT's masked LM (bert-mlm) and T5's span corruption (t5).

Corruption statistics and invariants, the loss reading only what it should, the bert-mlm analytic model
against numel / FlopCounterMode / saved tensors, parity with transformers.BertForMaskedLM, and short
runs through the generic trainer: the loss falls, eval.json has its fields, and a resumed run is
bit-identical to an uninterrupted one.
"""

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_analysis import _measured_forward_flops, _saved_activation_bytes

from weightsmith.analysis import count_params, forward_flops
from weightsmith.analysis.components import family_of, rows_for
from weightsmith.analysis.memory import row_activation_elements
from weightsmith.config import load_toml
from weightsmith.errors import ConfigError
from weightsmith.recipe import recipe_from_tree
from weightsmith.registry import create_model, resolve
from weightsmith.tasks.masked_lm import IGNORE, MaskedLM, mask_tokens, n_selected
from weightsmith.tasks.span_corruption import (
    N_SENTINELS,
    SpanCorruption,
    corrupt_spans,
    reconstruct,
    span_counts,
)
from weightsmith.train.loop import run_training

# ---------------------------------------------------------------------------------------------------
# masked LM: corruption and loss


def test_masking_selects_15_percent_and_splits_80_10_10():
    n_real, mask_id, B, T = 97, 97, 600, 53
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(n_real, (B, T), generator=g)
    batch = mask_tokens(tokens, mask_id=mask_id, n_real=n_real, generator=g)
    selected = batch.targets != IGNORE
    assert (selected.sum(1) == n_selected(T, 0.15)).all() and n_selected(T, 0.15) == 8  # round(7.95)
    assert selected.float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert (batch.targets[selected] == tokens[selected]).all()
    assert (batch.inputs[~selected] == tokens[~selected]).all()  # unselected positions are untouched
    x, orig = batch.inputs[selected], tokens[selected]
    n = x.numel()
    masked = (x == mask_id).sum().item() / n
    kept = (x == orig).sum().item() / n
    changed = ((x != mask_id) & (x != orig)).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / n_real, abs=0.015)  # a random draw can hit the original token
    assert changed == pytest.approx(0.1 - 0.1 / n_real, abs=0.015)
    assert x.max() <= mask_id and (x[x != mask_id] < n_real).all()  # random replacements are real tokens
    # the positions differ from window to window (a permutation per window, not one shared pattern)
    assert len({tuple(row.nonzero().flatten().tolist()) for row in selected}) > B - 5


def test_masking_is_a_function_of_the_generator_state():
    tokens = torch.randint(50, (4, 31), generator=torch.Generator().manual_seed(1))
    a = mask_tokens(tokens, mask_id=50, n_real=50, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(tokens, mask_id=50, n_real=50, generator=torch.Generator().manual_seed(7))
    c = mask_tokens(tokens, mask_id=50, n_real=50, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.targets, c.targets)


def test_masked_loss_reads_only_the_selected_positions():
    V = 23
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(V - 1, (3, 41), generator=g)
    batch = mask_tokens(tokens, mask_id=V - 1, n_real=V - 1, generator=g)
    logits = torch.randn(3, 41, V, generator=g)
    task = MaskedLM.for_contract_tests()
    loss, parts = task.loss(lambda idx: logits, batch)
    selected = batch.targets != IGNORE
    noisy = logits + 10 * torch.randn(logits.shape, generator=g) * (~selected)[..., None]
    loss_unselected_changed, _ = task.loss(lambda idx: noisy, batch)
    assert loss_unselected_changed.item() == loss.item()
    ref = torch.nn.functional.cross_entropy(logits[selected], tokens[selected])
    torch.testing.assert_close(loss, ref)
    assert parts["masked_acc"] == pytest.approx((logits[selected].argmax(-1) == tokens[selected]).float().mean().item())
    poked = logits.clone()
    poked[selected] += 10 * torch.randn(poked[selected].shape, generator=g)
    assert task.loss(lambda idx: poked, batch)[0].item() != loss.item()


# ---------------------------------------------------------------------------------------------------
# span corruption


def test_span_corruption_with_a_tokenizers_own_sentinels():
    """T5's <extra_id_i> count down from the top of its vocabulary: with that id table the batch is the
    same corruption (same generator draws), every sentinel mapped through the table, and it reconstructs."""
    from weightsmith.tasks.span_corruption import N_SENTINELS

    tokens = torch.randint(100, (8, 64), generator=torch.Generator().manual_seed(0))
    table = 299 - torch.arange(N_SENTINELS)  # <extra_id_0> = 299, <extra_id_1> = 298, ...
    a = corrupt_spans(tokens, sentinel_base=300, start_id=0, generator=torch.Generator().manual_seed(1))
    b = corrupt_spans(tokens, sentinel_ids=table, start_id=0, generator=torch.Generator().manual_seed(1))
    for x, y in ((a.src, b.src), (a.tgt_out, b.tgt_out), (a.tgt_in[:, 1:], b.tgt_in[:, 1:])):
        torch.testing.assert_close(torch.where(x >= 300, table[(x - 300).clamp(min=0)], x), y, rtol=0, atol=0)
    for i in range(8):
        assert reconstruct(b.src[i], b.tgt_out[i], sentinel_ids=table) == tokens[i].tolist()


@pytest.mark.parametrize("L", [128, 64, 37, 11, 512])
def test_span_corruption_counts_reconstruction_and_sentinel_order(L):
    base, start, B = 200, 199, 40
    g = torch.Generator().manual_seed(L)
    tokens = torch.randint(150, (B, L), generator=g)
    batch = corrupt_spans(tokens, sentinel_base=base, start_id=start, generator=g)
    n_noise, k = span_counts(L, 0.15, 3.0)
    assert n_noise == max(1, round(0.15 * L)) and k == max(1, round(n_noise / 3))
    assert batch.src.shape == (B, L - n_noise + k) and batch.tgt_out.shape == (B, n_noise + k + 1)
    assert torch.equal(batch.tgt_in[:, 1:], batch.tgt_out[:, :-1]) and (batch.tgt_in[:, 0] == start).all()
    lengths = []
    for i in range(B):
        src, tgt = batch.src[i], batch.tgt_out[i]
        assert reconstruct(src, tgt, base) == tokens[i].tolist()  # exact, token for token
        assert src[src >= base].tolist() == list(range(base, base + k))  # one sentinel per span, in order
        assert tgt[tgt >= base].tolist() == list(range(base, base + k + 1))  # ... plus the closing one
        assert tgt[0] == base and tgt[-1] == base + k and src[-1] == base + k - 1  # T5: text first, noise last
        assert (tgt < base).sum() == n_noise  # the noise fraction is exact
        cuts = (tgt >= base).nonzero().flatten()
        lengths += cuts.diff().sub(1).tolist()
    assert min(lengths) >= 1 and sum(lengths) / len(lengths) == pytest.approx(n_noise / k)
    if L >= 64:  # span lengths and placement are random
        assert len({tuple(batch.tgt_out[i].tolist()) for i in range(B)}) == B
        assert len(set(lengths)) > 2


def test_span_counts_match_t5_for_a_512_window():
    """T5's random_spans_noise_mask on 512 tokens: 77 noise tokens (15%) in 26 spans (mean 3)."""
    assert span_counts(512, 0.15, 3.0) == (77, 26)
    assert span_counts(2, 0.15, 3.0) == (1, 1)
    with pytest.raises(ConfigError):
        span_counts(1, 0.15, 3.0)


def test_span_loss_is_the_mean_over_target_tokens():
    g = torch.Generator().manual_seed(0)
    batch = corrupt_spans(torch.randint(30, (2, 40), generator=g), sentinel_base=31, start_id=30, generator=g)
    V = 31 + N_SENTINELS
    logits = torch.randn(2, batch.tgt_out.shape[1], V, generator=g)
    seen = {}

    def model(src, tgt_in):
        seen["src"], seen["tgt_in"] = src, tgt_in
        return logits

    loss, parts = SpanCorruption.for_contract_tests().loss(model, batch)
    assert seen["src"] is batch.src and seen["tgt_in"] is batch.tgt_in
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), batch.tgt_out.reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert 0.0 <= parts["denoise_acc"] <= 1.0


def test_span_check_model_refuses_windows_with_more_spans_than_sentinels():
    from weightsmith.train.config import TrainConfig

    task = SpanCorruption(SpanCorruption.config_cls(), SpanCorruption.data_config_cls(), TrainConfig(seq_len=2048))
    task.data = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=40))
    _, cfg = resolve("t5", dict(vocab_size=40 + 1 + N_SENTINELS, max_seq_len=2048))
    with pytest.raises(ConfigError, match="sentinels"):
        task.check_model(cfg)
    task.train_cfg = TrainConfig(seq_len=1024)
    task.check_model(cfg)


# ---------------------------------------------------------------------------------------------------
# bert-mlm: model and analytic rows


def test_bert_mlm_base_parameter_count_is_hf_bert_for_masked_lm():
    """bert-base-uncased as transformers.BertForMaskedLM (no pooler, tied decoder): 109,514,298."""
    fam, cfg = resolve("bert-mlm-base")
    model = create_model("bert-mlm-base", device="meta")
    assert sum(p.numel() for p in model.parameters()) == count_params(fam.name, cfg) == 109_514_298
    assert family_of(cfg) == "bert-mlm" and family_of(resolve("bert-base")[1]) == "bert"


def test_bert_mlm_state_dict_keys_and_tied_decoder():
    model = create_model("bert-mlm", vocab_size=29, d_model=12, n_layers=1, n_heads=3, max_seq_len=16)
    keys = set(model.state_dict())
    assert {"encoder.tok_emb.weight", "mlm_head.dense.weight", "mlm_head.norm.weight", "mlm_head.decoder.bias"} <= keys
    assert model.mlm_head.decoder.weight is model.encoder.tok_emb.weight
    assert not any(k.startswith("encoder.pooler") for k in keys)  # bert-mlm defaults to no pooler
    assert model(torch.randint(29, (2, 5))).shape == (2, 5, 29)


def test_bert_mlm_analytic_params_equal_numel_for_random_small_configs():
    rng = random.Random(1)
    for _ in range(25):
        heads = rng.choice([1, 2, 3])
        kw = dict(vocab_size=rng.randint(5, 70), d_model=heads * rng.choice([2, 4, 6]), n_layers=rng.randint(1, 3),
                  n_heads=heads, d_ff=rng.randint(3, 50), pos=rng.choice(["learned", "none"]),
                  n_token_types=rng.randint(0, 3), pooler=rng.random() < 0.5, bias=rng.random() < 0.5,
                  max_seq_len=rng.randint(4, 40))
        _, cfg = resolve("bert-mlm", kw)
        model = create_model("bert-mlm", device="meta", **kw)
        assert count_params("bert-mlm", cfg) == sum(p.numel() for p in model.parameters()), kw


MLM_TINY = dict(vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=64)


@pytest.mark.parametrize("pooler", [False, True])
@pytest.mark.parametrize("B, T", [(1, 5), (3, 17), (2, 48)])
def test_bert_mlm_forward_flops_match_flop_counter(B, T, pooler):
    torch.manual_seed(0)
    model = create_model("bert-mlm", **MLM_TINY, pooler=pooler).eval()
    _, cfg = resolve("bert-mlm", {**MLM_TINY, "pooler": pooler})
    x = torch.randint(0, 53, (B, T))
    measured = _measured_forward_flops("bert-mlm", model, x)
    assert forward_flops("bert-mlm", cfg, T)["total"] * B * T == pytest.approx(measured, rel=0.01)


def test_bert_mlm_activation_count_matches_saved_tensors():
    torch.manual_seed(0)
    model = create_model("bert-mlm", **MLM_TINY)
    _, cfg = resolve("bert-mlm", MLM_TINY)
    B, T = 3, 19
    x = torch.randint(0, 53, (B, T))
    measured = _saved_activation_bytes("bert-mlm", model, x)  # cross-entropy over every position
    predicted = 4 * sum(row_activation_elements(r, B, T) - B * T * r.act_held for r in rows_for("bert-mlm", cfg))
    assert predicted == pytest.approx(measured, rel=0.03)


@pytest.mark.parametrize("task_cls, family, kw", [
    (MaskedLM, "bert-mlm", MLM_TINY),
    (SpanCorruption, "t5", dict(vocab_size=53 + 1 + N_SENTINELS, d_model=40, n_layers=2, n_decoder_layers=3,
                                n_heads=4, d_head=7, d_ff=56, rel_buckets=8, rel_max_distance=16)),
])
def test_flops_per_unit_times_count_is_three_measured_forwards(task_cls, family, kw):
    """What MFU multiplies (analytic FLOPs per unit x units) against FlopCounterMode on a real batch."""
    from weightsmith.analysis.flops import flop_counter

    torch.manual_seed(0)
    model = create_model(family, **kw).eval()
    _, cfg = resolve(family, kw)
    task = task_cls.for_contract_tests()
    batch = task_cls.example_batch(cfg, 3, torch.Generator().manual_seed(0))
    args = (batch.src, batch.tgt_in) if family == "t5" else (batch.inputs,)
    with torch.no_grad(), flop_counter() as fc:
        model(*args)
    predicted = task.flops_per_unit(family, cfg) * task.count(batch)
    assert predicted == pytest.approx(3 * fc.get_total_flops(), rel=0.01)


# ---------------------------------------------------------------------------------------------------
# parity with transformers.BertForMaskedLM


def _hf_mlm(tr, **kw):
    torch.manual_seed(0)
    hf = tr.BertForMaskedLM(tr.BertConfig(vocab_size=53, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=56, max_position_embeddings=32, type_vocab_size=3,
                                          **kw)).eval()
    with torch.no_grad():  # HF initializes LayerNorms to 1/0 and the output bias to 0; make every weight count
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_bert_mlm_logit_parity_with_transformers(act):
    tr = pytest.importorskip("transformers")
    from weightsmith.registry import model_from_config
    from weightsmith.ship.hf_convert import hf_to_ours

    hf = _hf_mlm(tr, hidden_act=act)
    family, cfg, sd = hf_to_ours(hf.config.to_dict(), hf.state_dict())
    assert family == "bert-mlm" and not cfg.pooler and cfg.gelu == ("erf" if act == "gelu" else "tanh")
    ours = model_from_config(family, cfg)
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    g = torch.Generator().manual_seed(1)
    x, types = torch.randint(0, 53, (2, 9), generator=g), torch.randint(0, 3, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        logits = ours(x, token_types=types, padding_mask=mask)
        ref = hf(x, token_type_ids=types, attention_mask=mask.long()).logits
    torch.testing.assert_close(logits[mask], ref[mask])  # padded positions are don't-care


def test_bert_mlm_hf_checkpoint_directory_keeps_the_decoder_tied(tmp_path):
    tr = pytest.importorskip("transformers")
    from weightsmith.ship.hf_convert import load_hf_checkpoint

    hf = _hf_mlm(tr)
    hf.save_pretrained(tmp_path)
    family, _, ours = load_hf_checkpoint(tmp_path)
    assert family == "bert-mlm" and ours.mlm_head.decoder.weight is ours.encoder.tok_emb.weight
    x = torch.randint(0, 53, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), hf(x).logits)


# ---------------------------------------------------------------------------------------------------
# recipes and training through the generic trainer


@pytest.mark.parametrize("name, vocab", [("bert-mlm", 1025), ("t5-span", 1024 + 1 + N_SENTINELS)])
def test_recipes_resolve(name, vocab):
    recipe = recipe_from_tree(load_toml(Path(__file__).parents[1] / "recipes" / f"{name}.toml"), name=name)
    cfg = recipe.model_config(recipe.task_cls.placeholder_fields(recipe.data))
    assert cfg.vocab_size == vocab and recipe.train.max_time == 180
    assert recipe.data.corpus == "shakespeare" and recipe.data.tokenizer == "bpe"


TREES = {
    "masked-lm": {"model": dict(family="bert-mlm", d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
                                n_token_types=0, dropout=0.1),
                  "fields": ("masked_loss", "masked_ppl", "masked_acc", "unigram_loss", "unigram_acc")},
    "span-corruption": {"model": dict(family="t5", d_model=32, n_layers=2, n_heads=4, d_ff=64, rel_buckets=8,
                                      rel_max_distance=32, max_seq_len=32, dropout=0.1),
                        "fields": ("denoise_loss", "denoise_ppl", "denoise_acc", "span_acc")},
}


def _tree(corpus, task, steps):
    return {"data": {"corpus": str(corpus), "tokenizer": "char"}, "model": dict(TREES[task]["model"]),
            "train": dict(batch_size=8, max_steps=steps, lr=3e-3, warmup_steps=5, log_every=1, eval_every=20,
                          ckpt_every=steps // 2, keep_checkpoints=3, eval_tokens=600, eval_batch_size=8)}


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("task", list(TREES))
def test_training_lowers_the_loss_writes_eval_and_resumes_exactly(tmp_path, tiny_corpus, cache_dir, task):
    steps = 40
    ref = tmp_path / "ref"
    run_training(recipe_from_tree(_tree(tiny_corpus, task, steps)), ref, log=lambda *a: None)
    losses = _losses(ref)
    assert sorted(losses) == list(range(1, steps + 1))
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(steps - 4, steps + 1)]
    assert sum(last) / 5 < sum(first) / 5 - 0.3, (first, last)
    ev = json.loads((ref / "eval.json").read_text())
    assert all(k in ev for k in TREES[task]["fields"])
    if task == "masked-lm":
        # 60 steps of a character MLM reach the unigram plateau, not beyond; the baseline itself must be
        # right: at most one (top) token's share, and better than uniform over the vocabulary
        assert 0 < ev["unigram_acc"] < 0.5 and ev["unigram_loss"] < first[0] - 0.3
        assert ev["masked_loss"] < first[0] - 0.3
        assert ev["masked_tokens"] == pytest.approx(0.15 * ev["val_tokens"], rel=0.1)
    rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss_partial" in r for r in rows) and all(
        "masked_acc" in r or "denoise_acc" in r for r in rows if "loss" in r)

    # a copy of the run as it was at the half-way checkpoint, resumed in a fresh process state
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    for ckpt in (run / "checkpoints").iterdir():
        if ckpt.name != f"step_{steps // 2:06d}":
            shutil.rmtree(ckpt)
    (run / "eval.json").unlink()
    torch.manual_seed(12345)  # whatever the global RNG holds now, resume must restore it
    run_training(recipe_from_tree(_tree(tiny_corpus, task, steps)), run, resume=True, log=lambda *a: None)
    assert _losses(run) == losses  # bit-identical at every step, before and after the resume point
    assert json.loads((run / "eval.json").read_text()) == ev
