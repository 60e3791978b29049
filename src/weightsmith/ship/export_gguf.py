"""GGUF export for llama.cpp, written with the ``gguf`` package's ``GGUFWriter``.

Families: ``gpt`` (arch ``llama`` or ``gpt2``, below), ``mamba2`` and ``mamba`` (archs ``mamba2`` and
``mamba``: tensors, transforms and metadata in :mod:`weightsmith.ship.export_gguf_ssm`). Any other
family raises a one-line ConfigError.

Sources: the GGUF spec (ggml-org/ggml ``docs/gguf.md``: key names, tensor names, file types) and
llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute`` for Q/K, ``GPT2Model`` for the fused
QKV layout). Tensors are handed to the writer in PyTorch's (out_features, in_features) layout; GGUF
stores dimensions innermost first, so llama.cpp sees ``{in, out}``, which is what it expects.

GPT architectures (a config neither fits raises ConfigError naming the field):

- ``llama``: norm=rmsnorm, mlp=swiglu, pos=rope. Our RoPE rotates channel ``i`` with ``i + d_head/2``
  (the half-split, GPT-NeoX / HF-LLaMA layout); llama.cpp's ``llama`` graph rotates adjacent pairs
  ``(2i, 2i+1)`` (the original Meta layout). As in ``convert_hf_to_gguf.py`` the rows of the Q and K
  projections are permuted, per head, from half-split to interleaved order::

      rows of one head:  [x0 x1 x2 x3 | y0 y1 y2 y3]  ->  [x0 y0 x1 y1 x2 y2 x3 y3]

  which leaves q.k unchanged and turns our rotation into llama.cpp's.
- ``gpt2``: norm=layernorm, mlp=gelu (tanh, ggml's GELU), pos=learned. Q, K, V are concatenated into
  ``attn_qkv`` (rows q, then k, then v). llama.cpp requires every bias, so a bias-free config gets zero
  biases, which compute the same function.

Tokenizer: always GPT-2-style byte-level BPE (``tokenizer.ggml.model = "gpt2"``, pre-tokenizer
``gpt-2``), tokens written in GPT-2's byte-to-unicode alphabet. Byte tokenizers become 256 tokens with
no merges; char tokenizers become one token per character, plus merges that glue the bytes of each
multi-byte character back together (none for an ASCII alphabet); BPE keeps its vocabulary and merges.
llama.cpp's ``gpt2`` vocabulary always has a BOS/EOS id (default 11); we point both at the token
for byte 0x00 when the vocabulary has one (it never occurs in text), otherwise at the last id.

dtypes: ``f32``; ``f16``; ``q8_0`` and ``q4_0`` (blocks of 32 weights along a row with one f16 scale,
quantized by ``gguf.quants``, the reference numpy port of ggml's quantizers). Only 2-D ``.weight``
matrices are converted; as in llama.cpp's converter (``ModelBase.prepare_tensors``), 1-D tensors, norms
(``*_norm.weight``, also the 2-D ``ssm_norm``), tensors not named ``.weight`` (``ssm_a``, ``ssm_d``) and
``ssm_conv1d`` (ggml's ``ssm_conv`` reads float32 only) stay f32, and a matrix whose rows are not a
multiple of 32 falls back to f16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightsmith.data.tokenizers import bytes_to_unicode
from weightsmith.errors import ConfigError

GGUF_FILE = "model.gguf"

# the (norm, mlp, pos) each llama.cpp architecture computes
_ARCH_SHAPES = {
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope"},
    "gpt2": {"norm": "layernorm", "mlp": "gelu", "pos": "learned"},
}


def config_family(cfg: Any) -> str:
    """The registered family whose config class is ``type(cfg)`` (``"gpt"``, ``"mamba2"``...)."""
    from weightsmith.registry import get_family, list_families

    for name in list_families():
        if get_family(name).config_cls is type(cfg):
            return name
    raise ConfigError(f"{type(cfg).__name__} is not the config of a registered model family")


def gguf_arch(cfg: Any) -> str:
    """llama.cpp's architecture for a model config: ``"llama"`` or ``"gpt2"`` for a GPTConfig,
    ``"mamba2"`` for a Mamba2Config, ``"mamba"`` for a (Mamba-1) MambaConfig.

    Raises:
        ConfigError: the family has no GGUF mapping, or (naming the field) the config cannot be
            expressed in its architecture; one line.
    """
    from weightsmith.ship.export import check_gpt_options
    from weightsmith.ship.export_gguf_ssm import SSM_ARCHS, ssm_gguf_arch

    family = config_family(cfg)
    if family in SSM_ARCHS:
        return ssm_gguf_arch(cfg, family)
    if family != "gpt":
        raise ConfigError(f"model.family={family!r} has no GGUF mapping; GGUF export supports "
                          f"{', '.join(repr(f) for f in ('gpt', *SSM_ARCHS))}")
    if getattr(cfg, "n_experts", 0):
        raise ConfigError(f"model.n_experts={cfg.n_experts} cannot be exported to GGUF yet (dense MLPs only)")
    check_gpt_options(cfg, "gguf")
    for arch, want in _ARCH_SHAPES.items():
        if cfg.pos == want["pos"]:
            for name, value in want.items():
                if getattr(cfg, name) != value:
                    raise ConfigError(f"model.{name}={getattr(cfg, name)!r} cannot be exported to GGUF: "
                                      f"pos={cfg.pos!r} means llama.cpp arch {arch!r}, which needs "
                                      f"{name}={value!r}")
            return arch
    raise ConfigError(f"model.pos={cfg.pos!r} cannot be exported to GGUF")


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q or K projection rows (n_heads * d_head, ...) from half-split to interleaved RoPE order.

    Same as ``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``; works for weights
    (n_heads * d_head, d_model) and biases (n_heads * d_head,).
    """
    d_head = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, d_head // 2, *w.shape[1:])  # (H, 2 halves, d_head/2, ...)
            .transpose(1, 2)  # (H, d_head/2, 2, ...): pair element j of each half
            .reshape(w.shape))


