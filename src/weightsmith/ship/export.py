"""Export a run directory to a format other tools load, written atomically.

    weightsmith export RUN_DIR --format hf|gguf|onnx|peft --out DIR [--dtype f32|f16|bf16|q8_0|q4_0]

=======  ==========================  ==============================================================
format   dtypes                      what ``DIR`` holds
=======  ==========================  ==============================================================
hf       f32, f16, bf16              config.json, model.safetensors, tokenizer.json,
                                     tokenizer_config.json (transformers,
                                     vLLM and TGI load it with no custom code; see docs/serving.md)
gguf     f32, f16, q8_0, q4_0        model.gguf (llama.cpp; arch ``llama`` or ``gpt2``; families
                                     ``mamba2`` and ``mamba``: archs ``mamba2``, ``mamba``)
onnx     f32                         model.onnx (input_ids (B, T) -> logits (B, T, V)), tokenizer.json;
                                     image classifiers: images -> logits, labels.json; ``unet``
                                     runs: (x, t[, y]) -> prediction with the EMA weights, labels.json
peft     f32                         adapter_config.json, adapter_model.safetensors: the adapters of
                                     a run with ``[adapter]`` in peft's LoRA format for the base's
                                     transformers model, ``adapter.train_modules`` as peft's
                                     ``modules_to_save`` (weightsmith.adapters.save_peft)
=======  ==========================  ==============================================================

Every export also writes ``export.json`` (format, dtype, source run and checkpoint).

Atomicity: the export is written into a temporary directory ``.<name>.tmp-*`` beside ``DIR``, every
file is fsynced, and the directory is renamed to ``DIR`` last, so a half-written export never looks
complete. An existing ``DIR`` is never overwritten.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from weightsmith.errors import CheckpointError, ConfigError, DataError, WeightsmithError
from weightsmith.train.checkpoint import fsync_path

FORMATS: dict[str, tuple[str, ...]] = {
    "hf": ("f32", "f16", "bf16"),
    "gguf": ("f32", "f16", "q8_0", "q4_0"),
    "onnx": ("f32",),
    "peft": ("f32",),
}
DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
EXPORT_META = "export.json"
# the optional packages each format imports, all in the ``interop`` extra
INTEROP_MODULES: dict[str, tuple[str, ...]] = {"hf": (), "gguf": ("gguf",), "onnx": ("onnx", "onnxscript"),
                                               "peft": ()}
INTEROP_HINT = "pip install 'weightsmith[interop]'"


# the GPTConfig values a stock architecture can express; ONNX runs our own graph and takes them all
GPT_SUPPORTED: dict[str, dict[str, tuple[str, ...]]] = {
    "hf": {"pos": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "rope_scaling": ("none",)},
    "gguf": {"pos": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "rope_scaling": ("none",)},
}
_FORMAT_NAMES = {"hf": "Hugging Face", "gguf": "GGUF", "onnx": "ONNX", "peft": "peft"}
# the language-model families each format can express (other formats: gpt only)
EXPORT_FAMILIES: dict[str, tuple[str, ...]] = {"gguf": ("gpt", "mamba2", "mamba"), "hf": ("gpt", "mamba2", "mamba")}


def check_gpt_options(cfg: object, fmt: str) -> None:
    """Raise ConfigError (one line, naming the field and the supported values) for the first GPTConfig
    option that ``fmt`` cannot express, e.g. ALiBi, DyT or YaRN for Hugging Face and GGUF."""
    for name, values in GPT_SUPPORTED.get(fmt, {}).items():
        value = getattr(cfg, name, values[0])
        if value not in values:
            raise ConfigError(f"model.{name}={value!r} cannot be exported to {_FORMAT_NAMES[fmt]}; "
                              f"supported: {', '.join(repr(v) for v in values)}")


def check_export_args(fmt: str, dtype: str) -> None:
    """Raise WeightsmithError (one line) unless ``fmt`` supports ``dtype``."""
    if fmt not in FORMATS:
        raise WeightsmithError(f"--format {fmt!r} is not supported; choose one of {sorted(FORMATS)}")
    if dtype not in DTYPES:
        raise WeightsmithError(f"--dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
    if dtype not in FORMATS[fmt]:
        raise WeightsmithError(f"--format {fmt} does not support --dtype {dtype}; "
                               f"{fmt} supports {', '.join(FORMATS[fmt])}")


def import_interop(module: str, fmt: str):
    """Import the optional ``module`` that ``--format fmt`` needs and return it.

    Raises:
        WeightsmithError: if it is not installed, naming the extra that provides it.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise WeightsmithError(f"--format {fmt} needs the {module!r} package, which is not installed; "
                               f"install it with: {INTEROP_HINT}") from None


