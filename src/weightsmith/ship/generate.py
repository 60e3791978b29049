"""Autoregressive generation with a preallocated KV cache, and seeded sampling.

Sampling (applied in this order to the last position's logits):
- temperature: logits / T; T = 0 means greedy (argmax);
- top-k: keep the k largest logits (Fan et al. 2018);
- top-p (nucleus): keep the smallest set of tokens whose probability sums to at least p (Holtzman et
  al. 2020).
A ``torch.Generator`` seeded by the caller makes sampling reproducible.

Context window: every new token is conditioned on the last ``max_seq_len`` tokens so far, at positions
``0 .. max_seq_len - 1``, as in nanoGPT's ``generate`` (which crops to the last ``block_size`` tokens),
so any number of new tokens can be generated. While the sequence fits, a preallocated KV cache makes
each step one single-token forward. Once it is longer than ``max_seq_len`` the window slides by one
token per step, which shifts every position and invalidates the whole cache (the keys of deeper layers
depend on the dropped tokens), so each further token costs one cache-free forward over ``max_seq_len``
tokens: about the cost of a prefill rather than a decode step. We pay that for exactness: the output
equals a naive loop of full forwards over the last ``max_seq_len`` tokens (tests check). A cheaper
scheme (crop to a shorter window and re-prefill only every few steps) would condition some tokens on
less context than the model allows.

Recurrent models (``model.recurrent``, the ``lstm`` and ``gru`` families) have no window: their state
summarizes every token so far, so the whole prompt is prefilled into the state (one forward, whatever
its length) and each new token is one single-token step at constant cost, past ``max_seq_len`` too.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask logits (B, V) outside top-k / top-p with -inf; returns a new tensor."""
    logits = logits.clone()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()  # cheaper than no_grad: no version counters or autograd metadata per step
def generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``prompt`` (B, T0) of equal-length prompts by exactly ``max_new_tokens`` tokens.

    Each new token is sampled from the model conditioned on the last ``max_seq_len`` tokens so far (see
    the module docstring: a KV cache while the sequence fits, a sliding window after that); a prompt
    longer than ``max_seq_len`` is read through its last ``max_seq_len`` tokens. A recurrent model
    (``model.recurrent``) reads the whole prompt into its state and has no window.

    Returns:
        (B, T0 + max_new_tokens) token ids (prompt included).

    Raises:
        ValueError: if ``max_new_tokens`` is negative.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if getattr(model, "recurrent", False):
        return _generate_recurrent(model, prompt, max_new_tokens, temperature, top_k, top_p, generator)
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    L = model.config.max_seq_len
    out = torch.empty(B, total, dtype=torch.long, device=prompt.device)
    out[:, :T0] = prompt
    if max_new_tokens == 0:
        return out
    cache = model.new_cache(B, min(total, L)) if T0 <= L else None
    if cache is not None:
        logits = model(prompt, cache=cache, start=0, last_only=True)[:, -1]  # prefill, (B, V)
    else:
        logits = window_logits(model, out, T0)
    for t in range(T0, total):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        out[:, t] = nxt
        if t + 1 == total:
            break
        if t + 1 <= L:  # the context out[:, :t + 1] still fits: one cached step
            logits = model(nxt[:, None], cache=cache, start=t)[:, -1]
        else:
            logits = window_logits(model, out, t + 1)
    return out


def _generate_recurrent(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, temperature: float,
                        top_k: int | None, top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`generate` for a recurrent model: the whole prompt (B, T0) into the state, then one
    single-token step per new token; no window. Returns (B, T0 + max_new_tokens)."""
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    out = torch.empty(B, total, dtype=torch.long, device=prompt.device)
    out[:, :T0] = prompt
    if max_new_tokens == 0:
        return out
    state = model.new_cache(B)
    logits = model(prompt, cache=state, last_only=True)[:, -1]  # prefill, (B, V)
    for t in range(T0, total):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        out[:, t] = nxt
        if t + 1 < total:
            logits = model(nxt[:, None], cache=state, start=t)[:, -1]
    return out


def window_logits(model: torch.nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Next-token logits (B, V) after ``ids[:, :n]`` from one cache-free forward over its last
    ``max_seq_len`` tokens, at positions ``0 .. max_seq_len - 1`` (ids: (B, >= n) int64)."""
    L = model.config.max_seq_len
    return model(ids[:, max(n - L, 0):n], last_only=True)[:, -1]


def prompt_limit(model: torch.nn.Module) -> int | None:
    """The longest prompt ``model`` reads whole: ``max_seq_len``, or None (no limit) for a recurrent model."""
    return None if getattr(model, "recurrent", False) else model.config.max_seq_len


def check_text_prompt(n_tokens: int, max_seq_len: int | None, max_new_tokens: int) -> None:
    """The text-level checks shared by the ``*_text`` functions; ``max_seq_len=None``: no prompt limit
    (a recurrent model, see :func:`prompt_limit`).

    Raises:
        ValueError: ``max_new_tokens`` < 0, or a prompt of ``n_tokens`` tokens longer than ``max_seq_len``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_seq_len is not None and n_tokens > max_seq_len:
        raise ValueError(f"prompt is {n_tokens} tokens, longer than max_seq_len={max_seq_len}; shorten it")


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0) -> str:
    """Decode a continuation of ``prompt`` (text in, prompt + continuation text out).

    Exactly ``max_new_tokens`` tokens are generated, past ``max_seq_len`` too (sliding window, see
    :func:`generate`; a recurrent model needs none).

    Raises:
        ValueError: if ``max_new_tokens`` is negative, or the prompt alone is longer than ``max_seq_len``
            tokens (it would be cut, and its start silently ignored); a recurrent model reads any prompt.
    """
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [0]
    check_text_prompt(len(ids), prompt_limit(model), max_new_tokens)
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, generator=g)
    return tokenizer.decode(out[0].tolist())
