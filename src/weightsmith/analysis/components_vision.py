"""Analytic rows of the convolutional and MLP image classifiers: ``mlp``, ``resnet``, ``convnext``.

The vision convention, shared by every image family (``vit`` is in
:mod:`weightsmith.analysis.components_vit`): one "token" of the analysis is one *image*. Every row is on
stream ``"main"`` and the analysis runs at ``seq_len = 1``, so the per-token numbers of ``inspect`` are
per-image numbers and ``B`` counts images. A config is an image model's when it has ``image_size``
(:func:`is_image_config`). Per image:

- ``mm``: multiply-adds of each convolution and linear layer; a convolution does
  ``out_channels * (in_channels / groups) * kernel_size^2 * H_out * W_out``. Forward FLOPs = 2 * mm, the
  count of ``FlopCounterMode`` (convolutions and matmuls; biases, BatchNorm, LayerNorm, activations,
  pooling, layer scale and residual adds are not counted, as for the transformers).
- ``act``: floating-point elements autograd saves for the backward pass, each tensor counted once, at the
  first row whose module saves it. A convolution or linear layer keeps its input; BatchNorm its input
  (and, per batch, its two statistics per channel, ``act_pos``); LayerNorm its input and a mean and an
  rstd per position; ReLU its output (counted at the BatchNorm row before it, whose unit it completes,
  or, after a residual add, at the block's ``residual`` row); GELU and SiLU their input; layer scale the
  tensor it scales; CPU dropout a float mask. The global average pool (``mean``) keeps nothing. A row
  whose input is a tensor already counted earlier has ``act = 0`` for it (a ResNet conv reading a ReLU
  output).
- ``buffers``: BatchNorm's running mean and variance (2 per channel), state saved with the weights.
- ``block_input``: elements of a residual block's input, all a checkpointed block keeps.

ResNet at 224x224 (per image): ResNet-18 1.81 G multiply-adds, ResNet-50 4.09 G (the "FLOPs" of
He et al. 2016, Table 1, are multiply-adds: 1.8 G and 3.8 G for v1; v1.5 strides in the 3x3 conv).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.analysis.components import Row

Weights = tuple[tuple[str, tuple[int, ...]], ...]


def is_image_config(cfg: Any) -> bool:
    """True for an image model's config (it has ``image_size``): inputs are (B, in_channels, image_size,
    image_size) floats and the analysis counts per image (``seq_len = 1``)."""
    return hasattr(cfg, "image_size")


def _row(path: str, kind: str, **fields: Any) -> Row:
    # imported here: components.py imports this module to register the builders
    from weightsmith.analysis.components import Row

    return Row(path, kind, **fields)


def _linear_weights(path: str, d_in: int, d_out: int, bias: bool) -> Weights:
    w = ((f"{path}.weight", (d_out, d_in)),)
    return w + ((f"{path}.bias", (d_out,)),) if bias else w


def _conv(path: str, in_channels: int, out_channels: int, kernel_size: int, stride: int, size: int, *,
          padding: int, groups: int = 1, bias: bool = False, act: float = 0.0, notes: str = "") -> tuple[Row, int]:
    """A square Conv2d over a (size x size) input -> (row, output size)."""
    out = (size + 2 * padding - kernel_size) // stride + 1
    w: Weights = ((f"{path}.weight", (out_channels, in_channels // groups, kernel_size, kernel_size)),)
    if bias:
        w += ((f"{path}.bias", (out_channels,)),)
    mm = out_channels * (in_channels // groups) * kernel_size * kernel_size * out * out
    return _row(path, "conv", weights=w, mm=mm, act=act, notes=notes), out


def _batchnorm(path: str, channels: int, positions: int, *, relu: bool, notes: str = "") -> Row:
    """BatchNorm keeps its input; with ``relu`` the ReLU after it keeps its output too (counted here)."""
    w = ((f"{path}.weight", (channels,)), (f"{path}.bias", (channels,)))
    act = channels * positions * (2 if relu else 1)
    return _row(path, "norm", weights=w, buffers=2 * channels, act=act, act_pos=2 * channels,
                notes=notes or ("keeps its input; the ReLU after it keeps its output" if relu else "keeps its input"))


def _layernorm(path: str, channels: int, positions: int, notes: str = "") -> Row:
    """LayerNorm over channels at each of ``positions``: keeps its input, a mean and an rstd per position."""
    w = ((f"{path}.weight", (channels,)), (f"{path}.bias", (channels,)))
    return _row(path, "norm", weights=w, act=(channels + 2) * positions, notes=notes)


def _head(c: int, n_classes: int, act_in: float) -> Row:
    return _row("head", "head", weights=_linear_weights("head", c, n_classes, True), mm=c * n_classes,
                act=act_in + n_classes, act_pos=1, act_held=n_classes,
                notes="keeps its input; logits and log-softmax (n_classes each) live until backward; "
                      "act_pos: the loss's scalar total weight")


def _block(rows: list[Row], layer: int, block_input: int) -> list[Row]:
    """Rows of one residual block with its global index (for checkpointing) and input size."""
    return [replace(r, layer=layer, block_input=block_input if i == 0 else 0) for i, r in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------
# mlp


def mlp_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.mlp.MLPConfig` model, per image."""
    h = cfg.d_hidden
    rows: list[Row] = []
    pending = float(cfg.d_in)  # elements of the current input no row has counted yet (first: the image)
    d_in = cfg.d_in
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        rows.append(_row(f"{b}.linear", "linear", weights=_linear_weights(f"{b}.linear", d_in, h, cfg.norm != "batch"),
                         mm=d_in * h, act=pending, layer=i,
                         notes="keeps its input" + (" (the flattened image, a view)" if i == 0 else "")))
        if cfg.norm == "batch":
            rows.append(replace(_batchnorm(f"{b}.norm", h, 1, relu=False), layer=i))
        elif cfg.norm == "layer":
            rows.append(replace(_layernorm(f"{b}.norm", h, 1, notes="keeps its input, mean and rstd"), layer=i))
        relu = cfg.activation == "relu"
        rows.append(_row(f"{b}.act", "activation", act=h, layer=i,
                         notes="ReLU keeps its output (the next layer's input)" if relu
                         else f"{cfg.activation.upper()} keeps its input"))
        pending = 0.0 if relu else float(h)
        if cfg.dropout:
            rows.append(_row(f"{b}.drop", "dropout", act=h, layer=i,
                             notes="keeps a float mask; its output is kept by the next linear layer"))
            pending = float(h)
        d_in = h
    rows.append(_head(d_in, cfg.n_classes, pending))
    return rows


