"""Adapters (weightsmith.adapters): LoRA / DoRA layers, merge equality, peft parity both ways, the pass
in training, runs, inspect and export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from weightsmith.adapters import (
    adapter_modules,
    apply_adapters,
    load_peft,
    merge,
    merge_adapters,
    save_peft,
    target_linears,
    trainable_parameters,
    unmerge,
)
from weightsmith.errors import ConfigError
from weightsmith.models.layers.lora import DoRALinear, LoRALinear
from weightsmith.recipe import AdapterConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Nonzero B (and magnitudes off their initial norms), so an adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
            if isinstance(m, DoRALinear):
                m.magnitude.mul_(1 + 0.2 * torch.rand(m.magnitude.shape, generator=g))


# ------------------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_layer_starts_equal_to_base_and_merge_equals_unmerged(cls):
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=True)
    x = torch.randn(3, 2, 7)
    y0 = base(x)
    layer = cls(base, rank=3, alpha=6.0)
    torch.testing.assert_close(layer(x), y0, rtol=0, atol=1e-6)  # B = 0: the adapter adds nothing
    with torch.no_grad():
        layer.lora_B.normal_()
        if cls is DoRALinear:
            layer.magnitude.mul_(torch.linspace(0.5, 1.5, 5))
    y = layer(x)
    assert (y - y0).abs().max() > 1e-2
    w0 = base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-5)
    torch.testing.assert_close(nn.functional.linear(x, base.weight, base.bias), y, rtol=0, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-6)


def test_lora_matches_the_formula_and_dora_the_paper():
    torch.manual_seed(1)
    base = nn.Linear(11, 7, bias=False)
    x = torch.randn(5, 11)
    lora = LoRALinear(base, rank=2, alpha=5.0)
    bound = 1 / math.sqrt(11)  # kaiming_uniform(a=sqrt(5)) of a (2, 11) matrix, as nn.Linear / peft
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(lora.lora_B) == 0
    with torch.no_grad():
        lora.lora_B.normal_()
    W, A, B = base.weight, lora.lora_A, lora.lora_B
    torch.testing.assert_close(lora(x), x @ W.T + 2.5 * x @ A.T @ B.T)
    dora = DoRALinear(base, rank=2, alpha=5.0)
    torch.testing.assert_close(dora.magnitude, W.norm(dim=1))
    with torch.no_grad():
        dora.lora_B.normal_()
        dora.magnitude.uniform_(0.5, 2.0)
    V = W + 2.5 * dora.lora_B @ dora.lora_A
    W_dora = dora.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)  # Liu et al. eq. (5)
    torch.testing.assert_close(dora(x), x @ W_dora.T, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the pass


def _gpt(**kw):
    from weightsmith.registry import create_model

    torch.manual_seed(0)
    args = dict(vocab_size=37, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=16,
                tie_embeddings=False)
    return create_model("gpt", **{**args, **kw})


def test_pass_targets_freezes_and_counts_exactly():
    model = _gpt()
    idx = torch.randint(0, 37, (2, 9))
    ref = model(idx)
    apply_adapters(model, AdapterConfig(method="dora", rank=3, alpha=3.0, target_modules=["q_proj", "mlp.*"]))
    names = [n for n, _ in adapter_modules(model)]
    assert names == [f"blocks.{i}.{s}" for i in range(2) for s in ("attn.q_proj", "mlp.gate", "mlp.up", "mlp.down")]
    torch.testing.assert_close(model(idx), ref, rtol=0, atol=1e-5)
    # per block: q (16->16), gate/up (16->24), down (24->16): r (in + out) + out magnitudes
    expected = 2 * sum(3 * (i + o) + o for i, o in ((16, 16), (16, 24), (16, 24), (24, 16)))
    assert trainable_parameters(model) == expected
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude")
               for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="already has adapters"):
        apply_adapters(model, AdapterConfig())


def test_bad_patterns_and_tied_head_are_refused():
    with pytest.raises(ConfigError, match="'qkv' matches no linear"):
        target_linears(_gpt(), ["qkv"])
    with pytest.raises(ConfigError, match="lm_head, whose weight is tied"):
        target_linears(_gpt(tie_embeddings=True), ["lm_head"])
    for bad, field in (({"rank": 0}, "adapter.rank"), ({"alpha": 0.0}, "adapter.alpha"),
                       ({"dropout": 1.0}, "adapter.dropout"), ({"target_modules": []}, "adapter.target_modules")):
        with pytest.raises(ConfigError, match=field):
            AdapterConfig(**bad)


def test_merge_adapters_gives_a_plain_model_with_the_same_logits():
    model = _gpt()
    plain_keys = set(model.state_dict())
    apply_adapters(model, AdapterConfig(method="lora", rank=2, alpha=4.0, target_modules=["*"]))
    _randomize(model)
    idx = torch.randint(0, 37, (2, 9))
    y = model(idx)
    merge(model)
    torch.testing.assert_close(model(idx), y, rtol=0, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(idx), y, rtol=0, atol=1e-5)
    merge_adapters(model)
    assert not adapter_modules(model) and set(model.state_dict()) == plain_keys
    torch.testing.assert_close(model(idx), y, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ peft parity


def _hf_llama(tie: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _hf_gpt2():
    cfg = transformers.GPT2Config(vocab_size=37, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ours_from_hf(hf_model):
    from weightsmith.registry import model_from_config
    from weightsmith.ship.hf_convert import hf_to_ours

    family, cfg, sd = hf_to_ours(hf_model.config.to_dict(), hf_model.state_dict())
    model = model_from_config(family, cfg)
    model.load_state_dict(sd, strict=False)  # tied GPT-2 head: lm_head is tok_emb
    return cfg, model.eval()


@pytest.mark.parametrize("hf_factory,method,patterns", [
    (_hf_llama, "lora", ["q_proj", "v_proj", "mlp.down"]),
    (_hf_llama, "dora", ["attn.*", "gate"]),
    (_hf_gpt2, "lora", ["q_proj", "v_proj", "mlp.up"]),  # q and v fused into c_attn, k left at zero
    (_hf_gpt2, "dora", ["k_proj", "o_proj", "mlp.down"]),
])
def test_ours_saved_in_peft_format_loads_in_peft_with_the_same_logits(tmp_path, hf_factory, method, patterns):
    from peft import PeftModel

    hf = hf_factory()
    cfg, ours = _ours_from_hf(hf)
    idx = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = hf(idx).logits
        torch.testing.assert_close(ours(idx), before, rtol=0, atol=1e-5)  # the converter itself
    apply_adapters(ours, AdapterConfig(method=method, rank=2, alpha=5.0, target_modules=patterns))
    _randomize(ours)
    save_peft(ours, cfg, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        mine, theirs = ours(idx), peft_model(idx).logits
        assert (mine - before).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hf_factory,modules,saved", [
    (_hf_llama, ["tok_emb", "lm_head"], ["lm_head", "model.embed_tokens"]),
    (lambda: _hf_llama(tie=True), ["tok_emb"], ["model.embed_tokens"]),  # the head follows (ensure_weight_tying)
    (lambda: _hf_llama(tie=True), ["lm_head"], ["model.embed_tokens"]),  # a tied head is the embedding
    (_hf_llama, ["blocks.0.attn_norm", "final_norm"], ["model.layers.0.input_layernorm", "model.norm"]),
    (_hf_gpt2, ["tok_emb", "blocks.1.mlp_norm"], ["transformer.h.1.ln_2", "transformer.wte"]),  # tied, with bias
])
def test_train_modules_save_as_peft_modules_to_save(tmp_path, hf_factory, modules, saved):
    """Modules trained in full (adapter.train_modules) travel as peft's modules_to_save: peft on the
    untouched base then computes our logits, so it took our copies of those modules."""
    import json

    from peft import PeftModel

    hf = hf_factory()
    cfg, ours = _ours_from_hf(hf)
    apply_adapters(ours, AdapterConfig(method="lora", rank=2, alpha=5.0, target_modules=["q_proj", "o_proj"],
                                       train_modules=modules))
    _randomize(ours)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in modules:
            for p in ours.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    save_peft(ours, cfg, tmp_path / "adapter", train_modules=modules)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == saved
    tied_llama = cfg.tie_embeddings and cfg.pos == "rope" and bool({"tok_emb", "lm_head"} & set(modules))
    assert config.get("ensure_weight_tying", False) == tied_llama
    idx = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = hf(idx).logits
        peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
        mine, theirs = ours(idx), peft_model(idx).logits
        assert (mine - before).abs().max() > 1e-2
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_peft_made_adapter_with_modules_to_save_loads_into_ours(tmp_path, tie):
    """peft's modules_to_save (the embedding and a norm, changed after wrapping) load into ours through
    the converters: the same logits, those parameters trainable, the rest of the base frozen; and our
    own save of the result round-trips through load_peft."""
    from peft import LoraConfig, get_peft_model

    hf = _hf_llama(tie)
    cfg, ours = _ours_from_hf(hf)
    torch.manual_seed(5)
    lc = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                    modules_to_save=["embed_tokens", "layers.1.input_layernorm"], ensure_weight_tying=tie)
    peft_model = get_peft_model(hf, lc).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    load_peft(ours, cfg, tmp_path / "peft")
    idx = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), peft_model(idx).logits, rtol=0, atol=1e-5)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {"tok_emb.weight", "blocks.1.attn_norm.weight"} <= trainable
    assert not any(n.endswith(("mlp.up.weight", "final_norm.weight")) for n in trainable)
    save_peft(ours, cfg, tmp_path / "ours", train_modules=["tok_emb", "blocks.1.attn_norm"])
    _, again = _ours_from_hf(_hf_llama(tie))
    load_peft(again, cfg, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(idx), ours(idx), rtol=0, atol=1e-6)


def test_train_modules_that_peft_cannot_hold_whole_are_refused():
    """GPT-2 fuses q, k and v into one c_attn: q alone trained in full is part of a module, not one."""
    cfg, ours = _ours_from_hf(_hf_gpt2())
    apply_adapters(ours, AdapterConfig(method="lora", rank=2, alpha=5.0, target_modules=["o_proj"],
                                       train_modules=["blocks.0.attn.q_proj"]))
    with pytest.raises(ConfigError, match=r"only part of transformer\.h\.0\.attn\.c_attn"):
        save_peft(ours, cfg, "/nonexistent/never-written", train_modules=["blocks.0.attn.q_proj"])


@pytest.mark.parametrize("hf_factory,use_dora,targets", [
    (_hf_llama, False, ["q_proj", "k_proj", "down_proj"]),
    (_hf_llama, True, ["v_proj", "o_proj", "up_proj"]),
    (_hf_gpt2, False, ["c_attn", "c_proj"]),
    (_hf_gpt2, True, ["c_attn", "c_fc"]),
])
def test_peft_made_adapter_loads_into_ours_with_the_same_logits(tmp_path, hf_factory, use_dora, targets):
    from peft import LoraConfig, get_peft_model

    hf = hf_factory()
    cfg, ours = _ours_from_hf(hf)
    torch.manual_seed(5)
    lc = LoraConfig(r=3, lora_alpha=7, target_modules=targets, use_dora=use_dora, init_lora_weights=False,
                    fan_in_fan_out=hf_factory is _hf_gpt2, rank_pattern={targets[-1]: 2})
    peft_model = get_peft_model(hf, lc).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    wrapped = load_peft(ours, cfg, tmp_path / "peft")
    assert wrapped and trainable_parameters(ours) > 0
    idx = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), peft_model(idx).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ runs and CLI

RUN_RECIPE = """
[data]
corpus = "{corpus}"
tokenizer = "byte"

