"""4-bit NormalFloat (NF4) weights with double quantization: the frozen base of QLoRA.

Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
section 3 and appendix E; bitsandbytes (``quantize_4bit(quant_type="nf4", compress_statistics=True)``)
is the reference implementation this module matches.

NF4 (paper section 3, "4-bit NormalFloat"). The 16 code values are quantiles of N(0, 1), normalized to
[-1, 1], with an exact zero: 8 negative halves of quantiles at ``linspace(delta, 1/2, 9)`` and 7 positive
at ``linspace(delta, 1/2, 8)``, where ``delta = 1/2 (1/(2*15) + 1/(2*16))`` is the paper's offset
(bitsandbytes rounds it to 0.9677083 = 1 - delta). :data:`NF4_CODE` is bitsandbytes' table; the tests
rebuild it from the quantiles.

Blockwise quantization. The weight is flattened row-major and cut into blocks of ``block_size`` (64)
consecutive values; the paper's absmax ``c`` of each block scales it into [-1, 1] and every value
becomes the index of the nearest code value (a tie goes to the lower one), two 4-bit indices per byte,
the first in the high nibble (bitsandbytes' layout). ``w ~ NF4_CODE[q] * c``.

Double quantization (paper section 3, "Double Quantization"). The fp32 absmax values ``c_2`` cost 32 / 64
= 0.5 bit per weight. They are quantized once more: subtract their mean, cut into blocks of
``dq_block_size`` (256), and store each as an 8-bit index into bitsandbytes' signed dynamic
(tree) 8-bit code (Dettmers 2015, ``create_dynamic_map``; the paper calls it "8-bit Floats") with one
fp32 absmax ``c_1`` per block and the fp32 mean. Storage then costs

    4 + 8 / 64 + 32 / (64 * 256) = 4.127 bits per weight          (paper: 4.127)

plus 32 bits for the mean per tensor (see :func:`nf4_nbytes`). Paper notation -> ours: ``c_2`` (first
level absmax, FP32 before DQ) is ``absmax``; ``c_1`` (second-level constants) is ``absmax_scale``; the
mean is ``absmax_offset``; the block sizes 64 and 256 are ``block_size`` and ``dq_block_size``.

Exactness against bitsandbytes 0.50 on CPU: the packed 4-bit codes, the first-level absmax, the mean
and the second-level absmax are bit-identical, and dequantizing bitsandbytes' own state here gives
its values bit for bit. The 8-bit indices of the double quantization are the nearest dynamic-code
values here; bitsandbytes' CPU C kernel (a bucketed binary search) picks the other, adjacent
neighbour for about 0.1% of them (4 of 4096 on a 512 x 512 randn weight, each within 10% of the gap
from the midpoint), so such a block's scale differs by one step of the 8-bit code; the weight RMSE is
the same to 7 digits (``tests/test_nf4.py`` measures this). bitsandbytes' CPU ``dequantize_4bit``
of a 2-D tensor whose rows are not whole blocks scales per row, not per flat block as its quantizer
does; the tests compare flat tensors there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.errors import ConfigError

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4"); QLoRA appendix E), sorted, index 7 is 0.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic (tree) code used for double quantization, (256,) float32, sorted.

    Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning", as bitsandbytes builds it
    (``create_dynamic_map(signed=True)``): for exponent e = 0..6, 2**e fraction values (midpoints of
    ``linspace(0.1, 1, 2**e + 1)``) times 10**(e - 6), each with both signs, plus 0 and 1.
    """
    vals = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = mids * (10 ** (e - 6))
        vals += [scaled, -scaled]
    return torch.cat(vals).sort().values


