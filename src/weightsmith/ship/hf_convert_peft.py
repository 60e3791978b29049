"""Our adapted linears <-> the module names of a peft adapter on the matching transformers model.

A peft LoRA adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` whose keys are
``base_model.model.<HF module>.lora_A.weight`` (rank, in), ``.lora_B.weight`` (out, rank) and, for
DoRA, ``.lora_magnitude_vector`` (out,). :func:`peft_targets` maps each of our linear layers to its HF
module, following the names of weightsmith.ship.hf_convert (the architecture :func:`ours_to_hf` picks):

- ``LlamaForCausalLM``: one module per linear (``blocks.3.attn.q_proj`` -> ``model.layers.3.self_attn.q_proj``).
- ``GPT2LMHeadModel``: q, k and v are rows 0:D, D:2D, 2D:3D of the fused Conv1D ``attn.c_attn``
  (peft's ``fan_in_fan_out=True``). Adapters on several of them become one adapter on ``c_attn``: A
  stacked (n r, D), B block-diagonal (3D, n r) with zero rows for an unadapted part, rank n r and alpha
  n alpha (``rank_pattern`` / ``alpha_pattern``), so the scale alpha / rank is unchanged. This is exact
  for LoRA, and for DoRA too: the row norms of W + s B A are those of the parts, and a zero row of B
  with magnitude ||W_row|| leaves that row as it was.
"""

from __future__ import annotations

from typing import Any

from weightsmith.errors import ConfigError

PEFT_PREFIX = "base_model.model."


def peft_targets(cfg: Any) -> tuple[str, dict[str, tuple[str, int, int]]]:
    """(architecture, {our linear name: (HF module name, first output row, last output row + 1)}).

    Raises:
        ConfigError: the config has no stock HF architecture (see ``ours_to_hf``) or has experts.
    """
    from weightsmith.models.gpt import GPTConfig
    from weightsmith.ship.export import check_gpt_options
    from weightsmith.ship.hf_convert import _LLAMA_LAYER, _LLAMA_MLP

    if not isinstance(cfg, GPTConfig):
        raise ConfigError(f"peft adapters are saved for the gpt family only, got {type(cfg).__name__}")
    check_gpt_options(cfg, "hf")
    if getattr(cfg, "n_experts", 0):
        raise ConfigError("peft adapters for mixture-of-experts models (model.n_experts > 0) are not supported")
    out: dict[str, tuple[str, int, int]] = {}
    if cfg.pos == "rope":
        arch = "LlamaForCausalLM"
        for i in range(cfg.n_layers):
            for ours, theirs in _LLAMA_LAYER + _LLAMA_MLP:
                if not ours.endswith(".weight"):  # norm gains are not linears
                    n_out = {"attn.k_proj": cfg.n_kv_heads * cfg.d_head, "attn.v_proj": cfg.n_kv_heads * cfg.d_head,
                             "mlp.gate": cfg.d_ff, "mlp.up": cfg.d_ff}.get(ours, cfg.d_model)
                    out[f"blocks.{i}.{ours}"] = (f"model.layers.{i}.{theirs}", 0, n_out)
    else:
        arch = "GPT2LMHeadModel"
        d = cfg.d_model
        for i in range(cfg.n_layers):
            h = f"transformer.h.{i}."
            for j, name in enumerate("qkv"):
                out[f"blocks.{i}.attn.{name}_proj"] = (h + "attn.c_attn", j * d, (j + 1) * d)
            out[f"blocks.{i}.attn.o_proj"] = (h + "attn.c_proj", 0, d)
            out[f"blocks.{i}.mlp.up"] = (h + "mlp.c_fc", 0, cfg.d_ff)
            out[f"blocks.{i}.mlp.down"] = (h + "mlp.c_proj", 0, d)
    out["lm_head"] = ("lm_head", 0, cfg.vocab_size)
    return arch, out


