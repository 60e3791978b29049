"""Decode benchmark: our generate (fp32, int8) vs HF transformers ``generate`` vs llama.cpp, one CPU run.

    WEIGHTSMITH_CACHE=/tmp/wscache .venv/bin/python bench/decode.py runs/shakespeare [--threads 2] [--compile]

"ours fp32" is the model as ``weightsmith generate`` runs it, with q/k/v and gate/up fused
(weightsmith.ship.fuse); "ours fp32 unfused" is the layout as trained and saved.

Workload: greedy, prompts of ``--prompt-len`` tokens cut from the validation text, ``--new-tokens``
new tokens, batch 1 and batch 8 (8 different prompts of equal length, so no padding is involved).
Engines alternate in ``--repeats`` rounds. Metrics per engine and batch, from the best round:

- ttft_s: time to first token (prefill of the prompt + the first sampled token), seconds;
- prefill_tokens_per_s: B * prompt_len / ttft_s;
- decode_tokens_per_s: B * (new_tokens - 1) / (time from the first to the last new token);
- decode_tokens_per_s_median and decode_vs_hf_median: medians over rounds, the HF ratio taken within
  each round.

Ours and llama.cpp are timed around their own step loops; HF ``generate`` is timed with a streamer
whose ``put`` is called with the prompt and then once per new token. llama.cpp (llama-cpp-python,
low-level ``eval``) runs batch 1 only: its Python API evaluates one sequence per context.
Writes bench/results/decode.json and bench/results/decode.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
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
        """Part of the streamer interface; nothing to record at the end."""


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


def round_robin(engines: dict, batch: int, prompt: torch.Tensor, repeats: int) -> dict[str, list]:
    """(ttft, t_last) of every round per engine; each round runs every engine once, in turn, so a slow
    spell of the shared machine hits all engines alike instead of one engine's whole series."""
    names = [n for n, (_, batches) in engines.items() if batch in batches]
    for n in names:
        engines[n][0](prompt)  # warm-up
    runs = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            runs[n].append(engines[n][0](prompt))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(model) at batch 1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from weightsmith.ship.export import export_run
    from weightsmith.ship.fuse import fuse_projections
    from weightsmith.ship.quantize import quantize_model
    from weightsmith.train.checkpoint import load_run

    run = load_run(args.run_dir)
    T0, n_new = args.prompt_len, args.new_tokens
    int8 = quantize_model(load_run(args.run_dir).model, "int8")
    engines, results = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        hf = AutoModelForCausalLM.from_pretrained(export_run(args.run_dir, "hf", Path(tmp) / "hf")).eval()
        fused = fuse_projections(load_run(args.run_dir).model)  # what `weightsmith generate` runs
        engines["ours fp32"] = (lambda p: time_ours(fused, p, n_new), (1, 8))
        engines["ours fp32 unfused"] = (lambda p: time_ours(run.model, p, n_new), (1, 8))
        if args.compile:  # inductor C++ kernels: ~50 s to compile on 2 cores, removes per-op overhead
            compiled = torch.compile(run.model, dynamic=True)
            engines["ours fp32 torch.compile"] = (
                lambda p: time_ours(compiled, p, n_new), (1,))
        engines["ours int8"] = (lambda p: time_ours(int8, p, n_new), (1, 8))
        engines["hf transformers fp32"] = (
            lambda p: (time_hf if p.shape[0] == 1 else time_hf_batched)(hf, p, n_new), (1, 8))
        for dtype in ("f32", "q8_0"):
            path = export_run(args.run_dir, "gguf", Path(tmp) / f"gguf-{dtype}", dtype) / "model.gguf"
            llm = Llama(str(path), n_ctx=T0 + n_new + 8, n_threads=args.threads, n_batch=512, verbose=False)
            engines[f"llama.cpp {dtype}"] = (
                lambda p, llm=llm: time_llama(llm, p[0].tolist(), n_new), (1,))
        for B in (1, 8):
            prompt = prompts_from_val(run, B, T0)
            runs = round_robin(engines, B, prompt, args.repeats)
            hf_rates = [B * (n_new - 1) / (t - f) for f, t in runs["hf transformers fp32"]]
            for name, rr in runs.items():
                rates = [B * (n_new - 1) / (t - f) for f, t in rr]
                best = summarize(B, T0, n_new, min(f for f, _ in rr), min(t - f for f, t in rr) + min(f for f, _ in rr))
                results.append({"engine": name, "batch": B, **best,
                                "decode_tokens_per_s_median": statistics.median(rates),
                                "decode_vs_hf_median": statistics.median(a / b for a, b in zip(rates, hf_rates))})
                print(json.dumps(results[-1]))
    report = {"command": "python bench/decode.py " + " ".join(sys.argv[1:]),
              "run_dir": str(Path(args.run_dir).resolve()), "prompt_len": T0, "new_tokens": n_new,
              "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "decode.md").write_text(to_markdown(report))
    print(to_markdown(report))


def to_markdown(report: dict) -> str:
    lines = [f"# Decode benchmark ({report['prompt_len']}-token prompts, {report['new_tokens']} new tokens, greedy, "
             f"{report['threads']} threads, {report['repeats']} round-robin rounds)", "",
             f"Command: `{report['command']}`", "",
             "TTFT, prefill and best decode: the best round. Median decode and *vs HF*: the median over rounds, "
             "the ratio taken within each round (engines alternate, so both saw the same machine).", "",
             "| engine | batch | TTFT (ms) | prefill tok/s | decode tok/s (best) | decode tok/s (median) | vs HF |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        ttft = "n/a" if r["ttft_s"] != r["ttft_s"] else f"{1000 * r['ttft_s']:.1f}"
        lines.append(f"| {r['engine']} | {r['batch']} | {ttft} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.0f} | {r['decode_tokens_per_s_median']:.0f} | "
                     f"{r['decode_vs_hf_median']:.2f}x |")
    lines += ["", "llama.cpp runs batch 1 only (llama-cpp-python evaluates one sequence per context). "
              "HF batch 8: TTFT from a 1-token `generate`, decode from an n-token one.",
              "\"ours fp32\" is what `weightsmith generate` runs (fused, transposed projections: ship/fuse.py); "
              "\"ours fp32 unfused\" is the checkpoint layout."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
