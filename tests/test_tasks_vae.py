"""The vae task: the discretized likelihood, the KL, the ELBO in bits per dimension, through the trainer."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from shapes_folder import draw_shapes

from weightsmith.recipe import recipe_from_tree
from weightsmith.tasks.vae import discretized_logistic_log_prob, gaussian_kl
from weightsmith.train.checkpoint import list_checkpoints
from weightsmith.train.loop import run_training


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return draw_shapes(tmp_path_factory.mktemp("images") / "shapes")


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.93, -5.5), (-1.2, 0.5), (0.2, -7.0)])
def test_discretized_logistic_sums_to_one_over_the_256_levels(mean, log_scale):
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    logp = discretized_logistic_log_prob(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def test_discretized_logistic_matches_the_cdf_difference():
    x = torch.tensor([-1.0, 26 / 127.5 - 1, 1.0], dtype=torch.float64)
    mu, log_s = torch.tensor(0.1, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    s = math.exp(-1.0)
    cdf = lambda v: 1 / (1 + math.exp(-(v - 0.1) / s))  # noqa: E731
    want = [math.log(cdf(-1 + 1 / 255)), math.log(cdf(x[1].item() + 1 / 255) - cdf(x[1].item() - 1 / 255)),
            math.log(1 - cdf(1 - 1 / 255))]
    got = discretized_logistic_log_prob(x, mu.expand(3), log_s.expand(3))
    assert got.tolist() == pytest.approx(want, rel=1e-9)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(4, 5), torch.ones(4, 5))
    torch.testing.assert_close(gaussian_kl(mean, logvar), torch.distributions.kl_divergence(q, p).sum(-1))


def _tree(folder, **task):
    return {"task": {"name": "vae", "n_samples": 6, "eval_images": 8, **task},
            "data": {"source": str(folder), "image_size": 12},
            "model": {"family": "vae", "widths": [8, 16], "d_latent": 4},
            "train": {"batch_size": 8, "max_steps": 30, "warmup_steps": 2, "lr": 3e-3, "eval_every": 10,
                      "ckpt_every": 10, "log_every": 1, "eval_batch_size": 16}}


def test_vae_trains_and_reports_bits_per_dimension(tmp_path, folder, cache_dir):
    run = run_training(recipe_from_tree(_tree(folder)), tmp_path / "run", log=lambda *a: None)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["test_images"] == 12 and ev["beta"] == 1.0
    # bits per dimension = (recon + KL) / (D ln 2), D = 1 x 12 x 12
    assert ev["test_bpd"] == pytest.approx((ev["test_recon_nats"] + ev["test_kl_nats"]) / (144 * math.log(2)))
    assert 0 < ev["test_bpd"] < 12
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {"recon_nats", "kl_nats", "elbo_bpd"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx((steps[0]["recon_nats"] + steps[0]["kl_nats"]) / 144, rel=1e-5)
    assert steps[-1]["elbo_bpd"] < steps[0]["elbo_bpd"]
    assert any("val_bpd" in r for r in rows)
    samples = np.load(run / "samples.npy")
    assert samples.shape == (6, 1, 12, 12) and samples.dtype == np.uint8 and ev["samples_nfe"] == 1


def test_vae_beta_weights_the_kl_and_resume_is_exact(tmp_path, folder, cache_dir):
    tree = _tree(folder, beta=0.25)
    ref = run_training(recipe_from_tree(tree), tmp_path / "ref", log=lambda *a: None)
    row = next(json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines() if "loss" in x)
    assert row["loss"] == pytest.approx((row["recon_nats"] + 0.25 * row["kl_nats"]) / 144, rel=1e-5)
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    for ckpt in list_checkpoints(run):
        if ckpt.name != "step_000020":
            shutil.rmtree(ckpt)
    run_training(recipe_from_tree(tree), run, resume=True, log=lambda *a: None)

    def losses(r):
        return [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert len(losses(ref)) == 30 and losses(run) == losses(ref)
