"""Analytic rows of the Mamba (Mamba-1) LM (:mod:`weightsmith.models.mamba`).

With D = d_model, E = d_inner = expand * D, N = d_state, K = d_conv, R = dt_rank, per token:

    in_proj     D 2E params (+ bias)                    mm = 2 E D          (x | z)
    conv1d      E K + E params (bias optional)          mm = E K            (depthwise; FlopCounterMode counts it)
    x_proj      E (R + 2N) params                       mm = E (R + 2N)     (dt_low | B | C)
    dt_proj     R E + E params                          mm = R E
    scan        A_log E N, D E params                   mm = E N            (the readout y_t = h_t C_t)
    out_proj    E D params (+ bias)                     mm = E D

How the scan is counted: the state update ``h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t^T`` is
elementwise on (E, N) per token (about 5 E N FLOPs and an ``exp`` of E N, not counted, as FlopCounterMode
counts only matmuls); the readout ``h_t C_t`` is a (E, N) @ (N, 1) matmul per token in both schedules of
:func:`~weightsmith.models.mamba.selective_scan` and in the one-token recurrent step, so it is counted
(E N multiply-adds). The counts are exact at every T (no chunk padding, unlike Mamba-2's SSD).

State instead of a KV cache (``state_per_seq``, elements per sequence, independent of T): the last
K - 1 conv inputs, E (K - 1), and the SSM state E N, per layer.

Saved activations (``act``, fp32, per token), measured with ``saved_tensors_hooks`` in
tests/test_models_mamba.py: in_proj its input (D) and its output that z views (2E, kept by SiLU(z));
the conv its zero-padded input (E, plus E (K - 1) per sequence: the ``seq`` row ``conv1d.pad``) and SiLU its input (E);
x_proj a contiguous copy of its (transposed) input (E) and its output that dt_low, B, C view (R + 2N);
dt_proj's output, softplus's input (E); the scan its x (the SiLU output, E), dt (E) and the states
(E N: all T of them, the price of the exact backward without a second scan); the gate its two factors
(2E); out_proj its input (E). Not counted: ``A = -exp(A_log)``, kept twice (2 E N per layer, independent
of B and T).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.analysis.components import Row


def mamba_mixer_rows(path: str, cfg: Any) -> list[Row]:
    """Rows of one :class:`~weightsmith.models.mamba.MambaMixer` at ``path`` (see module docstring).
    ``cfg`` has d_model, d_state, d_conv, expand, dt_rank, bias and conv_bias."""
    from weightsmith.analysis.components import Row, _linear

    D, N, K, R = cfg.d_model, cfg.d_state, cfg.d_conv, cfg.dt_rank
    E = cfg.expand * D
    conv_w = ((f"{path}.conv1d.weight", (E, 1, K)),) + (((f"{path}.conv1d.bias", (E,)),) if cfg.conv_bias else ())
    return [
        Row(f"{path}.in_proj", "linear", _linear(f"{path}.in_proj", D, 2 * E, cfg.bias), mm=2 * E * D,
            act=D + 2 * E, notes="x | z; z's output is kept by SiLU(z)"),
        Row(f"{path}.conv1d", "conv", conv_w, mm=E * K, act=2 * E, state_per_seq=E * (K - 1),
            notes=f"causal depthwise, kernel {K}, then SiLU; state: the last {K - 1} inputs"),
        Row(f"{path}.conv1d.pad", "bias", stream="seq", act=E * (K - 1),
            notes=f"the {K - 1} zero columns of the padded input, once per sequence"),
        Row(f"{path}.x_proj", "linear", _linear(f"{path}.x_proj", E, R + 2 * N, False), mm=E * (R + 2 * N),
            act=E + R + 2 * N, notes=f"dt_low ({R}) | B ({N}) | C ({N})"),
        Row(f"{path}.dt_proj", "linear", _linear(f"{path}.dt_proj", R, E, True), mm=R * E, act=E,
            notes="then softplus"),
        Row(f"{path}.scan", "ssm", ((f"{path}.A_log", (E, N)), (f"{path}.D", (E,))), mm=E * N,
            act=2 * E + E * N, state_per_seq=E * N,
            notes=f"selective scan, state {N} per channel; matmul: the readout h C"),
        Row(f"{path}.gate", "activation", act=2 * E, notes="(y + D x) * silu(z)"),
        Row(f"{path}.out_proj", "linear", _linear(f"{path}.out_proj", E, D, cfg.bias), mm=E * D, act=E),
    ]


def mamba_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.mamba.MambaConfig` model (see module docstring)."""
    from weightsmith.analysis.components import Row, _norm, _with_layer
    from weightsmith.analysis.components_mamba2 import _lm_head

    D, V = cfg.d_model, cfg.vocab_size
    rows = [Row("tok_emb", "embedding", (("tok_emb.weight", (V, D)),), embedding=True)]
    for i in range(cfg.n_layers):
        rows.append(_norm(f"blocks.{i}.norm", "rmsnorm", D, False))
        rows.extend(mamba_mixer_rows(f"blocks.{i}.mixer", cfg))
    rows = [_with_layer(r) for r in rows]
    return rows + [_norm("final_norm", "rmsnorm", D, False), _lm_head(cfg)]
