"""Inside out: analytic parameters, FLOPs and memory of every registered model, per module.

Nothing here builds a model: every number comes from the config through the per-module rows of
:mod:`weightsmith.analysis.components`, and the tests check the numbers against PyTorch (``numel``,
``FlopCounterMode``, saved tensors, a profiled training step, a written safetensors file). The model
is nanoGPT's ``transformer_sizing.ipynb``, made a library feature.

Counting conventions, stated once:

- FLOPs are 2 per multiply-add. Only matrix multiplies count (linear layers, the lm_head, and the two
  attention products ``Q K^T`` and ``P V``); norms, activations, softmax, residual adds and embedding
  lookups do not. Attention is dense over the whole context (no causal halving), as
  ``torch.utils.flop_counter.FlopCounterMode`` and PaLM's MFU formula count it.
- Training FLOPs are 3x forward (backward = 2x forward), so ``6N`` per token plus attention.
- Bytes: every tensor at one ``dtype`` (weights, gradients, optimizer state, activations).

    >>> from weightsmith.analysis import flops_per_token, inspect_model
    >>> report = inspect_model("gpt2", batch_size=8, seq_len=1024)
"""

from weightsmith.analysis.flops import flops_per_token, forward_flops, step_flops
from weightsmith.analysis.params import count_params, param_counts

__all__ = ["count_params", "flops_per_token", "forward_flops", "inspect_model", "format_report",
           "memory_estimate", "param_counts", "step_flops"]


def __getattr__(name: str):  # lazy: inspect pulls in the registry and every model family
    if name in ("inspect_model", "format_report"):
        from weightsmith.analysis import inspect

        return getattr(inspect, name)
    if name == "memory_estimate":
        from weightsmith.analysis.memory import memory_estimate

        return memory_estimate
    raise AttributeError(name)
