"""Hugging Face <-> weightsmith converters: configs and state dicts.

Hugging Face names (``hidden_size``, ``num_key_value_heads``, ``transformer.h.0.attn.c_attn``) appear
only in this file. Each ``*_to_ours`` function takes the HF ``config.json`` contents as a dict and an HF
state dict, and returns our config dataclass and a state dict that loads with ``strict=True``:

=====================  =========  ==============================================================
HF architecture        family     notes
=====================  =========  ==============================================================
GPT2LMHeadModel        gpt        Conv1D weights are stored (in, out): transposed here
LlamaForCausalLM       gpt        RoPE half-split layout is ours too, so q/k need no permutation
MistralForCausalLM     gpt        as LLaMA; a sliding window shorter than the context is refused
MixtralForCausalLM     gpt        ``n_experts``; fused (v5) or per-expert ``w1/w2/w3`` (on disk)
BertModel              bert       pooler kept; MLM head dropped
BertForMaskedLM        bert-mlm   chosen when the checkpoint has the MLM head (``cls.predictions``)
T5ForConditionalGeneration  t5    shared embedding, tied lm_head (scaled by d_model^-0.5)
Mamba2ForCausalLM      mamba2     in ship/hf_convert_mamba2.py: parameter names shared, prefixes renamed
MambaForCausalLM       mamba      in ship/hf_convert_mamba.py: parameter names shared, prefixes renamed
=====================  =========  ==============================================================

:func:`ours_to_hf` goes the other way for the ``gpt`` family: LLaMA-shaped configs (RMSNorm,
SwiGLU, RoPE) become ``LlamaForCausalLM`` (``MixtralForCausalLM`` with experts), GPT-2-shaped ones
(LayerNorm, tanh GELU, learned positions) ``GPT2LMHeadModel``. Anything else raises ConfigError
naming the field that no stock architecture can express.

:func:`load_hf_checkpoint` imports a local HF checkpoint directory (``config.json`` plus
``*.safetensors`` or ``pytorch_model.bin``, the latter read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import CheckpointError, ConfigError

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# helpers


def _take(sd: StateDict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"HF state dict has no '{key}'")
    return sd[key]


def _strip_prefix(sd: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    """Drop the first matching wrapper prefix (``transformer.``, ``model.``...) from every key."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base from a v5 ``rope_parameters`` dict or a legacy top-level ``rope_theta``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"rope_type '{kind}' (RoPE scaling) is not supported; only plain RoPE")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _build(family: str, values: dict[str, Any]) -> Any:
    from weightsmith.registry import build_config

    return build_config(family, values)


# ---------------------------------------------------------------------------------------------------
# GPT-2  (GPT2LMHeadModel)


def gpt2_to_ours(hf: dict[str, Any], sd: StateDict) -> tuple[Any, StateDict]:
    """GPT2LMHeadModel config + state dict -> (GPTConfig, our state dict).

    HF's Conv1D stores weights as (in_features, out_features); ``nn.Linear`` wants (out, in), so every
    Conv1D weight is transposed, and the fused ``c_attn`` (D, 3D) is split into q, k, v.

    Raises:
        ConfigError: for activations other than tanh GELU, or layer-index attention scaling.
    """
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"GPT-2 activation_function '{act}' is not supported (ours is tanh GELU)")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("GPT-2 scale_attn_by_inverse_layer_idx=True is not supported")
    d = hf["n_embd"]
    cfg = _build("gpt", dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], norm="layernorm", mlp="gelu",
        pos="learned", tie_embeddings=hf.get("tie_word_embeddings", True), bias=True,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02)))
    src = _strip_prefix(sd, ("transformer.",))
    out = {"tok_emb.weight": _take(src, "wte.weight"), "pos_emb.weight": _take(src, "wpe.weight"),
           "final_norm.weight": _take(src, "ln_f.weight"), "final_norm.bias": _take(src, "ln_f.bias")}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{b}{ours}.weight"] = _take(src, f"{h}{theirs}.weight")
            out[f"{b}{ours}.bias"] = _take(src, f"{h}{theirs}.bias")
        qkv_w = _take(src, f"{h}attn.c_attn.weight").t()  # (3D, D)
        qkv_b = _take(src, f"{h}attn.c_attn.bias")
        for name, w, bias in zip("qkv", qkv_w.split(d, 0), qkv_b.split(d, 0)):
            out[f"{b}attn.{name}_proj.weight"] = w.contiguous()
            out[f"{b}attn.{name}_proj.bias"] = bias
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[f"{b}{ours}.weight"] = _take(src, f"{h}{theirs}.weight").t().contiguous()
            out[f"{b}{ours}.bias"] = _take(src, f"{h}{theirs}.bias")
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else _take(sd, "lm_head.weight")
    return cfg, out


