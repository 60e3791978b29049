"""NF4 with double quantization (QLoRA, Dettmers et al. 2023): the code table against the paper and its
normal-quantile construction, exactness against bitsandbytes' CPU quantize_4bit, round-trip bounds
without bitsandbytes, and NF4Linear (forward, gradient, storage bytes, state dict)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.errors import ConfigError
from weightsmith.models.layers.nf4 import (
    DYNAMIC_CODE,
    NF4_CODE,
    NF4Linear,
    NF4Tensor,
    dequantize_absmax,
    nf4_dequantize,
    nf4_nbytes,
    nf4_quantize,
)

# QLoRA appendix E / bitsandbytes create_normal_map(offset=0.9677083), as printed there.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_code_is_the_paper_table():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert NF4_CODE.tolist() == torch.tensor(PAPER_NF4, dtype=torch.float32).tolist()
    assert NF4_CODE[7] == 0 and bool((NF4_CODE[1:] > NF4_CODE[:-1]).all())


def _normal_quantile_code(offset: float, dtype: torch.dtype) -> torch.Tensor:
    """The paper's construction: 8 negative and 7 positive N(0,1) quantiles between ``offset`` and 1/2
    (one more on the negative side, so that 0 is exact), and 0; normalized by the largest."""
    neg = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=dtype)[:-1].double())
    pos = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=dtype)[:-1].double())
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    return v.float().sort().values


def test_nf4_code_is_the_normal_quantile_construction():
    delta = 0.5 * (1 / (2 * 15) + 1 / (2 * 16))  # paper's offset: halfway between 1/(2*15) and 1/(2*16)
    assert 1 - delta == pytest.approx(0.9677083, abs=1e-7)
    # bitsandbytes' recipe (offset rounded to 0.9677083, float32 quantile points, float32 normalization)
    # gives the table bit for bit.
    v = _normal_quantile_code(0.9677083, torch.float32)
    assert torch.equal(v / v.max(), NF4_CODE)
    # The unrounded offset in float64 gives it to within 4e-7.
    v64 = _normal_quantile_code(1 - delta, torch.float64).double()
    torch.testing.assert_close((v64 / v64.max()).float(), NF4_CODE, rtol=0, atol=4e-7)
    # The construction is asymmetric: the most negative value is -1 and 0 sits at index 7.
    assert v.argmin() == 0 and (v == 0).nonzero().item() == 7


def _unpack(codes: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([codes >> 4, codes & 0xF], dim=1).reshape(-1)[:n].long()


def _max_gap(code: torch.Tensor) -> float:
    return float((code[1:] - code[:-1]).max())


# ------------------------------------------------------------------------------ against bitsandbytes

SHAPES = [(96, 160), (7, 11), (33, 64), (130, 257)]  # even/odd counts, full and partial last blocks


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes_quantize_4bit(shape, double_quant):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(sum(shape))
    w = torch.randn(shape) * 0.02
    w.view(-1)[5] = 0.1  # one outlier: a block with a large absmax
    # bitsandbytes' quantizer blocks the row-major flattening, as we do; its CPU C dequantizer (0.50.2)
    # blocks each row separately when a row is not a multiple of blocksize (a round trip of (96, 160)
    # then errs by up to 2.2 on a randn weight), so it is given the flat tensor.
    p, st = bnbf.quantize_4bit(w.reshape(-1), blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    q = nf4_quantize(w, block_size=64, double_quant=double_quant)
    assert q.codes.dtype == torch.uint8 and torch.equal(q.codes, p.view(-1))  # bit for bit
    ref = bnbf.dequantize_4bit(p, st).view(shape)
    if not double_quant:
        assert torch.equal(q.absmax, st.absmax)
        assert torch.equal(nf4_dequantize(q), ref)
        return
    assert torch.equal(q.absmax_offset, st.offset) and torch.equal(q.absmax_scale, st.state2.absmax)
    assert torch.equal(DYNAMIC_CODE, st.state2.code)
    # Dequantizing bitsandbytes' own state here gives its values bit for bit.
    theirs = NF4Tensor(p.view(-1), st.absmax, st.state2.absmax, st.offset, shape)
    assert torch.equal(nf4_dequantize(theirs), ref)
    # Our 8-bit absmax indices are the nearest dynamic-code values; bitsandbytes' CPU kernel (a bucketed
    # binary search) may take the adjacent one near a midpoint. Where the indices agree, so do the values.
    diff = (q.absmax.long() - st.absmax.long()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(2, diff.numel() // 100)
    same = (diff == 0).repeat_interleave(64)[: w.numel()].view(shape)
    assert torch.equal(nf4_dequantize(q)[same], ref[same])


def test_bitsandbytes_2d_layer_weight_when_rows_are_whole_blocks():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(3)
    w = torch.randn(48, 192)  # a linear weight (out, in) with in_features a multiple of 64
    p, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = NF4Tensor(p.view(-1), st.absmax, st.state2.absmax, st.offset, tuple(w.shape))
    assert torch.equal(nf4_quantize(w).codes, p.view(-1))
    assert torch.equal(nf4_dequantize(theirs), bnbf.dequantize_4bit(p, st))


def test_dq_index_disagreement_with_bitsandbytes_is_rare_near_ties():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(512, 512) * 0.02  # 4096 blocks of 64, 16 second-level blocks of 256
    p, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = nf4_quantize(w)
    diff = (q.absmax.long() - st.absmax.long()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.005
    # Each disagreement is between adjacent codes, with the value within 10% of the gap from their
    # midpoint (here 0.41-0.50 of the way); ours is never the farther one.
    target = (w.reshape(-1, 64).abs().amax(dim=1) - st.offset) / st.state2.absmax.repeat_interleave(256)
    d_ours = (DYNAMIC_CODE[q.absmax.long()] - target).abs()
    d_theirs = (DYNAMIC_CODE[st.absmax.long()] - target).abs()
    assert bool((d_ours <= d_theirs).all())
    bad = diff > 0
    gap = (DYNAMIC_CODE[st.absmax.long()] - DYNAMIC_CODE[q.absmax.long()]).abs()
    assert bool(((d_theirs - d_ours)[bad] <= 0.2 * gap[bad]).all())


def test_dynamic_code_is_bitsandbytes_dynamic_map():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True))
    assert DYNAMIC_CODE.shape == (256,) and DYNAMIC_CODE.max() == 1 and (DYNAMIC_CODE == 0).sum() == 1


# ----------------------------------------------------------------------------- without bitsandbytes

@pytest.mark.parametrize("shape", [(96, 160), (5, 13)])
def test_round_trip_is_nearest_code_and_bounded(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * torch.logspace(-3, 0, shape[1])  # columns of very different scale
    n = w.numel()
    q = nf4_quantize(w, block_size=64, double_quant=False)
    absmax = w.reshape(-1).abs()
    absmax = torch.cat([F.pad(absmax, (0, -n % 64)).view(-1, 64).amax(1)])
    assert torch.equal(q.absmax, absmax)
    idx = _unpack(q.codes, n)
    scaled = w.reshape(-1) / absmax.repeat_interleave(64)[:n]
    dist = (scaled[:, None] - NF4_CODE[None, :]).abs()
    # the chosen code is the nearest one (up to float32 rounding of the scaled value)
    assert bool((dist.gather(1, idx[:, None]).squeeze(1) <= dist.min(1).values + 1e-6).all())
    err = (nf4_dequantize(q) - w).abs().reshape(-1)
    bound = absmax.repeat_interleave(64)[:n] * _max_gap(NF4_CODE) / 2
    assert bool((err <= bound * (1 + 1e-6)).all())
    # Double quantization adds at most the error of the block scale (|code| <= 1).
    qd = nf4_quantize(w, block_size=64, double_quant=True)
    assert torch.equal(qd.codes, q.codes)  # the 4-bit codes use the fp32 absmax
    am = dequantize_absmax(qd)
    c = qd.absmax_scale.repeat_interleave(256)[: am.numel()]
    assert bool(((am - absmax).abs() <= c * _max_gap(DYNAMIC_CODE) / 2 * (1 + 1e-5) + 1e-7).all())
    err_dq = (nf4_dequantize(qd) - w).abs().reshape(-1)
    assert bool((err_dq <= bound * (1 + 1e-6) + (am - absmax).abs().repeat_interleave(64)[:n] + 1e-7).all())


def test_zero_block_and_dtypes():
    w = torch.zeros(4, 64)
    w[2:] = torch.randn(2, 64)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        q = nf4_quantize(w.to(dt), double_quant=False)
        d = nf4_dequantize(q, dt)
        assert d.dtype == dt and torch.equal(d[:2], torch.zeros(2, 64, dtype=dt))


def test_bad_inputs_raise_config_error():
    with pytest.raises(ConfigError, match="block_size"):
        nf4_quantize(torch.randn(8, 8), block_size=0)
    with pytest.raises(ConfigError, match="dq_block_size"):
        nf4_quantize(torch.randn(8, 8), dq_block_size=-1)
    with pytest.raises(ConfigError, match="float"):
        nf4_quantize(torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ConfigError, match="non-finite"):
        nf4_quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="in_features"):
        NF4Linear(0, 4)


# ------------------------------------------------------------------------------------------ NF4Linear

def test_nf4_linear_forward_and_input_gradient():
    torch.manual_seed(2)
    lin = nn.Linear(160, 96)
    m = NF4Linear.from_linear(lin)
    assert (m.in_features, m.out_features) == (160, 96)
    assert not any(p.requires_grad for p in m.parameters())
    w = m.dequantize()
    assert w.shape == (96, 160) and w.dtype == torch.float32
    assert torch.equal(w, nf4_dequantize(nf4_quantize(lin.weight)))
    x = torch.randn(2, 3, 160, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 3, 96)
    torch.testing.assert_close(y, F.linear(x, w, lin.bias), rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-6, atol=1e-6)
    # the dequantized weight is close to the original (NF4 of a uniform(-1/sqrt(160), ..) init)
    assert float((w - lin.weight.detach()).abs().max()) < 0.25 * float(lin.weight.detach().abs().max())


def test_nf4_linear_state_dict_dtype_and_no_bias():
    torch.manual_seed(4)
    m = NF4Linear.from_linear(nn.Linear(64, 40))
    sd = m.state_dict()
    assert set(sd) == {"codes", "absmax", "absmax_scale", "absmax_offset", "bias"}
    fresh = NF4Linear(64, 40)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 5, 64)
    assert torch.equal(fresh(x), m(x))
    # casting the model keeps the fp32 block scales fp32; the forward runs in x's dtype
    m.to(torch.bfloat16)
    assert m.absmax_scale.dtype == torch.float32 and m.absmax_offset.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16 and m(x.bfloat16()).dtype == torch.bfloat16
    plain = NF4Linear.from_linear(nn.Linear(64, 40, bias=False), double_quant=False)
    assert plain.bias is None and set(plain.state_dict()) == {"codes", "absmax"}
    torch.testing.assert_close(plain(x), F.linear(x, plain.dequantize()), rtol=0, atol=0)
    meta = NF4Linear.from_linear(nn.Linear(64, 40, device="meta"))
    assert meta.codes.is_meta and meta.nbytes == m.nbytes


def test_nf4_linear_bytes_per_parameter():
    n = 256 * 256  # 1024 blocks of 64, 4 second-level blocks of 256
    m = NF4Linear.from_linear(nn.Linear(256, 256, bias=False))
    # 4-bit codes + an 8-bit absmax per 64 + an fp32 scale per 64*256 + the fp32 mean
    assert m.nbytes == n // 2 + n // 64 + 4 * n // (64 * 256) + 4 == nf4_nbytes(n)
    bits = 8 * m.nbytes / n
    assert bits - 32 / n == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125  # the paper's 4.127
    assert round(bits - 32 / n, 3) == 4.127
    plain = NF4Linear.from_linear(nn.Linear(256, 256, bias=False), double_quant=False)
    assert 8 * plain.nbytes / n == 4 + 32 / 64  # 4.5 bits without double quantization
    # partial blocks round up: 7 * 11 = 77 weights -> 39 code bytes, 2 blocks, 1 scale, the mean
    assert NF4Linear(11, 7).nbytes == 39 + 2 + 4 + 4 == nf4_nbytes(77)
    assert math.isclose(nf4_nbytes(10**8) * 8 / 10**8, 4.127, abs_tol=1e-3)
