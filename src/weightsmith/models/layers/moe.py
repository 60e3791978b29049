"""Sparse mixture-of-experts feed-forward block with a top-k router.

- Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
  Layer" (top-k gating).
- Fedus et al. 2021, "Switch Transformers" (eq. 4, the auxiliary load-balancing loss
  ``alpha * N * sum_i f_i * P_i``; the paper's N experts is our ``n_experts``).
- Jiang et al. 2024, "Mixtral of Experts" (top-2 of 8 SwiGLU experts; gate weights are a softmax over
  the *kept* top-k router logits, ``softmax(TopK(x W_g))``).

Each token is sent to ``n_experts_per_token`` (k) of ``n_experts`` (E) SwiGLU experts::

    x (N, D) --router--> logits (N, E) --top-k--> idx (N, k), w = softmax(kept logits) (N, k)
    y[n] = sum_j w[n, j] * expert_{idx[n, j]}(x[n])

Only the chosen experts run (tokens are gathered per expert), so the forward cost per token is the
router plus k experts, while the parameter count is the router plus E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.models.layers.mlp import SwiGLU


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts, (B, T, d_model) -> (B, T, d_model).

    After every forward, ``self.aux_loss`` holds the load-balancing loss of that call (a scalar float32
    tensor, differentiable with respect to the router): ``n_experts * sum_e f_e * P_e`` where ``f_e`` is
    the fraction of the N*k routing slots that chose expert ``e`` times k (tokens routed to ``e`` / N) and
    ``P_e`` the mean router probability (softmax over all E logits) of expert ``e``. It equals k when
    routing is perfectly uniform; this is the Switch loss for k=1 and what HF's Mixtral computes. The
    training loop adds ``alpha * sum(aux_loss over layers)`` (alpha ~ 0.01) to the language-model loss.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, n_experts_per_token: int, *,
                 bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, n_experts_per_token
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, d_ff, bias, dropout) for _ in range(n_experts))
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        logits = self.router(flat)  # (N, E)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)  # (N, k)
        weights = F.softmax(top_logits.float(), dim=-1).type_as(x)  # (N, k), sums to 1 per token
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (top_idx == e).nonzero(as_tuple=True)  # tokens that chose e, and in which slot
            if tok.numel() == 0:
                continue
            y = expert(flat[tok]) * weights[tok, slot, None]  # (n_e, D)
            out = out.index_add(0, tok, y)
        self.aux_loss = self._load_balancing_loss(logits, top_idx)
        return out.view(B, T, D)

    def _load_balancing_loss(self, logits: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits.float(), dim=-1)  # (N, E)
        routed = F.one_hot(top_idx, self.n_experts).sum(1).float()  # (N, E), 1 where the token chose e
        return self.n_experts * (routed.mean(0) * probs.mean(0)).sum()
