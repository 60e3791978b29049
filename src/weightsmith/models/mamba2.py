"""Mamba-2 language model: selective state-space layers computed with the SSD algorithm.

Source: Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (Mamba-2, the SSD algorithm, their ``ssd_minimal`` listing), and the
reference ``Mamba2`` mixer of ``mamba_ssm`` / Hugging Face ``Mamba2Mixer`` for the parameter layout.

Notation: the paper's P (head dimension) is our ``d_head``, N (state size) ``d_state``, the number of
heads ``n_heads = expand * d_model / d_head``, the chunk length Q ``chunk_size``, G ``n_groups`` (heads
share B and C within a group, as keys and values are shared in GQA). The paper's ``a_t = exp(dt_t A)``
is a scalar per head and step: ``A = -exp(A_log)`` (H,), ``dt = softplus(dt_raw + dt_bias)`` (B, T, H).

Recurrence of one head (h: (P, N) state, x_t: (P,), B_t, C_t: (N,) of the head's group)::

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          y_t = h_t C_t + D x_t

SSD computes the same thing chunk by chunk (:func:`ssd_chunked`, checked against the naive loop
:func:`ssd_ref`): inside a chunk the output is a masked "attention" ``(L o C B^T) (dt x)`` with the decay
matrix ``L[l, s] = exp(sum_{s < r <= l} dt_r A)`` (causal, the paper's segsum); between chunks only the
(H, P, N) state is passed on, decayed by the chunk's total ``exp(sum dt A)``.

Data flow of one block, shape legend B batch, T sequence, D = d_model, E = expand * D, H heads::

    x (B, T, D) -> RMSNorm -> in_proj -> z (E) | xBC (E + 2 G N) | dt (H)
      xBC -> causal depthwise conv (d_conv) -> SiLU -> x (H, P) | B (G, N) | C (G, N)
      y = SSD(x, dt, A, B, C) + D x  -> gated RMSNorm(y * silu(z)) -> out_proj -> + residual

Inference: a :class:`Mamba2State` per layer holds the last ``d_conv - 1`` conv inputs and the SSM
state (H, P, N); a single-token step with it is a constant-cost recurrence (``recurrent = True``:
generation carries the state and never slides a window).

Initialization (as ``mamba_ssm``): ``A = U(1, 16)`` per head, ``dt_bias = softplus^-1(dt)`` with
``dt`` log-uniform in [1e-3, 1e-1], ``D = 1``; the conv keeps PyTorch's default; the embedding and
``in_proj`` ~ N(0, init_std), ``out_proj`` ~ N(0, init_std / sqrt(n_layers)) (one residual branch per
layer, GPT-2's depth scaling).
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
class Mamba2Config:
    """Mamba-2 language model config (Dao & Gu 2024).

    ``d_inner`` is expand * d_model. ``n_heads`` is d_inner / d_head.
    """

    vocab_size: int = _doc(256, "number of token ids; a recipe that leaves it out takes the tokenizer's")
    d_model: int = _doc(128, "width of the residual stream")
    n_layers: int = _doc(4, "number of Mamba-2 blocks")
    d_state: int = _doc(64, "SSM state size N per head (the paper's N)")
    d_conv: int = _doc(4, "kernel size of the causal depthwise convolution over x, B, C")
    expand: int = _doc(2, "inner width d_inner = expand * d_model")
    d_head: int = _doc(64, "SSM head dimension P; n_heads = d_inner / d_head")
    n_groups: int = _doc(1, "groups of heads sharing B and C (like GQA's kv heads); divides n_heads")
    chunk_size: int = _doc(64, "SSD chunk length Q: quadratic inside a chunk, a recurrence between chunks")
    max_seq_len: int = _doc(256, "the training window only; generation carries the state and is not limited by it")
    norm_eps: float = _doc(1e-5, "epsilon of every RMSNorm (block, gated, final)")
    tie_embeddings: bool = _doc(True, "the lm_head shares the token embedding's weight")
    bias: bool = _doc(False, "biases on in_proj and out_proj")
    conv_bias: bool = _doc(True, "bias on the depthwise convolution")
    init_std: float = _doc(0.02, "standard deviation of the embedding and in_proj (see the module docstring)")
    d_inner: int = field(init=False)
    n_heads: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand", "d_head",
                                "n_groups", "chunk_size", "max_seq_len"))
        self.d_inner = self.expand * self.d_model
        if self.d_inner % self.d_head:
            raise ConfigError(f"model.d_head={self.d_head} must divide expand * d_model = {self.d_inner}")
        self.n_heads = self.d_inner // self.d_head
        if self.n_heads % self.n_groups:
            raise ConfigError(f"model.n_groups={self.n_groups} must divide n_heads={self.n_heads}")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be positive, got {self.init_std}")


# ---------------------------------------------------------------------------------------------------
# the SSD algorithm


def ssd_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test oracle: the SSM recurrence one time step at a time (no D skip).

    Args:
        x: (B, T, H, P); dt: (B, T, H), positive; A: (H,), negative; B, C: (B, T, G, N), G divides H
            (head h reads group h // (H / G)); state: (B, H, P, N) before ``x[:, 0]``, default zeros.

    Returns:
        y (B, T, H, P) and the state (B, H, P, N) after the last step, in x's dtype promoted with dt's.
    """
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    Bh, Ch = B.repeat_interleave(H // G, dim=2), C.repeat_interleave(H // G, dim=2)  # (B, T, H, N)
    h = x.new_zeros(b, H, P, N) if state is None else state
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (B, H, 1, 1)
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]  # (B, H, P, N)
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))  # (B, H, P)
    return torch.stack(ys, 1), h


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD (Dao & Gu 2024, sec. 6): the recurrence of :func:`ssd_ref`, computed with matmuls.

    The sequence is cut into chunks of ``Q = min(chunk_size, T)`` steps (the last one zero-padded: a
    padded step has dt = 0, so it neither decays nor feeds the state). Per chunk, with heads viewed as
    (G groups, H / G heads each):

    1. intra-chunk, quadratic like attention: scores ``C B^T`` (Q, Q) per group, times the causal decay
       ``L`` per head, times ``dt x``: ``y_diag``;
    2. each chunk's own final state ``sum_s exp(a_end - a_s) dt_s x_s B_s^T`` (H, P, N);
    3. inter-chunk: a sequential pass over the chunks carries the state (elementwise, T / Q steps);
    4. ``y_off = exp(a_l) C_l h_start`` adds the carried state's contribution.

    Matmul multiply-adds per token (for the FLOP count): ``Q G N`` (scores) + ``Q H P`` (scores times
    values) + ``2 H P N`` (chunk states, state to output).

    Args and returns: as :func:`ssd_ref`; computed in x's dtype (callers pass float32).
    """
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    Hg = H // G
    Q = min(chunk_size, T)
    pad = -T % Q
    if pad:  # dt = 0 on the padding: no decay, no input
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (T + pad) // Q
    xdt = (x * dt[..., None]).view(b, c, Q, G, Hg, P)
    Bc, Cc = B.view(b, c, Q, G, N), C.view(b, c, Q, G, N)
    a = (dt * A).view(b, c, Q, G, Hg).permute(0, 1, 3, 4, 2)  # (b, c, G, Hg, Q): log-decay per step
    a_cum = a.cumsum(-1)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg = (a_cum[..., :, None] - a_cum[..., None, :]).masked_fill(~causal, float("-inf"))
    L = torch.exp(seg)  # (b, c, G, Hg, Q, Q): L[l, s] = decay from step s to step l, 0 for s > l
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (b, c, G, Q, Q)
    y_diag = torch.einsum("bcghls,bcsghp->bclghp", scores[:, :, :, None] * L, xdt)  # (b, c, Q, G, Hg, P)
    to_end = torch.exp(a_cum[..., -1:] - a_cum).permute(0, 1, 4, 2, 3)[..., None]  # (b, c, Q, G, Hg, 1)
    chunk_states = torch.einsum("bclgn,bclghp->bcghpn", Bc, xdt * to_end)  # (b, c, G, Hg, P, N)
    chunk_decay = torch.exp(a_cum[..., -1])[..., None, None]  # (b, c, G, Hg, 1, 1)
    h = x.new_zeros(b, G, Hg, P, N) if state is None else state.reshape(b, G, Hg, P, N).to(x.dtype)
    starts = []
    for k in range(c):
        starts.append(h)
        h = chunk_decay[:, k] * h + chunk_states[:, k]
    h_start = torch.stack(starts, 1)  # (b, c, G, Hg, P, N): the state entering each chunk
    from_start = torch.exp(a_cum).permute(0, 1, 4, 2, 3)[..., None]  # (b, c, Q, G, Hg, 1)
    y_off = torch.einsum("bclgn,bcghpn->bclghp", Cc, h_start) * from_start
    y = (y_diag + y_off).reshape(b, c * Q, H, P)[:, :T]
    return y, h.reshape(b, H, P, N)


# ---------------------------------------------------------------------------------------------------
# the mixer


class GatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z)) * weight`` with the statistic taken per group of ``d / n_groups`` channels
    (Mamba-2's norm before out_proj, HF's ``MambaRMSNormGated``); (..., d) -> (..., d), float32 inside."""

    def __init__(self, d: int, n_groups: int, eps: float) -> None:
        super().__init__()
        self.n_groups, self.eps = n_groups, eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y.float() * F.silu(z.float())).unflatten(-1, (self.n_groups, -1))  # (..., G, d / G)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(y.dtype)


