"""``export --format hf`` of the state-space families: the directory loads in ``transformers`` with no
custom code (``AutoModelForCausalLM`` -> MambaForCausalLM / Mamba2ForCausalLM, ``AutoTokenizer``), its
fp32 logits equal ours, its tokenizer gives our ids, and f16/bf16 exports are the cast weights."""

from __future__ import annotations

import json

import pytest
import torch
from test_export_gguf_ssm import RUNS, make_run

from weightsmith.cli import main
from weightsmith.ship.export import export_run
from weightsmith.train.checkpoint import load_run

tr = pytest.importorskip("transformers")
NAMES = ["mamba2_bpe", "mamba_byte", "mamba_bpe"]


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    text = tiny_corpus.read_text()
    return {n: make_run(root, n, text, RUNS[n][0], RUNS[n][1], **RUNS[n][2]) for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_the_export_with_our_logits(name, runs, tmp_path):
    out = export_run(runs[name], "hf", tmp_path / "hf")
    run = load_run(runs[name])
    cfg = json.loads((out / "config.json").read_text())
    family = RUNS[name][0]
    assert cfg["architectures"] == [{"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}[family]]
    hf = tr.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = tr.AutoTokenizer.from_pretrained(out)
    text = "KING. The lord of all, é\n" * 3
    ids = run.tokenizer.encode(text)
    assert tok(text)["input_ids"] == ids and tok.decode(ids) == text
    x = torch.tensor([ids[:40]])
    with torch.no_grad():
        ours, theirs = run.model(x), hf(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_cli_export_hf_bf16(runs, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    assert main(["export", str(runs["mamba_bpe"]), "--format", "hf", "--dtype", "bf16", "--out", str(out)]) == 0
    sd = load_file(str(out / "model.safetensors"))
    ours = load_run(runs["mamba_bpe"]).model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    torch.testing.assert_close(sd["backbone.layers.1.mixer.x_proj.weight"],
                               ours["blocks.1.mixer.x_proj.weight"].to(torch.bfloat16), rtol=0, atol=0)
