"""Adapters as a pass over a built model: LoRA, DoRA and QLoRA from the recipe's ``[adapter]`` section.

:func:`apply_adapters` wraps every linear layer whose name matches ``target_modules`` in a
:class:`~weightsmith.models.layers.lora.LoRALinear` (``lora``, Hu et al. 2021; ``qlora`` on an NF4
base, Dettmers et al. 2023) or :class:`~weightsmith.models.layers.lora.DoRALinear` (``dora``, Liu et
al. 2024), and freezes everything else: only ``lora_A``, ``lora_B`` (and DoRA's ``magnitude``) keep
``requires_grad``. The model's own code is untouched; the pass is recorded as ``[adapter]`` in the
run's ``config.toml`` and re-applied when the run is opened (weightsmith.runs.apply_run_passes), so a
checkpoint's state dict (base and adapters: ``blocks.0.attn.q_proj.base.weight``,
``blocks.0.attn.q_proj.lora_A`` ...) loads into it.

Patterns: a name matches ``p`` when ``fnmatch(name, p)`` or ``fnmatch(name, "*." + p)`` (case
sensitive), so ``q_proj`` is every attention query, ``blocks.1.*`` every linear of block 1.

:func:`merge_adapters` folds the adapters into plain ``nn.Linear`` weights (dequantizing an NF4 base),
what export and quantization take. :func:`save_peft` / :func:`load_peft` write and read the peft format
(``adapter_config.json`` + ``adapter_model.safetensors``) for the matching transformers model; the HF
module names come from weightsmith.ship.hf_convert_peft.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.models.layers.lora import DoRALinear, FrozenQuantLinear, LoRALinear, base_weight, is_dense_linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PARAMS = ("lora_A", "lora_B", "magnitude")


def matches(name: str, patterns: list[str]) -> bool:
    """Whether module ``name`` matches one of ``patterns`` (whole name or dotted suffix, shell wildcards)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def _is_quantized_linear(m: nn.Module) -> bool:
    """A frozen quantized linear (NF4Linear): in/out features and a dequantized dense weight."""
    return (not isinstance(m, LoRALinear) and hasattr(m, "in_features")
            and any(callable(getattr(m, n, None)) for n in ("dequantized_weight", "dequantize")))


def _is_linear(m: nn.Module) -> bool:
    if isinstance(m, LoRALinear):
        return False
    return isinstance(m, nn.Linear) or _is_quantized_linear(m)


