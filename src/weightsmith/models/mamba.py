"""Mamba (Mamba-1) language model: selective state-space layers (S6) computed with a blocked scan.

Source: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Algorithm 2,
the S6 layer, and sec. 3.3: the scan is linear in T, the states are recomputed rather than stored in
HBM), and the reference ``Mamba`` mixer of ``mamba_ssm`` / Hugging Face ``MambaMixer`` for the
parameter layout and initialization.

Notation: the paper's D (model width) is our ``d_model``, its ED (inner width) ``d_inner = expand *
d_model`` (E below), N ``d_state``, the rank of the Delta projection ``dt_rank`` (R). Per channel d and
state index n the paper's continuous ``A`` is ``A = -exp(A_log)`` (E, N), time-invariant; ``Delta`` (our
``dt``), ``B`` and ``C`` depend on the input (that is the selection mechanism)::

    dt_t = softplus(dt_proj(x_proj(x_t)[:R]))   (E,)       B_t, C_t = x_proj(x_t)[R:]   (N,) each
    h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t^T            (E, N)  zero-order hold for A, Euler for B
    y_t = h_t C_t + D x_t                                    (E,)

Unlike Mamba-2 the decay ``exp(dt_t A)`` differs per (channel, state) entry, so there is no matmul form
of the recurrence (Mamba-2's SSD needs a scalar decay per head): any algorithm touches all T E N state
entries. :func:`selective_scan_ref` is the step-by-step loop (the oracle of the tests);
:func:`selective_scan` computes the same thing as a blocked scan with a hand-written backward (see
there).

Data flow of one block, shape legend B batch, T sequence, D = d_model, E = d_inner::

    x (B, T, D) -> RMSNorm -> in_proj -> x (E) | z (E)
      x -> causal depthwise conv (d_conv) -> SiLU -> x_proj -> dt_low (R) | B (N) | C (N)
      dt = softplus(dt_proj(dt_low))  (E)
      y = scan(x, dt, A, B, C) + D x  -> y * silu(z) -> out_proj -> + residual

Inference: a :class:`MambaState` per layer holds the last ``d_conv - 1`` conv inputs (E, d_conv - 1)
and the SSM state (E, N); a single-token step is a constant-cost recurrence (``recurrent = True``:
generation carries the state and never slides a window).

Initialization (as ``mamba_ssm``): ``A_log = log(1..N)`` for every channel (S4D-real), ``D = 1``,
``dt_proj.bias = softplus^-1(dt)`` with ``dt`` log-uniform in [dt_min, dt_max] floored at
``dt_init_floor``, ``dt_proj.weight ~ U(-R^-1/2, R^-1/2)``; ``x_proj`` and the conv keep PyTorch's
default; the embedding and ``in_proj`` ~ N(0, init_std), ``out_proj`` ~ N(0, init_std / sqrt(n_layers))
(one residual branch per layer, GPT-2's depth scaling, as in :mod:`weightsmith.models.mamba2`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.config import require_positive
from weightsmith.errors import ConfigError
from weightsmith.models.layers.norms import RMSNorm
from weightsmith.registry import register_family, register_preset


def _doc(default, text: str):
    return field(default=default, metadata={"doc": text})


@dataclass(kw_only=True)
class MambaConfig:
    """Mamba (Mamba-1) language model config (Gu & Dao 2023).

    ``d_inner`` is expand * d_model.
    """

    vocab_size: int = _doc(256, "number of token ids; a recipe that leaves it out takes the tokenizer's")
    d_model: int = _doc(128, "width of the residual stream")
    n_layers: int = _doc(4, "number of Mamba blocks")
    d_state: int = _doc(16, "SSM state size N per channel (the paper's N)")
    d_conv: int = _doc(4, "kernel size of the causal depthwise convolution over x")
    expand: int = _doc(2, "inner width d_inner = expand * d_model (the paper's E)")
    dt_rank: int | None = _doc(None, "rank R of the dt (the paper's Delta) projection; None means "
                                     "ceil(d_model / 16), resolved and saved with the run")
    chunk_size: int = _doc(64, "scan block length: longer sequences scan their blocks side by side; speed only, "
                               "the result is the same up to rounding")
    max_seq_len: int = _doc(256, "the training window only; generation carries the state and is not limited by it")
    norm_eps: float = _doc(1e-5, "epsilon of every RMSNorm (block and final)")
    tie_embeddings: bool = _doc(True, "the lm_head shares the token embedding's weight")
    bias: bool = _doc(False, "biases on in_proj and out_proj")
    conv_bias: bool = _doc(True, "bias on the depthwise convolution")
    dt_min: float = _doc(1e-3, "smallest initial dt: dt_proj.bias starts at softplus^-1 of a log-uniform dt")
    dt_max: float = _doc(0.1, "largest initial dt")
    dt_init_floor: float = _doc(1e-4, "the initial dt is clamped to at least this")
    init_std: float = _doc(0.02, "standard deviation of the embedding and in_proj (see the module docstring)")
    d_inner: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand",
                                "chunk_size", "max_seq_len"))
        self.d_inner = self.expand * self.d_model
        if self.dt_rank is None:  # resolved, so it is saved with the run
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.dt_rank <= 0:
            raise ConfigError(f"model.dt_rank must be positive (or None for ceil(d_model / 16)), got {self.dt_rank}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"model.dt_min={self.dt_min} must be in (0, dt_max={self.dt_max}]")
        if self.dt_init_floor <= 0:
            raise ConfigError(f"model.dt_init_floor must be positive, got {self.dt_init_floor}")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be positive, got {self.init_std}")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps must be positive, got {self.norm_eps}")


# ---------------------------------------------------------------------------------------------------
# the selective scan


def selective_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test oracle: the S6 recurrence one time step at a time, through autograd (no D skip).

    Args:
        x: (B, T, E); dt: (B, T, E), positive; A: (E, N), negative; B, C: (B, T, N); state: (B, E, N)
            before ``x[:, 0]``, default zeros.

    Returns:
        y (B, T, E) and the state (B, E, N) after the last step, in the inputs' dtype.
    """
    b, T, E = x.shape
    h = x.new_zeros(b, E, A.shape[1]) if state is None else state
    decay = torch.exp(dt[..., None] * A)  # (B, T, E, N)
    u = dt * x  # (B, T, E)
    ys = []
    for a_t, u_t, B_t, C_t in zip(decay.unbind(1), u.unbind(1), B.unbind(1), C.unbind(1)):
        h = a_t * h + u_t[:, :, None] * B_t[:, None, :]  # (B, E, N)
        ys.append((h * C_t[:, None, :]).sum(-1))  # (B, E)
    return torch.stack(ys, 1), h


