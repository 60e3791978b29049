"""Analytic rows of the recurrent language models (:mod:`weightsmith.models.rnn`, families ``lstm``, ``gru``).

With D = d_model, V = vocab_size, G gate sets (LSTM 4: i, f, g, o; GRU 3: r, z, n), per token:

    tok_emb      V D parameters; a lookup, no FLOPs
    rnn layer k  weight_ih_l{k}, weight_hh_l{k} (G D, D), bias_ih_l{k}, bias_hh_l{k} (G D,)
                 mm = 2 G D^2: the input and the recurrent matmul of every gate set (biases are adds)
    final_norm   LayerNorm, 2 D parameters
    lm_head      mm = D V (tied to tok_emb: no parameters of its own)

FLOPs = 2 * mm per token, constant in T (no attention). Measured against ``FlopCounterMode``
(tests/test_models_rnn.py): the GRU's CPU kernel runs ``mm`` / ``addmm`` per step, which it counts.
The LSTM's CPU kernel is oneDNN's fused ``aten.mkldnn_rnn_layer``, which FlopCounterMode does not count
(0 FLOPs); the test measures the LSTM with oneDNN disabled (``torch.backends.mkldnn.flags(enabled=False)``),
where PyTorch's native kernel runs the same products as ``mm`` / ``addmm``. FlopCounterMode (torch 2.13)
has no formula for any fused RNN kernel (cuDNN's included); the analytic number is the same arithmetic.

State instead of a KV cache: ``state_per_seq`` is h (D) per layer, and the LSTM's cell c (D) per layer,
per sequence and independent of T. Saved activations (``act``): the native CPU kernel keeps 8 D floats
per token per layer (the layer input, h_{t-1}, the gate tensors), measured for the GRU (which always
runs it on CPU) and for the LSTM with oneDNN off. The fused kernels keep opaque byte workspaces instead
(oneDNN's LSTM on CPU: about 2x the native count at d_model = 128; cuDNN's reserve space on CUDA: not
measured), which this model does not describe: the LSTM's activation estimate is the native kernel's.
The stack is one module, not ``blocks``, so activation checkpointing has nothing to wrap and the
checkpointed estimate equals the full one. Dropout masks (``dropout > 0``) are not modelled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.analysis.components import Row

N_GATES = {"lstm": 4, "gru": 3}
STATE_TENSORS = {"lstm": 2, "gru": 1}  # (h, c) or h


def rnn_rows(cfg: Any) -> list[Row]:
    """Rows of an :class:`~weightsmith.models.rnn.LSTMConfig` or ``GRUConfig`` model (see module docstring)."""
    # imported here: components.py imports this module to register the builder
    from weightsmith.analysis.components import Row, _norm

    D, V, G = cfg.d_model, cfg.vocab_size, N_GATES[cfg.cell]
    rows = [Row("tok_emb", "embedding", (("tok_emb.weight", (V, D)),), embedding=True)]
    for k in range(cfg.n_layers):
        w = ((f"rnn.weight_ih_l{k}", (G * D, D)), (f"rnn.weight_hh_l{k}", (G * D, D)),
             (f"rnn.bias_ih_l{k}", (G * D,)), (f"rnn.bias_hh_l{k}", (G * D,)))
        rows.append(Row(f"rnn.l{k}", "recurrent", w, mm=2 * G * D * D, act=8 * D,
                        state_per_seq=STATE_TENSORS[cfg.cell] * D,
                        notes=f"{cfg.cell.upper()} layer {k}: {G} gate sets; act of the native kernel"))
    rows.append(_norm("final_norm", "layernorm", D, True))
    head_w = () if cfg.tie_embeddings else (("lm_head.weight", (V, D)),)
    rows.append(Row("lm_head", "head", head_w, mm=D * V, act=D + V, act_held=V,
                    notes=("tied to tok_emb; " if cfg.tie_embeddings else "")
                    + "keeps its input; logits and log-softmax (V each) live until backward"))
    return rows
