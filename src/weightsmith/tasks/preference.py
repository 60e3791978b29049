"""Alignment with preferences: DPO against a frozen reference model, and SFT on the chosen continuations.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model". For a prompt ``x`` with a chosen continuation ``y_w`` and a rejected one ``y_l`` (the paper's
notation; pairs from :mod:`weightsmith.data.preference`), the policy ``pi`` (the model being trained)
and the frozen reference ``pi_ref`` (a copy of the policy's weights when training starts)::

    r(y)  = beta * (log pi(y | x) - log pi_ref(y | x))          the implicit reward (the paper's eq. 5)
    loss  = -log sigmoid( r(y_w) - r(y_l) )                      the paper's eq. 7, mean over pairs

``log pi(y | x)`` is the sum over the continuation's tokens only of the next-token log-probabilities
(nats; prompt and padding positions are masked out). Logged per step: ``reward_margin`` (mean
``r(y_w) - r(y_l)``), ``reward_chosen``, ``reward_rejected`` and ``reward_acc`` (the fraction of pairs with
``r(y_w) > r(y_l)``). At the first step ``pi == pi_ref``, so every reward is 0 and the loss is log 2.

``sft`` is the baseline: the mean next-token cross-entropy (nats per token) over the chosen
continuations' tokens, the prompt masked out. Both tasks train any causal-lm family
(``forward(idx (B, T)) -> logits (B, T, V)``), usually started from a pretrained run
(``train.init_from``).

The reference. It is a deep copy of the policy taken at the first training step (the weights the run
starts from: ``train.init_from``'s, or the random init), put in eval mode with ``requires_grad`` off,
kept by the task and never seen by the optimizer. Its weights go into the task's part of
``train_state.pt`` so that a resumed run compares against the same reference exactly; the run's
``model.safetensors`` holds the policy alone, so export, generate and eval see an ordinary model.
``sft`` keeps a reference too, only to measure the KL in its final evaluation. The reference costs one
forward (no backward) per DPO step.

Final evaluation (``eval.json``), on the held-out pairs (cut from the last 10% of the corpus):

- ``pref_acc``: fraction of pairs with ``log pi(y_w|x) > log pi(y_l|x)``; ``ref_pref_acc``: the same for
  ``pi_ref`` (before training); ``reward_acc``, ``reward_margin`` and ``dpo_loss`` at ``task.beta``;
- ``property_rate``: fraction of ``eval_samples`` continuations sampled (temperature
  ``sample_temperature``, no top-k/top-p, ``max_continuation_tokens`` tokens, weightsmith.ship.generate)
  from held-out prompts whose decoded text has the property
  (:func:`weightsmith.data.preference.has_property`); ``ref_property_rate``: the same with the reference;
- ``val_bpb`` and ``ref_val_bpb``: bits per byte over the corpus' validation split (what alignment cost);
- ``kl_to_ref``: mean per-token KL(pi || pi_ref) in nats/token over those sampled continuations: at each
  continuation position the exact KL of the two next-token distributions, summed over the vocabulary,
  averaged over positions and samples (an estimate of KL per token of the sequence distributions).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from weightsmith.data.preference import PreferenceDataConfig, PreferencePair, has_property, pairs_digest
from weightsmith.errors import ConfigError, DataError
from weightsmith.tasks import register_task
from weightsmith.tasks.causal_lm import TextTask

# ---- the objective ----


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probabilities of the masked targets, per row.

    Args:
        logits: (B, T, V), the model's output for inputs ``ids[:, :-1]``.
        ids: (B, T + 1) int64 token ids; the targets are ``ids[:, 1:]``.
        mask: (B, T) bool, True where target ``ids[:, t + 1]`` belongs to the continuation.

    Returns:
        (B,) float32 log-probabilities in nats.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T)
    return (tok * mask).sum(-1)


def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss (module docstring) from sequence log-probabilities, each (B,) in nats.

    Returns:
        (loss, parts): the scalar mean loss, and (B,) tensors ``reward_chosen`` (beta (pi_w - ref_w)),
        ``reward_rejected`` and ``margin`` (their difference).
    """
    r_w = beta * (pi_w - ref_w)
    r_l = beta * (pi_l - ref_l)
    margin = r_w - r_l
    return -F.logsigmoid(margin).mean(), {"reward_chosen": r_w, "reward_rejected": r_l, "margin": margin}


