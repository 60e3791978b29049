"""µP (weightsmith.train.mup): roles from shapes, Table 3's init and lr multipliers, identity at the base
width, the trainer's groups, the refusals, and the coordinate check's flat µP curves."""

import json

import pytest
import torch
from test_cli import one_line_error, run_cli
from test_trainer import _recipe

from weightsmith.errors import ConfigError
from weightsmith.models.gpt import GPT, GPTConfig
from weightsmith.train.checkpoint import list_checkpoints, load_train_state
from weightsmith.train.config import TrainConfig
from weightsmith.train.mup import apply_mup, apply_mup_init, coord_check, mup_lr_scales, mup_roles, width_config
from weightsmith.train.optim import build_optimizer, set_lr

QUIET = lambda *a: None  # noqa: E731
BASE = GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                 tie_embeddings=False)


def _model(width, seed=0):
    torch.manual_seed(seed)
    return GPT(width_config(BASE, width))


def test_width_config_keeps_d_head_and_scales_heads_and_d_ff():
    cfg = width_config(BASE, 128)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head) == (128, 16, 8, BASE.d_head)
    assert cfg.d_ff * BASE.d_model == BASE.d_ff * 128
    with pytest.raises(ConfigError, match="multiple of model.d_head=8"):
        width_config(BASE, 36)


def test_roles_follow_which_dimensions_grow():
    model = _model(128)
    roles = mup_roles(model, GPT(width_config(BASE, 32)))
    assert roles["tok_emb.weight"] == "input" and roles["lm_head.weight"] == "output"
    assert roles["final_norm.weight"] == roles["blocks.0.attn_norm.weight"] == "input"
    hidden = {n for n, r in roles.items() if r == "hidden"}
    assert hidden == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")}
    tied = dict(vocab_size=50, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, tie_embeddings=True)
    with pytest.raises(ConfigError, match="tie_embeddings = false"):
        mup_roles(GPT(GPTConfig(d_model=64, **{**tied, "n_heads": 8, "n_kv_heads": 4})),
                  GPT(GPTConfig(d_model=32, **tied)))


def test_init_and_lr_multipliers_are_table_3():
    width, m = 128, 4.0
    sp = _model(width, seed=1)
    mup = _model(width, seed=1)
    cfg = width_config(BASE, width)
    roles = apply_mup_init(mup, "gpt", cfg, 32)
    scales = mup_lr_scales(mup, "gpt", cfg, 32)
    spd, mud = dict(sp.named_parameters()), dict(mup.named_parameters())
    for name, role in roles.items():
        factor = {"input": 1.0, "hidden": m ** -0.5, "output": 1 / m}[role]
        torch.testing.assert_close(mud[name], spd[name] * factor, rtol=0, atol=0)
        assert scales[id(mud[name])] == (1.0 if role == "input" else 1 / m)
    opt = build_optimizer("adamw", mup, TrainConfig(lr=1e-2), scales)
    set_lr(opt, 1e-2)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"decay", "no_decay", "decay*0.25"}
    assert by_name["decay*0.25"]["lr"] == pytest.approx(2.5e-3) and by_name["no_decay"]["lr"] == 1e-2
    assert not by_name["decay"]["params"]  # every decayed matrix is hidden or the head here
    both = _model(width, seed=1)  # apply_mup: the same init and multipliers from one classing
    both_scales = apply_mup(both, "gpt", cfg, 32)
    for name, p in both.named_parameters():
        torch.testing.assert_close(p, mud[name], rtol=0, atol=0)
        assert both_scales[id(p)] == scales[id(mud[name])]
    assert {id(p) for p in by_name["decay*0.25"]["params"]} == {id(mud[n]) for n, r in roles.items() if r != "input"}


def test_at_the_base_width_mup_is_the_standard_parametrization():
    sp, mup = _model(32, seed=2), _model(32, seed=2)
    apply_mup_init(mup, "gpt", BASE, 32)
    for a, b in zip(sp.parameters(), mup.parameters(), strict=True):
        assert torch.equal(a, b)
    assert set(mup_lr_scales(mup, "gpt", BASE, 32).values()) == {1.0}


def test_trainer_applies_mup_and_base_width_training_equals_sp(tmp_path, tiny_corpus, cache_dir):
    from weightsmith.train.loop import train

    recipe = _recipe(tmp_path, tiny_corpus, steps=6, ckpt_every=1000)
    untied = ["--model.tie_embeddings=false"]
    sp = train(recipe, untied, out=tmp_path / "sp", log=QUIET)
    same = train(recipe, [*untied, "--train.mup_base_width=32"], out=tmp_path / "same", log=QUIET)
    half = train(recipe, [*untied, "--train.mup_base_width=16"], out=tmp_path / "half", log=QUIET)

    def rows(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]
    assert rows(sp) == rows(same)  # m = 1: the same init, rates and losses, bit for bit
    assert rows(half) != rows(sp)
    groups = load_train_state(list_checkpoints(half)[-1])["optimizer"]["param_groups"]
    assert {g["name"]: g["lr_scale"] for g in groups} == {"decay": 1.0, "no_decay": 1.0, "decay*0.5": 0.5}


def test_refusals_are_one_line(tmp_path, tiny_corpus, cache_dir):
    recipe = _recipe(tmp_path, tiny_corpus, steps=2)
    env = {"WEIGHTSMITH_CACHE": str(cache_dir)}
    one_line_error(run_cli("train", recipe, "--out", tmp_path / "a", "--train.mup_base_width=16", env=env),
                   "tie_embeddings = false")
    one_line_error(run_cli("train", recipe, "--out", tmp_path / "b", "--train.mup_base_width=16",
                           "--train.optimizer=muon", "--model.tie_embeddings=false", env=env), "'muon'")
    for bad in ("0", "-8"):
        with pytest.raises(ConfigError, match="train.mup_base_width must be a positive width"):
            TrainConfig(mup_base_width=int(bad))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_coord_check_mup_logits_stay_flat_while_sp_logits_grow(tmp_path, tiny_corpus, cache_dir):
    recipe = _recipe(tmp_path, tiny_corpus, steps=2)
    out = tmp_path / "cc"
    res = coord_check(recipe, out, widths=[32, 256], base_width=32, steps=4, seeds=2, log=QUIET,
                      overrides=["--model.tie_embeddings=false", "--train.lr=0.02", "--train.batch_size=8"])
    assert {p.name for p in out.iterdir()} >= {"coord.json", "coord.md", "coord.png"}
    assert json.loads((out / "coord.json").read_text()) == json.loads(json.dumps(res))
    modules = list(res["sp"])
    assert modules[0] == "tok_emb" and modules[-1] == "lm_head" and "blocks.1" in modules

    def ratio(param, module, step):
        by = res[param][module]
        return by["256"][step] / by["32"][step]
    # at init µP's logits shrink like width^-1/2 (readout std ~ 1/fan_in), SP's hidden activations match
    assert ratio("mup", "lm_head", 0) < 1.0 and 0.5 < ratio("mup", "blocks.1", 0) < 2.0
    # after three updates µP's coordinates are width-independent while SP's blow up
    for module in ("blocks.0", "blocks.1", "lm_head"):
        assert 0.5 < ratio("mup", module, 3) < 2.0
    assert ratio("sp", "lm_head", 3) > 2 * ratio("mup", "lm_head", 3)
    assert ratio("sp", "blocks.1", 3) > 10 * ratio("mup", "blocks.1", 3)
    with pytest.raises(ConfigError, match="not empty"):
        coord_check(recipe, out, widths=[32, 64], base_width=32, log=QUIET,
                    overrides=["--model.tie_embeddings=false"])
