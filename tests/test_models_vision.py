"""Image classifiers (mlp, resnet, convnext): published sizes, the analytic model against PyTorch
(numel, FlopCounterMode, saved tensors, a profiled training step), inspect on images, and invariants
(output shapes at odd sizes, BatchNorm train/eval, stochastic depth, a few steps of training)."""

import gc
import json
import random

import pytest
import torch
import torch.nn.functional as F

from weightsmith.analysis import count_params, forward_flops, inspect_model, memory_estimate
from weightsmith.analysis.components import rows_for
from weightsmith.analysis.components_vision import is_image_config
from weightsmith.analysis.dataflow import example_input, meta_forward_flops, trace_shapes
from weightsmith.analysis.flops import flop_counter
from weightsmith.analysis.memory import row_activation_elements
from weightsmith.errors import ConfigError
from weightsmith.registry import create_model, get_family, get_preset, list_families, list_models, resolve

FAMILIES = ("mlp", "resnet", "convnext")
PRESETS = [n for n in list_models() if n not in list_families() and get_preset(n).family in FAMILIES]

GOLDEN = {"resnet18": 11_689_512, "resnet50": 25_557_032, "convnext-tiny": 28_589_128}  # torchvision / timm
# forward multiply-adds per 224x224 image as the papers report them: ResNet-18 1.8G, ResNet-50 (v1.5) 4.1G,
# ConvNeXt-T 4.5G
GOLDEN_MACS = {"resnet18": 1.8e9, "resnet50": 4.1e9, "convnext-tiny": 4.5e9}

