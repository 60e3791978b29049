"""The trainer: one step = ``grad_accum`` micro-batches, then clip, stability check, optimizer update.

It is the same for every task (weightsmith.tasks): the task owns data, batches, loss, evaluation and
artifacts; this module owns steps, schedule, accumulation, clipping, checkpoints, the time budget,
signals and resume. Batch streams, the global RNG and the task's own state are checkpointed, so with a
step budget on CPU a run killed after a checkpoint and resumed logs bit-identical losses
(tests/test_resume.py checks this with SIGKILL and SIGTERM).

metrics.jsonl rows, one per ``log_every`` steps: ``step``; ``loss`` (the task's loss, mean over the
step's micro-batches: nats per token for language models, per image for classifiers); the task's
named loss parts; ``lr`` (the rate used for that step); ``grad_norm_total`` (the L2 norm of the step's
gradient over all parameters, before clipping); the running total of the task's unit
(``tokens`` or ``images``, B x T x grad_accum or B x grad_accum per step); its rate over the last
logging interval (``tok_per_s`` or ``img_per_s``); ``elapsed_s``. Every ``eval_every`` steps the task
adds one validation row: ``step`` plus its quick-eval fields (``val_loss_partial``, ``val_tokens`` for
language models). With ``train.tensorboard`` the same rows also go to TensorBoard (weightsmith.train.tb).

The optimizer is ``train.optimizer`` from weightsmith.train.optim (each parameter group follows the
schedule from its own base lr). Before each update, weightsmith.train.stability skips a step whose loss
or gradient norm is not finite or whose loss spikes, and rewinds past the data on repetition; every
such event is a line of ``events.jsonl``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import weightsmith
from weightsmith.config import apply_overrides, dump_toml, load_toml
from weightsmith.errors import CheckpointError, ConfigError, TrainingInterrupted
from weightsmith.train import distributed
from weightsmith.train.checkpoint import (
    atomic_write_text,
    latest_good_checkpoint,
    list_checkpoints,
    load_train_state,
    recover_checkpoints,
)
from weightsmith.train.config import SampleConfig, TrainConfig  # noqa: F401  (re-exported)
from weightsmith.train.faults import active as active_faults
from weightsmith.train.optim import build_optimizer, lr_at, set_lr
from weightsmith.train.stability import StabilityGuard


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
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out {run_dir} is an existing file, not a run directory; choose another --out")
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
          resume: bool = False, log=print, on_eval=None) -> Path:
    """Prepare data, train, evaluate and sample; returns the run directory.

    With ``resume``, the run's saved ``config.toml`` is used (plus ``overrides``) and training continues
    from its newest checkpoint that verifies. ``on_eval(step, result)`` is called after every quick
    evaluation (the validation row of metrics.jsonl, without ``step``); when it returns True training
    stops there, as at ``max_steps`` (checkpoint, final eval, artifacts): sweeps prune trials with it.
    """
    from weightsmith.recipe import load_recipe, recipe_from_tree

    recipe = load_recipe(recipe_path, overrides)
    with distributed.peer_failures():  # under torchrun: a lost rank is one line, not a traceback per rank
        run_dir = distributed.on_main(resolve_run_dir, recipe.name, out, resume, tc=recipe.train)  # rank 0 decides
        if resume:
            tree = apply_overrides(load_toml(run_dir / "config.toml"), overrides or [])
            recipe = recipe_from_tree(tree, name=recipe.name)
            log(f"resuming {run_dir} with its saved config.toml")
        return run_training(recipe, run_dir, resume=resume, log=log, on_eval=on_eval)


class _StopSignals:
    """SIGINT/SIGTERM during training: finish the current step, checkpoint it, then stop.

    A second signal of either kind raises KeyboardInterrupt at once (the usual escape hatch)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """Rows of metrics.jsonl; a torn final line (a process killed mid-write) is dropped.

    Raises:
        CheckpointError: a line other than the last is not valid JSON.
    """
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise CheckpointError(f"{path} line {i + 1} is not valid JSON; fix or delete that line") from None
    return [r for r in rows if up_to_step is None or r.get("step", 0) <= up_to_step]


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_training(recipe, run_dir: Path, *, resume: bool = False, log=print, on_eval=None) -> Path:
    """Train ``recipe``'s model with its task into ``run_dir``; returns ``run_dir``.

    The task (weightsmith.tasks) prepares the data, fills in the model fields the data decides, makes
    the batches, computes the loss, evaluates and writes its artifacts; this function owns the rest.

    Raises:
        ConfigError / DataError / CheckpointError: bad recipe, data or run directory (one line each).
        TrainingInterrupted: SIGINT or SIGTERM; the last finished step was checkpointed first.
        TrainingDiverged: instability repeated past ``train.max_rewinds`` or with no checkpoint to rewind to.
    """
    from tqdm import tqdm

    from weightsmith.registry import model_from_config

    tc: TrainConfig = recipe.train
    if tc.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but torch.cuda.is_available() is False; use train.device='cpu'")
    dist = distributed.setup(tc)  # torchrun: DDP / FSDP2 (weightsmith.train.distributed); else one process
    device = dist.device
    task = recipe.task_cls(recipe.task, recipe.data, tc, recipe.sample)
    dist.check_task(task)
    dist.main_first(lambda: task.setup(run_dir, resume=resume, log=log))  # rank 0 fills the data cache first
    init = None  # train.init_from: the source's config and weights (weightsmith.train.init_from)
    if tc.init_from:
        from weightsmith.train.init_from import init_model

        model_cfg, init = init_model(tc.init_from, recipe, run_dir, resume)
    else:
        model_cfg = recipe.model_config(task.model_fields())
    task.check_model(model_cfg)
    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.startswith("cuda"))
    autocast_dtype = torch.bfloat16 if use_bf16 else None

    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = model_from_config(recipe.family, model_cfg, device=device)
    if init is not None:
        init.load_into(model)  # before the optimizer: step, optimizer state and schedule start fresh
    if recipe.adapter is not None:  # after any init_from weights: the base is frozen as loaded
        from weightsmith.adapters import apply_adapters

        if dist.mode == "fsdp":
            raise ConfigError("[adapter] with train.parallel='fsdp' is not supported yet; use 'ddp' or one process")
        apply_adapters(model, recipe.adapter)  # only the adapters keep requires_grad (and reach the optimizer)
    lr_scales = None
    if tc.mup_base_width is not None:  # µP (weightsmith.train.mup): init now, per-width rates below
        from weightsmith.train.mup import apply_mup

        if dist.mode == "fsdp":
            raise ConfigError("train.mup_base_width with train.parallel='fsdp' is not supported yet; use 'ddp'")
        lr_scales = apply_mup(model, recipe.family, model_cfg, tc.mup_base_width)
    model.train()
    model = dist.prepare_model(model)  # FSDP2 shards it in place, before the optimizer sees the parameters
    optimizer = build_optimizer(tc.optimizer, model, tc, lr_scales)
    batches = task.batches(device)
    min_lr = tc.min_lr if tc.min_lr is not None else tc.lr / 10
    own_dir = run_dir if dist.is_main else dist.scratch  # only rank 0 writes the run's logs
    guard = StabilityGuard(tc, own_dir, log=log)

    def plain_model() -> torch.nn.Module:  # an unsharded copy, for FSDP checkpoints and the final eval
        plain = model_from_config(recipe.family, model_cfg, device=device)
        if recipe.adapter is not None:
            from weightsmith.adapters import apply_adapters

            apply_adapters(plain, recipe.adapter)
        return plain
    faults = active_faults()  # test-only fault injection (weightsmith.train.faults); None in real runs

    def restore(ckpt: Path) -> dict:
        """Weights, optimizer, task state and global RNG from ``ckpt``; returns its train state."""
        state = load_train_state(ckpt)
        if state.get("optimizer_name", "adamw") != tc.optimizer:
            raise CheckpointError(f"{ckpt} holds {state.get('optimizer_name', 'adamw')} state but "
                                  f"train.optimizer={tc.optimizer!r}; resume with the run's own optimizer")
        # either format, whichever world size wrote it (DCP reshards)
        dist.load_checkpoint(model, optimizer, ckpt, state, plain_model,
                             lambda m: build_optimizer(tc.optimizer, m, tc))
        task.load_state_dict(state.get("task", {}))
        _set_rng_state(state["rng"])
        return state

    step, seen, elapsed_before, draws = 0, 0, 0.0, 0  # draws: micro-batches drawn, skipped ones included
    metrics_path = own_dir / "metrics.jsonl"
    if resume:
        if dist.is_main:
            recover_checkpoints(run_dir, log=log)
        dist.barrier()
        ckpt = latest_good_checkpoint(run_dir, log=log)
        if ckpt is None:
            raise CheckpointError(f"no intact checkpoint to resume in {run_dir / 'checkpoints'}")
        state = restore(ckpt)
        batches.load_state_dict(state["batches"])
        guard.load_state_dict(state.get("stability", {}))
        step, seen, elapsed_before = state["step"], state["seen"], state["elapsed_s"]
        draws = state.get("draws", step * tc.grad_accum)
        # drop log lines written after the checkpoint by the interrupted process (and a torn last line)
        kept = _read_metrics(metrics_path, up_to_step=step)
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        log(f"resumed from {ckpt} at step {step}")
        start_step = step
    elif dist.is_main:
        start_step = 0
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", dump_toml(recipe.to_tree(model_cfg)))
        task.write_artifacts(run_dir)
        manifest = {"weightsmith": weightsmith.__version__, "git_commit": _git_commit(),
                    "torch": torch.__version__, "machine": machine_info(), "task": task.name,
                    "data": task.data_manifest(), "created": datetime.now().isoformat(timespec="seconds"),
                    "world_size": dist.world, "parallel": dist.mode}
        if init is not None:
            manifest["init_from"] = init.provenance
        atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2))
    else:
        start_step = 0

    n_params = sum(p.numel() for p in model.parameters())
    if recipe.adapter is not None:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"adapter {recipe.adapter.method} rank {recipe.adapter.rank}: {n_train:,} trainable parameters "
            f"of {n_params:,} ({n_train / n_params:.2%}); the base is frozen")
    log(f"run {run_dir}: {recipe.family} with {n_params:,} parameters, task {task.name}, "
        f"{tc.batch_size * tc.grad_accum} examples per step, device {device}{' bf16' if use_bf16 else ' fp32'}")
    if tc.activation_checkpointing:  # applied from outside: model code and checkpoints are unchanged
        from weightsmith.train.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    step_fn = dist.step_module(model)  # the DDP wrapper under ddp; the (sharded) model itself otherwise
    step_fn = torch.compile(step_fn) if tc.compile else step_fn
    # modules that leave an auxiliary loss after each forward (MoE load balancing); none for dense models
    aux_modules = [m for m in model.modules() if hasattr(m, "aux_loss")]

    metrics = open(metrics_path, "a")
    tb = None  # optional TensorBoard mirror of metrics.jsonl (weightsmith.train.tb), rank 0 only
    if tc.tensorboard and dist.is_main:
        from weightsmith.train.tb import TensorBoardLog

        tb = TensorBoardLog(run_dir, purge_step=step + 1 if resume else None)

    def checkpoint() -> None:
        metrics.flush()
        os.fsync(metrics.fileno())  # the log is durable up to the step the checkpoint holds
        state = {"optimizer_name": tc.optimizer,
                 "batches": batches.state_dict(), "task": task.state_dict(),
                 "rng": _rng_state(), "step": step, "seen": seen, "draws": draws, "stability": guard.state_dict(),
                 "elapsed_s": elapsed_before + (time.perf_counter() - t_start)}
        # one process: the optimizer's state dict joins train_state.pt; distributed: DCP files beside it
        dist.save_checkpoint(run_dir, step, model, optimizer, state, tc.keep_checkpoints, plain_model)

    def rewind() -> None:
        """Back to the newest intact checkpoint before the recent unstable steps (weightsmith.train.stability),
        keeping the data position: the micro-batches drawn since that checkpoint are skipped."""
        nonlocal step, seen, metrics, t_last, seen_last
        ckpt = guard.rewind_target(run_dir)
        state = restore(ckpt)
        guard.rewound(ckpt, state, step + 1, draws, state.get("draws", state["step"] * tc.grad_accum))
        step, seen = state["step"], state["seen"]
        metrics.close()  # the rows of the rewound steps go; events.jsonl keeps what happened
        kept = _read_metrics(metrics_path, up_to_step=step)
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        metrics = open(metrics_path, "a")
        if tb is not None:
            tb.restart(step)
        t_last, seen_last = time.perf_counter(), seen
        bar.n = step
        checkpoint()  # re-saved with the new data position, so a resume does not replay the window

    t_start = time.perf_counter()
    t_last, seen_last = t_start, seen
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", disable=None if dist.is_main else True,
               dynamic_ncols=True)
    plain = bar.disable  # no terminal (| tee, nohup, a cluster job): one plain line per log_every steps
    stop_reason = "max_steps"
    with _StopSignals() as signals:
        while step < tc.max_steps:
            elapsed = elapsed_before + time.perf_counter() - t_start
            if tc.max_time is not None and elapsed >= tc.max_time:
                stop_reason = "max_time"
                break
            if signals.received is not None:
                stop_reason = signal.Signals(signals.received).name
                break
            progress = None
            if tc.max_time is not None:
                span = max(1, tc.max_steps - tc.warmup_steps)
                progress = max((step - tc.warmup_steps) / span, elapsed / tc.max_time)
            lr = lr_at(step, lr=tc.lr, min_lr=min_lr, warmup_steps=tc.warmup_steps, total_steps=tc.max_steps,
                       schedule=tc.schedule, decay_fraction=tc.decay_fraction, progress=progress)
            set_lr(optimizer, lr)  # each group: lr x its lr_scale (Muon's groups have their own base lr)
            loss_sum, parts_sum = 0.0, {}
            for micro in range(tc.grad_accum):
                full_batch = batches.next()  # every rank draws the same micro-batch and keeps its own rows
                batch = dist.shard(full_batch)
                dist.sync_gradients(step_fn, micro == tc.grad_accum - 1)  # DDP: one all-reduce per step
                with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    loss, parts = task.loss(step_fn, batch)
                    if faults is not None:
                        loss = faults.poison(loss, draws)
                    total = loss
                    if aux_modules and tc.aux_loss_coef:
                        total = loss + tc.aux_loss_coef * sum(m.aux_loss for m in aux_modules)
                (total / tc.grad_accum).backward()
                loss_sum += loss.item()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
                seen += task.count(full_batch)
                draws += 1
            norms = None
            if tc.log_grad_norms and ((step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps):
                norms = layer_grad_norms(model)
            if tc.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            grad_norm = dist.full_tensor(grad_norm)  # FSDP2: a DTensor over the shards
            loss_sum, parts_sum = dist.mean_loss(loss_sum, parts_sum)  # logged: means over the ranks' rows
            loss_val = loss_sum / tc.grad_accum
            if guard.check(step + 1, loss_val, float(grad_norm), (draws - tc.grad_accum, draws)) is not None:
                optimizer.zero_grad(set_to_none=True)  # skipped before the update; the next step draws new data
                if guard.wants_rewind():
                    rewind()
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            task.after_step(model)  # e.g. the EMA of the weights that diffusion tasks sample with
            step += 1
            now = time.perf_counter()
            if step % tc.log_every == 0 or step == tc.max_steps:
                rate = (seen - seen_last) / max(now - t_last, 1e-9)
                run_s = elapsed_before + now - t_start
                row = {"step": step, "loss": loss_val, **{k: v / tc.grad_accum for k, v in parts_sum.items()},
                       "lr": lr, "grad_norm_total": float(grad_norm), task.unit: seen, task.rate_key: rate,
                       "elapsed_s": run_s}
                if norms is not None:
                    row["grad_norm"], row["grad_norm_total"] = norms
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if tb is not None:
                    tb.add(row, "train")
                t_last, seen_last = now, seen
                bar.set_postfix(loss=f"{loss_val:.4f}", **{task.rate_key: f"{rate:,.0f}"})
                if plain:
                    per_step = (now - t_start) / max(step - start_step, 1)
                    eta = (tc.max_steps - step) * per_step
                    if tc.max_time is not None:
                        eta = min(eta, tc.max_time - run_s)
                    log(f"step {step}/{tc.max_steps} | loss {loss_val:.4f} | lr {lr:.2e} | "
                        f"{rate:,.0f} {task.rate_key.replace('_per_s', '/s')} | {_fmt_seconds(run_s)} | "
                        f"ETA {_fmt_seconds(eta)}")
            bar.update(1)
            if step % tc.eval_every == 0 and step < tc.max_steps:
                result = task.evaluate(model, device=device, autocast_dtype=autocast_dtype)
                if result:
                    metrics.write(json.dumps({"step": step, **result}) + "\n")
                    metrics.flush()
                    if tb is not None:
                        tb.add({"step": step, **result}, "val")
                    if on_eval is not None and on_eval(step, result):
                        stop_reason = "on_eval"
                        break
                    bar.write(f"step {step}: loss {loss_val:.4f}, {task.describe_eval(result)}, lr {lr:.2e}")
            if step % tc.ckpt_every == 0 and step < tc.max_steps:
                checkpoint()
        bar.close()
        train_seconds = time.perf_counter() - t_start
        if step > start_step or not list_checkpoints(run_dir):
            checkpoint()
        metrics.close()
    if tb is not None and stop_reason in ("SIGINT", "SIGTERM"):
        tb.close()
    if stop_reason in ("SIGINT", "SIGTERM"):
        raise TrainingInterrupted(
            f"{stop_reason} at step {step}: checkpoint written; continue with "
            f"`weightsmith train RECIPE --out {run_dir} --resume`",
            exit_code=130 if stop_reason == "SIGINT" else 143)
    log(f"stopped at step {step} ({stop_reason}) after {elapsed_before + train_seconds:.1f} s")

    final = dist.final_model(model, plain_model)  # rank 0 evaluates and samples; an unsharded copy for FSDP
    if final is None:
        return run_dir
    summary = task.finish(final, run_dir, device=device, autocast_dtype=autocast_dtype, log=log)
    if tb is not None:
        tb.add({"step": step, **summary}, "eval")
        tb.close()
    if step > start_step and dist.world > 1:
        log("MFU skipped: not measured for a distributed run yet (the rate is global, the peak per process)")
    elif step > start_step:
        report_mfu(run_dir, task, recipe.family, model_cfg, metrics_path, device, use_bf16, log=log)
    log(f"run directory: {run_dir}  ({task.headline(summary)})")
    return run_dir


# Datasheet dense peak FLOP/s by GPU name fragment and dtype (no sparsity): the usual MFU denominator.
# NVIDIA H100 SXM / H200 SXM: 989.4 TFLOP/s bf16, 66.9 fp32; A100: 312 bf16, 19.5 fp32 (datasheets).
DATASHEET_PEAKS = {"H200": {"bf16": 989.4e12, "fp32": 66.9e12}, "H100": {"bf16": 989.4e12, "fp32": 66.9e12},
                   "A100": {"bf16": 312e12, "fp32": 19.5e12}}


def datasheet_peak(device: str, dtype: str) -> float | None:
    """The datasheet dense peak of the current CUDA device for ``dtype`` ("bf16" | "fp32"), or None."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peaks in DATASHEET_PEAKS.items():
        if key in name:
            return peaks.get(dtype)
    return None


def grad_group(name: str) -> str:
    """The layer a parameter belongs to: its name cut after the first numeric part (``blocks.3.attn.q.weight``
    -> ``blocks.3``), else its first part (``tok_emb.weight`` -> ``tok_emb``)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0]


