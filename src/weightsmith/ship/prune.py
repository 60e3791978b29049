"""Post-training weight pruning of a built model, applied from outside as a pass.

    weightsmith prune RUN_DIR --method magnitude|wanda --sparsity 0.5|2:4 --out DIR

What is pruned: every ``nn.Linear`` inside ``model.blocks`` (attention q/k/v/o, the MLP, MoE experts
and routers), never the embedding or the lm_head. A weight is (out_features, in_features) = (N, K).

Scores (higher = kept):

* ``magnitude``: ``|W_ij|``.
* ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"):
  ``|W_ij| * ||X_j||_2``, where ``X_j`` is input feature j of the layer over every calibration token
  (the paper's ``||X_j||_2``; our X is (tokens, K)). As in the paper's code, blocks are pruned in order
  and a block's inputs come from the already pruned blocks before it. A layer that no calibration token
  reaches (an MoE expert nobody is routed to) falls back to magnitude and is listed in ``prune.json``.

Patterns, both compared per output row (Wanda's per-output comparison group):

* unstructured sparsity ``s`` in [0, 1): in each row the ``floor(s * K)`` lowest scores become zero;
* ``2:4`` semi-structured: in each group of 4 consecutive input weights of a row, the 2 lowest scores
  become zero (NVIDIA's sparse tensor core pattern); K must be a multiple of 4.

Ties are broken by ``torch.topk``/``torch.sort`` order. The pruned model is an ordinary dense model
with zeros, saved as a normal run; ``sparse-finetune`` (weightsmith.tasks.sparse_finetune) recovers
accuracy while keeping those zeros.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from weightsmith.errors import CheckpointError, ConfigError

METHODS = ("magnitude", "wanda")
PRUNE_FILE = "prune.json"


def parse_sparsity(value: str | float) -> float | str:
    """``"2:4"`` -> ``"2:4"``; ``"0.5"`` / 0.5 -> 0.5. Raises ConfigError for anything else."""
    if isinstance(value, str) and value.strip() == "2:4":
        return "2:4"
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = None
    if s is None or not 0 <= s < 1:
        raise ConfigError(f"--sparsity {value!r} must be a fraction in [0, 1) (e.g. 0.5) or '2:4'")
    return s


def mask_from_scores(scores: torch.Tensor, sparsity: float | str) -> torch.Tensor:
    """Keep-mask (N, K) bool from scores (N, K): per row, the lowest scores are pruned (module docstring).

    Raises:
        ConfigError: ``2:4`` with K not a multiple of 4.
    """
    N, K = scores.shape
    if sparsity == "2:4":
        if K % 4:
            raise ConfigError(f"--sparsity 2:4 needs in_features divisible by 4; a layer has {K}")
        groups = scores.reshape(N, K // 4, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
        return keep.reshape(N, K)
    n_prune = int(sparsity * K)
    keep = torch.ones(N, K, dtype=torch.bool, device=scores.device)
    if n_prune:
        keep.scatter_(1, scores.topk(n_prune, dim=1, largest=False).indices, False)
    return keep


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||_2``: weight (N, K), input_sq_sum (K,) = sum over tokens of x_j^2 -> (N, K)."""
    return weight.detach().abs().float() * input_sq_sum.float().sqrt()[None, :]


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every ``nn.Linear`` in ``model.blocks``, in forward order."""
    if not hasattr(model, "blocks"):
        raise ConfigError(f"{type(model).__name__} has no .blocks; only block-stacked causal LMs can be pruned")
    return [(f"blocks.{n}", m) for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


class _Stop(Exception):
    pass


@torch.no_grad()
def _block_input_stats(model: nn.Module, block: nn.Module, calibration: torch.Tensor, batch: int = 16):
    """{linear: sum over calibration tokens of x^2 (K,)} for the linears of ``block``; stops the forward there."""
    sums: dict[nn.Module, torch.Tensor] = {}
    handles = []
    for m in block.modules():
        if isinstance(m, nn.Linear):
            def hook(mod, args, _m=m):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[_m] = sums.get(_m, 0) + x.pow(2).sum(0)
            handles.append(m.register_forward_pre_hook(hook))

    def stop(mod, args, out):
        raise _Stop

    handles.append(block.register_forward_hook(stop))
    try:
        for i in range(0, len(calibration), batch):
            try:
                model(calibration[i:i + batch])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return sums


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sparsity: float | str, calibration: torch.Tensor | None = None,
                *, fallbacks: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Prune ``model``'s block linears in place; returns {weight name: keep-mask (N, K) bool}.

    Args:
        method: ``magnitude`` or ``wanda``; sparsity: a fraction in [0, 1) or ``"2:4"``.
        calibration: token ids (n_samples, T) int64, required by ``wanda``.
        fallbacks: ``wanda`` appends the names of layers no calibration token reached (pruned by magnitude).

    Raises:
        ConfigError: unknown method, bad sparsity, missing calibration, 2:4 on K not divisible by 4.
    """
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not supported; choose one of {list(METHODS)}")
    if sparsity != "2:4":
        sparsity = parse_sparsity(sparsity)
    if method == "wanda" and calibration is None:
        raise ConfigError("wanda needs calibration token windows")
    linears = prunable_linears(model)
    names = {m: n for n, m in linears}
    masks: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()

    def prune(name: str, lin: nn.Linear, scores: torch.Tensor) -> None:
        keep = mask_from_scores(scores, sparsity)
        lin.weight.mul_(keep.to(lin.weight.dtype))
        masks[f"{name}.weight"] = keep

    if method == "magnitude":
        for name, lin in linears:
            prune(name, lin, lin.weight.detach().abs().float())
    else:
        for block in model.blocks:
            stats = _block_input_stats(model, block, calibration)
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    sq = stats.get(m)
                    if sq is None or not bool((sq > 0).any()):
                        if fallbacks is not None:
                            fallbacks.append(names[m])
                        prune(names[m], m, m.weight.detach().abs().float())
                    else:
                        prune(names[m], m, wanda_scores(m.weight, sq))
    model.train(was_training)
    return masks


