"""Hugging Face <-> weightsmith converters for the Vision Transformer (``ViTForImageClassification``).

Hugging Face names (``hidden_size``, ``layernorm_before``, ``classifier``) appear only here and in
:mod:`weightsmith.ship.hf_convert`. Key names are those of the HF model in memory (transformers v5:
``vit.layers.N.attention.q_proj``; HF renames older on-disk checkpoints, ``encoder.layer.N.attention.
attention.query``, itself when ``from_pretrained`` loads them)::

    ours                          HF ViTForImageClassification
    patch_emb                     vit.embeddings.patch_embeddings.projection
    cls_token (D,)                vit.embeddings.cls_token (1, 1, D)
    pos_emb (1 + N, D)            vit.embeddings.position_embeddings (1, 1 + N, D)
    blocks.i.attn_norm            vit.layers.i.layernorm_before
    blocks.i.attn.{q,k,v,o}_proj  vit.layers.i.attention.{q,k,v,o}_proj
    blocks.i.mlp_norm             vit.layers.i.layernorm_after
    blocks.i.mlp.up / down        vit.layers.i.mlp.fc1 / fc2
    final_norm                    vit.layernorm (HF normalizes every token, then reads token 0: the same)
    head                          classifier

HF's ViT always has a class token and biases on every layer but (optionally) q/k/v, so only
``pool="cls"`` and ``bias=True`` models convert.
"""

from __future__ import annotations

from typing import Any

import torch

from weightsmith.errors import CheckpointError, ConfigError

StateDict = dict[str, torch.Tensor]

_GELU = {"erf": "gelu", "tanh": "gelu_pytorch_tanh"}
_BLOCK = {"attn_norm": "layernorm_before", "mlp_norm": "layernorm_after", "attn.q_proj": "attention.q_proj",
          "attn.k_proj": "attention.k_proj", "attn.v_proj": "attention.v_proj", "attn.o_proj": "attention.o_proj",
          "mlp.up": "mlp.fc1", "mlp.down": "mlp.fc2"}
_TOP = {"patch_emb": "vit.embeddings.patch_embeddings.projection", "final_norm": "vit.layernorm",
        "head": "classifier"}


def _key_map(n_layers: int) -> dict[str, str]:
    """Our parameter name -> HF's, for everything but the class token and the position embeddings."""
    pairs = {f"{ours}.{p}": f"{hf}.{p}" for ours, hf in _TOP.items() for p in ("weight", "bias")}
    for i in range(n_layers):
        for ours, hf in _BLOCK.items():
            for p in ("weight", "bias"):
                pairs[f"blocks.{i}.{ours}.{p}"] = f"vit.layers.{i}.{hf}.{p}"
    return pairs


def vit_to_hf(cfg: Any, state_dict: StateDict) -> tuple[dict[str, Any], StateDict]:
    """Our ``vit`` model as ``ViTForImageClassification``.

    Args:
        cfg: a :class:`~weightsmith.models.vit.ViTConfig`.
        state_dict: ``model.state_dict()``.

    Returns:
        ``(hf_config_dict, hf_state_dict)``: ``transformers.ViTConfig(**hf_config_dict)`` builds a model
        that loads ``hf_state_dict`` with ``strict=True`` and computes the same logits.

    Raises:
        ConfigError: ``pool="mean"`` or ``bias=False``, which HF's ViT cannot express.
    """
    if cfg.pool != "cls":
        raise ConfigError(f"cannot export to Hugging Face: model.pool='{cfg.pool}' but ViTForImageClassification "
                          "classifies the class token (needs 'cls')")
    if not cfg.bias:
        raise ConfigError("cannot export to Hugging Face: model.bias=False but ViTForImageClassification has "
                          "biases on its projections, MLP and LayerNorms")
    hf = {"architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
          "hidden_act": _GELU[cfg.gelu], "hidden_dropout_prob": cfg.dropout,
          "attention_probs_dropout_prob": cfg.dropout, "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size,
          "patch_size": cfg.patch_size, "num_channels": cfg.in_channels, "num_labels": cfg.n_classes,
          "qkv_bias": True}
    out = {hf_key: state_dict[ours] for ours, hf_key in _key_map(cfg.n_layers).items()}
    out["vit.embeddings.cls_token"] = state_dict["cls_token"].view(1, 1, -1)  # (D,) -> (1, 1, D)
    out["vit.embeddings.position_embeddings"] = state_dict["pos_emb"].unsqueeze(0)  # (1, 1 + N, D)
    return hf, out


def hf_to_vit(hf: dict[str, Any], sd: StateDict) -> tuple[Any, StateDict]:
    """``ViTForImageClassification`` (its ``config.json`` dict and state dict) -> our config and a state
    dict that loads with ``strict=True``. The pooler of a bare ``ViTModel`` is not part of the classifier
    and is dropped.

    Raises:
        ConfigError: an activation other than erf/tanh GELU, or ``qkv_bias=False``.
        CheckpointError: a tensor the config promises is missing.
    """
    from weightsmith.registry import build_config

    act = {v: k for k, v in _GELU.items()}.get(hf.get("hidden_act", "gelu"))
    if act is None:
        raise ConfigError(f"hidden_act='{hf['hidden_act']}' is not supported; only {', '.join(_GELU.values())}")
    if not hf.get("qkv_bias", True):
        raise ConfigError("qkv_bias=False is not supported: our ViT has one bias switch for every layer")
    n_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    cfg = build_config("vit", dict(
        in_channels=hf.get("num_channels", 3), image_size=hf.get("image_size", 224), n_classes=n_labels,
        patch_size=hf.get("patch_size", 16), d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"], pool="cls", gelu=act,
        dropout=hf.get("hidden_dropout_prob", 0.0), bias=True, norm_eps=hf.get("layer_norm_eps", 1e-12)))

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"HF state dict has no '{key}'")
        return sd[key]

    out = {ours: take(hf_key) for ours, hf_key in _key_map(cfg.n_layers).items()}
    out["cls_token"] = take("vit.embeddings.cls_token").reshape(-1)  # (1, 1, D) -> (D,)
    out["pos_emb"] = take("vit.embeddings.position_embeddings").squeeze(0)  # (1 + N, D)
    return cfg, out
