"""Schedules, optimizer groups, config parsing and overrides, atomic checkpoints."""

import math

import pytest
import torch

from weightsmith.config import apply_overrides, from_dict, parse_override
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.models.gpt import GPT, GPTConfig
from weightsmith.train.checkpoint import latest_good_checkpoint, list_checkpoints, load_weights, save_checkpoint
from weightsmith.train.config import TrainConfig
from weightsmith.train.optim import lr_at, param_groups


def test_cosine_schedule_shape():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_schedule_is_flat_then_linear():
    kw = dict(lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, **kw) == 1.0 and lr_at(80, **kw) == 1.0
    assert lr_at(90, **kw) == pytest.approx(0.5)
    assert lr_at(100, **kw) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_biases_embeddings():
    model = GPT(GPTConfig(vocab_size=11, d_model=12, n_layers=1, n_heads=2, bias=True, norm="layernorm",
                          mlp="gelu", pos="learned", tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.tok_emb.weight) not in decay_ids and id(model.pos_emb.weight) not in decay_ids
    assert id(model.blocks[0].attn.q_proj.weight) in decay_ids
    assert all(p.dim() == 1 for p in no_decay["params"] if p is not model.tok_emb.weight
               and p is not model.pos_emb.weight)
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # tied weight counted once


def test_overrides_parse_toml_values():
    assert parse_override("--train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("--model.bias=true") == (["model", "bias"], True)
    assert parse_override("--data.corpus=/tmp/x.txt") == (["data", "corpus"], "/tmp/x.txt")
    assert apply_overrides({"train": {"lr": 1.0}}, ["--train.lr=2", "--model.n_layers=3"]) == \
        {"train": {"lr": 2}, "model": {"n_layers": 3}}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("--lr=3")


def test_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match="did you mean max_steps"):
        from_dict(TrainConfig, {"max_step": 3}, "train")
    with pytest.raises(ConfigError, match="train.batch_size must be an integer"):
        from_dict(TrainConfig, {"batch_size": "big"}, "train")
    with pytest.raises(ConfigError, match="choose one of"):
        from_dict(TrainConfig, {"schedule": "linear"}, "train")
    assert from_dict(TrainConfig, {"lr": 1}, "train").lr == 1.0


def test_checkpoints_are_atomic_and_verified(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=13, d_model=12, n_layers=1, n_heads=2))
    save_checkpoint(tmp_path, 1, model, {"step": 1})
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    save_checkpoint(tmp_path, 2, model, {"step": 2})
    (tmp_path / "checkpoints" / ".tmp-halfwritten").mkdir()  # what a killed writer leaves behind
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000002"]
    w = tmp_path / "checkpoints" / "step_000002" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-8])
    warnings = []
    assert latest_good_checkpoint(tmp_path, log=warnings.append).name == "step_000001"
    assert "corrupt or truncated" in warnings[0]
    fresh = GPT(GPTConfig(vocab_size=13, d_model=12, n_layers=1, n_heads=2))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(fresh, tmp_path / "checkpoints" / "step_000002")
    load_weights(fresh, tmp_path / "checkpoints" / "step_000001")
    diff = (fresh.tok_emb.weight - model.tok_emb.weight).detach()
    assert math.isclose(float(diff.mean()), -1.0, rel_tol=1e-5)
    assert fresh.lm_head.weight is fresh.tok_emb.weight  # tying survives the round trip


def test_keep_last_checkpoints(tmp_path):
    model = GPT(GPTConfig(vocab_size=13, d_model=12, n_layers=1, n_heads=2))
    for s in range(1, 5):
        save_checkpoint(tmp_path, s, model, None, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_moe_recipe_trains_with_load_balancing_loss(tmp_path, tiny_corpus, cache_dir):
    from safetensors.torch import load_file

    from weightsmith.recipe import recipe_from_tree
    from weightsmith.train.loop import run_training

    def run(coef, name):
        tree = {"data": {"corpus": str(tiny_corpus), "tokenizer": "char"},
                "model": {"family": "gpt", "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 24,
                          "n_experts": 4, "n_experts_per_token": 2, "max_seq_len": 16},
                "train": {"batch_size": 2, "max_steps": 4, "warmup_steps": 1, "eval_tokens": 64,
                          "aux_loss_coef": coef},
                "sample": {"max_new_tokens": 2}}
        out = run_training(recipe_from_tree(tree), tmp_path / name, log=lambda *a: None)
        return load_file(next((out / "checkpoints").glob("step_*")) / "model.safetensors")

    with_aux, without = run(1.0, "aux"), run(0.0, "noaux")
    router = [k for k in with_aux if "router" in k]
    assert router, "MoE router weights missing"
    # the auxiliary loss only reaches the router through its gradient: changing its weight changes the router
    assert not torch.equal(with_aux[router[0]], without[router[0]])


def test_activation_checkpointing_trains_to_the_same_losses(tmp_path, tiny_corpus, cache_dir):
    import json

    from weightsmith.recipe import recipe_from_tree
    from weightsmith.train.loop import run_training

    def losses(flag, name):
        tree = {"data": {"corpus": str(tiny_corpus), "tokenizer": "char"},
                "model": {"family": "gpt", "d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 16},
                "train": {"batch_size": 2, "max_steps": 6, "warmup_steps": 1, "eval_tokens": 64, "log_every": 1,
                          "activation_checkpointing": flag},
                "sample": {"max_new_tokens": 2}}
        out = run_training(recipe_from_tree(tree), tmp_path / name, log=lambda *a: None)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    plain, ckpt = losses(False, "plain"), losses(True, "ckpt")
    assert len(plain) == 6
    assert ckpt == pytest.approx(plain, rel=1e-6)
