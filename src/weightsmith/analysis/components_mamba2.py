"""Analytic rows of the Mamba-2 LM (:mod:`weightsmith.models.mamba2`) and the attention/Mamba-2 hybrid
(:mod:`weightsmith.models.hybrid`).

With D = d_model, E = d_inner = expand * D, H = n_heads, P = d_head (E = H P), N = d_state, G = n_groups,
C = conv_dim = E + 2 G N, K = d_conv, Q = chunk_size, per token:

    in_proj     D (2E + 2GN + H) params (+ bias)       mm = D (2E + 2GN + H)
    conv1d      C K + C params                          mm = C K  (depthwise; FlopCounterMode counts it)
    ssd         dt_bias, A_log, D: 3H params            mm = Q G N + Q E + 2 E N   (at T a multiple of Q)
    norm        E params (gated RMSNorm)                no matmul
    out_proj    E D params (+ bias)                     mm = E D

How the SSD matmuls are counted (:func:`~weightsmith.models.mamba2.ssd_chunked`): per chunk of Q tokens,
the scores ``C B^T`` are (Q x N) @ (N x Q) per group (Q G N multiply-adds per token), the scores times
``dt x`` (Q x Q) @ (Q x P) per head (Q E), each chunk's final state (P x Q) @ (Q x N) per head (E N) and
the carried state's output (Q x N) @ (N x P) per head (E N). The masked (causal) half of the Q x Q blocks
is computed, and counted, as in dense attention. The state passing between chunks is elementwise (not
counted). So the counts are exact for T a multiple of Q (training windows are: 128 or 256 with Q = 64).
For T < Q the model runs one chunk of T, and the two quadratic terms are (Q G N + Q E) T / Q; for
other T the last chunk is zero-padded to Q, which costs (and measures) like a full one.

State instead of a KV cache (``state_per_seq``, elements per sequence, independent of T): the last
K - 1 conv inputs, C (K - 1), and the SSM state H P N, per Mamba-2 layer. The hybrid's attention layers
add their KV cache, ``2 n_kv_heads d_head`` per token (:func:`~weightsmith.analysis.components._self_attention`).

Saved activations (``act``, fp32, T a multiple of Q), measured with ``saved_tensors_hooks`` in
tests/test_models_mamba2.py: in_proj its input (D); the conv its zero-padded input (C, plus C (K - 1) per
sequence, not counted) and the SiLU its input (C); the SSD row the softplus input (H), the conv output
that x, B, C view (C), dt (H), the two (Q, Q) decay/score products per head (2 Q H), the scores (Q G), the
copies einsum makes of B, C (4 G N) and of ``dt x`` (4 E, with two products), the exps (2 H + H / Q) and
the states entering each chunk (2 H P N / Q); the gated norm the in_proj output that z views
(E + C + H), four E-wide tensors and one statistic per group (G); out_proj its input (E).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.analysis.components import Row


def mamba2_mixer_rows(path: str, cfg: Any) -> list[Row]:
    """Rows of one :class:`~weightsmith.models.mamba2.Mamba2Mixer` at ``path`` (see module docstring).
    ``cfg`` has d_model, d_state, d_conv, expand, n_groups, chunk_size, bias, conv_bias and the SSM head
    dimension as ``ssm_d_head`` (hybrid) or ``d_head`` (mamba2)."""
    from weightsmith.analysis.components import Row, _linear

    D, N, K, G, Q = cfg.d_model, cfg.d_state, cfg.d_conv, cfg.n_groups, cfg.chunk_size
    P = getattr(cfg, "ssm_d_head", None) or cfg.d_head
    E = cfg.expand * D
    H = E // P
    C = E + 2 * G * N
    n_in = 2 * E + 2 * G * N + H
    conv_w = ((f"{path}.conv1d.weight", (C, 1, K)),) + (((f"{path}.conv1d.bias", (C,)),) if cfg.conv_bias else ())
    ssd_act = H + C + H + 2 * Q * H + Q * G + 4 * G * N + 4 * E + 2 * H + H / Q + 2 * H * P * N / Q
    return [
        Row(f"{path}.in_proj", "linear", _linear(f"{path}.in_proj", D, n_in, cfg.bias), mm=D * n_in, act=D,
            notes="z | x B C | dt"),
        Row(f"{path}.conv1d", "conv", conv_w, mm=C * K, act=2 * C, state_per_seq=C * (K - 1),
            notes=f"causal depthwise, kernel {K}, then SiLU; state: the last {K - 1} inputs"),
        Row(f"{path}.ssd", "ssm", ((f"{path}.dt_bias", (H,)), (f"{path}.A_log", (H,)), (f"{path}.D", (H,))),
            mm=Q * G * N + Q * E + 2 * E * N, act=ssd_act, state_per_seq=H * P * N,
            notes=f"SSD, {H} heads of {P}, state {N}; matmuls counted at chunk {Q}"),
        Row(f"{path}.norm", "norm", ((f"{path}.norm.weight", (E,)),), act=E + C + H + 4 * E + G,
            notes="gated RMSNorm, norm(y * silu(z)) per group"),
        Row(f"{path}.out_proj", "linear", _linear(f"{path}.out_proj", E, D, cfg.bias), mm=E * D, act=E),
    ]


def _lm_head(cfg: Any) -> Row:
    from weightsmith.analysis.components import Row

    D, V = cfg.d_model, cfg.vocab_size
    head_w = () if cfg.tie_embeddings else (("lm_head.weight", (V, D)),)
    return Row("lm_head", "head", head_w, mm=D * V, act=D + V, act_held=V,
               notes=("tied to tok_emb; " if cfg.tie_embeddings else "")
               + "keeps its input; logits and log-softmax (V each) live until backward")


def mamba2_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.mamba2.Mamba2Config` model (see module docstring)."""
    from weightsmith.analysis.components import Row, _norm, _with_layer

    D, V = cfg.d_model, cfg.vocab_size
    rows = [Row("tok_emb", "embedding", (("tok_emb.weight", (V, D)),), embedding=True)]
    for i in range(cfg.n_layers):
        rows.append(_norm(f"blocks.{i}.norm", "rmsnorm", D, False))
        rows.extend(mamba2_mixer_rows(f"blocks.{i}.mixer", cfg))
    rows = [_with_layer(r) for r in rows]
    return rows + [_norm("final_norm", "rmsnorm", D, False), _lm_head(cfg)]