def target_linears(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear layers of ``model`` that ``patterns`` select, in module order.

    Raises:
        ConfigError: a pattern selects no linear layer (the message lists some that exist), or a
            selected layer's weight is tied to another module (a tied ``lm_head``).
    """
    linears = [n for n, m in model.named_modules() if _is_linear(m)]
    for p in patterns:
        if not any(matches(n, [p]) for n in linears):
            examples = ", ".join(sorted({n.split(".")[-1] for n in linears})) or "none"
            raise ConfigError(f"adapter.target_modules pattern {p!r} matches no linear layer; linear names "
                              f"end in: {examples} (e.g. {linears[0] if linears else '-'})")
    chosen = [n for n in linears if matches(n, patterns)]
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for n in chosen:
        w = getattr(model.get_submodule(n), "weight", None)
        if isinstance(w, nn.Parameter) and owners.get(id(w), 0) > 1:
            raise ConfigError(f"adapter.target_modules selects {n}, whose weight is tied to another module "
                              "(tie_embeddings); leave it out of the patterns")
    return chosen


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _nf4_class():
    try:
        from weightsmith.models.layers.nf4 import NF4Linear
    except ImportError:
        raise ConfigError("adapter.method = 'qlora' needs weightsmith.models.layers.nf4 (NF4Linear), which "
                          "this installation lacks; use 'lora' or 'dora'") from None
    return NF4Linear


def apply_adapters(model: nn.Module, cfg: Any) -> nn.Module:
    """Wrap the linears ``cfg.target_modules`` selects and freeze the rest, except the modules
    ``cfg.train_modules`` selects (:func:`train_module_names`), which train in full; in place, returns ``model``.

    Args:
        cfg: a :class:`weightsmith.recipe.AdapterConfig` (``method``, ``rank``, ``alpha``, ``dropout``,
            ``target_modules``, ``quantize_frozen``). ``qlora`` first replaces each target (and with
            ``quantize_frozen`` every other linear under ``model.blocks``) by ``NF4Linear.from_linear``
            inside a :class:`~weightsmith.models.layers.lora.FrozenQuantLinear`, whose backward
            dequantizes W again instead of keeping it.

    Adapter weights are float32 on the base's device; B starts at zero, so the model's outputs are
    unchanged by the pass (exactly, for ``lora`` and ``dora``; up to NF4 rounding for ``qlora``).

    Raises:
        ConfigError: see :func:`target_linears` and :func:`train_module_names`; a model that already has
            adapters.
    """
    if adapter_modules(model):
        raise ConfigError("the model already has adapters; apply [adapter] once")
    targets = target_linears(model, list(cfg.target_modules))
    train = train_module_names(model, cfg, targets)  # before NF4 replaces the block linears
    if cfg.method == "qlora":
        nf4 = _nf4_class()
        frozen = [n for n, m in model.named_modules() if is_dense_linear(m) and n.startswith("blocks.")]
        for n in dict.fromkeys(targets + (frozen if cfg.quantize_frozen else [])):
            lin = model.get_submodule(n)
            if is_dense_linear(lin):  # backward dequantizes again rather than keeping W (FrozenQuantLinear)
                _set_module(model, n, FrozenQuantLinear(nf4.from_linear(lin)))
    for p in model.parameters():
        p.requires_grad_(False)
    for n in train:  # peft's modules_to_save: these train in full
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    for n in targets:
        cls = DoRALinear if cfg.method == "dora" else LoRALinear
        _set_module(model, n, cls(model.get_submodule(n), rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout))
    return model


def train_module_names(model: nn.Module, cfg: Any, targets: list[str]) -> list[str]:
    """Names of the modules ``cfg.train_modules`` selects (peft's ``modules_to_save``), in module order.

    Raises:
        ConfigError: a pattern that matches no module, or a selected module that holds an adapted linear
            or (``qlora``) an NF4 one, which cannot train in full.
    """
    patterns = list(getattr(cfg, "train_modules", []) or [])
    names = [n for n, _ in model.named_modules() if n and matches(n, patterns)]
    missing = [p for p in patterns if not any(matches(n, [p]) for n in names)]
    if missing:
        raise ConfigError(f"adapter.train_modules {missing} match no module; top-level names are "
                          f"{[n for n, _ in model.named_children()]}")
    frozen = list(targets)
    if cfg.method == "qlora" and cfg.quantize_frozen:
        frozen += [n for n, m in model.named_modules() if is_dense_linear(m) and n.startswith("blocks.")]
    clash = sorted({n for n in names for t in frozen if t == n or t.startswith(n + ".") or n.startswith(t + ".")})
    if clash:
        raise ConfigError(f"adapter.train_modules selects {clash}, which hold adapted (or NF4) linears; a module "
                          "trains in full or gets an adapter, not both")
    return names


def adapter_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, module) of every LoRA / DoRA layer in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def trainable_parameters(model: nn.Module) -> int:
    """Elements of the parameters with ``requires_grad`` (shared ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the adapter parameters only (``...q_proj.lora_A`` ...), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ADAPTER_PARAMS}


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight in place (the wrappers stay; :func:`unmerge` undoes it)."""
    for _, m in adapter_modules(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`."""
    for _, m in adapter_modules(model):
        m.unmerge()


def _dense_linear(base: nn.Module) -> nn.Linear:
    """``base`` as an ``nn.Linear`` (a quantized base is dequantized: its rounding error stays)."""
    if is_dense_linear(base):
        return base
    w = base_weight(base).detach()
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
    return lin


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain ``nn.Linear`` with the merged weight (and every NF4 base
    by its dequantized ``nn.Linear``), in place; all parameters trainable again. Returns ``model``,
    which then has the state-dict keys of the unadapted model, for export and quantization."""
    for name, m in adapter_modules(model):
        lin = _dense_linear(m.base)
        if lin is not m.base:
            m.base = lin
        m.merge()
        _set_module(model, name, lin)
    replaced: list[str] = []
    for name, m in list(model.named_modules()):
        if _is_quantized_linear(m) and not any(name.startswith(r + ".") for r in replaced):
            _set_module(model, name, _dense_linear(m))
            replaced.append(name)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------------ peft format


def save_peft(model: nn.Module, model_cfg: Any, out_dir: str | Path, *, dropout: float = 0.0,
              train_modules: list[str] = ()) -> Path:
    """Write ``model``'s adapters as a peft LoRA adapter for the transformers model that
    weightsmith.ship.hf_convert.ours_to_hf makes of ``model_cfg``: ``out_dir/adapter_config.json`` and
    ``out_dir/adapter_model.safetensors`` (float32). ``PeftModel.from_pretrained(hf_model, out_dir)``
    then computes our logits. GPT-2's fused ``c_attn`` is handled as weightsmith.ship.hf_convert_peft
    describes. ``train_modules`` (our module names, :func:`train_module_names`) trained in full and are
    saved whole, as peft's ``modules_to_save`` (weightsmith.ship.hf_convert_peft.modules_to_save), so
    they replace the base's copies when peft loads the adapter.

    Raises:
        ConfigError: no adapters, or an adapted layer, a module to save, or a model that peft's
            transformers model cannot hold.
    """
    import copy

    from safetensors.torch import save_file

    from weightsmith.ship.hf_convert_peft import (
        PEFT_PREFIX,
        fan_in_fan_out,
        hf_module_rows,
        modules_to_save,
        peft_targets,
    )

    mods = adapter_modules(model)
    if not mods:
        raise ConfigError("the model has no adapters to save")
    arch, targets = peft_targets(model_cfg)
    rows = hf_module_rows(model_cfg)
    inverse: dict[str, list[str]] = {}
    for ours, (hf, _, _) in targets.items():
        inverse.setdefault(hf, []).append(ours)
    groups: dict[str, list[tuple[str, LoRALinear]]] = {}
    for name, m in mods:
        if name not in targets:
            raise ConfigError(f"{name} has no counterpart in {arch}; peft cannot hold its adapter")
        groups.setdefault(targets[name][0], []).append((name, m))
    dora = isinstance(mods[0][1], DoRALinear)
    if any(isinstance(m, DoRALinear) != dora for _, m in mods):
        raise ConfigError("a peft adapter is all LoRA or all DoRA; this model mixes them")
    r0, a0 = mods[0][1].rank, mods[0][1].alpha
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for hf, parts in groups.items():
        if len({(m.rank, m.alpha) for _, m in parts}) > 1:
            raise ConfigError(f"the adapters fused into {hf} have different rank/alpha; peft needs one")
        r, alpha, n = parts[0][1].rank, parts[0][1].alpha, len(parts)
        A = torch.cat([m.lora_A.detach().float() for _, m in parts])  # (n r, in)
        B = torch.zeros(rows[hf], n * r)
        mag = None
        if dora:  # rows without an adapter keep their own norm (g = 1)
            mag = torch.empty(rows[hf])
            for ours in inverse[hf]:
                _, start, stop = targets[ours]
                w = base_weight(_unwrap(model.get_submodule(ours))).detach().float()
                mag[start:stop] = torch.linalg.norm(w, dim=1)
        for j, (name, m) in enumerate(parts):
            _, start, stop = targets[name]
            B[start:stop, j * r:(j + 1) * r] = m.lora_B.detach().float()
            if dora:
                mag[start:stop] = m.magnitude.detach().float()
        key = PEFT_PREFIX + hf
        tensors[f"{key}.lora_A.weight"] = A.contiguous()
        tensors[f"{key}.lora_B.weight"] = B.contiguous()
        if dora:
            tensors[f"{key}.lora_magnitude_vector"] = mag.contiguous()
        if (n * r, n * alpha) != (r0, a0):
            rank_pattern[hf], alpha_pattern[hf] = n * r, n * alpha
    saved, tied = None, False
    if train_modules:
        plain = merge_adapters(copy.deepcopy(model)).state_dict()
        full, saved, tied = modules_to_save(model_cfg, plain, list(train_modules))
        tensors.update({PEFT_PREFIX + h: t.detach().float().contiguous() for h, t in full.items()})
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "r": r0, "lora_alpha": a0, "lora_dropout": dropout, "target_modules": sorted(groups),
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_dora": dora,
              "use_rslora": False, "fan_in_fan_out": fan_in_fan_out(arch), "bias": "none",
              "init_lora_weights": True, "modules_to_save": saved,
              "auto_mapping": {"base_model_class": arch}}
    if tied:  # peft then keeps the head tied to its copy of the embedding (peft >= 0.18)
        config["ensure_weight_tying"] = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


@torch.no_grad()
def _load_modules_to_save(model: nn.Module, model_cfg: Any, full: dict[str, torch.Tensor], where: Path) -> list[str]:
    """Copy peft ``modules_to_save`` tensors (HF keys) into ``model`` (unadapted), through the converters:
    ours -> HF, the saved tensors in place of the base's, HF -> ours. Returns our parameter names that
    changed. A tied model's ``lm_head.weight`` copy must equal the embedding it is tied to.

    Raises:
        CheckpointError: a key with no HF counterpart, a shape that differs, or a tied head that is not
            the embedding.
    """
    from weightsmith.ship.hf_convert import hf_to_ours, ours_to_hf

    plain = {k: v.detach() for k, v in model.state_dict().items()}
    hf_cfg, hf_sd, _ = ours_to_hf(model_cfg, plain)
    hf_sd = dict(hf_sd)
    head = full.pop("lm_head.weight", None) if "lm_head.weight" not in hf_sd else None
    for key, t in full.items():
        if key not in hf_sd:
            raise CheckpointError(f"{where}: modules_to_save key {key!r} has no counterpart in the model")
        if tuple(t.shape) != tuple(hf_sd[key].shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, the model {tuple(hf_sd[key].shape)}")
        hf_sd[key] = t.to(hf_sd[key].dtype)
    _, _, ours = hf_to_ours(hf_cfg, hf_sd)
    if head is not None and not torch.equal(head.to(ours["tok_emb.weight"].dtype), ours["tok_emb.weight"]):
        raise CheckpointError(f"{where}: lm_head.weight differs from the embedding, but the model ties them")
    changed = [k for k, v in ours.items() if k in plain and not torch.equal(v, plain[k])]
    model.load_state_dict({k: ours[k] for k in changed}, strict=False)
    params = dict(model.named_parameters())
    return [k for k in changed if k in params]


def _unwrap(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, LoRALinear) else m


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft(model: nn.Module, model_cfg: Any, adapter_dir: str | Path) -> list[str]:
    """Wrap ``model`` (unadapted, built from ``model_cfg``) with the peft LoRA/DoRA adapter in
    ``adapter_dir`` and freeze its base, in place; returns the names of our adapted layers.

    A peft adapter on GPT-2's fused ``c_attn`` becomes one on each of q, k, v with the same A and B's
    rows of that part (exact, see weightsmith.ship.hf_convert_peft). ``modules_to_save`` tensors replace
    the model's own (through the converters) and stay trainable, as in peft.

    Raises:
        CheckpointError: a missing or unreadable file, a key that names no module of the matching
            transformers model. ConfigError: peft options we do not implement (rsLoRA, LoRA biases,
            other peft types).
    """
    from safetensors.torch import load_file

    from weightsmith.ship.hf_convert_peft import PEFT_PREFIX, peft_targets

    d = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (d / name).is_file():
            raise CheckpointError(f"{d / name} is missing; a peft adapter directory has {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS}")
    try:
        pc = json.loads((d / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(d / ADAPTER_WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"{d} is not a readable peft adapter ({e.__class__.__name__}: {e})") from None
    for key, ok in (("peft_type", "LORA"), ("use_rslora", False), ("bias", "none")):
        if pc.get(key, ok) != ok:
            raise ConfigError(f"{d / ADAPTER_CONFIG}: {key}={pc.get(key)!r} is not supported (need {ok!r})")
    if adapter_modules(model):
        raise ConfigError("the model already has adapters; load a peft adapter into an unadapted model")
    _, targets = peft_targets(model_cfg)
    inverse: dict[str, list[str]] = {}
    for ours, (hf, _, _) in targets.items():
        inverse.setdefault(hf, []).append(ours)
    saved = list(pc.get("modules_to_save") or [])
    hf_modules: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}  # modules_to_save: HF key -> tensor
    for key, t in tensors.items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", key)
        if m is not None and m.group(1) in inverse:
            hf_modules.setdefault(m.group(1), {})[m.group(2).split(".")[0]] = t
            continue
        module = key[len(PEFT_PREFIX):].rsplit(".", 1)[0] if key.startswith(PEFT_PREFIX) else None
        allowed = saved + ["lm_head"] * bool(saved)  # peft saves a tied head's copy without listing it
        if module is None or not any(module == s or module.endswith("." + s) for s in allowed):
            raise CheckpointError(f"{d / ADAPTER_WEIGHTS}: key {key!r} names no adaptable module of the model "
                                  f"and no module of modules_to_save {saved}")
        full[key[len(PEFT_PREFIX):]] = t
    trained = _load_modules_to_save(model, model_cfg, full, d / ADAPTER_WEIGHTS) if full else []
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trained:  # peft trains its modules_to_save in full
        model.get_parameter(name).requires_grad_(True)
    dora = bool(pc.get("use_dora"))
    wrapped = []
    for hf, parts in hf_modules.items():
        r = int(_pattern_value(pc.get("rank_pattern") or {}, hf, pc["r"]))
        alpha = float(_pattern_value(pc.get("alpha_pattern") or {}, hf, pc["lora_alpha"]))
        if "lora_A" not in parts or "lora_B" not in parts or (dora and "lora_magnitude_vector" not in parts):
            raise CheckpointError(f"{d / ADAPTER_WEIGHTS}: {hf} lacks some of lora_A, lora_B"
                                  + (", lora_magnitude_vector" if dora else ""))
        A, B = parts["lora_A"].float(), parts["lora_B"].float()
        if A.shape[0] != r or B.shape[1] != r:
            raise CheckpointError(f"{d / ADAPTER_WEIGHTS}: {hf} has rank {A.shape[0]} but the config says {r}")
        for ours in inverse[hf]:
            _, start, stop = targets[ours]
            base = model.get_submodule(ours)
            cls = DoRALinear if dora else LoRALinear
            layer = cls(base, rank=r, alpha=alpha, dropout=float(pc.get("lora_dropout") or 0.0))
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B[start:stop])
                if dora:
                    layer.magnitude.copy_(parts["lora_magnitude_vector"][start:stop].float())
            _set_module(model, ours, layer)
            wrapped.append(ours)
    return wrapped


# ------------------------------------------------------------------------------------------ cost

NF4_BLOCK = 64  # weights per absmax scale (Dettmers et al. 2023)
NF4_SCALE_BLOCK = 256  # first-level scales per second-level fp32 scale (double quantization)


def nf4_bytes(n: int) -> int:
    """Bytes of ``n`` weights stored as NF4 with double quantization (Dettmers et al. 2023, section 3):
    4 bits per weight, one 8-bit absmax per block of 64, one fp32 scale per 256 of those and one fp32
    mean per tensor: ceil(n / 2) + ceil(n / 64) + 4 ceil(ceil(n / 64) / 256) + 4, about 4.127 bits per
    weight (NF4Linear's storage; tests compare it with ``NF4Linear.nbytes``)."""
    blocks = -(-n // NF4_BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // NF4_SCALE_BLOCK) + 4


def adapter_cost(family: str, cfg: Any, adapter: Any, *, batch_size: int, seq_len: int, dtype: str,
                 optimizer: str, base_memory: dict[str, float]) -> dict[str, Any]:
    """Parameters and training memory of ``family``/``cfg`` with the adapters of ``adapter`` (an
    AdapterConfig), for ``weightsmith inspect`` (bytes; counts in elements).

    The model is built on the meta device and the pass applied (``qlora`` with ``lora``'s layers: the
    same trainable tensors), so ``params_trainable`` is the real module's count; it is checked against
    the analytic sum over the adapted (in, out) linears of rank (in + out), plus out for DoRA, plus the
    parameters of ``train_modules`` (which train in full: gradient and optimizer state at ``dtype``).

    Memory, at ``dtype`` except where said: weights = frozen base (NF4 linears at :func:`nf4_bytes`,
    everything else at ``dtype``) + adapters (fp32 for ``qlora``); grads and optimizer states for the
    adapters only (no gradient or state for the base); activations = the base model's estimate
    (``base_memory["activations"]``, an upper bound: a frozen linear need not keep its input) plus, per
    adapted linear, the (B, T, rank) output of A and, with dropout, the (B, T, in) masked input; the
    backward transient is the base model's. ``train_peak`` is their sum with the buffers.

    Raises:
        ConfigError: the patterns select nothing (see :func:`target_linears`), unknown dtype/optimizer.
    """
    from dataclasses import replace

    from weightsmith.analysis.memory import dtype_bytes, optimizer_states
    from weightsmith.registry import model_from_config

    nb, states = dtype_bytes(dtype), optimizer_states(optimizer)
    model = model_from_config(family, cfg, device="meta")
    n_total = sum(p.numel() for p in model.parameters())
    targets = target_linears(model, list(adapter.target_modules))
    shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in targets}
    nf4_names = set(targets)
    if adapter.method == "qlora" and adapter.quantize_frozen:
        nf4_names |= {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}
    qlora = adapter.method == "qlora"
    nf4_params = sum(model.get_submodule(n).weight.numel() for n in nf4_names) if qlora else 0
    nf4_total = sum(nf4_bytes(model.get_submodule(n).weight.numel()) for n in nf4_names) if qlora else 0
    train_names = train_module_names(model, adapter, targets)
    full = {id(p): p for n in train_names for p in model.get_submodule(n).parameters()}  # shared ones once
    n_full = sum(p.numel() for p in full.values())
    apply_adapters(model, replace(adapter, method="dora" if adapter.method == "dora" else "lora"))
    trainable = trainable_parameters(model)
    n_adapter = sum(adapter.rank * (i + o) + (o if adapter.method == "dora" else 0) for i, o in shapes.values())
    if n_adapter + n_full != trainable:  # the analytic count must describe the pass exactly
        raise RuntimeError(f"analytic trainable parameters {n_adapter} + {n_full} != the adapted module's {trainable}")
    na = 4 if qlora else nb  # QLoRA keeps its adapters in fp32
    weights = (n_total - nf4_params) * nb + nf4_total + n_adapter * na  # train_modules are in n_total, at dtype
    act_extra = sum(batch_size * seq_len * (adapter.rank + (i if adapter.dropout > 0 else 0))
                    for i, _ in shapes.values()) * na
    grads, opt = n_adapter * na + n_full * nb, states * (n_adapter * na + n_full * nb)
    act = base_memory["activations"] + act_extra
    peak = weights + base_memory["buffers"] + grads + opt + act + base_memory["backward_transient"]
    return {"method": adapter.method, "rank": adapter.rank, "alpha": adapter.alpha,
            "target_modules": list(adapter.target_modules), "adapted_linears": len(targets),
            "train_modules": train_names, "params_trainable": trainable, "params_frozen": n_total - n_full,
            "params_nf4": nf4_params, "trainable_fraction": trainable / (n_adapter + n_total),
            "memory_weights_bytes": weights, "memory_nf4_bytes": nf4_total,
            "memory_grads_bytes": grads, "memory_optimizer_bytes": opt, "memory_activations_bytes": act,
            "memory_train_bytes": peak, "memory_train_full_bytes": base_memory["train_peak"]}
