"""Analytic FLOPs, per token and per training step.

Convention: 2 FLOPs per multiply-add; only matrix multiplies count (linear layers, lm_head, and the
attention products ``Q K^T`` and ``P V``); attention is dense over the whole context, with no causal
halving, as ``torch.utils.flop_counter.FlopCounterMode`` and PaLM's MFU formula count it. Training is
3x forward (the backward pass computes one product for the input gradient and one for the weight
gradient), the convention of Kaplan et al. 2020 behind ``C = 6 N D``.

Per token means per token of the main stream: for T5 (encoder-decoder) a *target* token with a source
of ``src_len`` tokens (default ``seq_len``), so that encoder work is included and ``6N`` still applies.
For image models one token is one image (``seq_len = 1``): the per-token numbers are per image, and the
matrix multiplies are convolutions (``out_channels * in_channels / groups * kernel_size^2 * H_out * W_out``
multiply-adds) and linear layers, as FlopCounterMode counts ``aten.convolution`` and ``addmm``; BatchNorm,
LayerNorm, activations and pooling are not counted (:mod:`weightsmith.analysis.components_vision`).

For one layer of a decoder with D = d_model, T context, n_heads * d_head = D and a 4D GELU MLP::

    q, k, v, o projections   2 * 4 D^2      per token
    Q K^T and P V            2 * 2 T D      per token (grows with T)
    MLP up and down          2 * 8 D^2      per token
"""

from __future__ import annotations

from typing import Any

from weightsmith.analysis.components import Row, rows_for


def _tokens(row: Row, seq_len: int, src_len: int) -> int:
    return {"main": seq_len, "src": src_len, "seq": 1}[row.stream]


def row_flops(row: Row, seq_len: int, src_len: int | None = None) -> tuple[float, float]:
    """Forward FLOPs of one row for one sequence: ``(matmul, attention)``; divide by ``seq_len`` for
    per-token numbers. ``attention`` is the part that grows with the context length."""
    src_len = src_len or seq_len
    n = _tokens(row, seq_len, src_len)
    matmul = 2.0 * (row.mm * n + row.mm_src * src_len)
    ctx = src_len if row.context == "src" or row.stream == "src" else seq_len
    attention = 4.0 * row.attn_dim * n * ctx
    return matmul, attention


def forward_flops(family: str, cfg: Any, seq_len: int, *, src_len: int | None = None,
                  rows: list[Row] | None = None) -> dict[str, float]:
    """Forward FLOPs per token at context ``seq_len``: ``{"matmul", "attention", "total"}``.

    ``matmul`` is ``2 x`` the matmul weights a token passes through (constant in T); ``attention`` is
    ``4 * n_heads * d_head * T`` per layer (the part that grows with T). FLOPs = 2 per multiply-add.
    """
    rows = rows if rows is not None else rows_for(family, cfg)
    mm = att = 0.0
    for r in rows:
        a, b = row_flops(r, seq_len, src_len)
        mm, att = mm + a, att + b
    return {"matmul": mm / seq_len, "attention": att / seq_len, "total": (mm + att) / seq_len}


def flops_per_token(family: str, cfg: Any, seq_len: int, *, training: bool = True) -> float:
    """FLOPs per token of a ``family`` model with config ``cfg`` at context length ``seq_len``.

    Forward FLOPs per token (2 per multiply-add, matmuls only, dense attention), times 3 if
    ``training`` (forward + backward). For MFU: ``flops_per_token * tokens_per_second / peak``.

    Raises:
        ConfigError: for a family without an analytic model.
    """
    fwd = forward_flops(family, cfg, seq_len)["total"]
    return 3.0 * fwd if training else fwd


def step_flops(family: str, cfg: Any, batch_size: int, seq_len: int) -> float:
    """Training FLOPs of one optimizer step over ``batch_size`` sequences of ``seq_len`` tokens."""
    return flops_per_token(family, cfg, seq_len, training=True) * batch_size * seq_len


def flop_counter(display: bool = False):
    """A ``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU attention kernel.

    PyTorch registers FLOP formulas for the CUDA SDPA kernels (flash, efficient, cuDNN) but not for
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (nor its backward), so on CPU the attention
    products would silently count 0. We map the CPU kernel to the same dense formula
    (``4 * B * n_heads * T * S * d_head``), which is also our convention. The math path (used when the
    attention bias needs a gradient, as in T5) runs plain ``bmm`` and is counted natively.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: forward}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return FlopCounterMode(display=display, custom_mapping=mapping)
