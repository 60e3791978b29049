"""Inference-time fusion of the projections that read the same input, applied from outside as a pass.

A decode step at batch 1 on a CPU is dominated by per-operator overhead, not arithmetic: the main-job
model's 128 x 384 matmuls take a few microseconds of work and tens of microseconds of dispatch. Reading
the same normalized input with one matrix instead of several removes whole operators:

=============================  =====================================  ==============================
module                         before                                  after
=============================  =====================================  ==============================
attention (layers/attention)   q_proj, k_proj, v_proj: 3 matmuls      qkv_proj (H + 2 Hkv) d_head x D
SwiGLU MLP (layers/mlp)        gate, up: 2 matmuls                    gate_up (2 d_ff, D)
=============================  =====================================  ==============================

so a layer runs 4 matmuls instead of 7 (vLLM's QKVParallelLinear and MergedColumnParallelLinear, and
nanoGPT's ``c_attn``, fuse the same way). The fused weights are the row-wise concatenations of the
originals, so outputs are equal up to float rounding of the matmul (tests assert_close logits and
identical greedy tokens).

Every plain ``nn.Linear`` (fused or not, except an lm_head tied to the embedding, which would need a
second copy of the table) then becomes a :class:`TransposedLinear` that keeps its weight as a contiguous
(in_features, out_features) matrix: ``x @ weight_t`` is one matmul, where ``F.linear`` dispatches a
transpose, a matmul and two reshapes around the same kernel (the weight pre-packing that inference
runtimes such as oneDNN do). Measured on the 2-core CPU, a (1, 1, 128) x 128 -> 768 projection: 10.3 us
with ``F.linear``, 6.8 us transposed. The pass changes state-dict names (``qkv_proj``, ``gate_up``), so it is for
models that only run inference: the CLI's ``generate`` and the decode benchmark apply it after loading;
checkpoints, exporters and quantization always see the unfused layout. Layers that are not plain
``nn.Linear`` (weightsmith.ship.quantize.QuantLinear) are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from weightsmith.models.layers.attention import Attention
from weightsmith.models.layers.mlp import SwiGLU


def _concat(parts: list[nn.Linear]) -> nn.Linear | None:
    """One nn.Linear whose output is the concatenation of ``parts``' outputs, or None if not fusable."""
    if not all(type(p) is nn.Linear for p in parts):
        return None
    if len({p.in_features for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
        return None
    w0 = parts[0].weight
    fused = nn.Linear(w0.shape[1], sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                      device=w0.device, dtype=w0.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(w0.requires_grad)


class TransposedLinear(nn.Module):
    """``y = x @ weight_t + bias``: (..., in_features) -> (..., out_features), the weight stored transposed.

    Equal to the ``nn.Linear`` it was made from (``weight_t = linear.weight.T``, contiguous) up to float
    rounding. Inference only: its state-dict name (``weight_t``) is not the checkpoint layout.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q/k/v in every :class:`Attention` and gate/up in every :class:`SwiGLU` of ``model``, then store
    every plain linear transposed (:class:`TransposedLinear`); in place.

    Returns:
        ``model``. Calling it twice is harmless (fused and transposed layers are skipped). LoRA / DoRA
        adapters (weightsmith.adapters) are merged into their weights first, which leaves the outputs equal.
    """
    from weightsmith.adapters import adapter_modules, merge_adapters

    if adapter_modules(model):
        merge_adapters(model)
    for m in model.modules():
        if isinstance(m, Attention) and m.qkv_proj is None:
            fused = _concat([m.q_proj, m.k_proj, m.v_proj])
            if fused is not None:
                m.qkv_proj = fused
                del m.q_proj, m.k_proj, m.v_proj
        elif isinstance(m, SwiGLU) and m.gate_up is None:
            fused = _concat([m.gate, m.up])
            if fused is not None:
                m.gate_up = fused
                del m.gate, m.up
    tied = getattr(getattr(model, "tok_emb", None), "weight", None)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and m.weight is not tied:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, TransposedLinear(m))
    return model
