"""Tasks: what a run optimizes (data, objective, evaluation, artifacts), registered by name.

    causal-lm        next-token prediction on a token stream             (gpt)
    masked-lm        BERT's masked-token prediction                      (bert)
    span-corruption  T5's denoising of corrupted spans                   (t5)
    classification   image classification with cross-entropy             (mlp, resnet, convnext, vit)
    recall           synthetic associative recall (MQAR, needle)         (any causal-lm family)
    ddpm             denoising diffusion, eps-prediction                 (unet)
    flow-matching    rectified-flow velocity regression                  (unet)
    vae              the ELBO of a variational autoencoder               (vae)
    distill          a student learns from a frozen teacher's logits     (any causal-lm family)
    sparse-finetune  causal-lm that keeps a pruned run's zeros           (any causal-lm family)
    dpo              DPO on preference pairs against a frozen reference  (any causal-lm family)
    sft              next-token loss on the chosen continuations         (any causal-lm family)

Each model family names its default task when it registers; a recipe may name another in ``[task]``
if that task lists the family's default task in its ``also_trains`` (``recall`` trains every
``causal-lm`` family: same forward protocol, another objective).
The contract every task follows is :class:`weightsmith.tasks.base.Task`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from weightsmith.errors import ConfigError

_TASKS: dict[str, type] = {}
_MODULES = ("causal_lm", "masked_lm", "span_corruption", "classification", "recall", "diffusion", "vae",
            "distill", "sparse_finetune", "preference")


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`~weightsmith.tasks.base.Task` subclass under ``name``."""

    def deco(cls: type) -> type:
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


def _ensure_loaded() -> None:
    import importlib

    for mod in _MODULES:
        try:
            importlib.import_module(f"weightsmith.tasks.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"weightsmith.tasks.{mod}":
                raise


def list_tasks() -> list[str]:
    _ensure_loaded()
    return sorted(_TASKS)


def get_task(name: str) -> type:
    """The task class registered as ``name``. Raises ConfigError listing the known tasks."""
    _ensure_loaded()
    if name not in _TASKS:
        close = difflib.get_close_matches(name, _TASKS, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown task.name '{name}'{hint}; known tasks: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def trainable_families() -> dict[str, str]:
    """Every family whose default task is registered -> that task."""
    from weightsmith.registry import get_family, list_families

    _ensure_loaded()
    return {f: get_family(f).task for f in list_families() if get_family(f).task in _TASKS}


def task_for(family: str, name: str | None = None) -> type:
    """The task class that trains ``family``: ``name`` if given, else the family's default.

    Raises:
        ConfigError: the family has no registered objective, or ``name`` cannot train it; the message
            lists the trainable families.
    """
    from weightsmith.registry import get_family

    fam = get_family(family)
    trainable = trainable_families()
    listing = ", ".join(f"{f} ({t})" for f, t in sorted(trainable.items()))
    if name is None:
        if fam.task is None:
            raise ConfigError(f"model.family='{family}' is a backbone with no training objective of its own; "
                              f"trainable families: {listing}")
        if fam.task not in _TASKS:
            raise ConfigError(f"model.family='{family}' has no training objective yet (task '{fam.task}' is not "
                              f"available); trainable families: {listing}")
        return _TASKS[fam.task]
    cls = get_task(name)
    if name != fam.task and fam.task not in getattr(cls, "also_trains", ()):
        raise ConfigError(f"task.name='{name}' cannot train model.family='{family}' (it trains with "
                          f"'{fam.task}'); trainable families: {listing}")
    return cls
