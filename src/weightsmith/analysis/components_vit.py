"""Analytic rows of the Vision Transformer (:mod:`weightsmith.models.vit`).

The vision convention, shared by every image family (``vit`` here, ``mlp``/``resnet``/``convnext`` in
:mod:`weightsmith.analysis.components_vision`): one "token" of the analysis is one *image*. Every row
is on stream ``"main"`` and the analysis runs at ``seq_len = 1``, so the per-token numbers of
``inspect`` are per-image numbers and ``B`` counts images. Per image:

- ``mm``: multiply-adds of every linear layer and convolution, *including* the attention products
  ``Q K^T`` and ``P V`` (``2 * n_tokens^2 * n_heads * d_head`` multiply-adds; the token count is fixed by
  ``image_size / patch_size``, so the products are a constant cost per image); ``attn_dim = 0``.
  Forward FLOPs = 2 * mm, as ``FlopCounterMode`` counts convolutions, ``addmm`` and SDPA.
- ``act``: floating-point elements autograd saves for the backward pass (the rules of
  :mod:`weightsmith.analysis.components`: a linear layer keeps its input, LayerNorm its input + mean +
  rstd per token, the flash SDPA kernel q, k, v, the output and one log-sum-exp per head and token, the
  erf/tanh GELU its input), times the ``n_tokens`` tokens of the image. With ``dropout = 0`` (the
  default): dropout masks, and the math-path attention probabilities that SDPA dropout brings, are not
  modelled.
- ``block_input``: ``n_tokens * d_model``, the block input a checkpointed block keeps (first row of
  each block).

With N = n_patches = (image_size / patch_size)^2, n_tokens = N (+1 for the class token), D = d_model:

    patch_emb   mm = D * C * P^2 * N       act = C * H * W (the image, kept for the weight gradient)
    attention   mm = n_tokens * 4 D^2 + 2 n_tokens^2 D
    mlp         mm = n_tokens * 2 D d_ff
    head        mm = D * n_classes
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.analysis.components import Row


def _per_image(row: Row, n_tokens: int, attention_products: int = 0, notes: str = "") -> Row:
    """A per-token transformer row scaled to one image of ``n_tokens`` tokens; the attention products
    (multiply-adds per image) move into ``mm``; no KV cache (an encoder)."""
    return replace(row, mm=row.mm * n_tokens + attention_products, attn_dim=0, act=row.act * n_tokens,
                   kv_per_token=0, notes=notes or row.notes)


def vit_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.vit.ViTConfig` model, per image (see module docstring)."""
    # imported here: components.py imports this module to register the builder, so a module-level import
    # would be circular whichever of the two is imported first
    from weightsmith.analysis.components import Row, _linear, _mlp, _norm, _self_attention, _with_layer

    d, bias, N, T = cfg.d_model, cfg.bias, cfg.n_patches, cfg.n_tokens
    C, P = cfg.in_channels, cfg.patch_size
    conv_w = (("patch_emb.weight", (d, C, P, P)),) + ((("patch_emb.bias", (d,)),) if bias else ())
    rows = [Row("patch_emb", "conv", conv_w, mm=d * C * P * P * N, act=C * cfg.image_size ** 2,
                notes=f"Conv2d {P}x{P} stride {P}: {N} patches; keeps its input image")]
    emb_w = ((("cls_token", (d,)),) if cfg.pool == "cls" else ()) + (("pos_emb", (T, d)),)
    rows.append(Row("pos_emb", "embedding", emb_w, embedding=True,
                    notes="class token + learned positions" if cfg.pool == "cls" else "learned positions"))
    qk_pv = 2 * T * T * cfg.n_heads * cfg.d_head
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        # the block's input (T, D) is all a checkpointed block keeps, and the residual stream at inference
        rows.append(replace(_per_image(_norm(f"{b}.attn_norm", "layernorm", d, bias), T), block_input=T * d))
        attn = _self_attention(f"{b}.attn", d, cfg.n_heads, cfg.n_heads, cfg.d_head, bias, kv_cache=False)
        rows.append(_per_image(attn, T, qk_pv, notes=f"mm includes Q K^T and P V over {T} tokens"))
        rows.append(_per_image(_norm(f"{b}.mlp_norm", "layernorm", d, bias), T))
        rows.append(_per_image(_mlp(f"{b}.mlp", "gelu", d, cfg.d_ff, bias), T))
    rows = [_with_layer(r) for r in rows]
    if cfg.pool == "cls":  # the norm's input x[:, 0] is a view that pins the last block's (T, D) output
        rows.append(_norm("final_norm", "layernorm", d, bias, extra_act=(T - 1) * d,
                          notes="on the class token; its input view pins the last hidden state"))
    else:  # the mean over tokens keeps nothing; the norm keeps the pooled (D,) vector
        rows.append(_norm("final_norm", "layernorm", d, bias, notes="on the mean over tokens"))
    K = cfg.n_classes
    rows.append(Row("head", "head", _linear("head", d, K, bias), mm=d * K, act=d + K, act_held=K,
                    notes="keeps its input; logits and log-softmax (n_classes each) live until backward"))
    return rows