def sparsity_report(model: nn.Module) -> dict:
    """Fraction of exact zeros over the block linears' weights, overall and per layer."""
    per, zeros, total = {}, 0, 0
    for name, lin in prunable_linears(model):
        z = int((lin.weight == 0).sum())
        per[name] = z / lin.weight.numel()
        zeros, total = zeros + z, total + lin.weight.numel()
    return {"block_linear_sparsity": zeros / max(total, 1), "per_layer": per}


def prune_run(run_dir: str | Path, method: str, sparsity: str | float, out: str | Path, *,
              n_calibration: int = 128, measure: bool = True, log=print) -> dict:
    """Prune the newest checkpoint of ``run_dir`` into a new run directory ``out``, atomically.

    ``out`` gets config.toml, tokenizer.json and manifest.json copied from the source, one checkpoint of
    the pruned weights, and ``prune.json``: method, sparsity, the block-linear sparsity reached, val_bpb
    (bits per byte over the whole validation split) before and after, and the wanda fallbacks. Wanda's
    calibration windows are ``n_calibration`` random training windows of ``max_seq_len`` tokens (seed 0).

    Raises:
        ConfigError: bad method / sparsity; CheckpointError: ``out`` exists, the source is not a run or is
        quantized; DataError: the rebuilt data is not what the run was trained on.
    """
    from weightsmith.ship.export import atomic_output_dir
    from weightsmith.ship.quantize import _measure, calibration_windows
    from weightsmith.train.checkpoint import CKPT_DIR, load_run, save_checkpoint

    run_dir, out = Path(run_dir), Path(out)
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not supported; choose one of {list(METHODS)}")
    sparsity = parse_sparsity(sparsity)
    if out.exists():
        raise CheckpointError(f"--out {out} already exists; prune never overwrites, choose a new path")
    run = load_run(run_dir)
    if "quantization" in run.config:
        raise CheckpointError(f"{run_dir} is quantized; prune its fp32 source run")
    model = run.model
    prunable_linears(model)
    result: dict = {"method": method, "sparsity": sparsity, "source": str(run_dir.resolve()),
                    "checkpoint": run.checkpoint.name}
    data = None
    if measure or method == "wanda":
        from weightsmith.runs import prepare_run_data

        data = prepare_run_data(run_dir, run.config)
    if measure:
        result["before"] = {k: v for k, v in _measure(model, run.config, data.val, run.tokenizer.token_bytes()).items()
                            if k != "decode_tokens_per_s"}
    calibration = calibration_windows(data.train, n_calibration, model.config.max_seq_len) if method == "wanda" \
        else None
    fallbacks: list[str] = []
    t0 = time.perf_counter()
    prune_model(model, method, sparsity, calibration, fallbacks=fallbacks)
    result["prune_seconds"] = round(time.perf_counter() - t0, 2)
    result["magnitude_fallback"] = fallbacks
    result["block_linear_sparsity"] = sparsity_report(model)["block_linear_sparsity"]
    if measure:
        result["after"] = {k: v for k, v in _measure(model, run.config, data.val, run.tokenizer.token_bytes()).items()
                           if k != "decode_tokens_per_s"}
        result["delta_bpb"] = result["after"]["val_bpb"] - result["before"]["val_bpb"]
    step = int(run.checkpoint.name.split("_")[-1])
    with atomic_output_dir(out) as tmp:
        shutil.copyfile(run_dir / "config.toml", tmp / "config.toml")
        for name in ("tokenizer.json", "manifest.json"):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)
        ckpt = save_checkpoint(tmp, step, model, None)
        result["checkpoint_dir"] = f"{CKPT_DIR}/{ckpt.name}"
        (tmp / PRUNE_FILE).write_text(json.dumps(result, indent=2) + "\n")
    log(f"pruned {run_dir} ({method}, {sparsity}) -> {out}")
    return result