def _gpt2_from_ours(cfg: Any, sd: StateDict) -> tuple[dict[str, Any], StateDict]:
    d = cfg.d_model
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
          "n_embd": d, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
          "n_positions": cfg.max_seq_len, "activation_function": "gelu_new",
          "layer_norm_epsilon": cfg.norm_eps, "initializer_range": cfg.init_std,
          "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
          "tie_word_embeddings": cfg.tie_embeddings}
    if cfg.vocab_size <= 50256:  # GPT-2's <|endoftext|> id does not exist in a smaller vocabulary
        hf.update(bos_token_id=None, eos_token_id=None)

    def bias(key: str, n: int) -> torch.Tensor:
        # GPT-2 always has biases; a bias-free model exports exactly as zero biases.
        return sd[key] if key in sd else torch.zeros(n, dtype=sd["tok_emb.weight"].dtype)

    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["final_norm.weight"],
           "transformer.ln_f.bias": bias("final_norm.bias", d)}
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{h}{theirs}.weight"] = sd[f"{b}{ours}.weight"]
            out[f"{h}{theirs}.bias"] = bias(f"{b}{ours}.bias", d)
        out[f"{h}attn.c_attn.weight"] = torch.cat(
            [sd[f"{b}attn.{n}_proj.weight"] for n in "qkv"], 0).t().contiguous()
        out[f"{h}attn.c_attn.bias"] = torch.cat([bias(f"{b}attn.{n}_proj.bias", d) for n in "qkv"])
        for ours, theirs, n_out in (("attn.o_proj", "attn.c_proj", d), ("mlp.up", "mlp.c_fc", cfg.d_ff),
                                    ("mlp.down", "mlp.c_proj", d)):
            out[f"{h}{theirs}.weight"] = sd[f"{b}{ours}.weight"].t().contiguous()
            out[f"{h}{theirs}.bias"] = bias(f"{b}{ours}.bias", n_out)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return hf, out


# ---------------------------------------------------------------------------------------------------
# LLaMA and Mixtral  (LlamaForCausalLM, MixtralForCausalLM)

_LLAMA_LAYER = (("attn_norm.weight", "input_layernorm.weight"),
                ("mlp_norm.weight", "post_attention_layernorm.weight"),
                ("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.o_proj"))
_LLAMA_MLP = (("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj"))


def _llama_common(hf: dict[str, Any], **extra: Any) -> dict[str, Any]:
    d, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // n_heads):
        raise ConfigError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act '{hf['hidden_act']}' is not supported (ours is SwiGLU with silu)")
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm", mlp="swiglu", pos="rope",
                rope_theta=_rope_theta(hf), tie_embeddings=hf.get("tie_word_embeddings", False),
                norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02), **extra)


def _copy_linear(out: StateDict, src: StateDict, ours: str, theirs: str, bias: bool) -> None:
    if ours.endswith(".weight"):  # a norm gain, already a full key
        out[ours] = _take(src, theirs)
        return
    out[f"{ours}.weight"] = _take(src, f"{theirs}.weight")
    if bias:
        out[f"{ours}.bias"] = _take(src, f"{theirs}.bias")


