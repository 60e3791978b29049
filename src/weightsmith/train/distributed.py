"""Data-parallel training under ``torchrun``: DDP or FSDP2, sharded batches, DCP checkpoints.

``torchrun --nproc_per_node=N -m weightsmith train RECIPE --out RUN`` starts N copies of the trainer;
each one finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment (set by torchrun) and joins
one process group: gloo on CPU with an explicit CPU device mesh, nccl when ``train.device`` is cuda
(rank r then uses ``cuda:LOCAL_RANK``). ``train.parallel`` picks the wrapper:

- ``"ddp"``: torch.nn.parallel.DistributedDataParallel; every rank holds the whole model and the
  gradients are averaged in the backward pass (Li et al. 2020, "PyTorch Distributed").
- ``"fsdp"``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every block of each ``blocks`` list and
  then on the root; parameters, gradients and optimizer state are sharded along dim 0 (Zhao et al.
  2023, "PyTorch FSDP").
- ``"none"`` (the default): one process, exactly the single-process trainer. Started by torchrun
  with ``WORLD_SIZE > 1`` it means ``"ddp"``, which trains the same run as one process would.
  A process started without torchrun is always the plain single-process trainer.

Batches. The recipe's ``batch_size x grad_accum`` is the global batch of one optimizer step,
whatever the world size W. Every rank draws the same micro-batch of ``batch_size`` rows from the
task's seeded stream and keeps the contiguous block of rows ``[r B/W, (r+1) B/W)``, so the ranks
never overlap, the data order is the task's own, and a run at W = 1 sees the same examples in the
same steps as one at W = 2 (hence resume across world sizes continues the same curve). For a task
whose loss is a mean over equally sized rows (causal LM windows, image classification) the averaged
gradient equals the single-process one up to float reduction order (tests/test_distributed.py; also
measured by hand for an MLP classifier without dropout and BatchNorm: 6e-8). Two things differ from one
process, as in plain DDP: BatchNorm normalises with per-rank statistics over B/W rows, and every rank
starts from the same global RNG, so dropout masks (and noise a task draws in its loss) repeat across
ranks. ``batch_size`` must be divisible by W (ConfigError otherwise).

Only rank 0 writes: config, manifest, artifacts, metrics.jsonl, events.jsonl, eval.json, samples and
checkpoint metadata; the other ranks write their run-local logs into a scratch directory, and their
stdout goes to /dev/null. Quick evaluation runs on every rank (FSDP needs all of them for a forward);
the end-of-run evaluation and samples run on rank 0 with a plain, unsharded copy of the model.

Checkpoints of a distributed run are the single-process layout (``model.safetensors`` with the full
weights, ``train_state.pt`` without the optimizer, ``meta.json`` with every file's sha256) plus the
files of torch.distributed.checkpoint (DCP) holding model and optimizer as returned by
``get_state_dict`` (``.metadata``, ``__R_0.distcp``), written into the same ``.tmp-*`` directory that
is renamed into place (weightsmith.train.checkpoint). DCP reshards on load, so a run saved at W = 2
resumes at W = 1 (even in a plain process with no process group) and the other way round; a
single-process checkpoint resumes at W > 1 through full state dicts. Multi-node runs need the run
directory on a filesystem every node sees.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith.errors import CheckpointError, ConfigError, DistributedError, WeightsmithError

DCP_METADATA = ".metadata"  # the file torch.distributed.checkpoint writes last, on the coordinator rank


def launched() -> bool:
    """True when this process was started by torchrun (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _init_process_group(device: str, timeout_s: float) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    # the timeout bounds every collective: a rank whose peer died fails instead of waiting forever
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # progress lines, evals and samples: once, from rank 0


@dataclass
class Dist:
    """This process's place in the run. ``mode`` "none" is the plain single-process trainer."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    scratch: Path | None = None  # where ranks > 0 write their run-local logs
    _plain: nn.Module | None = field(default=None, repr=False)  # rank 0's unsharded copy (fsdp)
    _ddp: nn.Module | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def check_task(self, task: Any) -> None:
        """Raise ConfigError for a task FSDP cannot train yet: one with an ``after_step`` hook, which
        touches full weights after the update (an EMA copy, a sparsity mask) that FSDP holds sharded."""
        from weightsmith.tasks.base import Task

        if self.mode == "fsdp" and type(task).after_step is not Task.after_step:
            raise ConfigError(f"task {task.name!r} updates the full weights after each step (an EMA copy or a "
                              "sparsity mask), which train.parallel='fsdp' does not support yet; use "
                              "train.parallel='ddp'")

    # ---- batches and reductions ----
    def shard(self, batch: Any, *, _rows: int | None = None) -> Any:
        """This rank's rows of a micro-batch: the block ``[r B/W, (r+1) B/W)`` of every tensor's dim 0
        (tensors inside tuples, lists and dicts too; other values pass through). Identity when not
        distributed.

        Raises:
            ConfigError: a tensor's dim 0 differs from the batch's, or does not divide by the world size.
        """
        if not self.active or self.world == 1:
            return batch
        if isinstance(batch, torch.Tensor):
            n = batch.shape[0]
            if n % self.world:
                raise ConfigError(f"a micro-batch of {n} rows cannot be split over {self.world} ranks; "
                                  f"make train.batch_size a multiple of the world size")
            per = n // self.world
            return batch[self.rank * per:(self.rank + 1) * per]
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.shard(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self.shard(v) for k, v in batch.items()}
        return batch

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (same keys on every rank); identity when not distributed."""
        if not self.active or self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def mean_loss(self, loss_sum: float, parts_sum: dict[str, float]) -> tuple[float, dict[str, float]]:
        """(loss, parts) summed over this rank's micro-batches -> their means over the ranks."""
        if not self.active or self.world == 1:
            return loss_sum, parts_sum
        out = self.mean({"loss": loss_sum, **{"part:" + k: v for k, v in parts_sum.items()}})
        return out["loss"], {k[5:]: out["part:" + k[5:]] for k in out if k.startswith("part:")}

    def _comm_device(self) -> str:
        return self.device if self.device.startswith("cuda") else "cpu"

    def barrier(self) -> None:
        if self.active and self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, then on the others (e.g. data preparation that fills a shared cache)."""
        out = None
        if self.is_main:
            out = fn()
        self.barrier()
        if not self.is_main:
            out = fn()
        return out

    # ---- the model ----
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` in place for FSDP2 (before the optimizer is built); else unchanged."""
        if self.mode != "fsdp":
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self._comm_device().split(":")[0], (self.world,))
        for m in model.modules():
            blocks = getattr(m, "blocks", None)
            if isinstance(blocks, nn.ModuleList):
                for block in blocks:
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def step_module(self, model: nn.Module) -> nn.Module:
        """What the training forward calls: a DDP wrapper (made once) for ``ddp``, else ``model``."""
        if self.mode != "ddp":
            return model
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            self._ddp = DistributedDataParallel(model, device_ids=ids)
        return self._ddp

    def sync_gradients(self, step_fn: nn.Module, sync: bool) -> None:
        """Under DDP, all-reduce gradients in the next backward only if ``sync`` (the last micro-batch of a
        step), as ``DistributedDataParallel.no_sync`` does for the others; nothing otherwise (FSDP2
        reduce-scatters every micro-batch, which keeps its gradients sharded)."""
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = sync

    @staticmethod
    def full_tensor(x: torch.Tensor) -> torch.Tensor:
        """A DTensor (FSDP2's gradient norm) as a plain tensor; other tensors unchanged."""
        from torch.distributed.tensor import DTensor

        return x.full_tensor() if isinstance(x, DTensor) else x

    def final_model(self, model: nn.Module, build_plain: Callable[[], nn.Module]) -> nn.Module | None:
        """The model rank 0 evaluates and samples with at the end (an unsharded copy for FSDP; a
        collective, called on every rank); None on the other ranks."""
        if self.mode == "fsdp":
            plain = self._gather_plain(model, build_plain)
            return plain if self.is_main else None
        return model if self.is_main else None

    def _gather_plain(self, model: nn.Module, build_plain: Callable[[], nn.Module]) -> nn.Module | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        if self._plain is None:
            self._plain = _build_quietly(build_plain, self.device)
        self._plain.load_state_dict(full)
        return self._plain

    # ---- checkpoints ----
    def save_checkpoint(self, run_dir: Path, step: int, model: nn.Module, optimizer: Any, state: dict,
                        keep: int, build_plain: Callable[[], nn.Module]) -> None:
        """Save step ``step``: the single-process format when not distributed (``state`` gains the
        optimizer's state dict), else model.safetensors + train_state.pt (rank 0) and the DCP files of
        model and optimizer (every rank) in one atomically renamed directory. Called on every rank."""
        from weightsmith.train.checkpoint import save_checkpoint

        if not self.active:
            save_checkpoint(run_dir, step, model, {"optimizer": optimizer.state_dict(), **state}, keep=keep)
            return
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, _optimizers(optimizer))
        plain = self._gather_plain(model, build_plain) if self.mode == "fsdp" else model

        def write_dcp(tmp: Path | None) -> list[str]:
            box = [str(tmp) if tmp is not None else None]
            if self.world > 1:
                dist.broadcast_object_list(box, src=0)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=box[0])
            if not self.is_main:
                return []
            return sorted(p.name for p in Path(box[0]).iterdir() if p.name == DCP_METADATA
                          or p.suffix == ".distcp")

        if self.is_main:
            save_checkpoint(run_dir, step, plain, {**state, "world_size": self.world, "parallel": self.mode},
                            keep=keep, write_extra=write_dcp)
        else:
            write_dcp(None)
        self.barrier()  # nobody goes on (or reads the checkpoint) before rank 0 has renamed it into place

    def load_checkpoint(self, model: nn.Module, optimizer: Any, ckpt: Path, state: dict,
                        build_plain: Callable[[], nn.Module], build_optimizer: Callable[[nn.Module], Any]) -> None:
        """Load weights and optimizer state from ``ckpt`` (verified), whichever world size wrote it.

        A DCP checkpoint is read with ``dcp.load`` (resharded to this world size; no process group
        needed); a single-process one with safetensors and ``optimizer.load_state_dict``, turned into
        full state dicts for FSDP. ``state`` is the checkpoint's train state.

        Raises:
            CheckpointError: the checkpoint is corrupt or does not fit the model or optimizer.
        """
        from weightsmith.train.checkpoint import load_weights, verify_checkpoint
        from weightsmith.train.optim import load_optimizer_state

        verify_checkpoint(ckpt)
        if (ckpt / DCP_METADATA).is_file():
            self._load_dcp(model, optimizer, ckpt)
            return
        if "optimizer" not in state:
            raise CheckpointError(f"{ckpt} has neither DCP files nor an optimizer state in train_state.pt")
        if self.mode != "fsdp":
            load_weights(model, ckpt)
            load_optimizer_state(optimizer, state["optimizer"], str(ckpt))
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        plain = _build_quietly(build_plain, self.device)
        plain_opt = build_optimizer(plain)
        load_weights(plain, ckpt)
        load_optimizer_state(plain_opt, state["optimizer"], str(ckpt))
        full = StateDictOptions(full_state_dict=True)
        msd, osd = get_state_dict(plain, _optimizers(plain_opt), options=full)
        set_state_dict(model, _optimizers(optimizer), model_state_dict=msd, optim_state_dict=osd, options=full)

    @staticmethod
    def _load_dcp(model: nn.Module, optimizer: Any, ckpt: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, _optimizers(optimizer))
        try:
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
            set_state_dict(model, _optimizers(optimizer), model_state_dict=msd, optim_state_dict=osd)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise CheckpointError(f"DCP checkpoint {ckpt} does not fit this model and optimizer (was the "
                                  f"model or train.optimizer changed?): {first}") from None


