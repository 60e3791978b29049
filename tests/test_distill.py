"""Distillation: the loss against a hand computation, alpha=0 against causal-LM, a frozen unsaved teacher,
exact resume, and a student whose data is not the teacher's is refused in one line."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from weightsmith.cli import main
from weightsmith.errors import ConfigError, DataError
from weightsmith.registry import create_model
from weightsmith.tasks import get_task
from weightsmith.tasks.causal_lm import CausalLM
from weightsmith.tasks.distill import Distill, DistillConfig, distillation_loss
from weightsmith.train.checkpoint import list_checkpoints, load_run, save_checkpoint
from weightsmith.train.loop import train

QUIET = dict(log=lambda *a: None)


def hand_loss(s, t, y, tau, alpha):
    """Per-position loops with math.exp/log: alpha tau^2 KL(p_t || p_s) + (1 - alpha) CE, means over positions."""
    B, T, V = s.shape
    kl_sum = ce_sum = 0.0
    for b in range(B):
        for i in range(T):
            zs = [float(v) / tau for v in s[b, i]]
            zt = [float(v) / tau for v in t[b, i]]
            ls = math.log(sum(math.exp(z) for z in zs))
            lt = math.log(sum(math.exp(z) for z in zt))
            kl_sum += sum(math.exp(zt[v] - lt) * ((zt[v] - lt) - (zs[v] - ls)) for v in range(V))
            raw = [float(v) for v in s[b, i]]
            ce_sum += math.log(sum(math.exp(z) for z in raw)) - raw[int(y[b, i])]
    kl, ce = kl_sum / (B * T), ce_sum / (B * T)
    return alpha * tau**2 * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("tau,alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 1.0), (0.5, 0.0)])
def test_loss_equals_a_hand_computation(tau, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g) * 3, torch.randn(2, 3, 7, generator=g) * 3
    y = torch.randint(7, (2, 3), generator=g)
    loss, kl, ce = distillation_loss(s, t, y, temperature=tau, alpha=alpha)
    ref = hand_loss(s, t, y, tau, alpha)
    for got, want in zip((loss, kl, ce), ref, strict=True):
        assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)
    _, kl_same, _ = distillation_loss(s, s, y, temperature=tau, alpha=alpha)
    assert float(kl_same) == pytest.approx(0.0, abs=1e-6)  # KL of a distribution with itself


def _task_with_teacher(alpha, teacher):
    task = Distill.for_contract_tests()
    task.cfg = DistillConfig(teacher_run="unused", temperature=2.0, alpha=alpha)
    task.teacher = teacher.eval().requires_grad_(False)
    return task


def test_alpha_zero_is_exactly_the_causal_lm_loss_and_gradient():
    torch.manual_seed(0)
    student = create_model("gpt", vocab_size=13, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    teacher = create_model("gpt", vocab_size=13, d_model=24, n_layers=2, n_heads=2, max_seq_len=16)
    batch = CausalLM.example_batch(student.config, 3, torch.Generator().manual_seed(1))
    ref, _ = CausalLM.for_contract_tests().loss(student, batch)
    ref.backward()
    ref_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    loss, parts = _task_with_teacher(0.0, teacher).loss(student, batch)
    assert torch.equal(loss, ref)
    loss.backward()
    for p, g in zip(student.parameters(), ref_grads, strict=True):
        assert torch.equal(p.grad, g)
    assert parts["ce"] == ref.item() and parts["kl"] > 0
    assert all(p.grad is None for p in teacher.parameters())
    loss_mixed, _ = _task_with_teacher(0.5, teacher).loss(student, batch)
    assert not torch.equal(loss_mixed, ref)


@pytest.mark.parametrize("field,value", [("temperature", 0.0), ("temperature", -1.0), ("alpha", 1.5),
                                         ("alpha", -0.1)])
def test_config_rejects_impossible_values(field, value):
    with pytest.raises(ConfigError, match=f"task.{field}"):
        DistillConfig(teacher_run="runs/x", **{field: value})


# ------------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("distill")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIGHTSMITH_CACHE", str(root / "cache"))
        run = train("recipes/tiny.toml", [f"--data.corpus={tiny_corpus}", "--train.max_steps=20",
                                          "--sample.max_new_tokens=1"], out=root / "teacher", **QUIET)
        yield run, root, tiny_corpus


def student_args(teacher_dir, corpus, *extra):
    return [f"--data.corpus={corpus}", "--task.name=distill", f"--task.teacher_run={teacher_dir}",
            "--task.temperature=2.0", "--task.alpha=0.7", "--model.d_model=16", "--model.n_layers=1",
            "--train.max_steps=6", "--train.ckpt_every=3", "--train.log_every=1", "--train.eval_every=100",
            "--sample.max_new_tokens=1", *extra]


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["kl"], r["ce"]) for r in rows if "loss" in r]


def test_teacher_is_frozen_in_eval_mode_and_absent_from_student_checkpoints(teacher, tmp_path, monkeypatch):
    teacher_dir, root, corpus = teacher
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(root / "cache"))
    seen = []
    orig = Distill.loss

    def spy(self, model, batch):
        seen.append((self.teacher.training, any(p.requires_grad for p in self.teacher.parameters()),
                     model.training))
        return orig(self, model, batch)

    monkeypatch.setattr(Distill, "loss", spy)
    instances = []
    orig_setup = Distill.setup
    monkeypatch.setattr(Distill, "setup", lambda self, *a, **k: (instances.append(self), orig_setup(self, *a, **k)))
    run = train("recipes/tiny.toml", student_args(teacher_dir, corpus), out=tmp_path / "student", **QUIET)
    assert len(seen) == 6 and all(s == (False, False, True) for s in seen)  # teacher eval + frozen, student train
    task = instances[0]
    assert all(p.grad is None for p in task.teacher.parameters())
    ref = load_run(teacher_dir).model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in task.teacher.state_dict().items())  # unchanged by training
    student = load_run(run).model
    assert student.config.d_model == 16 and student.config.vocab_size == load_run(teacher_dir).model.config.vocab_size
    for ckpt in list_checkpoints(run):
        saved = load_file(ckpt / "model.safetensors")  # the student's tensors, with the student's shapes
        own = student.state_dict()
        assert saved and set(saved) <= set(own) and all(t.shape == own[k].shape for k, t in saved.items())
        assert sum(t.numel() for t in saved.values()) < sum(p.numel() for p in task.teacher.parameters())
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
        assert state["task"] == {}
        n_opt = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
        assert n_opt == len(list(student.parameters()))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["task"] == "distill" and manifest["data"]["teacher"]["model_sha256"]
    assert (run / "eval.json").is_file() and json.loads((run / "eval.json").read_text())["val_bpb"] > 0
    steps = losses(run)
    assert [s for s, *_ in steps] == [1, 2, 3, 4, 5, 6]
    for _, loss, kl, ce in steps:
        assert loss == pytest.approx(0.7 * 4.0 * kl + 0.3 * ce, rel=1e-5)


def test_resume_is_exact_and_refuses_a_changed_teacher(teacher, tmp_path, monkeypatch):
    teacher_dir, root, corpus = teacher
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(root / "cache"))
    tdir = tmp_path / "teacher"
    shutil.copytree(teacher_dir, tdir)
    full = train("recipes/tiny.toml", student_args(tdir, corpus), out=tmp_path / "full", **QUIET)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(list_checkpoints(cut)[-1])  # back to the step-3 checkpoint; the resume redoes steps 4-6
    assert list_checkpoints(cut)[-1].name.endswith("3")
    train("recipes/tiny.toml", [], out=cut, resume=True, **QUIET)
    assert losses(cut) == losses(full)
    a, b = load_run(full).model.state_dict(), load_run(cut).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    shutil.rmtree(list_checkpoints(cut)[-1])
    changed = load_run(tdir).model
    with torch.no_grad():
        changed.lm_head.weight.mul_(1.01)
    save_checkpoint(tdir, 999, changed, None)
    with pytest.raises(DataError, match="not the teacher"):
        train("recipes/tiny.toml", [], out=cut, resume=True, **QUIET)


def test_student_data_must_be_the_teachers(teacher, tmp_path, monkeypatch, capsys):
    teacher_dir, root, corpus = teacher
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(root / "cache"))
    args = ["train", "recipes/tiny.toml", "--out", str(tmp_path / "s"),
            *student_args(teacher_dir, corpus, "--data.tokenizer=char")]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task.teacher_run" in err[0] and "tokenizer" in err[0], err
    assert main(["train", "recipes/tiny.toml", "--out", str(tmp_path / "s2"), "--task.name=distill",
                 f"--data.corpus={corpus}"]) == 2
    assert "task.teacher_run is required" in capsys.readouterr().err
    assert get_task("distill") is Distill
