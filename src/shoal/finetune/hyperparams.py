"""Fine-tuning hyperparameters: validate a request's values, merge the two places a job request
may give them, and resolve "auto" into concrete numbers from the dataset size.

The OpenAI keys are `n_epochs`, `batch_size` and `learning_rate_multiplier` (each a number or
"auto"); Shoal adds the LoRA keys `r`, `lora_alpha` and `target_modules`. Not here: whether `r`
fits the server's `max_lora_rank` or `target_modules` names layers of the model (the trainer
knows the model), nor the optimizer schedule.
"""

from __future__ import annotations

import math
from typing import Any

AUTO = "auto"
ALL_LINEAR = "all-linear"

BASE_LR = 2e-4
"""The LoRA trainer's learning rate is `BASE_LR * learning_rate_multiplier` (2e-4 is the usual
LoRA rate for small models: the PEFT, QLoRA and litgpt recipes use 1e-4 to 3e-4)."""

TARGET_EPOCHS, MIN_EPOCHS, MAX_EPOCHS = 3, 1, 25  # the "auto" n_epochs rule (openai-api.md 4.7)
MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 100, 25_000  # n_examples * n_epochs stays in here
BATCH_FRACTION, MAX_BATCH = 0.002, 256  # legacy "~0.2% of the examples, capped at 256"

DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR}
OPENAI_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")
KEYS = OPENAI_KEYS + tuple(DEFAULTS)