@torch.no_grad()
def layer_grad_norms(model: torch.nn.Module) -> tuple[dict[str, float], float]:
    """({layer group: L2 norm of its gradients}, L2 norm over all gradients), in model order."""
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = grad_group(name)
            sq[g] = sq.get(g, 0.0) + float(p.grad.detach().float().pow(2).sum())
    return {g: v ** 0.5 for g, v in sq.items()}, sum(sq.values()) ** 0.5


def report_mfu(run_dir: Path, task, family: str, model_cfg, metrics_path: Path, device: str, bf16: bool,
               log=print) -> dict | None:
    """MFU = model FLOPs/s (analytic training FLOPs per unit x measured units/s) / peak FLOP/s.

    Units/s is the median over logged intervals of this run. Two denominators: a large matmul timed in
    the same process in the training dtype (``mfu``: what this machine can reach), and, on a GPU whose
    datasheet peak is known, that peak (``mfu_datasheet``: the figure papers quote). Written to
    ``mfu.json``; skipped with one line when the family's FLOPs are not modelled.
    """
    try:
        fpu = task.flops_per_unit(family, model_cfg)
    except ConfigError as e:
        log(f"MFU skipped: {e}")
        return None
    rows = [r for r in _read_metrics(metrics_path) if task.rate_key in r]
    rates = [r[task.rate_key] for r in rows][1:] or [r[task.rate_key] for r in rows]
    if not rates:
        log("MFU skipped: no step was logged (the run stopped before train.log_every steps)")
        return None
    rate = float(np.median(rates))
    dtype_name = "bf16" if bf16 else "fp32"
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = measure_matmul_peak(device, dtype, n=4096 if device.startswith("cuda") else 1024)
    sheet = datasheet_peak(device, dtype_name)
    out = {task.rate_key: rate, f"flops_per_{task.unit[:-1]}": fpu, "model_flops_per_s": fpu * rate,
           "matmul_peak_flops_per_s": peak, "mfu": fpu * rate / peak, "datasheet_peak_flops_per_s": sheet,
           "mfu_datasheet": fpu * rate / sheet if sheet else None, "dtype": dtype_name, "device": device}
    atomic_write_text(run_dir / "mfu.json", json.dumps(out, indent=2))
    sheet_note = (f"; {out['mfu_datasheet']:.1%} of the {sheet / 1e12:.0f} TFLOP/s datasheet peak" if sheet
                  else "; the usual MFU divides by the datasheet peak, unknown for this device")
    log(f"MFU {out['mfu']:.1%}: {rate:,.0f} {task.unit}/s x {fpu / 1e6:.2f} MFLOP per {task.unit[:-1]} (train, "
        f"2 FLOPs per multiply-add) / measured {peak / 1e9:.1f} GFLOP/s matmul peak ({dtype_name}){sheet_note}")
    return out