def llama_to_ours(hf: dict[str, Any], sd: StateDict) -> tuple[Any, StateDict]:
    """LlamaForCausalLM config + state dict -> (GPTConfig, our state dict).

    Raises:
        ConfigError: if ``attention_bias != mlp_bias`` (ours has one ``bias`` switch), RoPE scaling, or a
            ``head_dim`` other than ``hidden_size / num_attention_heads``.
    """
    if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
        raise ConfigError("LLaMA attention_bias != mlp_bias is not supported (model.bias covers both)")
    bias = bool(hf.get("attention_bias"))
    cfg = _build("gpt", _llama_common(hf, bias=bias))
    src = _strip_prefix(sd, ("model.",))
    out = {"tok_emb.weight": _take(src, "embed_tokens.weight"), "final_norm.weight": _take(src, "norm.weight")}
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"layers.{i}."
        for ours, theirs in _LLAMA_LAYER + _LLAMA_MLP:
            _copy_linear(out, src, b + ours, h + theirs, bias)
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else _take(sd, "lm_head.weight")
    return cfg, out


def mistral_to_ours(hf: dict[str, Any], sd: StateDict) -> tuple[Any, StateDict]:
    """MistralForCausalLM -> (GPTConfig, state dict): LLaMA's layout and names, no biases.

    Raises:
        ConfigError: a ``sliding_window`` shorter than ``max_position_embeddings`` (ours attends to the
            whole context, so the outputs would differ past the window), or what llama_to_ours raises.
    """
    window, n_ctx = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
    if window is not None and window < n_ctx:
        raise ConfigError(f"Mistral sliding_window={window} < max_position_embeddings={n_ctx} is not supported "
                          "(our attention is full-context)")
    return llama_to_ours({**hf, "attention_bias": False, "mlp_bias": False}, sd)


def mixtral_to_ours(hf: dict[str, Any], sd: StateDict) -> tuple[Any, StateDict]:
    """MixtralForCausalLM config + state dict -> (GPTConfig with ``n_experts``, our state dict).

    Accepts the fused in-memory layout of transformers v5 (``mlp.experts.gate_up_proj`` (E, 2 d_ff, D),
    ``mlp.experts.down_proj`` (E, D, d_ff), router ``mlp.gate.weight``) and the on-disk layout of the
    published checkpoints (``block_sparse_moe.gate.weight``, ``experts.{e}.w1/w2/w3``: gate/down/up).
    """
    cfg = _build("gpt", _llama_common(hf, bias=False, n_experts=hf["num_local_experts"],
                                      n_experts_per_token=hf["num_experts_per_tok"]))
    src = _strip_prefix(sd, ("model.",))
    out = {"tok_emb.weight": _take(src, "embed_tokens.weight"), "final_norm.weight": _take(src, "norm.weight")}
    f = cfg.d_ff
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"layers.{i}."
        for ours, theirs in _LLAMA_LAYER:
            _copy_linear(out, src, b + ours, h + theirs, False)
        if f"{h}mlp.experts.gate_up_proj" in src:  # transformers v5 fused experts
            out[f"{b}mlp.router.weight"] = _take(src, f"{h}mlp.gate.weight")
            gate_up, down = src[f"{h}mlp.experts.gate_up_proj"], _take(src, f"{h}mlp.experts.down_proj")
            for e in range(cfg.n_experts):
                out[f"{b}mlp.experts.{e}.gate.weight"] = gate_up[e, :f]
                out[f"{b}mlp.experts.{e}.up.weight"] = gate_up[e, f:]
                out[f"{b}mlp.experts.{e}.down.weight"] = down[e]
        else:  # published checkpoint layout
            m = f"{h}block_sparse_moe."
            out[f"{b}mlp.router.weight"] = _take(src, f"{m}gate.weight")
            for e in range(cfg.n_experts):
                for ours, theirs in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
                    out[f"{b}mlp.experts.{e}.{ours}.weight"] = _take(src, f"{m}experts.{e}.{theirs}.weight")
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else _take(sd, "lm_head.weight")
    return cfg, out