class Mamba2State(nn.Module):
    """Inference state of one Mamba-2 layer for B sequences: ``conv`` (B, conv_dim, d_conv - 1), the last
    conv inputs, and ``ssm`` (B, n_heads, d_head, d_state). Updated in place by the forward pass."""

    def __init__(self, batch_size: int, conv_dim: int, d_conv: int, n_heads: int, d_head: int, d_state: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("conv", torch.zeros(batch_size, conv_dim, d_conv - 1, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("ssm", torch.zeros(batch_size, n_heads, d_head, d_state, dtype=dtype, device=device),
                             persistent=False)

    def set_rows(self, rows: torch.Tensor, other: Mamba2State) -> None:
        """Copy ``other``'s sequences into rows ``rows`` (len(rows),) of this state."""
        self.conv[rows] = other.conv
        self.ssm[rows] = other.ssm

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer (module docstring), (B, T, d_model) -> (B, T, d_model); HF ``Mamba2Mixer``'s
    parameters: ``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm``, ``out_proj``."""

    def __init__(self, d_model: int, *, d_state: int, d_conv: int, expand: int, d_head: int, n_groups: int,
                 chunk_size: int, norm_eps: float, bias: bool = False, conv_bias: bool = True) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state, self.d_conv, self.d_head, self.n_groups = d_state, d_conv, d_head, n_groups
        self.n_heads = self.d_inner // d_head
        self.chunk_size = chunk_size
        self.conv_dim = self.d_inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=bias)  # z | xBC | dt
        # padding is applied by hand (zeros, or the cached inputs), so the module's own is 0
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, n_groups, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """``A ~ U(1, 16)``, ``dt_bias = softplus^-1(dt)`` with ``dt`` log-uniform in [1e-3, 1e-1] (floored
        at 1e-4), ``D = 1``, the conv at PyTorch's default, the gated norm at ones."""
        dev = self.A_log.device
        self.A_log.copy_(torch.empty(self.n_heads, device=dev).uniform_(1.0, 16.0).log())
        dt = torch.exp(torch.rand(self.n_heads, device=dev) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        nn.init.ones_(self.D)
        nn.init.ones_(self.norm.weight)
        self.conv1d.reset_parameters()

    def new_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> Mamba2State:
        return Mamba2State(batch_size, self.conv_dim, self.d_conv, self.n_heads, self.d_head, self.d_state,
                           dtype, device)

    def forward(self, u: torch.Tensor, state: Mamba2State | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """u (B, T, d_model) -> (B, T, d_model). ``state`` holds the tokens fed before ``u`` and is
        advanced past them in place; None starts from zeros and keeps nothing. T = 1 with a state is one
        recurrent step (no chunking).

        ``mask`` (B, T) bool, False at left-padding positions: x, B, C are zeroed there before and after
        the conv (as HF does), so a zero state stays zero through the pads and the first real token's
        conv window sees the zeros an unpadded sequence starts with. Outputs at pads are garbage."""
        b, T, _ = u.shape
        H, P, N, GN = self.n_heads, self.d_head, self.d_state, self.n_groups * self.d_state
        z, xBC, dt = self.in_proj(u).split((self.d_inner, self.conv_dim, H), dim=-1)
        if mask is not None:
            xBC = xBC * mask[..., None]
        xBC = xBC.transpose(1, 2)  # (B, conv_dim, T)
        if state is None:
            xBC = F.pad(xBC, (self.d_conv - 1, 0))
        else:
            xBC = torch.cat((state.conv.to(xBC.dtype), xBC), dim=-1)  # (B, conv_dim, d_conv - 1 + T)
            state.conv.copy_(xBC[..., -(self.d_conv - 1):])
        xBC = F.silu(F.conv1d(xBC, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
        if mask is not None:
            xBC = xBC * mask[..., None]
        x, B, C = xBC.split((self.d_inner, GN, GN), dim=-1)  # (B, T, d_inner), (B, T, G N) x 2
        x = x.reshape(b, T, H, P)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, H)
        A = -torch.exp(self.A_log.float())  # (H,)
        Bg, Cg = B.reshape(b, T, self.n_groups, N).float(), C.reshape(b, T, self.n_groups, N).float()
        if state is not None and T == 1:
            y = self._step(x[:, 0].float(), dt[:, 0], A, Bg[:, 0], Cg[:, 0], state)[:, None]
        else:
            y, h = ssd_chunked(x.float(), dt, A, Bg, Cg, self.chunk_size,
                               None if state is None else state.ssm)
            if state is not None:
                state.ssm.copy_(h)
        y = (y + self.D.float()[:, None] * x.float()).to(u.dtype)  # D skip, per head
        return self.out_proj(self.norm(y.reshape(b, T, self.d_inner), z))

    def _step(self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              state: Mamba2State) -> torch.Tensor:
        """One recurrent step: x (B, H, P), dt (B, H), B and C (B, G, N) -> y (B, H, P); state.ssm updated."""
        b, H, P = x.shape
        G, N = B.shape[1:]
        h = state.ssm.float().view(b, G, H // G, P, N)
        decay = torch.exp(dt * A).view(b, G, H // G, 1, 1)
        xdt = (x * dt[..., None]).view(b, G, H // G, P)
        h = decay * h + xdt[..., None] * B[:, :, None, None, :]  # (B, G, H/G, P, N)
        state.ssm.copy_(h.view(b, H, P, N))
        return torch.einsum("bghpn,bgn->bghp", h, C).reshape(b, H, P)


# ---------------------------------------------------------------------------------------------------
# the model


class Mamba2Block(nn.Module):
    """Pre-norm residual block ``x + mixer(norm(x))``, (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: Mamba2Config) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                                 d_head=cfg.d_head, n_groups=cfg.n_groups, chunk_size=cfg.chunk_size,
                                 norm_eps=cfg.norm_eps, bias=cfg.bias, conv_bias=cfg.conv_bias)

    def forward(self, x: torch.Tensor, state: Mamba2State | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), state)


class Mamba2Cache(list):
    """One :class:`Mamba2State` per layer (a list), plus the batch operations generation needs."""

    def set_rows(self, rows: torch.Tensor, other: Mamba2Cache) -> None:
        for mine, theirs in zip(self, other):
            mine.set_rows(rows, theirs)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self)


class Mamba2LM(nn.Module):
    """Mamba-2 language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    recurrent = True  # the state summarizes all context: generation never needs a sliding window

    def __init__(self, cfg: Mamba2Config) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.n_layers))
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
            reset_mixer(block.mixer, cfg.init_std, cfg.init_std / math.sqrt(cfg.n_layers))
            nn.init.ones_(block.norm.weight)
        nn.init.ones_(self.final_norm.weight)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> Mamba2Cache:
        """Zero states for ``batch_size`` sequences, one :class:`Mamba2State` per layer; ``max_len`` is
        ignored (the state does not grow). The causal-LM cache protocol, so generation code takes it."""
        w = self.tok_emb.weight
        return Mamba2Cache(b.mixer.new_state(batch_size, dtype or w.dtype, w.device) for b in self.blocks)

    def forward(self, idx: torch.Tensor, *, cache: Mamba2Cache | None = None, start: int = 0,
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


@torch.no_grad()
def reset_mixer(mixer: Mamba2Mixer, std: float, out_std: float) -> None:
    """``in_proj`` ~ N(0, std), ``out_proj`` ~ N(0, out_std), zero biases, SSM parameters of
    :meth:`Mamba2Mixer.reset_ssm_parameters`."""
    nn.init.normal_(mixer.in_proj.weight, 0.0, std)
    nn.init.normal_(mixer.out_proj.weight, 0.0, out_std)
    for lin in (mixer.in_proj, mixer.out_proj):
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    mixer.reset_ssm_parameters()


register_family("mamba2", Mamba2Config)(Mamba2LM)

register_preset("mamba2-tiny", "mamba2", doc="a 2-layer Mamba-2 (d_model 64, 2 heads of 32) for smoke tests",
                vocab_size=256, d_model=64, n_layers=2, d_state=16, d_head=32, chunk_size=16, max_seq_len=128)
register_preset("mamba2-shakespeare", "mamba2",
                doc="Mamba-2 sized to the main-job GPT (recipes/shakespeare-mamba2.toml)",
                vocab_size=1024, d_model=128, n_layers=7, d_state=48, d_head=64, chunk_size=64, max_seq_len=128)
