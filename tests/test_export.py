"""Export to Hugging Face, GGUF and ONNX: parity with our model, atomic writes, one-line errors.

Three tiny run directories are built by hand once per module (a few AdamW steps so the logits are not
flat, then save_checkpoint + save_tokenizer + config.toml):

- ``llama_byte``: RMSNorm/SwiGLU/RoPE, GQA (4 heads, 2 kv heads), tied embeddings, byte tokenizer;
- ``gpt2_bpe``: LayerNorm/GELU/learned positions, biases, untied, BPE (300 ids);
- ``llama_char``: one layer, untied, char tokenizer whose alphabet has multi-byte characters.

The llama.cpp tier (``-m llamacpp``) loads the GGUF files in real llama.cpp through llama-cpp-python.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weightsmith.cli import main
from weightsmith.config import dump_toml
from weightsmith.data.tokenizers import bytes_to_unicode, save_tokenizer, train_tokenizer
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.registry import create_model
from weightsmith.ship.export import export_run
from weightsmith.ship.generate import generate
from weightsmith.train.checkpoint import load_run, save_checkpoint

EXTRA_CHARS = "é—"  # 2- and 3-byte UTF-8 characters for the char tokenizer

RUNS = {
    "llama_byte": ("byte", dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)),
    "gpt2_bpe": ("bpe", dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, norm="layernorm", mlp="gelu",
                             pos="learned", bias=True, tie_embeddings=False)),
    "llama_char": ("char", dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=64, tie_embeddings=False)),
}
PROMPT = "KING. The lord "


def make_run(root, name, text, kind, steps=20, **model_kw):
    """Train a tiny model for ``steps`` AdamW steps on ``text`` and save it as a run directory."""
    torch.manual_seed(0)
    tok = train_tokenizer(kind, text, text, 300)
    model = create_model("gpt", vocab_size=tok.vocab_size, **model_kw)
    ids = torch.tensor(tok.encode(text[:30000]))
    T = 32  # training windows shorter than max_seq_len keep the fixture fast
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
                                                "model": {"family": "gpt", **cfg}}))
    return run


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    text = tiny_corpus.read_text()
    out = {}
    for name, (kind, kw) in RUNS.items():
        corpus = text + EXTRA_CHARS * 3 + "\n" if kind == "char" else text
        out[name] = make_run(root, name, corpus, kind, **kw)
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Lazily exported directories, keyed by (run name, format, dtype)."""
    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(name, fmt, dtype="f32"):
        key = (name, fmt, dtype)
        if key not in cache:
            cache[key] = export_run(runs[name], fmt, root / f"{name}-{fmt}-{dtype}", dtype)
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------------
# Hugging Face


