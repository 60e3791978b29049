"""bench/adapt.py end to end at tiny size: every row trains from the source (or from scratch), its
Milton and source-corpus bpb, trainable count and profiled peak are recorded, and the table is written."""

import importlib.util
import json
from pathlib import Path

from weightsmith.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_adapt_bench_runs_at_tiny_size(tmp_path, tiny_corpus, cache_dir):
    spec = importlib.util.spec_from_file_location("adapt", ROOT / "bench" / "adapt.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    target = tmp_path / "target.txt"  # another "domain": the tiny corpus with its lines reversed
    target.write_text("\n".join(reversed(Path(tiny_corpus).read_text().splitlines())) + "\n")
    data = ["--data.tokenizer=byte", "--data.vocab_size=256"]
    source = train("recipes/shakespeare.toml", [f"--data.corpus={tiny_corpus}", *data, "--train.max_steps=3",
                                                   "--train.batch_size=2", "--train.eval_tokens=256",
                                                   "--sample.max_new_tokens=1"],
                   out=tmp_path / "source", log=lambda *a: None)
    tiny = [*data, "--train.batch_size=2", "--train.eval_every=100", "--train.eval_tokens=256",
            "--sample.max_new_tokens=1"]
    stem = tmp_path / "results" / "adapt"
    args = ["--source", str(source), "--root", str(tmp_path / "bench"), "--time", "1", "--profile-steps", "1",
            "--source-corpus", str(tiny_corpus), "--target-corpus", str(target),
            "--results", str(stem)] + [f"--set={o}" for o in tiny]
    assert bench.main(args) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["untouched", "full fine-tune", "LoRA r8", "LoRA r32", "DoRA r8", "QLoRA r8",
                          "LoRA r8 + embedding", "LoRA r32 + embedding", "DoRA r8 + embedding",
                          "QLoRA r8 + embedding", "from scratch"]
    n = rows["from scratch"]["trainable_params"]
    assert rows["full fine-tune"]["trainable_params"] == n
    # rank r on every block linear: r (in + out) each, DoRA adds a magnitude per output row
    assert rows["LoRA r32"]["trainable_params"] == 4 * rows["LoRA r8"]["trainable_params"] < n
    assert rows["DoRA r8"]["trainable_params"] > rows["LoRA r8"]["trainable_params"]
    assert rows["QLoRA r8"]["trainable_params"] == rows["LoRA r8"]["trainable_params"]
    assert rows["QLoRA r8"]["adapter"]["method"] == "qlora"
    emb = rows["LoRA r8 + embedding"]  # the tied embedding (V x d_model) trains in full beside rank 8
    assert emb["adapter"]["train_modules"] == ["tok_emb"]
    from weightsmith.config import load_toml

    model = load_toml(source / "config.toml")["model"]
    for label in ("LoRA r8", "LoRA r32", "DoRA r8", "QLoRA r8"):
        with_emb = rows[f"{label} + embedding"]
        assert with_emb["adapter"]["train_modules"] == ["tok_emb"]
        assert with_emb["trainable_params"] == rows[label]["trainable_params"] + model["vocab_size"] * model["d_model"]
    # the frozen NF4 base and the missing optimizer state show in the profiled peak
    assert rows["QLoRA r8"]["train_peak_bytes"] < rows["LoRA r8"]["train_peak_bytes"] \
        < rows["full fine-tune"]["train_peak_bytes"]
    assert all(r["steps"] >= 1 for label, r in rows.items() if label != "untouched")
    # the untouched row is the source itself: its source-corpus bpb is the one its eval.json measured
    own = json.loads((source / "eval.json").read_text())["val_bpb"]
    assert abs(rows["untouched"]["shakespeare_val_bpb"] - own) < 1e-6
    assert "| LoRA r8 |" in stem.with_suffix(".md").read_text()
