"""Diffusion and flow matching on images: the ``ddpm`` and ``flow-matching`` tasks and their samplers.

DDPM (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"). With a variance schedule
beta_1..beta_T and ``alpha_bar_t = prod_{s <= t} (1 - beta_s)`` (``alphas_cumprod``; the paper's t = 1..T
is our index t = 0..T-1), the forward process is ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``
and the network predicts eps: the loss is ``|eps - eps_theta(x_t, t, y)|^2``, the paper's L_simple, averaged
over pixels (eq. 14). Schedules: ``linear`` (beta from 1e-4 to 0.02, the paper's) and ``cosine`` (Nichol &
Dhariwal 2021, ``alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``, s = 0.008, beta capped at 0.999),
computed in float32 exactly as ``diffusers.DDPMScheduler`` (``beta_schedule="linear"`` /
``"squaredcos_cap_v2"``) does; tests/test_tasks_diffusion.py checks both and one step of each sampler
against diffusers' schedulers.

Samplers (``x_T ~ N(0, I)``, then steps along a decreasing subsequence of timesteps, :func:`timesteps_for`):

- DDPM ancestral (the paper's algorithm 2, any subsequence): the posterior mean from the predicted
  ``x_0``, plus noise of variance ``beta~ = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t /
  alpha_bar_prev)`` (``variance_type="fixed_small"``).
- DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12): ``x_prev =
  sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z`` with ``sigma = eta *
  sqrt(beta~)``: deterministic at eta = 0, DDPM-like at eta = 1, any number of steps.

Flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling") with the rectified-flow path
(Liu et al. 2023; Lipman's optimal-transport path with sigma_min = 0): noise x_0 ~ N(0, I) at t = 0,
data x_1 at t = 1, ``x_t = (1 - (1 - sigma_min) t) x_0 + t x_1``, target velocity ``u = x_1 - (1 - sigma_min)
x_0``, loss ``|v_theta(x_t, t, y) - u|^2``. Samplers integrate ``dx/dt = v`` from 0 to 1 with Euler (NFE =
steps) or Heun's second-order method (NFE = 2 steps). The U-Net reads ``1000 t``, the same range as
DDPM's steps.

Classifier-free guidance (Ho & Salimans 2022): labels are replaced by the null label (id n_classes) with
probability ``cond_drop`` in training; sampling combines ``pred = u + w (c - u)`` of the unconditional
and conditional predictions (one batched forward of 2B images; NFE doubles). Our w = 1 is plain
conditional sampling; the paper's guidance weight is our w - 1.

Units: ``loss`` is the mean squared error per pixel (images in [-1, 1]); ``count`` is images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from weightsmith.errors import ConfigError
from weightsmith.tasks import register_task
from weightsmith.tasks.generative import GenerativeConfig, ImageGenerationTask

TIME_SCALE = 1000.0  # flow matching's t in [0, 1] reaches the U-Net as 1000 t


# ---------------------------------------------------------------------------------------------------
# noise schedules and single steps


def make_betas(schedule: str, n_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas (T,) float32: ``linear`` from beta_start to beta_end (Ho et al. 2020), or ``cosine``
    (Nichol & Dhariwal 2021; beta_start and beta_end unused), computed as diffusers computes them.

    Raises:
        ConfigError: an unknown schedule.
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n_timesteps, dtype=torch.float32)
    if schedule == "cosine":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        T = n_timesteps
        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                            dtype=torch.float32)
    raise ConfigError(f"task.schedule={schedule!r}; choose 'linear' or 'cosine'")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """``alpha_bar_t = prod_{s <= t} (1 - beta_s)``, (T,) float32."""
    return torch.cumprod(1.0 - betas, dim=0)


def timesteps_for(n_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The decreasing timesteps a sampler visits, as diffusers' ``timestep_spacing``: ``trailing``
    (``round(T - k T / steps) - 1``: starts at T-1; Lin et al. 2024 show it matters for few steps) or
    ``leading`` (``k * (T // steps)``: DDIM's original spacing, ends at 0).

    Raises:
        ConfigError: steps not in [1, n_timesteps].
    """
    if not 1 <= steps <= n_timesteps:
        raise ConfigError(f"sampling steps must be in [1, {n_timesteps}] (the training timesteps), got {steps}")
    if spacing == "leading":
        ratio = n_timesteps // steps
        return [k * ratio for k in reversed(range(steps))]
    ratio = n_timesteps / steps
    return [int(round(n_timesteps - k * ratio)) - 1 for k in range(steps)]


