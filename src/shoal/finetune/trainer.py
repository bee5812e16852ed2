"""The LoRA trainer: epochs of shuffled, packed batches, AdamW on the LoRA weights, checkpoints.

`Trainer.run` trains, reports metrics through a callback, writes a checkpoint at every epoch end
(and on pause), resumes from the newest one, and saves the final adapter in PEFT format. Same
data, seed and config on the same machine give identical adapter bytes, with or without
interruptions. Not here: data validation, "auto" hyperparameters, job bookkeeping (the worker).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..lora.peft_format import save_adapter
from .lora_train import TrainableLoRA, apply_trainable_lora
from .packing import run_batch
from .types import Example

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Config fields that do not change the adapter: resuming under other values is allowed (a change
# of any other field is refused, since the result would not equal an uninterrupted run).
_EVAL_FIELDS = ("eval_every", "valid_batch_size")


@dataclass(slots=True)
class TrainConfig:
    """Hyperparameters of one LoRA fine-tuning run."""

    n_epochs: int = 3
    """Passes over the training examples."""
    batch_size: int = 8
    """Examples per optimizer step (the last batch of an epoch may be smaller)."""
    learning_rate: float = 2e-4
    """Peak learning rate (absolute, not a multiplier)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming up linearly from ~0 to learning_rate."""
    lr_schedule: str = "linear"
    """Decay after warmup: `linear` or `cosine`, reaching 0 one step after the last."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on the LoRA weights."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA alpha; scaling = lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input during training."""
    target_modules: list[str] | str | None = None
    """Leaf names or paths, a regex, or None / "all-linear" (every linear layer but lm_head)."""
    seed: int = 0
    """Seeds LoRA init, data order and dropout."""
    max_tokens_per_micro: int = 4096
    """Split a batch into micro-batches of at most this many tokens (gradients accumulate)."""
    eval_every: int = 10
    """Validation loss on a fixed small batch every this many steps (0 = never)."""
    valid_batch_size: int | None = None
    """Examples in that fixed validation batch; None = batch_size."""

    def __post_init__(self) -> None:
        for name in ("n_epochs", "batch_size", "lora_r"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be positive, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_schedule not in ("linear", "cosine"):
            raise ValueError(f"lr_schedule: must be 'linear' or 'cosine', got {self.lr_schedule!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay/max_grad_norm: must not be negative")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every: must not be negative, got {self.eval_every}")
        if self.valid_batch_size is not None and self.valid_batch_size <= 0:
            raise ValueError(f"valid_batch_size: must be positive, got {self.valid_batch_size}")
        self.adam_betas = tuple(self.adam_betas)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)


@dataclass(slots=True)
class TrainResult:
    """How a run ended. `adapter_path` is set only when it succeeded."""

    status: str  # succeeded | paused | cancelled
    adapter_path: str | None
    steps: int
    total_steps: int
    trained_tokens: int
    """Tokens of the examples trained so far (prompt + completion), summed over epochs."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def data_fingerprint(examples: list[Example]) -> str:
    """sha256 over the tokens and weights of `examples`, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(repr((ex.tokens, ex.weights)).encode())
    return h.hexdigest()


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete `checkpoints/step-N` directory (temporaries are never named so)."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [(int(m[1]), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name))
             and os.path.isfile(os.path.join(root, name, STATE_NAME))]
    return os.path.join(root, max(steps)[1]) if steps else None


class Trainer:
    """Trains a LoRA adapter on `model` (left unchanged afterwards: layers are unwrapped).

    Args:
        model: our Transformer, on the device and in the dtype to train in.
        train, valid: tokenized examples; valid may be None or empty.
        config: the hyperparameters.
        out_dir: checkpoints/, adapter/ go here.
        base_model_name_or_path: recorded in the saved adapter_config.json.
    """

    def __init__(self, model, train: list[Example], valid: list[Example] | None, config: TrainConfig,
                 out_dir: str, *, base_model_name_or_path: str | None = None) -> None:
        if not train:
            raise ValueError("train: no training examples")
        self.model, self.train, self.valid = model, list(train), list(valid or [])
        self.config, self.out_dir = config, out_dir
        self.base_model_name_or_path = base_model_name_or_path
        self.device = next(model.parameters()).device
        self.steps_per_epoch = -(-len(self.train) // config.batch_size)
        self.total_steps = self.steps_per_epoch * config.n_epochs
        self.warmup_steps = math.ceil(config.warmup_ratio * self.total_steps)
        self._fingerprint = data_fingerprint(self.train)
        k = config.valid_batch_size or config.batch_size
        g = torch.Generator().manual_seed(_mix(config.seed, -1))
        pick = torch.randperm(len(self.valid), generator=g)[:k].sort().values.tolist()
        self.valid_batch = [self.valid[i] for i in pick]

    # ---- schedule and data order -------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        lr, warm = self.config.learning_rate, self.warmup_steps
        if step < warm:
            return lr * (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, self.total_steps - warm)
        if self.config.lr_schedule == "cosine":
            return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return lr * (1.0 - progress)

    def epoch_order(self, epoch: int) -> list[int]:
        """The shuffled example order of `epoch`, from (seed, epoch) only."""
        g = torch.Generator().manual_seed(_mix(self.config.seed, epoch))
        return torch.randperm(len(self.train), generator=g).tolist()

    def batch_at(self, step: int) -> list[Example]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        bs = self.config.batch_size
        return [self.train[i] for i in self.epoch_order(epoch)[pos * bs:(pos + 1) * bs]]

    # ---- the loop ------------------------------------------------------------------------

    def run(self, on_event: Callable[[dict], None] | None = None,
            should_stop: Callable[[], str | None] | None = None, resume: bool = True) -> TrainResult:
        """Train to the end, or until should_stop() says "pause" / "cancel" (polled each step).

        Events: {"type": "metrics", ...} per step, {"type": "checkpoint", ...} per checkpoint.
        With resume, continues from the newest checkpoint in out_dir, bit-exactly.
        """
        cfg, emit = self.config, on_event or (lambda e: None)
        lora = apply_trainable_lora(self.model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                    lora_dropout=cfg.lora_dropout,
                                    target_modules=cfg.target_modules, seed=cfg.seed)
        try:
            opt = torch.optim.AdamW(lora.parameters(), lr=cfg.learning_rate, betas=cfg.adam_betas,
                                    eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                    foreach=self.device.type == "cuda")
            s = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "metrics": [], "checkpoints": []}
            ckpt = latest_checkpoint(self.out_dir) if resume else None
            if ckpt is not None:
                s = self._load_checkpoint(ckpt, lora, opt)
            start = time.perf_counter() - s["elapsed_s"]
            while s["step"] < self.total_steps:
                stop = should_stop() if should_stop is not None else None
                if stop in ("pause", "cancel"):
                    if stop == "pause" and s["step"] > 0:
                        self._checkpoint(lora, opt, s, emit)
                    return self._result("paused" if stop == "pause" else "cancelled", None, s)
                metrics = self._train_step(lora, opt, s, start)
                emit({"type": "metrics", **metrics})
                if s["step"] % self.steps_per_epoch == 0:
                    self._checkpoint(lora, opt, s, emit)
            path = os.path.join(self.out_dir, "adapter")
            save_adapter(path, lora.to_adapter("adapter", self.base_model_name_or_path))
            return self._result("succeeded", path, s)
        finally:
            lora.unwrap()

    def _train_step(self, lora: TrainableLoRA, opt: torch.optim.Optimizer, s: dict,
                    start: float) -> dict:
        cfg, step = self.config, s["step"]
        batch = self.batch_at(step)
        lora.train(True)
        stats = run_batch(self.model, batch, cfg.max_tokens_per_micro, self.device)
        lr = self.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        params = lora.parameters()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=self.device.type == "cuda")
        opt.step()
        opt.zero_grad(set_to_none=True)
        s["step"] = step = step + 1
        s["tokens"] += stats.n_tokens
        s["elapsed_s"] = time.perf_counter() - start
        m = {"step": step, "total_steps": self.total_steps,
             "epoch": (step - 1) // self.steps_per_epoch + 1, "train_loss": stats.loss,
             "train_mean_token_accuracy": stats.accuracy, "learning_rate": lr,
             "tokens": s["tokens"], "elapsed_s": s["elapsed_s"]}
        if self.valid and cfg.eval_every and step % cfg.eval_every == 0:
            m["valid_loss"], m["valid_mean_token_accuracy"] = self._evaluate(lora, self.valid_batch)
        if self.valid and step % self.steps_per_epoch == 0:
            m["full_valid_loss"], m["full_valid_mean_token_accuracy"] = self._evaluate(lora, self.valid)
        s["metrics"].append(m)
        return m

    @torch.no_grad()
    def _evaluate(self, lora: TrainableLoRA, examples: list[Example]) -> tuple[float, float]:
        """Mean loss and token accuracy over all targets of `examples` (no dropout, no grads)."""
        lora.train(False)
        loss_sum, hits, total = 0.0, 0.0, 0
        bs = self.config.batch_size
        for i in range(0, len(examples), bs):
            chunk = examples[i:i + bs]
            st = run_batch(self.model, chunk, self.config.max_tokens_per_micro, self.device,
                           backward=False)
            loss_sum += st.loss * max(st.n_targets, 1)
            hits += st.accuracy * max(st.n_targets, 1)
            total += st.n_targets
        return loss_sum / max(total, 1), hits / max(total, 1)

    def _result(self, status: str, path: str | None, s: dict) -> TrainResult:
        return TrainResult(status, path, s["step"], self.total_steps, s["tokens"],
                           list(s["metrics"]), list(s["checkpoints"]))

    # ---- checkpoints ---------------------------------------------------------------------

    def _checkpoint(self, lora: TrainableLoRA, opt: torch.optim.Optimizer, s: dict,
                    emit: Callable[[dict], None]) -> None:
        """Write checkpoints/step-N atomically (tmp dir + rename) and emit its event."""
        step = s["step"]
        root = os.path.join(self.out_dir, "checkpoints")
        final = os.path.join(root, f"step-{step}")
        if os.path.isfile(os.path.join(final, STATE_NAME)):
            return  # e.g. pause right after an epoch-end checkpoint
        os.makedirs(root, exist_ok=True)
        metrics = s["metrics"][-1] if s["metrics"] else {}
        record = {"step": step, "path": final, "metrics": metrics}
        state = {
            "version": 1, "step": step, "epoch": step // self.steps_per_epoch,
            "batch_in_epoch": step % self.steps_per_epoch, "tokens": s["tokens"],
            "elapsed_s": s["elapsed_s"], "metrics": s["metrics"],
            "checkpoints": [*s["checkpoints"], record], "lora": lora.state_dict(),
            "optimizer": opt.state_dict(),
            "dropout_rng": lora.dropout_gen.get_state() if lora.dropout_gen is not None else None,
            "config": _config_dict(self.config), "data": self._fingerprint,
        }
        tmp = tempfile.mkdtemp(prefix=f".step-{step}.tmp-", dir=root)
        try:
            save_adapter(os.path.join(tmp, "adapter"),
                         lora.to_adapter("adapter", self.base_model_name_or_path))
            torch.save(state, os.path.join(tmp, STATE_NAME))
            if os.path.isdir(final):
                shutil.rmtree(final)  # an incomplete leftover without trainer_state.pt
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        s["checkpoints"].append(record)
        emit({"type": "checkpoint", **record})

    def _load_checkpoint(self, path: str, lora: TrainableLoRA, opt: torch.optim.Optimizer) -> dict:
        state = torch.load(os.path.join(path, STATE_NAME), map_location="cpu", weights_only=True)
        saved, now = state["config"], _config_dict(self.config)
        for name in now:
            if name not in _EVAL_FIELDS and saved.get(name) != now[name]:
                raise ValueError(f"{name}: the checkpoint {path} was written with {saved.get(name)!r}, "
                                 f"the config says {now[name]!r}; resume=False starts over")
        if state["data"] != self._fingerprint:
            raise ValueError(f"train: the checkpoint {path} was written for other training data")
        lora.load_state_dict(state["lora"])
        opt.load_state_dict(state["optimizer"])
        if lora.dropout_gen is not None:
            lora.dropout_gen.set_state(state["dropout_rng"])
        return {k: state[k] for k in ("step", "tokens", "elapsed_s", "metrics", "checkpoints")}


def _mix(seed: int, salt: int) -> int:
    """A 63-bit generator seed from (seed, salt), stable across processes."""
    h = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    d = asdict(config)
    d["adam_betas"] = list(d["adam_betas"])
    return d


def total_train_tokens(train: list[Example], n_epochs: int) -> int:
    """What a run bills: every token of every example, once per epoch."""
    return sum(len(ex) for ex in train) * n_epochs


__all__ = ["TrainConfig", "TrainResult", "Trainer", "latest_checkpoint", "total_train_tokens"]
