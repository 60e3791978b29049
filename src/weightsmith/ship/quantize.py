"""Weight-only post-training quantization of a built model, applied from outside as a pass.

    weightsmith quantize RUN_DIR --method int8|int4|gptq-int4 [--group-size 64] --out DIR

=========  ====  ==========================================================================
method     bits  grid
=========  ====  ==========================================================================
int8       8     symmetric, one scale per output channel: q in [-127, 127], w ~ q * s
int4       4     symmetric, one scale per group of ``group_size`` input columns: q in [-8, 7],
                 round-to-nearest (RTN)
gptq-int4  4     the same int4 grid, values chosen by GPTQ (Frantar et al. 2023, ship/gptq.py)
=========  ====  ==========================================================================

What is quantized: every ``nn.Linear`` inside ``model.blocks`` with the method's grid: attention
q/k/v/o, the MLP, and in an MoE block the router and every expert's gate/up/down (each expert is a
SwiGLU of ``nn.Linear`` layers); and the ``lm_head`` with int8 per-row whatever the method. Norms and
an untied embedding stay float. Under ``gptq-int4`` an expert that no calibration token is routed to
has no Hessian; it is quantized by RTN instead, and ``quantize.json`` lists it under ``rtn_fallback``.

``group_size`` must be a positive integer that divides the ``in_features`` of every quantized layer
(and, for int4 packing, ``in_features`` must be even); anything else is a one-line ConfigError.

The tied lm_head. With ``tie_embeddings`` the (V, D) matrix is both the token-embedding table and the
output projection. We quantize it once, int8 with one scale per row: a row is a token, so the same
scales are per-output-channel for the lm_head and per-token for the embedding lookup, and
:class:`TiedQuantEmbedding` reads the lm_head's int8 rows. Keeping it float would leave it at ~14% of
the main-job model's parameters in fp32 (int8 then lands at ~36% of the fp32 bytes, over the 30% bar);
storing a float embedding beside an int8 lm_head would cost more than fp32 alone; and int4 on the
matrix that both reads and writes the residual stream costs the most accuracy per byte saved (it is
also what llama.cpp's q4_0 keeps at higher precision). An untied embedding stays float.

Kernels (measured on the 2-core CPU with torch 2.13, 128 -> 384 linear, microseconds per call):
fp32 ``F.linear`` 15 (B=1) / 26 (B=8); ``torch._weight_int8pack_mm`` 52 / 496; dequantize then
``F.linear`` 52 / 62; torchao 0.18 ``Int8WeightOnlyConfig`` 90 / 122 (it loads on this torch but
is slower and warns about missing CUDA kernels, so it is not a dependency). :class:`QuantLinear`
therefore converts int8 -> float on the fly and applies the per-channel scale to the *output*
(``(x @ q^T) * s`` equals ``x @ (q * s)^T``), which saves one elementwise pass over the weight.
For these tiny layers none of the int8 kernels beats fp32: the gain is memory (bytes on disk and
in RAM), not speed.

Shapes: a linear's weight is (out_features, in_features) = (N, K); ``scales`` is (N, K // group_size);
int4 values are packed two per byte along K, ``qweight`` (N, K // 2) uint8.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.errors import ConfigError, WeightsmithError

METHODS: dict[str, int] = {"int8": 8, "int4": 4, "gptq-int4": 4}  # method -> bits
QUANT_FILE = "quantize.json"


# ----------------------------------------------------------------------------------------- grids


def qrange(bits: int) -> tuple[int, int]:
    """Symmetric integer range: int8 -> (-127, 127) (no -128, so the grid is symmetric), int4 -> (-8, 7)."""
    return (-127, 127) if bits == 8 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def group_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Scales for groups along the last dim: w (..., g) -> (...,), ``absmax / qmax`` (1 for all-zero groups)."""
    s = w.abs().amax(-1) / (2 ** (bits - 1) - 1)
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest ``clamp(round(w / scale))`` as integers (same dtype as ``w``); scale broadcasts."""
    lo, hi = qrange(bits)
    return torch.clamp(torch.round(w / scale), lo, hi)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise symmetric quantization of a weight (N, K).

    Returns:
        (q int8 (N, K), scales float32 (N, K // group_size)); ``w ~ q * scales`` repeated per group.

    Raises:
        ConfigError: if ``group_size`` does not divide K.
    """
    N, K = w.shape
    check_group_size(K, group_size)
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    s = group_scales(wg, bits)  # (N, G)
    q = quantize_to_grid(wg, s[..., None], bits)
    return q.reshape(N, K).to(torch.int8), s


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers, scales (N, G) -> float32 weight (N, K); the group size is K // G."""
    N, K = q.shape
    G = scales.shape[1]
    return (q.float().reshape(N, G, K // G) * scales[..., None]).reshape(N, K)


def _check_positive_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ConfigError(f"--group-size {group_size!r} must be a positive integer (input columns per scale, "
                          "e.g. 64) that divides every quantized layer's in_features")


def check_group_size(in_features: int, group_size: int) -> None:
    """Raise ConfigError (one line) unless ``group_size`` is a positive integer dividing ``in_features``."""
    _check_positive_group_size(group_size)
    if in_features % group_size:
        raise ConfigError(f"--group-size {group_size} must divide every quantized layer's in_features; "
                          f"{in_features} is not a multiple of it")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [-8, 7], K even -> uint8 (N, K // 2); column 2j in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (N, K // 2) -> int8 (N, K) in [-8, 7]."""
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1)


# --------------------------------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """Weight-only quantized linear, (..., in_features) -> (..., out_features), float activations.

    Buffers: ``qweight`` int8 (N, K) for 8 bits or packed uint8 (N, K // 2) for 4 bits; ``scales``
    float32 (N, K // group_size). ``bias`` (if any) stays a float parameter.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ConfigError(f"quantization.bits must be 4 or 8, got {bits}")
        check_group_size(in_features, group_size)
        if bits == 4 and in_features % 2:
            raise ConfigError(f"int4 packing needs an even in_features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        cols = in_features if bits == 8 else in_features // 2
        self.register_buffer("qweight", torch.zeros(out_features, cols,
                                                    dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, in_features // group_size))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
        """An empty QuantLinear shaped like ``linear`` (to load quantized weights into)."""
        m = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None)
        return m.to(linear.weight.device)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, q: torch.Tensor, scales: torch.Tensor, bits: int,
                       group_size: int) -> QuantLinear:
        """Wrap integer values q (N, K) and scales (N, K // group_size) computed for ``linear``."""
        m = cls.like(linear, bits, group_size)
        m.qweight.copy_(q.to(torch.int8) if bits == 8 else pack_int4(q))
        m.scales.copy_(scales)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
        """Round-to-nearest quantization of ``linear`` (see :func:`quantize_rtn`)."""
        q, s = quantize_rtn(linear.weight, bits, group_size)
        return cls.from_quantized(linear, q, s, bits, group_size)

    def int_weight(self) -> torch.Tensor:
        """The integer values (N, K) as int8."""
        return self.qweight if self.bits == 8 else unpack_int4(self.qweight)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (N, K)."""
        return dequantize_weight(self.int_weight(), self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:  # one scale per output channel: scale the output, not the weight
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.view(-1).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


class TiedQuantEmbedding(nn.Module):
    """Token embedding that reads the rows of a tied, quantized lm_head: idx (B, T) -> (B, T, D).

    It holds no tensors of its own (the lm_head owns them, so they are saved once); the lm_head is kept
    as a plain attribute, not a submodule, for that reason. ``weight`` is the dequantized (V, D) table,
    there for code that asks an embedding for its device and dtype.
    """

    def __init__(self, lm_head: QuantLinear) -> None:
        super().__init__()
        self.__dict__["source"] = lm_head  # not registered: no duplicate state-dict entries

    @property
    def weight(self) -> torch.Tensor:
        return self.source.dequantized_weight()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        src = self.source
        q = src.qweight[idx]  # (B, T, K) or packed (B, T, K // 2): only the looked-up rows
        q = q.float() if src.bits == 8 else unpack_int4(q.reshape(-1, q.shape[-1])).float()
        s = src.scales[idx].reshape(-1, src.scales.shape[1])  # (B*T, G)
        rows = q.reshape(s.shape[0], s.shape[1], -1) * s[..., None]
        return rows.reshape(*idx.shape, src.in_features)


# ------------------------------------------------------------------------------------------ passes


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every ``nn.Linear`` in ``model.blocks``, in forward order."""
    return [(f"blocks.{n}", m) for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _tied(model: nn.Module) -> bool:
    return model.lm_head.weight is model.tok_emb.weight


def _quantize_head(model: nn.Module, head: QuantLinear, tied: bool) -> None:
    model.lm_head = head
    if tied:
        model.tok_emb = TiedQuantEmbedding(head)


def check_quantizable(model: nn.Module, method: str, group_size: int) -> None:
    """Raise ConfigError (one line) unless ``method`` and ``group_size`` fit every layer of ``model``."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not supported; choose one of {list(METHODS)}")
    if not all(hasattr(model, a) for a in ("blocks", "lm_head", "tok_emb")):
        raise ConfigError(f"{type(model).__name__} cannot be quantized; only the 'gpt' family can")
    _check_positive_group_size(group_size)  # also for int8, which ignores it: 0 or -1 is never meant
    if METHODS[method] == 4:
        for name, lin in quantizable_linears(model):
            if lin.in_features % group_size or lin.in_features % 2:
                raise ConfigError(f"--group-size {group_size} must divide in_features of every layer; "
                                  f"{name} has {lin.in_features}")


def apply_quantization(model: nn.Module, method: str, group_size: int) -> nn.Module:
    """Structural pass: replace layers by empty quantized ones, ready for ``load_weights``. In place."""
    check_quantizable(model, method, group_size)
    bits = METHODS[method]
    tied = _tied(model)
    for name, lin in quantizable_linears(model):
        set_module(model, name, QuantLinear.like(lin, bits, group_size if bits == 4 else lin.in_features))
    _quantize_head(model, QuantLinear.like(model.lm_head, 8, model.lm_head.in_features), tied)
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = 64,
                   calibration: torch.Tensor | None = None, *, fallbacks: list[dict] | None = None,
                   log=lambda *a: None) -> nn.Module:
    """Quantize ``model`` in place (see the module docstring for what and how) and return it.

    Args:
        method: ``int8``, ``int4`` or ``gptq-int4``.
        group_size: input columns per scale for the 4-bit methods (int8 uses one scale per row).
        calibration: token ids (n_samples, T), int64; required by ``gptq-int4``.
        fallbacks: ``gptq-int4`` appends one dict per layer it quantized by RTN for lack of calibration
            data (see ``gptq_quantize_model``).

    Raises:
        ConfigError: unknown method, a group size that does not divide a layer, or no calibration data.
    """
    check_quantizable(model, method, group_size)
    bits = METHODS[method]
    tied = _tied(model)
    if method == "gptq-int4":
        from weightsmith.ship.gptq import gptq_quantize_model

        if calibration is None:
            raise ConfigError("gptq-int4 needs calibration token windows")
        gptq_quantize_model(model, calibration, bits, group_size, fallbacks=fallbacks, log=log)
    else:
        for name, lin in quantizable_linears(model):
            set_module(model, name, QuantLinear.from_linear(lin, bits, group_size if bits == 4 else lin.in_features))
    _quantize_head(model, QuantLinear.from_linear(model.lm_head, 8, model.lm_head.in_features), tied)
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by an ``nn.Linear`` holding its dequantized float32 weight (in place).

    A :class:`TiedQuantEmbedding` becomes an ``nn.Embedding`` tied again to the new lm_head, so exporters
    see an ordinary float model (the quantization error is kept, the storage saving is not).
    """
    tied = isinstance(getattr(model, "tok_emb", None), TiedQuantEmbedding)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.scales.device)
            lin.weight.copy_(m.dequantized_weight())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            set_module(model, name, lin)
    if tied:
        emb = nn.Embedding(model.lm_head.out_features, model.lm_head.in_features, device=model.lm_head.weight.device)
        emb.weight = model.lm_head.weight
        model.tok_emb = emb
    return model


# ------------------------------------------------------------------------------------- run level


def calibration_windows(train, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random token windows (n_samples, seq_len), int64, from a training shard.

    Args:
        train: 1-D token ids (N,), the run's training split (``PreparedData.train``, already checked
            against the run with ``weightsmith.runs.check_run_data``).

    Raises:
        DataError: if the shard has no more than ``seq_len`` tokens.
    """
    import numpy as np

    from weightsmith.errors import DataError

    if len(train) <= seq_len:
        raise DataError(f"training shard has {len(train)} tokens; calibration needs more than {seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(train) - seq_len, n_samples)
    return torch.from_numpy(np.stack([np.asarray(train[s:s + seq_len], dtype=np.int64) for s in starts]))


@torch.inference_mode()
def decode_tokens_per_s(model: nn.Module, n_new: int = 64, prompt_len: int = 16, repeats: int = 3) -> float:
    """Greedy batch-1 decode speed in tokens/s, best of ``repeats``.

    The prompt (token ids ``0..prompt_len-1``) is prefilled into a KV cache untimed; then ``n_new``
    single-token steps (forward with the cache + argmax), exactly as in ``generate``, are timed.
    """
    n_new = min(n_new, model.config.max_seq_len - prompt_len)
    prompt = torch.arange(prompt_len)[None] % model.config.vocab_size
    best = float("inf")
    for _ in range(repeats):
        cache = model.new_cache(1, prompt_len + n_new)
        nxt = model(prompt, cache=cache, last_only=True)[:, -1].argmax(-1)
        t0 = time.perf_counter()
        for t in range(prompt_len, prompt_len + n_new):
            nxt = model(nxt[:, None], cache=cache, start=t)[:, -1].argmax(-1)
        best = min(best, time.perf_counter() - t0)
    return n_new / best


def _measure(model: nn.Module, run_cfg: dict, tokens, token_bytes) -> dict:
    from weightsmith.eval.metrics import evaluate_lm

    train_cfg = run_cfg.get("train", {})
    seq_len = train_cfg.get("seq_len") or model.config.max_seq_len
    ev = evaluate_lm(model, tokens, token_bytes, seq_len, train_cfg.get("eval_batch_size", 16))
    return {"val_bpb": ev["val_bpb"], "val_loss": ev["val_loss"], "decode_tokens_per_s": decode_tokens_per_s(model)}


def quantize_run(run_dir: str | Path, method: str, out: str | Path, group_size: int = 64, *,
                 n_calibration: int = 128, measure: bool = True, log=print) -> dict:
    """Quantize the newest checkpoint of ``run_dir`` into a new run directory ``out``, atomically.

    ``out`` gets the run layout (config.toml with a ``[quantization]`` section {method, group_size, bits},
    tokenizer.json, manifest.json, checkpoints/step_*/model.safetensors with the quantized tensors) plus
    ``quantize.json``: weight bytes (size of model.safetensors), val_bpb (bits/byte, whole validation
    split) and greedy batch-1 decode tokens/s, for the fp32 original and the quantized model; for
    ``gptq-int4`` also ``rtn_fallback``, the layers quantized by RTN for lack of calibration tokens
    (``[{"layer", "method", "reason", "calibration_tokens"}]``, usually empty).

    The data (validation split for val_bpb, training split for GPTQ calibration) is rebuilt from the
    run's ``[data]`` and must be what the run was trained on (weightsmith.runs.check_run_data).

    Returns:
        the dict written to ``quantize.json``.

    Raises:
        WeightsmithError: ``run_dir`` is already quantized; ConfigError: bad method / group size;
        CheckpointError: ``out`` exists, or ``run_dir`` is not a run or is corrupt; DataError: the
        rebuilt data is not what the run was trained on.
    """
    from weightsmith.config import dump_toml
    from weightsmith.errors import CheckpointError
    from weightsmith.ship.export import atomic_output_dir
    from weightsmith.train.checkpoint import CKPT_DIR, WEIGHTS, load_run, save_checkpoint

    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise CheckpointError(f"--out {out} already exists; quantize never overwrites, choose a new path")
    run = load_run(run_dir)
    if "quantization" in run.config:
        q = run.config["quantization"]
        raise WeightsmithError(f"{run_dir} is already quantized ({q.get('method')}); quantize its fp32 source run")
    model = run.model
    if "adapter" in run.config:  # an adapted run: quantize the merged weights (the new run has no adapters)
        from weightsmith.adapters import merge_adapters

        merge_adapters(model)
    check_quantizable(model, method, group_size)
    bits = METHODS[method]
    result: dict = {"method": method, "bits": bits, "group_size": group_size if bits == 4 else None,
                    "source": str(run_dir.resolve()), "checkpoint": run.checkpoint.name}
    tokens = token_bytes = data = None
    if measure or method == "gptq-int4":
        from weightsmith.runs import prepare_run_data

        data = prepare_run_data(run_dir, run.config)
    if measure:
        tokens = data.val
        token_bytes = run.tokenizer.token_bytes()
        result["fp32"] = {"weight_bytes": (run.checkpoint / WEIGHTS).stat().st_size,
                          **_measure(model, run.config, tokens, token_bytes)}
    calibration, fallbacks = None, None
    if method == "gptq-int4":
        calibration = calibration_windows(data.train, n_calibration, model.config.max_seq_len)
        fallbacks = []
    t0 = time.perf_counter()
    quantize_model(model, method, group_size, calibration, fallbacks=fallbacks, log=log)
    result["quantize_seconds"] = round(time.perf_counter() - t0, 2)
    if fallbacks is not None:
        result["rtn_fallback"] = fallbacks
    tree = dict(run.config)
    tree.pop("adapter", None)  # merged above
    tree["quantization"] = {"method": method, "group_size": group_size if bits == 4 else 0, "bits": bits}
    step = int(run.checkpoint.name.split("_")[-1])
    with atomic_output_dir(out) as tmp:
        (tmp / "config.toml").write_text(dump_toml(tree))
        for name in ("tokenizer.json", "manifest.json"):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)
        ckpt = save_checkpoint(tmp, step, model, None)
        result["quantized"] = {"weight_bytes": (ckpt / WEIGHTS).stat().st_size}
        if measure:
            result["quantized"].update(_measure(model, run.config, tokens, token_bytes))
            fp, qt = result["fp32"], result["quantized"]
            result["bytes_ratio"] = qt["weight_bytes"] / fp["weight_bytes"]
            result["delta_bpb"] = qt["val_bpb"] - fp["val_bpb"]
            result["decode_speed_ratio"] = qt["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
        result["checkpoint_dir"] = f"{CKPT_DIR}/{ckpt.name}"
        (tmp / QUANT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result