def _scan_(h: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, h0: torch.Tensor | None, Q: int) -> None:
    """In place, no autograd: ``h[:, t] <- exp(dt[:, t] A) h[:, t - 1] + h[:, t]`` for t = 0 .. T - 1,
    with ``h[:, -1] = h0`` (None: zeros). ``h`` (B, T, E, N) holds the inputs on entry and the states on
    return; dt (B, T, E), A (E, N).

    A blocked (reduce-then-scan) parallel scan over ``c = T // Q`` blocks of Q steps, then the tail:

    1. every block scans its own Q steps from a zero state, all blocks side by side (Q in-place steps
       on (B, c, E, N) slices instead of T steps on (B, E, N));
    2. the true state entering each block is carried across the blocks (c steps), decayed by the
       block's total ``exp(A * sum(dt))``;
    3. each block's local states get the carried state's contribution ``exp(A * cumsum(dt)) h_start``,
       one elementwise pass;
    4. the last ``T - c Q`` steps run one by one from the carried state.

    Every exponent is <= 0 (dt > 0, A < 0): nothing overflows, and a decay that underflows is a decay
    to zero. The decays of phases 2-3 are ``exp`` of cumulative sums of ``dt`` (times A), not products
    of the per-step ``exp``: the same value up to fp32 rounding.
    """
    b, T, E, N = h.shape
    c, done = T // Q, 0
    if c > 1:  # else one sequential pass: a single block gains nothing
        hb, dtb = h[:, :c * Q].view(b, c, Q, E, N), dt[:, :c * Q].view(b, c, Q, E)
        for q in range(1, Q):  # 1. local scans, all blocks at once
            hb[:, :, q].addcmul_(torch.exp(dtb[:, :, q, :, None] * A), hb[:, :, q - 1])
        decay = torch.exp(dtb.cumsum(2)[..., None] * A)  # (B, c, Q, E, N): from each block's start
        s = h.new_zeros(b, E, N) if h0 is None else h0
        starts = []
        for k in range(c):  # 2. carry the state across the blocks
            starts.append(s)
            s = torch.addcmul(hb[:, k, -1], decay[:, k, -1], s)
        hb.addcmul_(decay, torch.stack(starts, 1)[:, :, None])  # 3. (B, c, 1, E, N) broadcast over Q
        done = c * Q
    for t in range(done, T):  # 4. the tail (all of it when there is one block)
        prev = h0 if t == 0 else h[:, t - 1]
        if prev is not None:
            h[:, t].addcmul_(torch.exp(dt[:, t, :, None] * A), prev)


