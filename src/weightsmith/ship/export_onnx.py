"""ONNX export: one graph, ``input_ids`` (B, T) int64 -> ``logits`` (B, T, V) float32.

Made with ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` then onnxscript's translation; see
the PyTorch "torch.onnx" docs). B and T are dynamic (T up to ``max_seq_len`` for learned positions).
The graph is the full-sequence forward with no KV cache, run by any ONNX runtime (onnxruntime's
``InferenceSession`` in the tests); being our own forward, it takes every ``pos`` (learned, RoPE with
any ``rope_scaling``, sinusoidal, ALiBi, none) and every ``norm``. The exported file is self-contained
(weights inside, no external data) for the model sizes weightsmith trains on one machine.
``tokenizer.json`` (a Hugging Face ``tokenizers`` file, see ``export_hf.hf_tokenizer``) is written beside it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith.models.layers.positions import alibi_bias, sinusoidal_embedding

ONNX_FILE = "model.onnx"


class _LogitsGraph(nn.Module):
    """Traceable forward of a ``gpt`` model: input_ids (B, T) -> logits (B, T, V).

    The eager model checks ``int(pos.max()) < max_seq_len``, a data-dependent branch that
    ``torch.export`` cannot trace; here positions are ``arange(T)`` and the dynamic-shape bound on T
    enforces the same limit. Sinusoidal positions are computed, not sliced from the table, for the same
    reason (T is unbounded for them, as for RoPE, ALiBi and none).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = m.tok_emb(input_ids)  # (B, T, D)
        rope = attn_mask = None
        if m.pos_emb is not None:
            x = x + m.pos_emb(pos)
        elif m.inv_freq is not None:
            rope = m.rope_tables(pos)  # (T, d_head) each, RoPE scaling included
        elif m.pos_table is not None:
            x = x + m.config.sinusoidal_scale * sinusoidal_embedding(pos, m.config.d_model)
        elif m.alibi_slopes is not None:
            attn_mask = alibi_bias(m.alibi_slopes, pos, pos)  # (1, H, T, T), causal
        for block in m.blocks:
            x = block(x, rope, attn_mask=attn_mask)
        return m.lm_head(m.final_norm(x))  # (B, T, V)


def export_onnx(model: nn.Module, tokenizer: Any, out_dir: Path, dtype: str = "f32") -> Path:
    """Write ``out_dir/model.onnx`` (opset chosen by torch) and ``out_dir/tokenizer.json``.

    Args:
        model: a ``gpt``-family model in eval mode; exported in float32 on CPU.
        dtype: only ``"f32"``.

    Raises:
        ValueError: for any other dtype (the CLI rejects it earlier with a one-line error).
        WeightsmithError: ``onnx`` or ``onnxscript`` (the ``interop`` extra) is not installed.
    """
    from weightsmith.ship.export import INTEROP_MODULES, import_interop
    from weightsmith.ship.export_hf import hf_tokenizer

    if dtype != "f32":
        raise ValueError(f"ONNX export supports f32 only, got {dtype}")
    for module in INTEROP_MODULES["onnx"]:  # torch.onnx.export(dynamo=True) imports both
        import_interop(module, "onnx")
    cfg = model.config
    graph = _LogitsGraph(model.float().cpu().eval())
    example = torch.zeros(2, min(8, cfg.max_seq_len), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=cfg.max_seq_len) if cfg.pos == "learned" else \
        torch.export.Dim("seq", min=1)
    path = Path(out_dir) / ONNX_FILE
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}}, dynamo=True,
                          external_data=False, verbose=False)
    hf_tokenizer(tokenizer).save(str(Path(out_dir) / "tokenizer.json"))
    return path


def export_onnx_classifier(model: nn.Module, labels: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/model.onnx`` for an image classifier and ``out_dir/labels.json`` beside it.

    The graph is ``images`` (B, in_channels, image_size, image_size) float32, already normalized as
    ``labels.json`` says (``(x / 255 - mean) / std`` per channel) -> ``logits`` (B, n_classes) float32,
    with B dynamic; BatchNorm and dropout are in eval mode.

    Raises:
        WeightsmithError: ``onnx`` or ``onnxscript`` (the ``interop`` extra) is not installed.
    """
    import json

    from weightsmith.ship.export import INTEROP_MODULES, import_interop

    for module in INTEROP_MODULES["onnx"]:
        import_interop(module, "onnx")
    cfg = model.config
    model = model.float().cpu().eval()
    example = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    path = Path(out_dir) / ONNX_FILE
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                          external_data=False, verbose=False)
    (Path(out_dir) / "labels.json").write_text(json.dumps(labels, indent=2))
    return path


def export_onnx_denoiser(model: nn.Module, labels: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/model.onnx`` for a ``unet`` denoiser and ``out_dir/labels.json`` beside it.

    The graph is ``x`` (B, C, S, S) float32 (pixels in [-1, 1] at the noise level of ``t``), ``t`` (B,)
    float32 (diffusion steps 0..T-1 for ddpm runs, 1000 t for flow matching) and, for a class-conditional
    model, ``y`` (B,) int64 (``n_classes`` = the null label of guidance) -> ``prediction`` (B, C, S, S)
    float32 (the noise or the velocity); B is dynamic. The samplers (weightsmith.tasks.diffusion) run
    outside the graph, one call per step.

    Raises:
        WeightsmithError: ``onnx`` or ``onnxscript`` (the ``interop`` extra) is not installed.
    """
    import json

    from weightsmith.ship.export import INTEROP_MODULES, import_interop

    for module in INTEROP_MODULES["onnx"]:
        import_interop(module, "onnx")
    cfg = model.config
    model = model.float().cpu().eval()
    s, batch = cfg.image_size, torch.export.Dim("batch", min=1)
    args: tuple = (torch.zeros(2, cfg.in_channels, s, s), torch.zeros(2))
    names, dims = ["x", "t"], [{0: batch}, {0: batch}]
    if cfg.n_classes:
        args, names, dims = args + (torch.zeros(2, dtype=torch.long),), names + ["y"], dims + [{0: batch}]
    path = Path(out_dir) / ONNX_FILE
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["prediction"],
                          dynamic_shapes=tuple(dims), dynamo=True, external_data=False, verbose=False)
    (Path(out_dir) / "labels.json").write_text(json.dumps(labels, indent=2))
    return path
