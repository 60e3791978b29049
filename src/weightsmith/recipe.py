"""Recipes: a TOML file with one table per stage, resolved into typed configs.

    [data]    -> weightsmith.data.prepare.DataConfig
    [model]   -> family = "gpt" picks the registered family (or preset = "gpt2" a named preset);
                 the other keys are that family's config fields. vocab_size is filled in from the
                 tokenizer when the recipe leaves it out.
    [train]   -> weightsmith.train.config.TrainConfig
    [sample]  -> weightsmith.train.config.SampleConfig (the sample printed after training)

Unknown tables or keys raise ConfigError with the valid names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.config import apply_overrides, from_dict, load_toml, to_dict
from weightsmith.data.prepare import DataConfig
from weightsmith.errors import ConfigError

SECTIONS = ("data", "model", "train", "sample", "quantization")  # quantization: set by `weightsmith quantize`


@dataclass
class Recipe:
    name: str
    data: DataConfig
    family: str
    model: dict[str, Any]  # raw model fields; built into the family's config once vocab_size is known
    train: Any
    sample: Any

    def model_config(self, vocab_size: int | None = None) -> Any:
        """The family's config dataclass; ``vocab_size`` fills in a missing ``model.vocab_size``."""
        from weightsmith.registry import resolve

        fields = dict(self.model)
        if "vocab_size" not in fields and vocab_size is not None:
            fields["vocab_size"] = vocab_size
        preset = fields.pop("preset", None)
        return resolve(preset or self.family, fields)[1]

    def to_tree(self, model_cfg: Any | None = None) -> dict[str, Any]:
        """The resolved config as a nested dict (what ``config.toml`` holds)."""
        model = {"family": self.family, **(to_dict(model_cfg) if model_cfg is not None else self.model)}
        return {"data": to_dict(self.data), "model": model, "train": to_dict(self.train),
                "sample": to_dict(self.sample)}


def recipe_from_tree(tree: dict[str, Any], name: str = "run") -> Recipe:
    """Build a :class:`Recipe` from a nested dict. Raises ConfigError on unknown sections or keys."""
    from weightsmith.registry import get_family, get_preset
    from weightsmith.train.config import SampleConfig, TrainConfig

    for section in tree:
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise ConfigError(f"unknown recipe section [{section}]{hint}; valid sections: {', '.join(SECTIONS)}")
    model = dict(tree.get("model", {}))
    family = model.pop("family", None)
    if "preset" in model:
        preset = get_preset(model["preset"])
        family = family or preset.family
    family = family or "gpt"
    get_family(family)
    recipe = Recipe(
        name=name,
        data=from_dict(DataConfig, tree.get("data", {}), "data"),
        family=family,
        model=model,
        train=from_dict(TrainConfig, tree.get("train", {}), "train"),
        sample=from_dict(SampleConfig, tree.get("sample", {}), "sample"),
    )
    # validate the model section now (unknown keys, impossible shapes), with a stand-in vocab size
    recipe.model_config(vocab_size=recipe.data.vocab_size if recipe.data.tokenizer == "bpe" else 256)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file and apply dotted overrides (``--train.lr=3e-4``)."""
    tree = apply_overrides(load_toml(path), overrides or [])
    return recipe_from_tree(tree, name=Path(path).stem)
