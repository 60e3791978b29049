"""GGUF export of the state-space families (llama.cpp archs ``mamba2`` and ``mamba``).

Default tier: the file read back with ``gguf.GGUFReader`` holds our tensors after the documented
transforms (``ship/export_gguf_ssm.py``), bit for bit in f32; the metadata llama.cpp's loader reads is
there and right; configs and families llama.cpp cannot run fail in one line naming the field.

``llamacpp`` tier (``pytest -m llamacpp``): real llama.cpp (llama-cpp-python) loads the files; its logits
over a whole prompt equal ours in fp32 (atol 1e-3, as the GPT exports), and greedy decoding token by
token, which carries llama.cpp's recurrent state, picks our tokens.

Runs are tiny and trained a few AdamW steps (so the logits are not flat), with distinct sizes:

- ``mamba2_byte``: byte tokenizer, d_model 40, 5 heads of 16, d_state 7, d_conv 3, one group, tied;
- ``mamba2_bpe``: BPE (300 ids), d_model 64, 4 heads of 32, 2 groups, d_state 5, d_conv 4, no conv
  bias (llama.cpp gets zeros), untied; rows of 64 and 128 so q8_0/q4_0 quantize ``ssm_in``/``ssm_out``;
- ``mamba_byte`` (Mamba-1): byte tokenizer, d_model 40, d_inner 80, d_state 7, d_conv 3, dt_rank 5, tied;
- ``mamba_bpe`` (Mamba-1): BPE, d_model 64, d_state 5, d_conv 4, dt_rank 4, no conv bias, untied.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weightsmith.cli import main
from weightsmith.config import dump_toml
from weightsmith.data.tokenizers import bytes_to_unicode, save_tokenizer, train_tokenizer
from weightsmith.errors import ConfigError
from weightsmith.registry import create_model
from weightsmith.ship.export import export_run
from weightsmith.ship.generate import generate
from weightsmith.train.checkpoint import load_run, save_checkpoint

pytest.importorskip("gguf")

RUNS = {
    "mamba2_byte": ("mamba2", "byte", dict(d_model=40, n_layers=2, d_state=7, d_conv=3, d_head=16, chunk_size=8,
                                           max_seq_len=64)),
    "mamba2_bpe": ("mamba2", "bpe", dict(d_model=64, n_layers=2, d_state=5, d_conv=4, d_head=32, n_groups=2,
                                         chunk_size=16, max_seq_len=64, conv_bias=False, tie_embeddings=False)),
    "mamba_byte": ("mamba", "byte", dict(d_model=40, n_layers=2, d_state=7, d_conv=3, dt_rank=5, chunk_size=8,
                                         max_seq_len=64)),
    "mamba_bpe": ("mamba", "bpe", dict(d_model=64, n_layers=2, d_state=5, d_conv=4, chunk_size=16, max_seq_len=64,
                                       conv_bias=False, tie_embeddings=False)),
}
MAMBA2 = [n for n in RUNS if n.startswith("mamba2")]
MAMBA1 = [n for n in RUNS if not n.startswith("mamba2")]
PROMPT = "KING. The lord "


def make_run(root, name, text, family, kind, steps=20, **model_kw):
    """Train a tiny ``family`` model for ``steps`` AdamW steps on ``text``; save it as a run directory."""
    torch.manual_seed(0)
    tok = train_tokenizer(kind, text, text, 300)
    model = create_model(family, vocab_size=tok.vocab_size, **model_kw)
    ids = torch.tensor(tok.encode(text[:30000]))
    T = 32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (4,), generator=g)
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = root / name
    run.mkdir()
    save_checkpoint(run, steps, model.eval(), None)
    save_tokenizer(tok, run)
    cfg = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(model.config) if f.init}
    (run / "config.toml").write_text(dump_toml({"data": {"tokenizer": kind, "vocab_size": 300},
                                                "model": {"family": family, **cfg}}))
    return run


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    text = tiny_corpus.read_text()
    return {name: make_run(root, name, text, family, kind, **kw) for name, (family, kind, kw) in RUNS.items()}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Lazily exported directories, keyed by (run name, dtype)."""
    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(name, dtype="f32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = export_run(runs[name], "gguf", root / f"{name}-{dtype}", dtype)
        return cache[name, dtype]

    return get


def _read(path):
    """(fields, {name: (type name, tensor in PyTorch's row-major shape)}) of a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, torch.from_numpy(
        dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))).copy()))
        for t in r.tensors}
    return {k: f.contents() for k, f in r.fields.items()}, tensors


def _expected(sd, cfg, i):
    """Our block ``i`` after the transforms of ship/export_gguf_ssm.py, written out independently."""
    m = f"blocks.{i}.mixer."
    conv_dim = cfg.d_inner + 2 * cfg.n_groups * cfg.d_state
    return {
        "attn_norm.weight": sd[f"blocks.{i}.norm.weight"],
        "ssm_in.weight": sd[m + "in_proj.weight"],
        "ssm_conv1d.weight": sd[m + "conv1d.weight"].reshape(conv_dim, cfg.d_conv),
        "ssm_conv1d.bias": sd.get(m + "conv1d.bias", torch.zeros(conv_dim)),
        "ssm_dt.bias": sd[m + "dt_bias"],
        "ssm_a": -torch.exp(sd[m + "A_log"]).reshape(cfg.n_heads, 1),
        "ssm_d": sd[m + "D"].reshape(cfg.n_heads, 1),
        "ssm_norm.weight": sd[m + "norm.weight"].reshape(cfg.n_groups, cfg.d_inner // cfg.n_groups),
        "ssm_out.weight": sd[m + "out_proj.weight"],
    }


# ------------------------------------------------------------------------------------------------
# default tier: read back


def _expected_mamba1(sd, cfg, i):
    m = f"blocks.{i}.mixer."
    return {
        "attn_norm.weight": sd[f"blocks.{i}.norm.weight"],
        "ssm_in.weight": sd[m + "in_proj.weight"],
        "ssm_conv1d.weight": sd[m + "conv1d.weight"].reshape(cfg.d_inner, cfg.d_conv),
        "ssm_conv1d.bias": sd.get(m + "conv1d.bias", torch.zeros(cfg.d_inner)),
        "ssm_x.weight": sd[m + "x_proj.weight"],
        "ssm_dt.weight": sd[m + "dt_proj.weight"],
        "ssm_dt.bias": sd[m + "dt_proj.bias"],
        "ssm_a": -torch.exp(sd[m + "A_log"]),
        "ssm_d": sd[m + "D"],
        "ssm_out.weight": sd[m + "out_proj.weight"],
    }


@pytest.mark.parametrize("name", MAMBA1)
def test_mamba_gguf_readback(name, runs, exports):
    run = load_run(runs[name])
    cfg, sd = run.model.config, run.model.state_dict()
    fields, tensors = _read(exports(name) / "model.gguf")
    assert fields["general.architecture"] == "mamba"
    want = {"vocab_size": cfg.vocab_size, "context_length": 2 ** 20, "embedding_length": cfg.d_model,
            "block_count": cfg.n_layers, "feed_forward_length": 0, "attention.head_count": 0,
            "ssm.conv_kernel": cfg.d_conv, "ssm.inner_size": cfg.d_inner, "ssm.state_size": cfg.d_state,
            "ssm.time_step_rank": cfg.dt_rank, "ssm.dt_b_c_rms": False}
    assert {k: fields[f"mamba.{k}"] for k in want} == want
    assert fields["mamba.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    expected = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["final_norm.weight"]}
    if not cfg.tie_embeddings:
        expected["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        expected |= {f"blk.{i}.{k}": v for k, v in _expected_mamba1(sd, cfg, i).items()}
    assert sorted(tensors) == sorted(expected)
    for k, v in expected.items():
        qtype, got = tensors[k]
        assert qtype == "F32", k
        assert got.shape == v.shape, k
        torch.testing.assert_close(got, v, rtol=0, atol=0, msg=k)
    assert (tensors["blk.0.ssm_a"][1] < 0).all()


def test_mamba_expand_other_than_2_is_refused(tmp_path):
    run = make_run(tmp_path, "wide", "abc " * 200, "mamba", "byte", steps=0, d_model=16, n_layers=1,
                   d_state=4, expand=3, chunk_size=8, max_seq_len=16)
    with pytest.raises(ConfigError, match=r"^model\.expand=3 cannot be exported to GGUF"):
        export_run(run, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", MAMBA2)
def test_mamba2_gguf_readback(name, runs, exports):
    run = load_run(runs[name])
    cfg, sd = run.model.config, run.model.state_dict()
    fields, tensors = _read(exports(name) / "model.gguf")
    assert fields["general.architecture"] == "mamba2"
    want = {"vocab_size": cfg.vocab_size, "context_length": 2 ** 20, "embedding_length": cfg.d_model,
            "block_count": cfg.n_layers, "feed_forward_length": 0, "attention.head_count": 0,
            "ssm.conv_kernel": cfg.d_conv, "ssm.inner_size": cfg.expand * cfg.d_model,
            "ssm.state_size": cfg.d_state, "ssm.time_step_rank": cfg.n_heads, "ssm.group_count": cfg.n_groups}
    assert {k: fields[f"mamba2.{k}"] for k in want} == want
    assert fields["mamba2.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    assert [bytes(u2b[c] for c in t) for t in fields["tokenizer.ggml.tokens"]] == run.tokenizer.token_bytes()
    if run.tokenizer.kind == "bpe":
        assert len(fields["tokenizer.ggml.merges"]) == cfg.vocab_size - 256

    expected = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["final_norm.weight"]}
    if not cfg.tie_embeddings:
        expected["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        expected |= {f"blk.{i}.{k}": v for k, v in _expected(sd, cfg, i).items()}
    assert sorted(tensors) == sorted(expected)
    for k, v in expected.items():
        qtype, got = tensors[k]
        assert qtype == "F32", k
        assert got.shape == v.shape, k
        torch.testing.assert_close(got, v, rtol=0, atol=0, msg=k)
    assert (tensors["blk.0.ssm_a"][1] < 0).all()


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "f16"])
def test_mamba2_gguf_quantized_types(dtype, exports):
    """As llama.cpp's converter: matrices go to ``dtype`` (f16 if rows are not a multiple of 32), while
    norms (also the 2-D ssm_norm), ssm_a, ssm_d, biases and ssm_conv1d (ggml's ssm_conv is f32-only)
    stay f32."""
    fields, tensors = _read(exports("mamba2_bpe", dtype) / "model.gguf")
    kinds = {n: q for n, (q, _) in tensors.items()}
    big = dtype.upper()
    assert kinds["blk.1.ssm_in.weight"] == big and kinds["blk.1.ssm_out.weight"] == big
    assert kinds["token_embd.weight"] == big and kinds["output.weight"] == big
    for n in ("ssm_conv1d.weight", "ssm_conv1d.bias", "ssm_norm.weight", "ssm_a", "ssm_d", "ssm_dt.bias",
              "attn_norm.weight"):
        assert kinds[f"blk.1.{n}"] == "F32", n
    _, f32 = _read(exports("mamba2_bpe") / "model.gguf")
    w, ref = tensors["blk.1.ssm_in.weight"][1], f32["blk.1.ssm_in.weight"][1]
    # per block of 32: q8_0 rounds to max|w| / 127 (half a step); q4_0's 16 levels are [-8, 7] * max|w| / 8,
    # so the far side can clip by a whole step; plus the f16 rounding of each scale
    bound = {"q8_0": 1 / 254 + 2 ** -10, "q4_0": 1 / 8 + 2 ** -9, "f16": 2 ** -11}[dtype]
    blocks = ref.reshape(-1, 32)
    assert ((w.reshape(-1, 32) - blocks).abs() <= blocks.abs().amax(-1, keepdim=True) * bound).all()


def test_cli_export_mamba2(runs, tmp_path):
    out = tmp_path / "g"
    assert main(["export", str(runs["mamba2_byte"]), "--format", "gguf", "--dtype", "q8_0", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.gguf"]


# ------------------------------------------------------------------------------------------------
# default tier: what llama.cpp cannot run


def _cli_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_mamba2_with_projection_biases_is_refused(tmp_path, tiny_corpus, capsys):
    run = make_run(tmp_path, "biased", "abc " * 200, "mamba2", "byte", steps=0, d_model=32, n_layers=1,
                   d_state=4, d_head=16, chunk_size=8, max_seq_len=16, bias=True)
    with pytest.raises(ConfigError, match=r"^model\.bias=True cannot be exported to GGUF") as e:
        export_run(run, "gguf", tmp_path / "out")
    assert "\n" not in str(e.value) and "supported: False" in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out.tmp-*")) == []
    err = _cli_error(capsys, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "out"))
    assert "model.bias=True" in err


@pytest.mark.parametrize("family, kw", [
    ("lstm", dict(d_model=8, n_layers=1)),
    ("hybrid", None),
])
def test_family_without_gguf_mapping_fails_in_one_line(family, kw, tmp_path, capsys):
    """export_run refuses before loading the checkpoint; gguf_arch refuses a config directly."""
    from weightsmith.registry import resolve
    from weightsmith.ship.export_gguf import gguf_arch

    _, cfg = resolve(family, kw or {})
    with pytest.raises(ConfigError) as e:
        gguf_arch(cfg)
    assert str(e.value).startswith(f"model.family={family!r} has no GGUF mapping") and "\n" not in str(e.value)
    assert "'mamba2'" in str(e.value)
    run = tmp_path / "run"
    run.mkdir()
    save_tokenizer(train_tokenizer("byte", "", "", 256), run)
    (run / "config.toml").write_text(dump_toml({"model": {"family": family}}))
    err = _cli_error(capsys, "export", str(run), "--format", "gguf", "--out", str(tmp_path / "out"))
    assert f"model.family='{family}' cannot be exported to GGUF; supported: 'gpt', 'mamba2', 'mamba'" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# llama.cpp (slow tier: pytest -m llamacpp)

LLAMACPP_ATOL = {"f32": 1e-3, "f16": 1e-2, "q8_0": 0.1}


def _llama(path, n_ctx):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                           n_batch=n_ctx)


def _llama_logits(llm, ids):
    """llama.cpp's logits (T, V) for ``ids`` fed at once into a fresh state."""
    llm.reset()
    llm.eval(list(ids))
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llamacpp_matches_ours(name, dtype, runs, exports):
    run = load_run(runs[name])
    T = run.model.config.max_seq_len
    llm = _llama(exports(name, dtype) / "model.gguf", 4 * T)
    text = PROMPT + "Oh, é\n"
    ids = run.tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == text

    x = torch.tensor([run.tokenizer.encode(PROMPT * 20)[:2 * T]])  # past max_seq_len: nothing bounds a state
    with torch.no_grad():
        ours = run.model(x)[0]
    theirs = _llama_logits(llm, x[0].tolist())
    diff = (theirs - ours).abs().max().item()
    print(f"{name} {dtype}: max |logit diff| = {diff:.2e} over {x.shape[1]} tokens "
          f"(logit range {ours.max() - ours.min():.1f})")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=LLAMACPP_ATOL[dtype])

    prompt = torch.tensor([run.tokenizer.encode(PROMPT)])
    n_new = 30
    greedy = generate(run.model, prompt, n_new, temperature=0)[0].tolist()
    seq = prompt[0].tolist()
    llm.reset()
    llm.eval(seq)
    for _ in range(n_new):  # one token at a time: llama.cpp's recurrent state carries the context
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        seq.append(nxt)
        llm.eval([nxt])
    assert seq == greedy


@pytest.mark.llamacpp
def test_llamacpp_q8_0_close(runs, exports):
    run = load_run(runs["mamba2_bpe"])
    llm = _llama(exports("mamba2_bpe", "q8_0") / "model.gguf", run.model.config.max_seq_len)
    x = torch.tensor([run.tokenizer.encode(PROMPT * 4)[:run.model.config.max_seq_len]])
    with torch.no_grad():
        ours = run.model(x)[0]
    theirs = _llama_logits(llm, x[0].tolist())
    diff = (theirs - ours).abs().max().item()
    print(f"mamba2_bpe q8_0: max |logit diff| = {diff:.2e} (logit range {ours.max() - ours.min():.1f})")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=LLAMACPP_ATOL["q8_0"])