# distinct small sizes (B = 3 images, 7 classes, 2 channels) so that a swapped axis cannot pass
TINY = {
    "mlp-batch-relu": ("mlp", dict(in_channels=2, image_size=5, n_classes=7, n_layers=2, d_hidden=11, norm="batch")),
    "mlp-layer-gelu-drop": ("mlp", dict(in_channels=2, image_size=5, n_classes=7, n_layers=2, d_hidden=11,
                                        norm="layer", activation="gelu", dropout=0.2)),
    "mlp-none-silu": ("mlp", dict(in_channels=2, image_size=5, n_classes=7, n_layers=3, d_hidden=13,
                                  activation="silu")),
    "resnet-basic": ("resnet", dict(in_channels=2, image_size=13, n_classes=7, depths=[2, 1], widths=[5, 6],
                                    stem_width=3, stem_kernel_size=3, stem_stride=1, stem_pool=False)),
    "resnet-bottleneck": ("resnet", dict(in_channels=2, image_size=33, n_classes=7, block="bottleneck",
                                         depths=[1, 2], widths=[3, 5], stem_width=4)),
    "convnext": ("convnext", dict(in_channels=2, image_size=23, n_classes=7, depths=[2, 1], dims=[5, 6],
                                  stem_patch_size=2)),
    "convnext-drop-path": ("convnext", dict(in_channels=2, image_size=23, n_classes=7, depths=[1, 2], dims=[6, 4],
                                            stem_patch_size=2, kernel_size=5, mlp_ratio=3, drop_path=0.3)),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These convolutions are tiny: a second thread buys nothing, and on a busy 2-core machine OpenMP's
    waits at every op make them 10-20x slower (measured). Restores the session's thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(key):
    family, kw = TINY[key]
    torch.manual_seed(0)
    return family, resolve(family, kw)[1], create_model(family, **kw)


def _images(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    return x, torch.randint(0, cfg.n_classes, (B,), generator=g)


def _random_config(rng, family):
    base = dict(in_channels=rng.randint(1, 4), n_classes=rng.randint(2, 11))
    if family == "mlp":
        return dict(base, image_size=rng.randint(2, 9), n_layers=rng.randint(0, 3), d_hidden=rng.randint(2, 17),
                    norm=rng.choice(["batch", "layer", "none"]), activation=rng.choice(["relu", "gelu", "silu"]),
                    dropout=rng.choice([0.0, 0.3]))
    n = rng.randint(1, 3)
    if family == "resnet":
        k = rng.choice([3, 5, 7])
        return dict(base, image_size=rng.randint(9, 40), block=rng.choice(["basic", "bottleneck"]),
                    depths=[rng.randint(1, 2) for _ in range(n)], widths=[rng.randint(2, 9) for _ in range(n)],
                    stem_width=rng.randint(2, 9), stem_kernel_size=k, stem_stride=rng.choice([1, 2]),
                    stem_pool=rng.random() < 0.5)
    patch = rng.choice([1, 2, 4])
    return dict(base, image_size=patch * 2 ** (n - 1) * rng.randint(1, 4) + rng.randint(0, 3),
                depths=[rng.randint(1, 2) for _ in range(n)], dims=[rng.randint(2, 9) for _ in range(n)],
                stem_patch_size=patch, kernel_size=rng.choice([3, 5, 7]), mlp_ratio=rng.choice([2, 4]),
                drop_path=rng.choice([0.0, 0.2]))


def _random_configs(n_per_family=12):
    rng = random.Random(0)
    return [(family, _random_config(rng, family)) for family in FAMILIES for _ in range(n_per_family)]


# ---------------------------------------------------------------------------------------------------
# registry and parameters

@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_published_parameter_counts(name):
    model = create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == GOLDEN[name]
    fam, cfg = resolve(name)
    assert count_params(fam.name, cfg) == GOLDEN[name]
    assert (cfg.in_channels, cfg.image_size, cfg.n_classes) == (3, 224, 1000)


def test_vision_families_train_classification_and_have_small_presets():
    for family in FAMILIES:
        assert get_family(family).task == "classification"
    assert {"mlp-fmnist", "resnet-fmnist", "convnext-fmnist"} <= set(PRESETS)
    for name in ("mlp-fmnist", "resnet-fmnist", "convnext-fmnist"):
        _, cfg = resolve(name)
        assert (cfg.in_channels, cfg.image_size, cfg.n_classes) == (1, 28, 10)
        assert count_params(get_preset(name).family, cfg) < 1_000_000


@pytest.mark.parametrize("name", PRESETS)
def test_analytic_params_and_flops_match_pytorch_for_presets(name):
    """numel and FlopCounterMode (convolutions + matmuls, 2 per multiply-add) on the meta device."""
    fam, cfg = resolve(name)
    model = create_model(name, device="meta")
    assert count_params(fam.name, cfg) == sum(p.numel() for p in model.parameters())
    rows = rows_for(fam.name, cfg)
    assert sum(r.buffers for r in rows) == sum(b.numel() for n, b in model.named_buffers() if b.is_floating_point())
    per_image = forward_flops(fam.name, cfg, 1)["total"]
    assert meta_forward_flops(fam.name, cfg, 2, 1) == pytest.approx(2 * per_image, rel=0.01)  # B = 2
    if name in GOLDEN_MACS:
        assert per_image / 2 == pytest.approx(GOLDEN_MACS[name], rel=0.05)


def test_analytic_params_and_flops_match_pytorch_for_random_configs():
    for family, kw in _random_configs():
        _, cfg = resolve(family, kw)
        model = create_model(family, device="meta", **kw).eval()
        assert count_params(family, cfg) == sum(p.numel() for p in model.parameters()), (family, kw)
        (x,), _ = example_input(cfg, 3)
        with torch.no_grad(), flop_counter() as fc:
            out = model(x)
        assert out.shape == (3, cfg.n_classes), (family, kw)
        assert forward_flops(family, cfg, 1)["total"] * 3 == pytest.approx(fc.get_total_flops(), rel=0.01), (family, kw)


@pytest.mark.parametrize("key", sorted(TINY))
def test_forward_flops_on_cpu_match_flop_counter(key):
    family, cfg, model = _tiny(key)
    x, _ = _images(cfg, B=3)
    with torch.no_grad(), flop_counter() as fc:
        model.eval()(x)
    assert forward_flops(family, cfg, 1)["total"] * 3 == pytest.approx(fc.get_total_flops(), rel=0.01)


# ---------------------------------------------------------------------------------------------------
# memory

def _saved_activation_bytes(model, x, y):
    """Bytes of floating-point tensors autograd saves for backward, deduplicated by storage; parameters
    and buffers (BatchNorm's running statistics, which batch_norm saves) are model state, not activations."""
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if t.is_floating_point() and st.data_ptr() not in state:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return sum(seen.values())


@pytest.mark.parametrize("key", sorted(TINY) + ["resnet-fmnist", "convnext-fmnist"])
def test_activation_count_matches_saved_tensors(key):
    if key in TINY:
        family, cfg, model = _tiny(key)
    else:
        (fam, cfg), model = resolve(key), create_model(key)
        family = fam.name
    B = 3
    x, y = _images(cfg, B)
    measured = _saved_activation_bytes(model.train(), x, y)
    # the logits are held by the caller, not saved by autograd
    predicted = 4 * sum(row_activation_elements(r, B, 1) - B * r.act_held for r in rows_for(family, cfg))
    assert predicted == pytest.approx(measured, rel=0.01)


def _profiled_train_peak(name, kw, B, steps=2, checkpointing=False):
    """Peak CPU bytes over ``steps`` AdamW steps on one random batch, from torch.profiler's allocator
    events (model and optimizer creation included); gradients stay allocated across steps."""
    from torch.profiler import ProfilerActivity, profile

    from weightsmith.train.activation_checkpointing import apply_activation_checkpointing

    _, cfg = resolve(name, kw)
    torch.manual_seed(0)
    x, y = _images(cfg, B)
    gc.collect()  # a collection inside the window would free earlier tests' tensors and skew the count
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model = create_model(name, **kw)
            if checkpointing:
                apply_activation_checkpointing(model)
            opt = torch.optim.AdamW(model.parameters(), foreach=False)
            for _ in range(steps):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                del loss
                opt.step()
                opt.zero_grad(set_to_none=False)
    finally:
        gc.enable()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("name, kw, B", [
    ("resnet-fmnist", {}, 32), ("convnext-fmnist", {}, 64), ("mlp-fmnist", {}, 64),
    ("resnet", TINY["resnet-bottleneck"][1], 16),  # max-pool stem, bottlenecks
])
def test_training_peak_memory_within_15_percent_of_profiled(name, kw, B):
    """Measured -7% .. +2% for these (weightsmith.analysis.memory states the range)."""
    measured = _profiled_train_peak(name, kw, B)
    fam, cfg = resolve(name, kw)
    m = memory_estimate(fam.name, cfg, batch_size=B, seq_len=1)
    assert m["buffers"] > 0 or fam.name != "resnet"
    assert m["train_peak"] == pytest.approx(measured, rel=0.15)


def test_activation_checkpointing_peak_is_predicted():
    """Every residual block checkpointed keeps only its input (``Row.block_input``); measured -6% .. +2%."""
    kw = dict(in_channels=2, image_size=24, n_classes=7, depths=[3, 3], widths=[8, 16], stem_width=8)
    B = 12
    full = _profiled_train_peak("resnet", kw, B)
    ckpt = _profiled_train_peak("resnet", kw, B, checkpointing=True)
    m = memory_estimate("resnet", resolve("resnet", kw)[1], batch_size=B, seq_len=1)
    assert ckpt < 0.6 * full
    assert m["train_peak"] == pytest.approx(full, rel=0.15)
    assert m["train_peak_checkpointed"] == pytest.approx(ckpt, rel=0.15)


def test_checkpoint_bytes_match_safetensors_file(tmp_path):
    from safetensors.torch import save_model

    model = create_model("resnet-fmnist")
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))  # weights and BatchNorm buffers
    report = inspect_model("resnet-fmnist")
    assert report["checkpoint_bytes"] == pytest.approx(path.stat().st_size, rel=0.01)
    assert report["memory_buffers_bytes"] > 0


