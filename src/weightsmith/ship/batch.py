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

Past ``max_seq_len`` the cache is dropped and each step re-reads the last ``max_seq_len`` columns with
the pad counts cut to that window (:func:`window_logits`); see weightsmith.ship.generate for why and
what it costs. Under greedy decoding every sequence gets the same tokens as when generated on its own
(tests check), inside the window and past it.

Recurrent models (``model.recurrent``) cannot be padded: a pad token would enter the state. Prompts of
one length are prefilled together into their rows of one batched state (one forward per distinct
length), then every step is one batched single-token step for all sequences, with no window
(:func:`_generate_batch_recurrent`).
"""

from __future__ import annotations

import torch

from weightsmith.ship.generate import check_text_prompt, prompt_limit, sample_next


def padded_batch(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (ids (B, L) int64, pad counts (B,) int64)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    pads = torch.tensor([L - len(p) for p in prompts], dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
    return ids, pads


def prefill_mask(pads: torch.Tensor, L: int) -> torch.Tensor:
    """Boolean (B, 1, L, L) on ``pads``' device: causal, pad keys hidden, each pad query attends to itself."""
    q = torch.arange(L, device=pads.device)[:, None]
    k = torch.arange(L, device=pads.device)[None, :]
    real_key = k[None] >= pads[:, None, None]  # (B, 1, L)
    return (((k <= q)[None] & real_key) | (k == q)[None])[:, None]  # (B, 1, L, L)


def window_logits(model: torch.nn.Module, ids: torch.Tensor, pads: torch.Tensor, n: int) -> torch.Tensor:
    """Next-token logits (B, V) after the left-padded columns ``ids[:, :n]`` (pads (B,): leading pad
    columns per row), from one cache-free forward over the last ``max_seq_len`` columns.

    A row that is shorter than the window keeps all its tokens, still left-padded; every row's tokens sit
    at positions ``0, 1, ...``, as in :func:`weightsmith.ship.generate.window_logits` for that row alone.
    """
    lo = max(n - model.config.max_seq_len, 0)
    W = n - lo
    w_pads = (pads - lo).clamp(min=0)  # (B,) pad columns inside the window
    pos = (torch.arange(W, device=ids.device)[None] - w_pads[:, None]).clamp(min=0)  # (B, W)
    return model(ids[:, lo:n], pos=pos, attn_mask=prefill_mask(w_pads, W), last_only=True)[:, -1]


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, *,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each of ``prompts`` (token lists, any lengths >= 1) by exactly ``max_new_tokens`` tokens.

    As in :func:`weightsmith.ship.generate.generate`, each token is conditioned on the last
    ``max_seq_len`` tokens of its own sequence: the KV cache serves while the padded width (the longest
    sequence) fits in ``max_seq_len``; after that every step is one cache-free forward over the last
    ``max_seq_len`` columns (:func:`window_logits`). A recurrent model has no window and no padding
    (:func:`_generate_batch_recurrent`).

    Returns:
        one token list per prompt: the prompt followed by its continuation.

    Raises:
        ValueError: if an empty prompt is given, or ``max_new_tokens`` is negative.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    if getattr(model, "recurrent", False):
        return _generate_batch_recurrent(model, prompts, max_new_tokens, temperature, top_k, top_p, generator)
    ids, pads = padded_batch(prompts)
    ids, pads = ids.to(device), pads.to(device)
    B, P = ids.shape
    total = P + max_new_tokens
    L = model.config.max_seq_len
    if max_new_tokens == 0:
        return [list(p) for p in prompts]
    buf = torch.empty(B, total, dtype=torch.long, device=device)  # padded prompts, then new tokens
    buf[:, :P] = ids
    S = min(total, L)  # cache columns
    cache = model.new_cache(B, S) if P <= L else None
    if cache is not None:
        pos = (torch.arange(P, device=device)[None] - pads[:, None]).clamp(min=0)  # (B, P)
        logits = model(ids, cache=cache, start=0, pos=pos, attn_mask=prefill_mask(pads, P),
                       last_only=True)[:, -1]  # (B, V)
    else:
        logits = window_logits(model, buf, pads, P)
    real = torch.arange(S, device=device)[None] >= pads[:, None]  # (B, S): non-pad cache columns
    for col in range(P, total):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        buf[:, col] = nxt
        if col + 1 == total:
            break
        if col + 1 <= L:  # columns [0, col] still fit: one cached step for the token in column col
            mask = real[:, None, None, :col + 1]  # (B, 1, 1, col + 1)
            logits = model(nxt[:, None], cache=cache, start=col, pos=(col - pads)[:, None],
                           attn_mask=mask)[:, -1]
        else:
            logits = window_logits(model, buf, pads, col + 1)
    return [list(p) + buf[b, P:].tolist() for b, p in enumerate(prompts)]


def _generate_batch_recurrent(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
                              temperature: float, top_k: int | None, top_p: float | None,
                              generator: torch.Generator | None) -> list[list[int]]:
    """:func:`generate_batch` for a recurrent model: no padding; the prompts of each length are
    prefilled as one (n, length) batch into their rows of the batched state, then B sequences decode
    together, one single-token step per new token."""
    device = next(model.parameters()).device
    if max_new_tokens == 0:
        return [list(p) for p in prompts]
    B = len(prompts)
    state = model.new_cache(B)
    by_length: dict[int, list[int]] = {}
    for b, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(b)
    logits = None  # (B, V)
    for rows in by_length.values():
        part = model.new_cache(len(rows))
        ids = torch.tensor([prompts[b] for b in rows], dtype=torch.long, device=device)  # (n, length)
        part_logits = model(ids, cache=part, last_only=True)[:, -1]  # (n, V)
        if logits is None:
            logits = part_logits.new_empty(B, part_logits.shape[-1])
        idx = torch.tensor(rows, device=device)
        logits[idx] = part_logits
        state.set_rows(idx, part)
    new = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        new[:, i] = nxt
        if i + 1 < max_new_tokens:
            logits = model(nxt[:, None], cache=state)[:, -1]
    return [list(p) + new[b].tolist() for b, p in enumerate(prompts)]


def generate_texts(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 200,
                   temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                   seed: int = 0) -> list[str]:
    """Batched :func:`weightsmith.ship.generate.generate_text`: texts in, prompt + continuation texts out.

    Every prompt gets exactly ``max_new_tokens`` new tokens (sliding window past ``max_seq_len``; none
    for a recurrent model).

    Raises:
        ValueError: if ``max_new_tokens`` is negative or a prompt alone is longer than ``max_seq_len``
            (any length for a recurrent model).
    """
    device = next(model.parameters()).device
    ids = [tokenizer.encode(p) or [0] for p in prompts]
    check_text_prompt(max(len(i) for i in ids), prompt_limit(model), max_new_tokens)
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate_batch(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=g)
    return [tokenizer.decode(o) for o in out]
