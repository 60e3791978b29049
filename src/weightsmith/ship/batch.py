"""Batched generation of prompts of different lengths: left padding, one preallocated KV cache.

Prompts are left-padded to the longest length L so that every sequence's next token sits in the same
column. Sequence b has ``pad_b`` pad slots, and its real tokens get positions ``0, 1, ...`` (``pos``
(B, T) per sequence), so RoPE / learned positions are those of the unpadded prompt. Cache column c of
sequence b holds position ``c - pad_b``. The boolean mask (B, 1, T, S), True = attend::

    sequence b, pad_b = 2, L = 5        keys (cache columns) ->
                                         p  p  a  b  c
    query p (pad)                        1  .  .  .  .     a pad attends to itself only, so its
    query p (pad)                        .  1  .  .  .     output stays finite (never read by others)
    query a                              .  .  1  .  .
    query b                              .  .  1  1  .
    query c                              .  .  1  1  1
    decode step (one query)              .  .  1  1  1  1 ...  (every real column so far)

Under greedy decoding every sequence gets the same tokens as when generated on its own (tests check).
"""

from __future__ import annotations

import torch

from weightsmith.ship.generate import sample_next


def padded_batch(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (ids (B, L) int64, pad counts (B,) int64)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    pads = torch.tensor([L - len(p) for p in prompts], dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
    return ids, pads


def prefill_mask(pads: torch.Tensor, L: int) -> torch.Tensor:
    """Boolean (B, 1, L, L): causal, pad keys hidden, each pad query attends to itself."""
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    real_key = k[None] >= pads[:, None, None]  # (B, 1, L)
    return (((k <= q)[None] & real_key) | (k == q)[None])[:, None]  # (B, 1, L, L)


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, *,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each of ``prompts`` (token lists, any lengths >= 1) by ``max_new_tokens`` tokens.

    Returns:
        one token list per prompt: the prompt followed by its continuation.

    Raises:
        ValueError: if an empty prompt is given, or longest prompt + max_new_tokens exceeds max_seq_len.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    ids, pads = padded_batch(prompts)
    ids, pads = ids.to(device), pads.to(device)
    B, L = ids.shape
    total = L + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"longest prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len={model.config.max_seq_len}")
    cache = model.new_cache(B, total)
    pos = (torch.arange(L, device=device)[None] - pads[:, None]).clamp(min=0)  # (B, L)
    logits = model(ids, cache=cache, start=0, pos=pos, attn_mask=prefill_mask(pads, L).to(device),
                   last_only=True)[:, -1]  # (B, V)
    real = torch.arange(total, device=device)[None] >= pads[:, None]  # (B, total): non-pad cache columns
    new = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        new[:, i] = nxt
        if i + 1 < max_new_tokens:
            col = L + i  # cache column of nxt
            mask = real[:, None, None, :col + 1]  # (B, 1, 1, col + 1)
            logits = model(nxt[:, None], cache=cache, start=col, pos=(col - pads)[:, None],
                           attn_mask=mask)[:, -1]
    return [list(p) + new[b].tolist() for b, p in enumerate(prompts)]


def generate_texts(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 200,
                   temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                   seed: int = 0) -> list[str]:
    """Batched :func:`weightsmith.ship.generate.generate_text`: texts in, prompt + continuation texts out.

    ``max_new_tokens`` is reduced so that the longest prompt plus continuation fits in ``max_seq_len``.

    Raises:
        ValueError: if the longest prompt alone does not fit in ``max_seq_len``.
    """
    device = next(model.parameters()).device
    ids = [tokenizer.encode(p) or [0] for p in prompts]
    L = max(len(i) for i in ids)
    if L >= model.config.max_seq_len:
        raise ValueError(f"a prompt is {L} tokens; max_seq_len is {model.config.max_seq_len}")
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - L)
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate_batch(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=g)
    return [tokenizer.decode(o) for o in out]
