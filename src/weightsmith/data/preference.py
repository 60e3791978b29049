"""Preference pairs built from a corpus, with a property a program can check: verse lineation.

The property (stated once here and in ``docs/alignment.md``). A text has the *verse-lineation
property* iff every line of it, ``text.split("\\n")``, satisfies both

1. ``len(line) <= max_line_chars`` (characters, default 80; the corpus' verse lines are shorter), and
2. its first character, if any, is not a lowercase letter (``not line[:1].islower()``).

Speaker headings (``HAMLET.``), stage directions (``[Exit.]``) and empty lines all satisfy it; wrapped
prose lines, which go on mid-sentence in lower case (``g to the\\nPalace.``), and run-on text without
line breaks do not. The property is *prefix-closed*: every prefix of a text that has it has it too, so
a continuation cut after any number of tokens can be checked.

A pair (Rafailov et al. 2023's ``(x, y_w, y_l)``): the prompt ``x`` is the ``prompt_tokens`` tokens of
the corpus that end at a line break inside a speech (the line before is not empty and not a speaker
heading) where the next character is an uppercase letter; the chosen ``y_w`` is the true continuation,
whole lines while they fit in ``max_continuation_tokens`` tokens (at least ``min_lines`` lines), kept
only if it has the property; the rejected ``y_l`` is ``y_w`` broken in one of two ways, picked by a seeded
coin per pair:

- ``lowercase``: the first letter of every line that starts with an uppercase letter is lower-cased;
- ``join``: every line break is replaced by a space (kept only if that makes a line too long).

Every pair is checked: ``has_property(decode(y_w))`` and ``not has_property(decode(y_l))``. Pairs from the
training split of the text (:func:`weightsmith.data.corpus.split_text`, the first 90%) train; pairs from
the validation split (the last 10%) are held out, so no held-out prompt or continuation was trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from weightsmith.errors import ConfigError, DataError

SPEAKER = re.compile(r"^[A-Z][A-Z0-9 ,'&-]*\.$")  # "FIRST MURDERER." as the corpus formats speaker headings
REJECT_KINDS = ("lowercase", "join")


def has_property(text: str, max_line_chars: int = 80) -> bool:
    """The verse-lineation property (module docstring): every ``\\n``-separated line has at most
    ``max_line_chars`` characters and does not start with a lowercase letter."""
    return all(len(line) <= max_line_chars and not line[:1].islower() for line in text.split("\n"))


def break_lowercase(text: str) -> str:
    """``text`` with the first letter of every line that starts with an uppercase letter lower-cased."""
    return "\n".join(line[:1].lower() + line[1:] if line[:1].isupper() else line for line in text.split("\n"))


def break_join(text: str) -> str:
    """``text`` with every line break replaced by a space (one run-on line)."""
    return text.replace("\n", " ")


@dataclass(kw_only=True)
class PreferenceDataConfig:
    """How preference pairs are cut from the corpus (weightsmith.data.preference)."""

    prompt_tokens: int = field(default=64, metadata={"doc": (
        "tokens in every prompt (fixed, so held-out prompts batch for generation)")})
    max_continuation_tokens: int = field(default=48, metadata={"doc": (
        "most tokens of a chosen or rejected continuation; also the length of sampled continuations")})
    min_lines: int = field(default=2, metadata={"doc": "fewest whole lines in a chosen continuation"})
    max_line_chars: int = field(default=80, metadata={"doc": (
        "the property's line-length limit, in characters")})
    max_train_pairs: int = field(default=20000, metadata={"doc": (
        "most training pairs (a seeded random subset of the qualifying anchors; 0 = all)")})
    max_val_pairs: int = field(default=512, metadata={"doc": "most held-out pairs (0 = all)"})
    seed: int = field(default=0, metadata={"doc": "seeds the subset and the coin that picks each rejected kind"})

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "max_continuation_tokens", "min_lines", "max_line_chars"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"task.{name}={getattr(self, name)!r} must be an integer >= 1")
        for name in ("max_train_pairs", "max_val_pairs"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ConfigError(f"task.{name}={getattr(self, name)!r} must be an integer >= 0 (0 = all)")


@dataclass
class PreferencePair:
    """One pair as token ids: ``prompt`` (prompt_tokens ids), ``chosen`` and ``rejected`` continuations."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    kind: str  # how the rejected one breaks the property: "lowercase" | "join"


