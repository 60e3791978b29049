"""Recipes: a TOML file with one table per stage, resolved into typed configs.

    [task]    -> name = "causal-lm" picks the registered task (default: the model family's task); the
                 other keys are that task's config fields (weightsmith.tasks)
    [data]    -> the task's data config (text: weightsmith.data.prepare.DataConfig)
    [model]   -> family = "gpt" picks the registered family (or preset = "gpt2" a named preset;
                 without either, the family of a ``train.init_from`` source, else gpt);
                 the other keys are that family's config fields. Fields the data decides (vocab_size,
                 n_classes, in_channels, image_size) are filled in by the task when the recipe leaves
                 them out.
    [train]   -> weightsmith.train.config.TrainConfig
    [sample]  -> weightsmith.train.config.SampleConfig (the sample printed after training)
    [adapter] -> :class:`AdapterConfig`: LoRA / DoRA / QLoRA adapters applied to the built model from
                 outside (weightsmith.adapters); absent: every parameter is trained

Unknown tables or keys raise ConfigError with the valid names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from weightsmith.config import apply_overrides, from_dict, load_toml, to_dict
from weightsmith.errors import ConfigError

# quantization: set by `weightsmith quantize`
SECTIONS = ("task", "data", "model", "train", "sample", "adapter", "quantization")


ADAPTER_METHODS = ("lora", "dora", "qlora")


@dataclass(kw_only=True)
class AdapterConfig:
    """``[adapter]`` section: low-rank adapters on a frozen base (weightsmith.adapters). The base's
    parameters get no gradient and no optimizer state; only the adapters train, and checkpoints hold
    base and adapters so a resume is exact. ``weightsmith export`` merges them into the weights first."""

    method: Literal["lora", "dora", "qlora"] = field(default="lora", metadata={"doc": (
        "`lora` (Hu et al. 2021: W x + (alpha / rank) B A dropout(x)); `dora` (Liu et al. 2024: a "
        "per-output-row magnitude times the direction (W + s B A) / ||W + s B A||); `qlora` (Dettmers "
        "et al. 2023: LoRA on a frozen NF4 base, block size 64, double quantization; adapters in fp32)")})
    rank: int = field(default=8, metadata={"doc": "r, the inner dimension of B A, >= 1"})
    alpha: float = field(default=16.0, metadata={"doc": "α; the adapter output is scaled by alpha / rank (> 0)"})
    dropout: float = field(default=0.0, metadata={"doc": "dropout probability on the adapter's input, in [0, 1)"})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={"doc": (
        "patterns of the linear layers to adapt, matched against module names (`blocks.0.attn.q_proj`) "
        "as a suffix after a dot or the whole name, with shell wildcards: `q_proj`, `attn.*`, "
        "`blocks.1.mlp.*`, `*` (every linear). A pattern that matches no linear is an error")})
    train_modules: list[str] = field(default_factory=list, metadata={"doc": (
        "patterns (as `target_modules`) of modules whose own parameters train in full beside the adapters, "
        "peft's `modules_to_save`: `tok_emb` (with tied embeddings the head trains with it). A pattern "
        "that matches no module is an error")})
    quantize_frozen: bool = field(default=True, metadata={"doc": (
        "`qlora` only: also store every other linear in the blocks (frozen) as NF4, not only the adapted ones")})

    def __post_init__(self) -> None:
        if self.method not in ADAPTER_METHODS:
            raise ConfigError(f"adapter.method = {self.method!r} is not allowed; choose one of {list(ADAPTER_METHODS)}")
        if self.rank < 1:
            raise ConfigError(f"adapter.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"adapter.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        if not all(isinstance(p, str) and p for p in self.train_modules):
            raise ConfigError(f"adapter.train_modules must be a list of name patterns, got {self.train_modules!r}")
        if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
            raise ConfigError(f"adapter.target_modules must be a non-empty list of name patterns, "
                              f"got {self.target_modules!r}")


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
    adapter: AdapterConfig | None = None  # [adapter]: LoRA / DoRA / QLoRA; None trains every parameter

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
        tree = {"task": {"name": self.task_name, **to_dict(self.task)}, "data": to_dict(self.data),
                "model": model, "train": to_dict(self.train), "sample": to_dict(self.sample)}
        if self.adapter is not None:
            tree["adapter"] = to_dict(self.adapter)
        return tree


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
    init_from = (tree.get("train") or {}).get("init_from")
    if family is None and isinstance(init_from, str) and init_from:  # the source's family (init_from.py)
        from weightsmith.train.init_from import source_family

        family = source_family(init_from)
    family = family or "gpt"
    get_family(family)
    if "adapter" in tree and not isinstance(tree["adapter"], dict):
        raise ConfigError(f"[adapter] must be a table of keys (method, rank, ...), got {tree['adapter']!r}")
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
        adapter=from_dict(AdapterConfig, tree["adapter"], "adapter") if "adapter" in tree else None,
    )
    # validate the model section now (unknown keys, impossible shapes), with stand-ins for data fields
    recipe.model_config(task_cls.placeholder_fields(recipe.data))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file and apply dotted overrides (``--train.lr=3e-4``)."""
    tree = apply_overrides(load_toml(path), overrides or [])
    return recipe_from_tree(tree, name=Path(path).stem)