def hybrid_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.hybrid.HybridConfig` model: per layer a norm, an attention
    or Mamba-2 mixer, a norm and the dense SwiGLU MLP or the experts (see module docstring)."""
    from weightsmith.analysis.components import Row, _mlp, _moe_rows, _norm, _self_attention, _with_layer

    D, V = cfg.d_model, cfg.vocab_size
    rows = [Row("tok_emb", "embedding", (("tok_emb.weight", (V, D)),), embedding=True)]
    if any(cfg.is_attention(i) for i in range(cfg.n_layers)):
        rows.append(Row("rope", "bias", act_pos=2 * cfg.d_head, notes="cos/sin tables (T, d_head), no parameters"))
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        rows.append(_norm(f"{b}.norm", "rmsnorm", D, False))
        if cfg.is_attention(i):
            rows.append(_self_attention(f"{b}.mixer", D, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.bias))
        else:
            rows.extend(mamba2_mixer_rows(f"{b}.mixer", cfg))
        rows.append(_norm(f"{b}.mlp_norm", "rmsnorm", D, False))
        if cfg.n_experts:
            rows.extend(_moe_rows(f"{b}.mlp", cfg))
        else:
            rows.append(_mlp(f"{b}.mlp", "swiglu", D, cfg.d_ff, cfg.bias))
    rows = [_with_layer(r) for r in rows]
    return rows + [_norm("final_norm", "rmsnorm", D, False), _lm_head(cfg)]
