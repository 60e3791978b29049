"""Evaluation metrics and probes."""
