"""The analytic model of every family: one :class:`Row` per module, from the config alone.

A row knows its own parameters (names and shapes; a tied weight is listed once, where it is defined),
the matrix-multiply weights a token passes through, the width of its attention products, and the
floating-point activations autograd saves for the backward pass. Everything else (parameter totals,
FLOPs, memory, the per-module table) is a sum over rows in :mod:`weightsmith.analysis.report`.

Token streams: ``"main"`` is the only stream of decoder-only and encoder-only models and the *target*
stream of T5; ``"src"`` is T5's encoder (source) stream; ``"seq"`` rows run once per sequence (BERT's
pooler). Attention rows read a context of ``"self"`` (their own stream's length) or ``"src"``.

Saved activations (``act``, elements per token of the row's stream) follow what PyTorch autograd keeps
for *our* modules, checked against ``torch.autograd.graph.saved_tensors_hooks`` in the tests (the
analysis of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
done for this code): a linear layer keeps its input, LayerNorm its input and two statistics per token,
our RMSNorm its input, the normalized tensor and one statistic, DyT its input and the tanh, GELU/ReLU/SiLU
their input or output,
``scaled_dot_product_attention`` (flash kernel) q, k, v, the output and one log-sum-exp per head. T5's
attention, whose learned bias needs a gradient, runs SDPA's math path and keeps the (T, S) softmax per
head instead (``act_ctx``, elements per token per context position). GPT's ALiBi bias is one additive
(1, H, T, T) mask that every layer's SDPA (the CPU flash kernel takes float masks) keeps, the same tensor
for all layers and the whole batch (``act_pos_ctx``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from weightsmith.errors import ConfigError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Row:
    """One module of the analytic model. Counts are per token of ``stream`` unless stated."""

    path: str
    kind: str  # embedding | norm | attention | cross_attention | mlp | router | experts | head | pooler | bias
    #            vision (components_vision.py): conv | linear | activation | pool | residual | layer_scale | dropout
    weights: tuple[tuple[str, Shape], ...] = ()
    stream: str = "main"  # main | src | seq
    mm: int = 0  # matmul weight elements used per token (2 * mm = forward FLOPs per token)
    mm_src: int = 0  # ... used per *source* token (cross-attention k/v projections of the memory)
    attn_dim: int = 0  # n_heads * d_head of Q K^T and P V: 4 * attn_dim FLOPs per token per context position
    context: str = "self"  # self | src
    act: float = 0.0  # saved floating activations, elements per token
    act_src: float = 0.0  # ... per source token
    act_ctx: float = 0.0  # ... per token per context position (attention probabilities on the math path)
    act_pos: float = 0.0  # ... per position, shared by the batch (RoPE cos/sin tables; images: BatchNorm stats)
    act_pos_ctx: float = 0.0  # ... per position per context position, shared by the batch (ALiBi's bias)
    act_held: float = 0.0  # alive until backward but held by the caller, not autograd (the logits)
    active: float = 1.0  # fraction of the parameters one token uses (MoE experts: k / E)
    embedding: bool = False  # token, position or token-type embedding table
    kv_per_token: int = 0  # KV-cache elements per token of the stream (decoder self-attention)
    kv_per_src: int = 0  # ... per source token (T5 cross-attention keys/values)
    state_per_seq: int = 0  # recurrent state elements per sequence, constant in T (RNN h, c)
    buffers: int = 0  # floating-point buffer elements saved with the weights (BatchNorm running mean, var)
    block_input: float = 0.0  # elements per token a checkpointed block keeps, its input (0: d_model)
    notes: str = ""
    layer: int | None = field(default=None, compare=False)

    @property
    def params(self) -> int:
        n = 0
        for _, shape in self.weights:
            size = 1
            for s in shape:
                size *= s
            n += size
        return n


def _linear(name: str, d_in: int, d_out: int, bias: bool) -> tuple[tuple[str, Shape], ...]:
    w = ((f"{name}.weight", (d_out, d_in)),)
    return w + ((f"{name}.bias", (d_out,)),) if bias else w


def _norm(path: str, kind: str, d: int, bias: bool, stream: str = "main", extra_act: int = 0,
          notes: str = "") -> Row:
    """LayerNorm keeps its input + mean + rstd; our RMSNorm its input, the normalized x and 1/rms; DyT
    (alpha, weight, bias if ``bias``) its input and tanh(alpha x); ``"none"`` (identity) nothing."""
    if kind == "rmsnorm":
        return Row(path, "norm", ((f"{path}.weight", (d,)),), stream=stream, act=2 * d + 1 + extra_act, notes=notes)
    if kind == "none":
        return Row(path, "norm", (), stream=stream, act=extra_act, notes=notes or "identity")
    if kind == "dyt":
        w = ((f"{path}.alpha", (1,)), (f"{path}.weight", (d,))) + (((f"{path}.bias", (d,)),) if bias else ())
        return Row(path, "norm", w, stream=stream, act=2 * d + extra_act, notes=notes)
    w = ((f"{path}.weight", (d,)),) + (((f"{path}.bias", (d,)),) if bias else ())
    return Row(path, "norm", w, stream=stream, act=d + 2 + extra_act, notes=notes)


def _self_attention(path: str, d: int, n_heads: int, n_kv_heads: int, d_head: int, bias: bool, *,
                    math_path: bool = False, stream: str = "main", kv_cache: bool = True) -> Row:
    dq, dkv = n_heads * d_head, n_kv_heads * d_head
    w = (_linear(f"{path}.q_proj", d, dq, bias) + _linear(f"{path}.k_proj", d, dkv, bias)
         + _linear(f"{path}.v_proj", d, dkv, bias) + _linear(f"{path}.o_proj", dq, d, bias))
    if math_path:  # input, q, k, v, the o_proj input, and the softmax (H per context position)
        act, act_ctx = d + dq + 2 * dkv + dq, float(n_heads)
    else:  # input, q, k, v, output (shared with the o_proj input), log-sum-exp per head
        act, act_ctx = d + 2 * dq + 2 * dkv + n_heads, 0.0
    return Row(path, "attention", w, stream=stream, mm=2 * d * dq + 2 * d * dkv, attn_dim=dq, act=act,
               act_ctx=act_ctx, kv_per_token=2 * dkv if kv_cache else 0)


def _mlp(path: str, kind: str, d: int, d_ff: int, bias: bool, stream: str = "main") -> Row:
    """gelu: up, gelu, down (keeps x, up(x), gelu(up(x))); relu: relu keeps only its output;
    swiglu / gated-gelu: gate, up, down (keeps x, gate(x), act(gate(x)), up(x), their product)."""
    if kind in ("swiglu", "gated-gelu"):
        w = _linear(f"{path}.gate", d, d_ff, bias) + _linear(f"{path}.up", d, d_ff, bias) \
            + _linear(f"{path}.down", d_ff, d, bias)
        return Row(path, "mlp", w, stream=stream, mm=3 * d * d_ff, act=d + 4 * d_ff)
    w = _linear(f"{path}.up", d, d_ff, bias) + _linear(f"{path}.down", d_ff, d, bias)
    act = d + (d_ff if kind == "relu" else 2 * d_ff)
    return Row(path, "mlp", w, stream=stream, mm=2 * d * d_ff, act=act)


# ---------------------------------------------------------------------------------------------------
# gpt


def _moe_rows(path: str, cfg: Any) -> list[Row]:
    d, f, E, k = cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.n_experts_per_token
    router = Row(f"{path}.router", "router", _linear(f"{path}.router", d, E, False), mm=d * E,
                 act=d + k + E, notes=f"top-{k} of {E}; keeps x, the k gate weights, E probabilities (aux loss)")
    w: tuple[tuple[str, Shape], ...] = ()
    for e in range(E):
        p = f"{path}.experts.{e}"
        w += _linear(f"{p}.gate", d, f, cfg.bias) + _linear(f"{p}.up", d, f, cfg.bias) + _linear(f"{p}.down", f, d,
                                                                                                cfg.bias)
    # per routed token: gathered input, SwiGLU internals (4 f), expert output and its gate weight (kept by the
    # weighting product), and the weighted output (kept by index_add's backward for its shape)
    experts = Row(f"{path}.experts", "experts", w, mm=k * 3 * d * f, act=k * (3 * d + 4 * f + 1), active=k / E,
                  notes=f"{E} SwiGLU experts, {k} run per token")
    return [router, experts]


def gpt_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.gpt.GPTConfig` model (decoder-only, MoE optional)."""
    d, V = cfg.d_model, cfg.vocab_size
    rows = [Row("tok_emb", "embedding", (("tok_emb.weight", (V, d)),), embedding=True)]
    if cfg.pos == "learned":
        rows.append(Row("pos_emb", "embedding", (("pos_emb.weight", (cfg.max_seq_len, d)),), embedding=True))
    elif cfg.pos == "rope":
        rows.append(Row("rope", "bias", act_pos=2 * cfg.d_head, notes="cos/sin tables (T, d_head), no parameters"))
    elif cfg.pos == "sinusoidal":
        rows.append(Row("pos_table", "bias", notes="fixed sin/cos table (T, d_model) added to tok_emb; no parameters"))
    elif cfg.pos == "alibi":
        rows.append(Row("alibi", "bias", act_pos_ctx=cfg.n_heads,
                        notes="(1, H, T, T) additive attention bias, shared by every layer; no parameters"))
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        rows.append(_norm(f"{b}.attn_norm", cfg.norm, d, cfg.bias))
        rows.append(_self_attention(f"{b}.attn", d, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.bias))
        rows.append(_norm(f"{b}.mlp_norm", cfg.norm, d, cfg.bias))
        if getattr(cfg, "n_experts", 0):
            rows.extend(_moe_rows(f"{b}.mlp", cfg))
        else:
            rows.append(_mlp(f"{b}.mlp", cfg.mlp, d, cfg.d_ff, cfg.bias))
    rows = [_with_layer(r) for r in rows]
    rows.append(_norm("final_norm", cfg.norm, d, cfg.bias))
    head_w = () if cfg.tie_embeddings else (("lm_head.weight", (V, d)),)
    rows.append(Row("lm_head", "head", head_w, mm=d * V, act=d + V, act_held=V,
                    notes=("tied to tok_emb; " if cfg.tie_embeddings else "")
                    + "keeps its input; logits and log-softmax (V each) live until backward"))
    return rows


