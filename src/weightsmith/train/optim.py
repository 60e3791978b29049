"""Optimizers by name, their parameter groups, and learning-rate schedules.

The recipe picks the optimizer, ``[train] optimizer = "adamw" | "muon" | "lion"``, and
:func:`build_optimizer` builds it from the ``[train]`` section (:func:`list_optimizers` names them).
Every parameter group carries a ``name`` and an ``lr_scale``: the trainer sets each group's rate to
``schedule(step) * lr_scale`` (:func:`set_lr`), where the schedule peaks at ``train.lr``. The schedules
are linear in (``lr``, ``min_lr``), so a group follows the same schedule from its own base rate
``train.lr * lr_scale`` down to ``min_lr * lr_scale``. ``lr_scale`` is 1 except for Muon's groups
and µP's per-width multipliers (weightsmith.train.mup).

- **AdamW**: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (``torch.optim.AdamW``).
  Weight decay applies to matrices inside the network only; norm gains, biases and embeddings are not
  decayed (as in GPT-2/nanoGPT and LLaMA). ``train.beta1, beta2, eps`` are the paper's β1, β2, ε.
- **Muon**: Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"
  (https://kellerjordan.github.io/posts/muon/), as ``torch.optim.Muon``: SGD with Nesterov momentum
  whose update for each weight matrix is orthogonalized by ``muon_ns_steps`` Newton-Schulz iterations
  (in bf16). The post's η is our ``muon_lr``, its μ our ``muon_momentum``. It applies only to 2-D hidden
  weights; everything else is trained by AdamW at ``train.lr``, the split modded-nanogpt uses. See
  :func:`muon_split` for the exact rule.
- **Lion**: Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2
  (:class:`Lion`): the sign of an interpolated momentum; the paper's β1, β2 are our ``lion_beta1,
  lion_beta2`` and its λ is ``train.weight_decay`` (decoupled). Groups as for AdamW. The paper's advice:
  an lr 3-10x smaller than AdamW's and a weight decay 3-10x larger.
- Schedules, as a multiplier on the peak ``lr`` per optimizer step:
  ``cosine``: linear warmup over ``warmup_steps`` then cosine decay to ``min_lr`` at the end of training
  (Loshchilov & Hutter 2017, SGDR); ``wsd``: warmup-stable-decay, constant then a linear decay to
  ``min_lr`` over the last ``decay_fraction`` of training (Hu et al. 2024, MiniCPM); ``constant``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.train.config import MUP_WITH_MUON

# Last name part of a module that is a model's output projection; its weight stays with AdamW under Muon.
HEAD_NAMES = ("head", "lm_head", "classifier", "output", "decoder")


def param_groups(model: nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset(),
                 lr_scales: dict[int, float] | None = None) -> list[dict]:
    """AdamW groups: ``decay`` (2-D+ weights that are not embeddings) and ``no_decay`` (norms, biases,
    embeddings); parameters whose ``id`` is in ``exclude`` are left out, shared ones counted once.

    ``lr_scales`` ({id(parameter): multiplier}, from weightsmith.train.mup) splits each of the two by
    multiplier: a group whose ``lr_scale`` is not 1 is named ``decay*0.25`` (say); without it there are
    exactly the two groups, each at ``lr_scale`` 1."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    scales = lr_scales or {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    seen = set(exclude)
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay = p.dim() >= 2 and id(p) not in embedding_ids
        groups.setdefault((decay, float(scales.get(id(p), 1.0))), []).append(p)
    out = []
    for (decay, scale), params in groups.items():
        name = ("decay" if decay else "no_decay") + ("" if scale == 1.0 else f"*{scale:g}")
        if params or scale == 1.0:
            out.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "name": name,
                        "lr_scale": scale})
    return out


def _at_lr(groups: list[dict], lr: float) -> list[dict]:
    """Each group's starting rate, ``lr * lr_scale`` (the trainer's :func:`set_lr` keeps that ratio)."""
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


