"""Analytic rows of the U-Net denoiser (:mod:`weightsmith.models.unet`) and the VAE
(:mod:`weightsmith.models.vae`).

The vision convention (:mod:`weightsmith.analysis.components_vision`): one "token" of the analysis is
one *image*; every row is on stream ``"main"`` at ``seq_len = 1``, so the per-token numbers of
``inspect`` are per image. Per image, with n = S_l^2 the positions at the row's resolution:

- ``mm``: multiply-adds of every convolution and linear layer, and of the attention products
  ``Q K^T`` and ``P V`` (``2 n^2 C`` per attention layer at width C); forward FLOPs = 2 * mm, as
  ``FlopCounterMode`` counts convolutions (a transposed one at its input size: ``C_in C_out k^2 S_in^2``),
  ``addmm`` and SDPA. The time MLP and every block's ``emb_proj`` run once per image (B rows).
  GroupNorm, SiLU, nearest upsampling, concatenation and residual adds are not counted.
- ``act``: floating-point elements autograd saves for backward, each tensor once, at the first row that
  saves it (checked with ``saved_tensors_hooks`` in tests/test_models_unet.py). A convolution or linear
  layer keeps its input; GroupNorm its input and a mean and an rstd per group; SiLU its input; the
  flash SDPA kernel q, k, v, its output and a log-sum-exp per head and position. Concatenation,
  nearest upsampling and adds keep nothing, so every block input (a concatenation, a sum or a
  convolution's output) is a new tensor, counted at the block's ``norm1``; the skip convolution reads
  that same tensor. SiLU(emb) (B, d_emb) is one tensor that every block's ``emb_proj`` keeps, counted at
  ``time_emb``. Dropout masks (``dropout > 0``) are not modelled.

The cost of one *sample* is the number of function evaluations (NFE: steps, x2 per step for Heun and
for classifier-free guidance) times the forward FLOPs per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weightsmith.analysis.components_vision import _conv, _linear_weights, _row

if TYPE_CHECKING:
    from weightsmith.analysis.components import Row


def _groupnorm(path: str, channels: int, positions: int, groups: int, *, keeps_input: bool, notes: str) -> Row:
    """GroupNorm followed by SiLU: keeps its input (if new here), mean and rstd per group; SiLU keeps the
    normalized tensor."""
    w = ((f"{path}.weight", (channels,)), (f"{path}.bias", (channels,)))
    act = (channels * positions if keeps_input else 0) + 2 * groups + channels * positions
    return _row(path, "norm", weights=w, act=act, notes=notes)


def _resblock(b: str, cfg: Any, c_in: int, c_out: int, size: int) -> list[Row]:
    n, g = size * size, cfg.n_groups
    conv1, _ = _conv(f"{b}.conv1", c_in, c_out, 3, 1, size, padding=1, bias=True, act=c_in * n,
                     notes="keeps its input, SiLU(norm1(x))")
    conv2, _ = _conv(f"{b}.conv2", c_out, c_out, 3, 1, size, padding=1, bias=True, act=c_out * n,
                     notes="keeps its input, SiLU(norm2(h)); zero at initialization")
    rows = [_groupnorm(f"{b}.norm1", c_in, n, g, keeps_input=True, notes="keeps the block input; SiLU keeps its"),
            conv1,
            _row(f"{b}.emb_proj", "linear", weights=_linear_weights(f"{b}.emb_proj", cfg.d_emb, c_out, True),
                 mm=cfg.d_emb * c_out, notes="reads SiLU(emb), counted at time_emb"),
            _groupnorm(f"{b}.norm2", c_out, n, g, keeps_input=True, notes="keeps conv1(x) + emb; SiLU keeps its"),
            conv2]
    if c_in != c_out:
        skip, _ = _conv(f"{b}.skip", c_in, c_out, 1, 1, size, padding=0, bias=True,
                        notes="1x1 projection of the block input (kept by norm1)")
        rows.append(skip)
    return rows


def _attention(a: str, cfg: Any, c: int, size: int) -> list[Row]:
    n, g, heads = size * size, cfg.n_groups, c // cfg.d_head
    w = sum((_linear_weights(f"{a}.{p}", c, c, True) for p in ("q_proj", "k_proj", "v_proj", "o_proj")), ())
    # the projections read one (n, C) copy of the normalized input; SDPA keeps q, k, v, its output and the
    # log-sum-exp; o_proj's input is a view of that output
    return [_row(f"{a}.norm", "norm", weights=((f"{a}.norm.weight", (c,)), (f"{a}.norm.bias", (c,))),
                 act=c * n + 2 * g, notes="keeps its input (the residual stream), mean and rstd per group"),
            _row(a, "attention", weights=w, mm=4 * c * c * n + 2 * n * n * c,
                 act=c * n + 3 * c * n + c * n + heads * n,
                 notes=f"{heads} heads over {n} positions; mm includes Q K^T and P V")]


def unet_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.unet.UNetConfig` model, per image (see module docstring)."""
    from weightsmith.analysis.components import Row

    w, sizes, d_emb, last = cfg.widths, cfg.resolutions, cfg.d_emb, len(cfg.widths) - 1
    C, S = cfg.in_channels, cfg.image_size
    tw = (_linear_weights("time_emb.linear1", w[0], d_emb, True)
          + _linear_weights("time_emb.linear2", d_emb, d_emb, True))
    rows = [_row("time_emb", "linear", weights=tw, mm=w[0] * d_emb + d_emb * d_emb, act=w[0] + 4 * d_emb,
                 notes="sinusoid (w0) -> Linear -> SiLU -> Linear; keeps the sinusoid, both SiLU inputs, "
                       "SiLU(emb) (read by every emb_proj)")]
    if cfg.n_classes:
        rows.append(Row("class_emb", "embedding", (("class_emb.weight", (cfg.n_classes + 1, d_emb)),),
                        embedding=True, notes=f"{cfg.n_classes} classes + the null class of guidance"))
    conv, _ = _conv("conv_in", C, w[0], 3, 1, S, padding=1, bias=True, act=C * S * S,
                    notes="keeps its input, the image")
    rows.append(conv)
    skips, ch = [w[0]], w[0]
    for i, width in enumerate(w):
        s = sizes[i]
        for j in range(cfg.n_res_blocks):
            rows += _resblock(f"down.{i}.blocks.{j}", cfg, ch, width, s)
            if s in cfg.attn_resolutions:
                rows += _attention(f"down.{i}.attns.{j}", cfg, width, s)
            ch = width
            skips.append(ch)
        if i != last:
            conv, _ = _conv(f"down.{i}.resample", ch, ch, 3, 2, s, padding=1, bias=True, act=ch * s * s,
                            notes="3x3/2; keeps its input")
            rows.append(conv)
            skips.append(ch)
    s = sizes[last]
    rows += _resblock("mid_block1", cfg, ch, ch, s) + _attention("mid_attn", cfg, ch, s)
    rows += _resblock("mid_block2", cfg, ch, ch, s)
    for k, i in enumerate(reversed(range(len(w)))):
        s = sizes[i]
        for j in range(cfg.n_res_blocks + 1):
            rows += _resblock(f"up.{k}.blocks.{j}", cfg, ch + skips.pop(), w[i], s)
            if s in cfg.attn_resolutions:
                rows += _attention(f"up.{k}.attns.{j}", cfg, w[i], s)
            ch = w[i]
        if i != 0:
            conv, _ = _conv(f"up.{k}.resample.conv", ch, ch, 3, 1, 2 * s, padding=1, bias=True, act=ch * 4 * s * s,
                            notes="after nearest 2x (keeps nothing); keeps its input")
            rows.append(conv)
    rows.append(_groupnorm("norm_out", w[0], S * S, cfg.n_groups, keeps_input=True,
                           notes="keeps its input; SiLU keeps its"))
    conv, _ = _conv("conv_out", w[0], C, 3, 1, S, padding=1, bias=True, act=w[0] * S * S,
                    notes="keeps its input; zero at initialization")
    rows.append(conv)
    return rows


