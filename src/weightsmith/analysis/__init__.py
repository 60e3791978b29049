"""Inside out: analytic parameters, FLOPs and memory of every registered model, per module.

Counting conventions (stated once, used everywhere):

- FLOPs are 2 per multiply-add. Only matrix multiplies are counted (linear layers, the lm_head, and
  the two attention products ``Q K^T`` and ``P V``); norms, activations, softmax, residual adds and
  embedding lookups are not. Attention is counted dense over the full context (no causal halving),
  which is what ``torch.utils.flop_counter.FlopCounterMode`` and PaLM's MFU formula count.
- Training FLOPs are 3x forward (backward = 2x forward: one product for the input gradient, one for
  the weight gradient), Kaplan et al. 2020 / Chinchilla convention.
"""

from weightsmith.analysis.flops import flops_per_token

__all__ = ["flops_per_token"]
