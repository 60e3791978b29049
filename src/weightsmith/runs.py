"""Run directories and the data they were trained on.

``eval``, ``quantize`` (its val_bpb and its GPTQ calibration windows) and ``train --resume`` rebuild the
dataset from the run's ``config.toml`` ``[data]`` section. That section names a corpus, not its
contents: a local corpus file can change after training, and the rebuilt data would then silently be
other text. :func:`check_run_data` ties the rebuilt data to the run, in this order:

1. text: ``data.manifest["text_sha256"]`` (sha256 of the corpus text, UTF-8) must equal
   ``manifest.json["data"]["text_sha256"]`` written at training time;
2. tokenizer: the sha256 of the rebuilt tokenizer's JSON (:func:`tokenizer_sha256`) must equal that of
   the run's ``tokenizer.json``;
3. shards: the sha256 of ``train.bin`` and ``val.bin`` must equal those in the run's manifest (same
   text and tokenizer but other token ids means the tokenizer code changed since training).

Older runs. A run without ``manifest.json``, or whose manifest has no ``data.text_sha256``, is checked
on its tokenizer only. That catches most changes for ``char`` and ``bpe`` tokenizers (their alphabet and
merges come from the text) but none for ``byte``, whose tokenizer is the same for every text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from weightsmith.data.prepare import DataConfig, PreparedData, prepare
from weightsmith.data.tokenizers import TOKENIZER_FILE
from weightsmith.errors import CheckpointError, DataError

MANIFEST = "manifest.json"


def tokenizer_sha256(obj: dict[str, Any]) -> str:
    """sha256 of a tokenizer's JSON (``Tokenizer.to_json()``), canonical: sorted keys, no whitespace."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable or not valid JSON ({e.__class__.__name__})") from None


def check_run_data(run_dir: Path, data: PreparedData) -> None:
    """Raise DataError unless ``data`` (rebuilt from ``run_dir``'s config) is what the run was trained on.

    Compares the corpus text sha256, the tokenizer and the shard hashes with ``run_dir/manifest.json``
    and ``run_dir/tokenizer.json`` (see the module docstring; runs without a manifest are checked on
    their tokenizer only). Reads only small JSON files; the shards were already hashed when ``data``
    was loaded.

    Raises:
        DataError: one line naming the file, the expected hash (from the run) and the one found.
    """
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    trained: dict = {}
    if manifest_path.is_file():
        manifest = _read_json(manifest_path)
        trained = manifest.get("data") if isinstance(manifest, dict) else None
        if not isinstance(trained, dict):
            raise DataError(f"{manifest_path} has no \"data\" section; it is not a run manifest")
    source = data.manifest.get("source", data.directory)
    expected = trained.get("text_sha256")
    found = data.manifest.get("text_sha256")
    if expected is not None and found != expected:
        raise DataError(f"corpus {source} changed since {run_dir} was trained: text sha256 expected {expected} "
                        f"(from {manifest_path}), found {found}; restore that corpus or train a new run")

    tok_path = run_dir / TOKENIZER_FILE
    if not tok_path.is_file():
        raise DataError(f"{tok_path} is missing; every run directory has the tokenizer it was trained with")
    expected = tokenizer_sha256(_read_json(tok_path))
    found = tokenizer_sha256(data.tokenizer.to_json())
    if found != expected:
        raise DataError(f"tokenizer rebuilt from corpus {source} is not the one {run_dir} was trained with: "
                        f"tokenizer sha256 expected {expected} (from {tok_path}), found {found} (in "
                        f"{data.directory / TOKENIZER_FILE}); restore that corpus or train a new run")

    for name, info in (trained.get("shards") or {}).items():
        mine = data.manifest.get("shards", {}).get(name, {})
        if isinstance(info, dict) and "sha256" in info and mine.get("sha256") != info["sha256"]:
            raise DataError(f"shard {data.directory / mine.get('file', name)} holds other {name} tokens than "
                            f"{run_dir} was trained on: sha256 expected {info['sha256']} (from {manifest_path}), "
                            f"found {mine.get('sha256')}; the tokenizer code changed since training")


def prepare_run_data(run_dir: Path, config: dict, log=lambda *a: None) -> PreparedData:
    """Rebuild (or load from cache) the dataset of ``config["data"]`` and :func:`check_run_data` it.

    Args:
        config: the run's parsed ``config.toml``.

    Raises:
        CheckpointError: config.toml has no ``[data]`` table. ConfigError: a bad ``[data]`` key.
        DataError: the data cannot be prepared or is not what the run was trained on.
    """
    from weightsmith.config import from_dict

    section = config.get("data")
    if not isinstance(section, dict):
        raise CheckpointError(f"{Path(run_dir) / 'config.toml'} has no [data] table; it is not a complete run")
    fixed = None  # a run started with train.init_from keeps its source's tokenizer (weightsmith.train.init_from)
    if (config.get("train") or {}).get("init_from") or section.get("tokenizer_from"):
        from weightsmith.data.tokenizers import load_tokenizer

        fixed = load_tokenizer(Path(run_dir))
    data = prepare(from_dict(DataConfig, section, "data"), log=log, tokenizer=fixed)
    check_run_data(run_dir, data)
    return data


def open_task(run_dir: Path, config: dict, log=lambda *a: None):
    """The run's task (from ``config.toml``'s ``[task]``, default the family's), set up on the run's data
    and checked against it, for evaluation after training. No sample is generated by its ``finish``.

    Raises:
        ConfigError / DataError: as :func:`prepare_run_data`, for every task's data.
    """
    from weightsmith.recipe import recipe_from_tree

    if not isinstance(config.get("data"), dict):
        raise CheckpointError(f"{Path(run_dir) / 'config.toml'} has no [data] table; it is not a complete run")
    recipe = recipe_from_tree(config, name=Path(run_dir).name)
    task = recipe.task_cls(recipe.task, recipe.data, recipe.train, None)
    task.setup(Path(run_dir), resume=True, log=log)
    return task


def apply_run_passes(model, config: dict):
    """Re-apply the structural passes recorded in a run's ``config.toml`` to a freshly built ``model``, in
    place, before its checkpoint is loaded: ``[adapter]`` (LoRA / DoRA / QLoRA wrappers, weightsmith.adapters),
    so the checkpoint's keys (``...q_proj.base.weight``, ``...q_proj.lora_A``) match. ``[quantization]``
    is applied by weightsmith.train.checkpoint.load_run itself. Returns ``model``.

    Raises:
        ConfigError: a bad ``[adapter]`` section (one line naming the key).
    """
    section = config.get("adapter")
    if section is None:
        return model
    from weightsmith.adapters import apply_adapters
    from weightsmith.config import from_dict
    from weightsmith.errors import ConfigError
    from weightsmith.recipe import AdapterConfig

    if not isinstance(section, dict):
        raise ConfigError("[adapter] in config.toml must be a table")
    return apply_adapters(model, from_dict(AdapterConfig, section, "adapter"))
