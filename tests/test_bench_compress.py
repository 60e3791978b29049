"""bench/compress.py end to end at tiny size: both students, four pruning rows, the tables written."""

import importlib.util
import json
from pathlib import Path

from weightsmith.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_compress_bench_runs_at_tiny_size(tmp_path, tiny_corpus, cache_dir):
    spec = importlib.util.spec_from_file_location("compress", ROOT / "bench" / "compress.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    teacher = train("recipes/tiny.toml", [f"--data.corpus={tiny_corpus}", "--train.max_steps=8",
                                          "--sample.max_new_tokens=1"], out=tmp_path / "teacher", log=lambda *a: None)
    tiny = [f"--data.corpus={tiny_corpus}", "--data.tokenizer=byte", "--model.d_model=16", "--model.n_layers=1",
            "--model.n_heads=2", "--model.max_seq_len=32", "--train.batch_size=4", "--train.max_steps=3",
            "--train.eval_every=100", "--train.eval_tokens=256", "--sample.max_new_tokens=1"]
    stem = tmp_path / "results" / "compress"
    args = ["--teacher", str(teacher), "--root", str(tmp_path / "bench"), "--recovery-steps", "2",
            "--n-calibration", "4", "--results", str(stem)] + [f"--set={o}" for o in tiny]
    assert bench.main(args) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    assert [r["row"] for r in result["distillation"]] == ["student from scratch", "distilled student"]
    assert all(r["steps"] == 3 for r in result["distillation"])
    assert result["distillation"][1]["task"]["name"] == "distill"
    assert {(r["method"], r["sparsity"]) for r in result["pruning"]} == {
        (m, s) for m in ("magnitude", "wanda") for s in ("0.5", "2:4")}
    assert all(r["block_linear_sparsity"] == 0.5 for r in result["pruning"])
    assert "| wanda | 2:4 |" in stem.with_suffix(".md").read_text()