def _sequential_forward(x, dt, A, B, C, state):
    """One pass over t on (B, E, N) slices that stay in cache: states into ``h`` (B, T, E, N), y (B, T, E)."""
    b, T, E = x.shape
    h = x.new_empty(b, T, E, A.shape[1])
    u = dt * x
    ys, prev = [], state
    for t in range(T):
        h_t = h[:, t]
        torch.mul(u[:, t, :, None], B[:, t, None, :], out=h_t)  # (dt x)_t B_t^T
        if prev is not None:
            h_t.addcmul_(torch.exp(dt[:, t, :, None] * A), prev)
        ys.append(h_t @ C[:, t, :, None])  # (B, E, 1)
        prev = h_t
    return torch.cat(ys, -1).transpose(1, 2), h


def _sequential_backward(x, dt, A, B, C, state, h, gy, gh_last):
    """The gradients in one pass backwards over t, no (B, T, E, N) temporary: ``g`` is dL/dh_t, (B, E, N)."""
    b, T, E = x.shape
    u = dt * x
    gx, gdt, gB, gC = torch.empty_like(x), torch.empty_like(dt), torch.empty_like(B), torch.empty_like(C)
    gA_acc = torch.zeros_like(h[:, 0])  # sum over t of dL/d(dt A) * dt, (B, E, N); summed over B at the end
    g = gh_last.clone()  # exp(dt_{t+1} A) dL/dh_{t+1}, and dL/dh_T = gh_last entering
    for t in range(T - 1, -1, -1):
        g.addcmul_(gy[:, t, :, None], C[:, t, None, :])  # dL/dh_t
        gC[:, t] = (gy[:, t, None, :] @ h[:, t]).squeeze(1)
        gu = (g @ B[:, t, :, None]).squeeze(-1)  # (B, E): through the input (dt x)_t B_t^T
        gB[:, t] = (u[:, t, None, :] @ g).squeeze(1)
        a = torch.exp(dt[:, t, :, None] * A)  # (B, E, N)
        gdt[:, t] = gu * x[:, t]
        prev = h[:, t - 1] if t > 0 else state
        if prev is not None:  # through the decay: dL/d(dt A) = g * exp(dt A) * h_{t-1}
            g_log = g * a * prev
            gdt[:, t] += (g_log * A).sum(-1)
            gA_acc.addcmul_(g_log, dt[:, t, :, None])
        gx[:, t] = gu * dt[:, t]
        g.mul_(a)  # exp(dt_t A) dL/dh_t: for step t - 1, and dL/dstate after step 0
    return gx, gdt, gA_acc.sum(0), gB, gC, g


def _blocked_forward(x, dt, A, B, C, state, Q):
    """:func:`_scan_` over the whole (B, T, E, N) input, then y as one batched matmul."""
    h = (dt * x)[..., None] * B[:, :, None, :]  # (B, T, E, N): the inputs (dt x) B^T, then the states
    _scan_(h, dt, A, state, Q)
    return (h @ C[..., None]).squeeze(-1), h


