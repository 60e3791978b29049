"""Tokenizers: byte-level (256 ids), character-level, and byte-level BPE.

- ``byte``: ids are the UTF-8 bytes of the text; vocab_size 256.
- ``char``: one id per distinct character of the corpus, in sorted order (as nanoGPT's
  ``shakespeare_char``); the alphabet is taken from the whole corpus so that no validation character is
  unknown. It carries no statistics, so this does not leak validation information.
- ``bpe``: byte-level BPE (Radford et al. 2019; Sennrich et al. 2016) trained on the training split
  only, with Hugging Face ``tokenizers``. The GPT-2 pre-tokenizer regex and byte-to-unicode alphabet
  make every string encodable and decoding exact.

Every tokenizer round-trips text exactly (``decode(encode(s)) == s``) and saves to one JSON file,
``tokenizer.json`` in a run directory: ``{"kind": ..., "vocab_size": ..., ...}``, with the BPE's
Hugging Face tokenizer JSON embedded under ``"hf"``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from weightsmith.errors import DataError

TOKENIZER_FILE = "tokenizer.json"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 map to code points 256 and up. Byte-level
    BPE vocabularies (GPT-2, HF ``ByteLevel``) are written in this alphabet.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class ByteTokenizer:
    """UTF-8 bytes as ids, (text) -> list of ints in [0, 256)."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        """The byte string each id stands for, indexed by id (used for bits per byte and export)."""
        return [bytes([i]) for i in range(256)]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class CharTokenizer:
    """One id per character of a fixed alphabet, sorted by code point."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in this char-level tokenizer's alphabet") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self) -> list[bytes]:
        return [c.encode("utf-8") for c in self.chars]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "chars": self.chars}


class BPETokenizer:
    """Byte-level BPE backed by a Hugging Face ``tokenizers.Tokenizer``."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Train on ``text`` (the training split) to ``vocab_size`` ids, 256 byte ids included.

        Raises:
            DataError: if ``vocab_size`` < 257 (BPE must add at least one merge to the 256 bytes).
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise DataError(f"data.vocab_size={vocab_size} is too small for bpe; use >= 257 or tokenizer='byte'")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
        )
        chunk = 1 << 16  # feed the trainer ~64 KB pieces so it can use both cores
        tok.train_from_iterator((text[i:i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int | None:
        """The id of the vocabulary entry ``token`` (e.g. an imported model's ``[MASK]``), or None."""
        return self.hf.token_to_id(token)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        inverse = {u: b for b, u in bytes_to_unicode().items()}
        out = [b""] * self.vocab_size
        for token, i in self.hf.get_vocab().items():
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # SentencePiece byte fallback
                out[i] = bytes([int(token[3:5], 16)])
            elif all(ch in inverse for ch in token):  # byte-level alphabet (ours, GPT-2's)
                out[i] = bytes(inverse[ch] for ch in token)
            else:  # an imported non-byte-level vocabulary (SentencePiece's "\u2581" is a space): its UTF-8
                out[i] = token.replace("\u2581", " ").encode("utf-8")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "hf": json.loads(self.hf.to_str())}


Tokenizer = ByteTokenizer | CharTokenizer | BPETokenizer


def train_tokenizer(kind: str, train_text: str, full_text: str, vocab_size: int) -> Tokenizer:
    """Build a tokenizer of ``kind``: byte needs no data, char takes the corpus alphabet, bpe trains on
    ``train_text`` only."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.train(full_text)
    if kind == "bpe":
        return BPETokenizer.train(train_text, vocab_size)
    raise DataError(f"data.tokenizer={kind!r}; choose one of ['byte', 'char', 'bpe']")


def tokenizer_from_json(obj: dict[str, Any]) -> Tokenizer:
    kind = obj.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(obj["chars"])
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(obj["hf"])))
    raise DataError(f"unknown tokenizer kind {kind!r}")


def save_tokenizer(tok: Tokenizer, directory: Path) -> Path:
    """Write ``directory/tokenizer.json`` atomically (weightsmith.fsio)."""
    from weightsmith.fsio import atomic_write_text

    path = Path(directory) / TOKENIZER_FILE
    atomic_write_text(path, json.dumps(tok.to_json()))
    return path


def load_tokenizer(directory_or_file: Path) -> Tokenizer:
    """Load ``tokenizer.json`` from a run directory (or the file itself).

    Raises:
        DataError: if the file is missing or unreadable.
    """
    p = Path(directory_or_file)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise DataError(f"tokenizer file not found: {p}")
    try:
        return tokenizer_from_json(json.loads(p.read_text()))
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise DataError(f"{p}: corrupt tokenizer file ({e})") from None
