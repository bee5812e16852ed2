"""Learning-curve jobs: plan nested subsets, run each as an ordinary fine-tuning job, evaluate
every point on the same held-out set, fit, and predict the data needed for a target error.

Plan (`plan_curve`, in the request): a seeded permutation of the training records; the hold-out
is the validation file, or the permutation's first 20% (at least 10); the subsets are prefixes
of the rest, so each smaller subset lies inside the next. Each subset and the hold-out become
files of the org, and each point a job with the curve's seed and hyperparameters.

Evaluation (`evaluate_points`, in the API process once every point job has succeeded): for
`exact_match`, greedy completions of every hold-out prompt under every point's adapter, submitted
together so the engine runs them as mixed-adapter batches; the error is the fraction whose
whitespace-normalized text differs from the reference. `token_error` and `valid_loss` come from
each job's full validation pass at its last epoch.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

from ..engine.sampling_params import SamplingParams
from ..finetune.data import validate_jsonl
from ..finetune.dataset import reference_completions
from .fit import fit_points, predict_examples

METRICS = ("exact_match", "token_error", "valid_loss")
DEFAULT_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
MIN_POINT, MIN_HOLDOUT, HOLDOUT_FRACTION = 10, 10, 0.2


@dataclass
class CurvePlan:
    sizes: list[int]
    subsets: list[bytes]  # JSONL of each point's training subset
    holdout: bytes | None  # JSONL of the seeded hold-out (None: the validation file is used)
    n_holdout: int


def _lines(data: bytes, records) -> list[bytes]:
    raw = data.split(b"\n")
    return [raw[r.line - 1].rstrip(b"\r") + b"\n" for r in records]


def _records(data: bytes, param: str):
    report, records = validate_jsonl(data, param=param, min_examples=1)
    err = report.error()
    if err is not None:
        raise ValueError(f"{param}: {err['message']}")
    return records


def plan_curve(train_data: bytes, valid_data: bytes | None, *, sizes: list[int] | None,
               fractions: list[float] | None, seed: int) -> CurvePlan:
    """Split and check; ValueError naming the field (`sizes`, `fractions`, `training_file`, ...)."""
    if sizes is not None and fractions is not None:
        raise ValueError("sizes: give sizes or fractions, not both")
    records = _records(train_data, "training_file")
    perm = list(range(len(records)))
    random.Random(seed).shuffle(perm)
    holdout = None
    if valid_data is not None:
        n_hold = len(_records(valid_data, "validation_file"))
        if n_hold < MIN_HOLDOUT:
            raise ValueError(f"validation_file: has {n_hold} examples; a learning curve needs at "
                             f"least {MIN_HOLDOUT}")
        pool = perm
    else:
        n_hold = max(MIN_HOLDOUT, round(HOLDOUT_FRACTION * len(records)))
        if len(records) - n_hold < MIN_POINT:
            raise ValueError(f"training_file: has {len(records)} examples; with a hold-out of "
                             f"{n_hold} it needs at least {n_hold + MIN_POINT}")
        holdout = b"".join(_lines(train_data, [records[i] for i in sorted(perm[:n_hold])]))
        pool = perm[n_hold:]
    if sizes is None:
        fr = list(fractions) if fractions is not None else list(DEFAULT_FRACTIONS)
        if any(not 0 < f <= 1 for f in fr):
            raise ValueError("fractions: each must be in (0, 1]")
        sizes = [max(1, round(f * len(pool))) for f in fr]
        field = "fractions" if fractions is not None else "sizes"
    else:
        field = "sizes"
    if len(sizes) < 2:
        raise ValueError(f"{field}: give at least 2 points")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"{field}: sizes must be strictly increasing, got {sizes}")
    if sizes[0] < MIN_POINT:
        raise ValueError(f"{field}: the smallest point has {sizes[0]} examples; at least "
                         f"{MIN_POINT} are needed")
    if sizes[-1] > len(pool):
        raise ValueError(f"{field}: the largest point ({sizes[-1]}) exceeds the {len(pool)} "
                         f"training examples left after the hold-out")
    subsets = [b"".join(_lines(train_data, [records[i] for i in sorted(pool[:n])])) for n in sizes]
    return CurvePlan(list(sizes), subsets, holdout, n_holdout=n_hold)


def _norm(text: str) -> str:
    return " ".join(text.split())


async def exact_match_errors(engine, holdout: bytes, models: list[str | None],
                             max_tokens_extra: int = 8) -> list[float]:
    """Error of each adapter (None = base) on the hold-out: all requests submitted at once."""
    _, records = validate_jsonl(holdout, param="validation_file", min_examples=1)
    tok = engine.tokenizer
    refs = reference_completions(records)
    prompts = [tok.encode_chat(p) if isinstance(p, list) else tok.encode(p) for p, _ in refs]

    async def one(adapter, i: int, prompt: list[int], ref: str) -> bool:
        n = len(tok.encode(ref, add_special_tokens=False)) + max_tokens_extra
        params = SamplingParams(temperature=0.0, max_tokens=n)
        last = None
        async for out in engine.generate(prompt, params, f"curve-{adapter}-{i}", adapter, final_only=True):
            last = out
        return _norm(last.outputs[0].text) == _norm(ref)

    jobs = [one(a, i, p, ref) for a in models for i, (p, (_, ref)) in enumerate(zip(prompts, refs))]
    hits = await asyncio.gather(*jobs)
    k = len(prompts)
    return [1.0 - sum(hits[j * k:(j + 1) * k]) / k for j in range(len(models))]


def final_metrics(events) -> dict:
    """The last epoch-end full validation metrics among a job's events (oldest first)."""
    out = {}
    for e in events:
        d = e.data or {}
        if e.type == "metrics" and d.get("full_valid_loss") is not None:
            out = d
    return out


def summarize(points: list[dict], target_error: float | None) -> dict:
    """Fit the points' errors and predict; {} entries when there are too few points."""
    usable = [(p["n_examples"], p["error"]) for p in points if p.get("error") is not None]
    if len(usable) < 2:
        return {"fit": None, "prediction": None}
    fit = fit_points(usable)
    pred = predict_examples(fit, target_error, usable) if target_error is not None else None
    return {"fit": fit.to_dict(), "prediction": pred.to_dict() if pred else None}


def to_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()
