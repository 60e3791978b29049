"""Pruning: exact per-row sparsity, the 2:4 pattern, Wanda and magnitude masks against naive references,
sparsity 0 is the identity, and the `prune` CLI writes a run whose val_bpb before/after is recorded."""

import json

import pytest
import torch
from torch import nn

from weightsmith.cli import main
from weightsmith.errors import ConfigError
from weightsmith.registry import create_model
from weightsmith.ship.prune import (
    parse_sparsity,
    prunable_linears,
    prune_model,
    wanda_scores,
)
from weightsmith.train.checkpoint import load_run
from weightsmith.train.loop import train


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return create_model("gpt", vocab_size=23, d_model=24, n_layers=2, n_heads=2, max_seq_len=16).eval()


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.75])
def test_unstructured_sparsity_is_exact_per_row_and_equals_topk_reference(sparsity):
    model = tiny_gpt()
    ref = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model)}
    masks = prune_model(model, "magnitude", sparsity)
    for name, lin in prunable_linears(model):
        W = ref[name]
        K = W.shape[1]
        k = int(sparsity * K)
        assert ((lin.weight == 0).sum(1) == k).all(), name  # exact per row
        # reference: zero the k smallest |w| of each row with torch.topk
        expect = W.clone()
        expect.scatter_(1, W.abs().topk(k, dim=1, largest=False).indices, 0.0)
        assert torch.equal(lin.weight, expect)
        assert torch.equal(masks[f"{name}.weight"], expect != 0)


def test_two_four_pattern_holds_and_keeps_the_two_largest():
    model = tiny_gpt(1)
    ref = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model)}
    prune_model(model, "magnitude", "2:4")
    for name, lin in prunable_linears(model):
        W = lin.weight.reshape(lin.out_features, -1, 4)
        assert ((W == 0).sum(-1) == 2).all(), name
        R = ref[name].reshape_as(W)
        for r in range(W.shape[0]):
            for g in range(W.shape[1]):
                kept = sorted(range(4), key=lambda j: -abs(float(R[r, g, j])))[:2]
                assert sorted(int(j) for j in (W[r, g] != 0).nonzero()) == sorted(kept)


def naive_wanda(W, X, sparsity):
    """Loops: score_ij = |W_ij| * sqrt(sum_t X_tj^2); per row zero the floor(s K) smallest scores."""
    N, K = W.shape
    norms = [sum(float(X[t, j]) ** 2 for t in range(X.shape[0])) ** 0.5 for j in range(K)]
    out = W.clone()
    for i in range(N):
        scores = [(abs(float(W[i, j])) * norms[j], j) for j in range(K)]
        for _, j in sorted(scores)[:int(sparsity * K)]:
            out[i, j] = 0.0
    return out


class OneBlock(nn.Module):
    """A one-linear 'model' with .blocks, fed real-valued inputs: forward(x (B, T, K))."""

    def __init__(self, K=12, N=5):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(K, N, bias=False))])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_wanda_mask_equals_a_naive_hand_computation(sparsity):
    torch.manual_seed(0)
    model = OneBlock()
    # input features on very different scales, so wanda and magnitude disagree
    X = torch.randn(3, 7, 12) * torch.logspace(-1, 1, 12)
    W = model.blocks[0][0].weight.detach().clone()
    prune_model(model, "wanda", sparsity, X)
    got = model.blocks[0][0].weight
    flat = X.reshape(-1, 12)
    if sparsity == 0.5:
        assert torch.equal(got, naive_wanda(W, flat, 0.5))
    else:
        expect = W.clone()
        scores = wanda_scores(W, flat.pow(2).sum(0))
        for i in range(5):
            for g in range(3):
                order = sorted(range(4), key=lambda j: float(scores[i, 4 * g + j]))
                for j in order[:2]:
                    expect[i, 4 * g + j] = 0
        assert torch.equal(got, expect)
    magnitude = OneBlock()
    magnitude.load_state_dict({"blocks.0.0.weight": W})
    prune_model(magnitude, "magnitude", sparsity)
    assert not torch.equal(got, magnitude.blocks[0][0].weight)  # the activations changed the choice


def test_wanda_on_a_gpt_sees_the_pruned_earlier_blocks():
    model = tiny_gpt(2)
    calib = torch.randint(23, (4, 16), generator=torch.Generator().manual_seed(0))
    masks = prune_model(model, "wanda", 0.5, calib)
    assert set(masks) == {f"{n}.weight" for n, _ in prunable_linears(model)}
    for _, lin in prunable_linears(model):
        assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()
    assert model.tok_emb.weight.ne(0).all() and model.lm_head.weight.ne(0).all()  # embeddings/head untouched


def test_sparsity_zero_leaves_outputs_equal():
    model = tiny_gpt(3)
    x = torch.randint(23, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(x)
    for method in ("magnitude", "wanda"):
        prune_model(model, method, 0.0, x)
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("bad", ["0.5x", "1.0", "-0.1", "3:4"])
def test_bad_sparsity_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="--sparsity"):
        parse_sparsity(bad)


def test_prune_cli_writes_a_run_with_val_bpb_before_and_after(tmp_path, tiny_corpus, cache_dir, capsys):
    run = train("recipes/tiny.toml", [f"--data.corpus={tiny_corpus}", "--train.max_steps=10",
                                      "--sample.max_new_tokens=1"], out=tmp_path / "run", log=lambda *a: None)
    out = tmp_path / "pruned"
    assert main(["prune", str(run), "--method", "wanda", "--sparsity", "2:4", "--n-calibration", "8",
                 "--out", str(out)]) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["block_linear_sparsity"] == 0.5 and report["before"]["val_bpb"] > 0
    assert report["after"]["val_bpb"] != report["before"]["val_bpb"]
    pruned = load_run(out)
    for _, lin in prunable_linears(pruned.model):
        assert ((lin.weight.reshape(lin.out_features, -1, 4) == 0).sum(-1) == 2).all()
    capsys.readouterr()
    assert main(["prune", str(run), "--method", "wanda", "--sparsity", "2:4", "--out", str(out)]) == 2
    assert main(["prune", str(run), "--method", "magnitude", "--sparsity", "0.9.", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err) and "--sparsity" in err[1]


def test_sparse_finetune_keeps_the_zeros_and_plain_finetune_does_not(tmp_path, tiny_corpus, cache_dir):
    args = [f"--data.corpus={tiny_corpus}", "--sample.max_new_tokens=1"]
    run = train("recipes/tiny.toml", [*args, "--train.max_steps=10"], out=tmp_path / "run", log=lambda *a: None)
    from weightsmith.ship.prune import prune_run

    prune_run(run, "magnitude", 0.5, tmp_path / "pruned", measure=False, log=lambda *a: None)
    pruned = {n: lin.weight.detach().clone() for n, lin in prunable_linears(load_run(tmp_path / "pruned").model)}
    ft = [*args, "--train.max_steps=4", "--train.lr=1e-2", f"--train.init_from={tmp_path / 'pruned'}"]
    kept = train("recipes/tiny.toml", [*ft, "--task.name=sparse-finetune"], out=tmp_path / "kept", log=lambda *a: None)
    plain = train("recipes/tiny.toml", ft, out=tmp_path / "plain", log=lambda *a: None)
    for name, lin in prunable_linears(load_run(kept).model):
        zero = pruned[name] == 0
        assert (lin.weight[zero] == 0).all(), name  # zeros stay zeros
        assert not torch.equal(lin.weight[~zero], pruned[name][~zero])  # the rest trained
    assert any((lin.weight[pruned[n] == 0] != 0).any() for n, lin in prunable_linears(load_run(plain).model))
