"""Quantization: grids against naive loops, GPTQ against RTN and an unbatched OBS reference, quantized runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from weightsmith.cli import main
from weightsmith.ship.gptq import gptq_quantize_weight
from weightsmith.ship.quantize import (
    QuantLinear,
    TiedQuantEmbedding,
    dequantize_weight,
    pack_int4,
    quantize_rtn,
    unpack_int4,
)


def naive_rtn(w, bits, group_size):
    """Loop over rows and groups: scale = absmax / qmax, q = clamp(round(w / scale))."""
    qmax = 2 ** (bits - 1) - 1
    lo = -127 if bits == 8 else -8
    q = torch.zeros_like(w)
    deq = torch.zeros_like(w)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group_size):
            seg = w[r, g0:g0 + group_size]
            s = float(seg.abs().max()) / qmax or 1.0
            for c in range(seg.shape[0]):
                q[r, g0 + c] = min(max(round(float(seg[c]) / s), lo), qmax)
                deq[r, g0 + c] = q[r, g0 + c] * s
    return q, deq


@pytest.mark.parametrize("bits,group_size", [(8, 48), (4, 16), (4, 48)])
def test_rtn_matches_naive_loop_and_error_is_half_a_step(bits, group_size):
    w = torch.randn(7, 48, generator=torch.Generator().manual_seed(0))
    q, s = quantize_rtn(w, bits, group_size)
    q_ref, deq_ref = naive_rtn(w, bits, group_size)
    assert torch.equal(q.float(), q_ref)
    deq = dequantize_weight(q, s)
    torch.testing.assert_close(deq, deq_ref, rtol=1e-6, atol=1e-6)
    step = s.repeat_interleave(group_size, dim=1)  # (N, K) the grid step of every element
    assert ((w - deq).abs() <= step / 2 + 1e-6).all()


def test_int4_pack_roundtrip_and_quant_linear_forward():
    q = torch.randint(-8, 8, (5, 22), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    lin = torch.nn.Linear(32, 11, bias=True)
    x = torch.randn(2, 3, 32)
    for bits, g in [(8, 32), (4, 16)]:
        ql = QuantLinear.from_linear(lin, bits, g)
        torch.testing.assert_close(ql(x), F.linear(x, ql.dequantized_weight(), lin.bias))
        assert (ql.dequantized_weight() - lin.weight).abs().max() <= ql.scales.max() / 2 + 1e-6


def test_tied_embedding_reads_the_quantized_lm_head_rows():
    lin = torch.nn.Linear(16, 13, bias=False)
    head = QuantLinear.from_linear(lin, 8, 16)
    idx = torch.tensor([[0, 5, 12], [3, 3, 7]])
    torch.testing.assert_close(TiedQuantEmbedding(head)(idx), F.embedding(idx, head.dequantized_weight()))


def correlated_problem(N=11, K=64, n_tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, K, generator=g, dtype=torch.float64) @ torch.randn(K, K, generator=g,
                                                                                 dtype=torch.float64)
    X += 3 * torch.randn(K, generator=g, dtype=torch.float64)  # correlated inputs with non-zero means
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    return W, X


def test_gptq_beats_rtn_on_layer_output_error():
    W, X = correlated_problem()
    q, s = gptq_quantize_weight(W, X.T @ X, 4, 16)
    q_rtn, s_rtn = quantize_rtn(W, 4, 16)
    err_gptq = torch.linalg.norm(X @ W.T - X @ dequantize_weight(q, s).double().T)
    err_rtn = torch.linalg.norm(X @ W.T - X @ dequantize_weight(q_rtn, s_rtn).double().T)
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))


def naive_obs_gptq(W, H, bits, group_size, damp=0.01):
    """Unbatched reference: one column at a time, explicit inverse-Hessian OBS update after each column."""
    W = W.clone()
    H = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    qmax = 2 ** (bits - 1) - 1
    Q = torch.zeros_like(W)
    scales = []
    for i in range(W.shape[1]):
        if i % group_size == 0:
            s = W[:, i:i + group_size].abs().amax(1) / qmax
            scales.append(s)
        q = torch.clamp(torch.round(W[:, i] / s), -qmax - 1, qmax)
        Q[:, i] = q
        err = (W[:, i] - q * s) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]  # OBS: the best update of the remaining weights
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]  # remove column i from the problem
    return Q, torch.stack(scales, 1)


def test_gptq_lazy_batches_equal_unbatched_obs_reference():
    W, X = correlated_problem(N=7, K=96, seed=1)
    H = X.T @ X
    q, s = gptq_quantize_weight(W, H, 4, 16, block_size=32)  # three lazy blocks of two groups
    q_ref, s_ref = naive_obs_gptq(W, H, 4, 16)
    assert (q.double() != q_ref).float().mean() < 0.01  # a rounding tie may flip one value
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("quant")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIGHTSMITH_CACHE", str(root / "cache"))
        assert main(["train", "recipes/tiny.toml", "--out", str(root / "run"), f"--data.corpus={tiny_corpus}",
                     "--train.max_steps=30", "--sample.max_new_tokens=2"]) == 0
        yield root


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]


@pytest.mark.parametrize("method", ["int8", "gptq-int4"])
def test_quantized_run_loads_evaluates_generates_exports(tiny_run, method, monkeypatch, capsys):
    from weightsmith.eval.run import evaluate_run
    from weightsmith.ship.export import export_run
    from weightsmith.train.checkpoint import load_run

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tiny_run / "cache"))
    out = tiny_run / f"q-{method}"
    assert main(["quantize", str(tiny_run / "run"), "--method", method, "--group-size", "16", "--out", str(out)]) == 0
    report = json.loads((out / "quantize.json").read_text())
    assert report["quantized"]["weight_bytes"] < 0.4 * report["fp32"]["weight_bytes"]
    assert abs(report["delta_bpb"]) < 0.1 and report["quantized"]["decode_tokens_per_s"] > 0

    run = load_run(out)
    assert run.config["quantization"]["method"] == method
    assert any(isinstance(m, QuantLinear) for m in run.model.modules())
    result = evaluate_run(out)
    assert result["val_bpb"] == pytest.approx(report["quantized"]["val_bpb"], rel=1e-6)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "KING", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("KING")

    x = torch.randint(0, run.model.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = run.model(x)
    hf = export_run(out, "hf", tiny_run / f"hf-{method}")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(hf).eval()(x).logits
    torch.testing.assert_close(hf_logits, logits, rtol=1e-4, atol=1e-4)  # export dequantizes, exactly


def test_quantize_bad_inputs_are_one_line_errors(tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tiny_run / "cache"))
    run, q = tiny_run / "run", tiny_run / "q-bad"
    assert main(["quantize", str(run), "--method", "int4", "--group-size", "16", "--out", str(q),
                 ]) == 0
    capsys.readouterr()
    assert main(["quantize", str(q), "--method", "int8", "--out", str(tiny_run / "q-again")]) == 2
    one_error_line(capsys, "already quantized")
    assert not (tiny_run / "q-again").exists()
    before = sorted(p.name for p in q.rglob("*"))
    assert main(["quantize", str(run), "--method", "int8", "--out", str(q)]) == 2
    one_error_line(capsys, "already exists")
    assert sorted(p.name for p in q.rglob("*")) == before
    assert main(["quantize", str(run), "--method", "int4", "--group-size", "24", "--out", str(tiny_run / "q-g")]) == 2
    one_error_line(capsys, "--group-size 24")
    assert not (tiny_run / "q-g").exists()
    assert not [p for p in tiny_run.iterdir() if ".tmp-" in p.name]  # no temporary directories left behind


def test_size_math():
    """int8 of the linears + tied (V, D) matrix stores ~1 byte per weight plus 4-byte row scales."""
    lin = torch.nn.Linear(64, 10, bias=False)
    ql = QuantLinear.from_linear(lin, 8, 64)
    assert ql.qweight.numel() * ql.qweight.element_size() == 640
    q4 = QuantLinear.from_linear(lin, 4, 16)
    assert q4.qweight.numel() * q4.qweight.element_size() == 320 and q4.scales.numel() == 40
    assert math.isclose(q4.dequantized_weight().abs().max().item(), lin.weight.abs().max().item(), rel_tol=1e-5)
