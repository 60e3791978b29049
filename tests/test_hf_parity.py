"""Parity with Hugging Face transformers: build a tiny random HF model, convert it with the production
converter, and compare fp32 outputs; and the reverse export (ours -> HF) for the gpt family."""

import dataclasses
import json

import pytest
import torch

tr = pytest.importorskip("transformers")

from weightsmith.errors import ConfigError  # noqa: E402
from weightsmith.registry import create_model, model_from_config  # noqa: E402
from weightsmith.ship.hf_convert import hf_to_ours, load_hf_checkpoint, ours_to_hf  # noqa: E402

V = 53  # distinct sizes: vocab 53, d_model 40, 4 heads of 10, 2 kv heads, d_ff 56, T 9, B 2


def _convert(hf_model):
    family, cfg, sd = hf_to_ours(hf_model.config.to_dict(), hf_model.state_dict())
    model = model_from_config(family, cfg)
    model.load_state_dict(sd, strict=True)
    return family, cfg, model.eval()


def _ids(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_gpt2_parity():
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=V, n_embd=40, n_layer=2, n_head=4, n_positions=16,
                                          bos_token_id=0, eos_token_id=0)).eval()
    family, cfg, ours = _convert(hf)
    assert family == "gpt" and cfg.pos == "learned" and cfg.tie_embeddings
    x = _ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits)


@pytest.mark.parametrize("bias, tie", [(False, False), (True, True)])
def test_llama_parity(bias, tie):
    hf = tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=V, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rope_theta=500.0, attention_bias=bias, mlp_bias=bias,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)).eval()
    _, cfg, ours = _convert(hf)
    assert cfg.n_kv_heads == 2 and cfg.rope_theta == 500.0 and cfg.bias == bias
    x = _ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits)


def test_mixtral_parity():
    hf = tr.MixtralForCausalLM(tr.MixtralConfig(
        vocab_size=V, hidden_size=40, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=32,
        bos_token_id=1, eos_token_id=2)).eval()
    _, cfg, ours = _convert(hf)
    assert cfg.n_experts == 5 and cfg.n_experts_per_token == 2
    x = _ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits)


def test_bert_parity_with_padding_and_token_types():
    hf = tr.BertModel(tr.BertConfig(vocab_size=V, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=56, max_position_embeddings=32, type_vocab_size=3)).eval()
    _, cfg, ours = _convert(hf)
    assert cfg.gelu == "erf" and cfg.pooler and cfg.n_token_types == 3
    x, types = _ids(2, 9), _ids(2, 9, seed=1) % 3
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        hidden, pooled = ours(x, token_types=types, padding_mask=mask)
        ref = hf(x, token_type_ids=types, attention_mask=mask.long())
    torch.testing.assert_close(hidden[mask], ref.last_hidden_state[mask])  # padded positions are don't-care
    torch.testing.assert_close(pooled, ref.pooler_output)


@pytest.mark.parametrize("ff, tie", [("relu", True), ("gated-gelu", False)])
def test_t5_parity(ff, tie):
    """relu + tied + d_model^-0.5 output scaling is T5 v1.0; gated-gelu untied is v1.1."""
    hf = tr.T5ForConditionalGeneration(tr.T5Config(
        vocab_size=V, d_model=40, d_kv=7, d_ff=56, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj=ff,
        tie_word_embeddings=tie, decoder_start_token_id=0)).eval()
    _, cfg, ours = _convert(hf)
    assert cfg.d_head == 7 and cfg.n_decoder_layers == 3 and cfg.tie_embeddings == tie
    src, tgt = _ids(2, 21), _ids(2, 19, seed=1)  # longer than max_exact: log-spaced buckets are used
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, 15:] = False
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
        torch.testing.assert_close(ours(src, tgt, src_mask=mask), ref)


# ---------------------------------------------------------------------------------------------------
# ours -> HF

ROUND_TRIP = {
    "gpt2-style": dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True),
    "gpt2-style-no-bias": dict(norm="layernorm", mlp="gelu", pos="learned", bias=False, tie_embeddings=False),
    "llama-style": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_heads=2, tie_embeddings=False),
    "llama-style-bias-tied": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=True, tie_embeddings=True),
    "mixtral-style": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_heads=2, n_experts=3,
                          n_experts_per_token=2, tie_embeddings=False),
}


@pytest.mark.parametrize("key", sorted(ROUND_TRIP))
def test_ours_to_hf_round_trip(key):
    ours = create_model("gpt", vocab_size=V, d_model=40, n_layers=2, n_heads=4, d_ff=56, max_seq_len=16,
                        rope_theta=321.0, **ROUND_TRIP[key]).eval()
    hf_config, hf_sd, arch = ours_to_hf(ours.config, ours.state_dict())
    assert hf_config["architectures"] == [arch]
    config_cls = getattr(tr, arch).config_class
    hf = getattr(tr, arch)(config_cls(**json.loads(json.dumps(hf_config)))).eval()  # survives config.json
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if ours.config.tie_embeddings else set())
    x = _ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x))
    # and back again: the same config (GPT-2 has no rope_theta; a bias-free one comes back with zero biases)
    _, cfg_back, _ = hf_to_ours(hf.config.to_dict(), hf.state_dict())
    if ours.config.pos == "learned":
        cfg_back = dataclasses.replace(cfg_back, rope_theta=ours.config.rope_theta, bias=ours.config.bias)
    assert cfg_back == ours.config


@pytest.mark.parametrize("overrides, field", [
    (dict(norm="rmsnorm", mlp="gelu", pos="rope"), "model.mlp"),
    (dict(norm="rmsnorm", mlp="gelu", pos="learned"), "model.norm"),
    (dict(norm="layernorm", mlp="gelu", pos="learned", n_kv_heads=2), "model.n_kv_heads"),
    (dict(mlp="swiglu", pos="rope", n_experts=2, bias=True), "model.bias"),
])
def test_ours_to_hf_names_the_inexpressible_field(overrides, field):
    ours = create_model("gpt", device="meta", vocab_size=V, d_model=40, n_layers=1, n_heads=4, **overrides)
    with pytest.raises(ConfigError, match=field):
        ours_to_hf(ours.config, ours.state_dict())


# ---------------------------------------------------------------------------------------------------
# local checkpoint import

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_hf_checkpoint_directory(tmp_path, fmt):
    hf = tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=V, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)).eval()
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.to_json_file(tmp_path / "config.json")
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    family, cfg, ours = load_hf_checkpoint(tmp_path)
    assert ours.lm_head.weight is ours.tok_emb.weight  # tying survives the import
    x = _ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), hf(x).logits)


def test_load_hf_checkpoint_errors(tmp_path):
    from weightsmith.errors import CheckpointError

    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ConfigError, match="gpt_neox"):
        load_hf_checkpoint(tmp_path)
