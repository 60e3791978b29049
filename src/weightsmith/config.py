"""Typed configs built from TOML recipes and dotted command-line overrides.

A recipe is a TOML file with one table per stage: ``[data]``, ``[model]``, ``[train]``, ``[sample]``.
Each table becomes a small keyword-only dataclass; each stage receives only its own section. Unknown
keys are rejected with the list of valid ones, and values are checked against the field's type, so a
typo never silently falls back to a default.

Overrides use dotted keys, ``--train.max_steps=200 --model.n_layers=6``; the value is parsed as a TOML
value (``3e-4``, ``true``, ``"text"``), and a bare word that is not valid TOML is taken as a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w

from weightsmith.errors import ConfigError


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float is the only widening), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(where, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} = {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_check_type(f"{where}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], section: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    Raises:
        ConfigError: naming ``section.key`` with the valid keys or allowed values.
    """
    types_ = _field_types(cls)
    for key in data:
        if key not in types_:
            close = difflib.get_close_matches(key, types_, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown key '{section}.{key}'{hint}; valid keys: {', '.join(sorted(types_))}"
            )
    kwargs = {k: _check_type(f"{section}.{k}", v, types_[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"[{section}]: {e}") from None


def require_positive(obj: Any, names: tuple[str, ...], section: str = "model") -> None:
    """Raise ConfigError naming ``section.name`` for the first of ``names`` that is not > 0."""
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{section}.{name} must be positive, got {getattr(obj, name)}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict, dropping ``None`` (TOML has no null) and derived fields."""
    out = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        v = getattr(obj, f.name)
        if v is None:
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def parse_override(arg: str) -> tuple[list[str], Any]:
    """``'--train.lr=3e-4'`` -> ``(['train', 'lr'], 0.0003)``.

    Raises:
        ConfigError: if the argument is not of the form ``--section.key=value``.
    """
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override {arg!r} must look like --section.key=value, e.g. --train.max_steps=200")
    key, raw = body.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict (in place) and return it."""
    for arg in overrides:
        path, value = parse_override(arg)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: '{part}' is not a section")
        node[path[-1]] = value
    return tree


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file. Raises ConfigError naming the file if it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def dump_toml(tree: dict[str, Any]) -> str:
    return tomli_w.dumps(tree)
