"""Speculative decoding: a small draft model proposes, the target model verifies in one forward pass.

Leviathan, Kalman, Matias 2023, "Fast Inference from Transformers via Speculative Decoding" (ICML);
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling". The papers'
M_q (draft) / M_p (target) are our ``draft`` / ``target``; gamma (draft length) is ``num_draft_tokens``
(k); p and q are the target's and draft's next-token distributions after temperature / top-k / top-p.

One round, with ``n`` tokens so far (batch 1)::

    draft : x[n-1] -> d1 -> d2 ... -> dk          k cheap single-token steps, q_1..q_k
    target: [x[n-1], d1 .. dk]  one forward       p_1..p_{k+1}
    accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), left to right;
    at the first rejection sample from norm(max(0, p_i - q_i)) and stop;
    if all k are accepted, sample one bonus token from p_{k+1}.

Every round emits between 1 and k + 1 tokens, and the emitted tokens are distributed exactly as the
target's own samples (Leviathan et al., Theorem 1). Under greedy decoding (temperature 0) "accept" is
``d_i == argmax p_i`` and the output is the target's greedy output.

KV-cache rollback: the caches are position-indexed (models/layers/attention.py writes positions
``[start, start + T)`` and reads ``[0, start + T)``), so rejected positions are never read again: the
next round simply writes from the first stale position. Each model tracks how many leading positions
of its cache are valid and feeds the not-yet-cached tokens as one chunk.

Past the context window: the caches are only valid while the sequence fits in ``max_seq_len`` (after
that the window slides and every position shifts; see weightsmith.ship.generate). A round drafts at most
as many tokens as keep both models inside their windows; once no token can be drafted, each remaining
token is one plain target step: cached while the target's window holds the whole sequence, then one
cache-free forward over its last ``max_seq_len`` tokens. Speculation then saves nothing (verifying k
drafts would need k + 1 different windows), so the stats count these as rounds with nothing drafted.
"""

from __future__ import annotations

import time

import torch

from weightsmith.ship.generate import filter_logits, window_logits