@pytest.mark.parametrize("name", list(RUNS))
def test_hf_matches_ours(name, runs, exports):
    """transformers loads the export with no custom code: same ids, same logits, same greedy tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = load_run(runs[name])
    out = exports(name, "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM")
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = PROMPT + ("and " + EXTRA_CHARS if name == "llama_char" else "Oh, é\n\t")
    ids = run.tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids) == text

    long = run.tokenizer.encode(text * 4)
    x = torch.tensor([long[:40], long[1:41]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, run.model(x), rtol=1e-5, atol=1e-5)
        prompt = torch.tensor([run.tokenizer.encode(PROMPT)])
        ours = generate(run.model, prompt, 30, temperature=0)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=30, min_new_tokens=30)
    assert theirs.tolist() == ours.tolist()


def test_hf_half_dtypes(runs, exports):
    from safetensors import safe_open

    for dtype, want in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        out = exports("llama_byte", "hf", dtype)
        assert json.loads((out / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
        with safe_open(out / "model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {want}


def test_hf_rejects_config_without_stock_architecture(runs, tmp_path):
    run = make_run(tmp_path, "rms_gelu", "abc " * 100, "byte", steps=0, d_model=16, n_layers=1, n_heads=2,
                   max_seq_len=16, mlp="gelu")
    with pytest.raises(ConfigError, match="model.mlp"):
        export_run(run, "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out.tmp-*")) == []
    with pytest.raises(ConfigError, match="model.mlp"):
        export_run(run, "gguf", tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# GGUF (read back with gguf.GGUFReader; llama.cpp itself in the llamacpp tier)


def _reader_tensors(path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, torch.from_numpy(
        dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))).copy()))
        for t in r.tensors}
    fields = {k: f.contents() for k, f in r.fields.items()}
    return fields, tensors


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_gguf_readback(name, dtype, runs, exports):
    from weightsmith.ship.export_gguf import permute_rope_rows

    run = load_run(runs[name])
    cfg, sd = run.model.config, run.model.state_dict()
    fields, tensors = _reader_tensors(exports(name, "gguf", dtype) / "model.gguf")
    arch = "gpt2" if name.startswith("gpt2") else "llama"
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == cfg.n_layers
    assert fields[f"{arch}.attention.head_count_kv"] == cfg.n_kv_heads
    assert fields["tokenizer.ggml.model"] == "gpt2"
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert [bytes(u2b[c] for c in t) for t in tokens] == run.tokenizer.token_bytes()
    if name == "gpt2_bpe":
        assert len(fields["tokenizer.ggml.merges"]) == cfg.vocab_size - 256
    n_tensors = {"llama_byte": 2 + 9 * 2, "gpt2_bpe": 5 + 12 * 2, "llama_char": 3 + 9}[name]
    assert len(tensors) == n_tensors

    def check(gguf_name, ours):
        qtype, got = tensors[gguf_name]
        assert got.shape == ours.shape, gguf_name
        if qtype == "F32":
            torch.testing.assert_close(got, ours, rtol=0, atol=0)
        else:  # q8_0: per block of 32, error <= scale / 2 = max|w| / 254, plus the f16 rounding of the scale
            assert qtype == "Q8_0" and dtype == "q8_0", gguf_name
            blocks = ours.reshape(-1, 32)
            bound = blocks.abs().amax(-1, keepdim=True) * (1 / 254 + 2.0 ** -10)
            assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all(), gguf_name

    check("token_embd.weight", sd["tok_emb.weight"])
    check("output_norm.weight", sd["final_norm.weight"])
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings)
    p = "blocks.0."
    if arch == "llama":
        check("blk.0.attn_q.weight", permute_rope_rows(sd[p + "attn.q_proj.weight"], cfg.n_heads))
        check("blk.0.attn_k.weight", permute_rope_rows(sd[p + "attn.k_proj.weight"], cfg.n_kv_heads))
        check("blk.0.ffn_gate.weight", sd[p + "mlp.gate.weight"])
    else:
        check("position_embd.weight", sd["pos_emb.weight"])
        qkv = torch.cat([sd[p + f"attn.{n}_proj.weight"] for n in "qkv"])
        check("blk.0.attn_qkv.weight", qkv)
        check("blk.0.attn_qkv.bias", torch.cat([sd[p + f"attn.{n}_proj.bias"] for n in "qkv"]))
    check("blk.0.ffn_down.weight", sd[p + "mlp.down.weight"])


def test_gguf_q4_0_types(runs, exports):
    from gguf import LlamaFileType

    fields, tensors = _reader_tensors(exports("llama_byte", "gguf", "q4_0") / "model.gguf")
    assert fields["general.file_type"] == LlamaFileType.MOSTLY_Q4_0
    kinds = {n: q for n, (q, _) in tensors.items()}
    assert kinds["blk.1.ffn_down.weight"] == "Q4_0" and kinds["blk.1.attn_norm.weight"] == "F32"
    assert kinds["token_embd.weight"] == "Q4_0"


def test_rope_permutation_turns_half_split_into_interleaved():
    """q.k after our half-split RoPE equals q'.k' after llama.cpp's interleaved RoPE on permuted rows."""
    from weightsmith.models.layers.rope import apply_rope, rope_cos_sin, rope_frequencies
    from weightsmith.ship.export_gguf import permute_rope_rows

    H, d_head, D, T = 3, 10, 7, 5
    wq, wk = torch.randn(H * d_head, D, dtype=torch.float64), torch.randn(H * d_head, D, dtype=torch.float64)
    x = torch.randn(T, D, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_cos_sin(torch.arange(T), rope_frequencies(d_head, 10000.0)))

    def heads(y):
        return y.view(T, H, d_head).transpose(0, 1)[None]  # (1, H, T, d_head)

    ours = apply_rope(heads(x @ wq.T), cos, sin) @ apply_rope(heads(x @ wk.T), cos, sin).transpose(-1, -2)

    def interleaved(y):  # rotate adjacent pairs (2i, 2i+1) by pos * inv[i]
        c, s = cos[:, :d_head // 2], sin[:, d_head // 2:]  # (T, d_head/2): angle pos * theta_i (sin: 2nd half is +)
        a, b = y[..., 0::2], y[..., 1::2]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)

    q2, k2 = x @ permute_rope_rows(wq, H).T, x @ permute_rope_rows(wk, H).T
    theirs = interleaved(heads(q2)) @ interleaved(heads(k2)).transpose(-1, -2)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)  # apply_rope computes in float32


