"""`weightsmith inspect` on a U-Net: the FLOPs of one sample (NFE x forwards x FLOPs per forward) equal what
the real samplers run, counted with a forward hook and with torch's FlopCounterMode (analysis.flops.flop_counter)."""

import pytest
import torch
from test_cli import one_line_error, run_cli

from weightsmith.analysis.inspect import inspect_model
from weightsmith.errors import ConfigError
from weightsmith.registry import create_model
from weightsmith.tasks.diffusion import alphas_cumprod, make_betas, sample_ddpm, sample_flow

TINY = dict(in_channels=1, image_size=8, n_classes=3, widths=[4, 8], n_res_blocks=1, attn_resolutions=[4],
            d_head=4, n_groups=2)


def _run(model, sampler, steps, guidance, B):
    """(forwards per image, total FLOPs) of one real sampling run of B images."""
    from weightsmith.analysis.flops import flop_counter  # FlopCounterMode, with the CPU SDPA kernel counted

    images = []
    handle = model.register_forward_hook(lambda m, args, out: images.append(args[0].shape[0]))
    labels = torch.arange(B) % 3
    g = torch.Generator().manual_seed(0)
    with flop_counter() as counter:
        if sampler in ("ddim", "ddpm"):
            ab = alphas_cumprod(make_betas("linear", 100))
            sample_ddpm(model, ab, (B, 1, 8, 8), sampler=sampler, steps=steps, guidance=guidance, labels=labels,
                        generator=g)
        else:
            sample_flow(model, (B, 1, 8, 8), method=sampler, steps=steps, guidance=guidance, labels=labels,
                        generator=g)
    handle.remove()
    return sum(images) / B, counter.get_total_flops()


@pytest.mark.parametrize("sampler, steps, guidance", [("ddim", 5, 1.0), ("ddpm", 4, 2.0), ("euler", 3, 1.5),
                                                      ("heun", 3, 1.0), ("heun", 2, 2.0)])
def test_flops_per_sample_equal_the_samplers_forwards(sampler, steps, guidance):
    model = create_model("unet", **TINY).eval()
    B = 3
    forwards, flops = _run(model, sampler, steps, guidance, B)
    sp = inspect_model("unet", overrides=TINY, sampler=sampler, steps=steps, guidance=guidance)["sampling"]
    assert sp["forwards_per_image"] == forwards
    assert sp["nfe"] == steps * (2 if sampler == "heun" else 1)  # Heun evaluates its corrector at every step
    assert sp["forwards_per_image"] == sp["nfe"] * (2 if guidance != 1.0 else 1)
    assert sp["flops_per_sample"] == sp["forwards_per_image"] * sp["flops_fwd_per_image"]
    assert sp["flops_per_sample"] * B == flops  # the analytic count is exact for the U-Net


def test_sampling_defaults_come_from_the_recipe_and_bad_options_fail(tmp_path):
    recipe = tmp_path / "flow.toml"
    recipe.write_text('[task]\nname = "flow-matching"\nsampler = "heun"\nsample_steps = 7\nguidance = 1.5\n'
                      '[data]\nsource = "fashion-mnist"\n'
                      '[model]\nfamily = "unet"\nwidths = [4, 8]\nattn_resolutions = [14]\nd_head = 4\nn_groups = 2\n')
    sp = inspect_model(str(recipe))["sampling"]
    assert (sp["sampler"], sp["steps"], sp["guidance"], sp["nfe"], sp["forwards_per_image"]) == ("heun", 7, 1.5, 14,
                                                                                                  28)
    sp = inspect_model(str(recipe), steps=3, guidance=1.0)["sampling"]
    assert (sp["sampler"], sp["nfe"], sp["forwards_per_image"]) == ("heun", 6, 6)
    preset = inspect_model("unet-fmnist")["sampling"]  # a preset: ddpm's defaults (ddim, 50 steps, no guidance)
    assert (preset["sampler"], preset["steps"], preset["forwards_per_image"]) == ("ddim", 50, 50)
    with pytest.raises(ConfigError, match="class-conditional"):
        inspect_model("unet", overrides={**TINY, "n_classes": 0}, guidance=2.0)
    with pytest.raises(ConfigError, match="unet models"):
        inspect_model("gpt2", steps=3)


def test_inspect_cli_prints_the_flops_per_sample():
    proc = run_cli("inspect", "unet-fmnist", "--sampler", "heun", "--steps", "25", "--guidance", "2")
    assert proc.returncode == 0, proc.stderr
    assert "sampling     heun 25 steps, guidance 2: NFE 50, 100 forwards/image" in proc.stdout
    one_line_error(run_cli("inspect", "gpt2", "--steps", "4"), "apply to unet models")
