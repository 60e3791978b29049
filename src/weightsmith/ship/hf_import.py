"""``weightsmith import``: a local Hugging Face directory -> an ordinary weightsmith run directory.

Input: ``config.json``, weights (``*.safetensors`` or ``pytorch_model*.bin``) and the model's own
``tokenizer.json`` (a Hugging Face ``tokenizers`` file). Supported ``model_type``: those of
weightsmith.ship.hf_convert (gpt2, llama, mistral as llama-shaped configs, mixtral, bert, t5, mamba,
mamba2). Output, written into a temporary directory beside ``--out`` and renamed into place::

    config.toml      [model] family + our fields; [train] init_from = the HF directory (so the data
                     of eval / train is tokenized with the model's tokenizer); [data] from the
                     command line's --data.* overrides (default corpus shakespeare)
    tokenizer.json   ours: {"kind": "bpe", "vocab_size": V, "hf": <the model's tokenizer.json>}
    manifest.json    "imported_from": path, model_type, architectures, sha256 of every weight file
    checkpoints/step_000000/model.safetensors, meta.json   weights in the checkpoint dtype

``eval``, ``generate``, ``export``, ``quantize`` and ``train`` (``init_from = RUN``) then treat it as
any run.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError, ConfigError, DataError


def tokenizer_from_hf_dir(hf_dir: Path):
    """The model's ``tokenizer.json`` as our :class:`~weightsmith.data.tokenizers.BPETokenizer` (which wraps
    any ``tokenizers.Tokenizer``; ids and text are the model's, special tokens are not added).

    Raises:
        DataError: the file is missing or not a ``tokenizers`` file.
    """
    from tokenizers import Tokenizer

    from weightsmith.data.tokenizers import BPETokenizer

    path = Path(hf_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path} is missing; weightsmith import needs the model's own tokenizer.json "
                        "(a Hugging Face tokenizers file)")
    try:
        return BPETokenizer(Tokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a plain Exception for a bad file
        raise DataError(f"{path} is not a Hugging Face tokenizers file ({str(e).splitlines()[0][:120]})") from None


def _tree(family: str, cfg: Any, tok: Any, hf_dir: Path, overrides: list[str]) -> dict[str, Any]:
    from weightsmith.config import apply_overrides, to_dict
    from weightsmith.recipe import recipe_from_tree
    from weightsmith.tasks import task_for
    from weightsmith.train.config import SampleConfig, TrainConfig

    bad = [o for o in overrides if o.lstrip("-").split(".", 1)[0] in ("model", "task")]
    if bad:
        raise ConfigError(f"import takes no --model.* or --task.* overrides (the model is the checkpoint's); got "
                          f"{' '.join(bad)}")
    tree = {"task": {"name": task_for(family, None).name},
            "data": {"corpus": "shakespeare", "tokenizer": "bpe", "vocab_size": tok.vocab_size},
            "model": {"family": family, **to_dict(cfg)},
            "train": to_dict(TrainConfig(init_from=str(hf_dir.resolve()))), "sample": to_dict(SampleConfig())}
    tree = apply_overrides(tree, overrides)
    recipe = recipe_from_tree(tree)  # unknown keys and bad values fail here, before anything is written
    return recipe.to_tree(cfg)


def import_hf(hf_dir: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Import the Hugging Face directory ``hf_dir`` into the new run directory ``out`` (see module doc).

    Args:
        overrides: dotted ``--data.key=value`` / ``--train.key=value`` / ``--sample.key=value`` set in the
            written config.toml (e.g. the corpus that ``weightsmith eval`` measures).

    Raises:
        CheckpointError: ``out`` exists; ``hf_dir`` is missing, has no config.json, or its weights do not
            match it. ConfigError: unsupported ``model_type`` (the supported ones are listed) or option.
        DataError: no usable ``tokenizer.json``. Nothing is written in any of these cases.
    """
    import weightsmith
    from weightsmith.config import dump_toml
    from weightsmith.data.prepare import sha256_file
    from weightsmith.data.tokenizers import save_tokenizer
    from weightsmith.fsio import atomic_write_text
    from weightsmith.ship.export import atomic_output_dir, check_new_output
    from weightsmith.ship.hf_convert import load_hf_checkpoint
    from weightsmith.train.checkpoint import save_checkpoint

    hf_dir = Path(hf_dir)
    check_new_output(out, "import")
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir} does not exist or is not a directory (a Hugging Face checkpoint "
                              "directory with config.json)")
    family, cfg, model = load_hf_checkpoint(hf_dir)
    for p in model.parameters():  # the converter's splits (GPT-2's fused c_attn) are views; own storage
        p.data = p.data.clone()
    tok = tokenizer_from_hf_dir(hf_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise DataError(f"{hf_dir / 'tokenizer.json'} has {tok.vocab_size} ids but config.json vocab_size is "
                        f"{cfg.vocab_size}")
    tree = _tree(family, cfg, tok, hf_dir, list(overrides or []))
    hf_config = json.loads((hf_dir / "config.json").read_text())
    files = sorted(hf_dir.glob("*.safetensors")) or sorted(hf_dir.glob("pytorch_model*.bin"))
    manifest = {"weightsmith": weightsmith.__version__, "task": tree["task"]["name"], "data": {},
                "created": datetime.now().isoformat(timespec="seconds"),
                "imported_from": {"path": str(hf_dir.resolve()), "model_type": hf_config.get("model_type"),
                                  "architectures": hf_config.get("architectures"),
                                  "weights_sha256": {f.name: sha256_file(f) for f in files}}}
    with atomic_output_dir(out) as tmp:
        atomic_write_text(tmp / "config.toml", dump_toml(tree))
        save_tokenizer(tok, tmp)
        save_checkpoint(tmp, 0, model.eval(), None)
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
    return Path(out)
