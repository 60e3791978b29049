"""DPO and SFT: the loss against a hand computation, invariants of its gradient, the checkable property
and the pairs built from a corpus, and short runs of both tasks (exact resume, eval.json)."""

import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from weightsmith.data.preference import (
    SPEAKER,
    PreferenceDataConfig,
    PreferencePair,
    break_join,
    break_lowercase,
    build_pairs,
    build_splits,
    has_property,
)
from weightsmith.data.tokenizers import ByteTokenizer
from weightsmith.errors import ConfigError, DataError
from weightsmith.eval.run import evaluate_run
from weightsmith.registry import create_model
from weightsmith.tasks import get_task
from weightsmith.tasks.preference import DPO, SFT, DPOConfig, PreferenceConfig, collate, dpo_loss, sequence_logprobs
from weightsmith.train.checkpoint import list_checkpoints
from weightsmith.train.loop import train

QUIET = dict(log=lambda *a: None)
VERSE = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
         "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n")


# ------------------------------------------------------------------------------------------ the property

def test_has_property_exact_cases():
    assert has_property(VERSE)
    assert has_property("HAMLET.\n[Aside.] To be, or not to be\n\n'Tis so.\n")  # heading, direction, blank
    assert has_property("")
    assert not has_property("Made glorious summer\nby this sun of York;\n")  # a line starts lowercase
    assert not has_property("x" * 81)
    assert has_property("X" * 80)
    assert has_property("X" * 81, max_line_chars=81)
    assert not has_property(break_lowercase(VERSE)) and not has_property(break_join(VERSE))
    assert break_lowercase(VERSE).lower() == VERSE.lower() and break_join(VERSE).split() == VERSE.split()


def test_property_is_prefix_closed():
    rng = random.Random(0)
    texts = [VERSE, break_lowercase(VERSE), break_join(VERSE), "A\nb\nC" * 30]
    for t in texts:
        for _ in range(50):
            cut = rng.randint(0, len(t))
            assert has_property(t[:cut]) or not has_property(t)  # property(t) => property(prefix)


@pytest.fixture(scope="module")
def verse_corpus(tmp_path_factory):
    """Speeches of capitalised verse lines with some wrapped lowercase prose, deterministic."""
    rng = random.Random(1)
    words = "the king queen lord love death night day sword crown heart blood fair sweet good my thy".split()
    out = []
    for _ in range(400):
        out.append(rng.choice(["HAMLET.", "FIRST MURDERER.", "OPHELIA."]))
        prose = rng.random() < 0.3
        for j in range(rng.randint(3, 6)):
            line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 7)))
            out.append(line if prose and j else line.capitalize())
        out.append("")
    path = tmp_path_factory.mktemp("verse") / "verse.txt"
    path.write_text("\n".join(out))
    return path


def test_pairs_have_the_property_and_the_rejected_do_not(verse_corpus):
    tok = ByteTokenizer()
    cfg = PreferenceDataConfig(prompt_tokens=24, max_continuation_tokens=120, max_train_pairs=0, max_val_pairs=0)
    text = verse_corpus.read_text()
    train_pairs, val_pairs = build_splits(text, tok, cfg)
    assert len(train_pairs) > 100 and len(val_pairs) > 10
    for p in train_pairs + val_pairs:
        assert len(p.prompt) == 24 and tok.decode(p.prompt).endswith("\n")
        assert 0 < len(p.chosen) <= 120 and 0 < len(p.rejected) <= 120
        good, bad = tok.decode(p.chosen), tok.decode(p.rejected)
        assert has_property(good) and not has_property(bad) and good.count("\n") >= 2
        assert good in text  # the true continuation, verbatim
        assert bad == (break_lowercase(good) if p.kind == "lowercase" else break_join(good))[:len(p.rejected)]
        prev = tok.decode(p.prompt).split("\n")[-2]
        assert prev.strip() and not SPEAKER.match(prev)  # the prompt ends inside a speech
    assert {p.kind for p in train_pairs} == {"lowercase", "join"}
    # held out: every held-out prompt+continuation comes from the last 10% of the text
    cut = (9 * len(text)) // 10
    for p in val_pairs:
        assert text.find(tok.decode(p.prompt + p.chosen), cut - 24) >= cut - 24
    assert build_pairs(text, tok, cfg, limit=0) == build_pairs(text, tok, cfg, limit=0)  # deterministic
    assert len(build_pairs(text, tok, cfg, limit=7)) == 7


def test_no_pairs_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no preference pair"):
        build_splits("all lowercase prose\nwith no verse at all\n" * 100, ByteTokenizer(), PreferenceDataConfig())


