"""Diffusion and flow matching: schedules and single steps against diffusers, the flow sampler against a
closed-form velocity, guidance, and the ddpm / flow-matching tasks through the generic trainer (exact
resume, EMA in the checkpoint) on an image folder the test draws itself."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from shapes_folder import draw_shapes

from weightsmith.errors import ConfigError
from weightsmith.recipe import recipe_from_tree
from weightsmith.tasks.diffusion import (
    alphas_cumprod,
    ddim_step,
    ddpm_step,
    guided,
    make_betas,
    sample_ddpm,
    sample_flow,
    timesteps_for,
)
from weightsmith.train.checkpoint import list_checkpoints, load_train_state
from weightsmith.train.loop import run_training

diffusers = pytest.importorskip("diffusers")


# ---------------------------------------------------------------------------------------------------
# schedules and steps against diffusers

@pytest.mark.parametrize("ours, theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_alphas_cumprod_equal_diffusers(ours, theirs):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
    mine = alphas_cumprod(make_betas(ours, 1000))
    assert mine.dtype == ref.alphas_cumprod.dtype == torch.float32
    assert torch.equal(mine, ref.alphas_cumprod)  # the same float32 arithmetic, bit for bit
    short = diffusers.DDPMScheduler(num_train_timesteps=37, beta_schedule=theirs, beta_start=2e-4, beta_end=0.05)
    assert torch.equal(alphas_cumprod(make_betas(ours, 37, 2e-4, 0.05)), short.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps_equal_diffusers(spacing, steps):
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert timesteps_for(1000, steps, spacing) == ref.timesteps.tolist()


def _inputs(seed=0, shape=(2, 3, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("schedule, theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("n_steps, index", [(None, 500), (None, 1), (50, 3), (50, 49)])
def test_one_ddpm_step_equals_diffusers(schedule, theirs, n_steps, index):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, timestep_spacing="trailing")
    if n_steps is None:  # the full chain: t -> t - 1
        t, t_prev = index, index - 1
    else:
        ref.set_timesteps(n_steps)
        ts = ref.timesteps.tolist()
        t, t_prev = ts[index], (ts[index + 1] if index + 1 < len(ts) else -1)
    x, eps = _inputs()
    out = ref.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    ab = alphas_cumprod(make_betas(schedule, 1000))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)) if t > 0 else None
    mine = ddpm_step(x, eps, ab[t], ab[t_prev] if t_prev >= 0 else torch.tensor(1.0), noise)
    torch.testing.assert_close(mine, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule, theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("index", [0, 9, 19])
def test_one_ddim_step_equals_diffusers(schedule, theirs, eta, index):
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=theirs, timestep_spacing="trailing")
    ref.set_timesteps(20)
    t = ref.timesteps.tolist()[index]
    t_prev = t - 1000 // 20  # diffusers' DDIM steps back by T // steps
    x, eps = _inputs(1)
    out = ref.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(3)).prev_sample
    ab = alphas_cumprod(make_betas(schedule, 1000))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    mine = ddim_step(x, eps, ab[t], ab[t_prev] if t_prev >= 0 else torch.tensor(1.0), eta, noise)
    torch.testing.assert_close(mine, out, rtol=1e-5, atol=1e-6)


def test_ddim_with_eta_1_and_every_step_is_ddpm():
    """sigma = eta * sqrt(beta~): at eta = 1 the DDIM update equals the ancestral DDPM one (Song et al. sec. 4.1)."""
    ab = alphas_cumprod(make_betas("linear", 1000))
    x, eps = _inputs(2)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for t in (999, 400, 3):
        torch.testing.assert_close(ddim_step(x, eps, ab[t], ab[t - 1], 1.0, noise, clip=False),
                                   ddpm_step(x, eps, ab[t], ab[t - 1], noise, clip=False), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# samplers on models with a known answer

class _Config:
    def __init__(self, n_classes=0):
        self.n_classes = n_classes


class GaussianVelocity(torch.nn.Module):
    """The exact marginal velocity from N(0, I) at t = 0 to N(mu, s^2 I) at t = 1 along x_t = (1 - t) x0 + t x1:
    v*(x, t) = mu + (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2) * (x - t mu). Its flow maps x0 to mu + s x0."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s
        self.config = _Config()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        t = (t / 1000.0).view(-1, *([1] * (x.dim() - 1)))
        var = (1 - t) ** 2 + t ** 2 * self.s ** 2
        return self.mu + (t * self.s ** 2 - (1 - t)) / var * (x - t * self.mu)


@pytest.mark.parametrize("method, steps, tol", [("euler", 100, 0.03), ("euler", 400, 0.008), ("heun", 20, 0.005)])
def test_flow_sampler_transports_gaussian_to_gaussian(method, steps, tol):
    mu, s = 1.5, 0.4
    model = GaussianVelocity(mu, s)
    x0 = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    x1 = sample_flow(model, tuple(x0.shape), method=method, steps=steps, x_init=x0)
    err = (x1 - (mu + s * x0)).abs().max().item()
    assert err < tol, err
    assert abs(x1.mean().item() - mu) < 0.03 and abs(x1.std().item() - s) < 0.02


