"""``weightsmith inspect``: parameters, FLOPs and memory of a preset, recipe or run, per module.

:func:`inspect_model` resolves the model, builds it on the meta device (no memory), checks the analytic
parameter count against ``sum(p.numel())`` and returns a plain dict; :func:`format_report` renders it
as text. Shape legend: B batch, T sequence, D = d_model, V = vocab_size.

Image models (configs with ``image_size``) are analysed per image: one token is one image, ``seq_len``
is 1, and every ``*_per_token`` number is per image (see :mod:`weightsmith.analysis.components_vision`).
A ``unet`` denoiser also gets ``sampling`` (:func:`sampling_cost`): the FLOPs of one sample, NFE x
forwards per evaluation x FLOPs per forward, for a sampler and a number of steps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from weightsmith.analysis.components import Row, rows_for
from weightsmith.analysis.components_vision import is_image_config
from weightsmith.analysis.flops import forward_flops, row_flops
from weightsmith.analysis.memory import dtype_bytes, memory_estimate, row_activation_elements
from weightsmith.analysis.params import param_counts
from weightsmith.errors import ConfigError

CONVENTIONS = {
    "flops": "2 FLOPs per multiply-add; matmuls only (linear layers, lm_head, Q K^T and P V); attention "
             "dense over the full context (no causal halving), as FlopCounterMode counts it",
    "training": "training FLOPs = 3 x forward (backward = 2 x forward)",
    "per_token": "per token of the main stream; T5: per target token with a source of the same length; "
                 "image models: one token = one image (T = 1), FLOPs of convolutions and linear layers",
    "six_n": "6N = 6 x active non-embedding parameters (Kaplan et al. 2020), beside the exact count",
    "memory": "bytes, every tensor at --dtype; optimizer states per parameter: adamw 2, sgd 0, sgd-momentum 1; "
              "train peak = weights + buffers + grads + optimizer + activations + backward transient",
}


def _model_section(model: str) -> tuple[str, dict[str, Any]]:
    """``model`` (preset or family name, recipe TOML, or run directory) -> (name, [model] fields)."""
    from weightsmith.config import load_toml

    path = Path(model)
    if path.is_dir():
        if not (path / "config.toml").is_file():
            raise ConfigError(f"{path} is a directory without config.toml (not a run directory)")
        path = path / "config.toml"
    if path.suffix == ".toml" or path.is_file():
        tree = load_toml(path)
        if "model" not in tree:
            raise ConfigError(f"{path}: no [model] section")
        fields = dict(tree["model"])
        _data_decided_fields(fields, tree)
        return str(path), fields
    return model, {"preset": model}


def _data_decided_fields(fields: dict[str, Any], tree: dict[str, Any]) -> None:
    """Fill the [model] fields the data decides where the recipe leaves them out, with the stand-ins of
    the recipe's task (``vocab_size`` = the tokenizer's plus the task's extra ids; ``in_channels,
    image_size, n_classes`` of the image source), as training would before it has the data."""
    from weightsmith.config import from_dict
    from weightsmith.registry import get_family, get_preset
    from weightsmith.tasks import get_task

    family = fields.get("family") or (get_preset(fields["preset"]).family if "preset" in fields else "gpt")
    task_name = tree.get("task", {}).get("name") or get_family(family).task
    if task_name is None:  # a backbone: its config's own defaults
        return
    task_cls = get_task(task_name)
    data_cfg = from_dict(task_cls.data_config_cls, tree.get("data", {}), "data")
    for key, value in task_cls.placeholder_fields(data_cfg).items():
        fields.setdefault(key, value)


def _adapter_section(model: str) -> Any:
    """The recipe's or run's ``[adapter]`` as an AdapterConfig, or None (presets have none)."""
    from weightsmith.config import from_dict, load_toml
    from weightsmith.recipe import AdapterConfig

    path = Path(model)
    path = path / "config.toml" if path.is_dir() else path
    if not (path.suffix == ".toml" and path.is_file()):
        return None
    section = load_toml(path).get("adapter")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [adapter] must be a table")
    return from_dict(AdapterConfig, section, "adapter")


# the samplers of weightsmith.tasks.diffusion and the task each belongs to
SAMPLERS = {"ddim": "ddpm", "ddpm": "ddpm", "euler": "flow-matching", "heun": "flow-matching"}


def sampling_cost(cfg: Any, flops_fwd: float, *, sampler: str, steps: int, guidance: float) -> dict[str, Any]:
    """FLOPs of one sample of a U-Net denoiser with a sampler of :mod:`weightsmith.tasks.diffusion`.

    ``nfe`` = steps (``ddim``, ``ddpm``, ``euler``) or 2 x steps (``heun``: its corrector evaluates at every
    step, the last one included); ``forwards_per_image`` = nfe, x2 with classifier-free guidance (w != 1:
    the conditional and the null label in one batched forward of 2B images); ``flops_per_sample`` =
    forwards_per_image x ``flops_fwd`` (forward FLOPs per image, 2 per multiply-add).

    Raises:
        ConfigError: an unknown sampler, steps < 1, guidance for an unconditional model.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if guidance != 1.0 and not getattr(cfg, "n_classes", 0):
        raise ConfigError(f"guidance={guidance:g} needs a class-conditional model (model.n_classes = 0)")
    nfe = steps * (2 if sampler == "heun" else 1)
    forwards = nfe * (2 if guidance != 1.0 else 1)
    return {"task": SAMPLERS[sampler], "sampler": sampler, "steps": steps, "guidance": guidance, "nfe": nfe,
            "forwards_per_image": forwards, "flops_fwd_per_image": flops_fwd,
            "flops_per_sample": forwards * flops_fwd}


