"""Hugging Face <-> weightsmith converters for Mamba-2 (``Mamba2ForCausalLM``, family ``mamba2``).

Hugging Face names (``hidden_size``, ``state_size``, ``backbone.layers``) appear only here and in the
other ``hf_convert*`` modules. The mixer's parameters have HF's names and shapes, so the map is a
renaming of prefixes::

    ours                         HF Mamba2ForCausalLM
    tok_emb                      backbone.embeddings (older checkpoints: backbone.embedding)
    blocks.i.norm                backbone.layers.i.norm
    blocks.i.mixer.<p>           backbone.layers.i.mixer.<p>   in_proj, conv1d, dt_bias, A_log, D, norm, out_proj
    final_norm                   backbone.norm_f
    lm_head                      lm_head (absent from a tied export)

Config: ``hidden_size`` = d_model, ``state_size`` = d_state, ``conv_kernel`` = d_conv, ``head_dim`` =
d_head, ``num_heads`` = d_inner / d_head, ``use_bias`` = bias, ``use_conv_bias`` = conv_bias. HF has no
training window; an imported model gets ``max_seq_len`` = 256 (ours only bounds training windows).
Only SiLU and an unclamped dt (``time_step_limit = (0, inf)``) convert; ``residual_in_fp32`` only
matters below fp32.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from weightsmith.errors import CheckpointError, ConfigError

StateDict = dict[str, torch.Tensor]

_MIXER = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
          "norm.weight", "out_proj.weight", "out_proj.bias")


def _take(sd: StateDict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"HF state dict has no '{key}'")
    return sd[key]


def _as_float(v: Any) -> float:
    """A float from config.json: a number, ``"Infinity"``, or transformers' ``{"__float__": "Infinity"}``."""
    return float(v["__float__"] if isinstance(v, dict) else v)


def mamba2_to_ours(hf: dict[str, Any], sd: StateDict) -> tuple[Any, StateDict]:
    """Mamba2ForCausalLM config + state dict -> (Mamba2Config, our state dict, loads with strict=True).

    Raises:
        ConfigError: an activation other than SiLU, a clamped dt, or inconsistent head sizes.
        CheckpointError: a missing tensor.
    """
    from weightsmith.registry import build_config

    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Mamba-2 hidden_act '{hf['hidden_act']}' is not supported (ours is SiLU)")
    lo, hi = (_as_float(v) for v in hf.get("time_step_limit", (0.0, float("inf"))))
    if lo > 0.0 or math.isfinite(hi):
        raise ConfigError(f"Mamba-2 time_step_limit={[lo, hi]} (a clamped dt) is not supported; only (0, inf)")
    d, expand, d_head = hf["hidden_size"], hf.get("expand", 2), hf.get("head_dim", 64)
    if "num_heads" in hf and hf["num_heads"] * d_head != expand * d:
        raise ConfigError(f"Mamba-2 num_heads * head_dim = {hf['num_heads'] * d_head} != expand * hidden_size "
                          f"= {expand * d}")
    cfg = build_config("mamba2", dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], d_state=hf.get("state_size", 128),
        d_conv=hf.get("conv_kernel", 4), expand=expand, d_head=d_head, n_groups=hf.get("n_groups", 8),
        chunk_size=hf.get("chunk_size", 256), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", False), bias=hf.get("use_bias", False),
        conv_bias=hf.get("use_conv_bias", True)))
    emb = "backbone.embeddings.weight" if "backbone.embeddings.weight" in sd else "backbone.embedding.weight"
    out = {"tok_emb.weight": _take(sd, emb), "final_norm.weight": _take(sd, "backbone.norm_f.weight")}
    for i in range(cfg.n_layers):
        h, b = f"backbone.layers.{i}.", f"blocks.{i}."
        out[f"{b}norm.weight"] = _take(sd, f"{h}norm.weight")
        for p in _MIXER:
            if p.endswith(".bias") and not (cfg.conv_bias if p.startswith("conv1d") else cfg.bias):
                continue
            out[f"{b}mixer.{p}"] = _take(sd, f"{h}mixer.{p}")
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else _take(sd, "lm_head.weight")
    return cfg, out


def mamba2_from_ours(cfg: Any, sd: StateDict) -> tuple[dict[str, Any], StateDict]:
    """Our ``mamba2`` config + state dict -> (a ``config.json``-ready Mamba2ForCausalLM dict, HF state dict).
    Tied embeddings are exported once (no ``lm_head.weight``).

    Raises:
        ConfigError: ``cfg`` is not a Mamba2Config.
    """
    from weightsmith.models.mamba2 import Mamba2Config

    if not isinstance(cfg, Mamba2Config):
        raise ConfigError(f"mamba2_from_ours exports the mamba2 family only, got {type(cfg).__name__}")
    hf = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "state_size": cfg.d_state,
          "conv_kernel": cfg.d_conv, "expand": cfg.expand, "head_dim": cfg.d_head, "num_heads": cfg.n_heads,
          "n_groups": cfg.n_groups, "chunk_size": cfg.chunk_size, "layer_norm_epsilon": cfg.norm_eps,
          "tie_word_embeddings": cfg.tie_embeddings, "use_bias": cfg.bias, "use_conv_bias": cfg.conv_bias,
          "hidden_act": "silu", "initializer_range": cfg.init_std, "residual_in_fp32": True,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    out = {"backbone.embeddings.weight": sd["tok_emb.weight"], "backbone.norm_f.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"backbone.layers.{i}.", f"blocks.{i}."
        out[f"{h}norm.weight"] = sd[f"{b}norm.weight"]
        for p in _MIXER:
            if f"{b}mixer.{p}" in sd:
                out[f"{h}mixer.{p}"] = sd[f"{b}mixer.{p}"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return hf, out
