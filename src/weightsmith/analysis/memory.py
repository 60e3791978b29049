"""Analytic memory in bytes: weights, gradients, optimizer state, activations, KV cache, peaks.

Every tensor is counted at one ``dtype`` (pure fp32 or pure bf16 training; mixed precision with fp32
master weights is not modelled). Optimizer state per trainable parameter: ``adamw`` 2 (``exp_avg``,
``exp_avg_sq``, same dtype as the parameter, as ``torch.optim.AdamW`` keeps them), ``sgd`` 0 (plain
SGD), ``sgd-momentum`` 1 (the momentum buffer).

Activations for training are the tensors autograd saves for the backward pass, counted per module in
:mod:`weightsmith.analysis.components` (Korthikanti et al. 2022 did this analysis for Megatron), plus
the logits the caller holds until ``backward``. With activation checkpointing of every block
(``torch.utils.checkpoint``, weightsmith.train.activation_checkpointing), a block keeps only its input
(B, T, d_model) and one block's activations are rebuilt at a time during the backward pass.

Peaks:

- ``train_peak = weights + grads + optimizer + activations + backward transient``: the steady state of
  a training step in which gradients stay allocated across steps (``zero_grad(set_to_none=False)``, or
  gradient accumulation), at the start of the backward pass, when every activation is still alive and
  the first gradients exist. The transient is two tensors of the widest per-token width (the gradients
  of the log-probabilities and of the logits, (B, T, V) each; ``d_ff`` for an encoder without an LM
  head). The tests measure this on CPU with ``torch.profiler`` memory events.
- ``train_peak_checkpointed``: the same sum with ``activations_checkpointed``. It adds the transient
  of the start of backward to the largest rebuilt block, which never coexist, so it is an upper-side
  estimate: +3% to +16% of the profiled peak for the tiny gpt, bert and t5 configs of the tests.
- ``infer_peak = weights + KV cache at (B, T) + the largest per-layer working set of a prefill over
  (B, T) + the logits``: an estimate (not measured by the tests).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from weightsmith.analysis.components import Row, rows_for
from weightsmith.errors import ConfigError

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "half": 2, "float8": 1, "fp8": 1, "int8": 1}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (``float32``, ``bf16``...). Raises ConfigError if unknown."""
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ConfigError(f"dtype '{dtype}' is not known; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def optimizer_states(optimizer: str) -> int:
    """States kept per trainable parameter. Raises ConfigError for an unknown optimizer name."""
    if optimizer not in OPTIMIZER_STATES:
        raise ConfigError(f"optimizer '{optimizer}' is not known; choose one of {', '.join(OPTIMIZER_STATES)}")
    return OPTIMIZER_STATES[optimizer]


def row_activation_elements(row: Row, batch_size: int, seq_len: int, src_len: int | None = None) -> float:
    """Floating-point elements a row keeps alive for backward over a (B, T) batch (B, S for the source)."""
    S = src_len or seq_len
    n = {"main": seq_len, "src": S, "seq": 1}[row.stream]
    ctx = S if row.context == "src" or row.stream == "src" else seq_len
    per_seq = (row.act + row.act_held) * n + row.act_src * S + row.act_ctx * n * ctx
    return batch_size * per_seq + row.act_pos * seq_len


def activation_bytes(rows: list[Row], batch_size: int, seq_len: int, nbytes: int, *, checkpointing: bool = False,
                     d_model: int = 0, src_len: int | None = None) -> float:
    """Training activation bytes over a (B, T) batch; see the module docstring for checkpointing."""
    S = src_len or seq_len
    total = sum(row_activation_elements(r, batch_size, seq_len, S) for r in rows)
    if not checkpointing:
        return total * nbytes
    per_layer: dict[tuple[str, int], float] = defaultdict(float)
    outside = 0.0
    for r in rows:
        if r.layer is None:
            outside += row_activation_elements(r, batch_size, seq_len, S)
        else:
            per_layer[(r.stream, r.layer)] += row_activation_elements(r, batch_size, seq_len, S)
    inputs = sum(batch_size * d_model * (S if stream == "src" else seq_len) for stream, _ in per_layer)
    return (outside + inputs + max(per_layer.values(), default=0.0)) * nbytes


def kv_cache_bytes_per_token(rows: list[Row], nbytes: int) -> dict[str, float]:
    """KV-cache bytes per generated (target) token and per source token (T5 cross-attention)."""
    return {"per_token": sum(r.kv_per_token for r in rows) * nbytes,
            "per_src_token": sum(r.kv_per_src for r in rows) * nbytes}


def memory_estimate(family: str, cfg: Any, *, batch_size: int, seq_len: int, dtype: str = "float32",
                    optimizer: str = "adamw", src_len: int | None = None,
                    rows: list[Row] | None = None) -> dict[str, float]:
    """Bytes of every part of training and inference memory at (batch_size, seq_len).

    Returns a dict (all values in bytes): ``weights, grads, optimizer, activations,
    activations_checkpointed, kv_cache_per_token, kv_cache_per_src_token, kv_cache, backward_transient,
    train_peak, train_peak_checkpointed, infer_peak``. ``kv_cache`` is for B sequences of T tokens (and
    a source of ``src_len`` for T5); an encoder-only model has none (0).

    Raises:
        ConfigError: unknown dtype or optimizer.
    """
    nb = dtype_bytes(dtype)
    states = optimizer_states(optimizer)
    rows = rows if rows is not None else rows_for(family, cfg)
    S = src_len or seq_len
    n_params = sum(r.params for r in rows)
    weights = n_params * nb
    grads = n_params * nb
    opt = states * n_params * nb
    act = activation_bytes(rows, batch_size, seq_len, nb, src_len=S)
    act_ckpt = activation_bytes(rows, batch_size, seq_len, nb, checkpointing=True, d_model=cfg.d_model, src_len=S)
    kv = kv_cache_bytes_per_token(rows, nb)
    kv_total = batch_size * (kv["per_token"] * seq_len + kv["per_src_token"] * S)
    # prefill working set: the residual stream, the widest layer's live tensors, and the logits
    widest = max((r.act + r.act_ctx * seq_len for r in rows if r.layer is not None), default=0.0)
    head = max((r.act_held for r in rows), default=0.0)
    infer_work = batch_size * seq_len * (cfg.d_model + widest + head) * nb
    transient = 2 * batch_size * seq_len * (head or getattr(cfg, "d_ff", 0) or 0) * nb
    return {"weights": weights, "grads": grads, "optimizer": opt, "activations": act,
            "activations_checkpointed": act_ckpt, "kv_cache_per_token": kv["per_token"],
            "kv_cache_per_src_token": kv["per_src_token"], "kv_cache": kv_total,
            "backward_transient": transient, "train_peak": weights + grads + opt + act + transient,
            "train_peak_checkpointed": weights + grads + opt + act_ckpt + transient,
            "infer_peak": weights + kv_total + infer_work}
