"""The generic trainer: signals, checkpoint order and re-saves, torn logs, recipe checks before any work."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_cli import RECIPE, one_line_error, run_cli
from test_resume import losses

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.models.gpt import GPT, GPTConfig
from weightsmith.recipe import recipe_from_tree
from weightsmith.train.checkpoint import list_checkpoints, save_checkpoint, verify_checkpoint
from weightsmith.train.config import TrainConfig
from weightsmith.train.loop import _read_metrics


def _recipe(tmp_path, corpus, steps=60, ckpt_every=20):
    recipe = tmp_path / "r.toml"
    text = RECIPE.format(corpus=corpus, tokenizer="char").replace("max_steps = 30", f"max_steps = {steps}")
    recipe.write_text(text.replace("log_every = 5", "log_every = 1").replace("ckpt_every = 10",
                                                                             f"ckpt_every = {ckpt_every}"))
    return recipe


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_the_last_step_and_resume_is_identical(tmp_path, tiny_corpus, sig, code):
    recipe = _recipe(tmp_path, tiny_corpus, steps=400, ckpt_every=1000)  # no periodic checkpoint before the signal
    env = dict(os.environ, WEIGHTSMITH_CACHE=str(tmp_path / "cache"))
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "weightsmith.cli", "train", str(recipe), "--out", str(run),
                          "--train.max_steps=400"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and len(losses(run)) >= 15):
        assert p.poll() is None, p.stderr.read()
        assert time.time() < deadline
        time.sleep(0.01)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in err, err
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1
    stopped_at = verify_checkpoint(ckpts[0])["step"]
    assert stopped_at == max(losses(run)) and 15 <= stopped_at < 400  # the last finished step, logged and saved

    proc = run_cli("train", recipe, "--out", run, "--resume", "--train.max_steps=400", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = tmp_path / "ref"
    proc = run_cli("train", recipe, "--out", ref, "--train.max_steps=400", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = losses(ref), losses(run)
    assert sorted(b) == list(range(1, 401))
    assert a == b  # bit-identical at every step, before and after the signal


def test_torn_final_metrics_line_is_dropped_and_others_are_errors(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in _read_metrics(path)] == [1, 2]
    assert [r["step"] for r in _read_metrics(path, up_to_step=1)] == [1]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(CheckpointError, match="line 2"):
        _read_metrics(path)


def test_checkpoints_are_ordered_by_step_number_and_rotation_keeps_the_newest(tmp_path):
    model = GPT(GPTConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_seq_len=8))
    for step in (999_998, 999_999, 1_000_000):
        save_checkpoint(tmp_path, step, model, None, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_999999", "step_1000000"]


def test_resaving_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    model = GPT(GPTConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_seq_len=8))
    first = save_checkpoint(tmp_path, 5, model, None)
    before = verify_checkpoint(first)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).split(os.sep)[-1].startswith(".tmp-"):  # the rename of the new checkpoint into place
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 5, model, None)
    monkeypatch.setattr(os, "replace", real_replace)
    ckpts = list_checkpoints(tmp_path)  # the old checkpoint is still there, intact (or back in place)
    assert [p.name for p in ckpts] == ["step_000005"] or any(
        verify_checkpoint(p) == before for p in (tmp_path / "checkpoints").rglob("step_000005"))


@pytest.mark.parametrize("field, value, needle", [
    ("beta2", 1.5, "train.beta2"), ("beta1", -0.1, "train.beta1"), ("eval_batch_size", 0, "train.eval_batch_size"),
    ("eval_tokens", 0, "train.eval_tokens"), ("min_lr", 1.0, "train.min_lr"), ("decay_fraction", 0.0, "decay_fraction"),
    ("grad_clip", -1.0, "train.grad_clip"), ("seq_len", 0, "train.seq_len")])
def test_train_config_rejects_impossible_values(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**{field: value})


def test_untrainable_family_is_rejected_before_any_work(tmp_path, tiny_corpus):
    tree = {"data": {"corpus": str(tmp_path / "does-not-exist.txt")}, "model": {"family": "bert"},
            "task": {"name": "causal-lm"}}
    with pytest.raises(ConfigError, match="trainable families: .*gpt"):
        recipe_from_tree(tree)  # fails on the family, before looking at the (missing) corpus


def test_cli_rejects_a_task_that_cannot_train_the_family(tmp_path, tiny_corpus):
    recipe = _recipe(tmp_path, tiny_corpus)
    proc = run_cli("train", recipe, "--out", tmp_path / "x", "--model.family=bert", "--task.name=causal-lm",
                   env={"WEIGHTSMITH_CACHE": str(tmp_path / "cache")})
    one_line_error(proc, "trainable families")
    assert not (tmp_path / "cache").exists()  # no data work happened
    for bad, needle in (("--train.beta2=1.5", "train.beta2"), ("--train.eval_batch_size=0", "eval_batch_size")):
        one_line_error(run_cli("train", recipe, "--out", tmp_path / "y", bad), needle)
    (tmp_path / "afile").write_text("x")
    one_line_error(run_cli("train", recipe, "--out", tmp_path / "afile"), "existing file")


def test_plain_progress_lines_when_stdout_is_not_a_terminal(tmp_path, tiny_corpus):
    recipe = _recipe(tmp_path, tiny_corpus, steps=6)
    proc = run_cli("train", recipe, "--out", tmp_path / "run", "--train.log_every=2",
                   env={"WEIGHTSMITH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ") and "ETA" in ln]
    assert [ln.split()[1] for ln in lines] == ["2/6", "4/6", "6/6"]
    assert all("loss" in ln and "tok/s" in ln and "lr" in ln for ln in lines)
    assert json.loads((tmp_path / "run" / "mfu.json").read_text())["datasheet_peak_flops_per_s"] is None


def test_tokenizer_json_is_written_atomically(tmp_path, monkeypatch):
    from weightsmith.data.tokenizers import ByteTokenizer, save_tokenizer

    save_tokenizer(ByteTokenizer(), tmp_path)
    before = (tmp_path / "tokenizer.json").read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        save_tokenizer(ByteTokenizer(), tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left behind


def test_layer_grad_norms_partition_the_total_norm_and_are_logged(tmp_path, tiny_corpus):
    import torch

    from weightsmith.train.loop import grad_group, layer_grad_norms, train

    assert grad_group("blocks.3.attn.q_proj.weight") == "blocks.3" and grad_group("tok_emb.weight") == "tok_emb"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, d_model=8, n_layers=3, n_heads=2, max_seq_len=8))
    idx = torch.randint(11, (2, 8))
    model(idx).logsumexp(-1).sum().backward()
    groups, total = layer_grad_norms(model)
    assert list(groups) == ["tok_emb", "blocks.0", "blocks.1", "blocks.2", "final_norm"]
    ref = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert total == pytest.approx(float(ref), rel=1e-5)
    assert sum(v * v for v in groups.values()) == pytest.approx(total * total, rel=1e-5)
    block1 = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.startswith("blocks.1.")])
    assert groups["blocks.1"] == pytest.approx(float(block1.norm()), rel=1e-5)

    run = train(_recipe(tmp_path, tiny_corpus, steps=6), ["--train.log_grad_norms=true"], out=tmp_path / "run",
                log=lambda *a: None)
    rows = [r for r in _read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 6 and all(set(r["grad_norm"]) >= {"tok_emb", "blocks.0"} and r["grad_norm_total"] > 0
                                  for r in rows)