def _blocked_backward(x, dt, A, B, C, state, h, gy, gh_last, Q):
    """dL/dh_t = gy_t C_t^T + exp(dt_{t+1} A) dL/dh_{t+1}: :func:`_scan_` in reversed time, with dL/dh_T =
    gh_last entering and the decay of the step *after* t (zero dt past the end: no decay); then every
    gradient is a matmul or one elementwise pass over (B, T, E, N)."""
    b, T, E = x.shape
    dt_next = torch.cat((dt[:, 1:], dt.new_zeros(b, 1, E)), 1).flip(1)
    g = gy.flip(1)[..., None] * C.flip(1)[:, :, None, :]  # (B, T, E, N), reversed time
    _scan_(g, dt_next, A, gh_last, Q)
    g = g.flip(1)  # dL/dh_t
    u = dt * x
    gC = (gy[:, :, None, :] @ h).squeeze(2)  # (B, T, N)
    gu = (g @ B[..., None]).squeeze(-1)  # (B, T, E)
    gB = (u[:, :, None, :] @ g).squeeze(2)  # (B, T, N)
    # dL/d(dt A) = g_t * exp(dt_t A) h_{t-1} = g_t * (h_t - (dt x)_t B_t^T): no shifted copy of h
    g_log = torch.addcmul(h, u[..., None], B[:, :, None, :], value=-1.0).mul_(g)  # (B, T, E, N)
    gdt = gu * x + (g_log * A).sum(-1)
    gA = torch.einsum("bten,bte->en", g_log, dt)
    gstate = g[:, 0] * torch.exp(dt[:, 0, :, None] * A)
    return gu * dt, gdt, gA, gB, gC, gstate


# a step on fewer state entries than this is dominated by per-op overhead: scan blocks side by side
# (bench/results/scan.md: at 4,096 entries the blocked scan wins 1.7x, at 32,768 the sequential one)
_MIN_STEP_ELEMENTS = 1 << 14


class _SelectiveScan(torch.autograd.Function):
    """Autograd for :func:`selective_scan`: the forward keeps the inputs and the states (B, T, E, N); the
    backward is written out (module docstring of :func:`selective_scan`)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, state, Q):
        b, T, E = x.shape
        ctx.blocked = T // Q > 1 and b * E * A.shape[1] < _MIN_STEP_ELEMENTS
        ctx.Q = Q
        if ctx.blocked:
            y, h = _blocked_forward(x, dt, A, B, C, state, Q)
        else:
            y, h = _sequential_forward(x, dt, A, B, C, state)
        ctx.save_for_backward(x, dt, A, B, C, state, h)
        return y, h[:, -1].clone()

    @staticmethod
    def backward(ctx, gy, gh_last):
        x, dt, A, B, C, state, h = ctx.saved_tensors
        if ctx.blocked:
            grads = _blocked_backward(x, dt, A, B, C, state, h, gy, gh_last, ctx.Q)
        else:
            grads = _sequential_backward(x, dt, A, B, C, state, h, gy, gh_last)
        gstate = grads[5] if state is not None else None
        return *grads[:5], gstate, None


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   state: torch.Tensor | None = None, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of :func:`selective_scan_ref`, fast on CPU, with a hand-written backward.

    The scan touches all T E N state entries whatever the algorithm (the decay differs per entry), so on
    a CPU it is bound by memory traffic and by per-op overhead, not by arithmetic. Two schedules, the
    same result up to fp32 rounding:

    - **sequential** (when a step's (B, E, N) slice has at least 2^14 entries, or T < 2 chunk_size):
      one pass over t whose every op works on a (B, E, N) slice that stays in cache; the backward is one
      pass backwards over t that keeps only dL/dh_t (B, E, N), so neither pass allocates a (B, T, E, N)
      temporary besides the saved states.
    - **blocked** (smaller slices and T >= 2 chunk_size): the blocked parallel scan of ``_scan_``
      (reduce-then-scan over ``T // chunk_size`` blocks side by side, then the tail), forwards for the
      states and backwards in time for dL/dh; y and the gradients are batched matmuls and elementwise
      passes over (B, T, E, N). It trades about three more passes over memory for T / chunk_size times
      fewer, larger ops.

    Either way there is no autograd node per step (where the naive loop spends most of its backward),
    and the decay's gradient uses ``exp(dt_t A) h_{t-1}`` (from the saved states), summed over B and T
    for A.

    Memory: the states (B, T, E, N) are kept for the backward (Algorithm 2 of the paper recomputes them
    in SRAM; on a CPU, memory is cheaper than a second scan).

    Numerics: every exponent is <= 0, so nothing overflows and an underflow is a decay to zero; the
    blocked decays are ``exp(A cumsum(dt))`` rather than products of per-step decays, and sums run in
    another order than the loop's: equal to fp32 rounding (tests: 1e-10 in float64). No double backward.

    Args and returns: as :func:`selective_scan_ref` (inputs of one floating dtype; the mixer passes
    float32), plus ``chunk_size`` > 0, the block length of the blocked schedule (speed only).

    Raises:
        ValueError: ``chunk_size`` <= 0.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _SelectiveScan.apply(x, dt, A, B, C, state, chunk_size)


# ---------------------------------------------------------------------------------------------------
# the mixer


class MambaState(nn.Module):
    """Inference state of one Mamba layer for B sequences: ``conv`` (B, d_inner, d_conv - 1), the last
    conv inputs, and ``ssm`` (B, d_inner, d_state). Updated in place by the forward pass."""

    def __init__(self, batch_size: int, d_inner: int, d_conv: int, d_state: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("conv", torch.zeros(batch_size, d_inner, d_conv - 1, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("ssm", torch.zeros(batch_size, d_inner, d_state, dtype=dtype, device=device),
                             persistent=False)

    def set_rows(self, rows: torch.Tensor, other: MambaState) -> None:
        """Copy ``other``'s sequences into rows ``rows`` (len(rows),) of this state."""
        self.conv[rows] = other.conv
        self.ssm[rows] = other.ssm

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))


