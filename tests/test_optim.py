"""The optimizer registry: Muon's parameter split and its step against torch.optim.Muon by hand, Lion
against a naive re-derivation of its update rule, per-group learning rates, recipe checks."""

import json
import typing

import pytest
import torch
from test_trainer import _recipe

from weightsmith.errors import ConfigError
from weightsmith.models.gpt import GPT, GPTConfig
from weightsmith.registry import get_family, model_from_config
from weightsmith.train.checkpoint import list_checkpoints, load_train_state
from weightsmith.train.config import TrainConfig
from weightsmith.train.optim import Lion, build_optimizer, list_optimizers, lr_at, muon_split, set_lr


def _gpt(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, d_model=12, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=8, d_ff=20,
               tie_embeddings=False)
    return GPT(GPTConfig(**{**cfg, **kw}))


def _group_names(opt):
    return {id(p): g["name"] for g in opt.param_groups for p in g["params"]}


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = _gpt()
    muon = {n for n, _ in muon_split(model)}
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2)
              for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate", "mlp.up", "mlp.down")}
    assert muon == hidden
    groups = _group_names(build_optimizer("muon", model, TrainConfig(optimizer="muon")))
    names = dict(model.named_parameters())
    assert {n for n, p in names.items() if groups[id(p)] == "muon"} == hidden
    assert groups[id(names["tok_emb.weight"])] == "no_decay"       # embedding: AdamW, not decayed
    assert groups[id(names["lm_head.weight"])] == "decay"          # output head: AdamW, decayed
    assert groups[id(names["final_norm.weight"])] == "no_decay"    # norm gain
    assert len(groups) == len(names)                               # every parameter in exactly one group
    tied = _gpt(tie_embeddings=True)
    assert "tok_emb.weight" not in {n for n, _ in muon_split(tied)}  # the tied head is the embedding


@pytest.mark.parametrize("family, muon_has, adamw_has", [
    ("vit", "blocks.0.attn.q_proj.weight", ["pos_emb", "cls_token", "patch_emb.weight", "head.weight"]),
    ("resnet", None, ["stem.conv.weight", "stages.0.blocks.0.conv1.weight", "head.weight"]),
    ("lstm", "rnn.weight_hh_l0", ["tok_emb.weight", "rnn.bias_ih_l0"]),
    ("mamba2", "blocks.0.mixer.in_proj.weight", ["blocks.0.mixer.conv1d.weight", "blocks.0.mixer.A_log"]),
])
def test_muon_split_rules_for_other_families(family, muon_has, adamw_has):
    model = model_from_config(family, get_family(family).config_cls(), device="meta")
    muon = {n for n, _ in muon_split(model)}
    if muon_has:
        assert muon_has in muon
    assert not muon & set(adamw_has)
    shapes = dict(model.named_parameters())
    assert all(shapes[n].dim() == 2 for n in muon)  # conv filters (3-D, 4-D) never reach Muon
    if family == "resnet":  # all weights are convolutions but the head: nothing for Muon
        assert muon == set()
        opt = build_optimizer("muon", model, TrainConfig(optimizer="muon"))
        assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]


def test_muon_step_equals_torch_muon_applied_by_hand():
    tc = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.05, weight_decay=0.1, muon_weight_decay=0.01,
                     muon_momentum=0.9, muon_ns_steps=4)
    a, b = _gpt(), _gpt()
    b.load_state_dict(a.state_dict())
    ours = build_optimizer("muon", a, tc)
    hidden = [p for n, p in b.named_parameters() if n.startswith("blocks.") and n.endswith("_proj.weight")
              or n.split(".")[-2] in ("gate", "up", "down")]
    decay = [b.lm_head.weight]
    no_decay = [b.tok_emb.weight] + [p for n, p in b.named_parameters() if "norm" in n]
    assert len(hidden) + len(decay) + len(no_decay) == len(list(b.parameters()))
    muon = torch.optim.Muon(hidden, lr=0.05, weight_decay=0.01, momentum=0.9, nesterov=True, ns_steps=4)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    idx = torch.randint(11, (3, 8), generator=torch.Generator().manual_seed(1))
    for step, sched in enumerate((1.0, 0.4)):  # two steps (the second uses momentum), two schedule values
        set_lr(ours, tc.lr * sched)
        for g in muon.param_groups:
            g["lr"] = 0.05 * sched
        for g in adamw.param_groups:
            g["lr"] = 3e-3 * sched
        for model in (a, b):
            model(idx).logsumexp(-1).square().mean().backward()
        ours.step()
        ours.zero_grad()
        muon.step()
        adamw.step()
        muon.zero_grad()
        adamw.zero_grad()
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), (step, name)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), _gpt().parameters()))  # it moved