@pytest.mark.parametrize("cls,field,value", [(DPOConfig, "beta", 0.0), (DPOConfig, "beta", -1.0),
                                             (PreferenceConfig, "prompt_tokens", 0),
                                             (PreferenceConfig, "max_train_pairs", -1),
                                             (PreferenceConfig, "sample_temperature", 0.0)])
def test_config_rejects_impossible_values(cls, field, value):
    with pytest.raises(ConfigError, match=f"task.{field}"):
        cls(**{field: value})


# ------------------------------------------------------------------------------------------ the loss

def _tiny(seed):
    torch.manual_seed(seed)
    return create_model("gpt", vocab_size=11, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)


def _pairs(seed, n=3):
    g = random.Random(seed)
    return [PreferencePair([g.randrange(11) for _ in range(5)], [g.randrange(11) for _ in range(g.randint(2, 4))],
                           [g.randrange(11) for _ in range(g.randint(1, 5))], "lowercase") for _ in range(n)]


def naive_logprob(model, prompt, cont):
    """sum_t log p(cont[t] | prompt + cont[:t]), one forward per token, math.log of a softmax."""
    total = 0.0
    for t in range(len(cont)):
        ctx = torch.tensor([prompt + cont[:t]])
        row = [float(v) for v in model(ctx)[0, -1]]
        total += row[cont[t]] - math.log(sum(math.exp(v) for v in row))
    return total


def test_sequence_logprobs_and_loss_equal_a_naive_loop():
    pol, ref = _tiny(0), _tiny(1)
    pairs = _pairs(2)
    ids, mask = collate(pairs, "cpu")
    with torch.no_grad():
        pi = sequence_logprobs(pol(ids[:, :-1]), ids, mask)
        rf = sequence_logprobs(ref(ids[:, :-1]), ids, mask)
        hand_pi = [naive_logprob(pol, p.prompt, getattr(p, c)) for c in ("chosen", "rejected") for p in pairs]
        hand_rf = [naive_logprob(ref, p.prompt, getattr(p, c)) for c in ("chosen", "rejected") for p in pairs]
    assert pi.tolist() == pytest.approx(hand_pi, abs=1e-4)
    assert rf.tolist() == pytest.approx(hand_rf, abs=1e-4)
    beta, n = 0.3, len(pairs)
    loss, parts = dpo_loss(pi[:n], pi[n:], rf[:n], rf[n:], beta)
    hand = [beta * ((hand_pi[i] - hand_rf[i]) - (hand_pi[n + i] - hand_rf[n + i])) for i in range(n)]
    assert float(loss) == pytest.approx(sum(math.log(1 + math.exp(-m)) for m in hand) / n, abs=1e-5)
    assert parts["margin"].tolist() == pytest.approx(hand, abs=1e-5)
    # the task's loss (policy and reference forwards on the collated batch) is the same number
    task = DPO.for_contract_tests()
    task.cfg, task.reference = DPOConfig(beta=beta), ref.eval()
    got, logged = task.loss(pol, (ids, mask))
    assert float(got.detach()) == pytest.approx(float(loss), abs=1e-6)
    assert logged["reward_margin"] == pytest.approx(sum(hand) / n, abs=1e-5)
    assert logged["reward_acc"] == pytest.approx(sum(m > 0 for m in hand) / n)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_at_init_loss_is_log2_and_gradient_is_half_beta_logprob_difference():
    pol, pairs = _tiny(0), _pairs(3, n=4)
    ids, mask = collate(pairs, "cpu")
    n = len(pairs)
    for beta in (0.1, 0.5):
        task = DPO.for_contract_tests()
        task.cfg = DPOConfig(beta=beta)
        loss, logged = task.loss(pol, (ids, mask))  # first call: the reference is a copy of pol
        assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
        assert logged["reward_margin"] == 0 and logged["reward_acc"] == 0
        g = _grads(pol, loss)
        lp = sequence_logprobs(pol(ids[:, :-1]), ids, mask)
        want = _grads(pol, -(beta / 2) * (lp[:n] - lp[n:]).mean())  # d/dm -log sig(m) = -1/2 at m = 0
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
        assert all(p.grad is None or not p.requires_grad for p in task.reference.parameters())


def test_gradient_is_zero_when_chosen_equals_rejected_and_swap_flips_margin():
    pol, ref = _tiny(0), _tiny(1)
    pairs = _pairs(4)
    same = [PreferencePair(p.prompt, p.chosen, p.chosen, p.kind) for p in pairs]
    task = DPO.for_contract_tests()
    task.cfg, task.reference = DPOConfig(beta=0.2), ref.eval().requires_grad_(False)
    loss, _ = task.loss(pol, collate(same, "cpu"))
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)  # margins cancel whatever the policy
    zero = _grads(pol, loss)
    swapped = [PreferencePair(p.prompt, p.rejected, p.chosen, p.kind) for p in pairs]
    loss_a, a = task.loss(pol, collate(pairs, "cpu"))
    assert zero.norm() < 1e-6 * _grads(pol, loss_a).norm()  # zero up to float32 rounding
    _, b = task.loss(pol, collate(swapped, "cpu"))
    assert a["reward_margin"] == pytest.approx(-b["reward_margin"], abs=1e-6)
    assert a["reward_chosen"] == pytest.approx(b["reward_rejected"], abs=1e-6)


