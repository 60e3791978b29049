"""µP, the maximal-update parametrization, applied from outside the model, and its coordinate check.

Source: Yang, Hu et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
Hyperparameter Transfer", Table 3 (the Adam column; Lion's sign update scales like Adam's). Every
parameter is classed by which of its dimensions grow with the width ``d_model`` ("infinite" dimensions),
found by comparing its shape with the same parameter in the model built at ``base_width``. With the width
multiplier ``m = d_model / base_width``:

==========  ==========================================  ==============  =========
role        which dimensions grow                       init std        Adam lr
==========  ==========================================  ==============  =========
input       fan_out only (token embeddings, norm gains,  unchanged       unchanged
            biases), or none
hidden      fan_in and fan_out (attention and MLP        x m^-1/2        x 1/m
            matrices)
output      fan_in only (an untied lm_head)              x 1/m           x 1/m
==========  ==========================================  ==============  =========

So at ``d_model == base_width`` µP is exactly the model's own (standard) parametrization, and a learning
rate tuned there keeps its meaning at other widths. Width is changed with :func:`width_config`, which keeps
``d_head`` (so attention's 1/sqrt(d_head) scale needs no µP correction) and scales ``n_heads``,
``n_kv_heads`` and ``d_ff`` in proportion. A head tied to the token embedding cannot be
both an input and an output weight, so µP refuses tied embeddings (``model.tie_embeddings = false``).
Muon is refused too: its orthogonalized update already has a width-independent spectral scale.

The recipe turns it on with ``[train] mup_base_width = 64``; the trainer calls :func:`apply_mup` on a
fresh model (the init, and the learning-rate multipliers it hands to the optimizer). :func:`coord_check` is the paper's
coordinate check (its Figure 5, after the ``mup`` package's ``get_coord_data``): the mean absolute
activation of every block after a few steps, against width, for standard parametrization and µP. Under
µP the curves stay flat after the first update; under standard parametrization they grow with width. At
initialization (step 1) µP's logits shrink like m^-1/2, as Table 3 intends (readout std ~ 1/fan_in): the
logits are then dominated by the Theta(1) change the updates make.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith.errors import ConfigError

ROLES = ("input", "hidden", "output")


def width_config(cfg: Any, width: int) -> Any:
    """``cfg`` at ``d_model = width``, with ``d_head`` kept: ``n_heads = width / d_head``, and ``n_kv_heads``
    and ``d_ff`` (as resolved, when the config has one) scaled by ``width / d_model``. Raises ConfigError
    if the config has no ``d_model``/``n_heads`` or ``width`` is not a multiple of ``d_head`` (and of the
    GQA group)."""
    if not all(hasattr(cfg, k) for k in ("d_model", "n_heads", "d_head")):
        raise ConfigError(f"µP needs a transformer config with d_model, n_heads and d_head; "
                          f"{type(cfg).__name__} has none")
    if width <= 0 or width % cfg.d_head:
        raise ConfigError(f"width {width} must be a positive multiple of model.d_head={cfg.d_head}")
    n_heads = width // cfg.d_head
    group = cfg.n_heads // (getattr(cfg, "n_kv_heads", None) or cfg.n_heads)
    if n_heads % group:
        raise ConfigError(f"width {width} gives n_heads={n_heads}, not a multiple of the GQA group "
                          f"n_heads / n_kv_heads = {group}")
    changes: dict[str, Any] = {"d_model": width, "n_heads": n_heads}
    if getattr(cfg, "n_kv_heads", None) is not None:
        changes["n_kv_heads"] = n_heads // group
    if getattr(cfg, "d_ff", None):  # the resolved width (a derived one too), so every ratio is exact
        changes["d_ff"] = max(1, round(cfg.d_ff * width / cfg.d_model))
    return dataclasses.replace(cfg, **changes)


def _fan_dims(module: nn.Module, pname: str, p: torch.Tensor) -> tuple[int | None, int | None]:
    """(fan_in dim, fan_out dim) of a parameter, or ConfigError for a kind µP here does not class."""
    if p.dim() == 1:
        return None, 0
    if isinstance(module, nn.Embedding) and pname == "weight":
        return 0, 1
    if isinstance(module, nn.Linear) and pname == "weight":
        return 1, 0
    raise ConfigError(f"µP here classes Linear and Embedding weights and vectors; {type(module).__name__}."
                      f"{pname} of shape {tuple(p.shape)} is neither")


def mup_roles(model: nn.Module, base_model: nn.Module) -> dict[str, str]:
    """{parameter name: "input" | "hidden" | "output"} by comparing shapes with ``base_model`` (the same
    family at ``base_width``, e.g. on the meta device). Raises ConfigError for a parameter that is two
    roles at once (a tied head) or of a kind µP here does not class."""
    base = dict(base_model.named_parameters(remove_duplicate=False))
    roles: dict[int, tuple[str, str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{mname}.{pname}" if mname else pname
            fan_in, fan_out = _fan_dims(mod, pname, p)
            shape0 = base[full].shape
            grows = [a != b for a, b in zip(p.shape, shape0, strict=True)]
            in_inf = fan_in is not None and grows[fan_in]
            out_inf = grows[fan_out]
            role = "hidden" if in_inf and out_inf else "output" if in_inf else "input"
            if id(p) in roles and roles[id(p)][1] != role:
                raise ConfigError(f"µP: {roles[id(p)][0]} and {full} share one weight as {roles[id(p)][1]} "
                                  f"and {role}; set model.tie_embeddings = false")
            roles.setdefault(id(p), (full, role))
    return {name: role for name, role in roles.values()}


def _base_model(family: str, cfg: Any, base_width: int) -> nn.Module:
    from weightsmith.registry import model_from_config

    return model_from_config(family, width_config(cfg, base_width), device="meta")


def _width_mult(cfg: Any, base_width: int) -> float:
    if base_width <= 0:
        raise ConfigError(f"train.mup_base_width must be positive, got {base_width}")
    return cfg.d_model / base_width


def _scales(model: nn.Module, roles: dict[str, str], m: float) -> dict[int, float]:
    named = dict(model.named_parameters(remove_duplicate=False))
    return {id(named[name]): (1.0 if role == "input" else 1.0 / m) for name, role in roles.items()}


def mup_lr_scales(model: nn.Module, family: str, cfg: Any, base_width: int) -> dict[int, float]:
    """{id(parameter): learning-rate multiplier}: 1/m for hidden and output weights, 1 for inputs, where
    ``m = cfg.d_model / base_width``. Pass it to weightsmith.train.optim.build_optimizer."""
    m = _width_mult(cfg, base_width)
    return _scales(model, mup_roles(model, _base_model(family, cfg, base_width)), m)


@torch.no_grad()
def apply_mup_init(model: nn.Module, family: str, cfg: Any, base_width: int) -> dict[str, str]:
    """Rescale a freshly initialized model in place to µP's init: hidden weights by m^-1/2, output
    weights by 1/m (``m = cfg.d_model / base_width``); returns :func:`mup_roles`. Identity at m = 1."""
    m = _width_mult(cfg, base_width)
    roles = mup_roles(model, _base_model(family, cfg, base_width))
    named = dict(model.named_parameters(remove_duplicate=False))
    for name, role in roles.items():
        if role == "hidden":
            named[name].mul_(m ** -0.5)
        elif role == "output":
            named[name].mul_(1.0 / m)
    return roles


def apply_mup(model: nn.Module, family: str, cfg: Any, base_width: int) -> dict[int, float]:
    """:func:`apply_mup_init`, then the matching :func:`mup_lr_scales` from the same roles (classed once);
    what the trainer, :func:`coord_check` and bench/mup_transfer.py call."""
    roles = apply_mup_init(model, family, cfg, base_width)
    return _scales(model, roles, _width_mult(cfg, base_width))


# ---- coordinate check ---------------------------------------------------------------------------------

def _probe_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs the check records: the model's children in order, with a ModuleList
    (the blocks) expanded into its elements."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            out.extend((f"{name}.{i}", m) for i, m in enumerate(child))
        else:
            out.append((name, child))
    return out


def _probe_run(model: nn.Module, opt, task, steps: int, data_seed: int) -> dict[str, list[float]]:
    """Train ``steps`` steps; {probed module: [mean |output| in each step's forward pass]}, for the modules
    called exactly once per forward pass."""
    probes = _probe_modules(model)
    seen: dict[str, list[float]] = {name: [] for name, _ in probes}

    def hook(name: str):
        def record(_mod, _inp, output):
            t = output[0] if isinstance(output, tuple) else output
            seen[name].append(t.detach().abs().mean().item())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in probes]
    torch.manual_seed(data_seed)  # the same batches for every width and seed
    batches = task.batches("cpu")
    try:
        for _ in range(steps):
            loss, _ = task.loss(model, batches.next())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    # modules that the forward pass does not call once per step (helpers such as rotary tables) are dropped
    return {name: vals for name, vals in seen.items() if len(vals) == steps}


def coord_check(recipe_path: str | Path, out: str | Path, *, widths: list[int], base_width: int,
                steps: int = 4, seeds: int = 3, overrides: list[str] | None = None, log=print) -> dict:
    """The coordinate check: train the recipe's model at each width for ``steps`` optimizer steps at
    the constant rate ``train.lr`` (no warmup, no clipping), under standard parametrization (``sp``) and
    µP with ``base_width``, ``seeds`` times each, and record the mean absolute value of every probed
    module's output (:func:`_probe_modules`: embeddings, each block, the final norm, the logits) in the
    forward pass of each step (step t has seen t - 1 updates), averaged over seeds.

    Writes ``OUT/coord.json`` ({"sp"|"mup": {module: {width: [l1 per step]}}}), ``OUT/coord.md`` (the last
    step's table, with the widest over narrowest ratio) and ``OUT/coord.png`` (matplotlib: one panel per
    parametrization and step, mean |x| against width, log-log). Returns the JSON dict.

    Raises:
        ConfigError: ``OUT`` exists and is not empty, fewer than two widths, a tied head, Muon, or a
            model µP here does not cover.
    """
    from weightsmith.recipe import load_recipe
    from weightsmith.registry import model_from_config
    from weightsmith.train.optim import build_optimizer, set_lr

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out (nothing is overwritten)")
    widths = sorted(set(widths))
    if len(widths) < 2 or steps < 1 or seeds < 1:
        raise ConfigError("coord-check needs at least two --widths, --steps >= 1 and --seeds >= 1")
    recipe = load_recipe(recipe_path, overrides)
    tc = recipe.train
    task = recipe.task_cls(recipe.task, recipe.data, tc, recipe.sample)
    out.mkdir(parents=True, exist_ok=True)
    task.setup(out, resume=False, log=log)
    cfg0 = recipe.model_config(task.model_fields())
    if getattr(cfg0, "tie_embeddings", False):
        raise ConfigError("µP needs an untied head; add --model.tie_embeddings=false")
    result: dict[str, Any] = {"recipe": str(recipe_path), "overrides": list(overrides or []), "lr": tc.lr,
                              "optimizer": tc.optimizer, "base_width": base_width, "widths": widths,
                              "steps": steps, "seeds": seeds, "sp": {}, "mup": {}}
    for param in ("sp", "mup"):
        for width in widths:
            cfg = width_config(cfg0, width)
            task.check_model(cfg)
            per_seed = []
            for seed in range(seeds):
                torch.manual_seed(tc.seed + seed)
                model = model_from_config(recipe.family, cfg, device="cpu")
                scales = None
                if param == "mup":
                    scales = apply_mup(model, recipe.family, cfg, base_width)
                model.train()
                opt = build_optimizer(tc.optimizer, model, tc, scales)
                set_lr(opt, tc.lr)
                per_seed.append(_probe_run(model, opt, task, steps, tc.seed))
            for name in per_seed[0]:
                mean = [sum(s[name][t] for s in per_seed) / seeds for t in range(steps)]
                result[param].setdefault(name, {})[str(width)] = mean
            log(f"{param:>3} width {width:>5}: logits l1 at step {steps} "
                f"{result[param][list(per_seed[0])[-1]][str(width)][-1]:.4g}")
    (out / "coord.json").write_text(json.dumps(result, indent=1))
    (out / "coord.md").write_text(_coord_markdown(result))
    _coord_plot(result, out / "coord.png")
    return result


def _coord_markdown(result: dict) -> str:
    widths, last = result["widths"], result["steps"] - 1
    lines = [f"Coordinate check: mean |activation| at step {result['steps']} (after {last} updates) at lr "
             f"{result['lr']:g} ({result['optimizer']}), base width {result['base_width']}, mean of "
             f"{result['seeds']} seeds.", ""]
    for param, title in (("sp", "standard parametrization"), ("mup", "µP")):
        lines += [f"**{title}**", "",
                  "| module | " + " | ".join(f"width {w}" for w in widths) + f" | {widths[-1]}/{widths[0]} |",
                  "|---|" + "---|" * (len(widths) + 1)]
        for name, by_width in result[param].items():
            vals = [by_width[str(w)][last] for w in widths]
            lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in vals) + f" | {vals[-1] / vals[0]:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _coord_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths, steps = result["widths"], result["steps"]
    fig, axes = plt.subplots(2, steps, figsize=(3.2 * steps, 6.0), squeeze=False, sharey=True)
    for row, (param, title) in enumerate((("sp", "SP"), ("mup", "µP"))):
        names = list(result[param])
        cmap = plt.get_cmap("viridis", max(2, len(names)))
        for t in range(steps):
            ax = axes[row][t]
            for i, name in enumerate(names):
                ax.plot(widths, [result[param][name][str(w)][t] for w in widths], marker="o", ms=3,
                        color=cmap(i), label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{title}, step {t + 1}", fontsize=9)
            ax.set_xlabel("width (d_model)")
            if t == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

