"""Hugging Face <-> weightsmith converters for Mamba-1 (``MambaForCausalLM``, family ``mamba``).

Hugging Face names (``hidden_size``, ``state_size``, ``backbone.layers``) appear only here and in the
other ``hf_convert*`` modules. Our mixer mirrors HF ``MambaMixer`` parameter for parameter (Gu & Dao
2023; :mod:`weightsmith.models.mamba`), so the map renames prefixes only::

    ours                         HF MambaForCausalLM
    tok_emb                      backbone.embeddings (older checkpoints: backbone.embedding)
    blocks.i.norm                backbone.layers.i.norm
    blocks.i.mixer.<p>           backbone.layers.i.mixer.<p>   in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj
    final_norm                   backbone.norm_f
    lm_head                      lm_head (absent from a tied export)

Config: ``hidden_size`` = d_model, ``num_hidden_layers`` = n_layers, ``state_size`` = d_state,
``conv_kernel`` = d_conv, ``expand`` = expand (an integer; ``intermediate_size`` = expand * d_model),
``time_step_rank`` = dt_rank (``"auto"`` = ceil(d_model / 16), ours too), ``layer_norm_epsilon`` =
norm_eps, ``use_bias`` = bias, ``use_conv_bias`` = conv_bias, ``tie_word_embeddings`` =
tie_embeddings, ``time_step_min/max/floor`` = dt_min/dt_max/dt_init_floor, ``initializer_range`` =
init_std. HF has no training window; an imported model gets ``max_seq_len`` = 256 (ours only bounds
training windows).

Refused (one-line ConfigError naming the HF field): ``hidden_act`` other than SiLU, a non-integer
``expand``, an ``intermediate_size`` other than expand * hidden_size. Fields that only change HF's
initialization (``time_step_scale``, ``time_step_init_scheme``, ``rescale_prenorm_residual``) or its
kernels (``use_mambapy``, ``use_associative_scan``) do not change the function and are ignored;
``residual_in_fp32`` only matters below fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from weightsmith.errors import CheckpointError, ConfigError

StateDict = dict[str, torch.Tensor]

_MIXER = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
          "dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias")


def _take(sd: StateDict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"HF state dict has no '{key}'")
    return sd[key]


def _has(cfg: Any, p: str) -> bool:
    """Whether our mixer has parameter ``p`` under ``cfg`` (the optional biases)."""
    if p.startswith("conv1d.bias"):
        return cfg.conv_bias
    if p in ("in_proj.bias", "out_proj.bias"):
        return cfg.bias
    return True


def mamba_to_ours(hf: dict[str, Any], sd: StateDict) -> tuple[Any, StateDict]:
    """MambaForCausalLM ``config.json`` dict + state dict -> (MambaConfig, our state dict, loads with
    strict=True). Tensors are shared, not copied.

    Raises:
        ConfigError: one line naming the HF field our model cannot express (module docstring).
        CheckpointError: a missing tensor.
    """
    import weightsmith.models.mamba  # noqa: F401 (registers the family)
    from weightsmith.registry import build_config

    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Mamba hidden_act={hf['hidden_act']!r} is not supported; supported: 'silu'")
    d, expand = hf["hidden_size"], hf.get("expand", 2)
    if int(expand) != expand:
        raise ConfigError(f"Mamba expand={expand!r} is not supported; ours needs an integer expand")
    expand = int(expand)
    if hf.get("intermediate_size", expand * d) != expand * d:
        raise ConfigError(f"Mamba intermediate_size={hf['intermediate_size']} is not supported; ours is "
                          f"expand * hidden_size = {expand * d}")
    rank = hf.get("time_step_rank", "auto")
    cfg = build_config("mamba", dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], d_state=hf.get("state_size", 16),
        d_conv=hf.get("conv_kernel", 4), expand=expand, dt_rank=None if rank == "auto" else int(rank),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
        bias=hf.get("use_bias", False), conv_bias=hf.get("use_conv_bias", True),
        dt_min=hf.get("time_step_min", 1e-3), dt_max=hf.get("time_step_max", 0.1),
        dt_init_floor=hf.get("time_step_floor", 1e-4), init_std=hf.get("initializer_range", 0.1)))
    emb = "backbone.embeddings.weight" if "backbone.embeddings.weight" in sd else "backbone.embedding.weight"
    out = {"tok_emb.weight": _take(sd, emb), "final_norm.weight": _take(sd, "backbone.norm_f.weight")}
    for i in range(cfg.n_layers):
        h, b = f"backbone.layers.{i}.", f"blocks.{i}."
        out[f"{b}norm.weight"] = _take(sd, f"{h}norm.weight")
        for p in _MIXER:
            if _has(cfg, p):
                out[f"{b}mixer.{p}"] = _take(sd, f"{h}mixer.{p}")
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else _take(sd, "lm_head.weight")
    return cfg, out


def mamba_from_ours(cfg: Any, sd: StateDict) -> tuple[dict[str, Any], StateDict]:
    """Our ``mamba`` config + state dict -> (a ``config.json``-ready MambaForCausalLM dict, HF state dict).
    Tied embeddings are exported once (no ``lm_head.weight``); no special tokens (ids null).

    Raises:
        ConfigError: ``cfg`` is not a MambaConfig.
    """
    from weightsmith.models.mamba import MambaConfig

    if not isinstance(cfg, MambaConfig):
        raise ConfigError(f"mamba_from_ours exports the mamba family only, got {type(cfg).__name__}")
    hf = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "state_size": cfg.d_state,
          "conv_kernel": cfg.d_conv, "expand": cfg.expand, "intermediate_size": cfg.d_inner,
          "time_step_rank": cfg.dt_rank, "layer_norm_epsilon": cfg.norm_eps,
          "tie_word_embeddings": cfg.tie_embeddings, "use_bias": cfg.bias, "use_conv_bias": cfg.conv_bias,
          "hidden_act": "silu", "initializer_range": cfg.init_std, "residual_in_fp32": True,
          "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "time_step_floor": cfg.dt_init_floor,
          "time_step_scale": 1.0, "time_step_init_scheme": "random",
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
