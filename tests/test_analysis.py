"""The analytic model against measurement: numel, FlopCounterMode, saved tensors, a profiled training
step on CPU, and a safetensors file on disk. Plus the inspect report and CLI."""

import gc
import json
import random

import pytest
import torch
import torch.nn.functional as F

from weightsmith.analysis import count_params, flops_per_token, forward_flops, inspect_model, memory_estimate
from weightsmith.analysis.components import rows_for
from weightsmith.analysis.flops import flop_counter
from weightsmith.analysis.memory import row_activation_elements
from weightsmith.errors import ConfigError
from weightsmith.registry import create_model, list_models, resolve
from weightsmith.train.activation_checkpointing import apply_activation_checkpointing

# distinct sizes so that a swapped axis cannot pass
TINY = {
    "gpt2-style": ("gpt", dict(vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=64,
                               norm="layernorm", mlp="gelu", pos="learned", bias=True)),
    "llama-style": ("gpt", dict(vocab_size=53, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=56,
                                max_seq_len=64, tie_embeddings=False)),
    "moe": ("gpt", dict(vocab_size=53, d_model=40, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, n_experts=5,
                        n_experts_per_token=2, max_seq_len=64)),
    # the E2 / E5 ablation variants: positions and norms without parameters or with new ones
    "sinusoidal-dyt": ("gpt", dict(vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=64,
                                   pos="sinusoidal", norm="dyt", mlp="gelu", bias=True)),
    "alibi-no-norm": ("gpt", dict(vocab_size=53, d_model=40, n_layers=2, n_heads=5, n_kv_heads=1, d_ff=56,
                                  max_seq_len=64, pos="alibi", norm="none")),
    "nope-dyt": ("gpt", dict(vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=64,
                             pos="none", norm="dyt")),
    "rope-yarn": ("gpt", dict(vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=64,
                              rope_scaling="yarn", rope_scale=4.0, rope_original_max_seq_len=16)),
    "bert": ("bert", dict(vocab_size=53, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=64)),
    "t5": ("t5", dict(vocab_size=53, d_model=40, n_layers=2, n_decoder_layers=3, n_heads=4, d_head=7, d_ff=56,
                      rel_buckets=8, rel_max_distance=16)),
    "t5-gated": ("t5", dict(vocab_size=53, d_model=40, n_layers=1, n_heads=2, d_ff=44, mlp="gated-gelu",
                            tie_embeddings=False, pos="none")),
}


def _build(key):
    family, kw = TINY[key]
    torch.manual_seed(0)
    return family, resolve(family, kw)[1], create_model(family, **kw)


def _run(family, model, x, src=None):
    if family == "t5":
        return model(src if src is not None else x, x)
    if family == "bert":
        hidden, pooled = model(x)
        return hidden
    return model(x)


# ---------------------------------------------------------------------------------------------------
# parameters

@pytest.mark.parametrize("name", list_models())
def test_analytic_params_equal_numel_for_every_registered_model(name):
    fam, cfg = resolve(name)
    model = create_model(name, device="meta")
    assert count_params(fam.name, cfg) == sum(p.numel() for p in model.parameters())


def test_analytic_params_equal_numel_for_random_small_configs():
    rng = random.Random(0)
    for _ in range(40):
        family = rng.choice(["gpt", "bert", "t5"])
        heads = rng.choice([1, 2, 3, 4])
        d_model = heads * rng.choice([2, 4, 6, 10])
        kw = dict(vocab_size=rng.randint(5, 70), d_model=d_model, n_layers=rng.randint(1, 3), n_heads=heads,
                  d_ff=rng.randint(3, 50))
        if family == "gpt":
            kw.update(n_kv_heads=rng.choice([k for k in (1, 2, 3, 4) if heads % k == 0]),
                      norm=rng.choice(["layernorm", "rmsnorm", "dyt", "none"]),
                      pos=rng.choice(["learned", "rope", "sinusoidal", "alibi", "none"]),
                      bias=rng.random() < 0.5, tie_embeddings=rng.random() < 0.5, max_seq_len=rng.randint(4, 40))
            if rng.random() < 0.3:
                kw.update(mlp="swiglu", n_experts=rng.randint(1, 5), n_experts_per_token=1)
            else:
                kw.update(mlp=rng.choice(["gelu", "swiglu"]))
        elif family == "bert":
            kw.update(pos=rng.choice(["learned", "none"]), n_token_types=rng.randint(0, 3),
                      pooler=rng.random() < 0.5, bias=rng.random() < 0.5)
        else:
            kw.update(n_decoder_layers=rng.randint(1, 3), d_head=rng.randint(1, 9),
                      mlp=rng.choice(["relu", "gated-gelu"]), pos=rng.choice(["relative", "none"]),
                      tie_embeddings=rng.random() < 0.5)
        _, cfg = resolve(family, kw)
        model = create_model(family, device="meta", **kw)
        assert count_params(family, cfg) == sum(p.numel() for p in model.parameters()), (family, kw)