# ---------------------------------------------------------------------------------------------------
# resnet


def _resnet_block(b: str, cfg: Any, c_in: int, width: int, stride: int, size: int) -> tuple[list[Row], int, int]:
    """Rows of a basic or bottleneck block at input (c_in, size, size) -> (rows, c_out, out size).
    Every conv reads a ReLU output already counted, so convolutions keep nothing new here."""
    rows: list[Row] = []
    if cfg.block == "bottleneck":
        conv1, _ = _conv(f"{b}.conv1", c_in, width, 1, 1, size, padding=0)
        conv2, out = _conv(f"{b}.conv2", width, width, 3, stride, size, padding=1)
        c_out = 4 * width
        conv3, _ = _conv(f"{b}.conv3", width, c_out, 1, 1, out, padding=0)
        rows += [conv1, _batchnorm(f"{b}.bn1", width, size * size, relu=True),
                 conv2, _batchnorm(f"{b}.bn2", width, out * out, relu=True),
                 conv3, _batchnorm(f"{b}.bn3", c_out, out * out, relu=False)]
    else:
        conv1, out = _conv(f"{b}.conv1", c_in, width, 3, stride, size, padding=1)
        conv2, _ = _conv(f"{b}.conv2", width, width, 3, 1, out, padding=1)
        c_out = width
        rows += [conv1, _batchnorm(f"{b}.bn1", width, out * out, relu=True),
                 conv2, _batchnorm(f"{b}.bn2", width, out * out, relu=False)]
    if stride != 1 or c_in != c_out:
        conv, _ = _conv(f"{b}.shortcut.conv", c_in, c_out, 1, stride, size, padding=0,
                        notes="projection shortcut; its input is the block's input")
        rows += [conv, _batchnorm(f"{b}.shortcut.bn", c_out, out * out, relu=False)]
    rows.append(_row(b, "residual", act=c_out * out * out,
                     notes="ReLU(branch + shortcut) keeps its output, the block's output"))
    return rows, c_out, out