def test_flow_euler_error_is_first_order_and_heun_second_order():
    model = GaussianVelocity(-0.7, 2.0)
    x0 = torch.randn(256, 3, generator=torch.Generator().manual_seed(1))
    exact = -0.7 + 2.0 * x0

    def err(method, steps):
        return (sample_flow(model, tuple(x0.shape), method=method, steps=steps, x_init=x0) - exact).abs().max().item()

    assert err("euler", 20) / err("euler", 40) == pytest.approx(2.0, rel=0.2)
    assert err("heun", 20) / err("heun", 40) == pytest.approx(4.0, rel=0.25)


class OracleEps(torch.nn.Module):
    """The exact eps-prediction when every training image is the constant image c: eps = (x_t - sqrt(ab) c) /
    sqrt(1 - ab). Every sampler must then return c."""

    def __init__(self, ab, c):
        super().__init__()
        self.ab, self.c = ab, c
        self.config = _Config()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.c) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler, steps, eta", [("ddim", 10, 0.0), ("ddim", 25, 0.5), ("ddpm", 1000, 0.0),
                                                 ("ddpm", 20, 0.0)])
def test_diffusion_samplers_recover_a_point_mass(sampler, steps, eta):
    ab = alphas_cumprod(make_betas("cosine", 1000))
    model = OracleEps(ab, 0.3)
    x = sample_ddpm(model, ab, (3, 1, 4, 4), sampler=sampler, steps=steps, eta=eta,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, torch.full_like(x, 0.3), atol=2e-3, rtol=0)


class LabelShift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config(n_classes=4)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        return x * 0.5 + y.float().view(-1, 1, 1, 1)  # the null label 4 is "unconditional"


def test_classifier_free_guidance_combines_two_predictions():
    model = LabelShift()
    x, t, y = torch.randn(3, 1, 2, 2), torch.zeros(3), torch.tensor([0, 2, 3])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 4))
    torch.testing.assert_close(guided(model, x, t, y, 3.0), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(guided(model, x, t, y, 1.0), cond)
    with pytest.raises(ConfigError, match="class labels"):
        sample_flow(model, (2, 1, 2, 2), steps=1, labels=torch.tensor([0, 9]))


def test_sampler_arguments_are_checked():
    ab = alphas_cumprod(make_betas("linear", 10))
    model = OracleEps(ab, 0.0)
    with pytest.raises(ConfigError, match="steps"):
        sample_ddpm(model, ab, (1, 1, 2, 2), steps=11)
    with pytest.raises(ConfigError, match="'ddpm' or 'ddim'"):
        sample_ddpm(model, ab, (1, 1, 2, 2), sampler="euler")
    with pytest.raises(ConfigError, match="unconditional"):
        sample_ddpm(model, ab, (1, 1, 2, 2), steps=2, labels=torch.tensor([0]))
    with pytest.raises(ConfigError, match="schedule"):
        make_betas("quadratic", 10)


# ---------------------------------------------------------------------------------------------------
# the tasks through the trainer

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return draw_shapes(tmp_path_factory.mktemp("images") / "shapes")


UNET = {"family": "unet", "widths": [8, 16], "n_res_blocks": 1, "attn_resolutions": [6], "d_head": 8,
        "n_groups": 4, "dropout": 0.1}


def _tree(folder, task, **train):
    return {"task": {"n_samples": 6, "eval_images": 8, "sample_steps": 3, **task},
            "data": {"source": str(folder), "image_size": 12}, "model": dict(UNET),  # the size checks the U-Net early
            "train": {"batch_size": 8, "max_steps": 12, "warmup_steps": 2, "lr": 3e-3, "eval_every": 6,
                      "ckpt_every": 6, "log_every": 1, "eval_batch_size": 16, **train}}


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run):
    return [r["loss"] for r in _rows(run) if "loss" in r]


@pytest.mark.parametrize("task", [{"name": "ddpm", "guidance": 2.0, "schedule": "cosine"},
                                  {"name": "flow-matching", "sampler": "heun", "guidance": 1.5}])
