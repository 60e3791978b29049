"""The training loop: one step = ``grad_accum`` micro-batches, then clip, AdamW update, LR schedule.

Batches are random windows of ``seq_len + 1`` tokens from the training shard, drawn by a seeded
``torch.Generator`` whose state is checkpointed, so a resumed run sees exactly the batches an
uninterrupted run would. With a step budget on CPU, a run killed after a checkpoint and resumed logs
bit-identical losses (tests/test_resume.py checks this with SIGKILL).

Units: ``tokens`` in metrics.jsonl counts training tokens consumed (B x T x grad_accum per step);
``loss`` is the mean next-token cross-entropy of the step in nats per token; ``lr`` is the rate used
for that step; ``tok_per_s`` is measured over the last logging interval.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import weightsmith
from weightsmith.config import apply_overrides, dump_toml, load_toml
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.train.checkpoint import (
    atomic_write_text,
    latest_good_checkpoint,
    load_train_state,
    load_weights,
    save_checkpoint,
)
from weightsmith.train.config import SampleConfig, TrainConfig  # noqa: F401  (re-exported)
from weightsmith.train.optim import build_adamw, lr_at


def _git_commit() -> str | None:
    try:
        here = Path(weightsmith.__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                        seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a large square matmul (2 n^3 FLOPs each), the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        sync()
        dt = time.perf_counter() - t0
        if dt >= seconds and reps >= 3:
            return 2 * n**3 * reps / dt


class Batches:
    """Random (x, y) windows from a token shard; its generator state is part of the checkpoint."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, device: str) -> None:
        if len(tokens) <= seq_len + 1:
            raise ConfigError(f"training split has {len(tokens)} tokens; need more than train.seq_len + 1 "
                              f"= {seq_len + 1} (lower train.seq_len or use a bigger corpus)")
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64, y shifted by one."""
        ix = torch.randint(len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        rows = np.stack([np.asarray(self.tokens[i:i + self.seq_len + 1], dtype=np.int64) for i in ix.tolist()])
        chunk = torch.from_numpy(rows).to(self.device)
        return chunk[:, :-1], chunk[:, 1:]


def _rng_state() -> dict[str, Any]:
    """Global RNG state that training consumes (dropout masks); data order has its own generator."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_run_dir(recipe_name: str, out: str | Path | None, resume: bool) -> Path:
    """The run directory; never an existing run unless ``resume``.

    Raises:
        CheckpointError: ``out`` holds a run and ``resume`` is False, or ``resume`` with no run there.
    """
    if out is None:
        if resume:
            raise CheckpointError("--resume needs --out DIR naming the run to continue")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{recipe_name}-{stamp}"
    run_dir = Path(out)
    is_run = (run_dir / "config.toml").is_file()
    if resume and not is_run:
        raise CheckpointError(f"nothing to resume: {run_dir} is not a run directory (no config.toml)")
    if not resume:
        if is_run:
            raise CheckpointError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                                  "another --out (runs are never overwritten)")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise CheckpointError(f"{run_dir} exists and is not empty; choose another --out")
    return run_dir


def train(recipe_path: str | Path, overrides: list[str] | None = None, *, out: str | Path | None = None,
          resume: bool = False, log=print) -> Path:
    """Prepare data, train, evaluate and sample; returns the run directory.

    With ``resume``, the run's saved ``config.toml`` is used (plus ``overrides``) and training continues
    from its newest checkpoint that verifies.
    """
    from weightsmith.recipe import load_recipe, recipe_from_tree

    recipe = load_recipe(recipe_path, overrides)
    run_dir = resolve_run_dir(recipe.name, out, resume)
    if resume:
        tree = apply_overrides(load_toml(run_dir / "config.toml"), overrides or [])
        recipe = recipe_from_tree(tree, name=recipe.name)
        log(f"resuming {run_dir} with its saved config.toml")
    return run_training(recipe, run_dir, resume=resume, log=log)


