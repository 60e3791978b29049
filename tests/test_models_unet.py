"""The unet and vae families: parity with diffusers' UNet2DModel, analytic parameters, FLOPs and saved
activations against PyTorch, invariants (guidance's null label, zero-initialized branches), config errors."""

import math

import pytest
import torch

from weightsmith.analysis import count_params, forward_flops
from weightsmith.analysis.components import rows_for
from weightsmith.analysis.dataflow import example_input, meta_forward_flops, trace_shapes
from weightsmith.analysis.flops import flop_counter
from weightsmith.analysis.memory import row_activation_elements
from weightsmith.errors import ConfigError
from weightsmith.registry import create_model, list_models, resolve

UNET_TINY = {
    "two-levels": dict(in_channels=3, image_size=12, n_classes=5, widths=[8, 16], n_res_blocks=1,
                       attn_resolutions=[6], d_head=8, n_groups=4),
    "three-levels-unconditional": dict(in_channels=2, image_size=16, n_classes=0, widths=[8, 16, 24],
                                       n_res_blocks=2, attn_resolutions=[16, 4], d_head=4, n_groups=4),
    "one-level": dict(in_channels=1, image_size=7, n_classes=3, widths=[6], n_res_blocks=1, attn_resolutions=[7],
                      d_head=3, n_groups=3),
}
VAE_TINY = {"vae-two": dict(in_channels=3, image_size=12, widths=[5, 7], d_latent=3),
            "vae-three": dict(in_channels=1, image_size=16, widths=[4, 6, 10], d_latent=11)}


