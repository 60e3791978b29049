"""Model registry: families by name, and named presets on top of them (timm-style).

A *family* is a model class with its config dataclass (``gpt``, later ``bert``, ``t5``...). A *preset* is
a named config of a family (``gpt2``, ``llama2-7b``). GPT-2 and LLaMA shapes are config choices of
one family, not separate code paths.

    >>> cfg = preset_config("gpt2", overrides={"n_layers": 2})
    >>> model = create_model("gpt2", n_layers=2)
    >>> list_models("gpt2*")
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weightsmith.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """A model class, its config dataclass, and the task a recipe of this family trains with (a name
    in :mod:`weightsmith.tasks`), or None for a backbone with no objective of its own (``bert``, whose
    pretraining model with the MLM head is ``bert-mlm``)."""

    name: str
    model_cls: type
    config_cls: type
    task: str | None = "causal-lm"


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    config: dict[str, Any]
    doc: str = ""


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, Preset] = {}


def register_family(name: str, config_cls: type, *, task: str | None = "causal-lm") -> Callable[[type], type]:
    """Class decorator: register ``model_cls(config)`` under ``name``, trained by ``task`` by default."""

    def deco(model_cls: type) -> type:
        _FAMILIES[name] = Family(name, model_cls, config_cls, task)
        return model_cls

    return deco


def register_preset(name: str, family: str, doc: str = "", **config: Any) -> None:
    """Register a named config of ``family``."""
    _PRESETS[name] = Preset(name, family, dict(config), doc)


def _ensure_loaded() -> None:
    # Importing the model package runs every family's registration decorators.
    import weightsmith.models  # noqa: F401


def get_family(name: str) -> Family:
    _ensure_loaded()
    if name not in _FAMILIES:
        close = difflib.get_close_matches(name, _FAMILIES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model family '{name}'{hint}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def get_preset(name: str) -> Preset:
    _ensure_loaded()
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS) + list(_FAMILIES), n=3, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint}; see `weightsmith models` for all names")
    return _PRESETS[name]


def list_models(pattern: str = "*") -> list[str]:
    """Names of presets and families matching a glob pattern, sorted; a preset also matches when its
    family's name does (``models unet`` lists the unet family and its presets)."""
    _ensure_loaded()
    names = {n for n in set(_PRESETS) | set(_FAMILIES) if fnmatch.fnmatch(n, pattern)}
    names |= {n for n, p in _PRESETS.items() if fnmatch.fnmatch(p.family, pattern)}
    return sorted(names)


def list_families() -> list[str]:
    _ensure_loaded()
    return sorted(_FAMILIES)


def build_config(family: str, values: dict[str, Any]) -> Any:
    """Config dataclass of ``family`` from a dict; unknown keys raise ConfigError listing valid ones."""
    from weightsmith.config import from_dict

    return from_dict(get_family(family).config_cls, values, "model")


def resolve(name: str, overrides: dict[str, Any] | None = None) -> tuple[Family, Any]:
    """``name`` (preset or family) plus overrides -> (family, config)."""
    _ensure_loaded()
    if name in _FAMILIES:
        fam, base = _FAMILIES[name], {}
    else:
        preset = get_preset(name)
        fam, base = _FAMILIES[preset.family], preset.config
    return fam, build_config(fam.name, {**base, **(overrides or {})})


def create_model(name: str, device: Any = None, **overrides: Any) -> Any:
    """Build a registered model by preset or family name, e.g. ``create_model("gpt2", n_layers=2)``.

    ``device="meta"`` builds without allocating memory (for inspection).
    """
    import torch

    fam, cfg = resolve(name, overrides)
    with torch.device(device or "cpu"):
        return fam.model_cls(cfg)


def model_from_config(family: str, cfg: Any, device: Any = None) -> Any:
    import torch

    with torch.device(device or "cpu"):
        return get_family(family).model_cls(cfg)