def run_training(recipe, run_dir: Path, *, resume: bool = False, log=print) -> Path:
    from tqdm import tqdm

    from weightsmith.data.prepare import prepare
    from weightsmith.data.tokenizers import save_tokenizer
    from weightsmith.registry import model_from_config

    tc: TrainConfig = recipe.train
    data = prepare(recipe.data, log=log)
    model_cfg = recipe.model_config(vocab_size=data.tokenizer.vocab_size)
    if model_cfg.vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{data.tokenizer.vocab_size}; remove it from the recipe to use the tokenizer's")
    seq_len = tc.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    device = tc.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but torch.cuda.is_available() is False; use train.device='cpu'")
    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.startswith("cuda"))
    autocast_dtype = torch.bfloat16 if use_bf16 else None

    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = model_from_config(recipe.family, model_cfg, device=device)
    model.train()
    optimizer = build_adamw(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps)
    batches = Batches(data.train, tc.batch_size, seq_len, tc.seed, device)
    min_lr = tc.min_lr if tc.min_lr is not None else tc.lr / 10

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpt = latest_good_checkpoint(run_dir, log=log)
        if ckpt is None:
            raise CheckpointError(f"no intact checkpoint to resume in {run_dir / 'checkpoints'}")
        load_weights(model, ckpt)
        state = load_train_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        batches.generator.set_state(state["data_generator"])
        _set_rng_state(state["rng"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        # drop log lines written after the checkpoint by the interrupted process
        if metrics_path.is_file():
            kept = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= step]
            atomic_write_text(metrics_path, "".join(k + "\n" for k in kept))
        log(f"resumed from {ckpt} at step {step}")
        start_step = step
    else:
        start_step = 0
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", dump_toml(recipe.to_tree(model_cfg)))
        save_tokenizer(data.tokenizer, run_dir)
        manifest = {"weightsmith": weightsmith.__version__, "git_commit": _git_commit(),
                    "torch": torch.__version__, "machine": machine_info(),
                    "data": {"directory": str(data.directory), **data.manifest},
                    "created": datetime.now().isoformat(timespec="seconds")}
        atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2))

    n_params = sum(p.numel() for p in model.parameters())
    log(f"run {run_dir}: {recipe.family} with {n_params:,} parameters, vocab {model_cfg.vocab_size}, "
        f"{tc.batch_size * tc.grad_accum} x {seq_len} tokens per step, device {device}"
        f"{' bf16' if use_bf16 else ' fp32'}")
    if tc.activation_checkpointing:  # applied from outside: model code and checkpoints are unchanged
        from weightsmith.train.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    step_fn = torch.compile(model) if tc.compile else model
    # modules that leave an auxiliary loss after each forward (MoE load balancing); none for dense models
    aux_modules = [m for m in model.modules() if hasattr(m, "aux_loss")]

    def checkpoint() -> None:
        state = {"optimizer": optimizer.state_dict(), "data_generator": batches.generator.get_state(),
                 "rng": _rng_state(), "step": step, "tokens": tokens_seen,
                 "elapsed_s": elapsed_before + (time.perf_counter() - t_start)}
        save_checkpoint(run_dir, step, model, state, keep=tc.keep_checkpoints)

    metrics = open(metrics_path, "a")
    t_start = time.perf_counter()
    t_last, tokens_last = t_start, tokens_seen
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", disable=None, dynamic_ncols=True)
    stop_reason = "max_steps"
    while step < tc.max_steps:
        elapsed = elapsed_before + time.perf_counter() - t_start
        if tc.max_time is not None and elapsed >= tc.max_time:
            stop_reason = "max_time"
            break
        progress = None
        if tc.max_time is not None:
            span = max(1, tc.max_steps - tc.warmup_steps)
            progress = max((step - tc.warmup_steps) / span, elapsed / tc.max_time)
        lr = lr_at(step, lr=tc.lr, min_lr=min_lr, warmup_steps=tc.warmup_steps, total_steps=tc.max_steps,
                   schedule=tc.schedule, decay_fraction=tc.decay_fraction, progress=progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(tc.grad_accum):
            x, y = batches.next()
            with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = step_fn(x)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
                total = loss
                if aux_modules and tc.aux_loss_coef:
                    total = loss + tc.aux_loss_coef * sum(m.aux_loss for m in aux_modules)
            (total / tc.grad_accum).backward()
            loss_sum += loss.item()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tc.batch_size * tc.grad_accum * seq_len
        loss_val = loss_sum / tc.grad_accum
        if not np.isfinite(loss_val):
            raise CheckpointError(f"loss became {loss_val} at step {step}; lower train.lr or raise "
                                  f"train.warmup_steps, then resume from the last checkpoint")
        now = time.perf_counter()
        if step % tc.log_every == 0 or step == tc.max_steps:
            tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            row = {"step": step, "loss": loss_val, "lr": lr, "tokens": tokens_seen, "tok_per_s": tps,
                   "elapsed_s": elapsed_before + now - t_start}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            t_last, tokens_last = now, tokens_seen
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:,.0f}")
        bar.update(1)
        if step % tc.eval_every == 0 and step < tc.max_steps:
            from weightsmith.eval.metrics import stream_loss

            total, count, _ = stream_loss(model, data.val, seq_len, tc.eval_batch_size, tc.eval_tokens,
                                          device, autocast_dtype)
            metrics.write(json.dumps({"step": step, "val_loss_partial": total / count,
                                      "val_tokens": count}) + "\n")
            metrics.flush()
            bar.write(f"step {step}: loss {loss_val:.4f}, val_loss (first {count:,} val tokens) "
                      f"{total / count:.4f}, lr {lr:.2e}")
        if step % tc.ckpt_every == 0 and step < tc.max_steps:
            checkpoint()
    bar.close()
    metrics.close()
    train_seconds = time.perf_counter() - t_start
    checkpoint()
    log(f"stopped at step {step} ({stop_reason}) after {elapsed_before + train_seconds:.1f} s")

    summary = finish_run(run_dir, model, data, recipe, seq_len, device, autocast_dtype, log=log)
    if step > start_step:
        report_mfu(run_dir, recipe.family, model_cfg, seq_len, metrics_path, device, use_bf16, log=log)
    log(f"run directory: {run_dir}  (val_bpb {summary['val_bpb']:.4f})")
    return run_dir