class MambaMixer(nn.Module):
    """The S6 mixer (module docstring), (B, T, d_model) -> (B, T, d_model); HF ``MambaMixer``'s
    parameters: ``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``."""

    def __init__(self, d_model: int, *, d_state: int, d_conv: int, expand: int, dt_rank: int, chunk_size: int,
                 bias: bool = False, conv_bias: bool = True) -> None:
        super().__init__()
        self.d_inner = E = expand * d_model
        self.d_state, self.d_conv, self.dt_rank, self.chunk_size = d_state, d_conv, dt_rank, chunk_size
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)  # x | z
        # padding is applied by hand (zeros, or the cached inputs), so the module's own is 0
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, bias=conv_bias)
        self.x_proj = nn.Linear(E, dt_rank + 2 * d_state, bias=False)  # dt_low | B | C
        self.dt_proj = nn.Linear(dt_rank, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, d_state))
        self.D = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, d_model, bias=bias)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """``A_log = log(1..N)`` per channel, ``D = 1``, ``dt_proj`` as the module docstring, ``x_proj`` and
        the conv at PyTorch's default."""
        dev = self.A_log.device
        self.A_log.copy_(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=dev).log().expand_as(self.A_log))
        nn.init.ones_(self.D)
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner, device=dev) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.x_proj.reset_parameters()
        self.conv1d.reset_parameters()

    def new_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> MambaState:
        return MambaState(batch_size, self.d_inner, self.d_conv, self.d_state, dtype, device)

    def forward(self, u: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        """u (B, T, d_model) -> (B, T, d_model). ``state`` holds the tokens fed before ``u`` and is advanced
        past them in place; None starts from zeros and keeps nothing. T = 1 with a state is one recurrent
        step (no scan)."""
        b, T, _ = u.shape
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, E) each
        x = x.transpose(1, 2)  # (B, E, T)
        if state is None:
            x = F.pad(x, (self.d_conv - 1, 0))
        else:
            x = torch.cat((state.conv.to(x.dtype), x), dim=-1)  # (B, E, d_conv - 1 + T)
            state.conv.copy_(x[..., -(self.d_conv - 1):])
        x = F.silu(F.conv1d(x, self.conv1d.weight, self.conv1d.bias, groups=E)).transpose(1, 2)  # (B, T, E)
        dt, B, C = self.x_proj(x).split((R, N, N), dim=-1)  # (B, T, R), (B, T, N) x 2
        dt = F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_proj.bias).float())  # (B, T, E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        xf, B, C = x.float(), B.float(), C.float()
        if state is not None and T == 1:
            h = torch.exp(dt[:, 0, :, None] * A) * state.ssm.float() + (dt[:, 0] * xf[:, 0])[..., None] * B[:, 0, None]
            state.ssm.copy_(h)
            y = (h @ C[:, 0, :, None]).transpose(1, 2)  # (B, 1, E)
        else:
            y, h = selective_scan(xf, dt, A, B, C, None if state is None else state.ssm.float(), self.chunk_size)
            if state is not None:
                state.ssm.copy_(h)
        y = (y + self.D.float() * xf).to(u.dtype) * F.silu(z)  # D skip, then the gate
        return self.out_proj(y)


