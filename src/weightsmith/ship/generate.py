"""Autoregressive generation with a preallocated KV cache, and seeded sampling.

Sampling (applied in this order to the last position's logits):
- temperature: logits / T; T = 0 means greedy (argmax);
- top-k: keep the k largest logits (Fan et al. 2018);
- top-p (nucleus): keep the smallest set of tokens whose probability sums to at least p (Holtzman et
  al. 2020).
A ``torch.Generator`` seeded by the caller makes sampling reproducible.
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
    """Continue ``prompt`` (B, T0) of equal-length prompts by ``max_new_tokens`` tokens with a KV cache.

    Returns:
        (B, T0 + max_new_tokens) token ids (prompt included).

    Raises:
        ValueError: if the total length exceeds the model's ``max_seq_len``.
    """
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    max_len = model.config.max_seq_len
    if total > max_len:
        raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={max_len}")
    cache = model.new_cache(B, total)
    out = torch.empty(B, total, dtype=torch.long, device=prompt.device)
    out[:, :T0] = prompt
    logits = model(prompt, cache=cache, start=0, last_only=True)[:, -1]  # prefill, (B, V)
    for t in range(T0, total):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        out[:, t] = nxt
        if t + 1 < total:
            logits = model(nxt[:, None], cache=cache, start=t)[:, -1]
    return out


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0) -> str:
    """Decode a continuation of ``prompt`` (text in, prompt + continuation text out).

    If prompt + continuation would exceed ``max_seq_len``, ``max_new_tokens`` is reduced to fit.

    Raises:
        ValueError: if the prompt alone does not fit in ``max_seq_len``.
    """
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [0]
    if len(ids) >= model.config.max_seq_len:
        raise ValueError(f"prompt is {len(ids)} tokens; max_seq_len is {model.config.max_seq_len}")
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(ids))
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, generator=g)
    return tokenizer.decode(out[0].tolist())
