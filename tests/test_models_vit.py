"""Vision Transformer: golden parameter count, the analytic model (parameters, FLOPs, saved activations,
training peak) against measurement, invariants (shapes, token-permutation equivariance, pooling,
gradients), the inspect report, and fp32 parity with Hugging Face's ViTForImageClassification."""

import functools
import gc
import random

import pytest
import torch
import torch.nn.functional as F

from weightsmith.analysis import count_params, forward_flops, memory_estimate
from weightsmith.analysis.components import rows_for
from weightsmith.analysis.flops import flop_counter
from weightsmith.analysis.memory import row_activation_elements
from weightsmith.config import to_dict
from weightsmith.errors import ConfigError
from weightsmith.registry import create_model, get_family, list_models, resolve
from weightsmith.train.activation_checkpointing import apply_activation_checkpointing

# distinct sizes so that a swapped axis cannot pass: B=3 images, C=2, 12x12 pixels, 4x4 patches -> N=9
TINY = dict(in_channels=2, image_size=12, patch_size=4, n_classes=7, d_model=30, n_layers=2, n_heads=3, d_ff=44)
CONFIGS = {
    "cls": TINY,
    "mean": {**TINY, "pool": "mean"},
    "tanh-nobias": {**TINY, "gelu": "tanh", "bias": False, "n_layers": 3},
    "fmnist": to_dict(resolve("vit-fmnist")[1]),  # the preset itself
}


def _build(key, seed=0):
    torch.manual_seed(seed)
    kw = CONFIGS[key]
    return resolve("vit", kw)[1], create_model("vit", **kw)


def _images(cfg, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)


# ---------------------------------------------------------------------------------------------------
# parameters and FLOPs

def test_vit_b16_has_the_published_parameter_count():
    """torchvision's vit_b_16 and timm's vit_base_patch16_224: 86,567,656 parameters."""
    model = create_model("vit-b16", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 86_567_656
    assert count_params("vit", resolve("vit-b16")[1]) == 86_567_656
    assert get_family("vit").task == "classification"


def test_analytic_params_equal_numel_for_presets_and_random_configs():
    configs = [resolve(n)[1] for n in list_models("vit*")]  # the family name resolves to the defaults
    rng = random.Random(0)
    for _ in range(30):
        heads, patch = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3, 5])
        configs.append(resolve("vit", dict(
            in_channels=rng.randint(1, 4), patch_size=patch, image_size=patch * rng.randint(1, 4),
            n_classes=rng.randint(2, 13), d_model=heads * rng.choice([2, 4, 6]), n_heads=heads,
            n_layers=rng.randint(1, 3), d_ff=rng.randint(3, 40), pool=rng.choice(["cls", "mean"]),
            bias=rng.random() < 0.5))[1])
    for cfg in configs:
        model = create_model("vit", device="meta", **to_dict(cfg))
        assert count_params("vit", cfg) == sum(p.numel() for p in model.parameters()), cfg


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_forward_flops_match_flop_counter(key):
    """Per image: the patch convolution, every linear layer and the attention products Q K^T, P V, at 2
    FLOPs per multiply-add; ``flop_counter`` counts the CPU flash-attention kernel too. Exact."""
    cfg, model = _build(key)
    model.eval()
    B = 3
    with torch.no_grad(), flop_counter() as fc:
        model(_images(cfg, B))
    predicted = forward_flops("vit", cfg, 1)["total"] * B  # seq_len = 1: one "token" is one image
    assert predicted == pytest.approx(fc.get_total_flops(), rel=0.01)


def test_vit_b16_forward_flops_on_meta():
    """17.56 G multiply-adds per 224x224 image (the "17.6 GFLOPs" of the timm/torchvision tables, which
    count multiply-adds), counted by FlopCounterMode on a meta-device model."""
    _, cfg = resolve("vit-b16")
    model = create_model("vit-b16", device="meta").eval()
    with torch.no_grad(), flop_counter() as fc:
        model(torch.empty(2, 3, 224, 224, device="meta"))
    assert forward_flops("vit", cfg, 1)["total"] * 2 == pytest.approx(fc.get_total_flops(), rel=1e-9)
    assert forward_flops("vit", cfg, 1)["total"] == pytest.approx(35.13e9, rel=1e-3)


# ---------------------------------------------------------------------------------------------------
# memory

