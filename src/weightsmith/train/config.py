"""``[train]`` and ``[sample]`` sections of a recipe: plain keyword-only dataclasses, checked on creation.

They live apart from the loop so that recipes, the CLI and the docs can read them without importing
the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from weightsmith.errors import ConfigError

MUP_WITH_MUON = ("train.mup_base_width works with train.optimizer 'adamw' or 'lion', not 'muon' (its "
                 "orthogonalized updates already have a width-independent scale)")


@dataclass(kw_only=True)
class TrainConfig:
    """``[train]`` section. Batch sizes are in sequences; ``max_time`` and eval/log cadence in
    seconds and optimizer steps. ``seq_len`` defaults to ``model.max_seq_len``; ``min_lr`` to lr / 10.
    ``aux_loss_coef`` scales the auxiliary losses that modules leave in ``.aux_loss`` (MoE load balancing,
    Fedus et al. 2021) before they are added to the language-model loss; the logged loss excludes them.
    ``activation_checkpointing`` recomputes every block in the backward pass instead of storing its
    activations (weightsmith.train.activation_checkpointing). ``log_grad_norms`` adds, to every logged
    step, the L2 norm of the gradient per layer (``grad_norm``: {group: norm}, before clipping; a group is
    a parameter name cut after its first numeric part, ``blocks.3``, or its first part, ``tok_emb``); the
    norm over all parameters (``grad_norm_total``, before clipping) is in every logged row."""

    seed: int = 1337
    device: str = "cpu"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    batch_size: int = 32
    seq_len: int | None = None
    grad_accum: int = 1
    max_steps: int = 1000
    max_time: float | None = None
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    log_every: int = 10
    log_grad_norms: bool = False
    eval_every: int = 250
    eval_tokens: int = 32768
    eval_batch_size: int = 16
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    optimizer: Literal["adamw", "muon", "lion"] = field(default="adamw", metadata={"doc": (
        "weightsmith.train.optim: `adamw` (torch AdamW with `beta1, beta2, eps, weight_decay`); `muon` "
        "(torch.optim.Muon for 2-D hidden weights at `muon_lr`, AdamW at `lr` for embeddings, norms, "
        "biases, the output head and conv filters); `lion` (Chen et al. 2023, at `lr` with `lion_beta1, "
        "lion_beta2, weight_decay`). Every group follows `schedule` from its own base lr")})
    muon_lr: float = field(default=0.02, metadata={"doc": "Muon's peak learning rate (its groups follow "
                                                          "the schedule scaled by `muon_lr / lr`)"})
    muon_momentum: float = field(default=0.95, metadata={"doc": "Muon's momentum μ, in [0, 1)"})
    muon_nesterov: bool = field(default=True, metadata={"doc": "Nesterov momentum for Muon"})
    muon_ns_steps: int = field(default=5, metadata={"doc": "Newton-Schulz iterations per Muon update, 1 to 99"})
    muon_weight_decay: float = field(default=0.0, metadata={"doc": "decoupled weight decay of the Muon "
                                                                   "groups (times their lr)"})
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = field(default="original", metadata={"doc": (
        "per-matrix lr scale: `original` sqrt(max(1, rows / cols)) (Jordan); `match_rms_adamw` "
        "0.2 sqrt(max(rows, cols)) (Liu et al. 2025, Moonlight)")})
    lion_beta1: float = field(default=0.9, metadata={"doc": "Lion's β1 (the interpolation whose sign is the update)"})
    lion_beta2: float = field(default=0.99, metadata={"doc": "Lion's β2 (the momentum kept)"})
    mup_base_width: int | None = field(default=None, metadata={"doc": (
        "µP (weightsmith.train.mup; Yang et al. 2022): the width (`d_model`) at which the learning rate "
        "and init were tuned; hidden and output weights then get init std and lr scaled by width, so "
        "the tuned lr transfers. Unset: the standard parametrization. Needs a transformer with "
        "`tie_embeddings = false`, `adamw` or `lion`, and no `init_from`")})
    spike_zscore: float | None = field(default=None, metadata={"doc": (
        "skip a step whose loss exceeds the mean of the last `spike_window` kept steps' losses by more "
        "than this many standard deviations (unset: no spike check; e.g. 6). Non-finite "
        "losses and gradient norms are always skipped. Events go to events.jsonl")})
    spike_window: int = field(default=50, metadata={"doc": "kept steps in the spike z-score window; no "
                                                           "spike check until it is full"})
    rewind_events: int = field(default=3, metadata={"doc": (
        "this many skipped steps within `rewind_window` steps rewind the run to the newest checkpoint "
        "before the first of them, keeping the data position (the window in between is skipped)")})
    rewind_window: int = field(default=100, metadata={"doc": "optimizer steps over which `rewind_events` are counted"})
    max_rewinds: int = field(default=3, metadata={"doc": "rewinds allowed per run; one more stops it with an error"})
    parallel: Literal["none", "ddp", "fsdp"] = field(default="none", metadata={"doc": (
        "data parallelism when launched by torchrun (weightsmith.train.distributed): `ddp` "
        "(DistributedDataParallel), `fsdp` (FSDP2 `fully_shard`); `none` is one process, and means `ddp` "
        "under torchrun with more than one process. The global batch stays `batch_size x grad_accum`; "
        "each rank takes batch_size / world rows of every micro-batch")})
    dist_timeout: float = field(default=600.0, metadata={"doc": (
        "seconds a rank waits in a collective for the others before failing (the process group's "
        "timeout), so a run whose rank died stops instead of hanging")})
    init_from: str | None = field(default=None, metadata={"doc": (
        "start from these weights: a run directory of ours (newest checkpoint) or a local Hugging Face "
        "directory (weightsmith.ship.hf_convert). The model config is the source's (a `[model]` key that "
        "changes a weight shape is an error), the data is tokenized with the source's tokenizer instead "
        "of a new one (`data.tokenizer` and, for bpe, `data.vocab_size` must match it), and step, "
        "optimizer and schedule start fresh; manifest.json records the path and the weights' sha256")})
    tensorboard: bool = field(default=False, metadata={"doc": (
        "also write the metrics.jsonl numbers (and eval.json's) as TensorBoard scalars into RUN/tb/ "
        "(weightsmith.train.tb; rank 0 only; needs `pip install 'weightsmith[tb]'`)")})

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "ckpt_every",
                     "eval_batch_size", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("eps", "weight_decay", "grad_clip", "aux_loss_coef", "warmup_steps", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.min_lr is not None and not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}]")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ConfigError(f"train.seq_len must be positive, got {self.seq_len}")
        if self.max_time is not None and self.max_time <= 0:
            raise ConfigError(f"train.max_time must be positive seconds, got {self.max_time}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device={self.device!r}; choose 'cpu' or 'cuda'")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        self._check_optimizer_and_stability()

    def _check_optimizer_and_stability(self) -> None:
        for name, allowed in (("optimizer", ("adamw", "muon", "lion")),
                              ("muon_adjust_lr", ("original", "match_rms_adamw"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} = {getattr(self, name)!r} is not allowed; choose one of "
                                  f"{list(allowed)}")
        for name in ("muon_momentum", "lion_beta1", "lion_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mup_base_width is not None and self.mup_base_width <= 0:
            raise ConfigError(f"train.mup_base_width must be a positive width (or unset), got {self.mup_base_width}")
        if self.mup_base_width is not None and self.optimizer == "muon":
            raise ConfigError(MUP_WITH_MUON)
        if self.mup_base_width is not None and self.init_from:
            raise ConfigError("train.mup_base_width sets the initialization, train.init_from loads one; drop one")
        if self.muon_lr <= 0:
            raise ConfigError(f"train.muon_lr must be positive, got {self.muon_lr}")
        if self.muon_weight_decay < 0:
            raise ConfigError(f"train.muon_weight_decay must be >= 0, got {self.muon_weight_decay}")
        if not 1 <= self.muon_ns_steps < 100:
            raise ConfigError(f"train.muon_ns_steps must be in [1, 99], got {self.muon_ns_steps}")
        if self.spike_zscore is not None and self.spike_zscore <= 0:
            raise ConfigError(f"train.spike_zscore must be positive standard deviations (or unset), "
                              f"got {self.spike_zscore}")
        for name in ("spike_window", "rewind_events", "rewind_window"):
            if getattr(self, name) < (2 if name == "spike_window" else 1):
                raise ConfigError(f"train.{name} must be >= {2 if name == 'spike_window' else 1}, "
                                  f"got {getattr(self, name)}")
        if self.max_rewinds < 0:
            raise ConfigError(f"train.max_rewinds must be >= 0, got {self.max_rewinds}")
        if self.parallel not in ("none", "ddp", "fsdp"):
            raise ConfigError(f"train.parallel = {self.parallel!r} is not allowed; choose one of "
                              "['none', 'ddp', 'fsdp']")
        if self.dist_timeout <= 0:
            raise ConfigError(f"train.dist_timeout must be positive seconds, got {self.dist_timeout}")


@dataclass(kw_only=True)
class SampleConfig:
    """``[sample]`` section: the text generated at the end of training (see weightsmith.ship.generate)."""

    prompt: str = "\n"
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"sample.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"sample.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"sample.top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sample.top_p must be in (0, 1], got {self.top_p}")