# ---------------------------------------------------------------------------------------------------
# inspect and data flow on images

def test_inspect_resnet50_per_module_table():
    from weightsmith.analysis import format_report

    r = inspect_model("resnet50", batch_size=2)
    assert r["seq_len"] == 1 and r["unit"] == "image" and r["params_total"] == GOLDEN["resnet50"]
    assert r["flops_fwd_per_token"] == forward_flops("resnet", resolve("resnet50")[1], 1)["total"]
    assert r["flops_train_per_step"] == 3 * r["flops_fwd_per_token"] * 2
    assert sum(m["params"] * m["count"] for m in r["modules"]) == r["params_total"]
    assert sum(m["flops_fwd_per_token"] * m["count"] for m in r["modules"]) == pytest.approx(r["flops_fwd_per_token"])
    mods = {m["path"]: m for m in r["modules"]}
    assert mods["stages.2.blocks.*.conv2"]["count"] == 6 and mods["stages.2.blocks.0.conv1"]["count"] == 1
    assert mods["stages.3.blocks.*.conv2"]["weights"]["weight"]["shape"] == [512, 512, 3, 3]
    text = format_report(r)
    assert "FLOPs/image" in text and "stages.3.blocks.*.conv2" in text and "KV cache" not in text


def test_cli_inspect_images(capsys):
    from weightsmith.cli import main

    assert main(["inspect", "convnext-tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_total"] == GOLDEN["convnext-tiny"] and report["seq_len"] == 1
    assert main(["inspect", "resnet-fmnist", "--batch-size", "3"]) == 0
    assert "resnet-fmnist (family resnet) at B=3 images" in capsys.readouterr().out
    assert main(["inspect", "resnet50", "--seq-len", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seq_len" in err[0]


def test_inspect_image_recipe_takes_data_decided_fields(tmp_path):
    recipe = tmp_path / "r.toml"
    # an image folder's fields are known only after reading it: the task's stand-ins (2 classes) are used,
    # with the [data] section's channels and image_size
    recipe.write_text('[data]\nsource = "some/folder"\nchannels = 3\nimage_size = 20\n[model]\nfamily = "resnet"\n'
                      'depths = [1, 1]\nwidths = [4, 6]\nstem_width = 4\n')
    r = inspect_model(str(recipe), overrides=["--model.stem_pool=false"])
    assert r["config"]["n_classes"] == 2 and r["config"]["in_channels"] == 3 and "vocab_size" not in r["config"]
    assert r["config"]["image_size"] == 20
    _, cfg = resolve("resnet", dict(n_classes=2, in_channels=3, image_size=20, depths=[1, 1], widths=[4, 6],
                                    stem_width=4,
                                    stem_pool=False))
    assert r["params_total"] == count_params("resnet", cfg)


def test_example_input_is_decided_by_image_size():
    _, img = resolve("resnet-fmnist")
    _, tok = resolve("gpt-tiny")
    assert is_image_config(img) and not is_image_config(tok)
    (x,), kw = example_input(img, 3)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and kw == {}
    (ids,), _ = example_input(tok, 3)
    assert ids.shape == (3, tok.max_seq_len) and ids.dtype == torch.long


def test_trace_shapes_of_a_resnet():
    _, cfg = resolve("resnet-fmnist")
    calls = {c["path"]: c for c in trace_shapes("resnet", cfg, 3, 1)}
    assert calls["stem"]["input"] == "(3, 1, 28, 28)" and calls["stem"]["output"] == "(3, 32, 14, 14)"
    assert calls["stages.1.blocks.0.shortcut"]["output"] == "(3, 64, 7, 7)"
    assert calls["stages.2.blocks.0"]["output"] == "(3, 128, 4, 4)" and calls["head"]["output"] == "(3, 10)"
    assert not any(".blocks.1" in p for p in calls)


# ---------------------------------------------------------------------------------------------------
# invariants

@pytest.mark.parametrize("key", sorted(TINY))
def test_forward_shape_and_every_parameter_gets_a_gradient(key):
    family, cfg, model = _tiny(key)
    x, y = _images(cfg, B=3)
    out = model(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"


@pytest.mark.parametrize("key", ["resnet-basic", "mlp-batch-relu"])
def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval(key):
    family, cfg, model = _tiny(key)
    x, _ = _images(cfg, B=5)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    model.train()
    before = bn.running_mean.clone()
    out = model(x)
    assert not torch.allclose(bn.running_mean, before)  # running statistics updated
    assert not torch.allclose(model(x[:2])[0], out[0], atol=1e-6)  # a sample depends on its batch
    model.eval()
    frozen = bn.running_mean.clone()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1])[0], model(x)[0])  # batch-independent
    torch.testing.assert_close(bn.running_mean, frozen)


def test_convnext_layer_scale_and_stochastic_depth():
    from weightsmith.models.convnext import DropPath

    family, cfg, model = _tiny("convnext-drop-path")
    assert cfg.drop_path_rates() == pytest.approx([0.0, 0.15, 0.3])
    blocks = [b for s in model.stages for b in s.blocks]
    assert blocks[0].drop_path is None and blocks[2].drop_path.p == pytest.approx(0.3)
    assert all(torch.all(b.layer_scale.gamma == 1e-6) for b in blocks)
    x, _ = _images(cfg, B=4)
    model.eval()
    torch.testing.assert_close(model(x), model(x))  # no randomness in evaluation
    drop = DropPath(0.5).train()
    z = torch.ones(64, 3, 2, 2)
    torch.manual_seed(0)
    kept = drop(z).flatten(1)
    assert set(kept.unique().tolist()) == {0.0, 2.0} and (kept == kept[:, :1]).all()  # per sample, scaled
    assert torch.equal(drop.eval()(z), z)


def test_resnet_zero_init_residual_starts_every_block_as_identity_plus_relu():
    torch.manual_seed(0)
    kw = dict(TINY["resnet-basic"][1])
    model = create_model("resnet", **kw).eval()
    block = model.stages[0].blocks[1]  # no shortcut projection: relu(0 + x) = x for x >= 0
    x = torch.rand(2, 5, 13, 13)
    torch.testing.assert_close(block(x), x)
    model = create_model("resnet", zero_init_residual=False, **kw).eval()
    assert not torch.allclose(model.stages[0].blocks[1](x), x)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_of_training_reduce_the_loss(family):
    key = {"mlp": "mlp-batch-relu", "resnet": "resnet-basic", "convnext": "convnext"}[family]
    _, cfg, model = _tiny(key)
    x, y = _images(cfg, B=16, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("family, overrides, field", [
    ("mlp", dict(n_layers=-1), "n_layers"),
    ("mlp", dict(dropout=1.0), "dropout"),
    ("mlp", dict(image_size=0), "image_size"),
    ("resnet", dict(depths=[2, 2], widths=[8]), "depths"),
    ("resnet", dict(widths=[8, 0, 8]), "widths"),
    ("resnet", dict(n_classes=0), "n_classes"),
    ("convnext", dict(kernel_size=6), "kernel_size"),
    ("convnext", dict(image_size=3), "image_size"),
    ("convnext", dict(drop_path=1.5), "drop_path"),
])
def test_config_errors_name_the_field(family, overrides, field):
    with pytest.raises(ConfigError, match=field):
        resolve(family, overrides)
