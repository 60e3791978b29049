"""Loading a run never unpickles arbitrary objects.

The payload is a pickle whose ``__reduce__`` calls ``open(sentinel, "w")``: unpickling it with plain
pickle creates the sentinel file (checked first, so the test can fail). Planted as a checkpoint's
``train_state.pt`` (read with ``torch.load(weights_only=True)``) or as its ``model.safetensors`` (read by
safetensors, which has no pickle at all), it must be refused with a CheckpointError and the sentinel must
never appear.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from weightsmith.data.prepare import sha256_file
from weightsmith.errors import CheckpointError
from weightsmith.registry import create_model
from weightsmith.train.checkpoint import META, STATE, WEIGHTS, load_run, load_train_state, load_weights, save_checkpoint


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _small_model():
    return create_model("gpt", vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_seq_len=7)


def _plant(ckpt, name, payload_bytes):
    """Replace ``ckpt/name`` and refresh meta.json's hash, so only the loader itself can refuse it."""
    (ckpt / name).write_bytes(payload_bytes)
    meta = json.loads((ckpt / META).read_text())
    meta["files"][name] = sha256_file(ckpt / name)
    (ckpt / META).write_text(json.dumps(meta))


@pytest.fixture()
def run(tmp_path):
    from weightsmith.config import dump_toml
    from weightsmith.data.tokenizers import ByteTokenizer, save_tokenizer

    model = _small_model()
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, 1, model, {"step": 1, "rng": torch.get_rng_state()})
    save_tokenizer(ByteTokenizer(), run)
    cfg = {"family": "gpt", "vocab_size": 11, "d_model": 8, "n_layers": 1, "n_heads": 2, "max_seq_len": 7}
    (run / "config.toml").write_text(dump_toml({"model": cfg}))
    return run, ckpt


def _malicious(tmp_path, how):
    sentinel = tmp_path / "pwned"
    path = tmp_path / f"payload-{how}"
    if how == "torch":
        torch.save({"step": 1, "evil": _Payload(sentinel)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(sentinel), protocol=2))
    return sentinel, path.read_bytes()


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_payload_is_live(tmp_path, how):
    """Sanity check: unsafe loading of the payload does run code (so the tests below can fail)."""
    sentinel, data = _malicious(tmp_path, how)
    (tmp_path / "f").write_bytes(data)
    if how == "torch":
        torch.load(tmp_path / "f", weights_only=False)
    else:
        pickle.loads(data)
    assert sentinel.exists()


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_train_state_refuses_pickled_code(run, tmp_path, how):
    _, ckpt = run
    assert load_train_state(ckpt)["step"] == 1  # the honest file loads
    sentinel, data = _malicious(tmp_path, how)
    _plant(ckpt, STATE, data)
    with pytest.raises(CheckpointError, match="cannot safely load"):
        load_train_state(ckpt)
    assert not sentinel.exists()


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_weights_file_refuses_pickle(run, tmp_path, how):
    """A pickle posing as model.safetensors (a fake checkpoint file) is rejected, never unpickled."""
    run_dir, ckpt = run
    sentinel, data = _malicious(tmp_path, how)
    _plant(ckpt, WEIGHTS, data)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(_small_model(), ckpt)
    with pytest.raises(CheckpointError):
        load_run(run_dir)
    assert not sentinel.exists()


def test_safetensors_path_uses_no_pickle(run, monkeypatch):
    """Loading a whole run (config, tokenizer, weights) works with every pickle entry point disabled."""
    run_dir, _ = run

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used while loading a run")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = load_run(run_dir)
    assert loaded.model.tok_emb.weight.shape == (11, 8)


def test_hf_bin_import_refuses_pickled_code(tmp_path):
    """Importing an HF checkpoint's pytorch_model.bin uses weights_only=True too."""
    from weightsmith.ship.hf_convert import read_hf_state_dict

    sentinel, data = _malicious(tmp_path, "torch")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "pytorch_model.bin").write_bytes(data)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|cannot safely"):
        read_hf_state_dict(hf_dir)
    assert not sentinel.exists()


@pytest.mark.parametrize("meta", [{"step": 1}, {"step": 1, "files": [WEIGHTS]}, [WEIGHTS], {"files": {}},
                                  {"files": {WEIGHTS: 7}}, {"files": {WEIGHTS: "x", "../outside": "y"}}],
                         ids=["no-files", "files-list", "not-an-object", "no-weights", "digest-not-str", "path"])
def test_malformed_meta_json_is_a_one_line_checkpoint_error(run, meta):
    from weightsmith.train.checkpoint import verify_checkpoint

    run_dir, ckpt = run
    (ckpt / META).write_text(json.dumps(meta))
    for load in (lambda: verify_checkpoint(ckpt), lambda: load_run(run_dir)):
        with pytest.raises(CheckpointError) as e:
            load()
        assert "\n" not in str(e.value) and str(ckpt / META) in str(e.value) and "malformed" in str(e.value)


def test_meta_json_that_is_not_utf8_is_a_checkpoint_error(run):
    run_dir, ckpt = run
    (ckpt / META).write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_run(run_dir)


@pytest.mark.parametrize("config", ["[data]\ncorpus = 'x'\n", "model = 3\n", ""],
                         ids=["no-model", "not-a-table", "empty"])
def test_config_toml_without_model_table_is_a_one_line_error(run, config):
    from weightsmith.cli import main

    run_dir, _ = run
    (run_dir / "config.toml").write_text(config)
    with pytest.raises(CheckpointError) as e:
        load_run(run_dir)
    assert "\n" not in str(e.value) and str(run_dir / "config.toml") in str(e.value) and "[model]" in str(e.value)
    assert main(["generate", str(run_dir), "--prompt", "a"]) == 2