[model]
family = "gpt"
d_model = 32
n_layers = 2
n_heads = 2
max_seq_len = 32
tie_embeddings = false

[train]
batch_size = 4
max_steps = 6
warmup_steps = 0
schedule = "constant"
lr = 1e-2
eval_every = 100
ckpt_every = 3
keep_checkpoints = 0
log_every = 1
eval_tokens = 256

[sample]
prompt = "KING."
max_new_tokens = 5

[adapter]
method = "{method}"
rank = 2
alpha = 4.0
dropout = 0.1
target_modules = ["q_proj", "v_proj", "mlp.*"]
"""


def _losses(run):
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def _ckpt_sd(run, step):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def adapted_run(tmp_path_factory, tiny_corpus):
    import os

    from weightsmith.cli import main

    root = tmp_path_factory.mktemp("adapted")
    old = os.environ.get("WEIGHTSMITH_CACHE")
    os.environ["WEIGHTSMITH_CACHE"] = str(root / "cache")
    recipe = root / "dora.toml"
    recipe.write_text(RUN_RECIPE.format(corpus=tiny_corpus, method="dora"))
    try:
        assert main(["train", str(recipe), "--out", str(root / "full")]) == 0
        assert main(["train", str(recipe), "--out", str(root / "cut"), "--train.max_steps=3"]) == 0
        assert main(["train", str(recipe), "--out", str(root / "cut"), "--resume", "--train.max_steps=6"]) == 0
        yield root, recipe
    finally:
        if old is None:
            os.environ.pop("WEIGHTSMITH_CACHE", None)
        else:
            os.environ["WEIGHTSMITH_CACHE"] = old


def test_adapted_training_changes_only_the_adapters_and_resumes_exactly(adapted_run):
    from weightsmith.config import load_toml
    from weightsmith.registry import build_config, model_from_config

    root, _ = adapted_run
    run = root / "full"
    tree = load_toml(run / "config.toml")
    assert tree["adapter"]["method"] == "dora" and tree["adapter"]["target_modules"] == ["q_proj", "v_proj", "mlp.*"]
    model_tree = dict(tree["model"])
    torch.manual_seed(tree["train"]["seed"])  # the base as training built it, before the adapters
    init = model_from_config(model_tree.pop("family"), build_config("gpt", model_tree)).state_dict()
    first, last = _ckpt_sd(run, 3), _ckpt_sd(run, 6)
    adapter_keys = {k for k in last if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude")}
    assert len(adapter_keys) == 2 * 5 * 3  # 2 blocks x (q, v, gate, up, down) x (A, B, m)
    for key, t in last.items():
        if key in adapter_keys:
            assert not torch.equal(t, first[key]), key  # every adapter tensor moved between steps 3 and 6
        else:
            assert torch.equal(t, init[key.replace(".base.", ".")]), key  # base bit-identical to its init
    full, cut = _losses(run), _losses(root / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 7))
    assert all(full[s] == cut[s] for s in full), (full, cut)  # dropout RNG and optimizer state resumed
    state = torch.load(run / "checkpoints" / "step_000006" / "train_state.pt", weights_only=True)
    # AdamW state for the adapter tensors only: the frozen base has no moments
    assert len(state["optimizer"]["state"]) == len(adapter_keys)
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(adapter_keys)


def test_eval_generate_export_and_quantize_work_on_an_adapted_run(adapted_run, tmp_path, capsys):
    from weightsmith.cli import main
    from weightsmith.train.checkpoint import load_run

    root, _ = adapted_run
    run = root / "full"
    loaded = load_run(run)
    assert len(adapter_modules(loaded.model)) == 10
    assert main(["eval", str(run)]) == 0
    assert main(["generate", str(run), "--prompt", "KING.", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert "KING." in capsys.readouterr().out
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, loaded.model(idx), rtol=0, atol=1e-4)  # merged = adapted
    assert main(["quantize", str(run), "--method", "int8", "--out", str(tmp_path / "q8")]) == 0
    q = load_run(tmp_path / "q8")
    assert not adapter_modules(q.model)
    with torch.no_grad():
        assert (q.model(idx) - loaded.model(idx)).abs().max() < 0.1


def test_a_run_with_train_modules_moves_only_adapters_and_those_modules(tmp_path, tiny_corpus, capsys, monkeypatch):
    """Through the trainer: the embedding (train_modules) and the adapters move, every other base weight
    stays bit-identical to its init; the merged HF export equals the run, and so does the peft export
    (the embedding as modules_to_save) loaded by peft on the run's initial weights."""
    from weightsmith.cli import main
    from weightsmith.config import load_toml
    from weightsmith.registry import build_config, model_from_config
    from weightsmith.train.checkpoint import load_run

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "emb.toml"
    recipe.write_text(RUN_RECIPE.format(corpus=tiny_corpus, method="lora") + 'train_modules = ["tok_emb"]\n')
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--train.max_steps=3"]) == 0
    tree = load_toml(run / "config.toml")
    model_tree = dict(tree["model"])
    torch.manual_seed(tree["train"]["seed"])
    init = model_from_config(model_tree.pop("family"), build_config("gpt", model_tree)).state_dict()
    last = _ckpt_sd(run, 3)
    moved = {k for k, t in last.items() if k.replace(".base.", ".") not in init
             or not torch.equal(t, init[k.replace(".base.", ".")])}
    assert "tok_emb.weight" in moved and moved <= {"tok_emb.weight"} | {
        k for k in last if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, load_run(run).model(idx), rtol=0, atol=1e-4)
    # the peft export on the base the run started from (its init: frozen weights and the embedding before
    # training) computes the run's logits, so peft took the trained embedding from modules_to_save
    from peft import PeftModel

    from weightsmith.ship.hf_convert import ours_to_hf

    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    trained = load_run(run).model
    hf_cfg, hf_sd, arch = ours_to_hf(trained.config, init)
    base_hf = getattr(transformers, arch)(getattr(transformers, arch.replace("ForCausalLM", "Config"))(**hf_cfg))
    base_hf.load_state_dict(hf_sd, strict=False)
    with torch.no_grad():
        assert (base_hf.eval()(idx).logits - trained(idx)).abs().max() > 1e-3  # the base alone is not the run
        peft_model = PeftModel.from_pretrained(base_hf, str(tmp_path / "peft")).eval()  # wraps base_hf in place
        torch.testing.assert_close(peft_model(idx).logits, trained(idx), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ inspect


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_inspect_counts_trainable_parameters_and_state_of_the_real_module(tmp_path, method):
    from weightsmith.adapters import nf4_bytes
    from weightsmith.analysis.inspect import format_report, inspect_model
    from weightsmith.registry import create_model
    from weightsmith.train.config import TrainConfig
    from weightsmith.train.optim import build_optimizer

    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nfamily = "gpt"\nd_model = 24\nn_layers = 3\nn_heads = 2\nd_ff = 40\n'
                      'max_seq_len = 16\nvocab_size = 53\ntie_embeddings = false\n'
                      f'[adapter]\nmethod = "{method}"\nrank = 3\ndropout = 0.1\n'
                      'target_modules = ["attn.q_proj", "mlp.down", "lm_head"]\n')
    report = inspect_model(str(recipe), batch_size=2, seq_len=7)
    a = report["adapter"]
    torch.manual_seed(0)
    model = create_model("gpt", vocab_size=53, d_model=24, n_layers=3, n_heads=2, d_ff=40, max_seq_len=16,
                         tie_embeddings=False)
    n_base = sum(p.numel() for p in model.parameters())
    apply_adapters(model, AdapterConfig(method="dora" if method == "dora" else "lora", rank=3, dropout=0.1,
                                        target_modules=["attn.q_proj", "mlp.down", "lm_head"]))
    assert a["params_trainable"] == trainable_parameters(model)
    # q (24->24), down (40->24) x 3 blocks, lm_head (24->53): rank (in + out) [+ out for DoRA]
    shapes = [(24, 24), (40, 24)] * 3 + [(24, 53)]
    assert a["params_trainable"] == sum(3 * (i + o) + (o if method == "dora" else 0) for i, o in shapes)
    assert a["params_frozen"] == n_base == report["params_total"]
    opt = build_optimizer("adamw", model, TrainConfig())
    model(torch.randint(0, 53, (2, 7))).sum().backward()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert a["memory_optimizer_bytes"] == state_bytes  # AdamW moments for the adapters only
    grad_bytes = sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
    assert a["memory_grads_bytes"] == grad_bytes
    if method == "qlora":  # every linear in the blocks and the adapted head is NF4 (4.127 bits/weight)
        nf4_w = 3 * (4 * 24 * 24 + 3 * 24 * 40) + 24 * 53
        assert a["params_nf4"] == nf4_w
        assert a["memory_nf4_bytes"] < 0.53 * nf4_w  # 4 bits + scales (+ per-tensor overhead here)
        blocks = [24 * 24] * 12 + [24 * 40] * 9 + [24 * 53]
        assert a["memory_nf4_bytes"] == sum(nf4_bytes(n) for n in blocks)
        assert a["memory_weights_bytes"] == (n_base - nf4_w) * 4 + a["memory_nf4_bytes"] + a["params_trainable"] * 4
    else:
        assert a["memory_weights_bytes"] == (n_base + a["params_trainable"]) * 4
    assert a["memory_train_bytes"] < report["memory_train_bytes"]
    assert f"trainable {a['params_trainable']:,}" in format_report(report)