# ---------------------------------------------------------------------------------------------------
# bert


def bert_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.bert.BertConfig` model (post-LN encoder)."""
    d, bias = cfg.d_model, cfg.bias
    rows = [Row("tok_emb", "embedding", (("tok_emb.weight", (cfg.vocab_size, d)),), embedding=True)]
    if cfg.pos == "learned":
        rows.append(Row("pos_emb", "embedding", (("pos_emb.weight", (cfg.max_seq_len, d)),), embedding=True))
    if cfg.n_token_types:
        rows.append(Row("type_emb", "embedding", (("type_emb.weight", (cfg.n_token_types, d)),), embedding=True))
    rows.append(_norm("emb_norm", "layernorm", d, bias))
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        # post-LN: each sublayer keeps its input (the previous norm's output), each norm its input sum
        rows.append(_self_attention(f"{b}.attn", d, cfg.n_heads, cfg.n_heads, cfg.d_head, bias, kv_cache=False))
        rows.append(_norm(f"{b}.attn_norm", "layernorm", d, bias))
        rows.append(_mlp(f"{b}.mlp", "gelu", d, cfg.d_ff, bias))
        last = cfg.pooler and i == cfg.n_layers - 1
        # the pooler's input hidden[:, 0] is a view that pins the whole last hidden state
        rows.append(_norm(f"{b}.mlp_norm", "layernorm", d, bias, extra_act=d if last else 0,
                          notes="output pinned by the pooler" if last else ""))
    rows = [_with_layer(r) for r in rows]
    if cfg.pooler:
        rows.append(Row("pooler", "pooler", _linear("pooler", d, d, bias), stream="seq", mm=d * d, act=d,
                        notes="tanh(W h_[CLS] + b), once per sequence"))
    return rows


def bert_mlm_rows(cfg: Any) -> list[Row]:
    """Rows of :class:`~weightsmith.models.bert.BertForMaskedLM`: the encoder under ``encoder.`` plus the
    MLM head (dense, GELU, LayerNorm, decoder tied to ``encoder.tok_emb`` with its own bias).

    The head's dense layer keeps the last hidden state; a pooler, if configured, runs (its FLOPs count)
    but its output is dropped, so autograd frees what it saved and its activations are not counted. The
    log-softmax is counted at every position (the masked-LM loss reads ~15% of them), like a causal LM's.
    """
    d, V, bias = cfg.d_model, cfg.vocab_size, cfg.bias
    last_norm = f"blocks.{cfg.n_layers - 1}.mlp_norm"
    rows = []
    for r in bert_rows(cfg):
        if r.kind == "pooler":
            r = replace(r, act=0.0, notes="tanh(W h_[CLS] + b), once per sequence; output unused by the MLM loss")
        elif r.path == last_norm and cfg.pooler:
            r = replace(r, act=r.act - d, notes="")
        rows.append(replace(r, path=f"encoder.{r.path}", weights=tuple((f"encoder.{n}", s) for n, s in r.weights)))
    rows.append(Row("mlm_head.dense", "head", _linear("mlm_head.dense", d, d, bias), mm=d * d, act=2 * d,
                    notes="transform; keeps its input (the last hidden state) and the GELU input"))
    rows.append(_norm("mlm_head.norm", "layernorm", d, bias))
    rows.append(Row("mlm_head.decoder", "head", (("mlm_head.decoder.bias", (V,)),) if bias else (), mm=d * V,
                    act=d + V, act_held=V, notes="weight tied to encoder.tok_emb; keeps its input; logits and "
                    "log-softmax (V each) live until backward"))
    return rows


# ---------------------------------------------------------------------------------------------------
# t5


def t5_rows(cfg: Any) -> list[Row]:
    """Rows of a :class:`~weightsmith.models.t5.T5Config` model (encoder ``src`` + decoder ``main``)."""
    d, V, H, dh = cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.d_head
    dq = H * dh
    rel = cfg.pos == "relative"
    rows = [Row("shared", "embedding", (("shared.weight", (V, d)),), embedding=True,
                notes="shared by encoder, decoder" + (" and lm_head" if cfg.tie_embeddings else ""))]
    for stack, stream, n in (("encoder", "src", cfg.n_layers), ("decoder", "main", cfg.n_decoder_layers)):
        if rel:
            rows.append(Row(f"{stack}.rel_bias", "bias", ((f"{stack}.rel_bias.emb.weight", (cfg.rel_buckets, H)),),
                            stream=stream, notes="one (bucket, head) table shared by every layer of the stack"))
        for i in range(n):
            b = f"{stack}.blocks.{i}"
            rows.append(_norm(f"{b}.attn_norm", "rmsnorm", d, False, stream))
            rows.append(_self_attention(f"{b}.attn", d, H, H, dh, False, math_path=rel, stream=stream,
                                        kv_cache=stack == "decoder"))
            if stack == "decoder":
                rows.append(_norm(f"{b}.cross_norm", "rmsnorm", d, False))
                c = f"{b}.cross_attn"
                w = (_linear(f"{c}.q_proj", d, dq, False) + _linear(f"{c}.k_proj", d, dq, False)
                     + _linear(f"{c}.v_proj", d, dq, False) + _linear(f"{c}.o_proj", dq, d, False))
                # per target token: input, q, output, lse; per source token: k, v (the memory itself is
                # kept once, by the encoder's final norm row)
                rows.append(Row(c, "cross_attention", w, mm=2 * d * dq, mm_src=2 * d * dq,
                                attn_dim=dq, context="src", act=d + 2 * dq + H, act_src=2 * dq,
                                kv_per_src=2 * dq, notes="k, v projected from the encoder memory"))
            rows.append(_norm(f"{b}.mlp_norm", "rmsnorm", d, False, stream))
            rows.append(_mlp(f"{b}.mlp", cfg.mlp, d, cfg.d_ff, False, stream=stream))
        enc = stack == "encoder"  # its output is the memory every cross-attention keeps
        rows.append(_norm(f"{stack}.final_norm", "rmsnorm", d, False, stream, extra_act=d if enc else 0,
                          notes="output = memory (B, S, d_model), kept by cross-attention" if enc else ""))
    rows = [_with_layer(r) for r in rows]
    head_w = () if cfg.tie_embeddings else (("lm_head.weight", (V, d)),)
    rows.append(Row("lm_head", "head", head_w, mm=d * V, act=d + V, act_held=V,
                    notes=("tied to shared, input scaled by d_model^-0.5; " if cfg.tie_embeddings else "")
                    + "logits and log-softmax live until backward"))
    return rows


def _with_layer(row: Row) -> Row:
    parts = row.path.split(".")
    if "blocks" in parts:
        return replace(row, layer=int(parts[parts.index("blocks") + 1]))
    return row


from weightsmith.analysis.components_mamba import mamba_rows  # noqa: E402 (imports the helpers)
from weightsmith.analysis.components_mamba2 import hybrid_rows, mamba2_rows  # noqa: E402 (imports the helpers)
from weightsmith.analysis.components_rnn import rnn_rows  # noqa: E402 (it imports the helpers above)
from weightsmith.analysis.components_unet import unet_rows, vae_rows  # noqa: E402 (uses Row)
from weightsmith.analysis.components_vision import convnext_rows, mlp_rows, resnet_rows  # noqa: E402 (uses Row)
from weightsmith.analysis.components_vit import vit_rows  # noqa: E402 (it imports the helpers above)

_BUILDERS = {"gpt": gpt_rows, "bert": bert_rows, "bert-mlm": bert_mlm_rows, "t5": t5_rows, "vit": vit_rows,
             "mlp": mlp_rows, "resnet": resnet_rows, "convnext": convnext_rows,
             "lstm": rnn_rows, "gru": rnn_rows,
             "mamba": mamba_rows, "mamba2": mamba2_rows, "hybrid": hybrid_rows,
             "unet": unet_rows, "vae": vae_rows}


def rows_for(family: str, cfg: Any) -> list[Row]:
    """The analytic rows of a model of ``family`` with config ``cfg``.

    Raises:
        ConfigError: for a family without an analytic model.
    """
    if family not in _BUILDERS:
        raise ConfigError(f"no analytic model for family '{family}'; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[family](cfg)


def family_of(cfg: Any) -> str:
    """The registered family whose config class ``cfg`` is an instance of."""
    from weightsmith.registry import get_family, list_families

    names = list_families()
    for name in names:  # the exact class first: BertMLMConfig is also a BertConfig
        if type(cfg) is get_family(name).config_cls:
            return name
    for name in names:
        if isinstance(cfg, get_family(name).config_cls):
            return name
    raise ConfigError(f"no registered family has config class {type(cfg).__name__}")
