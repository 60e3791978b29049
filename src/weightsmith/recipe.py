"""Recipes: a TOML file with one table per stage, resolved into typed configs.

    [task]    -> name = "causal-lm" picks the registered task (default: the model family's task); the
                 other keys are that task's config fields (weightsmith.tasks)
    [data]    -> the task's data config (text: weightsmith.data.prepare.DataConfig)
    [model]   -> family = "gpt" picks the registered family (or preset = "gpt2" a named preset);
                 the other keys are that family's config fields. Fields the data decides (vocab_size,
                 n_classes, in_channels, image_size) are filled in by the task when the recipe leaves
                 them out.
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
from weightsmith.errors import ConfigError

SECTIONS = ("task", "data", "model", "train", "sample", "quantization")  # quantization: set by `weightsmith quantize`


@dataclass
class Recipe:
    name: str
    task_name: str
    task: Any  # the task's config dataclass
    data: Any  # the task's data config dataclass
    family: str
    model: dict[str, Any]  # raw model fields; built into the family's config once the data is known
    train: Any
    sample: Any

    @property
    def task_cls(self) -> type:
        from weightsmith.tasks import get_task

        return get_task(self.task_name)

    def model_config(self, data_fields: dict[str, Any] | None = None) -> Any:
        """The family's config dataclass; ``data_fields`` (from the task) fill in missing model fields."""
        from weightsmith.registry import resolve

        fields = dict(self.model)
        for key, value in (data_fields or {}).items():
            fields.setdefault(key, value)
        preset = fields.pop("preset", None)
        return resolve(preset or self.family, fields)[1]

    def to_tree(self, model_cfg: Any | None = None) -> dict[str, Any]:
        """The resolved config as a nested dict (what ``config.toml`` holds)."""
        model = {"family": self.family, **(to_dict(model_cfg) if model_cfg is not None else self.model)}
        return {"task": {"name": self.task_name, **to_dict(self.task)}, "data": to_dict(self.data),
                "model": model, "train": to_dict(self.train), "sample": to_dict(self.sample)}


def recipe_from_tree(tree: dict[str, Any], name: str = "run") -> Recipe:
    """Build a :class:`Recipe` from a nested dict. Raises ConfigError on unknown sections or keys."""
    from weightsmith.registry import get_family, get_preset
    from weightsmith.tasks import task_for
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
    task_tree = dict(tree.get("task", {}))
    task_cls = task_for(family, task_tree.pop("name", None))  # before any work: can this family be trained?
    recipe = Recipe(
        name=name,
        task_name=task_cls.name,
        task=from_dict(task_cls.config_cls, task_tree, "task"),
        data=from_dict(task_cls.data_config_cls, tree.get("data", {}), "data"),
        family=family,
        model=model,
        train=from_dict(TrainConfig, tree.get("train", {}), "train"),
        sample=from_dict(SampleConfig, tree.get("sample", {}), "sample"),
    )
    # validate the model section now (unknown keys, impossible shapes), with stand-ins for data fields
    recipe.model_config(task_cls.placeholder_fields(recipe.data))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file and apply dotted overrides (``--train.lr=3e-4``)."""
    tree = apply_overrides(load_toml(path), overrides or [])
    return recipe_from_tree(tree, name=Path(path).stem)
