"""Variational autoencoder: a convolutional encoder to a diagonal Gaussian latent, a convolutional
decoder to a per-pixel discretized logistic likelihood.

Sources:
- Kingma & Welling 2014, "Auto-Encoding Variational Bayes": the encoder q(z | x) = N(mean, diag(exp(logvar)))
  and the reparameterization ``z = mean + exp(logvar / 2) * noise``, noise ~ N(0, I), so that a sample
  is a differentiable function of the encoder's outputs. The paper's phi (encoder) and theta (decoder)
  are our ``encoder`` and ``decoder``; its J (latent dimensions) is our ``d_latent``.
- Salimans et al. 2017, "PixelCNN++": the discretized logistic likelihood of 8-bit pixels
  (weightsmith.tasks.vae.discretized_logistic_log_prob), so the ELBO is a bound on the log-probability
  of the actual discrete images and reads in bits per dimension.

Data flow, B batch, C = in_channels, S = image_size, widths [w0, w1], L = len(widths), s = S / 2^L::

    x (B, C, S, S) in [-1, 1] -> encoder: L x [conv 4x4/2 -> SiLU]          (B, w1, s, s)
      -> flatten -> to_latent Linear -> mean, logvar (B, d_latent) each
    z = mean + exp(logvar / 2) * noise                                         (B, d_latent)
    z -> from_latent Linear -> SiLU -> (B, w1, s, s)
      -> decoder: L x [transposed conv 4x4/2 -> SiLU] (widths reversed, last w0) (B, w0, S, S)
      -> conv_out 3x3 -> pixel mean, log_scale (B, C, S, S) each

``forward(x, noise)`` returns (pixel mean, pixel log-scale, latent mean, latent logvar); with
``noise=None`` it decodes the latent mean (no randomness: evaluation and analysis). A training task
passes the noise, drawn from its own checkpointed generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.registry import register_family, register_preset

LOG_SCALE_MIN = -7.0  # PixelCNN++'s floor on the logistic log-scale (a bin is 2/255 wide)


@dataclass(kw_only=True)
class VAEConfig:
    """VAE config. The defaults are a tiny model for 16x16 RGB images (the contract tests build it);
    ``vae-fmnist`` is sized for Fashion-MNIST on a CPU.

    in_channels: C, image channels (decided by the data).
    image_size: S = H = W (decided by the data); a multiple of ``2 ** len(widths)``.
    widths: encoder channels per 4x4 stride-2 convolution (each halves the size); the decoder mirrors them.
    d_latent: latent dimensions (the paper's J).
    """

    in_channels: int = 3
    image_size: int = 16
    widths: list[int] = field(default_factory=lambda: [16, 32])
    d_latent: int = 8

    def __post_init__(self) -> None:
        require_positive(self, ("in_channels", "image_size", "d_latent"))
        if not self.widths or min(self.widths) <= 0:
            raise ConfigError(f"model.widths={list(self.widths)} must be a non-empty list of positive widths")
        if self.image_size % 2 ** len(self.widths):
            raise ConfigError(f"model.image_size={self.image_size} must be a multiple of {2 ** len(self.widths)} "
                              f"for {len(self.widths)} stride-2 convolutions (model.widths)")

    @property
    def latent_size(self) -> int:
        """Side of the smallest feature map, ``image_size / 2^len(widths)``."""
        return self.image_size // 2 ** len(self.widths)


class VAE(nn.Module):
    """``forward(x (B, C, S, S), noise (B, d_latent) or None)`` -> (pixel mean, pixel log-scale (B, C, S, S),
    latent mean, latent logvar (B, d_latent))."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        w, s = cfg.widths, cfg.latent_size
        chans = [cfg.in_channels, *w]
        self.encoder = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1) for i in range(len(w)))
        self.to_latent = nn.Linear(w[-1] * s * s, 2 * cfg.d_latent)
        self.from_latent = nn.Linear(cfg.d_latent, w[-1] * s * s)
        outs = [*reversed(w[:-1]), w[0]]  # transposed convolutions: widths reversed, the last one keeps w0
        ins = list(reversed(w))
        self.decoder = nn.ModuleList(nn.ConvTranspose2d(i, o, 4, stride=2, padding=1) for i, o in zip(ins, outs))
        self.conv_out = nn.Conv2d(w[0], 2 * cfg.in_channels, 3, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, S, S) in [-1, 1] -> (mean, logvar), (B, d_latent) each."""
        h = x
        for conv in self.encoder:
            h = F.silu(conv(h))  # (B, width, S / 2^(i+1), ...)
        mean, logvar = self.to_latent(h.flatten(1)).chunk(2, dim=-1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d_latent) -> (pixel mean, pixel log-scale >= LOG_SCALE_MIN), (B, C, S, S) each, in the
        [-1, 1] pixel scale."""
        s = self.config.latent_size
        h = F.silu(self.from_latent(z)).view(z.shape[0], self.config.widths[-1], s, s)
        for conv in self.decoder:
            h = F.silu(conv(h))  # doubles the size
        mean, log_scale = self.conv_out(h).chunk(2, dim=1)
        return mean, log_scale.clamp(min=LOG_SCALE_MIN)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """See the class docstring; ``noise=None`` decodes z = mean."""
        mean, logvar = self.encode(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise  # reparameterization
        x_mean, x_log_scale = self.decode(z)
        return x_mean, x_log_scale, mean, logvar


register_family("vae", VAEConfig, task="vae")(VAE)

register_preset("vae-fmnist", "vae", doc="a convolutional VAE for 28x28 grayscale images (Fashion-MNIST)",
                in_channels=1, image_size=28, widths=[32, 64], d_latent=32)
