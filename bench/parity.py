"""Logit parity of a run's exports with our PyTorch model: HF transformers, ONNX Runtime, llama.cpp.

    python bench/parity.py RUN_DIR [--windows 4] [--new-tokens 32] [--out bench/results/parity.json]

Every export is made by ``weightsmith.ship.export.export_run`` (what ``weightsmith export`` runs) into a
temporary directory. The inputs are the first ``--windows`` windows of ``max_seq_len`` tokens of the
run's validation split (``weightsmith.data.prepare``, cached under ``$WEIGHTSMITH_CACHE``), fed as one
batch to our model, transformers and ONNX Runtime, and one window per fresh context to llama.cpp. For
each engine the report has max |Δlogit| over every position and vocabulary entry (float32 logits, in
nats), the logit range of our model for scale, and whether a greedy continuation of ``--new-tokens``
tokens from the first 32 validation tokens equals ours token for token (transformers ``generate`` and
llama.cpp's argmax loop; ONNX has no KV cache and is not generated with). llama.cpp is measured for the
f32 and f16 GGUF files when llama-cpp-python is importable (``pip install -e '.[llamacpp]'``) and
skipped with a printed line otherwise; so is any engine whose package is missing.

Writes ``--out`` (JSON) and the same name with ``.md`` (a short table).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 32


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def hf_parity(export_dir: Path, x: torch.Tensor, ours: torch.Tensor, prompt: torch.Tensor,
              greedy: list[int]) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    with torch.no_grad():
        logits = hf(x).logits.float()  # (B, T, V)
        n_new = len(greedy) - prompt.shape[1]
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=n_new, min_new_tokens=n_new)[0].tolist()
    return {"architecture": type(hf).__name__, "max_abs_logit_diff": (logits - ours).abs().max().item(),
            "greedy_identical": theirs == greedy}


def onnx_parity(export_dir: Path, x: torch.Tensor, ours: torch.Tensor) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"input_ids": x.numpy()})  # (B, T, V)
    return {"max_abs_logit_diff": (torch.from_numpy(logits) - ours).abs().max().item()}


def llamacpp_parity(gguf_path: Path, x: torch.Tensor, ours: torch.Tensor, prompt: torch.Tensor,
                    greedy: list[int]) -> dict:
    from llama_cpp import Llama

    T = x.shape[1]
    n_ctx = max(T, len(greedy))
    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                n_threads=2)
    diff = 0.0
    for b in range(x.shape[0]):  # one fresh context per window
        llm.reset()
        llm.eval(x[b].tolist())
        logits = torch.from_numpy(np.array(llm.scores[:T], dtype=np.float32))  # (T, V)
        diff = max(diff, (logits - ours[b]).abs().max().item())
    seq = prompt[0].tolist()
    llm.reset()
    llm.eval(seq)
    while len(seq) < len(greedy):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        seq.append(nxt)
        llm.eval([nxt])
    llm.close()
    return {"max_abs_logit_diff": diff, "greedy_identical": seq == greedy}


def _skip(engine: str, reason: str) -> dict:
    print(f"{engine:14s} skipped: {reason}", flush=True)
    return {"skipped": reason}


def markdown(report: dict) -> str:
    lines = [f"# Export parity: {report['run_dir']} ({report['checkpoint']})", "",
             f"Command: `python bench/parity.py {report['run_name']}`", "",
             f"Inputs: {report['windows']} validation windows of {report['seq_len']} tokens; our logit range "
             f"{report['ours_logit_range']:.1f}; greedy: {report['new_tokens']} new tokens after "
             f"{PROMPT_TOKENS} prompt tokens.", "",
             "| engine | version | max \\|Δlogit\\| | greedy identical |", "|---|---|---|---|"]
    for name, r in report["engines"].items():
        if "skipped" in r:
            lines.append(f"| {name} | - | skipped: {r['skipped']} | - |")
            continue
        greedy = r.get("greedy_identical")
        lines.append(f"| {name} | {r.get('version') or '-'} | {r['max_abs_logit_diff']:.2e} | "
                     f"{'-' if greedy is None else greedy} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--windows", type=int, default=4, help="validation windows of max_seq_len tokens")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared after the prompt")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "parity.json"))
    args = ap.parse_args()

    from weightsmith.config import from_dict
    from weightsmith.data.prepare import DataConfig, prepare
    from weightsmith.ship.export import export_run
    from weightsmith.ship.generate import generate
    from weightsmith.train.checkpoint import load_run

    torch.set_num_threads(2)
    run_dir = Path(args.run_dir)
    run = load_run(run_dir)
    model = run.model.eval()
    T = model.config.max_seq_len
    data = prepare(from_dict(DataConfig, run.config["data"], "data"), log=lambda *a: None)
    need = args.windows * T
    if len(data.val) < max(need, PROMPT_TOKENS):
        raise SystemExit(f"the validation split has {len(data.val)} tokens; need {need} for "
                         f"{args.windows} windows of {T}")
    x = torch.from_numpy(np.asarray(data.val[:need], dtype=np.int64)).view(args.windows, T)  # (B, T)
    prompt = x[:1, :PROMPT_TOKENS]  # (1, 32)
    with torch.no_grad():
        ours = model(x).float()  # (B, T, V)
        greedy = generate(model, prompt, args.new_tokens, temperature=0)[0].tolist()

    engines: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if _version("transformers") is None:
            engines["hf_f32"] = _skip("hf_f32", "transformers is not installed (pip install -e '.[interop]')")
        else:
            r = hf_parity(export_run(run_dir, "hf", tmp / "hf", "f32"), x, ours, prompt, greedy)
            engines["hf_f32"] = {**r, "version": _version("transformers")}
        if _version("onnxruntime") is None or _version("onnxscript") is None:
            engines["onnx_f32"] = _skip("onnx_f32",
                                        "onnxruntime/onnxscript not installed (pip install -e '.[interop]')")
        else:
            engines["onnx_f32"] = {**onnx_parity(export_run(run_dir, "onnx", tmp / "onnx", "f32"), x, ours),
                                   "version": _version("onnxruntime")}
        for dtype in ("f32", "f16"):
            name = f"llamacpp_{dtype}"
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                engines[name] = _skip(name, "llama-cpp-python is not importable (pip install -e '.[llamacpp]')")
                continue
            out = export_run(run_dir, "gguf", tmp / f"gguf-{dtype}", dtype)
            engines[name] = {**llamacpp_parity(out / "model.gguf", x, ours, prompt, greedy),
                             "version": _version("llama-cpp-python")}
        for name, r in engines.items():
            if "skipped" not in r:
                print(f"{name:14s} max |dlogit| {r['max_abs_logit_diff']:.2e}"
                      + (f", greedy identical {r['greedy_identical']}" if "greedy_identical" in r else ""))
        seconds = round(time.perf_counter() - t0, 1)

    report = {"run_dir": str(run_dir.resolve()), "run_name": str(args.run_dir), "checkpoint": run.checkpoint.name,
              "model": run.config["model"], "tokenizer": run.tokenizer.kind, "windows": args.windows,
              "seq_len": T, "new_tokens": args.new_tokens,
              "ours_logit_range": (ours.max() - ours.min()).item(),
              "definition": "max over windows, positions and vocabulary of |logit_engine - logit_ours|, float32",
              "engines": engines, "seconds": seconds, "torch": torch.__version__,
              "machine": platform.machine(), "python": platform.python_version()}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    outputs = ((out_path, json.dumps(report, indent=2) + "\n"), (out_path.with_suffix(".md"), markdown(report)))
    for path, text in outputs:
        tmp_path = path.with_suffix(path.suffix + ".tmp")
        tmp_path.write_text(text)
        tmp_path.replace(path)
    print(f"wrote {out_path} and {out_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