# ---- batches ----


def collate(pairs: list[PreferencePair], device: str, *, rejected: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``prompt + chosen`` (then, with ``rejected``, ``prompt + rejected``), right-padded with id 0.

    Returns:
        ids: (R, L + 1) int64 with R = B (or 2B: chosen rows first, rejected rows after, in pair order);
        mask: (R, L) bool, True where target ``ids[:, t + 1]`` is a continuation token.
    """
    rows = [(p.prompt, p.chosen) for p in pairs] + ([(p.prompt, p.rejected) for p in pairs] if rejected else [])
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a) + len(b)] = torch.tensor(a + b)
        mask[i, len(a) - 1:len(a) + len(b) - 1] = True
    return ids.to(device), mask.to(device)


class PairBatches:
    """Seeded random draws (with replacement) of ``batch_size`` training pairs; its generator state is
    part of the checkpoint. ``next()`` returns :func:`collate`'s (ids, mask)."""

    def __init__(self, pairs: list[PreferencePair], batch_size: int, seed: int, device: str, rejected: bool) -> None:
        self.pairs, self.batch_size, self.device, self.rejected = pairs, batch_size, device, rejected
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.pairs), (self.batch_size,), generator=self.generator).tolist()
        return collate([self.pairs[i] for i in ix], self.device, rejected=self.rejected)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


# ---- configs ----


@dataclass(kw_only=True)
class PreferenceConfig(PreferenceDataConfig):
    """``[task]`` of ``sft``: the pair construction (weightsmith.data.preference) and the evaluation."""

    eval_samples: int = field(default=128, metadata={"doc": (
        "held-out prompts sampled from at the end, for the property rate and the KL to the reference")})
    sample_temperature: float = field(default=1.0, metadata={"doc": (
        "temperature of those samples (1.0: the model's own distribution, which the KL estimate assumes)")})
    eval_pairs: int = field(default=64, metadata={"doc": "held-out pairs in the quick evaluation during training"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.eval_samples, int) and self.eval_samples >= 1):
            raise ConfigError(f"task.eval_samples={self.eval_samples!r} must be an integer >= 1")
        if not (isinstance(self.sample_temperature, int | float) and self.sample_temperature > 0):
            raise ConfigError(f"task.sample_temperature={self.sample_temperature!r} must be > 0")
        if not (isinstance(self.eval_pairs, int) and self.eval_pairs >= 1):
            raise ConfigError(f"task.eval_pairs={self.eval_pairs!r} must be an integer >= 1")


@dataclass(kw_only=True)
class DPOConfig(PreferenceConfig):
    """``[task]`` of ``dpo``: beta, the pair construction (weightsmith.data.preference) and the evaluation."""

    beta: float = field(default=0.1, metadata={"doc": (
        "β, the strength of the KL constraint to the reference in the DPO objective (> 0; the paper uses 0.1-0.5)")})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.beta, int | float) and self.beta > 0):
            raise ConfigError(f"task.beta={self.beta!r} must be a number > 0 (e.g. 0.1)")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


# ---- the tasks ----


