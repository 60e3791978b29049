"""The ``vae`` task: the (beta-)ELBO of a variational autoencoder on images, reported in bits per dimension.

Kingma & Welling 2014, "Auto-Encoding Variational Bayes": with q(z | x) = N(mean, diag(exp(logvar))),
the prior p(z) = N(0, I) and the decoder p(x | z), the evidence lower bound per image is

    ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z)),   KL = 1/2 sum_j (mean_j^2 + exp(logvar_j) - 1 - logvar_j)

estimated with one reparameterized sample z (the paper's L = 1). Training minimizes ``recon + beta KL``
(Higgins et al. 2017's beta-VAE; beta = 1 is the ELBO). ``p(x | z)`` is a discretized logistic per pixel
(Salimans et al. 2017, "PixelCNN++", one mixture component): 8-bit levels are bins of width 2/255 on
[-1, 1], the end bins take the tails, so ``-ELBO / (D ln 2)`` with D = C H W is an upper bound on the
negative log-likelihood of the discrete images in bits per dimension, comparable with the literature.

Units: ``loss`` is ``(recon + beta KL) / D`` in nats per dimension; the logged parts ``recon_nats`` and
``kl_nats`` are nats per image, ``elbo_bpd`` the (beta = 1) bound in bits per dimension. The end-of-run
report has the test split's bits per dimension (n = the test images, one latent sample each, fixed seed).
Samples decode z ~ N(0, I) and show the pixel means (the usual picture: sampling each pixel's logistic
adds salt-and-pepper noise).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from weightsmith.errors import ConfigError
from weightsmith.tasks import register_task
from weightsmith.tasks.generative import GenerativeConfig, ImageGenerationTask

HALF_BIN = 1.0 / 255.0  # half the width of one of the 256 levels on [-1, 1]


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) (same shape as x, nats) of 8-bit pixels x in [-1, 1] (on the grid 2k/255 - 1) under a
    logistic with ``mean`` and ``log_scale`` discretized to bins of width 2/255; the first and last bins
    extend to -inf and +inf (Salimans et al. 2017). Over the 256 levels the probabilities sum to 1."""
    centered = x - mean
    inv_s = torch.exp(-log_scale)
    plus, minus = inv_s * (centered + HALF_BIN), inv_s * (centered - HALF_BIN)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the lowest bin
    log_one_minus_cdf_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)): the highest bin
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv_s * centered
    log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)  # the density at the bin centre, when the bin is tiny
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_mid))


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per row, nats: (B, d_latent) -> (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


@dataclass(kw_only=True)
class VAETaskConfig(GenerativeConfig):
    """``[task]`` of ``vae``.

    beta: weight of the KL term in the training loss (1 = the ELBO; Higgins et al. 2017).
    """

    beta: float = 1.0
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ConfigError(f"task.beta must be >= 0, got {self.beta}")


@register_task("vae")
class VAETask(ImageGenerationTask):
    """Variational autoencoder, (beta-)ELBO (the ``vae`` family's default task)."""

    config_cls = VAETaskConfig
    samplers = ("prior",)

    def terms(self, model, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction -log p(x | z), KL) per image (B,) each, nats, with z from ``generator``'s noise."""
        noise = self.randn((x.shape[0], model.config.d_latent), x.device, generator)
        x_mean, x_log_scale, mean, logvar = model(x, noise)
        recon = -discretized_logistic_log_prob(x, x_mean.float(), x_log_scale.float()).flatten(1).sum(-1)
        return recon, gaussian_kl(mean.float(), logvar.float())

    def loss(self, model, batch):
        x, _ = batch
        recon, kl = self.terms(model, x, self.generator)
        dims = x[0].numel()
        loss = (recon + self.cfg.beta * kl).mean() / dims
        elbo_bpd = (recon + kl).mean().item() / (dims * math.log(2))
        return loss, {"recon_nats": recon.mean().item(), "kl_nats": kl.mean().item(), "elbo_bpd": elbo_bpd}

    @torch.no_grad()
    def split_bpd(self, model, name: str, n: int | None, device: str, autocast_dtype) -> dict[str, float]:
        """-ELBO in bits per dimension and its parts (nats per image) on split ``name`` (first n images),
        one latent sample per image from a fixed seed."""
        from weightsmith.tasks.classification import Normalize

        xs, _ = self.split(name, n)
        half = [0.5] * xs.shape[1]
        norm = Normalize(half, half, device)
        g = torch.Generator().manual_seed(self.cfg.sample_seed + 12345)
        recon_sum = kl_sum = 0.0
        bs = self.train_cfg.eval_batch_size
        for i in range(0, len(xs), bs):
            x = norm(torch.from_numpy(xs[i:i + bs]).to(device))
            with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                recon, kl = self.terms(model, x, g)
            recon_sum, kl_sum = recon_sum + recon.sum().item(), kl_sum + kl.sum().item()
        n_img, dims = len(xs), xs[0].size
        return {f"{name}_bpd": (recon_sum + kl_sum) / (n_img * dims * math.log(2)),
                f"{name}_recon_nats": recon_sum / n_img, f"{name}_kl_nats": kl_sum / n_img, f"{name}_images": n_img}

    def evaluate(self, model, *, device, autocast_dtype):
        """Bits per dimension on the first eval_images validation images."""
        with self.sampling_weights(model):
            out = self.split_bpd(model, "val", self.cfg.eval_images, device, autocast_dtype)
        return {"val_bpd": out["val_bpd"], "val_kl_nats": out["val_kl_nats"]}

    def describe_eval(self, result):
        return f"val_bpd {result['val_bpd']:.4f}, val_kl_nats {result['val_kl_nats']:.1f}"

    def generate(self, model, n, labels, generator, **options):
        """Decode z ~ N(0, I) (n, d_latent): the pixel means (n, C, S, S) in [-1, 1]."""
        z = torch.randn(n, model.config.d_latent, generator=generator).to(next(model.parameters()).device)
        return model.decode(z)[0].clamp(-1, 1)

    def nfe(self, **options):
        return 1

    def finish(self, model, run_dir, *, device, autocast_dtype, log=print):
        """Test bits per dimension, samples.png / samples.npy, FID with ``classifier_run`` -> eval.json."""
        from weightsmith.fsio import atomic_write_text
        from weightsmith.train.checkpoint import list_checkpoints

        if self.ema is None and self._ema_state is None and list_checkpoints(run_dir):
            self.load_ema_from(list_checkpoints(run_dir)[-1])
        with self.sampling_weights(model):
            result: dict[str, Any] = self.split_bpd(model, "test", None, device, autocast_dtype)
        result["beta"] = self.cfg.beta
        result.update(self.write_samples(model, run_dir, device, log=log))
        result.update(self.quality(model, device, log=log))
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
        log(f"eval: test_bpd {result['test_bpd']:.4f} (-ELBO, n = {result['test_images']:,}), KL "
            f"{result['test_kl_nats']:.1f} nats; samples in {run_dir / 'samples.png'}")
        return result

    def headline(self, summary):
        return f"test_bpd {summary['test_bpd']:.4f}"

    @classmethod
    def example_batch(cls, model_cfg, batch_size, generator):
        c, s = model_cfg.in_channels, model_cfg.image_size
        levels = torch.randint(256, (batch_size, c, s, s), generator=generator)
        return levels.float() / 127.5 - 1.0, torch.zeros(batch_size, dtype=torch.long)