# ---------------------------------------------------------------------------------------------------
# FLOPs

def _measured_forward_flops(family, model, x, src=None):
    with torch.no_grad(), flop_counter() as fc:
        _run(family, model, x, src)
    return fc.get_total_flops()


@pytest.mark.parametrize("key", sorted(TINY))
@pytest.mark.parametrize("B, T", [(1, 5), (3, 17), (2, 48)])
def test_forward_flops_match_flop_counter(key, B, T):
    """FlopCounterMode counts every matmul (addmm/mm/bmm) and SDPA as its two dense products, with the same
    2-per-multiply-add convention; nothing is causal-halved on either side, so they should agree exactly.
    Stock FlopCounterMode counts 0 for the CPU flash-attention kernel; ``flop_counter`` registers it."""
    family, cfg, model = _build(key)
    model.eval()
    x = torch.randint(0, cfg.vocab_size, (B, T))
    src = torch.randint(0, cfg.vocab_size, (B, T + 6)) if family == "t5" else None
    measured = _measured_forward_flops(family, model, x, src)
    S = T + 6 if family == "t5" else None
    predicted = forward_flops(family, cfg, T, src_len=S)["total"] * B * T
    assert predicted == pytest.approx(measured, rel=0.01)


def test_stock_flop_counter_misses_cpu_attention():
    """Why flop_counter exists: the stock mode sees only the projections on CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    family, cfg, model = _build("gpt2-style")
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad(), FlopCounterMode(display=False) as stock:
        model(x)
    ours = _measured_forward_flops(family, model, x)
    assert ours - stock.get_total_flops() == forward_flops(family, cfg, 16)["attention"] * 2 * 16


def test_flops_per_token_gpt2_formula():
    """nanoGPT's count for GPT-2 small: 2 x (12 layers x 12 d^2 + d V) + 4 x 12 x T x d per token."""
    _, cfg = resolve("gpt2")
    d, L, V, T = 768, 12, 50257, 1024
    fwd = 2 * (L * 12 * d * d + d * V) + 4 * L * T * d
    assert flops_per_token("gpt", cfg, T, training=False) == fwd
    assert flops_per_token("gpt", cfg, T) == 3 * fwd


def test_moe_flops_count_active_experts_only():
    _, cfg = resolve("mixtral-8x7b")
    _, dense = resolve("mixtral-8x7b", {"n_experts": 0})
    f_moe = forward_flops("gpt", cfg, 1)["matmul"]
    f_dense = forward_flops("gpt", dense, 1)["matmul"]
    d, f, L = 4096, 14336, 32
    assert f_moe - f_dense == L * (2 * d * 8 + 2 * 3 * d * f)  # router + one more expert than dense


# ---------------------------------------------------------------------------------------------------
# memory

def _saved_activation_bytes(family, model, x, src=None):
    """Bytes of floating-point tensors autograd saves for backward, deduplicated by storage."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if t.is_floating_point() and st.data_ptr() not in param_storages:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _run(family, model, x, src)
        if family != "bert":
            F.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1))
    return sum(seen.values())


@pytest.mark.parametrize("key", ["gpt2-style", "llama-style", "moe", "bert", "t5", "sinusoidal-dyt", "alibi-no-norm",
                                 "nope-dyt", "rope-yarn"])
def test_activation_count_matches_saved_tensors(key):
    family, cfg, model = _build(key)
    B, T = 3, 19
    x = torch.randint(0, cfg.vocab_size, (B, T))
    measured = _saved_activation_bytes(family, model, x, x if family == "t5" else None)
    rows = rows_for(family, cfg)
    # the logits are held by the caller, not saved by autograd; BERT's test loss is not a cross-entropy
    predicted = 4 * sum(row_activation_elements(r, B, T) - B * T * r.act_held for r in rows)
    assert predicted == pytest.approx(measured, rel=0.03)


def _profiled_train_peak(family, kw, B, T, checkpointing=False):
    """Peak CPU bytes over three AdamW steps, from torch.profiler's allocator events (every allocation
    and free, model and optimizer creation included); gradients stay allocated across steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = torch.randint(0, kw["vocab_size"], (B, T))
    gc.collect()  # a garbage collection inside the window would free earlier tests' tensors and skew the count
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _train_three_steps(family, kw, x, checkpointing)
    finally:
        gc.enable()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _train_three_steps(family, kw, x, checkpointing):
    model = create_model(family, **kw)
    if checkpointing:
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    for _ in range(3):
        out = _run(family, model, x, x if family == "t5" else None)
        if family == "bert":
            loss = out.square().mean()
        else:
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1))
        loss.backward()
        del out, loss
        opt.step()
        opt.zero_grad(set_to_none=False)