def test_sft_loss_is_cross_entropy_on_the_continuation_only():
    pol, pairs = _tiny(0), _pairs(5)
    ids, mask = collate(pairs, "cpu", rejected=False)
    task = SFT.for_contract_tests()
    loss, _ = task.loss(pol, (ids, mask))
    rows = [torch.tensor(p.prompt + p.chosen) for p in pairs]
    ce = [F.cross_entropy(pol(r[None, :-1])[0, len(p.prompt) - 1:], r[len(p.prompt):], reduction="sum").detach()
          for r, p in zip(rows, pairs, strict=True)]
    assert float(loss.detach()) == pytest.approx(float(sum(ce)) / sum(len(p.chosen) for p in pairs), abs=1e-5)
    changed = [PreferencePair([(t + 1) % 11 for t in p.prompt[:-1]] + p.prompt[-1:], p.chosen, p.rejected, p.kind)
               for p in pairs]  # another prompt changes the loss: it conditions, though it is not a target
    other = task.loss(pol, collate(changed, "cpu", rejected=False))[0].detach()
    assert float(other) != pytest.approx(float(loss.detach()))


def test_tasks_are_registered_for_causal_lm_families():
    from weightsmith.tasks import task_for

    assert get_task("dpo") is DPO and get_task("sft") is SFT
    assert task_for("gpt", "dpo") is DPO
    assert "causal-lm" in DPO.also_trains


# ------------------------------------------------------------------------------------------ runs

def _args(corpus, task, steps, *extra):
    return [f"--data.corpus={corpus}", f"--task.name={task}", f"--train.max_steps={steps}",
            "--task.prompt_tokens=20", "--task.max_continuation_tokens=40", "--model.max_seq_len=64",
            "--task.eval_samples=6", "--task.eval_pairs=8", "--train.eval_every=3", "--train.ckpt_every=3",
            "--train.eval_batch_size=8", "--train.log_every=1", *extra]


@pytest.mark.parametrize("task", ["dpo", "sft"])
def test_run_writes_eval_and_resumes_exactly(tmp_path, cache_dir, verse_corpus, task):
    from safetensors.torch import load_file

    full = train("recipes/tiny.toml", _args(verse_corpus, task, 6), out=tmp_path / "full", **QUIET)
    result = json.loads((full / "eval.json").read_text())
    for key in ("pref_acc", "ref_pref_acc", "reward_acc", "property_rate", "ref_property_rate", "kl_to_ref"):
        assert 0 <= result[key] <= 1 or key == "kl_to_ref"
    assert result["kl_to_ref"] > 0  # six steps moved the policy
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    if task == "dpo":
        first = next(r for r in rows if "loss" in r)  # step 1: the policy is the reference
        assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["reward_margin"] == 0 and rows[-1]["reward_margin"] > 0
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["data"]["preference"]["val_pairs"] == result["heldout_pairs"]
    # back to the step-3 checkpoint and resumed: the same weights (the reference came from the checkpoint)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(list_checkpoints(cut)[-1])
    assert list_checkpoints(cut)[-1].name.endswith("3")
    train("recipes/tiny.toml", [], out=cut, resume=True, **QUIET)
    a = load_file(list_checkpoints(full)[-1] / "model.safetensors")
    b = load_file(list_checkpoints(cut)[-1] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cut / "eval.json").read_text())["kl_to_ref"] == pytest.approx(result["kl_to_ref"], rel=1e-5)
    # `weightsmith eval` rebuilds the task and finds the reference in the checkpoint: the same report
    again = evaluate_run(full)
    for key in ("kl_to_ref", "ref_property_rate", "ref_pref_acc", "property_rate", "ref_val_bpb"):
        assert again[key] == pytest.approx(result[key], rel=1e-5)


@pytest.mark.slow
def test_bench_runs_at_tiny_size(tmp_path, cache_dir, verse_corpus):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_dpo", "bench/dpo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sets = [a[2:] for a in _args(verse_corpus, "dpo", 4) if not a.startswith("--task.name")]
    out = tmp_path / "dpo.md"
    assert bench.main(["--init", "none", "--time", "60", "--dpo-recipe", "recipes/tiny.toml", "--sft-recipe",
                       "recipes/tiny.toml", "--workdir", str(tmp_path / "work"), "--out", str(out),
                       *[x for s in sets for x in ("--set", s)]]) == 0
    got = json.loads(out.with_suffix(".json").read_text())
    rows = got["results"]
    assert set(rows) == {"untouched", "sft", "dpo"} and rows["dpo"]["steps"] == rows["sft"]["steps"] == 4
    assert rows["untouched"]["property_rate"] == rows["dpo"]["ref_property_rate"] == rows["sft"]["ref_property_rate"]
    assert "| dpo |" in out.read_text() and "Bar (" in out.read_text()


