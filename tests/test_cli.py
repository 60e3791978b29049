"""The whole CLI on a tiny corpus the test writes, and every bad-input case: one line, exit 2."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightsmith import __version__
from weightsmith.cli import main

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
    assert set(train_rows[0]) == {"step", "loss", "lr", "grad_norm_total", "tokens", "tok_per_s", "elapsed_s"}
    assert all(r["grad_norm_total"] > 0 and math.isfinite(r["grad_norm_total"]) for r in train_rows)
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
    c = run_cli(*args, "--seed", "4", env=env["env"])
    assert c.returncode == 0, c.stderr
    assert c.stdout != a.stdout and c.stdout.startswith("KING.")


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


# ------------------------------------------------------------------------------------------------
# in-process checks (main([...]) with capsys): one `error:` line and exit 2, help, version


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of main([...]) in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(capsys, *argv, needles=()):
    code, _, err = cli(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def short_window(trained, tmp_path_factory):
    """The trained run with max_seq_len cut from 32 to 16 (RoPE: no parameter depends on it)."""
    import shutil

    from weightsmith.config import dump_toml, load_toml

    run = tmp_path_factory.mktemp("window") / "run"
    shutil.copytree(trained[0], run)
    tree = load_toml(run / "config.toml")
    assert tree["model"].get("pos", "rope") == "rope"
    tree["model"]["max_seq_len"] = 16
    (run / "config.toml").write_text(dump_toml(tree))
    return run


def naive_greedy_text(run_dir, prompt, n):
    """Reference: n greedy tokens, each from a fresh full forward over the last max_seq_len tokens."""
    from weightsmith.train.checkpoint import load_run

    run = load_run(run_dir)
    ids, L = run.tokenizer.encode(prompt), run.model.config.max_seq_len
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(run.model(torch.tensor([ids[-L:]]))[0, -1].argmax()))
    return run.tokenizer.decode(ids), len(ids)


def test_generate_runs_past_max_seq_len(short_window, tmp_path, capsys):
    """40 new tokens with max_seq_len=16, single, batched and speculative: the naive sliding-window loop's."""
    prompts = ["KING. The", "a", "HAMLET. What lord doth"]
    refs = [naive_greedy_text(short_window, p, 40) for p in prompts]
    assert refs[0][1] > 16 + 16  # the window slides for more than a whole window
    greedy = ("--max-new-tokens", 40, "--temperature", 0)
    code, out, err = cli(capsys, "generate", short_window, "--prompt", prompts[0], *greedy)
    assert code == 0, err
    assert out == refs[0][0] + "\n"
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    code, out, err = cli(capsys, "generate", short_window, "--prompts-file", tmp_path / "p.txt", *greedy)
    assert code == 0, err
    assert out == "\n\n".join(f"=== {i} ===\n{t}" for i, (t, _) in enumerate(refs)) + "\n"
    code, out, err = cli(capsys, "generate", short_window, "--prompt", prompts[0], "--draft", short_window,
                         "--num-draft-tokens", 3, *greedy)
    assert code == 0, err
    assert out.startswith(refs[0][0] + "\nspeculative: acceptance rate 1.00")


def test_generate_prompt_longer_than_the_window(short_window, capsys):
    one_line(capsys, "generate", short_window, "--prompt", "KING. The lord " * 10,
             needles=("prompt is", "longer than max_seq_len=16"))


def test_generate_help_states_the_window(capsys):
    code, out, _ = cli(capsys, "generate", "--help")
    assert code == 0
    assert "max_seq_len" in out and "sliding window" in out and "exactly" in out


@pytest.mark.parametrize("n", ["-5", "0"])
def test_generate_max_new_tokens_must_be_positive(trained, capsys, n):
    one_line(capsys, "generate", trained[0], "--prompt", "a", "--max-new-tokens", n,
             needles=("--max-new-tokens", ">= 1", n))


@pytest.mark.parametrize("argv", [["generate", "RUN", "--prompt", "a"],
                                  ["export", "RUN", "--format", "hf", "--out", "OUT"],
                                  ["quantize", "RUN", "--method", "int8", "--out", "OUT"], ["models"]])
def test_overrides_are_rejected_where_nothing_reads_them(trained, tmp_path, capsys, argv):
    argv = [trained[0] if a == "RUN" else tmp_path / "o" if a == "OUT" else a for a in argv]
    one_line(capsys, *argv, "--train.max_steps=1", needles=(f"{argv[0]} takes no --section.key overrides",
                                                              "--train.max_steps=1", "prepare, train, inspect"))
    assert not (tmp_path / "o").exists()


