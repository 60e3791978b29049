"""``[train] init_from``: start a run from existing weights (continued pretraining, full fine-tuning).

The source is a run directory of ours (``config.toml``; its newest checkpoint) or a local Hugging Face
directory (``config.json``; converted by weightsmith.ship.hf_convert). What the new run takes from it:

- the model config. A recipe ``[model]`` key may change only fields that leave every weight's shape
  alone (``dropout``, ``rope_theta``, a RoPE model's ``max_seq_len``...); one that changes a shape, or a
  ``family`` other than the source's, is a ConfigError naming the field;
- the weights, copied into the freshly built model before the optimizer exists, so step counter,
  optimizer state and schedule start fresh;
- the tokenizer: the data is tokenized with the source's ``tokenizer.json`` (no new one is trained), and
  ``data.tokenizer`` (and for bpe ``data.vocab_size``) must agree with it.

``manifest.json`` gets ``init_from``: the resolved path, the kind of source, the checkpoint, and the
sha256 of every weight file read. ``--resume`` of such a run takes config and tokenizer from the run
directory itself, so the source is not read again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import ConfigError


@dataclass
class InitSource:
    """Weights and provenance of an ``init_from`` source."""

    family: str
    config: Any
    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, Any]

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the source weights into ``model`` (strict; same shapes by construction)."""
        model.load_state_dict(self.state_dict, strict=True)


def source_kind(path: str | Path) -> str:
    """``"run"`` (has config.toml) or ``"huggingface"`` (has config.json).

    Raises:
        ConfigError: the path is neither, naming ``train.init_from``.
    """
    p = Path(path)
    if (p / "config.toml").is_file():
        return "run"
    if (p / "config.json").is_file():
        return "huggingface"
    why = "does not exist" if not p.exists() else "has neither config.toml (a run) nor config.json (Hugging Face)"
    raise ConfigError(f"train.init_from = {str(path)!r} {why}")


def source_family(path: str | Path) -> str | None:
    """The model family an ``init_from`` source holds, read from its config file alone (no weights):
    a run's ``[model] family``, or for Hugging Face the family of its ``model_type`` (a BERT whose
    ``architectures`` name a masked-LM head is ``bert-mlm``). None when the path is not a readable
    source; :func:`open_source` then raises the error that names the field."""
    import json

    p = Path(path)
    try:
        if (p / "config.toml").is_file():
            from weightsmith.config import load_toml

            return load_toml(p / "config.toml").get("model", {}).get("family", "gpt")
        if (p / "config.json").is_file():
            from weightsmith.ship.hf_convert import _FROM_HF

            hf = json.loads((p / "config.json").read_text())
            family = _FROM_HF.get(hf.get("model_type"), (None,))[0]
            if family == "bert" and any(a.endswith("ForMaskedLM") for a in hf.get("architectures") or []):
                return "bert-mlm"
            return family
    except Exception:  # unreadable: open_source reports it with the fix
        return None
    return None


def load_source_tokenizer(path: str | Path):
    """The source's tokenizer: a run's ``tokenizer.json`` (ours), or a Hugging Face ``tokenizer.json``
    wrapped as our ``bpe`` kind (weightsmith.ship.hf_import.tokenizer_from_hf_dir)."""
    from weightsmith.data.tokenizers import load_tokenizer

    if source_kind(path) == "run":
        return load_tokenizer(Path(path))
    from weightsmith.ship.hf_import import tokenizer_from_hf_dir

    return tokenizer_from_hf_dir(Path(path))


def check_tokenizer_matches(tok: Any, data_cfg: Any, path: str) -> None:
    """Raise ConfigError unless ``data.tokenizer`` (and bpe ``data.vocab_size``) describe ``tok``."""
    kind = getattr(data_cfg, "tokenizer", None)
    if kind is not None and kind != tok.kind:
        raise ConfigError(f"data.tokenizer = {kind!r} but the init_from source {path} has a {tok.kind!r} tokenizer; "
                          f"set data.tokenizer = {tok.kind!r} (its tokenizer.json is reused)")
    if tok.kind == "bpe" and getattr(data_cfg, "vocab_size", tok.vocab_size) != tok.vocab_size:
        raise ConfigError(f"data.vocab_size = {data_cfg.vocab_size} but the init_from source {path} has a bpe "
                          f"tokenizer of {tok.vocab_size} ids; set data.vocab_size = {tok.vocab_size}")


