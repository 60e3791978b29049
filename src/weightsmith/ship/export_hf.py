"""Hugging Face export: a directory that ``transformers`` loads with no custom code.

``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load it, and so
do vLLM (``vllm serve DIR``) and TGI (``--model-id DIR``); see ``docs/serving.md``. Files (HF docs,
"Models" / "Tokenizers" / "safetensors"):

    config.json             from weightsmith.ship.hf_convert.ours_to_hf: LlamaForCausalLM,
                            MixtralForCausalLM, GPT2LMHeadModel, MambaForCausalLM or
                            Mamba2ForCausalLM, plus ``dtype`` (and the legacy ``torch_dtype`` and
                            top-level ``rope_theta`` that transformers 4.x reads)
    model.safetensors       HF parameter names, tied embeddings stored once
    tokenizer.json          a Hugging Face ``tokenizers`` file that gives the same ids as ours
    tokenizer_config.json   ``PreTrainedTokenizerFast``, no special tokens, no space clean-up

The model has no special tokens (our tokenizers have none), so ``bos/eos/pad_token_id`` are null:
generation runs for exactly ``max_new_tokens``.

Tokenizers (each encodes text to our ids and decodes back exactly):

- ``bpe``: our tokenizer already is a ``tokenizers.Tokenizer``; it is saved as is.
- ``byte``: a byte-level BPE with the 256 byte tokens of GPT-2's byte-to-unicode alphabet as vocabulary
  (id = byte value) and no merges, behind the GPT-2 ``ByteLevel`` pre-tokenizer and decoder.
- ``char``: a ``WordLevel`` model over our alphabet (id = our id), a pre-tokenizer that isolates every
  character, and a ``Fuse`` decoder that joins them back without spaces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from weightsmith.data.tokenizers import bytes_to_unicode

_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_HF_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def hf_tokenizer(tokenizer: Any) -> Any:
    """A Hugging Face ``tokenizers.Tokenizer`` equivalent to our byte, char or bpe tokenizer.

    Returns:
        ``tokenizers.Tokenizer`` whose ``encode(text).ids`` equals ``tokenizer.encode(text)``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if tokenizer.kind == "bpe":
        return Tokenizer.from_str(tokenizer.hf.to_str())
    if tokenizer.kind == "byte":
        vocab = {ch: b for b, ch in bytes_to_unicode().items()}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return tok
    if tokenizer.kind == "char":
        vocab = {c: i for i, c in enumerate(tokenizer.chars)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok
    raise ValueError(f"unknown tokenizer kind {tokenizer.kind!r}")


def write_hf_tokenizer(tokenizer: Any, out_dir: Path, max_seq_len: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (PreTrainedTokenizerFast) into ``out_dir``."""
    hf_tokenizer(tokenizer).save(str(Path(out_dir) / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_hf(model: torch.nn.Module, tokenizer: Any, out_dir: Path, dtype: str = "f32") -> Path:
    """Write config.json, model.safetensors and tokenizer files for ``transformers``.

    Args:
        model: a ``gpt``-, ``mamba``- or ``mamba2``-family model.
        dtype: ``f32``, ``f16`` or ``bf16``; the weights are cast and ``config.json``'s ``dtype`` says so.

    Raises:
        ConfigError: the config fits no stock HF architecture (from ``ours_to_hf``, naming the field).
    """
    from safetensors.torch import save_file

    from weightsmith.ship.hf_convert import ours_to_hf

    out_dir = Path(out_dir)
    hf_config, hf_sd, _ = ours_to_hf(model.config, model.state_dict())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # our tokenizers have no special tokens
        hf_config[key] = None
    hf_config["dtype"] = _HF_DTYPE_NAMES[dtype]
    # transformers 4.x (what many vLLM / TGI releases pin) reads the legacy keys
    hf_config["torch_dtype"] = _HF_DTYPE_NAMES[dtype]
    if "rope_parameters" in hf_config:
        hf_config["rope_theta"] = hf_config["rope_parameters"]["rope_theta"]
    hf_config["transformers_version"] = _transformers_version()
    tensors = {k: v.detach().to(_TORCH_DTYPES[dtype]).contiguous().clone() for k, v in hf_sd.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    write_hf_tokenizer(tokenizer, out_dir, model.config.max_seq_len)
    return out_dir


def _transformers_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # transformers is optional at export time
        return None