def test_eval_on_other_data_leaves_the_run_as_it_is(trained, env, tiny_corpus, tmp_path, capsys, monkeypatch):
    """eval --data.corpus=X measures the run's model on X with the run's tokenizer: on the run's own
    corpus it equals plain eval; on another it differs, goes to --out only, and eval.json is untouched."""
    monkeypatch.setenv("WEIGHTSMITH_CACHE", env["env"]["WEIGHTSMITH_CACHE"])
    run = trained[0]
    before = (run / "eval.json").read_bytes()
    code, out, err = cli(capsys, "eval", run, f"--data.corpus={tiny_corpus}")
    assert code == 0, err
    own = json.loads(out)
    assert own["val_loss"] == pytest.approx(json.loads(before)["val_loss"], rel=1e-9)
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(tiny_corpus.read_text().split())))  # same words, another text
    code, out, err = cli(capsys, "eval", run, f"--data.corpus={other}", "--out", tmp_path / "other.json")
    assert code == 0, err
    result = json.loads(out)
    assert json.loads((tmp_path / "other.json").read_text()) == result
    assert result["data"] == [f"--data.corpus={other}"] and result["val_loss"] != own["val_loss"]
    assert (run / "eval.json").read_bytes() == before and not (run / "shakespeare_eval.json").exists()
    one_line(capsys, "eval", run, f"--data.corpus={other}", "--out", tmp_path / "other.json",
             needles=("already exists",))
    one_line(capsys, "eval", run, "--train.max_steps=1", needles=("only --data.*", "--train.max_steps=1"))
    one_line(capsys, "eval", run, "--data.vocab_size=300", needles=("own tokenizer", "--data.vocab_size"))
    one_line(capsys, "eval", run, "--out", tmp_path / "x.json", needles=("--data.*",))
    assert (run / "eval.json").read_bytes() == before and not (tmp_path / "x.json").exists()


def test_overrides_still_reach_inspect(capsys):
    code, out, err = cli(capsys, "inspect", "gpt-tiny", "--model.n_layers=3", "--json")
    assert code == 0, err
    assert json.loads(out)["config"]["n_layers"] == 3


@pytest.mark.parametrize("argv,needle", [(["models", "--bogus"], "unrecognized arguments: --bogus"),
                                         (["generate", "x", "--prompt", "a", "--top-k", "many"], "--top-k"),
                                         (["export", "x", "--format", "tar", "--out", "y"], "invalid choice"),
                                         (["export", "x"], "required: --format, --out"),
                                         (["frobnicate"], "invalid choice"), ([], "required")])
def test_bad_command_line_is_one_line(capsys, argv, needle):
    err = one_line(capsys, *argv, needles=(needle,))
    assert "usage:" not in err


def test_unknown_flag_is_one_line_from_the_shell(env):
    proc = run_cli("models", "--bogus", env=env["env"])
    one_line_error(proc, "unrecognized arguments: --bogus", "weightsmith models --help")
    assert proc.stdout == ""


def test_out_naming_an_existing_file(trained, tmp_path, capsys):
    file = tmp_path / "taken.txt"
    file.write_text("mine")
    for cmd in (["export", trained[0], "--format", "hf"], ["quantize", trained[0], "--method", "int8"]):
        one_line(capsys, *cmd, "--out", file, needles=(str(file), "already exists (a file)"))
        one_line(capsys, *cmd, "--out", file / "sub", needles=(f"{file} is a file, not a directory",))
    assert file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]


def test_models_into_a_closed_pipe_is_quiet():
    """`weightsmith models | head` : the reader goes away before we write; no traceback, no stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "weightsmith.cli", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the only read end: every write the child makes fails with EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 1
    assert err == b""


def test_version_and_help(capsys):
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out == f"weightsmith {__version__}\n"
    code, out, _ = cli(capsys, "train", "--help")
    assert code == 0
    assert "--section.key=value" in out and "--train.lr=3e-4" in out
    assert "examples:" in out and "weightsmith train recipes/tiny.toml" in out
    code, out, _ = cli(capsys, "quantize", "--help")
    assert "(default: 64)" in out and "examples:" in out and "overrides" not in out
    code, out, _ = cli(capsys, "--help")
    assert "--section.key=value" in out and "--version" in out