def hf_module_rows(cfg: Any) -> dict[str, int]:
    """{HF module name: its output rows} for every module of :func:`peft_targets`."""
    rows: dict[str, int] = {}
    for hf, _, stop in peft_targets(cfg)[1].values():
        rows[hf] = max(rows.get(hf, 0), stop)
    return rows


def fan_in_fan_out(arch: str) -> bool:
    """peft's flag for Conv1D modules, whose weight is stored (in, out): GPT-2's."""
    return arch == "GPT2LMHeadModel"


def modules_to_save(cfg: Any, state_dict: dict[str, Any], names: list[str]) -> tuple[dict[str, Any], list[str], bool]:
    """peft's ``modules_to_save`` for our modules ``names`` that train in full (``adapter.train_modules``):
    ``({HF key: tensor}, [HF module], tie)``. ``state_dict`` is the plain (merged) state dict of the
    model. When the embedding is among them and the HF model ties its head to it, the tensors also hold
    ``lm_head.weight``, the same values: for LLaMA ``tie`` is then True, and peft's
    ``ensure_weight_tying`` keeps its copy of the head tied to its copy of the embedding (peft >= 0.18);
    peft does not know GPT-2's ``wte`` as an embedding, so there ``tie`` stays False and the key loads
    into the base's head, which is the base's ``wte`` itself.

    Which HF module holds a weight of ours is found by converting (weightsmith.ship.hf_convert.ours_to_hf)
    with that one weight set to NaN: the HF tensors that turn NaN are where it goes. peft saves whole
    modules, so every such tensor must be NaN throughout and every tensor of its HF module must come
    from ``names``.

    Raises:
        ConfigError: a weight with no HF counterpart, one that is part of a fused HF tensor (GPT-2's
            ``c_attn`` holds q, k and v), or an HF module only partly selected.
    """
    import torch

    from weightsmith.ship.hf_convert import ours_to_hf

    _, hf_sd, arch = ours_to_hf(cfg, state_dict)
    own = [k for k in state_dict if any(k.startswith(n + ".") for n in names) and state_dict[k].is_floating_point()]
    if cfg.tie_embeddings:  # the tied head is the embedding itself
        own = list(dict.fromkeys("tok_emb.weight" if k == "lm_head.weight" else k for k in own))
    covered: set[str] = set()
    for key in own:
        marked = dict(state_dict)
        marked[key] = torch.full_like(state_dict[key], float("nan"))
        _, hf_marked, _ = ours_to_hf(cfg, marked)
        touched = [h for h, t in hf_marked.items() if t.is_floating_point() and torch.isnan(t).any()]
        if not touched:
            raise ConfigError(f"adapter.train_modules: {key} has no counterpart in {arch}; export with --format hf")
        for h in touched:
            if not torch.isnan(hf_marked[h]).all():
                raise ConfigError(f"adapter.train_modules: {key} is only part of {h} in {arch}, and peft's "
                                  "modules_to_save holds whole modules; export with --format hf (merged)")
        covered.update(touched)
    modules = sorted({h.rsplit(".", 1)[0] for h in covered})
    partial = sorted(h for h in hf_sd if h.rsplit(".", 1)[0] in modules and h not in covered)
    if partial:
        raise ConfigError(f"adapter.train_modules covers only part of {sorted({h.rsplit('.', 1)[0] for h in partial})} "
                          f"in {arch} ({partial} stay frozen); select the whole module or export with --format hf")
    tensors = {h: hf_sd[h] for h in sorted(covered)}
    emb = "model.embed_tokens" if arch != "GPT2LMHeadModel" else "transformer.wte"
    tied = bool(cfg.tie_embeddings) and emb in modules
    if tied:
        tensors["lm_head.weight"] = tensors[f"{emb}.weight"].clone()  # safetensors stores no shared memory
    return tensors, modules, tied and arch != "GPT2LMHeadModel"
