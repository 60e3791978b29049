"""Low-rank adapters around a frozen linear layer: LoRA and DoRA.

- **LoRA**: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. (3)::

      y = W x + b + (alpha / rank) B A dropout(x)

  The paper's r is our ``rank``, its α our ``alpha``, its ΔW = BA with A (rank, in_features) and
  B (out_features, rank). A starts kaiming-uniform (a = sqrt(5), as ``nn.Linear`` and peft), B at zero,
  so an adapted model starts equal to its base.
- **DoRA**: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. (5)::

      W' = m (W + s B A) / ||W + s B A||_c        s = alpha / rank

  The paper's magnitude m is our ``magnitude`` (out_features,), one per output row (its "column-wise"
  norm over a (d, k) matrix; peft's ``lora_magnitude_vector``), initialised to ||W||_c so the adapted
  model starts equal to its base. As in the paper (section 4.3) and peft, the norm is detached from the
  graph. With dropout, the base path sees x and the adapter path dropout(x), exactly as peft computes it::

      y = W x + b + (g - 1) W dropout(x) + g s B A dropout(x)        g = m / ||W + s B A||_c

  which equals W' x + b when dropout is off.

::

        x ──────────► [ base: W (frozen) ] ──────────┐
        │                                            + ──► y
        └─► dropout ─► A (rank x in) ─► B (out x rank) ─► x s ┘

The wrapped ``base`` is any module with ``in_features``, ``out_features``, ``bias`` and ``forward(x) =
F.linear(x, W, bias)`` whose W is ``weight`` (``nn.Linear``) or ``dequantized_weight()`` (a quantized
base, e.g. NF4 for QLoRA). Parameter names: ``base.weight``, ``base.bias``, ``lora_A``, ``lora_B``,
``magnitude``. Shapes: x (..., in_features) -> y (..., out_features). The layers know nothing about
training; freezing and target selection are weightsmith.adapters' job.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def base_weight(base: nn.Module) -> torch.Tensor:
    """The dense weight (out_features, in_features) of a base linear: ``dequantized_weight()`` or
    ``dequantize()`` of a quantized one, else ``weight`` of an ``nn.Linear``, else read off the module
    itself as ``(base(I) - bias)^T`` (exact for any ``F.linear``-like module, one (in, in) forward)."""
    for name in ("dequantized_weight", "dequantize"):
        if callable(getattr(base, name, None)):
            return getattr(base, name)()
    if isinstance(getattr(base, "weight", None), torch.Tensor) and base.weight.dim() == 2:
        return base.weight
    ref = next(t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point())
    eye = torch.eye(base.in_features, device=ref.device, dtype=torch.float32)
    y = base(eye)
    return (y if base.bias is None else y - base.bias).T


class _DequantizeAgain(torch.autograd.Function):
    """``base(x)`` for a frozen quantized ``base``, keeping nothing but the layer for backward: the
    dense W is rebuilt there for dx = dy W (bitsandbytes' MatMul4Bit does the same). Plain autograd
    would keep every layer's dequantized W from forward to backward, as much memory as a float model."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base, ctx.x_dtype = base, x.dtype
        return base(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w = base_weight(ctx.base).to(dy.dtype)  # (out_features, in_features)
        return (dy @ w).to(ctx.x_dtype), None


class FrozenQuantLinear(nn.Module):
    """A frozen quantized linear (e.g. NF4Linear, kept as ``self.base``) whose backward dequantizes its
    weight again instead of keeping it (see :class:`_DequantizeAgain`). Same forward as ``base``:
    (..., in_features) -> (..., out_features); no parameter of it trains."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def dequantize(self) -> torch.Tensor:
        """The dense weight (out_features, in_features), float32."""
        return base_weight(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantizeAgain.apply(x, self.base)
        return self.base(x)


def is_dense_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` holding a float weight (not a quantized layer that subclasses it)."""
    return isinstance(m, nn.Linear) and not any(callable(getattr(m, n, None))
                                                for n in ("dequantized_weight", "dequantize"))


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) B A dropout(x)`` (Hu et al. 2021); see the module docstring.

    Args:
        base: the frozen linear (``nn.Linear`` or a quantized one), kept as ``self.base``.
        rank: r >= 1. alpha: the scale numerator (s = alpha / rank). dropout: p in [0, 1) on the adapter input.

    Shapes: x (..., in_features) -> (..., out_features). A is (rank, in_features), B (out_features, rank),
    both float32 unless ``dtype`` is given.
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = next(t for t in (*base.parameters(), *base.buffers())).device
        dtype = dtype or torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """s B A, (out_features, in_features)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., rank)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base.weight`` (W <- W + s B A); forward is then the base alone.
        Raises TypeError for a quantized base (use weightsmith.adapters.merge_adapters, which dequantizes)."""
        if self.merged:
            return
        w = self._dense_base()
        w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (W <- W - s B A; exact up to float rounding)."""
        if not self.merged:
            return
        w = self._dense_base()
        w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def _dense_base(self) -> torch.Tensor:
        if not is_dense_linear(self.base):
            raise TypeError(f"cannot merge into a {type(self.base).__name__} in place; dequantize it first")
        return self.base.weight.data

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024): ``magnitude`` x direction ``(W + s B A) / ||W + s B A||_c``; see the
    module docstring for the forward with dropout (peft's). ``magnitude`` is (out_features,), float32,
    initialised to the row norms of W (B = 0 then)."""

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout, dtype=dtype)
        with torch.no_grad():
            norm = self.weight_norm()
        self.magnitude = nn.Parameter(norm.to(self.lora_A.dtype))
        self._merged_factor: torch.Tensor | None = None

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, (out_features,), detached from the graph (DoRA section 4.3)."""
        w = base_weight(self.base).detach().to(self.lora_A.dtype)
        return torch.linalg.norm(w + self.delta_weight().detach(), dim=1).detach()

    def reset_magnitude(self) -> None:
        """magnitude <- ||W + s B A||_c, for a base whose weights changed after wrapping (init_from)."""
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        w = base_weight(self.base)
        g = (self.magnitude / self.weight_norm()).to(self.lora_A.dtype)  # (out_features,)
        xd = self.dropout(x).to(self.lora_A.dtype)
        lora = F.linear(F.linear(xd, self.lora_A), self.lora_B) * self.scaling
        if isinstance(self.dropout, nn.Identity):  # base output without bias, reused as peft does
            wx = (y if self.base.bias is None else y - self.base.bias).to(self.lora_A.dtype)
        else:
            wx = F.linear(xd, w.to(self.lora_A.dtype))
        return y + ((g - 1) * wx + g * lora).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- g (W + s B A) with g = m / ||W + s B A||_c (kept for :meth:`unmerge`)."""
        if self.merged:
            return
        w = self._dense_base()
        g = self.magnitude / self.weight_norm()
        self._merged_factor = g.clone()
        w.copy_((g[:, None] * (w.to(g.dtype) + self.delta_weight())).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W / g - s B A (exact up to float rounding)."""
        if not self.merged:
            return
        w = self._dense_base()
        g = self._merged_factor
        w.copy_((w.to(g.dtype) / g[:, None] - self.delta_weight()).to(w.dtype))
        self._merged_factor = None
        self.merged = False
