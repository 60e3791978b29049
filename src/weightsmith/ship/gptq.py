"""GPTQ: one-shot weight quantization with second-order error feedback.

Frantar, Ashkboos, Hoefler, Alistarh 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023), building on Optimal Brain Quantization (Frantar & Alistarh 2022).

For one linear layer with weight W (N, K) and calibration inputs X (K, n_tokens) GPTQ minimises
``||W X - Q X||^2`` over Q on the quantization grid. The paper's notation -> ours: d_col = K
(in_features), d_row = N (out_features); H = 2 X X^T is ``hessian`` (K, K) (its scale does not matter);
B (block size) is ``block_size``; lambda (dampening) is ``damp`` times the mean of diag(H).

Algorithm (paper's Algorithm 1), columns quantized left to right::

    H   <- H + damp * mean(diag H) * I            (dead inputs, diag = 0: H_ii = 1, W[:, i] = 0)
    U   <- upper Cholesky factor of H^-1          (H^-1 = U^T U; row i of U carries the OBS update
                                                   of H^-1 restricted to columns >= i, scaled)
    for each block of B columns [i1, i2):
        for i in block:
            at a group start: scales from the *current* (error-updated) W[:, i:i+g]
            q_i   = round-to-grid(W[:, i])
            e_i   = (W[:, i] - q_i) / U_ii
            W[:, i:i2] -= e_i U[i, i:i2]             (error feedback inside the block)
        W[:, i2:] -= E_block U[block, i2:]           (lazy batch update of the rest, one matmul)

The lazy batch update gives the same result as updating every later column after each column (the
updates are linear and columns >= i2 are not read inside the block); it only moves work into a matmul.
The grid is the group-wise symmetric int4 of ship/quantize.py, so GPTQ and RTN differ only in the values.

Calibration is sequential: layers are quantized in forward order, and the Hessian of each layer is
collected with every earlier layer already quantized, so later layers see (and compensate for) the
quantized inputs they will get at inference.

Layers without calibration data. An MoE expert that the (already quantized) router never chooses on
the calibration windows sees no input, so H = 0: every input column is "dead" and GPTQ would return an
all-zero weight, which the expert would then use on any token routed to it at inference. Such a layer
(H == 0, no tokens or only all-zero inputs) is quantized by round-to-nearest instead and reported.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from weightsmith.ship.quantize import (
    QuantLinear,
    check_group_size,
    group_scales,
    quantizable_linears,
    quantize_rtn,
    quantize_to_grid,
    set_module,
)


def prepare_hessian_inverse(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dampen H (K, K), zero dead input columns of W (N, K); returns (W, U) with U upper, H^-1 = U^T U."""
    W, H = W.clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return W, U


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 64, *,
                         damp: float = 0.01, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantize one weight (N, K) given its input Hessian ``X X^T`` (K, K) (any positive scale).

    Computation is in float64 (the layers here are small). ``block_size`` is rounded to a multiple of
    ``group_size`` so no group straddles a block.

    Returns:
        (q int8 (N, K) on the symmetric ``bits`` grid, scales float32 (N, K // group_size)).

    Raises:
        ConfigError: if ``group_size`` does not divide K.
        torch.linalg.LinAlgError: if the dampened Hessian is not positive definite.
    """
    N, K = weight.shape
    check_group_size(K, group_size)
    block_size = max(1, block_size // group_size) * group_size
    W, U = prepare_hessian_inverse(weight.double(), hessian.double(), damp)
    Q = torch.zeros_like(W)
    scales = torch.zeros(N, K // group_size, dtype=W.dtype, device=W.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # (N, b), updated in place column by column
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if col % group_size == 0:
                scales[:, col // group_size] = group_scales(W1[:, j:j + group_size], bits)
            s = scales[:, col // group_size]
            w = W1[:, j]
            q = quantize_to_grid(w, s, bits)
            Q[:, col] = q
            err = (w - q * s) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update
    return Q.to(torch.int8), scales.float()


class _Stop(Exception):
    """Raised by the capture hook to skip the rest of a calibration forward pass."""


@torch.no_grad()
def layer_hessian(model: nn.Module, layer: nn.Module, calibration: torch.Tensor,
                  batch_size: int = 16) -> tuple[torch.Tensor, int]:
    """``sum X^T X`` (K, K), float64, of ``layer``'s inputs X (n_tokens, K) over the calibration windows.

    The forward pass stops at ``layer`` (nothing after it is computed).

    Returns:
        (H, n_tokens): n_tokens counts the input rows the layer saw; it is less than the calibration's
        B*T for an MoE expert (only the tokens routed to it), and 0 for an expert never chosen.
    """
    H = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
    seen = [0]

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()  # (B*T, K), or (n_e, K) for an expert
        H.add_(x.T @ x)
        seen[0] += x.shape[0]
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for i in range(0, calibration.shape[0], batch_size):
            with contextlib.suppress(_Stop):  # the hook stops the forward once the layer's input is seen
                model(calibration[i:i + batch_size])
    finally:
        handle.remove()
    return H, seen[0]


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calibration: torch.Tensor, bits: int = 4, group_size: int = 64, *,
                        damp: float = 0.01, block_size: int = 128, fallbacks: list[dict] | None = None,
                        log=lambda *a: None) -> nn.Module:
    """Replace every linear in ``model.blocks`` by a GPTQ-quantized :class:`QuantLinear`, in forward order.

    A layer whose Hessian is zero (an MoE expert that no calibration token reaches) is quantized by
    round-to-nearest instead (see the module docstring).

    Args:
        calibration: token ids (n_samples, T), int64, from the training split.
        fallbacks: if given, one ``{"layer", "method": "rtn", "reason", "calibration_tokens"}`` dict is
            appended per layer that fell back to RTN.

    Returns:
        ``model`` (modified in place; the lm_head is left to the caller).
    """
    was_training = model.training
    model.eval()
    for name, lin in quantizable_linears(model):
        H, n_tokens = layer_hessian(model, lin, calibration)
        if not H.any():  # no data: GPTQ would zero every column, RTN needs none
            reason = ("no calibration token reached it (an MoE expert the router never chose)" if n_tokens == 0
                      else "all of its calibration inputs were zero")
            q, s = quantize_rtn(lin.weight, bits, group_size)
            if fallbacks is not None:
                fallbacks.append({"layer": name, "method": "rtn", "reason": reason, "calibration_tokens": n_tokens})
            log(f"gptq: {name} ({lin.out_features}x{lin.in_features}) -> round-to-nearest: {reason}")
        else:
            q, s = gptq_quantize_weight(lin.weight, H, bits, group_size, damp=damp, block_size=block_size)
            log(f"gptq: {name} ({lin.out_features}x{lin.in_features}), {n_tokens} calibration tokens")
        set_module(model, name, QuantLinear.from_quantized(lin, q, s, bits, group_size))
    model.train(was_training)
    return model
