"""Corpora, tokenizers, token shards and manifests."""