def gguf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict renamed (and Q/K permuted or QKV fused) to llama.cpp's tensor names, float32.

    Tied embeddings are written once (``token_embd``); llama.cpp reuses it for the output. The SSM
    families are mapped by :func:`weightsmith.ship.export_gguf_ssm.ssm_gguf_tensors`.
    """
    cfg = model.config
    arch = gguf_arch(cfg)
    if arch not in _ARCH_SHAPES:
        from weightsmith.ship.export_gguf_ssm import ssm_gguf_tensors

        return ssm_gguf_tensors(model, arch)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {"token_embd.weight": sd["tok_emb.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = sd["pos_emb.weight"]

    def put(name: str, key: str, bias_size: int | None = None) -> None:
        if key in sd:
            out[name] = sd[key]
        elif bias_size is not None:  # gpt2 in llama.cpp needs every bias; zeros change nothing
            out[name] = torch.zeros(bias_size)

    zero = cfg.d_model if arch == "gpt2" else None
    put("output_norm.weight", "final_norm.weight")
    put("output_norm.bias", "final_norm.bias", zero)
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", p + "attn_norm.weight")
        put(b + "attn_norm.bias", p + "attn_norm.bias", zero)
        put(b + "ffn_norm.weight", p + "mlp_norm.weight")
        put(b + "ffn_norm.bias", p + "mlp_norm.bias", zero)
        for kind in ("weight", "bias"):
            q, k, v = (sd.get(f"{p}attn.{n}_proj.{kind}") for n in "qkv")
            if arch == "llama":
                if q is not None:
                    out[f"{b}attn_q.{kind}"] = permute_rope_rows(q, cfg.n_heads)
                    out[f"{b}attn_k.{kind}"] = permute_rope_rows(k, cfg.n_kv_heads)
                    out[f"{b}attn_v.{kind}"] = v
            elif q is not None:
                out[f"{b}attn_qkv.{kind}"] = torch.cat([q, k, v], dim=0)
            else:
                out[f"{b}attn_qkv.bias"] = torch.zeros((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head)
        put(b + "attn_output.weight", p + "attn.o_proj.weight")
        put(b + "attn_output.bias", p + "attn.o_proj.bias", zero)
        put(b + "ffn_up.weight", p + "mlp.up.weight")
        put(b + "ffn_up.bias", p + "mlp.up.bias", cfg.d_ff if arch == "gpt2" else None)
        put(b + "ffn_down.weight", p + "mlp.down.weight")
        put(b + "ffn_down.bias", p + "mlp.down.bias", zero)
        if arch == "llama":
            put(b + "ffn_gate.weight", p + "mlp.gate.weight")
            put(b + "ffn_gate.bias", p + "mlp.gate.bias")
    return out


def gguf_vocab(tokenizer: Any) -> tuple[list[str], list[str]]:
    """(tokens, merges) in GPT-2's byte-to-unicode alphabet, tokens indexed by our ids.

    Merges are ``"left right"`` strings, highest priority first.
    """
    b2u = bytes_to_unicode()
    tokens = ["".join(b2u[b] for b in piece) for piece in tokenizer.token_bytes()]
    if tokenizer.kind == "bpe":
        import json

        merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
        return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]
    merges: list[str] = []
    if tokenizer.kind == "char":  # glue multi-byte characters together, left to right
        seen = set()
        for tok in tokens:
            for j in range(2, len(tok) + 1):
                merge = f"{tok[:j - 1]} {tok[j - 1]}"
                if merge not in seen:
                    seen.add(merge)
                    merges.append(merge)
    return tokens, merges


def _qtype(dtype: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[dtype]


def _file_type(dtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[dtype]


def keeps_f32(name: str) -> bool:
    """Whether llama.cpp wants tensor ``name`` in float32 whatever the file type (module docstring)."""
    return (not name.endswith(".weight") or name.endswith("_norm.weight")
            or ".ssm_conv1d." in name)


def encode_tensor(t: torch.Tensor, dtype: str, name: str = "") -> tuple[np.ndarray, Any]:
    """(data, GGMLQuantizationType) for the tensor ``name``: 1-D and :func:`keeps_f32` names stay f32;
    2-D goes to ``dtype``, or f16 if its rows are not a multiple of the 32-weight quantization block."""
    import gguf

    arr = t.numpy().astype(np.float32)
    qtype = _qtype(dtype) if arr.ndim == 2 and not (name and keeps_f32(name)) else _qtype("f32")
    if qtype not in (_qtype("f32"), _qtype("f16")):
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if arr.shape[-1] % block:
            qtype = _qtype("f16")
    return gguf.quants.quantize(arr, qtype), qtype


def _writer_allowing_empty_arrays(path: Path, arch: str):
    """GGUFWriter that can write an empty string array (the spec allows it; llama.cpp's gpt2 vocabulary
    requires the merges key even when a byte-level vocabulary has no merges)."""
    import gguf

    class _Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return _Writer(path, arch)


def export_gguf(model: torch.nn.Module, tokenizer: Any, out_dir: Path, dtype: str = "f32") -> Path:
    """Write ``out_dir/model.gguf`` for llama.cpp.

    Args:
        model: a ``gpt``, ``mamba2`` or ``mamba`` model; its config picks the architecture (see module
            docstring).
        dtype: ``f32``, ``f16``, ``q8_0`` or ``q4_0`` for 2-D weight matrices.

    Raises:
        ConfigError: the family or config has no llama.cpp architecture, or the vocabulary does not match.
        WeightsmithError: the ``gguf`` package (the ``interop`` extra) is not installed.
    """
    from weightsmith.ship.export import import_interop

    gguf = import_interop("gguf", "gguf")

    cfg = model.config
    arch = gguf_arch(cfg)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} differs from the tokenizer's "
                          f"{tokenizer.vocab_size}; llama.cpp needs one token per embedding row")
    path = Path(out_dir) / GGUF_FILE
    w = _writer_allowing_empty_arrays(path, arch)
    w.add_name("weightsmith")
    w.add_vocab_size(cfg.vocab_size)
    if arch in _ARCH_SHAPES:
        _add_gpt_hparams(w, cfg, arch)
    else:
        from weightsmith.ship.export_gguf_ssm import add_ssm_hparams

        add_ssm_hparams(w, cfg, arch)
    w.add_file_type(_file_type(dtype))
    if dtype.startswith("q"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, tokenizer)

    for name, t in gguf_tensors(model).items():
        data, qtype = encode_tensor(t, dtype, name)
        w.add_tensor(name, data, raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path


def _add_gpt_hparams(w: Any, cfg: Any, arch: str) -> None:
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    if arch == "llama":
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.d_head)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)


def add_tokenizer(w: Any, tokenizer: Any) -> None:
    """The ``tokenizer.ggml.*`` keys of the module docstring (GPT-2 byte-level BPE), any architecture."""
    import gguf

    tokens, merges = gguf_vocab(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    pieces = tokenizer.token_bytes()
    special = pieces.index(b"\x00") if b"\x00" in pieces else len(pieces) - 1
    w.add_bos_token_id(special)
    w.add_eos_token_id(special)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
