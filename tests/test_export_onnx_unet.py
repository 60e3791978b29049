"""ONNX export of the unet denoiser: onnxruntime's output equals the torch U-Net's (conditional and
unconditional, dynamic batch), and `weightsmith export RUN --format onnx` on a ddpm run exports the EMA
weights that sampling uses."""

import json

import numpy as np
import pytest
import torch
from shapes_folder import draw_shapes
from test_cli import one_line_error, run_cli

from weightsmith.registry import create_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY = {"conditional": dict(in_channels=2, image_size=12, n_classes=5, widths=[8, 16], n_res_blocks=1,
                            attn_resolutions=[6], d_head=8, n_groups=4),
        "unconditional": dict(in_channels=1, image_size=8, n_classes=0, widths=[4, 8], n_res_blocks=1,
                              attn_resolutions=[4], d_head=4, n_groups=2)}


def _feeds(cfg, B, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.rand(B, generator=g) * 999
    y = torch.randint(cfg.n_classes + 1, (B,), generator=g) if cfg.n_classes else None  # the null label too
    return x, t, y


def _max_diff(session, model, B, seed):
    x, t, y = _feeds(model.config, B, seed)
    feeds = {"x": x.numpy(), "t": t.numpy()} | ({"y": y.numpy()} if y is not None else {})
    got = session.run(["prediction"], feeds)[0]
    with torch.no_grad():
        want = model(x, t, y).numpy()
    assert got.shape == want.shape == tuple(x.shape)
    return float(np.abs(got - want).max()), float(np.abs(want).max())


@pytest.mark.parametrize("name", list(TINY))
def test_onnx_denoiser_equals_torch_for_any_batch(tmp_path, name):
    from weightsmith.ship.export_onnx import export_onnx_denoiser

    torch.manual_seed(0)
    model = create_model("unet", **TINY[name]).eval()
    with torch.no_grad():  # the zero-initialized branches (conv2, conv_out) would hide most of the graph
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    export_onnx_denoiser(model, {"class_names": []}, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == (["x", "t", "y"] if model.config.n_classes else ["x", "t"])
    for B, seed in ((1, 1), (3, 2), (7, 3)):
        diff, scale = _max_diff(session, model, B, seed)
        assert scale > 0.1 and diff < 1e-4, (name, B, diff)


def test_export_cli_on_a_ddpm_run_uses_the_ema_weights(tmp_path, cache_dir):
    from weightsmith.recipe import recipe_from_tree
    from weightsmith.ship.sample import open_generative_run
    from weightsmith.train.loop import run_training

    folder = draw_shapes(tmp_path / "shapes", n_per_class=10)
    tree = {"task": {"name": "ddpm", "n_samples": 3, "eval_images": 4, "sample_steps": 2, "ema_decay": 0.5},
            "data": {"source": str(folder), "image_size": 12},
            "model": {"family": "unet", "widths": [8, 16], "n_res_blocks": 1, "attn_resolutions": [6], "d_head": 8,
                      "n_groups": 4},
            "train": {"batch_size": 8, "max_steps": 4, "warmup_steps": 1, "lr": 1e-2, "eval_every": 100,
                      "ckpt_every": 100, "log_every": 1}}
    run = run_training(recipe_from_tree(tree), tmp_path / "run", log=lambda *a: None)
    out = tmp_path / "onnx"
    proc = run_cli("export", run, "--format", "onnx", "--out", out, env={"WEIGHTSMITH_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "export.json").read_text())
    assert meta["weights"] == "ema" and meta["format"] == "onnx"
    labels = json.loads((out / "labels.json").read_text())
    assert labels["task"] == "ddpm" and labels["class_names"] == ["hbars", "square", "vbars"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    task, model = open_generative_run(run)
    raw_diff, _ = _max_diff(session, model.eval(), 3, 0)
    with task.sampling_weights(model):
        ema_diff, _ = _max_diff(session, model, 3, 0)
    assert ema_diff < 1e-4 < raw_diff  # the graph holds the EMA weights, not the raw ones
    one_line_error(run_cli("export", run, "--format", "onnx", "--out", out), "already exists")
    one_line_error(run_cli("export", run, "--format", "gguf", "--out", tmp_path / "g"), "onnx only")


def test_export_refuses_a_vae_run_in_one_line(tmp_path):
    run = tmp_path / "vae-run"
    run.mkdir()
    (run / "config.toml").write_text('[task]\nname = "vae"\n[model]\nfamily = "vae"\n')
    (run / "labels.json").write_text("{}")
    one_line_error(run_cli("export", run, "--format", "onnx", "--out", tmp_path / "o"), "model.family='vae'",
                   "'unet'")
