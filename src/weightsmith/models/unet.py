"""U-Net denoiser for diffusion and flow matching: residual blocks with GroupNorm, a sinusoidal time
embedding, self-attention at low resolution, skip connections, optional class conditioning.

Sources:
- Ronneberger, Fischer & Brox 2015, "U-Net": an encoder, a decoder, and skip connections between them.
- Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", appendix B: the PixelCNN++-style
  U-Net with GroupNorm, a Transformer sinusoidal embedding of the step ``t`` added to every residual
  block, self-attention at the 16x16 resolution and in the middle. Its CIFAR-10 model (35.7M parameters)
  is our preset ``unet-ddpm-cifar10``; the layout equals ``diffusers.UNet2DModel`` with DownBlock2D /
  AttnDownBlock2D, which tests/test_models_unet.py uses as the reference (same outputs, same weights).
- Ho & Salimans 2022, "Classifier-Free Diffusion Guidance": a class embedding added to the time
  embedding; one extra *null* class (id ``n_classes``) stands for "no label", trained by dropping labels,
  so one network gives both the conditional and the unconditional prediction.

Notation: the paper's ``ch`` is our ``widths[0]``, ``ch_mult`` our ``widths / widths[0]``,
``num_res_blocks`` our ``n_res_blocks``, ``attn_resolutions`` our ``attn_resolutions``; the time
embedding width ``4 ch`` is our ``d_emb``. ``d_head`` is the attention head width (heads = width / d_head;
``diffusers``' ``attention_head_dim``).

Data flow, B batch, C = in_channels, S = image_size, widths [w0, w1, w2] (three levels)::

    t (B,) -> sinusoid (B, w0) -> Linear, SiLU, Linear -> emb (B, d_emb)  [+ class_emb[y] (B, d_emb)]
    x (B, C, S, S) -> conv_in (B, w0, S, S) ----------------------------------- skip ----------------+
      down.0: n_res_blocks x ResBlock(emb) [+ attention], each output a skip; conv 3x3/2 (a skip)   |
      down.1: ... (B, w1, S/2, S/2) ...;  down.2 (last level, no downsampling) (B, w2, S/4, S/4)   |
      mid: ResBlock, attention, ResBlock                                                            |
      up.2: (n_res_blocks + 1) x ResBlock(cat(h, skip.pop())) [+ attention]; nearest 2x + conv 3x3 <-+
      up.1, up.0 -> GroupNorm, SiLU, conv_out -> (B, C, S, S)      (the predicted noise or velocity)

    ResBlock(x, emb): h = conv1(SiLU(GN(x))) + Linear(SiLU(emb))[:, :, None, None]
                      out = skip(x) + conv2(dropout(SiLU(GN(h))))       skip: 1x1 conv when widths differ

Every block's last convolution, the attention output projection and ``conv_out`` start at zero
(DDPM's ``zero_module``), so each residual branch starts as the identity. The time input ``t`` is a
float: integer diffusion steps 0..T-1 for DDPM; flow matching passes ``1000 t`` for ``t`` in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.registry import register_family, register_preset


@dataclass(kw_only=True)
class UNetConfig:
    """U-Net denoiser config. The defaults are a tiny two-level network for 16x16 RGB images (the
    contract tests build it); ``unet-fmnist`` is sized for Fashion-MNIST on a CPU.

    in_channels: C, image channels, also the output channels (decided by the data).
    image_size: S = H = W (decided by the data); a multiple of ``2 ** (len(widths) - 1)``.
    n_classes: class-conditional with ``n_classes`` labels plus the null label (id ``n_classes``) of
        classifier-free guidance (decided by the data); 0 = unconditional, no class embedding.
    widths: channels per resolution level, highest resolution first; each level but the last halves
        the resolution at its end.
    n_res_blocks: residual blocks per level on the way down (the way up has one more per level).
    attn_resolutions: image sizes (S / 2^level) whose blocks are followed by self-attention; the middle
        always has one.
    d_head: attention head width; every width with attention is a multiple.
    n_groups: GroupNorm groups; every width is a multiple.
    dropout: in every residual block, before its second convolution (0.1 in DDPM's CIFAR-10 model).
    norm_eps: GroupNorm epsilon.
    d_emb: derived, ``4 * widths[0]``: the time (and class) embedding width.
    """

    in_channels: int = 3
    image_size: int = 16
    n_classes: int = 10
    widths: list[int] = field(default_factory=lambda: [16, 32])
    n_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [8])
    d_head: int = 8
    n_groups: int = 8
    dropout: float = 0.0
    norm_eps: float = 1e-5
    d_emb: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, ("in_channels", "image_size", "n_res_blocks", "d_head", "n_groups"))
        if self.n_classes < 0:
            raise ConfigError(f"model.n_classes must be >= 0 (0 = unconditional), got {self.n_classes}")
        if not self.widths or min(self.widths) <= 0:
            raise ConfigError(f"model.widths={list(self.widths)} must be a non-empty list of positive widths")
        if self.widths[0] % 2:
            raise ConfigError(f"model.widths[0]={self.widths[0]} must be even (the sinusoidal time embedding)")
        bad = [w for w in self.widths if w % self.n_groups]
        if bad:
            raise ConfigError(f"model.widths={list(self.widths)}: {bad[0]} is not a multiple of "
                              f"model.n_groups={self.n_groups}")
        levels = len(self.widths)
        if self.image_size % 2 ** (levels - 1):
            raise ConfigError(f"model.image_size={self.image_size} must be a multiple of {2 ** (levels - 1)} "
                              f"for {levels} levels of model.widths (each but the last halves it)")
        sizes = self.resolutions
        for r in self.attn_resolutions:
            if r not in sizes:
                raise ConfigError(f"model.attn_resolutions has {r}, not a resolution of this U-Net "
                                  f"(image_size / 2^level: {sizes})")
        for level, w in enumerate(self.widths):
            if (sizes[level] in self.attn_resolutions or level == levels - 1) and w % self.d_head:
                raise ConfigError(f"model.widths[{level}]={w} has attention but is not a multiple of "
                                  f"model.d_head={self.d_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        self.d_emb = 4 * self.widths[0]

    @property
    def resolutions(self) -> list[int]:
        """Image size at each level: ``image_size / 2^level``."""
        return [self.image_size // 2 ** i for i in range(len(self.widths))]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float times t (B,) -> (B, dim): ``[cos(t f_i), sin(t f_i)]`` with
    frequencies ``f_i = max_period^(-i / (dim/2))``, i < dim/2 (Vaswani et al. 2017; the cos-first
    order and spacing of ``diffusers.UNet2DModel``'s defaults)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim / 2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """t (B,) float -> (B, d_emb): sinusoid of width ``d_in``, Linear, SiLU, Linear."""

    def __init__(self, d_in: int, d_emb: int) -> None:
        super().__init__()
        self.d_in = d_in
        self.linear1 = nn.Linear(d_in, d_emb)
        self.linear2 = nn.Linear(d_emb, d_emb)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.silu(self.linear1(timestep_embedding(t, self.d_in))))


class ResBlock(nn.Module):
    """(B, in_channels, S, S), SiLU(emb) (B, d_emb) -> (B, out_channels, S, S); see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, d_emb: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.n_groups, in_channels, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(d_emb, out_channels)
        self.norm2 = nn.GroupNorm(cfg.n_groups, out_channels, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]  # (B, out, 1, 1): the step (and class) shift each channel
        h = F.silu(self.norm2(h))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        return (x if self.skip is None else self.skip(x)) + h


class SelfAttention(nn.Module):
    """x + o_proj(attention(GroupNorm(x))) over the S*S positions: (B, C, S, S) -> (B, C, S, S)."""

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = channels // cfg.d_head, cfg.d_head
        self.norm = nn.GroupNorm(cfg.n_groups, channels, eps=cfg.norm_eps)
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.o_proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, H*W, C): one token per position; contiguous, so q, k and v projections keep one copy, not three
        h = self.norm(x).flatten(2).transpose(1, 2).contiguous()

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, H * W, self.n_heads, self.d_head).transpose(1, 2)  # (B, n_heads, H*W, d_head)

        y = F.scaled_dot_product_attention(heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h)))
        y = self.o_proj(y.transpose(1, 2).reshape(B, H * W, C))  # (B, H*W, C)
        return x + y.transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """One resolution of the encoder or the decoder: residual blocks, each optionally followed by
    attention, then a down- or upsampling convolution (``resample``) or none."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module | None], resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(a if a is not None else nn.Identity() for a in attns)
        self.resample = resample


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution: (B, C, S, S) -> (B, C, 2S, 2S)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Denoiser: ``forward(x (B, C, S, S), t (B,) float, y (B,) int64 or None) -> (B, C, S, S)``."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        w, n, d_emb = cfg.widths, cfg.n_res_blocks, cfg.d_emb
        sizes, last = cfg.resolutions, len(cfg.widths) - 1
        self.time_emb = TimeEmbedding(w[0], d_emb)
        # id n_classes is the null label of classifier-free guidance
        self.class_emb = nn.Embedding(cfg.n_classes + 1, d_emb) if cfg.n_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, w[0], 3, padding=1)
        skips, ch, down = [w[0]], w[0], []
        for i, width in enumerate(w):
            blocks, attns = [], []
            for _ in range(n):
                blocks.append(ResBlock(ch, width, d_emb, cfg))
                attns.append(SelfAttention(width, cfg) if sizes[i] in cfg.attn_resolutions else None)
                ch = width
                skips.append(ch)
            resample = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if i != last else None
            if resample is not None:
                skips.append(ch)
            down.append(Level(blocks, attns, resample))
        self.down = nn.ModuleList(down)
        self.mid_block1 = ResBlock(ch, ch, d_emb, cfg)
        self.mid_attn = SelfAttention(ch, cfg)
        self.mid_block2 = ResBlock(ch, ch, d_emb, cfg)
        up = []
        for i in reversed(range(len(w))):
            blocks, attns = [], []
            for _ in range(n + 1):
                blocks.append(ResBlock(ch + skips.pop(), w[i], d_emb, cfg))
                attns.append(SelfAttention(w[i], cfg) if sizes[i] in cfg.attn_resolutions else None)
                ch = w[i]
            up.append(Level(blocks, attns, Upsample(ch) if i != 0 else None))
        self.up = nn.ModuleList(up)  # up[0] is the lowest resolution
        self.norm_out = nn.GroupNorm(cfg.n_groups, w[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(w[0], cfg.in_channels, 3, padding=1)
        if self.conv_out.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's default initialization, then zero for each residual branch's last layer (every
        block's ``conv2``, every attention's ``o_proj``) and ``conv_out``, as in DDPM."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)):
                m.reset_parameters()
        for m in self.modules():
            layer = m.conv2 if isinstance(m, ResBlock) else m.o_proj if isinstance(m, SelfAttention) else None
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """SiLU(time embedding + class embedding): (B, d_emb), what every residual block reads.

        Raises:
            ValueError: labels given to an unconditional model.
        """
        emb = self.time_emb(t)
        if self.class_emb is not None:
            if y is None:  # unconditional: the null label for every image
                y = torch.full((t.shape[0],), self.config.n_classes, dtype=torch.long, device=t.device)
            emb = emb + self.class_emb(y)
        elif y is not None:
            raise ValueError("this U-Net is unconditional (n_classes = 0); call it with y=None")
        return F.silu(emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x (B, in_channels, S, S) float; t (B,) float time (diffusion steps); y (B,) int64 labels in
        [0, n_classes] (n_classes = the null label) or None (= null). Returns (B, in_channels, S, S)."""
        emb = self.embed(t, y)  # (B, d_emb)
        h = self.conv_in(x)  # (B, w0, S, S)
        skips = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))  # (B, width, S / 2^level, ...)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # halves the resolution
                skips.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))  # (B, h + skip channels) -> width
            if level.resample is not None:
                h = level.resample(h)  # doubles the resolution
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def example_inputs(cfg: UNetConfig, batch_size: int, device: str | torch.device = "meta") -> tuple:
        """Positional arguments of one forward for analysis: zeros x (B, C, S, S), t = 0 (B,), y = null."""
        s = cfg.image_size
        x = torch.zeros(batch_size, cfg.in_channels, s, s, device=device)
        t = torch.zeros(batch_size, device=device)
        y = torch.full((batch_size,), cfg.n_classes, dtype=torch.long, device=device) if cfg.n_classes else None
        return (x, t, y)


register_family("unet", UNetConfig, task="ddpm")(UNet)

# Sized for a 2-core CPU: levels at 28, 14 and 7 pixels, attention at 7x7, 10 classes + null; 0.99M
# parameters, 204 MFLOPs per forward (widths [32, 64, 64] would cost 378 MFLOPs, about half the speed).
register_preset("unet-fmnist", "unet", doc="a class-conditional U-Net for 28x28 grayscale images (Fashion-MNIST)",
                in_channels=1, image_size=28, n_classes=10, widths=[16, 32, 64], n_res_blocks=2,
                attn_resolutions=[7], d_head=16, n_groups=8)
register_preset("unet-ddpm-cifar10", "unet", doc="DDPM's CIFAR-10 U-Net (35.7M), Ho et al. 2020",
                in_channels=3, image_size=32, n_classes=0, widths=[128, 256, 256, 256], n_res_blocks=2,
                attn_resolutions=[16], d_head=256, n_groups=32, dropout=0.1)  # one head, as in the paper