def resnet_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.resnet.ResNetConfig` model, per image."""
    C, H, w0, k = cfg.in_channels, cfg.image_size, cfg.stem_width, cfg.stem_kernel_size
    conv, size = _conv("stem.conv", C, w0, k, cfg.stem_stride, H, padding=k // 2, act=C * H * H,
                       notes="keeps its input, the image")
    rows = [conv, _batchnorm("stem.bn", w0, size * size, relu=True)]
    if cfg.stem_pool:
        size = (size + 2 - 3) // 2 + 1
        rows.append(_row("stem.pool", "pool", act=w0 * size * size,
                         notes="max 3x3/2; keeps its input (counted at stem.bn) and int64 indices (not counted); "
                               "its output, kept by the first block, is counted here"))
    c, layer = w0, 0
    for s, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
        for i in range(depth):
            block, c_out, out = _resnet_block(f"stages.{s}.blocks.{i}", cfg, c, width, 2 if s and not i else 1, size)
            rows += _block(block, layer, c * size * size)
            c, size, layer = c_out, out, layer + 1
    rows.append(_head(c, cfg.n_classes, c))  # the pooled (B, C) mean is a new tensor
    return rows


# ---------------------------------------------------------------------------------------------------
# convnext


def _convnext_block(b: str, cfg: Any, dim: int, size: int, drop_path: float) -> list[Row]:
    n, d_ff, k = size * size, cfg.mlp_ratio * dim, cfg.kernel_size
    dw, _ = _conv(f"{b}.dwconv", dim, dim, k, 1, size, padding=k // 2, groups=dim, bias=True, act=dim * n,
                  notes="depthwise; keeps its input, the block's input")
    return [
        dw, _layernorm(f"{b}.norm", dim, n, notes="channels-last; keeps its input, mean and rstd per pixel"),
        _row(f"{b}.pwconv1", "linear", weights=_linear_weights(f"{b}.pwconv1", dim, d_ff, True), mm=dim * d_ff * n,
             act=dim * n, notes="1x1 conv as a linear layer per pixel; keeps its input"),
        _row(f"{b}.act", "activation", act=d_ff * n, notes="GELU keeps its input"),
        _row(f"{b}.pwconv2", "linear", weights=_linear_weights(f"{b}.pwconv2", d_ff, dim, True), mm=d_ff * dim * n,
             act=d_ff * n, notes="keeps its input"),
        _row(f"{b}.layer_scale", "layer_scale", weights=((f"{b}.layer_scale.gamma", (dim,)),),
             act=dim * n + (1 if drop_path > 0 else 0),
             notes="gamma * x keeps x" + ("; drop_path keeps a (B, 1, 1, 1) mask" if drop_path > 0 else "")),
    ]


def convnext_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.convnext.ConvNeXtConfig` model, per image."""
    C, H, P, dims = cfg.in_channels, cfg.image_size, cfg.stem_patch_size, cfg.dims
    conv, size = _conv("stem.conv", C, dims[0], P, P, H, padding=0, bias=True, act=C * H * H,
                       notes=f"patchify {P}x{P}/{P}; keeps its input, the image")
    rows = [conv, _layernorm("stem.norm", dims[0], size * size, notes="over channels; keeps its input, mean, rstd")]
    rates, layer = cfg.drop_path_rates(), 0
    for s, (depth, dim) in enumerate(zip(cfg.depths, dims)):
        if s:
            d = f"stages.{s}.downsample"
            rows.append(_layernorm(f"{d}.norm", dims[s - 1], size * size, notes="over channels; keeps its input"))
            conv, size = _conv(f"{d}.conv", dims[s - 1], dim, 2, 2, size, padding=0, bias=True,
                               act=dims[s - 1] * size * size, notes="2x2/2; keeps its input")
            rows.append(conv)
        for i in range(depth):
            block = _convnext_block(f"stages.{s}.blocks.{i}", cfg, dim, size, rates[layer])
            rows += _block(block, layer, dim * size * size)
            layer += 1
    rows.append(_layernorm("final_norm", dims[-1], 1, notes="on the pooled (B, C) mean; keeps its input"))
    rows.append(_head(dims[-1], cfg.n_classes, dims[-1]))  # keeps the norm's output
    return rows