def _saved_activation_bytes(model, x, y):
    """Bytes of floating-point tensors autograd saves for backward, deduplicated by storage."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if t.is_floating_point() and st.data_ptr() not in param_storages:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return sum(seen.values())


@pytest.mark.parametrize("key", ["cls", "mean", "tanh-nobias"])
def test_saved_activations_match_analytic(key):
    """Measured: the prediction is exact up to the loss's 4-byte scalar (|error| < 0.1%)."""
    cfg, model = _build(key)
    B = 5
    measured = _saved_activation_bytes(model, _images(cfg, B), torch.arange(B) % cfg.n_classes)
    # the logits are held by the caller, not saved by autograd
    predicted = 4 * sum(row_activation_elements(r, B, 1) - B * r.act_held for r in rows_for("vit", cfg))
    assert predicted == pytest.approx(measured, rel=1e-3)


def _profiled_train_peak(kw, B, checkpointing=False):
    """Peak CPU bytes over three AdamW steps, from torch.profiler's allocator events (model and optimizer
    creation included; the image batch is allocated before the window, as the data loader would)."""
    return _profiled_train_peak_cached(tuple(sorted(kw.items())), B, checkpointing)


@functools.cache  # two tests measure the deep config
def _profiled_train_peak_cached(items, B, checkpointing):
    from torch.profiler import ProfilerActivity, profile

    kw = dict(items)
    torch.manual_seed(0)
    cfg = resolve("vit", kw)[1]
    x, y = _images(cfg, B), torch.arange(B) % cfg.n_classes
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model = create_model("vit", **kw)
            if checkpointing:
                apply_activation_checkpointing(model)
            opt = torch.optim.AdamW(model.parameters(), foreach=False)
            for _ in range(3):
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


DEEP = dict(in_channels=2, image_size=16, patch_size=2, n_classes=7, d_model=32, n_layers=6, n_heads=4, d_ff=64)


@pytest.mark.parametrize("kw, B", [(CONFIGS["cls"], 8), (CONFIGS["mean"], 8), (DEEP, 8)],
                         ids=["cls", "mean", "deep"])
def test_training_peak_memory_matches_profiled(kw, B):
    """Measured error of ``train_peak``: -3.2% to -1.5% (the weights-dominated tiny configs, the deep one
    where activations are 80% of the peak, and vit-fmnist at B=32); the estimate is on the low side."""
    measured = _profiled_train_peak(kw, B)
    predicted = memory_estimate("vit", resolve("vit", kw)[1], batch_size=B, seq_len=1)["train_peak"]
    assert predicted == pytest.approx(measured, rel=0.06)


def test_activation_checkpointing_peak_is_predicted_and_the_gradients_are_unchanged():
    """Measured error of ``train_peak_checkpointed``: -3.8% to -1.9% (same configs as above)."""
    B = 8
    ckpt = _profiled_train_peak(DEEP, B, checkpointing=True)
    assert ckpt < 0.5 * _profiled_train_peak(DEEP, B)
    cfg = resolve("vit", DEEP)[1]
    assert memory_estimate("vit", cfg, batch_size=B, seq_len=1)["train_peak_checkpointed"] == pytest.approx(
        ckpt, rel=0.08)
    x = _images(cfg, 4)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model("vit", **DEEP)
        if checkpointing:
            assert apply_activation_checkpointing(model) == DEEP["n_layers"]
        model(x).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# invariants

def test_forward_shape_and_input_checks():
    cfg, model = _build("cls")
    assert model(_images(cfg, 3)).shape == (3, 7)
    assert model.pos_emb.shape == (9 + 1, 30) and model.patch_emb.weight.shape == (30, 2, 4, 4)
    with pytest.raises(ValueError, match=r"\(B, 2, 12, 12\)"):
        model(torch.randn(3, 2, 12, 8))
    with pytest.raises(ValueError, match=r"\(B, 2, 12, 12\)"):
        model(torch.randn(3, 3, 12, 12))