class PreferenceTask(TextTask):
    """Shared by ``dpo`` and ``sft``: pairs, the reference copy, batches, and the evaluation."""

    also_trains = ("causal-lm",)
    uses_rejected = True
    reference: torch.nn.Module | None = None
    _reference_state: dict[str, torch.Tensor] | None = None

    def setup(self, run_dir: Path, *, resume: bool, log=print) -> None:
        from weightsmith.data.corpus import load_corpus
        from weightsmith.data.preference import build_splits
        from weightsmith.data.prepare import cache_root

        if getattr(self.train_cfg, "parallel", "none") == "fsdp":
            raise ConfigError(f"task {self.name!r} keeps an unsharded reference copy of the model, which "
                              "train.parallel='fsdp' does not support; use 'ddp' or 'none'")
        super().setup(run_dir, resume=resume, log=log)
        text = load_corpus(self.data_cfg.corpus, cache_root(self.data_cfg)).text
        self.train_pairs, self.val_pairs = build_splits(text, self.tokenizer, self.cfg)
        self.pairs_info = {"train_pairs": len(self.train_pairs), "val_pairs": len(self.val_pairs),
                           "train_sha256": pairs_digest(self.train_pairs), "val_sha256": pairs_digest(self.val_pairs)}
        if resume:
            self._check_same_pairs(run_dir)
            self._reference_from_checkpoint(run_dir)
        log(f"preference pairs: {len(self.train_pairs):,} train, {len(self.val_pairs):,} held out")

    def _reference_from_checkpoint(self, run_dir: Path) -> None:
        """Stash the reference weights of ``run_dir``'s newest checkpoint, for ``weightsmith eval`` (a
        resumed training run loads them again from the checkpoint it resumes from)."""
        from weightsmith.errors import CheckpointError
        from weightsmith.train.checkpoint import list_checkpoints, load_train_state

        ckpts = list_checkpoints(run_dir)
        if ckpts and (ckpts[-1] / "train_state.pt").is_file():
            try:
                self.load_state_dict(load_train_state(ckpts[-1]).get("task", {}))
            except CheckpointError:
                pass  # a torn newest checkpoint: training's recovery picks an intact one and restores from it

    def _check_same_pairs(self, run_dir: Path) -> None:
        path = Path(run_dir) / "manifest.json"
        saved = json.loads(path.read_text()).get("data", {}).get("preference") if path.is_file() else None
        if saved and saved.get("train_sha256") != self.pairs_info["train_sha256"]:
            raise DataError(f"{path}: the rebuilt preference pairs differ from those {run_dir} was trained on "
                            f"(train sha256 {saved.get('train_sha256')}, found {self.pairs_info['train_sha256']})")

    def data_manifest(self) -> dict[str, Any]:
        return {**super().data_manifest(), "preference": self.pairs_info}

    def check_model(self, model_cfg: Any) -> None:
        super().check_model(model_cfg)
        need = self.cfg.prompt_tokens + self.cfg.max_continuation_tokens
        if need > model_cfg.max_seq_len:
            raise ConfigError(f"task.prompt_tokens + task.max_continuation_tokens = {need} exceeds "
                              f"model.max_seq_len={model_cfg.max_seq_len}")
        self._seq_len = need

    def batches(self, device: str) -> PairBatches:
        return PairBatches(self.train_pairs, self.train_cfg.batch_size, self.train_cfg.seed, device,
                           self.uses_rejected)

    def count(self, batch) -> int:
        """Positions the model reads in a micro-batch (prompt and continuation of every row, padding
        excluded): what the FLOPs per token of :meth:`flops_per_unit` multiply."""
        mask = batch[1]
        return int((mask.shape[1] - mask.flip(-1).int().argmax(-1)).sum())

    # ---- the reference ----
    def reference_for(self, model: torch.nn.Module) -> torch.nn.Module:
        """The frozen reference: a copy of ``model`` made on the first call (the starting weights), with
        the weights from a checkpoint's task state when resuming."""
        if self.reference is None:
            ref = copy.deepcopy(_unwrap(model))
            if self._reference_state is not None:
                ref.load_state_dict(self._reference_state)
                self._reference_state = None
            self.reference = ref.eval().requires_grad_(False)
        return self.reference

    def state_dict(self) -> dict[str, Any]:
        if self.reference is None:
            return {} if self._reference_state is None else {"reference": self._reference_state}
        return {"reference": {k: v.detach().cpu().clone() for k, v in self.reference.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "reference" in state:
            self.reference, self._reference_state = None, state["reference"]

    # ---- evaluation ----
    @torch.no_grad()
    def pair_metrics(self, model: torch.nn.Module, pairs: list[PreferencePair], device: str) -> dict[str, float]:
        """Held-out pair metrics of ``model`` against the reference (module docstring), batched."""
        ref = self.reference_for(model)
        beta = getattr(self.cfg, "beta", 0.1)
        sums = {"pref_acc": 0.0, "ref_pref_acc": 0.0, "reward_acc": 0.0, "reward_margin": 0.0, "dpo_loss": 0.0}
        was = model.training
        model.eval()
        bs = self.train_cfg.eval_batch_size
        for i in range(0, len(pairs), bs):
            chunk = pairs[i:i + bs]
            ids, mask = collate(chunk, device)
            n = len(chunk)
            pi = sequence_logprobs(model(ids[:, :-1]), ids, mask)
            rf = sequence_logprobs(ref(ids[:, :-1]), ids, mask)
            loss, parts = dpo_loss(pi[:n], pi[n:], rf[:n], rf[n:], beta)
            sums["pref_acc"] += float((pi[:n] > pi[n:]).sum())
            sums["ref_pref_acc"] += float((rf[:n] > rf[n:]).sum())
            sums["reward_acc"] += float((parts["margin"] > 0).sum())
            sums["reward_margin"] += float(parts["margin"].sum())
            sums["dpo_loss"] += float(loss) * n
        model.train(was)
        return {k: v / len(pairs) for k, v in sums.items()}

    @torch.no_grad()
    def sample_metrics(self, model: torch.nn.Module, device: str) -> tuple[dict[str, float], list[str]]:
        """Property rate of samples from the policy and from the reference, and the policy's per-token KL
        to the reference on its own samples (module docstring). Returns (metrics, the policy's texts)."""
        from weightsmith.ship.generate import generate

        ref = self.reference_for(model)
        cfg = self.cfg
        prompts = self.val_pairs[:cfg.eval_samples]
        K = cfg.max_continuation_tokens
        was = model.training
        model.eval()
        out: dict[str, float] = {}
        texts: list[str] = []
        kl_sum, kl_n = 0.0, 0
        for who, net in (("", model), ("ref_", ref)):
            g = torch.Generator(device=device).manual_seed(cfg.seed)
            hits = 0
            for i in range(0, len(prompts), self.train_cfg.eval_batch_size):
                x = torch.tensor([p.prompt for p in prompts[i:i + self.train_cfg.eval_batch_size]], device=device)
                seq = generate(net, x, K, temperature=cfg.sample_temperature, generator=g)
                conts = [self.tokenizer.decode(row) for row in seq[:, x.shape[1]:].tolist()]
                hits += sum(has_property(c, cfg.max_line_chars) for c in conts)
                if net is model:
                    texts += conts
                    inp = seq[:, :-1]
                    lp = torch.log_softmax(model(inp).float(), -1)[:, x.shape[1] - 1:]  # (B, K, V)
                    lq = torch.log_softmax(ref(inp).float(), -1)[:, x.shape[1] - 1:]
                    kl_sum += float((lp.exp() * (lp - lq)).sum())
                    kl_n += lp.shape[0] * lp.shape[1]
            out[f"{who}property_rate"] = hits / len(prompts)
        out["kl_to_ref"] = kl_sum / kl_n
        model.train(was)
        return out, texts

    def forgetting(self, model: torch.nn.Module, device: str, autocast_dtype) -> dict[str, float]:
        """``val_bpb`` (bits per byte over the whole validation split of the corpus, windows of
        ``train.seq_len`` or ``max_seq_len`` tokens, as causal-lm reports it) of the policy and
        ``ref_val_bpb`` of the reference: what the alignment cost the language model."""
        from weightsmith.eval.metrics import evaluate_lm

        out, tb = {}, self.tokenizer.token_bytes()
        was = model.training
        model.eval()
        for who, net in (("", model), ("ref_", self.reference_for(model))):
            r = evaluate_lm(net, self.data.val, tb, self.seq_len(net.config), self.train_cfg.eval_batch_size,
                            device, autocast_dtype)
            out[f"{who}val_bpb"] = r["val_bpb"]
        model.train(was)
        return out

    def evaluate(self, model, *, device, autocast_dtype):
        return self.pair_metrics(model, self.val_pairs[:self.cfg.eval_pairs], device)

    def describe_eval(self, result):
        return (f"held-out pref_acc {result['pref_acc']:.3f}, reward_acc {result['reward_acc']:.3f}, "
                f"dpo_loss {result['dpo_loss']:.4f}")

    def finish(self, model, run_dir, *, device, autocast_dtype, log=print):
        """Held-out pair metrics, sampled property rates and KL -> eval.json; samples -> samples.txt."""
        from weightsmith.fsio import atomic_write_text

        result = {"heldout_pairs": len(self.val_pairs), **self.pair_metrics(model, self.val_pairs, device)}
        samples, texts = self.sample_metrics(model, device)
        result.update(samples, eval_samples=len(texts), sample_tokens=self.cfg.max_continuation_tokens)
        result.update(self.forgetting(model, device, autocast_dtype))
        atomic_write_text(Path(run_dir) / "eval.json", json.dumps(result, indent=2))
        prompts = [self.tokenizer.decode(p.prompt) for p in self.val_pairs[:len(texts)]]
        atomic_write_text(Path(run_dir) / "samples.txt", "".join(
            f"=== prompt {i} (property: {has_property(t, self.cfg.max_line_chars)})\n{p}>>>\n{t}\n"
            for i, (p, t) in enumerate(zip(prompts[:8], texts[:8], strict=True))))
        log("eval: " + json.dumps(result))
        return result

    def headline(self, summary):
        return (f"property_rate {summary['property_rate']:.3f} (reference {summary['ref_property_rate']:.3f}), "
                f"kl_to_ref {summary['kl_to_ref']:.4f} nats/token, pref_acc {summary['pref_acc']:.3f}")

    @classmethod
    def example_batch(cls, model_cfg, batch_size, generator):
        T = min(model_cfg.max_seq_len, 8)
        ids = torch.randint(model_cfg.vocab_size, (2 * batch_size, T + 1), generator=generator)
        mask = torch.zeros(2 * batch_size, T, dtype=torch.bool)
        mask[:, T // 2:] = True
        return ids, mask


@register_task("dpo")
class DPO(PreferenceTask):
    """Direct Preference Optimization against a frozen copy of the starting weights."""

    config_cls = DPOConfig

    def loss(self, model, batch):
        ids, mask = batch
        n = ids.shape[0] // 2
        ref = self.reference_for(model)
        pi = sequence_logprobs(model(ids[:, :-1]), ids, mask)
        with torch.no_grad():
            rf = sequence_logprobs(ref(ids[:, :-1]), ids, mask)
        loss, parts = dpo_loss(pi[:n], pi[n:], rf[:n], rf[n:], self.cfg.beta)
        return loss, {"reward_margin": parts["margin"].mean().item(),
                      "reward_chosen": parts["reward_chosen"].mean().item(),
                      "reward_rejected": parts["reward_rejected"].mean().item(),
                      "reward_acc": (parts["margin"] > 0).float().mean().item()}

    def flops_per_unit(self, family: str, model_cfg: Any) -> float:
        """Policy training FLOPs plus one reference forward per token (2 per multiply-add)."""
        from weightsmith.analysis import flops_per_token

        return (flops_per_token(family, model_cfg, self._seq_len, training=True)
                + flops_per_token(family, model_cfg, self._seq_len, training=False))


@register_task("sft")
class SFT(PreferenceTask):
    """Supervised fine-tuning on the chosen continuations (the DPO baseline)."""

    config_cls = PreferenceConfig
    uses_rejected = False

    def loss(self, model, batch):
        ids, mask = batch
        self.reference_for(model)  # the starting weights, kept for the final KL
        logp = torch.log_softmax(model(ids[:, :-1]).float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return -(logp * mask).sum() / mask.sum(), {}