def _sampling_options(model: str, sampler: str | None, steps: int | None,
                      guidance: float | None) -> dict[str, Any]:
    """Sampler, steps and guidance: the given ones, else the recipe's or run's [task] (ddpm or
    flow-matching), else that task's defaults (ddpm's for a preset)."""
    from weightsmith.config import load_toml
    from weightsmith.tasks import get_task

    path = Path(model)
    path = path / "config.toml" if path.is_dir() else path
    task = dict(load_toml(path).get("task", {})) if path.suffix == ".toml" and path.is_file() else {}
    name = task.get("name") if task.get("name") in ("ddpm", "flow-matching") else None
    if name is None:
        name, task = (SAMPLERS[sampler] if sampler in SAMPLERS else "ddpm"), {}
    defaults = get_task(name).config_cls()
    return {"sampler": sampler or task.get("sampler", defaults.sampler),
            "steps": steps or task.get("sample_steps", defaults.sample_steps),
            "guidance": guidance if guidance is not None else task.get("guidance", defaults.guidance)}


def resolve_model(model: str, overrides: list[str] | dict[str, Any] | None = None) -> tuple[str, str, Any]:
    """(display name, family, config) for a preset/family name, recipe TOML or run directory.

    ``overrides`` are ``--model.key=value`` strings or a dict of model fields.

    Raises:
        ConfigError: unknown model (with close matches), unknown field, impossible shape, or an override
            outside ``--model.``.
    """
    from weightsmith.config import apply_overrides
    from weightsmith.registry import resolve

    name, fields = _model_section(model)
    if isinstance(overrides, dict):
        extra = dict(overrides)
    else:
        tree = apply_overrides({}, list(overrides or []))
        other = [k for k in tree if k != "model"]
        if other:
            raise ConfigError(f"inspect takes --model.* overrides only, got --{other[0]}.*")
        extra = tree.get("model", {})
    family = fields.pop("family", None)
    preset = fields.pop("preset", None)
    fam, cfg = resolve(preset or family or "gpt", {**fields, **extra})  # unknown names list close matches
    if family is not None and fam.name != family:
        raise ConfigError(f"model.family='{family}' but preset '{preset}' is of family '{fam.name}'")
    return name, fam.name, cfg


def _summarize_weights(rows: list[Row]) -> dict[str, Any]:
    """{pattern: shape} with expert indices folded: ``experts.*.gate.weight`` -> shape and a count."""
    out: dict[str, Any] = {}
    for row in rows:
        for name, shape in row.weights:
            key = re.sub(r"\.experts\.\d+\.", ".experts.*.", name)
            entry = out.setdefault(key, {"shape": list(shape), "count": 0})
            entry["count"] += 1
    return out