def vae_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.vae.VAEConfig` model, per image: the encoder, the latent
    projections and the decoder of one forward (``noise`` given: training)."""
    w, C, S, d, s0 = cfg.widths, cfg.in_channels, cfg.image_size, cfg.d_latent, cfg.latent_size
    rows, chans, size = [], [C, *w], S
    for i in range(len(w)):
        conv, out = _conv(f"encoder.{i}", chans[i], chans[i + 1], 4, 2, size, padding=1, bias=True,
                          act=chans[i] * size * size,
                          notes="4x4/2; keeps its input" + (" (the image)" if i == 0 else ", the SiLU output"))
        rows.append(conv)
        rows.append(_row(f"encoder.{i}.act", "activation", act=chans[i + 1] * out * out, notes="SiLU keeps its input"))
        size = out
    flat = w[-1] * s0 * s0
    rows.append(_row("to_latent", "linear", weights=_linear_weights("to_latent", flat, 2 * d, True), mm=flat * 2 * d,
                     act=flat + 2 * d, notes="keeps its input; the reparameterization keeps exp(logvar / 2) and noise"))
    rows.append(_row("from_latent", "linear", weights=_linear_weights("from_latent", d, flat, True), mm=d * flat,
                     act=d + flat, notes="keeps z; SiLU keeps its input"))
    outs, ins, size = [*reversed(w[:-1]), w[0]], list(reversed(w)), s0
    for i, (c_in, c_out) in enumerate(zip(ins, outs)):
        out = 2 * size
        # a transposed convolution costs C_in * C_out * k^2 multiply-adds per *input* position
        rows.append(_row(f"decoder.{i}", "conv", weights=((f"decoder.{i}.weight", (c_in, c_out, 4, 4)),
                                                          (f"decoder.{i}.bias", (c_out,))),
                         mm=c_in * c_out * 16 * size * size, act=c_in * size * size + c_out * out * out,
                         notes="transposed 4x4/2; keeps its input (a SiLU output); the SiLU after it keeps its "
                               "input"))
        size = out
    conv, _ = _conv("conv_out", w[0], 2 * C, 3, 1, S, padding=1, bias=True, act=(w[0] + 2 * C) * S * S,
                    notes="mean and log-scale per pixel; keeps its input; the log-scale's clamp keeps the output")
    rows.append(conv)
    return rows