def test_gguf_char_vocab_merges():
    from weightsmith.data.tokenizers import CharTokenizer
    from weightsmith.ship.export_gguf import gguf_vocab

    b2u = bytes_to_unicode()
    tokens, merges = gguf_vocab(CharTokenizer("\na—é"))
    dash = "".join(b2u[b] for b in "—".encode())
    e = "".join(b2u[b] for b in "é".encode())
    assert tokens == ["Ċ", "a", dash, e]
    assert merges == [f"{dash[0]} {dash[1]}", f"{dash[:2]} {dash[2]}", f"{e[0]} {e[1]}"]


# ------------------------------------------------------------------------------------------------
# ONNX


@pytest.mark.parametrize("name", ["llama_byte", "gpt2_bpe"])
def test_onnx_matches_ours(name, runs, exports):
    import onnxruntime as ort

    run = load_run(runs[name])
    out = exports(name, "onnx")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    for B, T in ((3, 11), (1, 1), (2, run.model.config.max_seq_len)):
        x = torch.randint(0, run.model.config.vocab_size, (B, T), generator=g)
        (logits,) = sess.run(None, {"input_ids": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), run.model(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# atomic writes and bad input


def test_failed_export_leaves_nothing(runs, tmp_path, monkeypatch):
    import weightsmith.ship.export as ex

    def boom(model, tok, out_dir, dtype):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_exporter", lambda fmt: boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(runs["llama_byte"], "hf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_out_is_never_overwritten(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        export_run(runs["llama_byte"], "gguf", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _cli_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_cli_export_errors(runs, tmp_path, capsys):
    run = str(runs["llama_byte"])
    err = _cli_error(capsys, "export", run, "--format", "onnx", "--dtype", "q4_0", "--out", str(tmp_path / "a"))
    assert "onnx" in err and "q4_0" in err
    err = _cli_error(capsys, "export", run, "--format", "hf", "--dtype", "q8_0", "--out", str(tmp_path / "b"))
    assert "hf" in err and "q8_0" in err
    no_tok = tmp_path / "no_tok"
    shutil.copytree(run, no_tok)
    (no_tok / "tokenizer.json").unlink()
    err = _cli_error(capsys, "export", str(no_tok), "--format", "gguf", "--out", str(tmp_path / "c"))
    assert "tokenizer.json" in err
    (tmp_path / "d").mkdir()
    err = _cli_error(capsys, "export", run, "--format", "hf", "--out", str(tmp_path / "d"))
    assert "already exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "no_tok"]


def test_out_naming_a_file_fails_before_any_work(runs, tmp_path, monkeypatch):
    import weightsmith.train.checkpoint as ckpt

    def no_loading(*a, **k):
        raise AssertionError("the run was loaded before --out was checked")

    monkeypatch.setattr(ckpt, "load_run", no_loading)
    file = tmp_path / "model.gguf"
    file.write_bytes(b"mine")
    with pytest.raises(CheckpointError, match=r"already exists \(a file\)"):
        export_run(runs["llama_byte"], "gguf", file)
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        export_run(runs["llama_byte"], "gguf", file / "sub" / "out")
    assert file.read_bytes() == b"mine" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


@pytest.mark.parametrize("fmt,module", [("gguf", "gguf"), ("onnx", "onnx"), ("onnx", "onnxscript")])
def test_cli_export_without_the_interop_extra(runs, tmp_path, capsys, monkeypatch, fmt, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    err = _cli_error(capsys, "export", str(runs["llama_byte"]), "--format", fmt, "--out", str(tmp_path / "x"))
    assert f"--format {fmt} needs the '{module}' package" in err
    assert "pip install 'weightsmith[interop]'" in err
    assert list(tmp_path.iterdir()) == []


def test_exporters_name_the_extra_at_their_import(runs, tmp_path, monkeypatch):
    """Called directly (not through export_run), the exporters fail the same way."""
    from weightsmith.errors import WeightsmithError
    from weightsmith.ship.export_gguf import export_gguf
    from weightsmith.ship.export_onnx import export_onnx

    run = load_run(runs["llama_byte"])
    for module, exporter in (("gguf", export_gguf), ("onnxscript", export_onnx)):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)
            with pytest.raises(WeightsmithError, match=r"weightsmith\[interop\]"):
                exporter(run.model, run.tokenizer, tmp_path, "f32")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_ok(runs, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["export", str(runs["llama_char"]), "--format", "gguf", "--dtype", "q4_0", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.gguf"]
    assert json.loads((out / "export.json").read_text())["dtype"] == "q4_0"


# ------------------------------------------------------------------------------------------------
# llama.cpp (slow tier: pytest -m llamacpp)

LLAMACPP_ATOL = {"f32": 1e-3, "f16": 5e-3, "q8_0": 0.1, "q4_0": 0.5}


def _llama(path, n_ctx):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, vocab_only=False, verbose=False,
                           n_threads=2, n_batch=n_ctx)


def _llama_logits(llm, ids):
    """Logits (T, V) of llama.cpp for the token ids ``ids`` (a fresh context)."""
    llm.reset()
    llm.eval(list(ids))
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llamacpp_matches_ours(name, dtype, runs, exports):
    run = load_run(runs[name])
    T = run.model.config.max_seq_len
    llm = _llama(exports(name, "gguf", dtype) / "model.gguf", T)
    text = PROMPT + ("and " + EXTRA_CHARS if name == "llama_char" else "Oh, é\n")
    ids = run.tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == text

    x = torch.tensor([run.tokenizer.encode(PROMPT * 4)[:T]])
    with torch.no_grad():
        ours = run.model(x)[0]
    theirs = _llama_logits(llm, x[0].tolist())
    diff = (theirs - ours).abs().max().item()
    print(f"{name} {dtype}: max |logit diff| = {diff:.2e}")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=LLAMACPP_ATOL[dtype])

    prompt = torch.tensor([run.tokenizer.encode(PROMPT)])
    n_new = 30
    greedy = generate(run.model, prompt, n_new, temperature=0)[0].tolist()
    seq = prompt[0].tolist()
    llm.reset()
    llm.eval(seq)
    for _ in range(n_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        seq.append(nxt)
        llm.eval([nxt])
    assert seq == greedy


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["llama_byte", "gpt2_bpe"])
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_llamacpp_quantized_close(name, dtype, runs, exports):
    """Quantized files load in llama.cpp; their logits stay near ours (looser for fewer bits)."""
    run = load_run(runs[name])
    llm = _llama(exports(name, "gguf", dtype) / "model.gguf", run.model.config.max_seq_len)
    x = torch.tensor([run.tokenizer.encode(PROMPT * 4)[:run.model.config.max_seq_len]])
    with torch.no_grad():
        ours = run.model(x)[0]
    theirs = _llama_logits(llm, x[0].tolist())
    diff = (theirs - ours).abs().max().item()
    print(f"{name} {dtype}: max |logit diff| = {diff:.2e} (logit range {ours.max() - ours.min():.1f})")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=LLAMACPP_ATOL[dtype])