def _build_quietly(build: Callable[[], nn.Module], device: str) -> nn.Module:
    """``build()`` without moving the global RNG (its initialisation would shift dropout masks and the
    RNG state the next checkpoint saves)."""
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        return build()


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside ``optimizer`` (an OptimizerChain holds several)."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def setup(tc: Any) -> Dist:
    """This process's :class:`Dist` for ``train`` config ``tc``, joining the process group when
    launched by torchrun.

    Raises:
        ConfigError: ``train.parallel`` unknown, ``train.batch_size`` not divisible by the world size,
            or a combination FSDP does not support (Muon, per-layer gradient norms).
    """
    if not launched():
        return Dist(device=tc.device)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    mode = tc.parallel if tc.parallel != "none" else ("ddp" if world > 1 else "none")
    if mode == "none":  # torchrun with one process and parallel = "none": the plain trainer
        return Dist(device=tc.device)
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the world size {world}: every "
                          "micro-batch is split over the ranks (the global batch is batch_size x grad_accum)")
    if mode == "fsdp" and tc.optimizer == "muon":
        raise ConfigError("train.optimizer='muon' needs whole matrices, which FSDP shards; use "
                          "train.parallel='ddp' with Muon")
    if mode == "fsdp" and tc.log_grad_norms:
        raise ConfigError("train.log_grad_norms is not supported with train.parallel='fsdp' (gradients are "
                          "sharded); use 'ddp' or turn it off")
    _init_process_group(tc.device, tc.dist_timeout)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if tc.device.startswith("cuda") else tc.device
    scratch = None
    if rank != 0:
        scratch = Path(tempfile.mkdtemp(prefix=f"weightsmith-rank{rank}-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return Dist(mode=mode, rank=rank, world=world, device=device, scratch=scratch)


@contextmanager
def peer_failures() -> Iterator[None]:
    """Turn a collective's failure (a peer rank died, or did not answer within ``train.dist_timeout``)
    into a one-line DistributedError; other errors pass through. Outside torchrun: nothing."""
    try:
        yield
    except RuntimeError as e:
        import torch.distributed as dist

        text = str(e)
        if not (launched() and (isinstance(e, dist.DistError) or any(
                w in text.lower() for w in ("gloo", "nccl", "connection reset", "connection closed", "timed out")))):
            raise
        rank = os.environ.get("RANK", "?")
        first = " ".join(text.split(". This is typically")[0].split())[:300]  # gloo appends advice
        raise DistributedError(f"rank {rank}: another rank of this torchrun job died or stopped answering "
                               f"({first}); the run stops here, resume it with --resume") from None


def on_main(fn: Callable[..., Any], *args: Any, tc: Any) -> Any:
    """``fn(*args)`` computed on rank 0 and broadcast to every rank (a WeightsmithError raised there is
    raised on every rank with the same message). Plain call when not launched by torchrun."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return fn(*args)
    import torch.distributed as dist

    _init_process_group(tc.device, tc.dist_timeout)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn(*args))
        except WeightsmithError as e:
            box[0] = ("error", type(e), str(e))
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise box[0][1](box[0][2])
    return box[0][1]