def test_denoising_task_trains_samples_and_keeps_the_ema(tmp_path, folder, cache_dir, task):
    run = run_training(recipe_from_tree(_tree(folder, task)), tmp_path / "run", log=lambda *a: None)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["weights"] == "ema" and np.isfinite(ev["test_loss"]) and ev["test_images"] == 12
    per_step = 2 if task.get("sampler") == "heun" else 1
    assert ev["samples"] == 6 and ev["samples_nfe"] == 3 * per_step * 2  # guidance: two predictions per step
    samples = np.load(run / "samples.npy")
    assert samples.shape == (6, 1, 12, 12) and samples.dtype == np.uint8
    assert Image.open(run / "samples.png").size == (3 * 14 + 2, 2 * 14 + 2)  # 3 classes per row, 2-pixel gaps
    rows = _rows(run)
    assert rows[0]["images"] == 8 and "img_per_s" in rows[0]
    assert any("val_loss_ema" in r for r in rows)
    state = load_train_state(list_checkpoints(run)[-1])["task"]
    ema = state["ema"]
    assert ema["n_updates"] == 12 and "conv_out.weight" in ema["shadow"]
    assert set(state) == {"generator", "ema"}
    labels = json.loads((run / "labels.json").read_text())
    assert labels["class_names"] == ["hbars", "square", "vbars"]


def test_resume_is_exact_with_noise_timesteps_and_ema(tmp_path, folder, cache_dir):
    tree = _tree(folder, {"name": "ddpm", "ema_decay": 0.9})
    ref = run_training(recipe_from_tree(tree), tmp_path / "ref", log=lambda *a: None)
    run = tmp_path / "resumed"  # as if killed right after the step-6 checkpoint
    shutil.copytree(ref, run)
    for ckpt in list_checkpoints(run):
        if ckpt.name != "step_000006":
            shutil.rmtree(ckpt)
    run_training(recipe_from_tree(tree), run, resume=True, log=lambda *a: None)
    assert len(_losses(ref)) == 12 and _losses(run) == _losses(ref)  # noise, times, dropped labels, dropout
    a = load_train_state(list_checkpoints(ref)[-1])["task"]
    b = load_train_state(list_checkpoints(run)[-1])["task"]
    assert a["ema"]["n_updates"] == b["ema"]["n_updates"] == 12
    for k, v in a["ema"]["shadow"].items():
        assert torch.equal(v, b["ema"]["shadow"][k]), k
    assert torch.equal(a["generator"], b["generator"])
    ev_a, ev_b = (json.loads((r / "eval.json").read_text()) for r in (ref, run))
    assert ev_a.pop("sampling_s_per_64") > 0 and ev_b.pop("sampling_s_per_64") > 0  # wall time
    assert ev_a == ev_b
    assert np.array_equal(np.load(ref / "samples.npy"), np.load(run / "samples.npy"))


def test_unconditional_model_and_bad_fields(tmp_path, folder, cache_dir):
    tree = _tree(folder, {"name": "ddpm"}, max_steps=2)
    tree["model"]["n_classes"] = 0  # allowed: an unconditional model on labelled data
    run = run_training(recipe_from_tree(tree), tmp_path / "run", log=lambda *a: None)
    assert np.load(run / "samples.npy").shape == (6, 1, 12, 12)
    tree["model"]["n_classes"] = 5
    with pytest.raises(ConfigError, match="model.n_classes=5 but the data has n_classes=3"):
        run_training(recipe_from_tree(tree), tmp_path / "bad", log=lambda *a: None)
    with pytest.raises(ConfigError, match="task.sample_steps"):
        recipe_from_tree(_tree(folder, {"name": "ddpm", "sample_steps": 2000}))
    with pytest.raises(ConfigError, match="task.sampler"):
        recipe_from_tree(_tree(folder, {"name": "flow-matching", "sampler": "ddim"}))


def _recipe_file(path, folder, max_steps):
    import tomli_w

    tree = _tree(folder, {"name": "ddpm", "ema_decay": 0.95}, max_steps=max_steps, ckpt_every=20, eval_every=50)
    path.write_text(tomli_w.dumps(tree))
    return path


def test_sigkill_then_resume_gives_identical_losses_and_ema(tmp_path, folder):
    """As tests/test_resume.py, for the ddpm task: the CLI killed with SIGKILL after a checkpoint, resumed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_cli import run_cli

    recipe = _recipe_file(tmp_path / "ddpm.toml", folder, 200)
    env = dict(os.environ, WEIGHTSMITH_CACHE=str(tmp_path / "cache"))
    ref = tmp_path / "ref"
    proc = run_cli("train", recipe, "--out", ref, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "weightsmith.cli", "train", str(recipe), "--out", str(run)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_000040").exists():
        assert p.poll() is None, "training finished before it could be killed; make the run longer"
        assert time.time() < deadline
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert max(r["step"] for r in _rows(run) if "loss" in r) < 200, "the process was not interrupted"
    proc = run_cli("train", recipe, "--out", run, "--resume", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = {r["step"]: r["loss"] for r in _rows(ref) if "loss" in r}
    b = {r["step"]: r["loss"] for r in _rows(run) if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 201)) and a == b
    ema_a = load_train_state(list_checkpoints(ref)[-1])["task"]["ema"]["shadow"]
    ema_b = load_train_state(list_checkpoints(run)[-1])["task"]["ema"]["shadow"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert np.array_equal(np.load(ref / "samples.npy"), np.load(run / "samples.npy"))