@pytest.mark.parametrize("key", ["gpt2-style", "llama-style", "bert", "t5"])
def test_training_peak_memory_within_15_percent_of_profiled(key):
    family, kw = TINY[key]
    B, T = 8, 48
    measured = _profiled_train_peak(family, kw, B, T)
    _, cfg = resolve(family, kw)
    predicted = memory_estimate(family, cfg, batch_size=B, seq_len=T)["train_peak"]
    assert predicted == pytest.approx(measured, rel=0.15)


DEEP = {  # activations dominate the weights, so checkpointing changes the peak a lot
    "llama-style": ("gpt", dict(vocab_size=53, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=64)),
    "gpt2-style": ("gpt", dict(vocab_size=53, d_model=32, n_layers=6, n_heads=4, d_ff=64, max_seq_len=64,
                               norm="layernorm", mlp="gelu", pos="learned", bias=True)),
    "bert": ("bert", dict(vocab_size=53, d_model=32, n_layers=6, n_heads=4, d_ff=64, max_seq_len=64)),
    "t5": ("t5", dict(vocab_size=53, d_model=32, n_layers=4, n_decoder_layers=4, n_heads=4, d_ff=64,
                      rel_buckets=8, rel_max_distance=16)),
}


@pytest.mark.parametrize("key", list(DEEP))
def test_activation_checkpointing_peak_is_predicted_and_the_gradients_are_unchanged(key):
    """The profiled peak with every block checkpointed is below the full one by what ``inspect`` says it
    saves, and within the stated upper-side estimate (+0..+20%) of ``train_peak_checkpointed``."""
    family, kw = DEEP[key]
    B, T = 16, 64
    full = _profiled_train_peak(family, kw, B, T)
    ckpt = _profiled_train_peak(family, kw, B, T, checkpointing=True)
    _, cfg = resolve(family, kw)
    m = memory_estimate(family, cfg, batch_size=B, seq_len=T)
    assert m["train_peak"] == pytest.approx(full, rel=0.15)
    assert ckpt < 0.5 * full
    assert 1.0 <= m["train_peak_checkpointed"] / ckpt <= 1.20
    # same loss and gradients with and without checkpointing
    x = torch.randint(0, kw["vocab_size"], (4, 20))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model(family, **kw)
        if checkpointing:
            assert apply_activation_checkpointing(model) == kw["n_layers"] + kw.get("n_decoder_layers", 0)
        out = _run(family, model, x, x if family == "t5" else None)
        out.square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("bf16", torch.bfloat16)])
def test_checkpoint_size_matches_safetensors_file(tmp_path, dtype, torch_dtype):
    from safetensors.torch import save_model

    kw = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=True)
    model = create_model("gpt", **kw).to(torch_dtype)
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))  # writes the tied embedding once
    report = inspect_model("gpt", overrides=kw, dtype=dtype)
    assert report["checkpoint_bytes"] == pytest.approx(path.stat().st_size, rel=0.01)


def test_memory_parts_and_kv_cache():
    _, cfg = resolve("llama2-7b")
    m = memory_estimate("gpt", cfg, batch_size=2, seq_len=4096, dtype="bf16", optimizer="sgd")
    assert m["kv_cache_per_token"] == 2 * 32 * 4096 * 2  # k and v, 32 layers, 4096 wide, 2 bytes
    assert m["kv_cache"] == m["kv_cache_per_token"] * 2 * 4096
    assert m["optimizer"] == 0 and m["weights"] == m["grads"] == 6_738_415_616 * 2
    assert m["activations_checkpointed"] < m["activations"]
    adam = memory_estimate("gpt", cfg, batch_size=2, seq_len=4096, dtype="bf16", optimizer="adamw")
    assert adam["optimizer"] == 2 * adam["weights"]
    _, t5 = resolve("t5-base")
    m = memory_estimate("t5", t5, batch_size=1, seq_len=10, src_len=30)
    assert m["kv_cache"] == 4 * 2 * 12 * 768 * (10 + 30)  # decoder self-attn per target + cross per source
    _, bert = resolve("bert-base")
    assert memory_estimate("bert", bert, batch_size=1, seq_len=8)["kv_cache"] == 0