def test_train_modules_train_in_full_beside_the_adapters_and_inspect_counts_them(tmp_path):
    """adapter.train_modules (peft's modules_to_save): the selected modules' own parameters train, the
    rest of the base stays frozen; inspect's counts, gradient and AdamW state bytes equal the real module's."""
    from weightsmith.analysis.inspect import format_report, inspect_model
    from weightsmith.train.config import TrainConfig
    from weightsmith.train.optim import build_optimizer

    model = _gpt(tie_embeddings=True)
    idx = torch.randint(0, 37, (2, 9))
    ref = model(idx)
    cfg = AdapterConfig(rank=2, target_modules=["q_proj"], train_modules=["tok_emb", "blocks.1.mlp_norm"])
    apply_adapters(model, cfg)
    torch.testing.assert_close(model(idx), ref, rtol=0, atol=0)  # B = 0: the pass changes nothing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"tok_emb.weight", "blocks.1.mlp_norm.weight"} | {
        f"blocks.{i}.attn.q_proj.{k}" for i in range(2) for k in ("lora_A", "lora_B")}
    assert model.lm_head.weight.requires_grad  # tied: the head is the embedding
    n_emb, n_norm = 37 * 16, 16
    assert trainable_parameters(model) == 2 * 2 * (16 + 16) + n_emb + n_norm
    opt = build_optimizer("adamw", model, TrainConfig(lr=1e-2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):  # B moves after the first step, so A gets a gradient on the second
        model(idx).logsumexp(-1).sum().backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    with pytest.raises(ConfigError, match="match no module"):
        apply_adapters(_gpt(), AdapterConfig(target_modules=["q_proj"], train_modules=["wte"]))
    with pytest.raises(ConfigError, match="trains in full or gets an adapter"):
        apply_adapters(_gpt(), AdapterConfig(target_modules=["q_proj"], train_modules=["blocks.0.attn"]))
    with pytest.raises(ConfigError, match="NF4"):
        apply_adapters(_gpt(), AdapterConfig(method="qlora", target_modules=["q_proj"], train_modules=["mlp"]))

    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nfamily = "gpt"\nd_model = 24\nn_layers = 3\nn_heads = 2\nd_ff = 40\n'
                      'max_seq_len = 16\nvocab_size = 53\ntie_embeddings = false\n'
                      '[adapter]\nrank = 3\ntarget_modules = ["attn.q_proj"]\ntrain_modules = ["tok_emb"]\n')
    report = inspect_model(str(recipe), batch_size=2, seq_len=7)
    a = report["adapter"]
    assert a["train_modules"] == ["tok_emb"]
    assert a["params_trainable"] == 3 * 3 * (24 + 24) + 53 * 24
    assert a["params_frozen"] == report["params_total"] - 53 * 24
    torch.manual_seed(0)
    from weightsmith.registry import create_model

    real = create_model("gpt", vocab_size=53, d_model=24, n_layers=3, n_heads=2, d_ff=40, max_seq_len=16,
                        tie_embeddings=False)
    apply_adapters(real, AdapterConfig(rank=3, target_modules=["attn.q_proj"], train_modules=["tok_emb"]))
    opt = build_optimizer("adamw", real, TrainConfig())
    real(torch.randint(0, 53, (2, 7))).sum().backward()
    opt.step()
    assert a["memory_optimizer_bytes"] == sum(t.numel() * t.element_size() for s in opt.state.values()
                                              for k, t in s.items() if k != "step")
    assert a["memory_grads_bytes"] == sum(p.grad.numel() * 4 for p in real.parameters() if p.grad is not None)
    assert "+ tok_emb in full" in format_report(report)


