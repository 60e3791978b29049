"""Bits per byte of GGUF exports (q8_0, q4_0, ...) run in llama.cpp, on a run's validation split.

    python bench/gguf_bpb.py RUN_DIR [--dtypes q8_0 q4_0 f32] [--max-tokens N] [--out FILE]

Each dtype is exported with ``weightsmith.ship.export.export_run`` into a temporary directory and loaded
in real llama.cpp through llama-cpp-python. The validation tokens come from the run's prepared data
(``weightsmith.data.prepare``, cached under ``$WEIGHTSMITH_CACHE``). The stream is cut into windows
exactly as ``weightsmith.eval.metrics`` does (``seq_len + 1`` tokens overlapping by one, each window a
fresh context), so every token but the first is predicted once; bits per byte = summed nats /
(ln 2 * UTF-8 bytes of the predicted tokens). Our own PyTorch float32 model is evaluated on the same
tokens as the reference. Results go to ``bench/results/gguf_bpb-<run name>.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def llama_stream_loss(model_path: Path, tokens: np.ndarray, seq_len: int) -> tuple[float, int]:
    """(sum of nats, predicted tokens) of llama.cpp over ``tokens`` in metrics.window_starts windows."""
    from llama_cpp import Llama

    from weightsmith.eval.metrics import window_starts

    llm = Llama(model_path=str(model_path), n_ctx=max(seq_len, 256), n_batch=max(seq_len, 256),
                logits_all=True, verbose=False, n_threads=2)
    total, count, n = 0.0, 0, len(tokens)
    for s in window_starts(n, seq_len):
        chunk = [int(t) for t in tokens[s:min(s + seq_len + 1, n)]]
        x, y = chunk[:-1], np.asarray(chunk[1:])
        llm.reset()
        llm.eval(x)
        logits = np.asarray(llm.scores[:len(x)], dtype=np.float64)  # (T, V)
        logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        total += float((logz - logits[np.arange(len(y)), y]).sum())
        count += len(y)
    llm.close()
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--dtypes", nargs="+", default=["f32", "q8_0", "q4_0"])
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N+1 validation tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from weightsmith.config import from_dict
    from weightsmith.data.prepare import DataConfig, prepare
    from weightsmith.eval.metrics import bits_per_byte, stream_loss
    from weightsmith.ship.export import export_run
    from weightsmith.train.checkpoint import load_run

    torch.set_num_threads(2)
    run_dir = Path(args.run_dir)
    run = load_run(run_dir)
    data = prepare(from_dict(DataConfig, run.config["data"], "data"), log=lambda *a: None)
    seq_len = run.config.get("train", {}).get("seq_len") or run.model.config.max_seq_len
    tokens = np.asarray(data.val if args.max_tokens is None else data.val[:args.max_tokens + 1])
    lengths = np.array([len(b) for b in run.tokenizer.token_bytes()])
    n_bytes = int(lengths[tokens[1:]].sum())

    results = {}
    t0 = time.perf_counter()
    nats, count, _ = stream_loss(run.model, tokens, seq_len)
    results["torch_f32"] = {"val_bpb": bits_per_byte(nats, n_bytes), "val_loss": nats / count,
                            "seconds": round(time.perf_counter() - t0, 2)}
    with tempfile.TemporaryDirectory(prefix="gguf_bpb-") as tmp:
        for dtype in args.dtypes:
            out = export_run(run_dir, "gguf", Path(tmp) / dtype, dtype)
            t0 = time.perf_counter()
            nats, count = llama_stream_loss(out / "model.gguf", tokens, seq_len)
            results[f"llamacpp_{dtype}"] = {
                "val_bpb": bits_per_byte(nats, n_bytes), "val_loss": nats / count,
                "file_bytes": (out / "model.gguf").stat().st_size,
                "seconds": round(time.perf_counter() - t0, 2)}
            print(f"{dtype:6s} bpb {results[f'llamacpp_{dtype}']['val_bpb']:.4f}", flush=True)
    print(f"torch  bpb {results['torch_f32']['val_bpb']:.4f}")

    import llama_cpp

    report = {"run_dir": str(run_dir.resolve()), "checkpoint": run.checkpoint.name,
              "model": {k: v for k, v in run.config["model"].items()}, "tokenizer": run.tokenizer.kind,
              "seq_len": seq_len, "val_tokens": int(len(tokens) - 1), "val_bytes": n_bytes,
              "bits_per_byte_definition": "sum nats / (ln 2 * UTF-8 bytes of predicted tokens)",
              "results": results, "llama_cpp_python": llama_cpp.__version__,
              "torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()}
    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gguf_bpb-{run_dir.name}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp_path.write_text(json.dumps(report, indent=2) + "\n")
    tmp_path.replace(out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