def _probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits (..., V) -> the sampling distribution (..., V), float32."""
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)


def verify(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """The rejection rule for one round.

    Args:
        p: target distributions (k + 1, V) for the k drafted positions and the one after.
        q: draft distributions (k, V) the drafted tokens were sampled from.
        draft: drafted tokens (k,).

    Returns:
        (number of accepted draft tokens m in [0, k], the token emitted after them).
    """
    k = draft.shape[0]
    idx = torch.arange(k, device=draft.device)
    p_d, q_d = p[idx, draft], q[idx, draft]  # (k,)
    u = torch.rand(k, generator=generator, device=draft.device)
    rejected = (u * q_d > p_d).nonzero()  # accept iff u < p/q, written without dividing by q
    m = int(rejected[0]) if len(rejected) else k
    if m < k:
        residual = (p[m] - q[m]).clamp(min=0)
        dist = residual if float(residual.sum()) > 0 else p[m]  # p == q: a rejection has probability 0
    else:
        dist = p[k]
    return m, int(torch.multinomial(dist / dist.sum(), 1, generator=generator))


@torch.inference_mode()
def speculative_generate(target: torch.nn.Module, draft: torch.nn.Module, prompt: torch.Tensor,
                         max_new_tokens: int, *, num_draft_tokens: int = 4, temperature: float = 1.0,
                         top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Continue ``prompt`` (1, T0) by exactly ``max_new_tokens`` tokens with draft-then-verify rounds.

    Past either model's ``max_seq_len`` the rounds stop drafting (see the module docstring): each
    remaining token is one target step over the target's last ``max_seq_len`` tokens, as in
    :func:`weightsmith.ship.generate.generate`, so the output is still distributed as the target's own.

    Returns:
        (token ids (1, T0 + max_new_tokens), stats) with stats ``{"rounds", "drafted", "accepted",
        "acceptance_rate" (accepted / drafted), "target_forwards", "tokens_per_round", "seconds"}``.

    Raises:
        ValueError: batch size other than 1, different vocabularies, a negative ``max_new_tokens``, or a
            recurrent model (``model.recurrent``) as target or draft.
    """
    if getattr(target, "recurrent", False) or getattr(draft, "recurrent", False):
        raise ValueError("speculative decoding rolls rejected drafts back in a position-indexed KV cache; "
                         "a recurrent model (lstm, gru) cannot rewind its state, use plain generation")
    if prompt.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time, got batch {prompt.shape[0]}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocab_size {draft.config.vocab_size} != target vocab_size "
                         f"{target.config.vocab_size}; the models must share a tokenizer")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    k = num_draft_tokens
    T0 = prompt.shape[1]
    total = T0 + max_new_tokens
    t_max, d_max = target.config.max_seq_len, draft.config.max_seq_len
    greedy = temperature <= 0.0
    t0 = time.perf_counter()
    out = torch.empty(total, dtype=torch.long, device=prompt.device)
    out[:T0] = prompt[0]
    # cache room for the furthest write: up to k draft tokens past the last emitted position, inside the window
    t_cache, d_cache = target.new_cache(1, min(total + k, t_max)), draft.new_cache(1, min(total + k, d_max))
    t_len = d_len = 0  # leading cache positions holding the tokens out[:len]
    n = T0
    stats = {"rounds": 0, "drafted": 0, "accepted": 0, "target_forwards": 0}
    while n < total:
        # the round emits at most kk + 1 tokens; the draft reads positions < n + kk - 1 and the target
        # positions < n + kk, which must stay inside each model's window for the caches to be valid
        kk = min(k, total - n - 1, d_max - n + 1, t_max - n)
        if kk <= 0:  # nothing to draft: one target step (cached while out[:n] fits, else a sliding window)
            if n <= t_max:
                logits = target(out[t_len:n][None], cache=t_cache, start=t_len, last_only=True)[0, -1]
                t_len = n
            else:
                logits = window_logits(target, out[None], n)[0]
            stats["target_forwards"] += 1
            if greedy:
                out[n] = logits.argmax(-1)
            else:
                out[n] = torch.multinomial(_probs(logits, temperature, top_k, top_p), 1, generator=generator)[0]
            n += 1
            stats["rounds"] += 1
            continue
        # draft: catch up on uncached tokens (one chunk), then propose kk tokens
        drafted = torch.empty(kk, dtype=torch.long, device=prompt.device)
        q_rows = []
        logits = draft(out[d_len:n][None], cache=d_cache, start=d_len, last_only=True)[0, -1]
        d_len = n
        for i in range(kk):
            if greedy:
                tok = logits.argmax(-1)
            else:
                q_rows.append(_probs(logits, temperature, top_k, top_p))
                tok = torch.multinomial(q_rows[-1], 1, generator=generator)[0]
            drafted[i] = tok
            if i + 1 < kk:
                logits = draft(tok.view(1, 1), cache=d_cache, start=d_len + i)[0, -1]
        d_len += kk - 1  # the last drafted token was not fed to the draft
        # target: uncached tokens + the draft, one forward -> logits for positions n .. n + kk
        chunk = torch.cat([out[t_len:n], drafted])[None]
        t_logits = target(chunk, cache=t_cache, start=t_len)[0, -(kk + 1):]  # (kk + 1, V)
        stats["target_forwards"] += 1
        if greedy:
            want = t_logits.argmax(-1)  # (kk + 1,)
            mismatch = (want[:kk] != drafted).nonzero()
            m = int(mismatch[0]) if len(mismatch) else kk
            nxt = int(want[m])
        else:
            p = _probs(t_logits, temperature, top_k, top_p)
            m, nxt = verify(p, torch.stack(q_rows), drafted, generator)
        out[n:n + m] = drafted[:m]
        out[n + m] = nxt
        t_len = n + m  # the target cached out[.. n + kk): the accepted prefix stays valid
        d_len = min(d_len, n + m)  # rollback: positions past the accepted prefix are stale
        n += m + 1
        stats["rounds"] += 1
        stats["drafted"] += kk
        stats["accepted"] += m
    stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
    stats["tokens_per_round"] = max_new_tokens / max(stats["rounds"], 1)
    stats["seconds"] = time.perf_counter() - t0
    return out[None], stats


def speculative_text(target: torch.nn.Module, draft: torch.nn.Module, tokenizer, prompt: str,
                     max_new_tokens: int = 200, num_draft_tokens: int = 4, temperature: float = 0.8,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> tuple[str, dict]:
    """Text in, (prompt + continuation, stats) out; stats add the target-alone time and ``speedup``.

    Exactly ``max_new_tokens`` tokens are generated (sliding window past ``max_seq_len``).

    ``speedup`` = target-alone seconds / speculative seconds for the same prompt and length (same sampling
    settings, greedy or not; the two runs' samples differ unless greedy).

    Raises:
        ValueError: as :func:`speculative_generate`, or a prompt longer than the target's ``max_seq_len``.
    """
    from weightsmith.ship.generate import check_text_prompt, generate

    device = next(target.parameters()).device
    ids = tokenizer.encode(prompt) or [0]
    check_text_prompt(len(ids), target.config.max_seq_len, max_new_tokens)
    x = torch.tensor([ids], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out, stats = speculative_generate(target, draft, x, max_new_tokens, num_draft_tokens=num_draft_tokens,
                                      temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
    t0 = time.perf_counter()
    with torch.inference_mode():
        generate(target, x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 generator=torch.Generator(device=device).manual_seed(seed))
    stats["target_alone_seconds"] = time.perf_counter() - t0
    stats["speedup"] = stats["target_alone_seconds"] / stats["seconds"]
    return tokenizer.decode(out[0].tolist()), stats
