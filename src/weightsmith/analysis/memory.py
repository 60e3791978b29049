"""Analytic memory in bytes: weights, gradients, optimizer state, activations, KV cache, peaks.

Every tensor is counted at one ``dtype`` (pure fp32 or pure bf16 training; mixed precision with fp32
master weights is not modelled). Optimizer state per trainable parameter: ``adamw`` 2 (``exp_avg``,
``exp_avg_sq``, same dtype as the parameter, as ``torch.optim.AdamW`` keeps them), ``sgd`` 0 (plain
SGD), ``sgd-momentum`` 1 (the momentum buffer).

Activations for training are the tensors autograd saves for the backward pass, counted per module in
:mod:`weightsmith.analysis.components` (Korthikanti et al. 2022 did this analysis for Megatron), plus
the logits the caller holds until ``backward``. With activation checkpointing of every block
(``torch.utils.checkpoint``, weightsmith.train.activation_checkpointing), a block keeps only its input
(B, T, d_model; for image models the block's own input size, ``Row.block_input``) and one block's
activations are rebuilt at a time during the backward pass. ``buffers`` are the floating-point buffers
saved with the weights (BatchNorm's running mean and variance), counted in every peak.

Peaks:

- ``train_peak = weights + grads + optimizer + activations + backward transient``: the steady state of
  a training step in which gradients stay allocated across steps (``zero_grad(set_to_none=False)``, or
  gradient accumulation), at the start of the backward pass, when every activation is still alive and
  the first gradients exist. The transient is two tensors of the widest per-token width (the gradients
  of the log-probabilities and of the logits, (B, T, V) each; ``d_ff`` for an encoder without an LM
  head). :func:`profiled_train_peak` measures this on CPU with ``torch.profiler`` memory events.
  Image models (one token = one image, :mod:`weightsmith.analysis.components_vision`) have tiny logits;
  their transient is a layer's fresh weight gradient and a reordered copy of it (oneDNN), alive inside
  that layer's backward before ``AccumulateGrad`` adds it to ``.grad``, less the activations of the
  layers after it, already freed by then: it matters where the widest weights are last (a ResNet's
  last stage). Measured against the profiled peak (tests/test_models_vision.py and by hand): -7% to +3%
  for the 28x28 presets at B = 32..512 and small ResNet/ConvNeXt configs, ResNet-18 at 64x64 -0.4%;
  ConvNeXt at small batches is lower, -13% at B = 32 and -21% at B = 16, where a few MiB of
  convolution-backward workspace that does not grow with B dominate. Checkpointed: -6% to +2%.
- ``train_peak_checkpointed``: the same sum with ``activations_checkpointed``. It adds the transient
  of the start of backward to the largest rebuilt block, which never coexist, so it is an upper-side
  estimate: +3% to +16% of the profiled peak for the tiny gpt, bert and t5 configs of the tests.
- ``infer_peak = weights + KV cache at (B, T) (or a recurrent state) + the largest per-layer working set
  of a prefill over (B, T) + the logits``: an estimate (not measured by the tests).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from weightsmith.analysis.components import Row, rows_for
from weightsmith.analysis.components_vision import is_image_config
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
    return batch_size * per_seq + row.act_pos * seq_len + row.act_pos_ctx * seq_len * ctx


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
    width: dict[tuple[str, int], float] = defaultdict(float)  # a checkpointed block's input, per token
    for r in rows:
        if r.layer is not None and r.block_input:
            width[(r.stream, r.layer)] = max(width[(r.stream, r.layer)], r.block_input)
    inputs = sum(batch_size * (width[key] or d_model) * (S if key[0] == "src" else seq_len) for key in per_layer)
    return (outside + inputs + max(per_layer.values(), default=0.0)) * nbytes


def kv_cache_bytes_per_token(rows: list[Row], nbytes: int) -> dict[str, float]:
    """KV-cache bytes per generated (target) token and per source token (T5 cross-attention)."""
    return {"per_token": sum(r.kv_per_token for r in rows) * nbytes,
            "per_src_token": sum(r.kv_per_src for r in rows) * nbytes}


def _weight_gradient_transient(rows: list[Row], batch_size: int, seq_len: int) -> float:
    """Elements above the activations still alive while the backward pass is inside the worst row: its
    largest weight twice (the fresh gradient and a reordered copy), less what the rows after it kept."""
    worst = freed = 0.0
    for r in reversed(rows):  # backward order
        largest = max((math.prod(shape) for _, shape in r.weights), default=0)
        worst = max(worst, 2 * largest - freed)
        freed += row_activation_elements(r, batch_size, seq_len)
    return worst


def memory_estimate(family: str, cfg: Any, *, batch_size: int, seq_len: int, dtype: str = "float32",
                    optimizer: str = "adamw", src_len: int | None = None,
                    rows: list[Row] | None = None) -> dict[str, float]:
    """Bytes of every part of training and inference memory at (batch_size, seq_len).

    Returns a dict (all values in bytes): ``weights, buffers, grads, optimizer, activations,
    activations_checkpointed, kv_cache_per_token, kv_cache_per_src_token, kv_cache, state_per_seq, state,
    backward_transient, train_peak, train_peak_checkpointed, infer_peak``. ``kv_cache`` is for B sequences
    of T tokens (and a source of ``src_len`` for T5); an encoder-only model has none (0). ``state_per_seq``
    is a recurrent model's state (RNN h, c) per sequence, constant in T, and ``state`` that of B sequences;
    0 for the other families.

    Raises:
        ConfigError: unknown dtype or optimizer.
    """
    nb = dtype_bytes(dtype)
    states = optimizer_states(optimizer)
    rows = rows if rows is not None else rows_for(family, cfg)
    S = src_len or seq_len
    n_params = sum(r.params for r in rows)
    weights = n_params * nb
    buffers = sum(r.buffers for r in rows) * nb
    grads = n_params * nb
    opt = states * n_params * nb
    act = activation_bytes(rows, batch_size, seq_len, nb, src_len=S)
    d_model = getattr(cfg, "d_model", 0)
    act_ckpt = activation_bytes(rows, batch_size, seq_len, nb, checkpointing=True, d_model=d_model, src_len=S)
    kv = kv_cache_bytes_per_token(rows, nb)
    kv_total = batch_size * (kv["per_token"] * seq_len + kv["per_src_token"] * S)
    state_seq = sum(r.state_per_seq for r in rows) * nb
    # prefill working set: the residual stream, the widest layer's live tensors, and the logits
    widest = max((r.act + r.act_ctx * seq_len for r in rows if r.layer is not None), default=0.0)
    head = max((r.act_held for r in rows), default=0.0)
    residual = max((r.block_input for r in rows), default=0.0) or d_model
    infer_work = batch_size * seq_len * (residual + widest + head) * nb
    transient = 2 * batch_size * seq_len * (head or getattr(cfg, "d_ff", 0) or 0) * nb
    if is_image_config(cfg):  # see the module docstring
        transient += _weight_gradient_transient(rows, batch_size, seq_len) * nb
    state = weights + buffers + grads + opt
    return {"weights": weights, "buffers": buffers, "grads": grads, "optimizer": opt, "activations": act,
            "activations_checkpointed": act_ckpt, "kv_cache_per_token": kv["per_token"],
            "kv_cache_per_src_token": kv["per_src_token"], "kv_cache": kv_total,
            "state_per_seq": state_seq, "state": batch_size * state_seq,
            "backward_transient": transient, "train_peak": state + act + transient,
            "train_peak_checkpointed": state + act_ckpt + transient,
            "infer_peak": weights + buffers + kv_total + batch_size * state_seq + infer_work}


# ---------------------------------------------------------------------------------------------------
# measurement (what the estimates above are checked against)

PROFILED_FAMILIES = ("gpt", "bert", "t5")


def profiled_train_peak(family: str, overrides: dict[str, Any], *, batch_size: int, seq_len: int,
                        checkpointing: bool = False, steps: int = 3) -> int:
    """Peak CPU bytes of ``steps`` AdamW training steps on random tokens, measured with torch.profiler.

    The model is ``create_model(family, **overrides)`` on the CPU in float32, trained on one batch of
    (batch_size, seq_len) random ids (T5: the same ids as source and target); the loss is the LM
    cross-entropy (BERT: the mean square of the hidden states). Gradients stay allocated across steps
    (``zero_grad(set_to_none=False)``), the steady state ``train_peak`` models. The peak is the running
    sum of the profiler's allocator events (every allocation and free, model and optimizer creation
    included), in bytes. Garbage collection is off inside the window, so earlier objects freed by it
    cannot skew the count. ``checkpointing`` wraps every block (weightsmith.train.activation_checkpointing).

    Raises:
        ConfigError: for a family other than gpt, bert or t5.
    """
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile

    if family not in PROFILED_FAMILIES:
        raise ConfigError(f"model.family={family!r}: the profiled peak is measured for "
                          f"{', '.join(PROFILED_FAMILIES)} only")
    torch.manual_seed(0)
    x = torch.randint(0, overrides["vocab_size"], (batch_size, seq_len))
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _train_steps(family, overrides, x, checkpointing, steps)
    finally:
        gc.enable()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _train_steps(family: str, overrides: dict[str, Any], x: Any, checkpointing: bool, steps: int) -> None:
    import torch
    import torch.nn.functional as F

    from weightsmith.registry import create_model
    from weightsmith.train.activation_checkpointing import apply_activation_checkpointing

    model = create_model(family, **overrides)
    if checkpointing:
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    for _ in range(steps):
        if family == "t5":
            out = model(x, x)  # (B, T, V)
        elif family == "bert":
            out = model(x)[0]  # hidden states (B, T, D)
        else:
            out = model(x)  # (B, T, V)
        loss = out.square().mean() if family == "bert" else F.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                                            x.reshape(-1))
        loss.backward()
        del out, loss
        opt.step()
        opt.zero_grad(set_to_none=False)
