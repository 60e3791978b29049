"""``diffusers.UNet2DModel`` weights -> our ``unet`` family (weightsmith.models.unet).

The DDPM layout that UNet2DModel builds from ``DownBlock2D`` / ``AttnDownBlock2D`` (and the matching up
blocks) is ours module for module, so conversion is a renaming (no tensor changes):

    time_embedding.linear_1 / linear_2          -> time_emb.linear1 / linear2
    class_embedding                             -> class_emb        (num_class_embeds = n_classes + 1)
    down_blocks.i.resnets.j.{norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut}
                                                -> down.i.blocks.j.{norm1, conv1, emb_proj, norm2, conv2, skip}
    down_blocks.i.attentions.j.{group_norm, to_q, to_k, to_v, to_out.0}
                                                -> down.i.attns.j.{norm, q_proj, k_proj, v_proj, o_proj}
    down_blocks.i.downsamplers.0.conv           -> down.i.resample
    mid_block.resnets.0 / attentions.0 / resnets.1 -> mid_block1 / mid_attn / mid_block2
    up_blocks.k.resnets / attentions            -> up.k.blocks / attns
    up_blocks.k.upsamplers.0.conv               -> up.k.resample.conv
    conv_norm_out                               -> norm_out

``unet_config_from_diffusers`` maps a UNet2DModel config (``block_out_channels``, ``layers_per_block``,
``attention_head_dim``, ``norm_num_groups``...) to our field names and rejects what our U-Net does not
have (other block types, Fourier time embeddings, a scale-shift time embedding...).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from weightsmith.errors import ConfigError

_RENAMES = [
    (r"^time_embedding\.linear_(\d)\.", r"time_emb.linear\1."),
    (r"^class_embedding\.", "class_emb."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"down.\1.resample."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"up.\1.resample.conv."),
    (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.blocks."),
    (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attns."),
    (r"^up_blocks\.(\d+)\.resnets\.", r"up.\1.blocks."),
    (r"^up_blocks\.(\d+)\.attentions\.", r"up.\1.attns."),
    (r"^mid_block\.resnets\.0\.", "mid_block1."),
    (r"^mid_block\.resnets\.1\.", "mid_block2."),
    (r"^mid_block\.attentions\.0\.", "mid_attn."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"\.time_emb_proj\.", ".emb_proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_q\.", ".q_proj."), (r"\.to_k\.", ".k_proj."), (r"\.to_v\.", ".v_proj."),
    (r"\.to_out\.0\.", ".o_proj."),
]


def unet_state_dict_from_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UNet2DModel state dict with our parameter names (the same tensors)."""
    out = {}
    for name, tensor in state_dict.items():
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        out[name] = tensor
    return out


def unet_config_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """Our ``[model]`` fields for a UNet2DModel config dict.

    Raises:
        ConfigError: a UNet2DModel option that our U-Net does not implement (named).
    """
    def get(key, default=None):
        return config.get(key, default)

    wanted = {"time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
              "resnet_time_scale_shift": "default", "add_attention": True, "center_input_sample": False,
              "downsample_type": "conv", "upsample_type": "conv", "class_embed_type": None,
              "downsample_padding": 1, "mid_block_scale_factor": 1}
    for key, value in wanted.items():
        if key in config and config[key] != value:
            raise ConfigError(f"UNet2DModel {key}={config[key]!r} is not supported (our U-Net has {value!r})")
    widths = list(get("block_out_channels"))
    size = get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    attn = []
    for level, kind in enumerate(get("down_block_types")):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise ConfigError(f"UNet2DModel down block {kind} is not supported (DownBlock2D, AttnDownBlock2D)")
        if kind == "AttnDownBlock2D":
            attn.append(size // 2 ** level)
    if get("in_channels") != get("out_channels"):
        raise ConfigError("our U-Net predicts as many channels as it reads; in_channels != out_channels")
    classes = get("num_class_embeds")
    return {"in_channels": get("in_channels"), "image_size": size, "n_classes": classes - 1 if classes else 0,
            "widths": widths, "n_res_blocks": get("layers_per_block"), "attn_resolutions": attn,
            "d_head": get("attention_head_dim") or widths[-1], "n_groups": get("norm_num_groups", 32),
            "dropout": float(get("dropout", 0.0)), "norm_eps": get("norm_eps", 1e-5)}