def check_new_output(out: str | Path, what: str = "an export") -> Path:
    """Check, before any work, that ``out`` can become a new directory; returns it as a Path.

    Raises:
        CheckpointError: ``out`` exists (as a file or a directory), or its nearest existing ancestor is a
            file or not writable.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        kind = "directory" if out.is_dir() else "file"
        raise CheckpointError(f"--out {out} already exists (a {kind}); {what} never overwrites, choose a new path")
    parent = next(p for p in out.absolute().parents if p.exists())  # the nearest existing ancestor
    if not parent.is_dir():
        raise CheckpointError(f"--out {out}: {parent} is a file, not a directory; choose a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out {out}: {parent} is not writable; choose a path you can write to")
    return out


@contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success fsync it and rename it to ``out``.

    On any exception the temporary directory is removed and ``out`` is left untouched.

    Raises:
        CheckpointError: if ``out`` already exists (before writing, or when renaming).
    """
    out = check_new_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):
            f.chmod(0o755 if f.is_dir() else 0o644)  # writers differ (safetensors uses 0600)
            fsync_path(f)
        tmp.chmod(0o755)  # mkdtemp makes 0700
        fsync_path(tmp)
        if out.exists():  # someone else created it while we were writing
            raise CheckpointError(f"--out {out} appeared while exporting; not overwriting it")
        os.rename(tmp, out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_run(run_dir: str | Path, fmt: str, out: str | Path, dtype: str = "f32") -> Path:
    """Export the newest checkpoint of ``run_dir`` to ``out`` as ``fmt`` with weights in ``dtype``.

    Returns:
        ``out`` as a Path, complete.

    Every check below runs before the checkpoint is loaded.

    Raises:
        WeightsmithError: unsupported format/dtype combination, or the format's optional packages (the
            ``interop`` extra) are not installed.
        CheckpointError: ``out`` exists (file or directory) or lies under a file, or ``run_dir`` is not a
            run / its checkpoint is corrupt.
        DataError: the run has no ``tokenizer.json``.
        ConfigError: the model cannot be expressed in ``fmt`` (names the field).
    """
    from weightsmith.data.tokenizers import TOKENIZER_FILE
    from weightsmith.train.checkpoint import load_run

    check_export_args(fmt, dtype)
    run_dir, out = Path(run_dir), check_new_output(out)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.toml)")
    if (run_dir / "labels.json").is_file():  # an image classifier: ONNX only
        return _export_classifier(run_dir, fmt, out)
    if not (run_dir / TOKENIZER_FILE).is_file():
        raise DataError(f"{run_dir / TOKENIZER_FILE} is missing; export needs the run's tokenizer")
    family = run_dir_family(run_dir)
    if family not in EXPORT_FAMILIES.get(fmt, ("gpt",)):
        supported = EXPORT_FAMILIES.get(fmt, ("gpt",))
        raise ConfigError(f"model.family={family!r} cannot be exported to {_FORMAT_NAMES[fmt]}; "
                          f"supported: {', '.join(repr(f) for f in supported)}")
    if fmt == "peft":
        return _export_peft(run_dir, out)
    exporter = _exporter(fmt)
    run = load_run(run_dir)
    if "adapter" in run.config:  # exporters take plain weights: the adapters merged in (weightsmith.adapters)
        from weightsmith.adapters import merge_adapters

        merge_adapters(run.model)
    if "quantization" in run.config:  # exporters take float weights: dequantize (the rounding error stays)
        from weightsmith.ship.quantize import dequantize_model

        dequantize_model(run.model)
    with atomic_output_dir(out) as tmp:
        exporter(run.model, run.tokenizer, tmp, dtype)
        meta = {"format": fmt, "dtype": dtype, "run_dir": str(run_dir.resolve()),
                "checkpoint": run.checkpoint.name}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _export_peft(run_dir: Path, out: Path) -> Path:
    """The adapters of an ``[adapter]`` run as a peft LoRA adapter (weightsmith.adapters.save_peft), for
    the transformers model that ``--format hf`` makes of the unadapted base. A ``qlora`` run's adapters
    were trained on the NF4-rounded base, so they fit that base, not the float one, exactly. Modules
    trained in full (``adapter.train_modules``) are saved whole as peft's ``modules_to_save``.

    Raises:
        ConfigError: the run has no ``[adapter]``, or peft's transformers model cannot hold its adapted
            layers or its modules trained in full (a part of a fused HF tensor, say).
    """
    from weightsmith.adapters import matches, save_peft
    from weightsmith.train.checkpoint import load_run

    run = load_run(run_dir)
    if "adapter" not in run.config:
        raise ConfigError(f"{run_dir} has no [adapter] section: nothing to export as peft; use --format hf")
    patterns = list(run.config["adapter"].get("train_modules") or [])
    full = [n for n, _ in run.model.named_modules() if n and matches(n, patterns)]
    with atomic_output_dir(out) as tmp:
        save_peft(run.model, run.model.config, tmp, dropout=float(run.config["adapter"].get("dropout", 0.0)),
                  train_modules=full)
        meta = {"format": "peft", "dtype": "f32", "run_dir": str(run_dir.resolve()),
                "checkpoint": run.checkpoint.name, "method": run.config["adapter"].get("method", "lora")}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _export_classifier(run_dir: Path, fmt: str, out: Path) -> Path:
    """An image-classifier run -> ONNX graph + labels.json (weightsmith.ship.export_onnx); a ``unet`` run
    -> the denoiser's graph (:func:`_export_denoiser`)."""
    from weightsmith.ship.export_onnx import export_onnx_classifier
    from weightsmith.train.checkpoint import load_run

    family = run_dir_family(run_dir)
    if fmt != "onnx":
        raise ConfigError(f"--format {fmt}: image models ({family}) export to onnx only")
    _exporter(fmt)
    if family == "unet":
        return _export_denoiser(run_dir, out)
    if family == "vae":
        raise ConfigError("model.family='vae' cannot be exported to ONNX; supported image families: the "
                          "classifiers and 'unet'")
    run = load_run(run_dir)
    labels = json.loads((run_dir / "labels.json").read_text())
    with atomic_output_dir(out) as tmp:
        export_onnx_classifier(run.model, labels, tmp)
        meta = {"format": fmt, "dtype": "f32", "run_dir": str(run_dir.resolve()), "checkpoint": run.checkpoint.name}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _export_denoiser(run_dir: Path, out: Path) -> Path:
    """A ``unet`` run (ddpm or flow-matching) -> ONNX graph of one denoiser forward with the EMA weights that
    sampling uses (weightsmith.ship.export_onnx.export_onnx_denoiser) + labels.json."""
    from weightsmith.ship.export_onnx import export_onnx_denoiser
    from weightsmith.ship.sample import open_generative_run
    from weightsmith.train.checkpoint import list_checkpoints

    task, model = open_generative_run(run_dir)
    labels = json.loads((run_dir / "labels.json").read_text())
    labels["task"] = task.name
    with atomic_output_dir(out) as tmp, task.sampling_weights(model):
        export_onnx_denoiser(model, labels, tmp)
        meta = {"format": "onnx", "dtype": "f32", "run_dir": str(run_dir.resolve()),
                "checkpoint": list_checkpoints(run_dir)[-1].name,
                "weights": "ema" if task.ema is not None else "raw"}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def run_dir_family(run_dir: Path) -> str:
    from weightsmith.config import load_toml

    return load_toml(Path(run_dir) / "config.toml").get("model", {}).get("family", "gpt")


def _exporter(fmt: str):
    for module in INTEROP_MODULES[fmt]:  # fail with the install hint before any work
        import_interop(module, fmt)
    if fmt == "hf":
        from weightsmith.ship.export_hf import export_hf

        return export_hf
    if fmt == "gguf":
        from weightsmith.ship.export_gguf import export_gguf

        return export_gguf
    from weightsmith.ship.export_onnx import export_onnx

    return export_onnx