def _naive_lion(theta, grads, lr, beta1, beta2, wd):
    """Lion, Chen et al. 2023 Algorithm 2, one coordinate at a time in Python floats."""
    m = [0.0] * len(theta)
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    for g in grads:
        for i in range(len(theta)):
            c = beta1 * m[i] + (1 - beta1) * g[i]
            theta[i] = theta[i] - lr * (sign(c) + wd * theta[i])
            m[i] = beta2 * m[i] + (1 - beta2) * g[i]
    return theta


def test_lion_matches_a_naive_re_derivation_of_its_update():
    torch.manual_seed(0)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = Lion([w], lr=0.03, betas=(0.8, 0.95), weight_decay=0.2)
    theta, grads = w.detach().tolist(), []
    for _ in range(6):  # the gradient depends on w: the trajectories must agree step by step
        loss = ((x @ w - y) ** 2).mean()
        (g,) = torch.autograd.grad(loss, w)
        grads.append(g.tolist())
        w.grad = g
        opt.step()
        # naive: replay every gradient seen so far from the start
        expected = _naive_lion(list(theta), grads, 0.03, 0.8, 0.95, 0.2)
        torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert set(opt.state[w]) == {"exp_avg"}
    with pytest.raises(ValueError, match="betas"):
        Lion([w], betas=(1.0, 0.9))


def test_every_group_follows_the_schedule_from_its_own_base_lr(tmp_path, tiny_corpus, cache_dir):
    from weightsmith.train.loop import train

    run = train(_recipe(tmp_path, tiny_corpus, steps=7, ckpt_every=1000),
                ["--train.optimizer=muon", "--train.lr=2e-3", "--train.muon_lr=0.03", "--train.min_lr=1e-4",
                 "--train.warmup_steps=2"], out=tmp_path / "run", log=lambda *a: None)
    state = load_train_state(list_checkpoints(run)[-1])["optimizer"]
    groups = [g for part in state["optimizers"] for g in part["param_groups"]]
    assert [g["name"] for g in groups] == ["muon", "decay", "no_decay"]
    last = lr_at(6, lr=2e-3, min_lr=1e-4, warmup_steps=2, total_steps=7)  # the rate of step 7 (0-based 6)
    assert groups[0]["lr"] == pytest.approx(lr_at(6, lr=0.03, min_lr=1e-4 * 0.03 / 2e-3, warmup_steps=2,
                                                  total_steps=7), rel=1e-12)
    assert groups[1]["lr"] == groups[2]["lr"] == last
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "loss" in r][-1] == last


def test_recipe_names_the_optimizer_and_bad_values_are_one_line_errors():
    assert set(typing.get_args(typing.get_type_hints(TrainConfig)["optimizer"])) == set(list_optimizers())
    from weightsmith.config import from_dict

    with pytest.raises(ConfigError, match=r"train.optimizer = 'sgd' is not allowed; choose one of \['adamw'"):
        from_dict(TrainConfig, {"optimizer": "sgd"}, "train")
    with pytest.raises(ConfigError, match="train.optimizer"):
        TrainConfig(optimizer="sgd")
    for field, value in (("muon_momentum", 1.0), ("muon_lr", 0.0), ("muon_ns_steps", 0), ("lion_beta2", 1.5),
                         ("spike_zscore", -1.0), ("spike_window", 1), ("rewind_events", 0), ("max_rewinds", -1),
                         ("muon_adjust_lr", "x")):
        with pytest.raises(ConfigError, match=f"train.{field}"):
            TrainConfig(**{field: value})


def test_resuming_with_another_optimizer_is_refused(tmp_path, tiny_corpus, cache_dir):
    from weightsmith.errors import CheckpointError
    from weightsmith.train.loop import train

    recipe = _recipe(tmp_path, tiny_corpus, steps=3, ckpt_every=1000)
    train(recipe, [], out=tmp_path / "run", log=lambda *a: None)
    with pytest.raises(CheckpointError, match="holds adamw state but train.optimizer='lion'"):
        train(recipe, ["--train.optimizer=lion", "--train.max_steps=5"], out=tmp_path / "run", resume=True,
              log=lambda *a: None)


def test_muon_main_job_recipe_is_the_main_job_with_only_the_optimizer_and_budget_changed():
    from pathlib import Path

    from weightsmith.config import load_toml
    from weightsmith.recipe import recipe_from_tree

    root = Path(__file__).parents[1] / "recipes"
    main, muon = load_toml(root / "shakespeare.toml"), load_toml(root / "shakespeare-muon.toml")
    assert muon["data"] == main["data"] and muon["model"] == main["model"] and muon["sample"] == main["sample"]
    changed = {k for k in main["train"].keys() | muon["train"].keys() if main["train"].get(k) != muon["train"].get(k)}
    assert changed == {"optimizer", "muon_lr", "lr", "max_steps", "max_time"}
    tc = recipe_from_tree(muon).train
    assert (tc.optimizer, tc.muon_lr, tc.lr, tc.max_time) == ("muon", 0.02, 4e-3, 270)