# ---------------------------------------------------------------------------------------------------
# inspect report and CLI

REQUIRED = ("params_total", "params_embedding", "params_active", "flops_fwd_per_token", "flops_train_per_token",
            "kv_cache_bytes_per_token", "memory_train_bytes", "memory_infer_bytes")


def test_inspect_preset_report_and_table():
    from weightsmith.analysis import format_report

    r = inspect_model("mixtral-8x7b", batch_size=2, seq_len=256, dtype="bf16")
    for key in REQUIRED:
        assert key in r
    assert r["params_total"] == 46_702_792_704 and r["params_active"] == 12_879_925_248
    assert r["flops_train_per_token"] == 3 * r["flops_fwd_per_token"]
    experts = next(m for m in r["modules"] if m["path"] == "blocks.*.mlp.experts")
    assert experts["count"] == 32 and experts["weights"]["*.gate.weight"]["count"] == 8
    assert sum(m["params"] * m["count"] for m in r["modules"]) == r["params_total"]
    text = format_report(r)
    assert "blocks.*.mlp.experts" in text and "2 FLOPs per multiply-add" in text


def test_inspect_recipe_and_run_dir(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\nvocab_size = 300\n[model]\nfamily = "gpt"\nd_model = 48\nn_layers = 2\nn_heads = 4\n')
    r = inspect_model(str(recipe), seq_len=16, overrides=["--model.n_layers=3"])
    assert r["config"]["vocab_size"] == 300 and r["config"]["n_layers"] == 3
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[model]\nfamily = "bert"\nvocab_size = 77\nd_model = 24\nn_heads = 3\n')
    r = inspect_model(str(run))
    assert r["family"] == "bert" and r["config"]["vocab_size"] == 77 and r["kv_cache_bytes_per_token"] == 0


@pytest.mark.parametrize("args, match", [
    (dict(model="gtp2"), "close matches: gpt2"),
    (dict(model="gpt2", overrides=["--model.n_heads=7"]), "n_heads"),
    (dict(model="gpt2", seq_len=5000), "max_seq_len"),
    (dict(model="gpt2", dtype="float13"), "dtype"),
    (dict(model="gpt2", overrides=["--train.lr=1"]), "--model"),
])
def test_inspect_errors(args, match):
    name = args.pop("model")
    with pytest.raises(ConfigError, match=match):
        inspect_model(name, **args)


def test_cli_inspect_json_and_one_line_errors(capsys):
    from weightsmith.cli import main

    assert main(["inspect", "bert-base", "--seq-len", "128", "--batch-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_total"] == 109_482_240 and all(k in report for k in REQUIRED)
    assert main(["inspect", "t5-base", "--model.n_heads=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_heads" in err[0]


# ---------------------------------------------------------------------------------------------------
# data flow (docs/inside-out.md)

@pytest.mark.parametrize("name", ["gpt2", "t5-base"])
def test_meta_flop_count_matches_analytic_for_presets(name):
    from weightsmith.analysis.dataflow import meta_forward_flops

    fam, cfg = resolve(name)
    assert meta_forward_flops(fam.name, cfg, 2, 64) == pytest.approx(forward_flops(fam.name, cfg, 64)["total"] * 128)


def test_trace_shapes_records_attention_kernel_shapes():
    from weightsmith.analysis.dataflow import trace_shapes

    _, cfg = resolve("gpt", TINY["llama-style"][1])
    calls = {c["path"]: c for c in trace_shapes("gpt", cfg, 3, 7)}
    assert calls["blocks.0.attn.k_proj"]["output"] == "(3, 7, 20)"  # 2 kv heads of 10
    kernel = calls["blocks.0.attn: softmax(q k^T) v"]
    assert kernel["input"] == "(3, 4, 7, 10), (3, 2, 7, 10), (3, 2, 7, 10)" and kernel["output"] == "(3, 4, 7, 10)"
    assert calls["lm_head"]["output"] == "(3, 7, 53)" and not any(".blocks.1" in p for p in calls)