def test_export_peft_of_an_adapted_run_loads_in_peft_on_the_base(adapted_run, tmp_path):
    from peft import PeftModel

    from weightsmith.cli import main
    from weightsmith.ship.hf_convert import ours_to_hf
    from weightsmith.train.checkpoint import load_run

    root, _ = adapted_run
    run = load_run(root / "full")
    assert main(["export", str(root / "full"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    base = {k.replace(".base.", "."): v for k, v in run.model.state_dict().items()
            if k.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "magnitude")}
    hf_cfg, hf_sd, arch = ours_to_hf(run.model.config, base)
    hf = getattr(transformers, arch)(getattr(transformers, arch.replace("ForCausalLM", "Config"))(**hf_cfg))
    hf.load_state_dict(hf_sd, strict=False)
    peft_model = PeftModel.from_pretrained(hf.eval(), str(tmp_path / "peft")).eval()
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(idx).logits, run.model(idx), rtol=0, atol=1e-5)
    assert main(["export", str(root / "full"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 2


@pytest.mark.parametrize("section,needle", [
    ('[adapter]\nmethod = "ia3"\n', "adapter.method = 'ia3' is not allowed"),
    ('[adapter]\nrank = 0\n', "adapter.rank must be >= 1"),
    ('[adapter]\nranks = 4\n', "unknown key 'adapter.ranks'"),
    ('[adapter]\ntarget_modules = ["c_attn"]\n', "pattern 'c_attn' matches no linear layer"),
])
def test_bad_adapter_sections_are_one_line_errors(tmp_path, tiny_corpus, capsys, section, needle, monkeypatch):
    from weightsmith.cli import main

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "bad.toml"
    text = RUN_RECIPE.format(corpus=tiny_corpus, method="lora")
    recipe.write_text(text[:text.index("[adapter]")] + section)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# ------------------------------------------------------------------------------------------ QLoRA


def _nf4():
    return pytest.importorskip("weightsmith.models.layers.nf4").NF4Linear


def test_qlora_wraps_nf4_bases_with_fp32_adapters_and_merges_to_the_same_logits():
    NF4Linear = _nf4()
    model = _gpt()
    apply_adapters(model, AdapterConfig(method="qlora", rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"]))
    for name, m in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            assert isinstance(m, LoRALinear) and isinstance(m.base.base, NF4Linear), name
            assert m.lora_A.dtype == m.lora_B.dtype == torch.float32
        elif name.startswith("blocks.") and name.endswith(("k_proj", "o_proj", "gate", "up", "down")):
            assert isinstance(m.base, NF4Linear), name  # quantize_frozen: every other linear in the blocks
    assert type(model.lm_head) is nn.Linear
    assert trainable_parameters(model) == 2 * (2 * (16 + 16) + 2 * (16 + 8))  # 2 blocks: q 16->16, v 16->8
    _randomize(model)
    idx = torch.randint(0, 37, (2, 9))
    y = model(idx)
    # the same computation by hand: each NF4 layer as a float linear of its dequantized weight
    from weightsmith.models.layers.lora import base_weight

    for m in model.modules():
        if isinstance(m, NF4Linear):
            bias = 0 if m.bias is None else m.bias
            torch.testing.assert_close(m(torch.eye(m.in_features)), base_weight(m).T + bias)
    merge_adapters(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    torch.testing.assert_close(model(idx), y, rtol=0, atol=1e-5)


def test_qlora_state_dict_round_trips_and_inspect_counts_the_real_nf4_bytes(tmp_path):
    NF4Linear = _nf4()
    from weightsmith.analysis.inspect import inspect_model

    cfg = AdapterConfig(method="qlora", rank=2, alpha=4.0, target_modules=["q_proj", "mlp.down"])
    model = apply_adapters(_gpt(d_model=64, d_ff=128, n_heads=4, n_kv_heads=2), cfg)
    _randomize(model)
    idx = torch.randint(0, 37, (2, 9))
    y = model(idx)
    torch.manual_seed(123)  # other random base weights: the loaded state must replace them all
    from weightsmith.registry import create_model

    other = apply_adapters(create_model("gpt", vocab_size=37, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                        d_ff=128, max_seq_len=16, tie_embeddings=False), cfg)
    other.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(other(idx), y, rtol=0, atol=0)
    real = sum(m.nbytes for m in model.modules() if isinstance(m, NF4Linear))  # codes and scales, bias excluded
    recipe = tmp_path / "q.toml"
    recipe.write_text('[model]\nfamily = "gpt"\nvocab_size = 37\nd_model = 64\nn_layers = 2\nn_heads = 4\n'
                      'n_kv_heads = 2\nd_ff = 128\nmax_seq_len = 16\ntie_embeddings = false\n'
                      '[adapter]\nmethod = "qlora"\nrank = 2\nalpha = 4.0\ntarget_modules = ["q_proj", "mlp.down"]\n')
    a = inspect_model(str(recipe), batch_size=2, seq_len=9)["adapter"]
    assert a["params_trainable"] == trainable_parameters(model)
    assert a["memory_nf4_bytes"] == real


class _StandInNF4(nn.Module):
    """A 4-bit stand-in with NF4Linear's interface (from_linear, in/out_features, bias, forward =
    F.linear of the dequantized weight): tests the qlora wiring whatever the real NF4 layer does."""

    def __init__(self, in_features, out_features, bias, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("absmax", torch.ones(out_features, 1, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin):
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device)
        m.absmax.copy_(lin.weight.abs().amax(1, keepdim=True).clamp_min(1e-8))
        m.codes.copy_(torch.round(lin.weight / m.absmax * 7).to(torch.int8))
        if lin.bias is not None:
            m.bias.copy_(lin.bias)
        return m

    def dequantized_weight(self):
        return self.codes.float() / 7 * self.absmax

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


@pytest.mark.slow  # about 20 s on 2 busy cores: a training run, an HF export
@pytest.mark.parametrize("nf4", ["real", "stand-in"])
def test_qlora_run_trains_only_the_adapters_on_a_frozen_4bit_base(tmp_path, tiny_corpus, monkeypatch, nf4):
    import weightsmith.adapters as adapters_mod
    from weightsmith.cli import main
    from weightsmith.train.checkpoint import load_run

    cls = _nf4() if nf4 == "real" else _StandInNF4
    monkeypatch.setattr(adapters_mod, "_nf4_class", lambda: cls)
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "q.toml"
    recipe.write_text(RUN_RECIPE.format(corpus=tiny_corpus, method="qlora").replace("max_steps = 6", "max_steps = 4")
                      .replace("ckpt_every = 3", "ckpt_every = 2"))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    first, last = _ckpt_sd(tmp_path / "run", 2), _ckpt_sd(tmp_path / "run", 4)
    codes = [k for k in last if k.endswith(".codes")]
    assert len(codes) == 2 * 7  # every linear of both blocks is 4-bit (quantize_frozen)
    for key, t in last.items():
        moved = not torch.equal(t, first[key])
        assert moved == (key.rsplit(".", 1)[-1] in ("lora_A", "lora_B")), key
    run = load_run(tmp_path / "run")
    assert all(isinstance(m.base.base, cls) for _, m in adapter_modules(run.model))
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, run.model(idx), rtol=0, atol=1e-4)


def _saved_for_backward(model, idx):
    """Bytes autograd keeps from forward to backward, not counting the model's own tensors."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx).float().pow(2).mean()
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("nf4", ["real", "stand-in"])
def test_qlora_keeps_no_dequantized_weight_for_backward_and_its_gradients_are_exact(monkeypatch, nf4):
    import copy

    import weightsmith.adapters as adapters_mod

    if nf4 == "stand-in":
        monkeypatch.setattr(adapters_mod, "_nf4_class", lambda: _StandInNF4)
    else:
        _nf4()
    big = dict(d_model=128, d_ff=256, n_heads=4, n_kv_heads=2)
    idx = torch.randint(0, 37, (2, 9))
    lora = apply_adapters(_gpt(**big), AdapterConfig(method="lora", rank=2, target_modules=["q_proj", "v_proj"]))
    qlora = apply_adapters(_gpt(**big), AdapterConfig(method="qlora", rank=2, target_modules=["q_proj", "v_proj"]))
    _randomize(qlora)
    # the float twin: every 4-bit layer as an nn.Linear of its dequantized weight, same adapters
    twin = copy.deepcopy(qlora)
    for name, m in list(twin.named_modules()):
        if type(m).__name__ == "FrozenQuantLinear":
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None).requires_grad_(False)
            with torch.no_grad():
                dense.weight.copy_(m.dequantize())
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, dense)
    dense_weights = sum(m.weight.numel() * 4 for m in twin.modules() if isinstance(m, nn.Linear)) // 2
    assert _saved_for_backward(qlora, idx) <= _saved_for_backward(lora, idx) < dense_weights
    _saved_for_backward(twin, idx)
    grads = {n: p.grad for n, p in qlora.named_parameters() if p.requires_grad}
    twin_grads = {n.replace(".base.base.", ".base."): p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads.keys() == {k for k in twin_grads}
    for k, g in grads.items():
        torch.testing.assert_close(g, twin_grads[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_mode_with_dropout_equals_peft_under_the_same_rng(tmp_path, method):
    """One dropout mask per adapted layer, drawn in the same order, on the same input as peft's: the
    adapter path sees dropout(x), DoRA's base correction W dropout(x) too, the base path x."""
    from peft import PeftModel

    hf = _hf_llama()
    cfg, ours = _ours_from_hf(hf)
    apply_adapters(ours, AdapterConfig(method=method, rank=2, alpha=5.0, dropout=0.3,
                                       target_modules=["q_proj", "v_proj", "mlp.down"]))
    _randomize(ours)
    save_peft(ours, cfg, tmp_path / "adapter", dropout=0.3)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter"), is_trainable=True)
    ours.train()
    peft_model.train()
    idx = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.manual_seed(7)
        mine = ours(idx)
        torch.manual_seed(7)
        theirs = peft_model(idx).logits
        torch.manual_seed(8)
        other_masks = ours(idx)
    assert (mine - other_masks).abs().max() > 1e-2  # dropout is on
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_gradients_equal_peft(tmp_path, method):
    """Backward parity, DoRA's detached norm included (Liu et al. section 4.3, as peft)."""
    from peft import PeftModel

    from weightsmith.ship.hf_convert_peft import peft_targets

    hf = _hf_llama()
    cfg, ours = _ours_from_hf(hf)
    apply_adapters(ours, AdapterConfig(method=method, rank=2, alpha=5.0, target_modules=["attn.*", "mlp.up"]))
    _randomize(ours)
    save_peft(ours, cfg, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter"), is_trainable=True).eval()
    idx = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(6))
    ours(idx).pow(2).mean().backward()
    peft_model(idx).logits.pow(2).mean().backward()
    theirs = dict(peft_model.named_parameters())
    _, targets = peft_targets(cfg)
    checked = 0
    for name, m in adapter_modules(ours):
        hf_name = "base_model.model." + targets[name][0]
        pairs = [(m.lora_A, f"{hf_name}.lora_A.default.weight"), (m.lora_B, f"{hf_name}.lora_B.default.weight")]
        if method == "dora":
            pairs.append((m.magnitude, f"{hf_name}.lora_magnitude_vector.default.weight"))
        for p, key in pairs:
            torch.testing.assert_close(p.grad, theirs[key].grad, rtol=1e-4, atol=1e-7)
            checked += 1
    assert checked == 2 * 5 * (3 if method == "dora" else 2)