def _unet_inputs(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([0.0, 17.0, 999.0])[:B]
    y = torch.randint(cfg.n_classes + 1, (B,), generator=g) if cfg.n_classes else None
    return x, t, y


def _perturb(model, seed=0):
    """Replace the zero initialization of the residual branches so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------------------
# parity with diffusers

def _diffusers_unet(kw):
    diffusers = pytest.importorskip("diffusers")
    _, cfg = resolve("unet", kw)
    attn = [s in cfg.attn_resolutions for s in cfg.resolutions]
    return diffusers.UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.widths), layers_per_block=cfg.n_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=cfg.d_head, norm_num_groups=cfg.n_groups, norm_eps=cfg.norm_eps,
        num_class_embeds=cfg.n_classes + 1 if cfg.n_classes else None), cfg


@pytest.mark.parametrize("key", ["two-levels", "three-levels-unconditional"])
def test_unet_matches_diffusers_unet2dmodel(key):
    from weightsmith.ship.diffusers_convert import unet_config_from_diffusers, unet_state_dict_from_diffusers

    torch.manual_seed(0)
    ref, cfg = _diffusers_unet(UNET_TINY[key])
    ref.eval()
    assert unet_config_from_diffusers(dict(ref.config)) == {**UNET_TINY[key], "dropout": 0.0, "norm_eps": 1e-5}
    model = create_model("unet", **UNET_TINY[key]).eval()
    model.load_state_dict(unet_state_dict_from_diffusers(ref.state_dict()), strict=True)
    x, t, y = _unet_inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
        got = model(x, t, y)
    assert want.abs().mean() > 1e-2  # diffusers' init is not zero: the comparison has signal
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ddpm_cifar10_preset_has_the_published_size():
    """Ho et al. 2020: 35.7M parameters; 35,746,307 is diffusers' UNet2DModel of the same layout."""
    from weightsmith.config import to_dict

    ref, _ = _diffusers_unet(to_dict(resolve("unet-ddpm-cifar10")[1]))
    n_ref = sum(p.numel() for p in ref.parameters())
    fam, cfg = resolve("unet-ddpm-cifar10")
    assert count_params("unet", cfg) == n_ref == 35_746_307
    assert sum(p.numel() for p in create_model("unet-ddpm-cifar10", device="meta").parameters()) == n_ref


# ---------------------------------------------------------------------------------------------------
# analysis against PyTorch

@pytest.mark.parametrize("name", sorted(list_models("unet*") + list_models("vae*")))
def test_presets_params_and_flops_match_pytorch(name):
    fam, cfg = resolve(name)
    model = create_model(name, device="meta")
    assert count_params(fam.name, cfg) == sum(p.numel() for p in model.parameters())
    per_image = forward_flops(fam.name, cfg, 1)["total"]
    assert meta_forward_flops(fam.name, cfg, 2, 1) == pytest.approx(2 * per_image, rel=0.01)


@pytest.mark.parametrize("family, key", [("unet", k) for k in UNET_TINY] + [("vae", k) for k in VAE_TINY])
def test_flops_on_cpu_and_saved_activations_match(family, key):
    kw = (UNET_TINY | VAE_TINY)[key]
    _, cfg = resolve(family, kw)
    torch.manual_seed(0)
    model = create_model(family, **kw).train()
    B = 3
    if family == "unet":
        args = _unet_inputs(cfg, B)
    else:
        args = (torch.rand(B, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1, torch.randn(B, cfg.d_latent))
    with torch.no_grad(), flop_counter() as fc:
        model(*args)
    assert forward_flops(family, cfg, 1)["total"] * B == pytest.approx(fc.get_total_flops(), rel=0.01)
    assert count_params(family, cfg) == sum(p.numel() for p in model.parameters())
    # saved tensors of a training forward, deduplicated by storage (parameters excluded, the input included)
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if t.is_floating_point() and st.data_ptr() not in state:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args)
        sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
    predicted = 4 * sum(row_activation_elements(r, B, 1) for r in rows_for(family, cfg))
    assert predicted == pytest.approx(sum(seen.values()), rel=0.01)


def test_analysis_sees_the_unet_forward_with_times_and_labels():
    _, cfg = resolve("unet-fmnist")
    (x, t, y), kw = example_input(cfg, 3)
    assert x.shape == (3, 1, 28, 28) and t.shape == y.shape == (3,) and y.dtype == torch.long and kw == {}
    calls = {c["path"]: c for c in trace_shapes("unet", cfg, 2, 1)}
    assert calls["conv_in"]["output"] == "(2, 16, 28, 28)"
    assert calls["down.1.resample"]["output"] == "(2, 32, 7, 7)"
    assert calls["up.0.blocks.0"]["input"].startswith("(2, 128, 7, 7)")  # 64 + a 64-channel skip
    assert calls["conv_out"]["output"] == "(2, 1, 28, 28)"


def test_inspect_reports_per_image_numbers():
    from weightsmith.analysis import inspect_model

    r = inspect_model("unet-fmnist", batch_size=4)
    assert r["unit"] == "image" and r["params_total"] == count_params("unet", resolve("unet-fmnist")[1])
    assert r["flops_fwd_per_token"] == forward_flops("unet", resolve("unet-fmnist")[1], 1)["total"]


# ---------------------------------------------------------------------------------------------------
# invariants

def test_unet_starts_at_zero_and_every_parameter_gets_a_gradient():
    model = create_model("unet", **UNET_TINY["two-levels"])
    _, cfg = resolve("unet", UNET_TINY["two-levels"])
    x, t, y = _unet_inputs(cfg)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # conv_out starts at zero
    _perturb(model)
    out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_no_label_is_the_null_label_and_labels_and_times_matter():
    kw = UNET_TINY["two-levels"]
    _, cfg = resolve("unet", kw)
    model = _perturb(create_model("unet", **kw)).eval()
    x, t, _ = _unet_inputs(cfg)
    with torch.no_grad():
        null = torch.full((3,), cfg.n_classes)
        torch.testing.assert_close(model(x, t, None), model(x, t, null))
        assert not torch.allclose(model(x, t, torch.zeros(3, dtype=torch.long)), model(x, t, null))
        assert not torch.allclose(model(x, t + 1, null), model(x, t, null))
        # each image is its own: the batch does not mix (GroupNorm, not BatchNorm)
        torch.testing.assert_close(model(x[:1], t[:1], null[:1]), model(x, t, null)[:1], rtol=1e-4, atol=1e-6)
    uncond = create_model("unet", **UNET_TINY["three-levels-unconditional"])
    with pytest.raises(ValueError, match="unconditional"):
        uncond(torch.zeros(1, 2, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_timestep_embedding_is_the_transformer_sinusoid():
    from weightsmith.models.unet import timestep_embedding

    t = torch.tensor([0.0, 3.0, 250.0])
    emb = timestep_embedding(t, 8)
    for i, tv in enumerate(t.tolist()):
        for j in range(4):
            f = 10000 ** (-j / 4)
            assert emb[i, j].item() == pytest.approx(math.cos(tv * f), abs=1e-5)
            assert emb[i, 4 + j].item() == pytest.approx(math.sin(tv * f), abs=1e-5)


def test_vae_reparameterization_and_deterministic_mean():
    kw = VAE_TINY["vae-two"]
    torch.manual_seed(0)
    model = create_model("vae", **kw)
    x = torch.rand(4, 3, 12, 12) * 2 - 1
    noise = torch.randn(4, 3)
    x_mean, x_log_scale, mean, logvar = model(x, noise)
    assert x_mean.shape == x_log_scale.shape == x.shape and mean.shape == logvar.shape == (4, 3)
    torch.testing.assert_close(x_mean, model.decode(mean + torch.exp(0.5 * logvar) * noise)[0])
    torch.testing.assert_close(model(x)[0], model.decode(mean)[0])  # no noise: the latent mean
    assert (x_log_scale >= -7.0).all()
    (x_mean.sum() + mean.sum() + logvar.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("family, overrides, field", [
    ("unet", dict(widths=[8, 12]), "n_groups"),
    ("unet", dict(image_size=14, widths=[8, 16, 32]), "image_size"),
    ("unet", dict(attn_resolutions=[5]), "attn_resolutions"),
    ("unet", dict(d_head=5), "d_head"),
    ("unet", dict(n_classes=-1), "n_classes"),
    ("unet", dict(widths=[]), "widths"),
    ("unet", dict(dropout=1.0), "dropout"),
    ("vae", dict(image_size=14), "image_size"),
    ("vae", dict(d_latent=0), "d_latent"),
])
def test_config_errors_name_the_field(family, overrides, field):
    with pytest.raises(ConfigError, match=field):
        resolve(family, overrides)