def _llama_from_ours(cfg: Any, sd: StateDict) -> tuple[dict[str, Any], StateDict]:
    moe = getattr(cfg, "n_experts", 0) > 0
    hf = {"architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
          "model_type": "mixtral" if moe else "llama",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
          "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.d_head, "hidden_act": "silu",
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
          "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "attention_dropout": cfg.dropout}
    if moe:
        hf.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_token,
                  router_jitter_noise=0.0, sliding_window=None)
    else:
        hf.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in _LLAMA_LAYER + (() if moe else _LLAMA_MLP):
            if ours.endswith(".weight"):
                out[h + theirs] = sd[b + ours]
                continue
            out[f"{h}{theirs}.weight"] = sd[f"{b}{ours}.weight"]
            if cfg.bias:
                out[f"{h}{theirs}.bias"] = sd[f"{b}{ours}.bias"]
        if moe:
            e_range = range(cfg.n_experts)
            out[f"{h}mlp.gate.weight"] = sd[f"{b}mlp.router.weight"]
            out[f"{h}mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
                [sd[f"{b}mlp.experts.{e}.gate.weight"], sd[f"{b}mlp.experts.{e}.up.weight"]]) for e in e_range])
            out[f"{h}mlp.experts.down_proj"] = torch.stack([sd[f"{b}mlp.experts.{e}.down.weight"] for e in e_range])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return hf, out


# ---------------------------------------------------------------------------------------------------
# BERT  (BertModel, BertForMaskedLM)