def run_tokenizer(train_cfg: Any, data_cfg: Any, run_dir: Path, resume: bool):
    """The fixed tokenizer of a run with ``train.init_from`` or ``data.tokenizer_from`` (None without):
    the run's own ``tokenizer.json`` when resuming or evaluating, else the source's, checked against
    ``data_cfg``."""
    path = getattr(train_cfg, "init_from", None) or getattr(data_cfg, "tokenizer_from", None)
    if not path:
        return None
    from weightsmith.data.tokenizers import TOKENIZER_FILE, load_tokenizer

    if resume and (Path(run_dir) / TOKENIZER_FILE).is_file():
        return load_tokenizer(Path(run_dir))
    if Path(path).is_file():  # data.tokenizer_from naming a tokenizer.json of ours
        tok = load_tokenizer(Path(path))
    else:
        tok = load_source_tokenizer(path)
    check_tokenizer_matches(tok, data_cfg, path)
    return tok


def _shapes(family: str, cfg: Any) -> dict[str, tuple[int, ...]]:
    from weightsmith.registry import model_from_config

    model = model_from_config(family, cfg, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def open_source(path: str, recipe: Any) -> InitSource:
    """Read the source's config and weights and merge the recipe's ``[model]`` into its config.

    Raises:
        ConfigError: family mismatch, or a ``[model]`` key that changes a weight shape (named).
        CheckpointError: the source has no intact checkpoint or its weights do not match its config.
    """
    from weightsmith.config import to_dict
    from weightsmith.data.prepare import sha256_file
    from weightsmith.registry import build_config

    p = Path(path)
    if source_kind(p) == "run":
        from weightsmith.train.checkpoint import WEIGHTS, load_run

        run = load_run(p)
        if "quantization" in run.config:
            raise ConfigError(f"train.init_from = {path!r} is a quantized run; start from its unquantized source")
        family = run.config["model"].get("family", "gpt")
        cfg, model = run.model.config, run.model
        prov = {"kind": "run", "checkpoint": run.checkpoint.name,
                "weights_sha256": {WEIGHTS: sha256_file(run.checkpoint / WEIGHTS)}}
    else:
        import json

        from weightsmith.ship.hf_convert import load_hf_checkpoint

        family, cfg, model = load_hf_checkpoint(p)
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("pytorch_model*.bin"))
        prov = {"kind": "huggingface", "model_type": json.loads((p / "config.json").read_text()).get("model_type"),
                "weights_sha256": {f.name: sha256_file(f) for f in files}}
    if recipe.family != family:
        raise ConfigError(f"model.family = {recipe.family!r} but the init_from source {path} is a {family!r} model; "
                          f"set [model] family = {family!r}")
    source_fields = to_dict(cfg)
    asked = {k: v for k, v in recipe.model.items() if k != "preset"}
    merged = build_config(family, {**source_fields, **asked})
    if asked:
        want, have = _shapes(family, merged), _shapes(family, cfg)
        if want != have:
            changed = [k for k, v in asked.items() if source_fields.get(k) != v]
            for k in changed:  # the first key that alone changes a shape is the one to name
                if _shapes(family, build_config(family, {**source_fields, k: asked[k]})) != have:
                    raise ConfigError(f"model.{k} = {asked[k]!r} disagrees with the init_from source {path} "
                                      f"({k} = {source_fields.get(k)!r}) and changes the weights' shapes; "
                                      f"remove it from [model] (the source's config is used)")
            raise ConfigError(f"model keys {sorted(changed)} disagree with the init_from source {path} and change "
                              "the weights' shapes; remove them from [model]")
    sd = {k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    prov = {"path": str(p.resolve()), **prov}
    return InitSource(family, merged, sd, prov)


def init_model(path: str, recipe: Any, run_dir: Path, resume: bool) -> tuple[Any, InitSource | None]:
    """(model config, source) for the trainer. On ``resume`` the run's own config.toml ``[model]`` is the
    config and the source is not read (None): the checkpoint holds the weights."""
    if resume:
        from weightsmith.config import load_toml
        from weightsmith.registry import build_config

        tree = dict(load_toml(Path(run_dir) / "config.toml")["model"])
        return build_config(tree.pop("family", "gpt"), tree), None
    src = open_source(path, recipe)
    return src.config, src
