"""FID / KID through torchmetrics on the penultimate features of a classifier weightsmith trained, the
class-conditional accuracy, and ``weightsmith sample`` on diffusion, flow and VAE runs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from shapes_folder import draw_shapes
from test_cli import one_line_error, run_cli

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.recipe import recipe_from_tree
from weightsmith.train.loop import run_training

pytest.importorskip("torchmetrics")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return draw_shapes(tmp_path_factory.mktemp("images") / "shapes", n_per_class=60)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, folder):
    import os

    os.environ.setdefault("WEIGHTSMITH_CACHE", str(tmp_path_factory.mktemp("cache")))
    tree = {"data": {"source": str(folder), "augment": False},
            "model": {"family": "mlp", "n_layers": 1, "d_hidden": 32},
            "train": {"batch_size": 16, "max_steps": 30, "warmup_steps": 2, "lr": 3e-3, "eval_every": 100,
                      "ckpt_every": 100, "log_every": 10, "eval_batch_size": 64}}
    return run_training(recipe_from_tree(tree), tmp_path_factory.mktemp("clf") / "run", log=lambda *a: None)


def _images(folder):
    names = sorted(p.name for p in folder.iterdir())
    xs, ys = [], []
    for k, name in enumerate(names):
        for f in sorted((folder / name).glob("*.png")):
            xs.append(np.asarray(Image.open(f))[None])
            ys.append(k)
    return np.stack(xs).astype(np.uint8), np.array(ys)


def test_feature_extractor_reads_the_penultimate_layer(classifier_run):
    from weightsmith.eval.fid import load_feature_extractor

    feats = load_feature_extractor(classifier_run)
    assert feats.num_features == 32
    x = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    f = feats(x)
    assert f.shape == (5, 32) and f.dtype == torch.float32
    torch.testing.assert_close(feats.model.head(f), feats.logits(x))  # the head reads exactly these features


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(classifier_run, folder):
    from weightsmith.eval.fid import fid_kid, load_feature_extractor

    feats = load_feature_extractor(classifier_run)
    x, _ = _images(folder)
    same = fid_kid(x, x, feats)
    assert same["n_real"] == same["n_fake"] == 180
    assert abs(same["fid"]) < 1e-3
    perm = np.random.default_rng(1).permutation(len(x))
    halves = fid_kid(x[perm[:90]], x[perm[90:]], feats)  # two samples of one distribution
    fids, kids = [], []
    for shift in (20, 60, 120):
        brighter = np.clip(x[perm[90:]].astype(int) + shift, 0, 255).astype(np.uint8)
        r = fid_kid(x[perm[:90]], brighter, feats)
        fids.append(r["fid"])
        kids.append(r["kid"])
    assert halves["fid"] < fids[0] < fids[1] < fids[2], (halves, fids)
    assert abs(halves["kid"]) < kids[0] < kids[1] < kids[2], (halves, kids)  # KID is unbiased: ~0 at the floor
    with pytest.raises(ConfigError, match="uint8"):
        fid_kid(x.astype(np.float32), x, feats)


def test_sample_quality_sits_beside_the_floor_and_conditional_accuracy(classifier_run, folder):
    from weightsmith.eval.fid import conditional_accuracy, load_feature_extractor, sample_quality

    feats = load_feature_extractor(classifier_run)
    x, y = _images(folder)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    q = sample_quality(x[:40], x[40:90], x[90:], feats)
    assert q["fid_n"] == 40 and q["fid_over_floor"] == pytest.approx(q["fid"] / q["fid_floor"])
    pred = feats.logits(torch.from_numpy(x)).argmax(-1).numpy()
    assert conditional_accuracy(x, y, feats) == pytest.approx(float((pred == y).mean()))
    assert conditional_accuracy(x, y, feats) > 0.9
    with pytest.raises(ConfigError, match="n = 40"):
        sample_quality(x[:40], x[:10], x, feats)
    with pytest.raises(CheckpointError, match="labels.json"):
        load_feature_extractor(folder)


# ---------------------------------------------------------------------------------------------------
# the end-of-run report and `weightsmith sample`

@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory, folder, classifier_run):
    tree = {"task": {"name": "ddpm", "n_samples": 6, "eval_images": 8, "sample_steps": 2, "fid_samples": 12,
                     "classifier_run": str(classifier_run), "guidance": 2.0},
            "data": {"source": str(folder), "image_size": 12},
            "model": {"family": "unet", "widths": [8, 16], "n_res_blocks": 1, "attn_resolutions": [6], "d_head": 8,
                      "n_groups": 4},
            "train": {"batch_size": 8, "max_steps": 3, "warmup_steps": 1, "eval_every": 100, "ckpt_every": 100,
                      "log_every": 1}}
    return run_training(recipe_from_tree(tree), tmp_path_factory.mktemp("ddpm") / "run", log=lambda *a: None)


def test_end_of_run_report_has_fid_kid_floor_and_conditional_accuracy(ddpm_run):
    ev = json.loads((ddpm_run / "eval.json").read_text())
    assert ev["fid_n"] == 12 and ev["fid"] > 0 and ev["fid_floor"] >= 0
    assert 0.0 <= ev["conditional_accuracy"] <= 1.0 and "kid" in ev and "kid_floor" in ev


def test_sample_cli_writes_a_grid_and_the_samples(ddpm_run, tmp_path):
    out = tmp_path / "grid.png"
    proc = run_cli("sample", ddpm_run, "--n", "5", "--sampler", "ddpm", "--steps", "3", "--guidance", "2",
                   "--class", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "NFE 6 per image" in proc.stdout
    samples = np.load(tmp_path / "grid.npy")
    assert samples.shape == (5, 1, 12, 12) and samples.dtype == np.uint8
    assert Image.open(out).size == (3 * 14 + 2, 2 * 14 + 2)
    before = out.read_bytes()
    one_line_error(run_cli("sample", ddpm_run, "--n", "5", "--out", out), "already exists")
    assert out.read_bytes() == before  # nothing overwritten
    one_line_error(run_cli("sample", ddpm_run, "--n", "2", "--sampler", "euler", "--out", tmp_path / "b.png"),
                   "ddim, ddpm")
    one_line_error(run_cli("sample", ddpm_run, "--n", "2", "--class", "7", "--out", tmp_path / "c.png"),
                   "--class must be in [0, 2]")
    one_line_error(run_cli("sample", ddpm_run, "--n", "0", "--out", tmp_path / "d.png"), "--n")
    one_line_error(run_cli("sample", ddpm_run, "--n", "2", "--out", tmp_path / "e.jpg"), ".png")
    assert not any((tmp_path / n).exists() for n in ("b.png", "c.png", "d.png", "b.npy"))


def test_sample_is_reproducible_and_uses_the_ema(ddpm_run, classifier_run, tmp_path):
    from weightsmith.ship.sample import open_generative_run, sample_run

    a = sample_run(ddpm_run, 4, tmp_path / "a.png", sampler="ddim", steps=2, eta=0.5, seed=3)
    sample_run(ddpm_run, 4, tmp_path / "b.png", sampler="ddim", steps=2, eta=0.5, seed=3)
    assert a["nfe"] == 4 and np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    task, model = open_generative_run(ddpm_run)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with task.sampling_weights(model):
        assert not torch.equal(model.state_dict()["conv_in.weight"], raw["conv_in.weight"])  # EMA swapped in
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())  # and back
    with pytest.raises(CheckpointError, match="classification run"):
        sample_run(classifier_run, 2, tmp_path / "x.png")