@pytest.mark.parametrize("overrides, field", [
    (dict(image_size=13), "image_size"), (dict(n_heads=4), "n_heads"), (dict(n_classes=0), "n_classes"),
    (dict(pool="max"), "pool"), (dict(d_ff=0), "d_ff"), (dict(vocab_size=5), "vocab_size"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        resolve("vit", {**TINY, **overrides})


@pytest.mark.parametrize("key", ["cls", "tanh-nobias"])
def test_encoder_blocks_commute_with_token_permutation(key):
    """No mask and no position information inside a block: permuting the tokens permutes the output."""
    cfg, model = _build(key)
    x = torch.randn(3, 11, cfg.d_model)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = x, x[:, perm]
        for block in model.blocks:
            a, b = block(a), block(b)
    torch.testing.assert_close(b, a[:, perm], rtol=1e-5, atol=1e-5)


def _shuffle_patches(images, P, perm):
    """(B, C, H, W) -> the same image with its P x P patches moved: patch perm[j] goes to position j."""
    B, C, H, W = images.shape
    p = images.unfold(2, P, P).unfold(3, P, P)  # (B, C, H/P, W/P, P, P)
    p = p.reshape(B, C, -1, P, P)[:, :, perm]  # (B, C, N, P, P), reordered
    p = p.reshape(B, C, H // P, W // P, P, P).permute(0, 1, 2, 4, 3, 5)  # (B, C, H/P, P, W/P, P)
    return p.reshape(B, C, H, W)


@pytest.mark.parametrize("key", ["cls", "mean"])
def test_pooling(key):
    """Both poolings read the tokens as a set once the position embeddings are zero (moving patches
    leaves the logits unchanged, and with positions it does not); ``cls`` classifies the class token's
    final state, ``mean`` the average of the N patch tokens and has no class token."""
    cfg, model = _build(key)
    x = _images(cfg, 3)
    perm = torch.randperm(cfg.n_patches, generator=torch.Generator().manual_seed(3))
    shuffled = _shuffle_patches(x, cfg.patch_size, perm)
    with torch.no_grad():
        assert not torch.allclose(model(shuffled), model(x), atol=1e-4)
        h = model.embed(x)
        for block in model.blocks:
            h = block(h)
        if key == "cls":
            assert model.cls_token is not None and h.shape[1] == cfg.n_patches + 1
            pooled = h[:, 0]
        else:
            assert model.cls_token is None and h.shape[1] == cfg.n_patches
            pooled = h.mean(1)
        torch.testing.assert_close(model(x), model.head(model.final_norm(pooled)))
        model.pos_emb.zero_()
        torch.testing.assert_close(model(shuffled), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_every_parameter_gets_a_finite_gradient(key):
    cfg, model = _build(key)
    out = model(_images(cfg, 3))
    assert out.shape == (3, cfg.n_classes) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(3) % cfg.n_classes).backward()
    bad = [n for n, p in model.named_parameters()
           if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not bad, f"parameters without a finite nonzero gradient: {bad}"


# ---------------------------------------------------------------------------------------------------
# inspect

def test_inspect_vit_b16(capsys):
    """Per image (seq_len = 1): 35.13 GFLOPs forward, no KV cache, the module table sums to the total."""
    import json

    from weightsmith.analysis import inspect_model
    from weightsmith.cli import main

    r = inspect_model("vit-b16", seq_len=1, batch_size=2)
    assert r["params_total"] == 86_567_656 and r["kv_cache_bytes"] == 0
    assert r["flops_fwd_per_token"] == pytest.approx(35.13e9, rel=1e-3)
    assert sum(m["params"] * m["count"] for m in r["modules"]) == r["params_total"]
    assert main(["inspect", "vit-b16", "--json"]) == 0  # no --seq-len: an image model runs at 1
    assert json.loads(capsys.readouterr().out)["params_total"] == 86_567_656


# ---------------------------------------------------------------------------------------------------
# Hugging Face parity

@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_logits_match_hf_vit_in_fp32(gelu):
    """A tiny random model, converted with the production converter, gives HF's logits (max abs
    difference 1-2e-7 at fp32, logits ~2); the reverse converter gives back our config and state dict."""
    transformers = pytest.importorskip("transformers")
    from weightsmith.ship.hf_convert_vit import hf_to_vit, vit_to_hf

    kw = {**TINY, "gelu": gelu}
    torch.manual_seed(0)
    cfg, ours = resolve("vit", kw)[1], create_model("vit", **kw)
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or swapped tensor cannot pass
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf_config, hf_sd = vit_to_hf(cfg, ours.state_dict())
    theirs = transformers.ViTForImageClassification(transformers.ViTConfig(**hf_config)).eval()
    theirs.load_state_dict(hf_sd, strict=True)
    ours.eval()
    x = _images(cfg, 3)
    with torch.no_grad():
        ref = theirs(pixel_values=x).logits
        assert ref.shape == (3, 7)
        torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)
    back_cfg, back_sd = hf_to_vit(theirs.config.to_dict(), theirs.state_dict())
    assert to_dict(back_cfg) == to_dict(cfg)
    rebuilt = create_model("vit", **kw)
    rebuilt.load_state_dict(back_sd, strict=True)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("overrides, field", [(dict(pool="mean"), "pool"), (dict(bias=False), "bias")])
def test_hf_export_names_the_inexpressible_field(overrides, field):
    from weightsmith.ship.hf_convert_vit import vit_to_hf

    cfg = resolve("vit", {**TINY, **overrides})[1]
    model = create_model("vit", **{**TINY, **overrides})
    with pytest.raises(ConfigError, match=f"model.{field}"):
        vit_to_hf(cfg, model.state_dict())
