"""Recovery fine-tuning of a pruned run: causal-LM training that keeps the pruned weights at zero.

After ``weightsmith prune`` (weightsmith.ship.prune) a short fine-tune recovers part of the lost
accuracy (Sun et al. 2023, section 5; Frantar & Alistarh 2023 for SparseGPT). The sparsity pattern
must survive it, or the model is no longer sparse. Recipe::

    [task]
    name = "sparse-finetune"        # mask_from defaults to train.init_from
    [train]
    init_from = "runs/pruned"

The keep-mask of every ``nn.Linear`` in ``model.blocks`` is recomputed from the exact zeros of
``mask_from``'s newest checkpoint (``W != 0``, (N, K) bool) and re-applied after every optimizer step
(:meth:`Task.after_step`), so a pruned weight is zero in every checkpoint whatever the optimizer's
state does (AdamW's moments of a pruned weight may be non-zero; the weight itself is reset). Starting
from ``init_from = mask_from`` the first forward already sees the zeros. Loss, data, evaluation and
units are those of ``causal-lm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.tasks import register_task
from weightsmith.tasks.causal_lm import CausalLM


@dataclass(kw_only=True)
class SparseFinetuneConfig:
    """``[task]`` of ``sparse-finetune``.

    mask_from: run directory whose zeros define the mask (default: ``train.init_from``).
    """

    mask_from: str = ""


@register_task("sparse-finetune")
class SparseFinetune(CausalLM):
    """Next-token prediction with the sparsity mask of a pruned run kept after every step."""

    config_cls = SparseFinetuneConfig
    also_trains = ("causal-lm",)

    def setup(self, run_dir: Path, *, resume: bool, log=print) -> None:
        from weightsmith.ship.prune import prunable_linears
        from weightsmith.train.checkpoint import load_run

        source = self.cfg.mask_from or getattr(self.train_cfg, "init_from", None)
        if not source:
            raise ConfigError("task 'sparse-finetune' needs task.mask_from or train.init_from: the pruned run "
                              "whose zeros are kept, e.g. \"runs/pruned\"")
        try:
            pruned = load_run(source).model
        except CheckpointError as e:
            raise ConfigError(f"task.mask_from / train.init_from = {source!r}: {e}") from None
        self.masks = {f"{name}.weight": lin.weight.detach() != 0 for name, lin in prunable_linears(pruned)}
        zeros = sum(int((~m).sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        log(f"sparse-finetune: keeping {zeros:,} of {total:,} block-linear weights at zero "
            f"({zeros / max(total, 1):.1%}) from {source}")
        super().setup(run_dir, resume=resume, log=log)

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, keep in self.masks.items():
            p = params[name]
            if keep.device != p.device:
                keep = self.masks[name] = keep.to(p.device)
            p.mul_(keep.to(p.dtype))
