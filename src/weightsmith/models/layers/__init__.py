"""Reusable layers: norms, rotary embeddings, attention, feed-forward blocks.

Shape legend used throughout: B batch, T sequence (query) length, S key length, H heads, D = d_model,
d_head = D / H, V vocabulary.
"""