def _x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor, clip: bool) -> torch.Tensor:
    x0 = (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t ** 0.5
    return x0.clamp(-1, 1) if clip else x0


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor, ab_prev: torch.Tensor,
              noise: torch.Tensor | None, *, clip: bool = True) -> torch.Tensor:
    """One ancestral step x_t -> x_prev (B, C, H, W) from the predicted noise ``eps`` (B, C, H, W).

    ``ab_t``, ``ab_prev``: alpha_bar at the current and the previous visited timestep (1.0 before the
    first). ``noise`` ~ N(0, I) (B, C, H, W), or None at the last step (t = 0: no noise). ``clip``
    clamps the predicted x_0 to [-1, 1] (diffusers' ``clip_sample``)."""
    x0 = _x0_from_eps(x_t, eps, ab_t, clip)
    alpha_t = ab_t / ab_prev  # the product of (1 - beta) over the skipped steps
    beta_t = 1 - alpha_t
    mean = (ab_prev ** 0.5 * beta_t / (1 - ab_t)) * x0 + (alpha_t ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x_t
    if noise is None:
        return mean
    variance = ((1 - ab_prev) / (1 - ab_t) * beta_t).clamp(min=1e-20)
    return mean + variance ** 0.5 * noise


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor, ab_prev: torch.Tensor, eta: float,
              noise: torch.Tensor | None, *, clip: bool = True) -> torch.Tensor:
    """One DDIM step x_t -> x_prev (B, C, H, W) (Song et al. 2021, eq. 12); ``noise`` is used when eta > 0."""
    x0 = _x0_from_eps(x_t, eps, ab_t, clip)
    variance = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    sigma = eta * variance ** 0.5
    x_prev = ab_prev ** 0.5 * x0 + (1 - ab_prev - sigma ** 2) ** 0.5 * eps
    if eta > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def guided(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
           guidance: float) -> torch.Tensor:
    """The model's prediction at (x (B, C, H, W), t (B,)) with classifier-free guidance:
    ``u + guidance (c - u)``; without labels (or with guidance 1) a single forward."""
    if labels is None or guidance == 1.0:
        return model(x, t, labels)
    null = torch.full_like(labels, model.config.n_classes)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, C, H, W)
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def _check_guidance(model: torch.nn.Module, labels: torch.Tensor | None, guidance: float) -> None:
    k = getattr(model.config, "n_classes", 0)
    if labels is not None and not k:
        raise ConfigError("this model is unconditional (model.n_classes = 0); sample without a class")
    if labels is not None and ((labels < 0) | (labels >= k)).any():
        raise ConfigError(f"class labels must be in [0, {k - 1}], got {sorted(set(labels.tolist()))[:5]}")
    if guidance != 1.0 and labels is None:
        raise ConfigError("guidance needs class labels (a class-conditional model and --class or every class)")