def _is_int(v: Any) -> bool:
    """An int (not a bool), or a float with an integral value (JSON `3.0`)."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(path: str, v: Any, lo: int, hi: int) -> None:
    if v != AUTO and not (_is_int(v) and lo <= v <= hi):
        raise ValueError(f'{path}: must be an integer in [{lo}, {hi}] or "auto" (got {v!r})')


def validate_hyperparameters(h: Any, *, prefix: str = "hyperparameters") -> None:
    """Check a request's hyperparameters; raise ValueError naming the field (`prefix.key`).

    Every key accepts "auto" (or null, which means "auto"). `n_epochs`: integer in [1, 50];
    `batch_size`: integer in [1, 256]; `learning_rate_multiplier`: number in (0, 10];
    `r`: integer in [1, 256]; `lora_alpha`: number > 0; `target_modules`: "all-linear" or a
    non-empty list of layer names (`q_proj`) or paths. Unknown keys are refused.

    Args:
        h: the hyperparameters object of the request.
        prefix: the field path used in messages (`method.supervised.hyperparameters`).
    """
    if h is None:
        return
    if not isinstance(h, dict):
        raise ValueError(f"{prefix}: must be an object (got {type(h).__name__})")
    for key, v in h.items():
        path = f"{prefix}.{key}"
        if key not in KEYS:
            raise ValueError(f"{path}: unknown hyperparameter (allowed: {', '.join(KEYS)})")
        if v is None or v == AUTO:
            continue
        if key == "n_epochs":
            _check_int(path, v, 1, 50)
        elif key == "batch_size":
            _check_int(path, v, 1, MAX_BATCH)
        elif key == "r":
            _check_int(path, v, 1, 256)
        elif key == "learning_rate_multiplier":
            if not (_is_number(v) and 0 < v <= 10):
                raise ValueError(f'{path}: must be a number in (0, 10] or "auto" (got {v!r})')
        elif key == "lora_alpha":
            if not (_is_number(v) and v > 0):
                raise ValueError(f'{path}: must be a number > 0 or "auto" (got {v!r})')
        elif key == "target_modules":
            ok_list = (isinstance(v, list) and v
                       and all(isinstance(m, str) and m.strip() for m in v))
            if v != ALL_LINEAR and not ok_list:
                raise ValueError(f'{path}: must be "all-linear" or a non-empty list of layer '
                                 f"names (got {v!r})")


def merge_hyperparameters(top_level: dict | None, method: dict | None) -> dict:
    """The job's hyperparameters from the top-level `hyperparameters` (deprecated upstream, still
    accepted) and `method.supervised.hyperparameters`; both are validated.

    A key given in only one place is taken from there; the same value in both is fine; "auto" (or
    null) in one place yields to a value in the other; two different values are a conflict
    (ValueError naming `method.supervised.hyperparameters.<key>`). Only `method.type` ==
    "supervised" is accepted (ValueError naming `method.type`); a missing `method` means
    supervised.

    Args:
        top_level: the request's `hyperparameters`, or None.
        method: the request's whole `method` object (`{"type", "supervised": {...}}`), or None.
    """
    prefix = "method.supervised.hyperparameters"
    inner: dict | None = None
    if method is not None:
        if not isinstance(method, dict):
            raise ValueError(f"method: must be an object (got {type(method).__name__})")
        mtype = method.get("type")
        if mtype != "supervised":
            raise ValueError(f"method.type: only \"supervised\" is supported (got {mtype!r})")
        sup = method.get("supervised")
        if sup is not None and not isinstance(sup, dict):
            raise ValueError(f"method.supervised: must be an object (got {type(sup).__name__})")
        inner = (sup or {}).get("hyperparameters")
    validate_hyperparameters(top_level, prefix="hyperparameters")
    validate_hyperparameters(inner, prefix=prefix)
    merged = {k: v for k, v in (top_level or {}).items() if v is not None}
    for k, v in (inner or {}).items():
        if v is None:
            continue
        old = merged.get(k)
        if old is None or old == AUTO or old == v:
            merged[k] = v
        elif v != AUTO:
            raise ValueError(f"{prefix}.{k}: {v!r} conflicts with hyperparameters.{k} = {old!r}")
    return merged


def resolve_hyperparameters(requested: dict | None, n_examples: int, n_tokens: int = 0) -> dict:
    """Concrete values for every key: explicit values are kept, "auto" follows these rules.

    - `n_epochs`: 3, raised to `min(25, ceil(100 / n))` when `3n < 100` and lowered to
      `max(1, floor(25000 / n))` when `3n > 25000`, so `n * n_epochs` lies in [100, 25000]
      (anchors.md; openai-api.md 4.7, whose cookbook code floors the first case and so gives 3
      epochs, 99 examples seen, at n = 33: we round up to honour the 100 floor).
    - `batch_size`: `clamp(round(0.002 * n), 1, 256)`, the only published formula (the legacy
      /v1/fine-tunes "~0.2% of the examples, capped at 256"; openai-api.md 4.7). It gives 1 up to
      749 examples, as observed on new-API jobs with small datasets, and 20 at 10,000.
    - `learning_rate_multiplier`: 1.0. OpenAI's legacy 0.05-0.2 multiplies a base-model rate we
      do not share; ours multiplies `BASE_LR` (2e-4), already tuned for LoRA at small batch sizes,
      so "auto" is that rate itself (openai-api.md 4.7: "auto -> 1.0 is a reasonable default").
    - `r` 8, `lora_alpha` 16, `target_modules` "all-linear".

    Args:
        requested: validated hyperparameters (from `merge_hyperparameters`); None = all auto.
        n_examples: examples that will train (after validation and truncation).
        n_tokens: tokens in those examples; the published rules do not use it (kept so a
            token-aware rule can come without changing callers).
    """
    validate_hyperparameters(requested)
    req = {k: v for k, v in (requested or {}).items() if v is not None and v != AUTO}
    n = max(int(n_examples), 1)

    epochs = TARGET_EPOCHS
    if n * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_EPOCHS, -(-MIN_TARGET_EXAMPLES // n))
    elif n * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // n)
    batch = min(max(math.floor(BATCH_FRACTION * n + 0.5), 1), MAX_BATCH)

    out = {
        "n_epochs": int(req.get("n_epochs", epochs)),
        "batch_size": int(req.get("batch_size", batch)),
        "learning_rate_multiplier": float(req.get("learning_rate_multiplier", 1.0)),
        "r": int(req.get("r", DEFAULTS["r"])),
        "lora_alpha": req.get("lora_alpha", DEFAULTS["lora_alpha"]),
        "target_modules": req.get("target_modules", DEFAULTS["target_modules"]),
    }
    if isinstance(out["target_modules"], list):
        out["target_modules"] = list(out["target_modules"])
    return out


def learning_rate(resolved: dict) -> float:
    """The trainer's peak learning rate for resolved hyperparameters."""
    return BASE_LR * float(resolved["learning_rate_multiplier"])