def muon_split(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs Muon trains, in model order; everything else goes to AdamW.

    A trainable parameter goes to Muon when it is 2-D and *every* module holding it (a tied weight has
    several) is an ``nn.Linear`` holding it as ``weight``, or an ``nn.RNN/LSTM/GRU`` holding it as a
    ``weight_ih_l*`` / ``weight_hh_l*`` matrix, and that module's last name part is not one of
    :data:`HEAD_NAMES` (the output head). So AdamW keeps: embeddings (a head tied to the embedding
    too), norm gains, biases, the output head, free parameters such as ViT's ``pos_emb`` and
    ``cls_token`` or Mamba's ``A_log``, and convolution filters. Conv weights (3-D and up) are left to
    AdamW on purpose: ``torch.optim.Muon`` accepts only matrices, and the flattened-filter variant of
    Jordan's CIFAR-10 speedrun is not implemented here, so a mostly convolutional net (ResNet) trains
    mostly with AdamW under ``optimizer = "muon"``.
    """
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append((mname, mod, pname))

    def hidden_matrix(mname: str, mod: nn.Module, pname: str) -> bool:
        if mname.rsplit(".", 1)[-1] in HEAD_NAMES:
            return False
        return ((isinstance(mod, nn.Linear) and pname == "weight")
                or (isinstance(mod, nn.RNNBase) and pname.startswith(("weight_ih_l", "weight_hh_l"))))

    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and all(hidden_matrix(*o) for o in owners[id(p)])]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, Algorithm 2). Per step, for gradient g and momentum m (state
    ``exp_avg``, same shape and dtype as the parameter)::

        c = β1 m + (1 - β1) g          # interpolation, only for the sign
        θ = θ - lr (sign(c) + λ θ)     # every coordinate moves by exactly lr (plus decay)
        m = β2 m + (1 - β2) g          # the momentum that is kept

    Args: ``lr`` > 0, ``betas`` = (β1, β2) in [0, 1), ``weight_decay`` = λ >= 0 (decoupled, multiplied
    by lr as in the paper). Raises ValueError for values outside those ranges.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"Lion lr must be positive, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"Lion weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                update = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


class OptimizerChain:
    """Several torch optimizers stepped as one (Muon for hidden matrices, AdamW for the rest).

    ``param_groups`` is the concatenation of theirs (what :func:`set_lr` walks); the state dict is
    ``{"optimizers": [each one's state dict]}``, in order."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise ValueError(f"expected the state of {len(self.optimizers)} chained optimizers")
        for o, s in zip(self.optimizers, parts):
            o.load_state_dict(s)


_OPTIMIZERS: dict[str, Callable[[nn.Module, Any], Any]] = {}


def register_optimizer(name: str) -> Callable:
    """Decorator: register ``builder(model, train_config, lr_scales) -> optimizer`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        _OPTIMIZERS[name] = fn
        return fn

    return deco


def list_optimizers() -> list[str]:
    return sorted(_OPTIMIZERS)


def build_optimizer(name: str, model: nn.Module, tc: Any,
                    lr_scales: dict[int, float] | None = None) -> torch.optim.Optimizer | OptimizerChain:
    """The optimizer ``name`` over ``model``'s trainable parameters, configured from ``tc``
    (weightsmith.train.config.TrainConfig). ``lr_scales`` ({id(parameter): multiplier}, µP's per-width
    rates from weightsmith.train.mup.mup_lr_scales) multiplies those parameters' rates; Muon takes none.
    Raises ConfigError for an unknown name, or for ``lr_scales`` with Muon."""
    if name not in _OPTIMIZERS:
        raise ConfigError(f"train.optimizer = {name!r} is not known; choose one of {list_optimizers()}")
    if lr_scales and name == "muon":
        raise ConfigError(MUP_WITH_MUON)
    return _OPTIMIZERS[name](model, tc, lr_scales)


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                eps: float, lr_scales: dict[int, float] | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``foreach`` kernels are used where available."""
    return torch.optim.AdamW(_at_lr(param_groups(model, weight_decay, lr_scales=lr_scales), lr), lr=lr,
                             betas=betas, eps=eps)


@register_optimizer("adamw")
def _adamw(model: nn.Module, tc: Any, lr_scales: dict[int, float] | None = None) -> torch.optim.AdamW:
    return build_adamw(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, lr_scales)


@register_optimizer("lion")
def _lion(model: nn.Module, tc: Any, lr_scales: dict[int, float] | None = None) -> Lion:
    return Lion(_at_lr(param_groups(model, tc.weight_decay, lr_scales=lr_scales), tc.lr), lr=tc.lr,
                betas=(tc.lion_beta1, tc.lion_beta2),
                weight_decay=tc.weight_decay)


@register_optimizer("muon")
def _muon(model: nn.Module, tc: Any, lr_scales: dict[int, float] | None = None) -> OptimizerChain:
    """torch.optim.Muon over :func:`muon_split` at ``muon_lr`` (group ``muon``, ``lr_scale = muon_lr /
    lr``), then AdamW over the rest at ``lr`` (groups ``decay`` and ``no_decay``)."""
    matrices = [p for _, p in muon_split(model)]
    optimizers: list[torch.optim.Optimizer] = []
    if matrices:
        optimizers.append(torch.optim.Muon(
            [{"params": matrices, "name": "muon", "lr_scale": tc.muon_lr / tc.lr}], lr=tc.muon_lr,
            weight_decay=tc.muon_weight_decay, momentum=tc.muon_momentum, nesterov=tc.muon_nesterov,
            ns_steps=tc.muon_ns_steps, adjust_lr_fn=tc.muon_adjust_lr))
    rest = param_groups(model, tc.weight_decay, exclude=frozenset(id(p) for p in matrices))
    optimizers.append(torch.optim.AdamW(rest, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps))
    return OptimizerChain(optimizers)


def set_lr(optimizer: torch.optim.Optimizer | OptimizerChain, lr: float) -> None:
    """Set every group's rate to ``lr * group["lr_scale"]`` (``lr``: the schedule's value this step)."""
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        group["lr"] = lr if scale == 1.0 else lr * scale


def load_optimizer_state(optimizer: torch.optim.Optimizer | OptimizerChain, state: dict, where: str) -> None:
    """``optimizer.load_state_dict(state)``; a state saved by another optimizer or model raises
    CheckpointError naming ``where`` (the checkpoint)."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"optimizer state in {where} does not fit this run's optimizer (was "
                              f"train.optimizer changed?): {str(e).splitlines()[0] if str(e) else e!r}") from None


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "cosine", decay_fraction: float = 0.2, progress: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    ``progress`` in [0, 1] overrides ``step / total_steps`` after warmup (used with a wall-clock
    budget). Returns a float in [min_lr, lr].
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if progress is None:
        span = max(1, total_steps - warmup_steps)
        progress = (step - warmup_steps) / span
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        start = 1.0 - decay_fraction
        if progress <= start:
            return lr
        return lr - (lr - min_lr) * (progress - start) / decay_fraction
    raise ValueError(f"unknown schedule {schedule!r}")
