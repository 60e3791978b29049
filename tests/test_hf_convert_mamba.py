"""Mamba-1 (family ``mamba``) <-> Hugging Face ``MambaForCausalLM``: fp32 logit parity both ways and the
config fields our model cannot express refused in one line.

Measured (transformers 5.23, torch CPU, these sizes): max |logit diff| HF -> ours 3.6e-7 (untied, biases)
and 6.0e-7 (tied, no biases); ours -> HF 1.5e-8 (untied) and 1.2e-7 (tied); the
tests assert 1e-4.
"""

import json

import pytest
import torch

from weightsmith.errors import ConfigError
from weightsmith.registry import create_model, resolve

tr = pytest.importorskip("transformers")

# distinct sizes: vocab 53, d_model 40, d_inner 80, state 7, conv 3, dt_rank 5
TINY = dict(vocab_size=53, d_model=40, n_layers=2, d_state=7, d_conv=3, dt_rank=5, chunk_size=8, max_seq_len=16)


def _hf_config(**kw):
    base = dict(vocab_size=53, hidden_size=40, num_hidden_layers=2, state_size=7, expand=2, conv_kernel=3,
                time_step_rank=5)
    return tr.MambaConfig(**{**base, **kw})


@pytest.mark.parametrize("tie, bias, conv_bias", [(False, True, True), (True, False, False)])
def test_hf_to_ours_parity(tmp_path, tie, bias, conv_bias):
    """A random HF MambaForCausalLM, saved and imported with load_hf_checkpoint: the same fp32 logits."""
    from weightsmith.ship.hf_convert import load_hf_checkpoint

    torch.manual_seed(0)
    hf = tr.MambaForCausalLM(_hf_config(tie_word_embeddings=tie, use_bias=bias, use_conv_bias=conv_bias)).eval()
    hf.save_pretrained(tmp_path)
    family, cfg, ours = load_hf_checkpoint(tmp_path)
    assert family == "mamba" and cfg.dt_rank == 5 and cfg.d_inner == 80 and cfg.tie_embeddings == tie
    x = torch.randint(0, 53, (2, 19))  # 2 scan blocks of 8 and a tail
    with torch.no_grad():
        diff = (ours.eval()(x) - hf(x).logits).abs().max().item()
    print(f"HF -> ours: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("tie", [False, True])
def test_ours_to_hf_parity(tmp_path, tie):
    """Ours exported (config.json + safetensors) and loaded by transformers' from_pretrained."""
    from safetensors.torch import save_file

    from weightsmith.ship.hf_convert_mamba import mamba_from_ours

    torch.manual_seed(0)
    ours = create_model("mamba", **TINY, tie_embeddings=tie, bias=not tie, conv_bias=tie).eval()
    hf_config, hf_sd = mamba_from_ours(ours.config, ours.state_dict())
    assert ("lm_head.weight" in hf_sd) != tie
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    hf = tr.MambaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 53, (2, 21))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    print(f"ours -> HF: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    with pytest.raises(ConfigError, match="mamba"):
        mamba_from_ours(resolve("gpt-tiny")[1], {})


@pytest.mark.parametrize("kw, field", [({"hidden_act": "gelu"}, "hidden_act"), ({"expand": 1.5}, "expand"),
                                       ({"intermediate_size": 64}, "intermediate_size")])
def test_hf_options_we_cannot_express_are_refused(kw, field):
    from weightsmith.ship.hf_convert_mamba import mamba_to_ours

    hf = {**_hf_config().to_dict(), **kw}
    with pytest.raises(ConfigError, match=f"^Mamba {field}=") as e:
        mamba_to_ours(hf, {})
    assert "\n" not in str(e.value)