def module_table(rows: list[Row], batch_size: int, seq_len: int, nbytes: int) -> list[dict[str, Any]]:
    """One entry per distinct module; identical layers are folded into ``blocks.*`` with a ``count``.

    Each entry: ``path, kind, weights {name: {shape, count}}, params, flops_fwd_per_token,
    activation_bytes`` (at (B, T), for one instance) and ``count`` (instances), plus ``notes``. Where
    the layers of one path differ (the first block of a ResNet stage, BERT's last norm), the largest
    group of two or more identical ones keeps ``blocks.*`` and every other layer its own path.
    """
    groups: dict[tuple, dict[str, Any]] = {}  # (folded path, signature) -> entry, in order of first use
    for row in rows:
        mm, att = row_flops(row, seq_len)
        entry = {
            "path": re.sub(r"blocks\.\d+", "blocks.*", row.path), "kind": row.kind,
            "weights": {k.removeprefix(row.path + "."): v for k, v in _summarize_weights([row]).items()},
            "params": row.params, "flops_fwd_per_token": (mm + att) / seq_len,
            "activation_bytes": row_activation_elements(row, batch_size, seq_len) * nbytes,
            "count": 1, "notes": row.notes,
        }
        key = (entry["path"], repr([entry[k] for k in ("weights", "flops_fwd_per_token", "activation_bytes",
                                                       "notes")]))
        if key in groups:
            groups[key]["count"] += 1
            groups[key]["members"].append(row.path)
        else:
            groups[key] = {**entry, "members": [row.path]}
    largest: dict[str, dict[str, Any]] = {}
    for g in groups.values():
        if g["path"] not in largest or g["count"] > largest[g["path"]]["count"]:
            largest[g["path"]] = g
    table = []
    for g in groups.values():
        members = g.pop("members")
        if g is largest[g["path"]] and (g["count"] > 1 or len(members) == 1 and members[0] == g["path"]):
            table.append(g)
        else:  # layers that differ from the folded ones keep their own paths
            table += [{**g, "path": path, "count": 1} for path in members]
    return table