def finish_run(run_dir: Path, model, data, recipe, seq_len: int, device: str, autocast_dtype,
               log=print) -> dict:
    """Full validation eval -> eval.json, and a sample -> samples.txt."""
    from weightsmith.eval.metrics import evaluate_lm
    from weightsmith.ship.generate import generate_text

    result = evaluate_lm(model, data.val, data.tokenizer.token_bytes(), seq_len,
                         recipe.train.eval_batch_size, device, autocast_dtype)
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    log("eval: " + json.dumps(result))
    s = recipe.sample
    model.eval()
    text = generate_text(model, data.tokenizer, s.prompt, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                         s.seed)
    atomic_write_text(run_dir / "samples.txt", text + "\n")
    log("sample:\n" + text)
    return result


def report_mfu(run_dir: Path, family: str, model_cfg, seq_len: int, metrics_path: Path, device: str,
               bf16: bool, log=print) -> dict:
    """MFU = model FLOPs/s (analytic training FLOPs per token x measured tokens/s) / measured matmul peak.

    Tokens/s is the median over logged intervals of this run; the peak is a large matmul timed in the
    same process, in the training dtype. Written to ``mfu.json``.
    """
    from weightsmith.analysis import flops_per_token

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    tps = [r["tok_per_s"] for r in rows if "tok_per_s" in r][1:] or [r["tok_per_s"] for r in rows if "tok_per_s" in r]
    tok_s = float(np.median(tps))
    fpt = flops_per_token(family, model_cfg, seq_len, training=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = measure_matmul_peak(device, dtype, n=4096 if device.startswith("cuda") else 1024)
    out = {"tok_per_s": tok_s, "flops_per_token": fpt, "model_flops_per_s": fpt * tok_s,
           "matmul_peak_flops_per_s": peak, "mfu": fpt * tok_s / peak,
           "dtype": "bf16" if bf16 else "fp32", "device": device}
    atomic_write_text(run_dir / "mfu.json", json.dumps(out, indent=2))
    log(f"MFU {out['mfu']:.1%}: {tok_s:,.0f} tok/s x {fpt / 1e6:.2f} MFLOP/token (train, 2 FLOPs per "
        f"multiply-add) / measured {peak / 1e9:.1f} GFLOP/s matmul peak ({out['dtype']})")
    return out

