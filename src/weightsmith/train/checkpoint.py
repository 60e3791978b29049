"""Checkpoints and run directories.

A run directory::

    config.toml        resolved config ([data], [model], [train], [sample])
    manifest.json      data manifest, package version, git commit, torch version, machine
    tokenizer.json     the run's tokenizer (weightsmith.data.tokenizers)
    metrics.jsonl      one JSON object per logged step
    events.jsonl       skipped steps and rewinds, when there were any (weightsmith.train.stability)
    eval.json          final evaluation
    samples.txt        generated text
    checkpoints/step_000500/
        model.safetensors   weights (shared tensors such as tied embeddings stored once)
        train_state.pt      optimizer, RNG and data-position state (tensors and plain data only)
        meta.json           step and the sha256 of each file above; written last
        .metadata, __R_0.distcp   torchrun runs only: DCP files of model and optimizer (every rank
                            writes its own; weightsmith.train.distributed), train_state.pt then
                            holds no optimizer

A checkpoint is written into ``checkpoints/.tmp-*``, every file is fsynced, and the directory is renamed
into place, so a reader never sees a half-written checkpoint. Re-saving a step moves the old one to
``.old-*`` before the rename, and rotation renames a checkpoint to ``.del-*`` before deleting it, so a
process killed at any point leaves every listed checkpoint complete; :func:`recover_checkpoints`
(run on resume) puts back a moved-aside checkpoint whose replacement never arrived and removes the
hidden leftovers. tests/test_kill_during_save.py kills the writer at every one of these points.
Loading verifies the hashes in ``meta.json``. Nothing is ever unpickled beyond tensors and plain
containers: weights come from safetensors and ``train_state.pt`` is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from weightsmith.data.prepare import sha256_file
from weightsmith.errors import CheckpointError
from weightsmith.fsio import atomic_write_text, fsync_file, fsync_path  # noqa: F401  (re-exported)
from weightsmith.train.faults import checkpoint_point

CKPT_DIR = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "train_state.pt"
META = "meta.json"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any] | None,
                    keep: int = 0, *, write_extra: Callable[[Path], list[str]] | None = None) -> Path:
    """Write ``checkpoints/step_{step:06d}`` atomically; keep only the newest ``keep`` (0 = all).

    ``write_extra(tmp)``, when given, writes more files into the temporary directory and returns their
    names; they are fsynced, hashed into ``meta.json`` and renamed into place with the rest (the DCP
    files of a distributed run, weightsmith.train.distributed)."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    point = checkpoint_point  # test-only kill points (weightsmith.train.faults); no-ops in real runs
    try:
        point("tmp dir made")
        save_model(model, str(tmp / WEIGHTS))
        point("weights written")
        files = [WEIGHTS]
        if state is not None:
            torch.save(state, tmp / STATE)
            files.append(STATE)
            point("train state written")
        if write_extra is not None:
            files.extend(write_extra(tmp))
        for name in files:
            fsync_file(tmp / name)
        point("files fsynced")
        meta = {"step": step, "files": {n: sha256_file(tmp / n) for n in files}}
        atomic_write_text(tmp / META, json.dumps(meta, indent=2))
        point("meta written")
        fsync_path(tmp)
        point("tmp dir fsynced")
        if final.exists():  # re-saving a step: move the old one aside first, delete it only after the rename
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=root))
            os.replace(final, old / final.name)
            point("old step moved aside")
            os.replace(tmp, final)
            point("renamed into place")
            fsync_path(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            point("renamed into place")
            fsync_path(root)
        point("root fsynced")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            hidden = Path(tempfile.mkdtemp(prefix=".del-", dir=root))
            os.replace(old, hidden / old.name)  # out of the listing at once; a kill mid-delete leaves hidden files
            point("old checkpoint hidden")
            shutil.rmtree(hidden, ignore_errors=True)
            point("old checkpoint deleted")
    return final


def recover_checkpoints(run_dir: Path, log=print) -> None:
    """Repair what a process killed inside :func:`save_checkpoint` can leave in ``checkpoints/``.

    A re-saved step whose old copy was moved to ``.old-*`` but whose new copy never got renamed into
    place is moved back; then every hidden ``.tmp-*``, ``.old-*`` and ``.del-*`` entry is removed."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return
    for aside in sorted(root.glob(".old-*/step_*")):
        if not (root / aside.name).exists():
            os.replace(aside, root / aside.name)
            log(f"restored {root / aside.name}, moved aside by an interrupted re-save")
    for leftover in root.iterdir():
        if leftover.name.startswith((".tmp-", ".old-", ".del-")):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories (temporary ones excluded), oldest first by step number.

    Ordered by the number parsed from ``step_N``, not by name, so ``step_1000000`` sorts after
    ``step_999999``."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(p.name[5:]), p) for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(ckpt: Path) -> dict:
    """Return the checkpoint's meta after checking every file's sha256.

    ``meta.json`` must be an object whose ``"files"`` maps each file name (a plain name inside the
    checkpoint directory) to its sha256 hex digest, with ``model.safetensors`` among them.

    Raises:
        CheckpointError: naming the missing, truncated or corrupt file, or a malformed ``meta.json``.
    """
    meta_path = ckpt / META
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: {META} is not valid JSON") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if (not isinstance(files, dict) or WEIGHTS not in files
            or not all(isinstance(n, str) and isinstance(d, str) and n == Path(n).name and n not in ("", ".", "..")
                       for n, d in files.items())):
        raise CheckpointError(f"checkpoint {meta_path} is malformed: it needs \"files\" mapping {WEIGHTS} "
                              "(and any other file) to its sha256; delete the checkpoint or restore it")
    for name, digest in files.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt or truncated (sha256 mismatch)")
    return meta


def latest_good_checkpoint(run_dir: Path, log=print) -> Path | None:
    """Newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    return None


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load verified safetensors weights into ``model`` (strict).

    Raises:
        CheckpointError: if the file is corrupt or does not match the model.
    """
    verify_checkpoint(ckpt)
    try:
        missing, unexpected = load_model(model, str(ckpt / WEIGHTS), strict=False)
    except Exception as e:  # safetensors raises several types for a bad header
        raise CheckpointError(f"cannot read {ckpt / WEIGHTS}: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / WEIGHTS} does not match the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")


def load_train_state(ckpt: Path) -> dict[str, Any]:
    """``train_state.pt`` read with ``weights_only=True`` (no arbitrary unpickling)."""
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot safely load {ckpt / STATE}: {e.__class__.__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


@dataclass
class LoadedRun:
    """A run directory opened for evaluation or generation."""

    run_dir: Path
    config: dict
    model: torch.nn.Module
    tokenizer: Any
    checkpoint: Path


def load_run(run_dir: str | Path, device: str = "cpu", checkpoint: Path | None = None, *,
             model_overrides: dict | None = None) -> LoadedRun:
    """Open ``run_dir``: config, tokenizer, and the newest checkpoint's weights.

    ``model_overrides`` replace ``[model]`` keys before the model is built, for changes that leave the
    weights' shapes alone, e.g. ``{"max_seq_len": 4096, "rope_scaling": "yarn", "rope_scale": 8.0}`` to
    evaluate a RoPE model past its training context (the returned ``config`` stays the saved one).

    A ``[quantization]`` section in config.toml (written by ``weightsmith quantize``) makes the model a
    quantized one (weightsmith.ship.quantize.apply_quantization) before the weights are loaded; an
    ``[adapter]`` section re-applies the adapters (weightsmith.runs.apply_run_passes).

    Raises:
        CheckpointError: if the directory is not a run, has no checkpoint, or the checkpoint is corrupt.
    """
    from weightsmith.config import load_toml
    from weightsmith.data.tokenizers import load_tokenizer
    from weightsmith.registry import build_config, model_from_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.toml)")
    tree = load_toml(run_dir / "config.toml")
    if not isinstance(tree.get("model"), dict):
        raise CheckpointError(f"{run_dir / 'config.toml'} has no [model] table; it is not a complete run config")
    model_tree = {**tree["model"], **(model_overrides or {})}
    family = model_tree.pop("family", "gpt")
    cfg = build_config(family, model_tree)
    ckpts = list_checkpoints(run_dir)
    if checkpoint is None:
        if not ckpts:
            raise CheckpointError(f"{run_dir} has no checkpoint in {run_dir / CKPT_DIR}")
        checkpoint = ckpts[-1]
    model = model_from_config(family, cfg, device=device)
    if "adapter" in tree:  # an adapted run: the same wrappers as in training, then its weights
        from weightsmith.runs import apply_run_passes

        apply_run_passes(model, tree)
    if "quantization" in tree:  # a quantized run: same model, quantized layers swapped in before loading
        from weightsmith.ship.quantize import apply_quantization

        q = tree["quantization"]
        apply_quantization(model, q["method"], q.get("group_size") or 64)
    load_weights(model, checkpoint)
    model.eval()
    tokenizer = load_tokenizer(run_dir) if (run_dir / "tokenizer.json").is_file() else None  # None: not text
    return LoadedRun(run_dir, tree, model, tokenizer, checkpoint)