def inspect_model(model: str, *, batch_size: int = 1, seq_len: int | None = None, dtype: str = "float32",
                  optimizer: str = "adamw", overrides: list[str] | dict[str, Any] | None = None,
                  sampler: str | None = None, steps: int | None = None,
                  guidance: float | None = None) -> dict[str, Any]:
    """Everything about a model's size and cost at (batch_size, seq_len), as a JSON-ready dict.

    Args:
        model: preset or family name (``gpt2``), recipe TOML path, or run directory with ``config.toml``.
        seq_len: context T; default the config's ``max_seq_len``; image models take 1 (one image).
        dtype: element type for every byte count (``float32``, ``bf16``...).
        optimizer: ``adamw`` (2 states per parameter), ``sgd`` (0) or ``sgd-momentum`` (1).
        overrides: ``--model.key=value`` strings or a dict of model fields.
        sampler, steps, guidance: a ``unet`` model's sampler (``ddim``, ``ddpm``, ``euler``, ``heun``) for
            ``sampling`` (:func:`sampling_cost`); unset: the recipe's or run's [task], else ddpm's defaults.

    Returns:
        A dict with ``params_*`` (elements), ``flops_*`` (FLOPs, 2 per multiply-add, per token unless
        ``_per_step``), ``*_bytes`` (bytes), ``modules`` (see :func:`module_table`) and ``conventions``.

    Raises:
        ConfigError: unknown model or field, impossible shape, non-positive B or T, T beyond learned
            positions, unknown dtype or optimizer.
    """
    from weightsmith.config import to_dict
    from weightsmith.registry import model_from_config

    name, family, cfg = resolve_model(model, overrides)
    image = is_image_config(cfg)
    if image and seq_len not in (None, 1):
        raise ConfigError(f"seq_len={seq_len}: {name} is an image model, analysed per image (seq_len 1)")
    T = 1 if image else cfg.max_seq_len if seq_len is None else seq_len
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if T <= 0:
        raise ConfigError(f"seq_len must be positive, got {T}")
    if getattr(cfg, "pos", None) == "learned" and T > cfg.max_seq_len:
        raise ConfigError(f"seq_len={T} exceeds model.max_seq_len={cfg.max_seq_len} (learned positions)")
    rows = rows_for(family, cfg)
    counts = param_counts(family, cfg, rows)
    built = sum(p.numel() for p in model_from_config(family, cfg, device="meta").parameters())
    if built != counts["total"]:  # the analytic model must describe the code exactly
        raise RuntimeError(f"analytic parameter count {counts['total']} != built model's {built} for {name}")
    nb = dtype_bytes(dtype)
    fwd = forward_flops(family, cfg, T, rows=rows)
    mem = memory_estimate(family, cfg, batch_size=batch_size, seq_len=T, dtype=dtype, optimizer=optimizer, rows=rows)
    # 6N assumes each weight is used once per token; an image model reuses its weights at every position
    six_n = None if image else 6.0 * (counts["active"] - counts["embedding"])
    extra: dict[str, Any] = {}
    if family == "unet":
        extra["sampling"] = sampling_cost(cfg, fwd["total"], **_sampling_options(model, sampler, steps, guidance))
    elif (sampler, steps, guidance) != (None, None, None):
        raise ConfigError(f"--sampler, --steps and --guidance apply to unet models; {name} is of family {family}")
    adapter = _adapter_section(model)
    if adapter is not None:  # [adapter]: trainable parameters and training memory with the base frozen
        from weightsmith.adapters import adapter_cost

        extra["adapter"] = adapter_cost(family, cfg, adapter, batch_size=batch_size, seq_len=T, dtype=dtype,
                                        optimizer=optimizer, base_memory=mem)
    return {
        "model": name, "family": family, "config": to_dict(cfg), "batch_size": batch_size, "seq_len": T,
        "unit": "image" if image else "token",
        "dtype": dtype, "optimizer": optimizer, "conventions": CONVENTIONS,
        "params_total": counts["total"], "params_embedding": counts["embedding"],
        "params_non_embedding": counts["non_embedding"], "params_trainable": counts["trainable"],
        "params_active": counts["active"],
        "flops_fwd_per_token": fwd["total"], "flops_fwd_matmul_per_token": fwd["matmul"],
        "flops_fwd_attention_per_token": fwd["attention"], "flops_train_per_token": 3.0 * fwd["total"],
        "flops_train_per_step": 3.0 * fwd["total"] * batch_size * T, "flops_6n_per_token": six_n,
        "kv_cache_bytes_per_token": mem["kv_cache_per_token"],
        "kv_cache_bytes_per_src_token": mem["kv_cache_per_src_token"], "kv_cache_bytes": mem["kv_cache"],
        "state_bytes_per_seq": mem["state_per_seq"], "state_bytes": mem["state"],
        "checkpoint_bytes": mem["weights"] + mem["buffers"], "memory_weights_bytes": mem["weights"],
        "memory_buffers_bytes": mem["buffers"],
        "memory_grads_bytes": mem["grads"], "memory_optimizer_bytes": mem["optimizer"],
        "memory_activations_bytes": mem["activations"],
        "memory_activations_checkpointed_bytes": mem["activations_checkpointed"],
        "memory_backward_transient_bytes": mem["backward_transient"],
        "memory_train_bytes": mem["train_peak"], "memory_train_checkpointed_bytes": mem["train_peak_checkpointed"],
        "memory_infer_bytes": mem["infer_peak"],
        "modules": module_table(rows, batch_size, T, nb), **extra,
    }


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; with unit 'B' bytes use powers of 1024 ('1.18 MiB')."""
    if unit == "B":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or suffix == "TiB":
                return f"{n:.0f} B" if suffix == "B" else f"{n:.2f} {suffix}"
            n /= 1024
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _shapes(weights: dict[str, Any]) -> str:
    parts = []
    for short, w in weights.items():
        dims = "x".join(map(str, w["shape"]))
        parts.append(f"{short} {dims}" + (f" (x{w['count']})" if w["count"] > 1 else ""))
    return ", ".join(parts) or "-"


def format_report(report: dict[str, Any]) -> str:
    """The :func:`inspect_model` dict as a text report with the per-module table."""
    r = report
    B, T = r["batch_size"], r["seq_len"]
    image = r.get("unit") == "image"
    unit = "image" if image else "token"
    at = f"B={B} images" if image else f"B={B}, T={T}"
    flops = f"forward {human(r['flops_fwd_per_token'])}"
    if r["flops_fwd_attention_per_token"]:
        flops += (f" = matmul {human(r['flops_fwd_matmul_per_token'])} + attention(T) "
                  f"{human(r['flops_fwd_attention_per_token'])}")
    buffers = f"  buffers {human(r['memory_buffers_bytes'], 'B')}" if r.get("memory_buffers_bytes") else ""
    kv = "" if image else (f";  KV cache {human(r['kv_cache_bytes_per_token'], 'B')}/token, "
                           f"{human(r['kv_cache_bytes'], 'B')} at B x T")
    if r.get("state_bytes_per_seq"):  # a recurrent model: a fixed-size state instead of a KV cache
        kv = (kv if r["kv_cache_bytes_per_token"] else "") + (  # a hybrid has both
            f";  state {human(r['state_bytes_per_seq'], 'B')}/sequence, {human(r['state_bytes'], 'B')} at B")
    lines = [
        f"{r['model']} (family {r['family']}) at {at}, dtype={r['dtype']}, optimizer={r['optimizer']}",
        "",
        f"parameters   total {r['params_total']:,}  embedding {r['params_embedding']:,}  "
        f"non-embedding {r['params_non_embedding']:,}  active/{unit} {r['params_active']:,}",
        f"FLOPs/{unit:6s}{flops};  train (3x) {human(r['flops_train_per_token'])};  "
        + (f"6N {human(r['flops_6n_per_token'])};  " if r["flops_6n_per_token"] is not None else "")
        + f"per step {human(r['flops_train_per_step'])}",
        f"memory       weights {human(r['memory_weights_bytes'], 'B')}{buffers}  grads "
        f"{human(r['memory_grads_bytes'], 'B')}  optimizer {human(r['memory_optimizer_bytes'], 'B')}  activations "
        f"{human(r['memory_activations_bytes'], 'B')} (checkpointed "
        f"{human(r['memory_activations_checkpointed_bytes'], 'B')})",
        f"             train peak {human(r['memory_train_bytes'], 'B')} (checkpointed "
        f"{human(r['memory_train_checkpointed_bytes'], 'B')});  inference peak "
        f"{human(r['memory_infer_bytes'], 'B')}{kv}",
        "",
    ]
    if "sampling" in r:
        sp = r["sampling"]
        lines[-1:-1] = [f"sampling     {sp['sampler']} {sp['steps']} steps, guidance {sp['guidance']:g}: "
                        f"NFE {sp['nfe']}, "
                        f"{sp['forwards_per_image']} forwards/image x {human(sp['flops_fwd_per_image'])} = "
                        f"{human(sp['flops_per_sample'])} FLOPs per sample"]
    if "adapter" in r:
        a = r["adapter"]
        nf4 = f" (NF4 {human(a['memory_nf4_bytes'], 'B')} for {a['params_nf4']:,} weights)" if a["params_nf4"] else ""
        lines[-1:-1] = [
            f"adapter      {a['method']} rank {a['rank']} on {a['adapted_linears']} linears"
            f"{''.join(f' + {n} in full' for n in a.get('train_modules', []))}: trainable "
            f"{a['params_trainable']:,} ({a['trainable_fraction']:.2%}), frozen base {a['params_frozen']:,}",
            f"             weights {human(a['memory_weights_bytes'], 'B')}{nf4}  grads "
            f"{human(a['memory_grads_bytes'], 'B')}  optimizer {human(a['memory_optimizer_bytes'], 'B')}  "
            f"activations {human(a['memory_activations_bytes'], 'B')};  train peak "
            f"{human(a['memory_train_bytes'], 'B')} (full fine-tune {human(a['memory_train_full_bytes'], 'B')})"]
    per, act_at = ("fwd FLOPs/img", "act @B") if image else ("fwd FLOPs/tok", "act @B,T")
    head = f"{'module':34s} {'count':>5s} {'params':>12s} {per:>14s} {act_at:>11s}  weights"
    lines += [head, "-" * len(head)]
    for m in r["modules"]:
        lines.append(f"{m['path']:34s} {m['count']:>5d} {m['params']:>12,d} {human(m['flops_fwd_per_token']):>14s} "
                     f"{human(m['activation_bytes'], 'B'):>11s}  {_shapes(m['weights'])}")
    lines += ["", "conventions: " + "; ".join(r["conventions"].values())]
    return "\n".join(lines)