def _anchors(text: str) -> list[int]:
    """Offsets just after a line break inside a speech where an uppercase letter starts the next line."""
    out = []
    for m in re.finditer(r"\n(?=[A-Z])", text):
        a = m.end()
        prev = text[text.rfind("\n", 0, a - 1) + 1:a - 1]
        if prev.strip() and not SPEAKER.match(prev) and not prev.startswith("["):
            out.append(a)
    return out


def build_pairs(text: str, tokenizer: Any, cfg: PreferenceDataConfig, *, limit: int) -> list[PreferencePair]:
    """Pairs cut from ``text`` (module docstring), in corpus order; at most ``limit`` (0 = all), a subset
    drawn with ``random.Random(cfg.seed)``. Each pair's property is checked on its decoded tokens."""
    rng = random.Random(cfg.seed)
    anchors = _anchors(text)
    rng.shuffle(anchors)
    window = 12 * cfg.prompt_tokens  # characters before the anchor, more than prompt_tokens need
    pairs: list[tuple[int, PreferencePair]] = []
    for a in anchors:
        if limit and len(pairs) >= limit:
            break
        prompt = tokenizer.encode(text[max(0, a - window):a])[-cfg.prompt_tokens:]
        if len(prompt) < cfg.prompt_tokens:
            continue
        lines, n_lines, chosen = text[a:a + 40 * cfg.max_continuation_tokens].split("\n")[:-1], 0, []
        for k in range(1, len(lines) + 1):
            ids = tokenizer.encode("\n".join(lines[:k]) + "\n")
            if len(ids) > cfg.max_continuation_tokens:
                break
            n_lines, chosen = k, ids
        if n_lines < cfg.min_lines:
            continue
        good = tokenizer.decode(chosen)
        if not has_property(good, cfg.max_line_chars):
            continue
        kind = REJECT_KINDS[rng.random() < 0.5]
        bad = (break_lowercase if kind == "lowercase" else break_join)(good)
        rejected = tokenizer.encode(bad)[:cfg.max_continuation_tokens]
        if has_property(tokenizer.decode(rejected), cfg.max_line_chars):
            continue  # e.g. joined lines that still fit in max_line_chars
        pairs.append((a, PreferencePair(prompt, chosen, rejected, kind)))
    pairs.sort(key=lambda p: p[0])
    return [p for _, p in pairs]


def pairs_digest(pairs: list[PreferencePair]) -> str:
    """sha256 of the pairs' token ids (for the run's manifest and the resume check)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()


def build_splits(text: str, tokenizer: Any, cfg: PreferenceDataConfig) -> tuple[list[PreferencePair],
                                                                                 list[PreferencePair]]:
    """(train pairs, held-out pairs) from the two halves of :func:`~weightsmith.data.corpus.split_text`.

    Raises:
        DataError: if either split yields no pair (the corpus has no verse, or the lengths are too tight).
    """
    from weightsmith.data.corpus import split_text

    train_text, val_text = split_text(text)
    train = build_pairs(train_text, tokenizer, cfg, limit=cfg.max_train_pairs)
    val = build_pairs(val_text, tokenizer, cfg, limit=cfg.max_val_pairs)
    for name, got in (("training", train), ("validation", val)):
        if not got:
            raise DataError(f"no preference pair in the {name} split of the corpus: no line break inside a "
                            f"speech followed by {cfg.min_lines}+ whole lines that have the property within "
                            f"task.max_continuation_tokens={cfg.max_continuation_tokens} tokens")
    return train, val