def _has_init_from() -> bool:
    import dataclasses

    from weightsmith.train.config import TrainConfig

    return any(f.name == "init_from" for f in dataclasses.fields(TrainConfig))


@pytest.mark.skipif(not _has_init_from(), reason="train.init_from is not in TrainConfig yet")
def test_reference_is_the_init_run(tmp_path, cache_dir, verse_corpus):
    """Started from a trained run, the reference is that run's model: its held-out metrics and val_bpb
    are the init run's, and the policy's first step has loss log 2."""
    from weightsmith.train.checkpoint import load_run

    base = train("recipes/tiny.toml", [f"--data.corpus={verse_corpus}", "--train.max_steps=8",
                                       "--model.max_seq_len=64", "--sample.max_new_tokens=1"],
                 out=tmp_path / "base", **QUIET)
    run = train("recipes/tiny.toml", _args(verse_corpus, "dpo", 3, f"--train.init_from={base}"),
                out=tmp_path / "dpo", **QUIET)
    result = json.loads((run / "eval.json").read_text())
    assert result["ref_val_bpb"] == pytest.approx(json.loads((base / "eval.json").read_text())["val_bpb"], rel=1e-6)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    init = load_run(base).model.state_dict()
    after = load_run(run).model.state_dict()
    assert any(not torch.equal(init[k], after[k]) for k in init)  # the policy moved, the reference did not


def test_count_is_the_positions_read_and_cli_errors_are_one_line(tmp_path, cache_dir, verse_corpus, capsys):
    from weightsmith.cli import main

    pairs = _pairs(6)
    batch = collate(pairs, "cpu")
    assert DPO.for_contract_tests().count(batch) == sum(len(p.prompt) + len(c) - 1 for p in pairs
                                                        for c in (p.chosen, p.rejected))
    code = main(["train", "recipes/tiny.toml", "--out", str(tmp_path / "x"), f"--data.corpus={verse_corpus}",
                 "--task.name=dpo", "--task.beta=0"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "task.beta" in err and len(err.splitlines()) == 1


def test_kl_to_ref_equals_a_naive_sum_on_the_sampled_continuations():
    from weightsmith.ship.generate import generate

    torch.manual_seed(0)
    pol = create_model("gpt", vocab_size=256, d_model=16, n_layers=1, n_heads=2, max_seq_len=32).eval()
    ref = create_model("gpt", vocab_size=256, d_model=16, n_layers=1, n_heads=2, max_seq_len=32).eval()
    task = DPO.for_contract_tests()
    task.cfg = DPOConfig(max_continuation_tokens=5, eval_samples=3)
    task.train_cfg.eval_batch_size = 2
    task.data = type("D", (), {"tokenizer": ByteTokenizer()})()
    g = random.Random(0)
    task.val_pairs = [PreferencePair([g.randrange(256) for _ in range(4)], [65], [97], "lowercase") for _ in range(3)]
    task.reference = ref
    got, texts = task.sample_metrics(pol, "cpu")
    # the same samples, drawn again with the same generator, and the KL summed by hand
    gen = torch.Generator().manual_seed(task.cfg.seed)
    total, n, hits = 0.0, 0, 0
    for i in range(0, 3, 2):
        x = torch.tensor([p.prompt for p in task.val_pairs[i:i + 2]])
        seq = generate(pol, x, 5, temperature=1.0, generator=gen)
        with torch.no_grad():
            lp, lq = torch.log_softmax(pol(seq[:, :-1]), -1), torch.log_softmax(ref(seq[:, :-1]), -1)
        for b in range(seq.shape[0]):
            hits += has_property(ByteTokenizer().decode(seq[b, 4:].tolist()))
            for t in range(3, 8):  # the positions that predict the 5 continuation tokens
                total += sum(math.exp(lp[b, t, v]) * (float(lp[b, t, v]) - float(lq[b, t, v])) for v in range(256))
                n += 1
    assert got["kl_to_ref"] == pytest.approx(total / n, rel=1e-4) and got["kl_to_ref"] > 0
    assert got["property_rate"] == hits / 3 and len(texts) == 3
    task.reference = pol
    assert task.sample_metrics(pol, "cpu")[0]["kl_to_ref"] == pytest.approx(0.0, abs=1e-6)
