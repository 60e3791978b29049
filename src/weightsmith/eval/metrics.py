"""Language-model metrics over a token stream: loss (nats per token), perplexity, bits per byte.

Bits per byte (as in Gao et al. 2020, "The Pile") is tokenizer-agnostic::

    val_bpb = (sum over predicted tokens of -ln p(token)) / (ln 2 * bytes of those tokens)

The stream is cut into windows of ``seq_len + 1`` tokens that overlap by one, so every token but the
first is predicted exactly once, with at most ``seq_len`` tokens of context (less right after a window
boundary). ``val_bytes`` counts the UTF-8 bytes of exactly the predicted tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def window_starts(n_tokens: int, seq_len: int) -> list[int]:
    """Start offsets of the windows covering ``n_tokens`` (each predicts up to ``seq_len`` tokens)."""
    return list(range(0, max(n_tokens - 1, 0), seq_len))


@torch.no_grad()
def stream_loss(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int = 16,
                max_tokens: int | None = None, device: str = "cpu",
                autocast_dtype: torch.dtype | None = None) -> tuple[float, int, torch.Tensor]:
    """Summed next-token loss over ``tokens``.

    Args:
        tokens: 1-D token ids (N,).
        max_tokens: evaluate only the first ``max_tokens + 1`` tokens (for quick periodic evals).

    Returns:
        (sum of nats, number of predicted tokens, ids of the predicted tokens as a 1-D int64 tensor).
    """
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    n = len(tokens)
    starts = window_starts(n, seq_len)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # full-length windows are batched; the final short window runs on its own
    full = [s for s in starts if s + seq_len + 1 <= n]
    rest = [s for s in starts if s + seq_len + 1 > n]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in rest]
    for group in groups:
        end = min(group[0] + seq_len + 1, n) - group[0]
        chunk = torch.from_numpy(np.stack([np.asarray(tokens[s:s + end], dtype=np.int64) for s in group]))
        chunk = chunk.to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total += float(loss)
        count += y.numel()
    model.train(was_training)
    predicted = torch.from_numpy(np.asarray(tokens[1:n], dtype=np.int64))
    return total, count, predicted


def bits_per_byte(sum_nats: float, n_bytes: int) -> float:
    """Summed nats over predicted tokens -> bits per UTF-8 byte of those tokens."""
    return sum_nats / (math.log(2) * n_bytes)


def evaluate_lm(model: torch.nn.Module, tokens: np.ndarray, token_bytes: list[bytes], seq_len: int,
                batch_size: int = 16, device: str = "cpu",
                autocast_dtype: torch.dtype | None = None) -> dict[str, float | int]:
    """Loss, perplexity and bits per byte over a whole split.

    Returns:
        ``{"val_loss": nats/token, "val_ppl": exp(val_loss), "val_bpb": bits/byte,
        "val_tokens": predicted tokens, "val_bytes": their UTF-8 bytes}``.
    """
    total, count, predicted = stream_loss(model, tokens, seq_len, batch_size, device=device,
                                          autocast_dtype=autocast_dtype)
    lengths = torch.tensor([len(b) for b in token_bytes], dtype=torch.int64)
    n_bytes = int(lengths[predicted].sum())
    val_loss = total / count
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_bpb": bits_per_byte(total, n_bytes),
            "val_tokens": count, "val_bytes": n_bytes}
