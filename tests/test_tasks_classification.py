"""The classification task through the generic trainer, on an image folder the test draws itself."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from weightsmith.errors import ConfigError
from weightsmith.recipe import recipe_from_tree
from weightsmith.tasks.classification import expected_calibration_error, most_confused
from weightsmith.train.checkpoint import list_checkpoints
from weightsmith.train.loop import run_training


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes of 12x12 grayscale PNGs: horizontal bars, vertical bars, a centred square; with noise."""
    root = tmp_path_factory.mktemp("images") / "shapes"
    rng = np.random.default_rng(0)
    for name in ("hbars", "vbars", "square"):
        (root / name).mkdir(parents=True)
        for i in range(70):
            img = rng.integers(0, 60, (12, 12))
            if name == "hbars":
                img[::3, :] += 180
            elif name == "vbars":
                img[:, ::3] += 180
            else:
                img[3:9, 3:9] += 180
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(root / name / f"{i:03d}.png")
    return root


def _tree(folder, **train):
    return {"data": {"source": str(folder), "augment": True, "crop_padding": 1},
            "model": {"family": "mlp", "n_layers": 1, "d_hidden": 32, "dropout": 0.1},
            "train": {"batch_size": 16, "max_steps": 40, "warmup_steps": 2, "lr": 3e-3, "eval_every": 20,
                      "ckpt_every": 20, "log_every": 1, "eval_batch_size": 64, **train}}


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_classifier_trains_and_reports(tmp_path, folder, cache_dir):
    run = run_training(recipe_from_tree(_tree(folder)), tmp_path / "run", log=lambda *a: None)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["test_acc"] >= 0.9 and ev["val_acc"] >= 0.9  # chance is 1/3
    assert set(ev["test_per_class_acc"]) == {"hbars", "square", "vbars"}
    conf = json.loads((run / "confusion.json").read_text())
    m = np.array(conf["matrix"])
    assert m.sum() == ev["test_images"] and np.trace(m) / m.sum() == pytest.approx(ev["test_acc"])
    assert (run / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"images", "img_per_s", "train_acc"} <= set(rows[0]) and rows[0]["images"] == 16
    assert any("val_acc" in r for r in rows)
    assert json.loads((run / "mfu.json").read_text())["flops_per_image"] > 0
    labels = json.loads((run / "labels.json").read_text())
    assert labels["class_names"] == ["hbars", "square", "vbars"] and labels["image_size"] == 12

    from weightsmith.ship.predict import predict_images

    out = predict_images(run, [str(folder / "vbars" / "000.png"), str(folder / "square" / "001.png")], top_k=2)
    assert [o["top"][0][0] for o in out] == ["vbars", "square"]
    assert all(len(o["top"]) == 2 and o["top"][0][1] >= o["top"][1][1] for o in out)

    from weightsmith.eval.run import evaluate_run

    again = evaluate_run(run)
    assert again["test_acc"] == ev["test_acc"] and again["checkpoint"] == "step_000040"


def test_resume_is_exact_with_augmentation_and_dropout(tmp_path, folder, cache_dir):
    ref = run_training(recipe_from_tree(_tree(folder)), tmp_path / "ref", log=lambda *a: None)
    # the same run as if killed right after its step-20 checkpoint: later checkpoints and log lines gone
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    for ckpt in list_checkpoints(run):
        if ckpt.name != "step_000020":
            shutil.rmtree(ckpt)
    run_training(recipe_from_tree(_tree(folder)), run, resume=True, log=lambda *a: None)
    assert len(_losses(ref)) == 40
    assert _losses(run) == _losses(ref)  # bit-identical: batch order, crops, flips and dropout all restored


def test_model_fields_that_contradict_the_data_are_one_line_errors(tmp_path, folder, cache_dir):
    tree = _tree(folder)
    tree["model"]["image_size"] = 28
    with pytest.raises(ConfigError, match="model.image_size=28 but the data has image_size=12"):
        run_training(recipe_from_tree(tree), tmp_path / "run", log=lambda *a: None)


def test_ece_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(500, 4, generator=g).softmax(-1)
    labels = torch.randint(4, (500,), generator=g)
    conf, pred = probs.max(-1)
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        sel = [i for i in range(500) if lo <= conf[i] < hi]
        if sel:
            acc = sum(int(pred[i] == labels[i]) for i in sel) / len(sel)
            ece += len(sel) / 500 * abs(acc - sum(float(conf[i]) for i in sel) / len(sel))
    assert expected_calibration_error(probs, labels) == pytest.approx(ece, abs=1e-6)


def test_most_confused_pairs():
    m = np.array([[5, 3, 0], [0, 4, 7], [1, 0, 2]])
    assert most_confused(m, ["a", "b", "c"], n=2) == [{"true": "b", "predicted": "c", "count": 7},
                                                      {"true": "a", "predicted": "b", "count": 3}]


@pytest.mark.parametrize("family", ["mlp", "resnet", "convnext", "vit"])
def test_classifier_onnx_export_matches_torch(tmp_path, family):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from weightsmith.registry import get_family, model_from_config
    from weightsmith.ship.export_onnx import export_onnx_classifier

    cfg = get_family(family).config_cls()
    torch.manual_seed(0)
    model = model_from_config(family, cfg)
    model.train()
    model(torch.randn(8, cfg.in_channels, cfg.image_size, cfg.image_size))  # move BatchNorm statistics off init
    model.eval()
    path = export_onnx_classifier(model, {"class_names": [str(i) for i in range(cfg.n_classes)]}, tmp_path)
    x = torch.randn(5, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(str(path)).run(["logits"], {"images": x.numpy()})[0]
    assert got.shape == ref.shape == (5, cfg.n_classes)
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert json.loads((tmp_path / "labels.json").read_text())["class_names"][0] == "0"


def test_classifier_run_exports_to_onnx_only(tmp_path, folder, cache_dir):
    pytest.importorskip("onnxruntime")
    from weightsmith.errors import ConfigError as CE
    from weightsmith.ship.export import export_run

    tree = _tree(folder, max_steps=4)
    run = run_training(recipe_from_tree(tree), tmp_path / "run", log=lambda *a: None)
    out = export_run(run, "onnx", tmp_path / "onnx")
    assert (out / "model.onnx").is_file() and (out / "labels.json").is_file()
    with pytest.raises(CE, match="onnx only"):
        export_run(run, "hf", tmp_path / "hf")
