"""GGUF tensors and hyperparameters of the state-space families, for llama.cpp's ``mamba2`` and ``mamba``.

Sources (llama.cpp, the copy vendored by llama-cpp-python 0.3.36): ``convert_hf_to_gguf.py``
(``conversion/mamba.py``: ``MambaModel``, ``Mamba2Model``: the transforms), ``gguf-py/gguf/constants.py``
(``MODEL_TENSOR.SSM_*`` names, ``Keys.SSM``), ``src/models/mamba2.cpp`` and ``src/models/mamba.cpp``
(the shapes the loader checks, every tensor below required), ``src/models/mamba-base.cpp`` (the graph:
``build_mamba2_layer``, ``build_mamba_layer``) and ``ggml/src/ggml-cpu/ops.cpp`` (``ssm_conv`` and
``ssm_scan`` read float32 only, and apply ``softplus`` to ``dt + dt_bias`` themselves, as we do).

Shapes are PyTorch's (rows, columns); GGUF lists them innermost first, so llama.cpp's ``{d_conv, conv_dim}``
is our (conv_dim, d_conv). Legend: D = d_model, E = d_inner = expand * D, H = n_heads, G = n_groups,
N = d_state, K = d_conv, R = dt_rank, V = vocab_size.

``mamba2`` (family ``mamba2``, :mod:`weightsmith.models.mamba2`), per block ``i``::

    ours (blocks.i.)            GGUF (blk.i.)          shape              transform
    norm.weight                 attn_norm.weight       (D,)
    mixer.in_proj.weight        ssm_in.weight          (2E + 2GN + H, D)  none: rows z | x B C | dt, llama.cpp's split
    mixer.conv1d.weight         ssm_conv1d.weight      (E + 2GN, K)       squeeze the (E + 2GN, 1, K) channel axis
    mixer.conv1d.bias           ssm_conv1d.bias        (E + 2GN,)         zeros when conv_bias=False
    mixer.dt_bias               ssm_dt.bias            (H,)
    mixer.A_log                 ssm_a                  (H, 1)             A = -exp(A_log), stored as such
    mixer.D                     ssm_d                  (H, 1)
    mixer.norm.weight           ssm_norm.weight        (G, E / G)         one row per norm group
    mixer.out_proj.weight       ssm_out.weight         (D, E)

``mamba`` (Mamba-1, family ``mamba``, :mod:`weightsmith.models.mamba`; HF ``MambaForCausalLM``'s mixer)::

    norm.weight                 attn_norm.weight       (D,)
    mixer.in_proj.weight        ssm_in.weight          (2E, D)            none: rows x | z
    mixer.conv1d.weight         ssm_conv1d.weight      (E, K)             squeeze
    mixer.conv1d.bias           ssm_conv1d.bias        (E,)               zeros when conv_bias=False
    mixer.x_proj.weight         ssm_x.weight           (R + 2N, E)        none: rows dt | B | C
    mixer.dt_proj.weight        ssm_dt.weight          (E, R)
    mixer.dt_proj.bias          ssm_dt.bias            (E,)
    mixer.A_log                 ssm_a                  (E, N)             A = -exp(A_log)
    mixer.D                     ssm_d                  (E,)
    mixer.out_proj.weight       ssm_out.weight         (D, E)

Both: ``tok_emb`` -> ``token_embd``, ``final_norm`` -> ``output_norm``, an untied ``lm_head`` -> ``output``
(a tied one is written once; llama.cpp reuses ``token_embd``). Every norm is an RMSNorm with llama.cpp's
one ``attention.layer_norm_rms_eps``, our ``norm_eps``.

Metadata (``{arch}.`` prefix): ``context_length`` 2**20 (as llama.cpp's converter: the state does not
grow, so our ``max_seq_len``, a training window, bounds nothing), ``embedding_length`` D,
``block_count``, ``feed_forward_length`` 0 and ``attention.head_count`` 0 (no MLP, no attention),
``ssm.conv_kernel`` K, ``ssm.inner_size`` E, ``ssm.state_size`` N, ``ssm.time_step_rank`` (mamba2: H;
mamba: R), ``ssm.group_count`` G (mamba2), ``ssm.dt_b_c_rms`` false (mamba).

Not expressible (ConfigError naming the field): biases on ``in_proj``/``out_proj`` (llama.cpp has
none for either arch); for ``mamba``, ``expand`` other than 2 (``mamba.cpp`` refuses it).
"""

