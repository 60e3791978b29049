"""Decode benchmark: our generate (fp32, int8) vs HF transformers ``generate`` vs llama.cpp, one CPU run.

    WEIGHTSMITH_CACHE=/tmp/wscache .venv/bin/python bench/decode.py runs/main [--threads 2] [--compile]

Workload: greedy, prompts of ``--prompt-len`` tokens cut from the validation text, ``--new-tokens``
new tokens, batch 1 and batch 8 (8 different prompts of equal length, so no padding is involved).
Metrics per engine and batch, best of ``--repeats``:

- ttft_s: time to first token (prefill of the prompt + the first sampled token), seconds;
- prefill_tokens_per_s: B * prompt_len / ttft_s;
- decode_tokens_per_s: B * (new_tokens - 1) / (time from the first to the last new token).

Ours and llama.cpp are timed around their own step loops; HF ``generate`` is timed with a streamer
whose ``put`` is called with the prompt and then once per new token. llama.cpp (llama-cpp-python,
low-level ``eval``) runs batch 1 only: its Python API evaluates one sequence per context.
Writes bench/results/decode.json and bench/results/decode.md.
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

RESULTS = Path(__file__).parent / "results"


def prompts_from_val(run, batch: int, prompt_len: int) -> torch.Tensor:
    from weightsmith.config import from_dict
    from weightsmith.data.prepare import DataConfig, prepare

    val = prepare(from_dict(DataConfig, run.config["data"], "data"), log=lambda *a: None).val
    return torch.stack([torch.from_numpy(np.asarray(val[i * 997:i * 997 + prompt_len], dtype=np.int64))
                        for i in range(batch)])


def summarize(B: int, T0: int, n_new: int, ttft: float, t_last: float) -> dict:
    return {"ttft_s": ttft, "prefill_tokens_per_s": B * T0 / ttft,
            "decode_tokens_per_s": B * (n_new - 1) / (t_last - ttft)}


@torch.inference_mode()
def time_ours(model, prompt: torch.Tensor, n_new: int) -> tuple[float, float]:
    """The steps of weightsmith.ship.generate.generate, with timestamps: (ttft, time of last token)."""
    B, T0 = prompt.shape
    t0 = time.perf_counter()
    cache = model.new_cache(B, T0 + n_new)
    nxt = model(prompt, cache=cache, start=0, last_only=True)[:, -1].argmax(-1)
    ttft = time.perf_counter() - t0
    for t in range(T0, T0 + n_new - 1):
        nxt = model(nxt[:, None], cache=cache, start=t)[:, -1].argmax(-1)
    return ttft, time.perf_counter() - t0


class _Clock:
    """A transformers streamer recording when each new token arrives."""

    def __init__(self):
        self.t0, self.times = time.perf_counter(), []

    def put(self, value):
        self.times.append(time.perf_counter() - self.t0)

    def end(self):
        pass


@torch.inference_mode()
def time_hf(model, prompt: torch.Tensor, n_new: int) -> tuple[float, float]:
    clock = _Clock()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
                   do_sample=False, streamer=clock if prompt.shape[0] == 1 else None, pad_token_id=0,
                   eos_token_id=None)
    if prompt.shape[0] == 1:
        return clock.times[1], clock.times[-1]  # times[0] is the prompt
    return float("nan"), time.perf_counter() - clock.t0


def time_hf_batched(model, prompt: torch.Tensor, n_new: int) -> tuple[float, float]:
    """Streamers only take batch 1: TTFT from a 1-token generate, total from an n_new-token one."""
    t0 = time.perf_counter()
    time_hf(model, prompt, 1)
    ttft = time.perf_counter() - t0
    return ttft, time_hf(model, prompt, n_new)[1]


def time_llama(llm, prompt: list[int], n_new: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    ttft = time.perf_counter() - t0
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return ttft, time.perf_counter() - t0


def best_of(fn, repeats: int, *args) -> tuple[float, float]:
    fn(*args)  # warm-up
    runs = [fn(*args) for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(model) at batch 1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from weightsmith.ship.export import export_run
    from weightsmith.ship.quantize import quantize_model
    from weightsmith.train.checkpoint import load_run

    run = load_run(args.run_dir)
    T0, n_new = args.prompt_len, args.new_tokens
    int8 = quantize_model(load_run(args.run_dir).model, "int8")
    engines, results = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        hf = AutoModelForCausalLM.from_pretrained(export_run(args.run_dir, "hf", Path(tmp) / "hf")).eval()
        engines["ours fp32"] = (lambda p: best_of(time_ours, args.repeats, run.model, p, n_new), (1, 8))
        if args.compile:  # inductor C++ kernels: ~50 s to compile on 2 cores, removes per-op overhead
            compiled = torch.compile(run.model, dynamic=True)
            engines["ours fp32 torch.compile"] = (
                lambda p: best_of(time_ours, args.repeats, compiled, p, n_new), (1,))
        engines["ours int8"] = (lambda p: best_of(time_ours, args.repeats, int8, p, n_new), (1, 8))
        engines["hf transformers fp32"] = (
            lambda p: best_of(time_hf if p.shape[0] == 1 else time_hf_batched, args.repeats, hf, p, n_new), (1, 8))
        for dtype in ("f32", "q8_0"):
            path = export_run(args.run_dir, "gguf", Path(tmp) / f"gguf-{dtype}", dtype) / "model.gguf"
            llm = Llama(str(path), n_ctx=T0 + n_new + 8, n_threads=args.threads, n_batch=512, verbose=False)
            engines[f"llama.cpp {dtype}"] = (
                lambda p, llm=llm: best_of(time_llama, args.repeats, llm, p[0].tolist(), n_new), (1,))
        for B in (1, 8):
            prompt = prompts_from_val(run, B, T0)
            for name, (fn, batches) in engines.items():
                if B in batches:
                    ttft, t_last = fn(prompt)
                    results.append({"engine": name, "batch": B, **summarize(B, T0, n_new, ttft, t_last)})
                    print(json.dumps(results[-1]))
    report = {"run_dir": str(Path(args.run_dir).resolve()), "prompt_len": T0, "new_tokens": n_new,
              "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "decode.md").write_text(to_markdown(report))
    print(to_markdown(report))


def to_markdown(report: dict) -> str:
    lines = [f"# Decode benchmark ({report['prompt_len']}-token prompts, {report['new_tokens']} new tokens, greedy, "
             f"{report['threads']} threads, best of {report['repeats']})", "",
             "Command: `WEIGHTSMITH_CACHE=/tmp/wscache .venv/bin/python bench/decode.py runs/main --compile`", "",
             "| engine | batch | TTFT (ms) | prefill tok/s | decode tok/s | decode vs HF |",
             "|---|---|---|---|---|---|"]
    hf = {r["batch"]: r["decode_tokens_per_s"] for r in report["results"] if r["engine"].startswith("hf")}
    for r in report["results"]:
        ratio = r["decode_tokens_per_s"] / hf[r["batch"]] if r["batch"] in hf else float("nan")
        ttft = "n/a" if r["ttft_s"] != r["ttft_s"] else f"{1000 * r['ttft_s']:.1f}"
        lines.append(f"| {r['engine']} | {r['batch']} | {ttft} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.0f} | {ratio:.2f}x |")
    lines += ["", "llama.cpp runs batch 1 only (llama-cpp-python evaluates one sequence per context). "
              "HF batch 8: TTFT from a 1-token `generate`, decode from an n-token one."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
