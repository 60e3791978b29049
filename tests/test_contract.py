"""Contract tests over the whole registry, with no per-family branches (timm's test_models.py).

Every registered family, at its default config (small by design), must: build on the meta device with
an analytic parameter count equal to ``sum(numel)``; run its task's loss forward and backward on the
task's example batch; and give every parameter a finite gradient. A backbone without a task of its own
must say so and still build; a new family is covered the day it is registered.
"""

import pytest
import torch

from weightsmith.analysis import count_params
from weightsmith.registry import create_model, get_family, list_families, list_models, model_from_config, resolve
from weightsmith.tasks import get_task

FAMILIES = list_families()


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_on_meta_with_analytic_parameter_count(family):
    fam = get_family(family)
    cfg = fam.config_cls()
    model = model_from_config(family, cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert count_params(family, cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(set(list_models()) - set(FAMILIES)))
def test_every_preset_builds_on_meta_with_analytic_parameter_count(name):
    fam, cfg = resolve(name)
    model = create_model(name, device="meta")
    assert count_params(fam.name, cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_task_loss_backward_gives_every_parameter_a_finite_gradient(family):
    fam = get_family(family)
    if fam.task is None:  # a backbone: trained through another family that wraps it
        assert any(get_family(f).task is not None and f.startswith(family) for f in FAMILIES), \
            f"backbone {family} has no trainable wrapper family"
        return
    cfg = fam.config_cls()
    torch.manual_seed(0)
    model = model_from_config(family, cfg)
    model.train()
    task_cls = get_task(fam.task)
    task = task_cls.for_contract_tests()
    batch = task_cls.example_batch(cfg, 3, torch.Generator().manual_seed(0))
    loss, parts = task.loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in parts.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{family}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{family}: {name} has a non-finite gradient"
    assert task.count(batch) > 0
