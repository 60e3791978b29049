"""The whole CLI on a tiny corpus the test writes, and every bad-input case: one line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """
[data]
corpus = "{corpus}"
tokenizer = "{tokenizer}"
vocab_size = 300

[model]
family = "gpt"
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 32

[train]
batch_size = 4
max_steps = 30
warmup_steps = 5
eval_every = 10
ckpt_every = 10
log_every = 5
eval_tokens = 512

[sample]
prompt = "KING."
max_new_tokens = 10
"""


def run_cli(*args, cwd=None, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "weightsmith.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=e, timeout=600)


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("cli")
    cache = root / "cache"
    recipe = root / "tiny.toml"
    recipe.write_text(RECIPE.format(corpus=tiny_corpus, tokenizer="bpe"))
    return {"root": root, "recipe": recipe, "env": {"WEIGHTSMITH_CACHE": str(cache)}}


@pytest.fixture(scope="module")
def trained(env):
    out = env["root"] / "run"
    proc = run_cli("train", env["recipe"], "--out", out, env=env["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_train_writes_a_complete_run(trained):
    out, proc = trained
    for name in ("config.toml", "manifest.json", "metrics.jsonl", "eval.json", "samples.txt", "tokenizer.json",
                 "mfu.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    assert set(train_rows[0]) == {"step", "loss", "lr", "tokens", "tok_per_s", "elapsed_s"}
    assert train_rows[-1]["tokens"] == 30 * 4 * 32
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) >= {"val_loss", "val_bpb", "val_ppl", "val_tokens", "val_bytes"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["torch"] and manifest["machine"]["cpu_count"] and manifest["data"]["shards"]["val"]["sha256"]
    assert "run directory:" in proc.stdout and "MFU" in proc.stdout
    assert (out / "checkpoints" / "step_000030" / "model.safetensors").is_file()
    assert (out / "samples.txt").read_text().startswith("KING.")


def test_eval_recomputes_the_same_numbers(trained, env):
    out, _ = trained
    before = json.loads((out / "eval.json").read_text())
    proc = run_cli("eval", out, env=env["env"])
    assert proc.returncode == 0, proc.stderr
    after = json.loads(proc.stdout)
    assert after["val_bpb"] == pytest.approx(before["val_bpb"], rel=1e-6)
    assert after["val_tokens"] == before["val_tokens"]


def test_generate_is_seeded_and_reproducible(trained, env):
    out, _ = trained
    args = ("generate", out, "--prompt", "KING.", "--max-new-tokens", "12", "--top-k", "20", "--top-p", "0.9")
    a = run_cli(*args, "--seed", "3", env=env["env"])
    b = run_cli(*args, "--seed", "3", env=env["env"])
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("KING.")


def test_prepare_and_print_config(env):
    proc = run_cli("prepare", env["recipe"], env=env["env"])
    assert proc.returncode == 0 and "prepared data" in proc.stdout
    proc = run_cli("train", env["recipe"], "--print-config", "--model.n_layers=3", env=env["env"])
    assert proc.returncode == 0
    assert "n_layers = 3" in proc.stdout and "[train]" in proc.stdout


def test_unknown_recipe_key_lists_valid_keys(env):
    one_line_error(run_cli("train", env["recipe"], "--train.max_stepz=3", env=env["env"]),
                   "train.max_stepz", "max_steps", "valid keys")
    bad = env["root"] / "bad.toml"
    bad.write_text(env["recipe"].read_text().replace("[sample]", "[sampel]"))
    one_line_error(run_cli("train", bad, env=env["env"]), "[sampel]", "sample")


@pytest.mark.parametrize("override,field", [("--model.n_heads=3", "n_heads"),
                                            ("--model.n_kv_heads=3", "n_kv_heads")])
def test_inconsistent_shapes(env, override, field):
    one_line_error(run_cli("train", env["recipe"], override, env=env["env"]), field)


def test_missing_files(env, tmp_path):
    one_line_error(run_cli("train", tmp_path / "nope.toml", env=env["env"]), "nope.toml")
    one_line_error(run_cli("train", env["recipe"], f"--data.corpus={tmp_path / 'missing.txt'}", env=env["env"]),
                   "missing.txt")
    one_line_error(run_cli("eval", tmp_path / "not-a-run", env=env["env"]), "not-a-run")


def test_existing_run_is_never_overwritten(trained, env):
    out, _ = trained
    before = (out / "metrics.jsonl").read_bytes()
    one_line_error(run_cli("train", env["recipe"], "--out", out, env=env["env"]), str(out), "--resume")
    assert (out / "metrics.jsonl").read_bytes() == before


def test_corrupt_checkpoint(trained, env, tmp_path):
    import shutil

    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = copy / "checkpoints" / "step_000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    one_line_error(run_cli("eval", copy, env=env["env"]), "model.safetensors", "corrupt or truncated")
    one_line_error(run_cli("generate", copy, "--prompt", "a", env=env["env"]), "corrupt or truncated")


def test_corrupt_shard(env, tmp_path):
    cache = tmp_path / "c"
    e = {"WEIGHTSMITH_CACHE": str(cache)}
    assert run_cli("prepare", env["recipe"], "--data.tokenizer=char", env=e).returncode == 0
    shard = next(Path(cache).glob("data/*/val.bin"))
    shard.write_bytes(shard.read_bytes()[:-4])
    one_line_error(run_cli("prepare", env["recipe"], "--data.tokenizer=char", env=e), "val.bin", "--force")
