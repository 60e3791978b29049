"""Analytic parameter counts: total, embedding, non-embedding, trainable, active per token.

``params_embedding`` counts the input lookup tables (token, position, token-type embeddings), the part
Kaplan et al. 2020 leave out of N. An untied ``lm_head`` is a matrix multiply every token pays for, so it
is counted as non-embedding; a tied one is the token embedding and is counted once.
``params_active`` is what one token uses: for a mixture of experts the router plus k of E experts
(Mixtral 8x7B: 46.7B total, 12.9B active), otherwise the total.
"""

from __future__ import annotations

from typing import Any

from weightsmith.analysis.components import Row, rows_for


def param_counts(family: str, cfg: Any, rows: list[Row] | None = None) -> dict[str, int]:
    """``{"total", "embedding", "non_embedding", "trainable", "active"}`` parameter counts (elements).

    All parameters are trainable when a model is built; adapters or freezing passes applied later
    change ``trainable`` on the built model, not here.
    """
    rows = rows if rows is not None else rows_for(family, cfg)
    total = sum(r.params for r in rows)
    emb = sum(r.params for r in rows if r.embedding)
    active = sum(round(r.params * r.active) for r in rows)
    return {"total": total, "embedding": emb, "non_embedding": total - emb, "trainable": total, "active": active}


def count_params(family: str, cfg: Any) -> int:
    """Total parameter count (elements), equal to ``sum(p.numel() for p in model.parameters())``."""
    return param_counts(family, cfg)["total"]
