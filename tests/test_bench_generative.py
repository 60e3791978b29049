"""bench/generative.py on tiny ddpm, flow-matching and vae runs (n = 32): the rows, their counts, FID / KID
equal to eval/fid.py's on the saved samples, incremental results and reruns that skip finished rows."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shapes_folder import draw_shapes

from weightsmith.errors import ConfigError
from weightsmith.recipe import recipe_from_tree
from weightsmith.train.loop import run_training

pytest.importorskip("torchmetrics")

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_generative", ROOT / "bench" / "generative.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import os

    os.environ.setdefault("WEIGHTSMITH_CACHE", str(tmp_path_factory.mktemp("cache")))
    folder = draw_shapes(tmp_path_factory.mktemp("images") / "shapes", n_per_class=120)  # 36 test images
    root = tmp_path_factory.mktemp("runs")
    train = {"batch_size": 8, "max_steps": 3, "warmup_steps": 1, "eval_every": 100, "ckpt_every": 100,
             "log_every": 1, "eval_batch_size": 64}
    data = {"source": str(folder), "image_size": 12}
    unet = {"family": "unet", "widths": [8, 16], "n_res_blocks": 1, "attn_resolutions": [6], "d_head": 8,
            "n_groups": 4}
    gen = {"n_samples": 3, "eval_images": 8, "sample_steps": 2}
    trees = {
        "clf": {"data": {"source": str(folder), "augment": False},
                "model": {"family": "mlp", "n_layers": 1, "d_hidden": 32}, "train": {**train, "max_steps": 30}},
        "ddpm": {"task": {"name": "ddpm", **gen}, "data": data, "model": unet, "train": train},
        "flow": {"task": {"name": "flow-matching", **gen}, "data": data, "model": unet, "train": train},
        "vae": {"task": {"name": "vae", "n_samples": 3, "eval_images": 8}, "data": data,
                "model": {"family": "vae", "widths": [8, 16], "d_latent": 4}, "train": train},
    }
    return {k: run_training(recipe_from_tree(t), root / k, log=lambda *a: None) for k, t in trees.items()}


def test_bench_rows_counts_and_fid_equal_eval_fid(runs, tmp_path):
    from weightsmith.eval.fid import conditional_accuracy, load_feature_extractor, sample_quality
    from weightsmith.ship.sample import open_generative_run

    bench = _bench()
    out = tmp_path / "gen"
    rc = bench.main(["--classifier", str(runs["clf"]), "--ddpm", str(runs["ddpm"]), "--flow", str(runs["flow"]),
                     "--vae", str(runs["vae"]), "--n", "32", "--ddpm-steps", "3", "--ddim-steps", "4",
                     "--flow-nfe", "4", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "generative.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["ddpm-ancestral", "ddim", "ddim-guided", "flow-euler", "flow-heun", "vae-prior"]
    # NFE: evaluations of the guided field per image; forwards: x2 with guidance (w = 2 by default)
    want = {"ddpm-ancestral": (3, 6), "ddim": (4, 4), "ddim-guided": (4, 8), "flow-euler": (4, 8),
            "flow-heun": (4, 8), "vae-prior": (1, 1)}
    assert {k: (r["nfe"], r["forwards"]) for k, r in rows.items()} == want

    feats = load_feature_extractor(runs["clf"])
    task, _ = open_generative_run(runs["ddpm"])
    task.setup(runs["ddpm"], resume=False, log=lambda *a: None)
    test, train = task.split("test")[0], task.split("train")[0]
    floor = sample_quality(train[:32], test, train, feats)
    assert result["floor"]["fid"] == pytest.approx(floor["fid_floor"], rel=1e-9)
    labels = np.arange(32) % 3  # balanced over the 3 classes
    for key, r in rows.items():
        samples = np.load(out / "samples" / f"{key}.npy")
        assert samples.shape == (32, 1, 12, 12) and samples.dtype == np.uint8
        q = sample_quality(samples, test, train, feats)
        for m in ("fid", "kid", "fid_floor", "kid_floor", "fid_over_floor"):
            assert r[m] == pytest.approx(q[m], rel=1e-9, abs=1e-12), (key, m)
        assert r["s_per_64"] > 0 and (out / f"{key}.png").is_file()
        if key == "vae-prior":  # unconditional
            assert r["conditional_accuracy"] is None and r["test_bpd"] == pytest.approx(
                json.loads((runs["vae"] / "eval.json").read_text())["test_bpd"])
        else:
            assert r["conditional_accuracy"] == pytest.approx(conditional_accuracy(samples, labels, feats))
    assert not np.array_equal(np.load(out / "samples" / "ddim.npy"), np.load(out / "samples" / "ddim-guided.npy"))
    md = (out / "generative.md").read_text()
    assert md.count("\n| ") == 1 + 1 + 6  # header, the floor, six methods
    assert "real vs real" in md and "DDIM 4 steps, eta=0, w=2" in md


def test_bench_is_deterministic_skips_finished_rows_and_checks_n(runs, tmp_path):
    bench = _bench()
    out = tmp_path / "gen"
    args = dict(classifier=runs["clf"], runs={"ddpm": None, "flow": runs["flow"], "vae": None}, n=32, out=out,
                flow_nfe=4, log=lambda *a: None)
    bench.run_bench(**args)
    first = json.loads((out / "generative.json").read_text())
    npy = out / "samples" / "flow-euler.npy"
    before = npy.stat().st_mtime_ns
    seen = []
    again = bench.run_bench(**{**args, "log": seen.append})
    assert npy.stat().st_mtime_ns == before and len(seen) == 2 and all("already" in s for s in seen)
    assert again["rows"] == first["rows"]
    (out / "generative.json").write_text(json.dumps({**first, "rows": first["rows"][:1]}))  # as if cut after row 1
    bench.run_bench(**args)
    redone = json.loads((out / "generative.json").read_text())["rows"]
    assert [r["key"] for r in redone] == ["flow-euler", "flow-heun"]
    assert redone[1]["fid"] == first["rows"][1]["fid"]  # same seed, same samples, same numbers
    with pytest.raises(ConfigError, match="n=32"):
        bench.run_bench(**{**args, "n": 16})
    forced = bench.run_bench(**{**args, "n": 16, "force": True})
    assert [r["fid_n"] for r in forced["rows"]] == [16, 16]
    with pytest.raises(ConfigError, match="flow-matching run"):
        bench.run_bench(**{**args, "runs": {"flow": runs["ddpm"]}, "force": True})


def test_sample_row_uses_the_library_sampler(runs):
    """A row's samples are exactly ImageGenerationTask.generate's for the same labels and generator."""
    from weightsmith.ship.sample import open_generative_run
    from weightsmith.tasks.generative import to_uint8

    bench = _bench()
    task, model = open_generative_run(runs["ddpm"])
    opts = {"sampler": "ddim", "steps": 2, "eta": 0.0, "guidance": 2.0}
    got, labels, _ = bench.sample_row(task, model, 5, opts, seed=4)
    with task.sampling_weights(model):
        want = to_uint8(task.generate(model, 5, torch.arange(5) % 3, torch.Generator().manual_seed(4), **opts))
    assert np.array_equal(got, want) and labels.tolist() == [0, 1, 2, 0, 1]