@torch.no_grad()
def sample_ddpm(model: torch.nn.Module, alpha_bar: torch.Tensor, shape: tuple[int, ...], *, sampler: str = "ddim",
                steps: int = 50, eta: float = 0.0, guidance: float = 1.0, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, spacing: str = "trailing", clip: bool = True,
                x_init: torch.Tensor | None = None) -> torch.Tensor:
    """Images (N, C, H, W) from an eps-prediction model: ``sampler`` ``ddpm`` (ancestral) or ``ddim`` with
    ``steps`` steps; noise from ``generator`` on the CPU (``x_init`` replaces the first draw).

    Raises:
        ConfigError: an unknown sampler, a bad number of steps, labels the model cannot take.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"sampler {sampler!r} is not a diffusion sampler; choose 'ddpm' or 'ddim'")
    _check_guidance(model, labels, guidance)
    device = next(model.parameters()).device
    ts = timesteps_for(len(alpha_bar), steps, spacing)
    x = (x_init if x_init is not None else torch.randn(shape, generator=generator)).to(device)
    ab = alpha_bar.to(device)
    one = torch.ones((), device=device)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = guided(model, x, torch.full((shape[0],), float(t), device=device), labels, guidance).float()
        ab_prev = ab[t_prev] if t_prev >= 0 else one
        noise = torch.randn(shape, generator=generator).to(device) if (sampler == "ddpm" and t > 0) or eta > 0 \
            else None
        if sampler == "ddpm":
            x = ddpm_step(x, eps, ab[t], ab_prev, noise, clip=clip)
        else:
            x = ddim_step(x, eps, ab[t], ab_prev, eta, noise, clip=clip)
    return x


@torch.no_grad()
def sample_flow(model: torch.nn.Module, shape: tuple[int, ...], *, method: str = "euler", steps: int = 50,
                guidance: float = 1.0, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
                x_init: torch.Tensor | None = None, time_scale: float = TIME_SCALE) -> torch.Tensor:
    """Integrate ``dx/dt = v(x, t)`` from noise at t = 0 to data at t = 1 in ``steps`` equal steps:
    ``euler`` (NFE = steps) or ``heun`` (trapezoidal corrector, NFE = 2 steps). ``model(x, time_scale * t,
    y)`` is the velocity (N, C, H, W).

    Raises:
        ConfigError: an unknown method, steps < 1, labels the model cannot take.
    """
    if method not in ("euler", "heun"):
        raise ConfigError(f"sampler {method!r} is not a flow sampler; choose 'euler' or 'heun'")
    if steps < 1:
        raise ConfigError(f"sampling steps must be >= 1, got {steps}")
    _check_guidance(model, labels, guidance)
    device = next(model.parameters()).device
    x = (x_init if x_init is not None else torch.randn(shape, generator=generator)).to(device)
    n, dt = shape[0], 1.0 / steps

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided(model, x, torch.full((n,), time_scale * t, device=device), labels, guidance).float()

    for i in range(steps):
        t = i * dt
        v = velocity(x, t)
        if method == "euler":
            x = x + dt * v
        else:
            x_next = x + dt * v
            x = x + 0.5 * dt * (v + velocity(x_next, t + dt))
    return x


# ---------------------------------------------------------------------------------------------------
# tasks


@dataclass(kw_only=True)
class DDPMConfig(GenerativeConfig):
    """``[task]`` of ``ddpm``: the eps-prediction objective, its schedule and the end-of-run sampler.

    schedule: ``linear`` (Ho et al. 2020) or ``cosine`` (Nichol & Dhariwal 2021).
    n_timesteps: T, the diffusion steps of training.
    beta_start: the linear schedule's first beta.
    beta_end: the linear schedule's last beta.
    cond_drop: probability that a training label becomes the null label (classifier-free guidance).
    sampler: ``ddim`` or ``ddpm`` (ancestral), for the end-of-run samples.
    sample_steps: sampler steps (NFE per image, doubled with guidance).
    eta: DDIM's noise scale (0 deterministic, 1 DDPM-like).
    guidance: classifier-free guidance scale w (1 = conditional, no guidance).
    spacing: ``trailing`` or ``leading`` timestep spacing of the sampler.
    clip_sample: clamp the predicted x_0 to [-1, 1] at every step.
    """

    schedule: Literal["linear", "cosine"] = "linear"
    n_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cond_drop: float = 0.1
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = 50
    eta: float = 0.0
    guidance: float = 1.0
    spacing: Literal["trailing", "leading"] = "trailing"
    clip_sample: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_timesteps < 2:
            raise ConfigError(f"task.n_timesteps must be >= 2, got {self.n_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ConfigError(f"task.beta_start={self.beta_start} and task.beta_end={self.beta_end} must satisfy "
                              "0 < beta_start < beta_end < 1")
        _check_common(self)
        if not 1 <= self.sample_steps <= self.n_timesteps:
            raise ConfigError(f"task.sample_steps must be in [1, task.n_timesteps={self.n_timesteps}], "
                              f"got {self.sample_steps}")
        if self.eta < 0:
            raise ConfigError(f"task.eta must be >= 0, got {self.eta}")


@dataclass(kw_only=True)
class FlowMatchingConfig(GenerativeConfig):
    """``[task]`` of ``flow-matching``: the rectified-flow velocity objective and the end-of-run sampler.

    sigma_min: Lipman et al.'s sigma_min (0 = rectified flow).
    time_sampling: ``uniform`` t, or ``logit-normal`` (t = sigmoid(n), n ~ N(0, 1); Esser et al. 2024).
    cond_drop: probability that a training label becomes the null label (classifier-free guidance).
    sampler: ``euler`` or ``heun``, for the end-of-run samples.
    sample_steps: integration steps (NFE = steps for Euler, 2 steps for Heun; doubled with guidance).
    guidance: classifier-free guidance scale w (1 = conditional, no guidance).
    """

    sigma_min: float = 0.0
    time_sampling: Literal["uniform", "logit-normal"] = "uniform"
    cond_drop: float = 0.1
    sampler: Literal["euler", "heun"] = "euler"
    sample_steps: int = 50
    guidance: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"task.sigma_min must be in [0, 1), got {self.sigma_min}")
        _check_common(self)
        if self.sample_steps < 1:
            raise ConfigError(f"task.sample_steps must be >= 1, got {self.sample_steps}")


def _check_common(cfg: Any) -> None:
    if not 0.0 <= cfg.cond_drop < 1.0:
        raise ConfigError(f"task.cond_drop must be in [0, 1), got {cfg.cond_drop}")
    if cfg.guidance < 0:
        raise ConfigError(f"task.guidance must be >= 0, got {cfg.guidance}")


class _DenoisingTask(ImageGenerationTask):
    """What ``ddpm`` and ``flow-matching`` share: labels with dropout, the quick and final evaluation."""

    conditional_fields = ("n_classes",)

    def train_labels(self, model: torch.nn.Module, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """Labels (B,) with each replaced by the null label with probability cond_drop; None if unconditional."""
        k = model.config.n_classes
        if not k:
            return None
        drop = torch.rand(y.shape[0], generator=generator).to(y.device) < self.cfg.cond_drop
        return torch.where(drop, torch.full_like(y, k), y)

    def objective(self, model, x, y, generator) -> torch.Tensor:
        """Mean squared error per pixel of one batch, with all randomness from ``generator``."""
        raise NotImplementedError

    def loss(self, model, batch):
        x, y = batch
        return self.objective(model, x, y, self.generator), {}

    @torch.no_grad()
    def _split_loss(self, model, name: str, n: int | None, device: str, autocast_dtype) -> float:
        """The objective on split ``name`` (first n images), with fixed noise: comparable between calls."""
        from weightsmith.tasks.classification import Normalize

        xs, ys = self.split(name, n)
        half = [0.5] * xs.shape[1]
        norm = Normalize(half, half, device)
        g = torch.Generator().manual_seed(self.cfg.sample_seed + 12345)
        total, count = 0.0, 0
        bs = self.train_cfg.eval_batch_size
        for i in range(0, len(xs), bs):
            x = norm(torch.from_numpy(xs[i:i + bs]).to(device))
            y = torch.from_numpy(ys[i:i + bs]).long().to(device)
            with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                total += self.objective(model, x, y, g).item() * len(x)
            count += len(x)
        return total / count

    def evaluate(self, model, *, device, autocast_dtype):
        """The objective on the first eval_images validation images, raw weights and EMA."""
        out = {"val_loss": self._split_loss(model.eval(), "val", self.cfg.eval_images, device, autocast_dtype)}
        model.train()
        if self.ema is not None:
            with self.sampling_weights(model):
                out["val_loss_ema"] = self._split_loss(model, "val", self.cfg.eval_images, device, autocast_dtype)
        return out

    def describe_eval(self, result):
        ema = f", val_loss_ema {result['val_loss_ema']:.4f}" if "val_loss_ema" in result else ""
        return f"val_loss {result['val_loss']:.4f}{ema}"

    def finish(self, model, run_dir, *, device, autocast_dtype, log=print):
        """Test loss (EMA weights), samples.png / samples.npy, FID and KID with ``classifier_run`` -> eval.json."""
        from weightsmith.fsio import atomic_write_text
        from weightsmith.train.checkpoint import list_checkpoints

        if self.ema is None and self._ema_state is None and list_checkpoints(run_dir):  # evaluating a saved run
            self.load_ema_from(list_checkpoints(run_dir)[-1])
        with self.sampling_weights(model):
            result: dict[str, Any] = {"test_loss": self._split_loss(model, "test", None, device, autocast_dtype),
                                      "test_images": len(self.data.test_x),
                                      "weights": "ema" if self.ema is not None else "raw"}
        result.update(sampler=self.cfg.sampler, sample_steps=self.cfg.sample_steps, guidance=self.cfg.guidance)
        result.update(self.write_samples(model, run_dir, device, log=log))
        result.update(self.quality(model, device, log=log))
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
        log(f"eval: test_loss {result['test_loss']:.4f} ({result['weights']} weights); {result['samples']} samples "
            f"({self.cfg.sampler}, NFE {result['samples_nfe']}) in {run_dir / 'samples.png'}")
        return result

    def headline(self, summary):
        fid = f", FID {summary['fid']:.2f} (floor {summary['fid_floor']:.2f})" if "fid" in summary else ""
        return f"test_loss {summary['test_loss']:.4f}{fid}"

    @classmethod
    def example_batch(cls, model_cfg, batch_size, generator):
        c, s = model_cfg.in_channels, model_cfg.image_size
        x = torch.rand(batch_size, c, s, s, generator=generator) * 2 - 1
        return x, torch.randint(max(model_cfg.n_classes, 1), (batch_size,), generator=generator)


@register_task("ddpm")
class DDPM(_DenoisingTask):
    """Denoising diffusion, eps-prediction (the ``unet`` family's default task)."""

    config_cls = DDPMConfig

    def __init__(self, cfg, data_cfg, train_cfg, sample_cfg=None) -> None:
        super().__init__(cfg, data_cfg, train_cfg, sample_cfg)
        self.alpha_bar = alphas_cumprod(make_betas(cfg.schedule, cfg.n_timesteps, cfg.beta_start, cfg.beta_end))

    def objective(self, model, x, y, generator):
        B = x.shape[0]
        t = torch.randint(self.cfg.n_timesteps, (B,), generator=generator)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        labels = self.train_labels(model, y, generator)
        ab = self.alpha_bar[t].to(x.device).view(B, 1, 1, 1)
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * eps  # q(x_t | x_0)
        return F.mse_loss(model(x_t, t.to(x.device).float(), labels).float(), eps)

    def generate(self, model, n, labels, generator, **options):
        c = self.cfg
        o = {"sampler": c.sampler, "steps": c.sample_steps, "eta": c.eta, "guidance": c.guidance, **options}
        cfg = model.config
        return sample_ddpm(model, self.alpha_bar, (n, cfg.in_channels, cfg.image_size, cfg.image_size),
                           sampler=o["sampler"], steps=o["steps"], eta=o["eta"], guidance=o["guidance"],
                           labels=labels, generator=generator, spacing=c.spacing, clip=c.clip_sample)

    def nfe(self, **options):
        steps = options.get("steps", self.cfg.sample_steps)
        return steps * (2 if options.get("guidance", self.cfg.guidance) != 1.0 else 1)

    samplers = ("ddim", "ddpm")


@register_task("flow-matching")
class FlowMatching(_DenoisingTask):
    """Flow matching with the rectified-flow path: velocity regression (trains the ``unet`` family)."""

    config_cls = FlowMatchingConfig
    also_trains = ("ddpm",)  # any model the ddpm task trains takes (x, t, y) and returns (B, C, H, W)

    def objective(self, model, x, y, generator):
        B = x.shape[0]
        if self.cfg.time_sampling == "logit-normal":
            t = torch.sigmoid(torch.randn(B, generator=generator))
        else:
            t = torch.rand(B, generator=generator)
        x0 = torch.randn(x.shape, generator=generator).to(x.device)
        labels = self.train_labels(model, y, generator)
        t = t.to(x.device)
        tt = t.view(B, 1, 1, 1)
        a = 1 - (1 - self.cfg.sigma_min) * tt
        x_t = a * x0 + tt * x  # psi_t(x_0)
        target = x - (1 - self.cfg.sigma_min) * x0  # d psi_t / dt
        return F.mse_loss(model(x_t, TIME_SCALE * t, labels).float(), target)

    def generate(self, model, n, labels, generator, **options):
        c = self.cfg
        o = {"sampler": c.sampler, "steps": c.sample_steps, "guidance": c.guidance, **options}
        cfg = model.config
        return sample_flow(model, (n, cfg.in_channels, cfg.image_size, cfg.image_size), method=o["sampler"],
                           steps=o["steps"], guidance=o["guidance"], labels=labels, generator=generator)

    def nfe(self, **options):
        steps = options.get("steps", self.cfg.sample_steps)
        per_step = 2 if options.get("sampler", self.cfg.sampler) == "heun" else 1
        return steps * per_step * (2 if options.get("guidance", self.cfg.guidance) != 1.0 else 1)

    samplers = ("euler", "heun")