def _new_norm_name(key: str) -> str:
    """TF-era BERT checkpoints name LayerNorm parameters ``gamma``/``beta``."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def bert_to_ours(hf: dict[str, Any], sd: StateDict, family: str = "bert") -> tuple[Any, StateDict]:
    """BertModel (or BertFor* with a ``bert.`` prefix) config + state dict -> (BertConfig, state dict).

    Pre-training heads (``cls.*``) are dropped; old ``LayerNorm.gamma/beta`` names are accepted.

    Raises:
        ConfigError: for activations other than exact ``gelu`` / ``gelu_new``, or non-absolute positions.
    """
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"BERT hidden_act '{act}' is not supported (ours is GELU)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"BERT position_embedding_type '{hf['position_embedding_type']}' is not supported")
    src = {_new_norm_name(k): v for k, v in _strip_prefix(sd, ("bert.",)).items()}
    pooler = "pooler.dense.weight" in src
    cfg = _build(family, dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"], n_token_types=hf.get("type_vocab_size", 2), pooler=pooler,
        gelu="erf" if act == "gelu" else "tanh", norm_eps=hf.get("layer_norm_eps", 1e-12),
        init_std=hf.get("initializer_range", 0.02)))
    out = {"tok_emb.weight": _take(src, "embeddings.word_embeddings.weight"),
           "pos_emb.weight": _take(src, "embeddings.position_embeddings.weight")}
    if cfg.n_token_types:
        out["type_emb.weight"] = _take(src, "embeddings.token_type_embeddings.weight")
    pairs = [("emb_norm", "embeddings.LayerNorm")] + ([("pooler", "pooler.dense")] if pooler else [])
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        pairs += [(b + "attn.q_proj", h + "attention.self.query"), (b + "attn.k_proj", h + "attention.self.key"),
                  (b + "attn.v_proj", h + "attention.self.value"), (b + "attn.o_proj", h + "attention.output.dense"),
                  (b + "attn_norm", h + "attention.output.LayerNorm"), (b + "mlp.up", h + "intermediate.dense"),
                  (b + "mlp.down", h + "output.dense"), (b + "mlp_norm", h + "output.LayerNorm")]
    for ours, theirs in pairs:
        out[f"{ours}.weight"] = _take(src, f"{theirs}.weight")
        out[f"{ours}.bias"] = _take(src, f"{theirs}.bias")
    return cfg, out


def bert_mlm_to_ours(hf: dict[str, Any], sd: StateDict) -> tuple[Any, StateDict]:
    """BertForMaskedLM (or BertForPreTraining) config + state dict -> (BertMLMConfig, state dict).

    The encoder as :func:`bert_to_ours` (under ``encoder.``), plus ``cls.predictions``: the transform
    (dense, LayerNorm) and the output bias; the decoder weight is the word embedding (tied). The NSP
    head (``cls.seq_relationship``) of BertForPreTraining is dropped.

    Raises:
        ConfigError: ``tie_word_embeddings=false`` (our decoder is always tied), or what bert_to_ours raises.
    """
    if hf.get("tie_word_embeddings", True) is False:
        raise ConfigError("BertForMaskedLM with tie_word_embeddings=false is not supported (our MLM decoder is "
                          "tied to the word embeddings)")
    cfg, enc = bert_to_ours(hf, sd, family="bert-mlm")
    src = {_new_norm_name(k): v for k, v in sd.items() if k.startswith("cls.predictions.")}
    out = {f"encoder.{k}": v for k, v in enc.items()}
    p = "cls.predictions."
    for ours, theirs in (("dense", "transform.dense"), ("norm", "transform.LayerNorm")):
        out[f"mlm_head.{ours}.weight"] = _take(src, f"{p}{theirs}.weight")
        out[f"mlm_head.{ours}.bias"] = _take(src, f"{p}{theirs}.bias")
    out["mlm_head.decoder.weight"] = out["encoder.tok_emb.weight"]
    out["mlm_head.decoder.bias"] = _take(src, f"{p}bias")
    return cfg, out


# ---------------------------------------------------------------------------------------------------
# T5  (T5ForConditionalGeneration)


def t5_to_ours(hf: dict[str, Any], sd: StateDict) -> tuple[Any, StateDict]:
    """T5ForConditionalGeneration config + state dict -> (T5Config, our state dict).

    The relative attention bias lives in HF's block 0 of each stack; ours is one module per stack.
    ``tie_word_embeddings`` (T5 v1.0: tied lm_head and the d_model^-0.5 output scaling) is ours
    ``tie_embeddings``; v1.1 (``false``) keeps a separate ``lm_head.weight``. transformers 5 marks v1.1 by
    ``scale_decoder_outputs=false`` beside a forced ``tie_word_embeddings=true`` and saves no head; the
    unscaled shared embedding is then copied into ours.

    Raises:
        ConfigError: for a feed-forward other than ``relu`` or ``gated-gelu``.
    """
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in ("relu", "gated-gelu"):
        raise ConfigError(f"T5 feed_forward_proj '{ff}' is not supported; use relu or gated-gelu")
    tie = hf.get("tie_word_embeddings", True) is not False and hf.get("scale_decoder_outputs", True)
    cfg = _build("t5", dict(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], n_heads=hf["num_heads"],
        d_head=hf["d_kv"], d_ff=hf["d_ff"], mlp=ff, pos="relative",
        rel_buckets=hf.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf.get("relative_attention_max_distance", 128), tie_embeddings=bool(tie),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6)))
    mlp = (("mlp.up", "DenseReluDense.wi"), ("mlp.down", "DenseReluDense.wo")) if ff == "relu" else \
        (("mlp.gate", "DenseReluDense.wi_0"), ("mlp.up", "DenseReluDense.wi_1"), ("mlp.down", "DenseReluDense.wo"))
    attn = tuple((f"{o}_proj", n) for o, n in zip("qkvo", "qkvo"))
    out = {"shared.weight": _take(sd, "shared.weight")}
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        out[f"{stack}.rel_bias.emb.weight"] = _take(
            sd, f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        out[f"{stack}.final_norm.weight"] = _take(sd, f"{stack}.final_layer_norm.weight")
        for i in range(n_layers):
            b, h = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            pairs = [("attn_norm", "0.layer_norm")] + [(f"attn.{o}", f"0.SelfAttention.{n}") for o, n in attn]
            if stack == "decoder":
                pairs += [("cross_norm", "1.layer_norm")] + [(f"cross_attn.{o}", f"1.EncDecAttention.{n}")
                                                             for o, n in attn]
            ff_i = 1 if stack == "encoder" else 2
            pairs += [("mlp_norm", f"{ff_i}.layer_norm")] + [(o, f"{ff_i}.{n}") for o, n in mlp]
            for ours, theirs in pairs:
                out[f"{b}{ours}.weight"] = _take(sd, f"{h}{theirs}.weight")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["shared.weight"]
    elif "lm_head.weight" not in sd and hf.get("tie_word_embeddings") is True:
        # transformers >= 5 writes v1.1 as tie_word_embeddings=true, scale_decoder_outputs=false and saves
        # no lm_head (its head is the shared embedding, unscaled): ours keeps an untied copy of it
        out["lm_head.weight"] = out["shared.weight"].clone()
    else:
        out["lm_head.weight"] = _take(sd, "lm_head.weight")
    return cfg, out


# ---------------------------------------------------------------------------------------------------
# ours -> HF (gpt family)

_LLAMA_STYLE = {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope"}
_GPT2_STYLE = {"norm": "layernorm", "mlp": "gelu", "pos": "learned"}


def ours_to_hf(cfg: Any, state_dict: StateDict) -> tuple[dict[str, Any], StateDict, str]:
    """Export a ``gpt``-family model to a stock HF architecture (``mamba`` and ``mamba2`` models go to
    ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` through :mod:`weightsmith.ship.hf_convert_mamba` and
    :mod:`weightsmith.ship.hf_convert_mamba2`).

    Args:
        cfg: a :class:`~weightsmith.models.gpt.GPTConfig` (or a Mamba/Mamba-2 config).
        state_dict: our state dict (``model.state_dict()``); with tied embeddings ``lm_head.weight`` may be
            absent.

    Returns:
        ``(hf_config_dict, hf_state_dict, architecture)``: a ``config.json``-ready dict (with
        ``architectures`` and ``model_type``), the HF state dict, and ``"LlamaForCausalLM"``,
        ``"MixtralForCausalLM"`` (``n_experts > 0``) or ``"GPT2LMHeadModel"``. Tied embeddings are
        exported once (no ``lm_head.weight``), as HF's own checkpoints are; a bias-free GPT-2-style model
        exports with zero biases, which is exact.

    Raises:
        ConfigError: naming the field that neither LLaMA/Mixtral (RMSNorm, SwiGLU, RoPE) nor GPT-2
            (LayerNorm, tanh GELU, learned positions, no GQA, no experts) can express.
    """
    from weightsmith.models.gpt import GPTConfig
    from weightsmith.models.mamba import MambaConfig
    from weightsmith.models.mamba2 import Mamba2Config

    if isinstance(cfg, MambaConfig):
        from weightsmith.ship.hf_convert_mamba import mamba_from_ours

        return (*mamba_from_ours(cfg, state_dict), "MambaForCausalLM")
    if isinstance(cfg, Mamba2Config):
        from weightsmith.ship.hf_convert_mamba2 import mamba2_from_ours

        return (*mamba2_from_ours(cfg, state_dict), "Mamba2ForCausalLM")
    if not isinstance(cfg, GPTConfig):
        raise ConfigError(f"ours_to_hf exports the gpt, mamba and mamba2 families only, got {type(cfg).__name__}")
    from weightsmith.ship.export import check_gpt_options

    check_gpt_options(cfg, "hf")  # ALiBi, sinusoidal, NoPE, DyT, no norm, RoPE scaling: no stock equivalent
    style, arch = (_LLAMA_STYLE, "LlamaForCausalLM") if cfg.pos == "rope" else (_GPT2_STYLE, "GPT2LMHeadModel")
    why = f"{arch} (chosen because model.pos='{cfg.pos}')"
    for key, want in style.items():
        if getattr(cfg, key) != want:
            raise ConfigError(f"cannot export to Hugging Face: model.{key}='{getattr(cfg, key)}' but {why} "
                              f"needs '{want}'; no stock architecture has this combination")
    n_experts = getattr(cfg, "n_experts", 0)
    sd = {k: v for k, v in state_dict.items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if arch == "GPT2LMHeadModel":
        if cfg.n_kv_heads != cfg.n_heads:
            raise ConfigError(f"cannot export to Hugging Face: model.n_kv_heads={cfg.n_kv_heads} != n_heads but "
                              f"{why} has no grouped-query attention")
        if n_experts:
            raise ConfigError(f"cannot export to Hugging Face: model.n_experts={n_experts} but {why} has no experts")
        hf, out = _gpt2_from_ours(cfg, sd)
    else:
        if n_experts and cfg.bias:
            raise ConfigError("cannot export to Hugging Face: model.bias=True but MixtralForCausalLM has no biases")
        hf, out = _llama_from_ours(cfg, sd)
        arch = hf["architectures"][0]
    return hf, out, arch


# ---------------------------------------------------------------------------------------------------
# dispatch and checkpoint import

_FROM_HF = {"gpt2": ("gpt", "gpt2_to_ours"), "llama": ("gpt", "llama_to_ours"), "mistral": ("gpt", "mistral_to_ours"),
            "mixtral": ("gpt", "mixtral_to_ours"), "bert": ("bert", "bert_to_ours"), "t5": ("t5", "t5_to_ours"),
            "mamba2": ("mamba2", "mamba2_to_ours"), "mamba": ("mamba", "mamba_to_ours")}
from weightsmith.ship.hf_convert_mamba import mamba_to_ours  # noqa: E402, F401 (dispatched by _FROM_HF)
from weightsmith.ship.hf_convert_mamba2 import mamba2_to_ours  # noqa: E402, F401 (dispatched by _FROM_HF)


def hf_to_ours(hf_config: dict[str, Any], state_dict: StateDict) -> tuple[str, Any, StateDict]:
    """Any supported HF config + state dict -> ``(family, our config, our state dict)``.

    Raises:
        ConfigError: for an unsupported ``model_type``.
    """
    kind = hf_config.get("model_type")
    if kind not in _FROM_HF:
        raise ConfigError(f"HF model_type '{kind}' is not supported; supported: {', '.join(sorted(_FROM_HF))}")
    family, fn = _FROM_HF[kind]
    if kind == "bert" and "cls.predictions.transform.dense.weight" in state_dict:
        family, fn = "bert-mlm", "bert_mlm_to_ours"
    cfg, sd = globals()[fn](hf_config, state_dict)
    return family, cfg, sd


def read_hf_state_dict(path: str | Path) -> StateDict:
    """All tensors of a local HF checkpoint directory: ``*.safetensors`` (sharded or not), else
    ``pytorch_model*.bin`` loaded with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: if the directory holds neither.
    """
    d = Path(path)
    files = sorted(d.glob("*.safetensors"))
    sd: StateDict = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            sd.update(load_file(str(f)))
        return sd
    bins = sorted(d.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{d}: no *.safetensors or pytorch_model*.bin weights found")
    for f in bins:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def load_hf_checkpoint(path: str | Path, device: Any = None) -> tuple[str, Any, torch.nn.Module]:
    """Import a local HF checkpoint directory into our model.

    Returns:
        ``(family, config, model)`` with the weights loaded (``strict=True``), in the checkpoint dtype.

    Raises:
        CheckpointError: missing ``config.json`` or weights, or keys that do not match.
        ConfigError: an architecture or option we do not support.
    """
    from weightsmith.registry import model_from_config

    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: no config.json (not a Hugging Face checkpoint directory)")
    hf_config = json.loads(cfg_path.read_text())
    if hf_config.get("model_type") not in _FROM_HF:  # fail before reading gigabytes of weights
        hf_to_ours(hf_config, {})
    family, cfg, sd = hf_to_ours(hf_config, read_hf_state_dict(d))
    model = model_from_config(family, cfg, device="meta")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        msg = re.sub(r"\s+", " ", str(e))[:300]
        raise CheckpointError(f"{d}: weights do not match the config: {msg}") from None
    if getattr(cfg, "tie_embeddings", False):  # assign=True loaded two Parameters; make them one again
        model.lm_head.weight = model.tok_emb.weight
    elif hasattr(model, "tie_weights"):  # bert-mlm: the MLM decoder is the word embedding
        model.tie_weights()
    _rebuild_buffers(model)
    model.to(device or "cpu")
    return family, cfg, model


def _rebuild_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (RoPE frequencies and tables) are not in the checkpoint; recompute them."""
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()