from __future__ import annotations

from typing import Any

import torch

from weightsmith.errors import ConfigError

# our family -> llama.cpp architecture
SSM_ARCHS = {"mamba2": "mamba2", "mamba": "mamba"}
CONTEXT_LENGTH = 2 ** 20  # llama.cpp's converter writes the same "arbitrary value" for both archs


def ssm_gguf_arch(cfg: Any, family: str) -> str:
    """``"mamba2"`` or ``"mamba"`` for a config of family ``family``.

    Raises:
        ConfigError: naming the first field llama.cpp's architecture cannot express (one line).
    """
    arch = SSM_ARCHS[family]
    if getattr(cfg, "bias", False):
        raise ConfigError(f"model.bias={cfg.bias!r} cannot be exported to GGUF: llama.cpp's {arch} has no "
                          f"in_proj/out_proj biases; supported: False")
    if arch == "mamba" and cfg.expand != 2:
        raise ConfigError(f"model.expand={cfg.expand!r} cannot be exported to GGUF: llama.cpp's mamba supports "
                          f"only d_inner = 2 * d_model; supported: 2")
    return arch


def ssm_gguf_tensors(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's names and shapes (module docstring tables), float32 on the CPU."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"blk.{i}."
        m = p + "mixer."
        conv = sd[m + "conv1d.weight"].squeeze(1)  # (channels, 1, K) -> (channels, K)
        out[b + "attn_norm.weight"] = sd[p + "norm.weight"]
        out[b + "ssm_in.weight"] = sd[m + "in_proj.weight"]
        out[b + "ssm_conv1d.weight"] = conv
        out[b + "ssm_conv1d.bias"] = sd.get(m + "conv1d.bias", torch.zeros(conv.shape[0]))  # llama.cpp needs it
        A = -torch.exp(sd[m + "A_log"])
        if arch == "mamba2":
            out[b + "ssm_dt.bias"] = sd[m + "dt_bias"]
            out[b + "ssm_a"] = A[:, None]  # (H, 1): the shape of Mamba-1's (E, N) with N = 1
            out[b + "ssm_d"] = sd[m + "D"][:, None]  # (H, 1), broadcast over the head's P channels
            out[b + "ssm_norm.weight"] = sd[m + "norm.weight"].reshape(cfg.n_groups, -1)  # (G, E / G)
        else:
            out[b + "ssm_x.weight"] = sd[m + "x_proj.weight"]
            out[b + "ssm_dt.weight"] = sd[m + "dt_proj.weight"]
            out[b + "ssm_dt.bias"] = sd[m + "dt_proj.bias"]
            out[b + "ssm_a"] = A  # (E, N)
            out[b + "ssm_d"] = sd[m + "D"]
        out[b + "ssm_out.weight"] = sd[m + "out_proj.weight"]
    return out


def add_ssm_hparams(w: Any, cfg: Any, arch: str) -> None:
    """Write the metadata of the module docstring with the ``gguf.GGUFWriter`` ``w``."""
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(cfg.d_conv)
    w.add_ssm_inner_size(cfg.expand * cfg.d_model)
    w.add_ssm_state_size(cfg.d_state)
    if arch == "mamba2":
        w.add_ssm_time_step_rank(cfg.n_heads)
        w.add_ssm_group_count(cfg.n_groups)
    else:
        w.add_ssm_time_step_rank(cfg.dt_rank)
        w.add_ssm_dt_b_c_rms(False)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