# ---------------------------------------------------------------------------------------------------
# the model


class MambaBlock(nn.Module):
    """Pre-norm residual block ``x + mixer(norm(x))``, (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MambaMixer(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                                dt_rank=cfg.dt_rank, chunk_size=cfg.chunk_size, bias=cfg.bias,
                                conv_bias=cfg.conv_bias)

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), state)


class MambaCache(list):
    """One :class:`MambaState` per layer (a list), plus the batch operations generation needs."""

    def set_rows(self, rows: torch.Tensor, other: MambaCache) -> None:
        for mine, theirs in zip(self, other):
            mine.set_rows(rows, theirs)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self)


class MambaLM(nn.Module):
    """Mamba language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    recurrent = True  # the state summarizes all context: generation never needs a sliding window

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialization of the module docstring."""
        cfg = self.config
        nn.init.normal_(self.tok_emb.weight, 0.0, cfg.init_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)
        for block in self.blocks:
            m = block.mixer
            nn.init.normal_(m.in_proj.weight, 0.0, cfg.init_std)
            nn.init.normal_(m.out_proj.weight, 0.0, cfg.init_std / math.sqrt(cfg.n_layers))
            for lin in (m.in_proj, m.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            m.reset_ssm_parameters(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
            nn.init.ones_(block.norm.weight)
        nn.init.ones_(self.final_norm.weight)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> MambaCache:
        """Zero states for ``batch_size`` sequences, one :class:`MambaState` per layer; ``max_len`` is
        ignored (the state does not grow). The causal-LM cache protocol, so generation code takes it."""
        w = self.tok_emb.weight
        return MambaCache(b.mixer.new_state(batch_size, dtype or w.dtype, w.device) for b in self.blocks)

    def forward(self, idx: torch.Tensor, *, cache: MambaCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Logits for every position.

        Args:
            idx: token ids (B, T), int64.
            cache: states from :meth:`new_cache` holding the tokens fed before ``idx``; advanced past them
                in place. None starts from the zero state and keeps nothing.
            start: accepted for the causal-LM protocol and ignored: the state, not a position, carries
                the context (feeding each token once, in order, is the caller's part).
            last_only: return logits for the last position only, (B, 1, V).

        Returns:
            logits (B, T, vocab_size), float.
        """
        x = self.tok_emb(idx)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_norm(x))  # (B, T, V)


register_family("mamba", MambaConfig)(MambaLM)

# The published Mamba checkpoints (Gu & Dao 2023, Table 3 sizes; state-spaces/mamba-*-hf configs): the
# GPT-NeoX vocabulary of 50,277 ids padded to a multiple of 8, d_state 16, expand 2, d_conv 4, tied.
_PUBLISHED = {"mamba-130m": (768, 24), "mamba-370m": (1024, 48), "mamba-790m": (1536, 48),
              "mamba-1.4b": (2048, 48), "mamba-2.8b": (2560, 64)}
for _name, (_d, _n) in _PUBLISHED.items():
    register_preset(_name, "mamba", doc=f"{_name.split('-')[1]} Mamba (d_model {_d}, {_n} layers; "
                    "state-spaces/" + _name + "-hf shapes)",
                    vocab_size=50280, d_model=_d, n_layers=_n, max_seq_len=2048)
register_preset("mamba-tiny", "mamba", doc="a 2-layer Mamba (d_model 64, state 8) for smoke tests",
                vocab_size=256, d_model=64, n_layers=2, d_state=8, max_seq_len=128)
register_preset("mamba-shakespeare", "mamba",
                doc="Mamba sized to the main-job GPT (recipes/shakespeare-mamba.toml)",
                vocab_size=1024, d_model=128, n_layers=7, d_state=12, max_seq_len=128)