DYNAMIC_CODE = dynamic_code()


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` for each of ``x`` (ties to the lower index)."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, bounds.to(x.device))


def _blockwise_absmax_scale(x: torch.Tensor, block: int, *, divide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block (n_blocks,), x / absmax clamped to [-1, 1] (n,)) for flat float32 ``x``.

    bitsandbytes' reference kernels multiply by the reciprocal in full blocks and divide in the last,
    partial one (``divide=False``); its CPU 8-bit kernel divides everywhere (``divide=True``)."""
    n = x.numel()
    full = n - n % block
    head = x[:full].view(-1, block)
    absmax = head.abs().amax(dim=1)
    den = absmax.clamp(min=1e-38).view(-1, 1)
    scaled = (head / den if divide else head * (1.0 / den)).reshape(-1)
    if full < n:
        tail_max = x[full:].abs().amax()
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, x[full:] / tail_max.clamp(min=1e-38)])
    return absmax, scaled.clamp(-1, 1)


def _check_block(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def nf4_nbytes(n: int, block_size: int = 64, double_quant: bool = True, dq_block_size: int = 256) -> int:
    """Bytes of ``n`` weights stored as NF4: ceil(n/2) bytes of codes plus the block scales.

    With double quantization: + 1 byte per block of ``block_size`` (8-bit absmax index) + 4 bytes per
    ``dq_block_size`` blocks (fp32 second-level absmax) + 4 bytes (fp32 mean), i.e. 4.127 bits per
    weight at 64 / 256 (QLoRA section 3). Without: + 4 bytes (fp32 absmax) per block, 4.5 bits. The
    two constant code tables (16 and 256 float32 values) are shared by every layer and not counted."""
    blocks = -(-n // block_size)
    if not double_quant:
        return -(-n // 2) + 4 * blocks
    return -(-n // 2) + blocks + 4 * -(-blocks // dq_block_size) + 4


@dataclass(frozen=True)
class NF4Tensor:
    """A weight stored as NF4 (see the module docstring); build it with :func:`nf4_quantize`.

    Fields (n = prod(shape), n_blocks = ceil(n / block_size), n_dq = ceil(n_blocks / dq_block_size)):
        codes: (ceil(n / 2),) uint8, two 4-bit indices into :data:`NF4_CODE` per byte, high nibble first.
        absmax: (n_blocks,) float32 block absmax, or with double quantization (n_blocks,) uint8 indices
            into :data:`DYNAMIC_CODE`.
        absmax_scale: (n_dq,) float32 absmax of the centered block absmaxes, or None without DQ.
        absmax_offset: () float32 mean of the block absmaxes, or None without DQ.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    shape: tuple[int, ...]
    block_size: int = 64
    dq_block_size: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (codes and scales), equal to :func:`nf4_nbytes`."""
        ts = [self.codes, self.absmax, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def nf4_quantize(w: torch.Tensor, block_size: int = 64, double_quant: bool = True,
                 dq_block_size: int = 256) -> NF4Tensor:
    """Quantize a float tensor ``w`` of any shape to NF4, blockwise over its row-major flattening.

    Args:
        w: float16, bfloat16 or float32 tensor, any shape; computed in float32.
        block_size: weights per absmax (the paper uses 64).
        double_quant: quantize the absmax values to 8 bits (paper section 3; bitsandbytes'
            ``compress_statistics=True``).
        dq_block_size: absmax values per second-level fp32 scale (256, fixed in bitsandbytes).

    Returns: an :class:`NF4Tensor` on ``w``'s device.

    Raises:
        ConfigError: ``w`` is empty, not floating point or not finite; a block size is not a positive
            integer.
    """
    _check_block("block_size", block_size)
    _check_block("dq_block_size", dq_block_size)
    if not w.is_floating_point() or w.numel() == 0:
        raise ConfigError(f"nf4_quantize needs a non-empty float tensor, got dtype {w.dtype}, shape "
                          f"{tuple(w.shape)}")
    flat = w.detach().reshape(-1).float()
    if not bool(torch.isfinite(flat).all()):
        raise ConfigError("nf4_quantize: the weight has non-finite values (inf or nan)")
    absmax, scaled = _blockwise_absmax_scale(flat, block_size, divide=False)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))  # an odd count: the last low nibble codes 0.0 (index 7)
    q = _nearest(scaled, NF4_CODE).to(torch.uint8)
    codes = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Tensor(codes, absmax, None, None, tuple(w.shape), block_size, dq_block_size)
    offset = absmax.mean()
    scale, scaled2 = _blockwise_absmax_scale(absmax - offset, dq_block_size, divide=True)
    q8 = _nearest(scaled2, DYNAMIC_CODE).to(torch.uint8)
    return NF4Tensor(codes, q8, scale, offset, tuple(w.shape), block_size, dq_block_size)


def _blockwise_scale_up(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """``values[i] * scales[i // block]`` for flat ``values`` (n,) and ``scales`` (ceil(n / block),)."""
    n = values.numel()
    if n % block == 0:  # whole blocks: broadcast instead of materializing n scales
        return (values.view(-1, block) * scales.view(-1, 1)).view(n)
    return values * scales.repeat_interleave(block)[:n]


def dequantize_absmax(q: NF4Tensor) -> torch.Tensor:
    """The block absmax values, (n_blocks,) float32 (decoded from 8 bits under double quantization)."""
    if not q.double_quant:
        return q.absmax.float()
    code = DYNAMIC_CODE.to(q.absmax.device)
    return _blockwise_scale_up(code[q.absmax.long()], q.absmax_scale.float(), q.dq_block_size) + \
        q.absmax_offset.float()


def nf4_dequantize(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``NF4_CODE[codes] * absmax`` per block, computed in float32, as a tensor of ``q.shape`` in
    ``dtype`` (bitsandbytes' ``dequantize_4bit``, bit for bit on its own state)."""
    n = 1
    for s in q.shape:
        n *= s
    idx = torch.stack([q.codes >> 4, q.codes & 0xF], dim=1).reshape(-1)[:n]
    vals = NF4_CODE.to(q.codes.device)[idx.long()]
    return _blockwise_scale_up(vals, dequantize_absmax(q), q.block_size).view(q.shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 (QLoRA's base layer).

    ``forward(x)``: (..., in_features) -> (..., out_features) = ``F.linear(x, W, bias)`` with W the
    dequantized weight (out_features, in_features) in ``x.dtype``. The quantized weight lives in
    buffers (``codes``, ``absmax``, and under double quantization ``absmax_scale``,
    ``absmax_offset``), so ``state_dict`` saves it; ``bias`` is a frozen ``nn.Parameter`` (no
    parameter requires grad). ``model.to(dtype)`` casts the bias but keeps the float32 scales in
    float32. Build one with :meth:`from_linear`, or with the constructor (zeros) to load a state dict.

    Raises:
        ConfigError: a size or block size is not a positive integer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block_size: int = 64,
                 double_quant: bool = True, dq_block_size: int = 256,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features),
                        ("block_size", block_size), ("dq_block_size", dq_block_size)):
            _check_block(name, v)
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.dq_block_size, self.double_quant = block_size, dq_block_size, double_quant
        n = in_features * out_features
        blocks = -(-n // block_size)
        self.register_buffer("codes", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(-(-blocks // dq_block_size), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, device=device))
            self.absmax_scale = self.absmax_offset = None
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True,
                    dq_block_size: int = 256) -> NF4Linear:
        """Quantize ``linear.weight`` (out_features, in_features) to NF4; the bias is copied as is. A
        linear on the meta device gives an NF4Linear on the meta device (sizes only)."""
        w = linear.weight
        b = linear.bias
        m = cls(linear.in_features, linear.out_features, bias=b is not None, block_size=block_size,
                double_quant=double_quant, dq_block_size=dq_block_size, device=w.device,
                dtype=b.dtype if b is not None else None)
        if w.is_meta:
            return m
        q = nf4_quantize(w, block_size, double_quant, dq_block_size)
        with torch.no_grad():
            m.codes.copy_(q.codes)
            m.absmax.copy_(q.absmax)
            if double_quant:
                m.absmax_scale.copy_(q.absmax_scale)
                m.absmax_offset.copy_(q.absmax_offset)
            if b is not None:
                m.bias.copy_(b.detach())
        return m

    def quantized(self) -> NF4Tensor:
        """The stored weight as an :class:`NF4Tensor` (views of the buffers)."""
        return NF4Tensor(self.codes, self.absmax, self.absmax_scale, self.absmax_offset,
                         (self.out_features, self.in_features), self.block_size, self.dq_block_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight storage (codes and scales, bias excluded): equals
        ``nf4_nbytes(in_features * out_features, ...)``, 4.127 bits per weight at 64 / 256 + 4 bytes."""
        return self.quantized().nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out_features, in_features) in ``dtype`` (computed in float32)."""
        return nf4_dequantize(self.quantized(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # Module.to(dtype) casts every float buffer; the fp32 block scales must stay fp32.
        keep = {k: getattr(self, k) for k in ("absmax", "absmax_scale", "absmax_offset")
                if isinstance(getattr(self, k), torch.Tensor) and getattr(self, k).dtype == torch.float32}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = getattr(self, k)
            if new.dtype != torch.float32:
                setattr(self, k, new.to(torch.float32) if old.is_meta else old.to(new.device))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, double_quant={self.double_quant}")
