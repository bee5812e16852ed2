"""Fine-tuning jobs as the API shows them, and the steps the API and the worker share: loading
and validating a job's files, resolving its hyperparameters, naming its models.

Lifecycle: `validating_files` (the API validates in the background) -> `queued` (a worker claims
it) -> `running` -> `succeeded` | `failed` | `cancelled`, with `paused` <-> `queued` in between.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..blobs import BlobStore
from .data import ValidationReport
from .dataset import load_dataset
from .hyperparams import OPENAI_KEYS, resolve_hyperparameters
from .types import Example

TRAIN_MAX_LEN = 2048
"""Longest training example (tokens); longer ones are truncated and counted."""


def fine_tuned_name(base: str, org_name: str, suffix: str | None, job_id: str) -> str:
    """`ft:{base}:{org}:{suffix}:{8 chars of the job id}` (an empty suffix gives `::`)."""
    return f"ft:{base}:{org_name}:{suffix or ''}:{job_id.split('-', 1)[-1][:8]}"


def checkpoint_name(model: str, step: int) -> str:
    return f"{model}:ckpt-step-{step}"


def _hyperparameters(job) -> dict:
    h = dict(job.resolved or {})
    if not h:
        h = {k: (job.hyperparameters or {}).get(k, "auto") for k in OPENAI_KEYS}
    return h


def job_object(job) -> dict:
    """The OpenAI `fine_tuning.job` object (LoRA settings ride along in `hyperparameters`)."""
    h = _hyperparameters(job)
    running = job.status == "running"
    return {
        "object": "fine_tuning.job", "id": job.id, "created_at": int(job.created_at),
        "model": job.model, "organization_id": job.org_id, "status": job.status,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "error": job.error if job.status == "failed" else None,
        "hyperparameters": h, "result_files": list(job.result_files or []),
        "trained_tokens": job.trained_tokens, "training_file": job.training_file,
        "validation_file": job.validation_file, "seed": job.seed,
        "estimated_finish": int(job.estimated_finish) if running and job.estimated_finish else None,
        "integrations": [], "metadata": job.metadata_, "user_provided_suffix": job.suffix,
        "method": {"type": "supervised", "supervised": {"hyperparameters": h}},
    }


def event_object(ev) -> dict:
    return {"object": "fine_tuning.job.event", "id": ev.id, "created_at": int(ev.created_at),
            "level": ev.level, "message": ev.message, "type": ev.type, "data": ev.data or {}}


def checkpoint_object(ck) -> dict:
    return {"object": "fine_tuning.job.checkpoint", "id": ck.id, "created_at": int(ck.created_at),
            "fine_tuned_model_checkpoint": ck.model_name, "fine_tuning_job_id": ck.job_id,
            "metrics": ck.metrics or {}, "step_number": ck.step}


@dataclass
class JobData:
    """A job's tokenized files and what validation found."""

    train: list[Example]
    valid: list[Example]
    report: ValidationReport
    valid_report: ValidationReport | None
    hyperparameters: dict

    @property
    def error(self) -> dict | None:
        return self.report.error() or (self.valid_report.error() if self.valid_report else None)


def load_job_data(store, blobs: BlobStore, job, tokenizer, max_len: int) -> JobData:
    """Read and validate the job's files (owned by its org) and resolve its hyperparameters.
    A missing file is reported like bad data, on the file's param."""
    def read(file_id: str, param: str) -> tuple[ValidationReport, list[Example]]:
        row = store.get_file(job.org_id, file_id)
        if row is None:
            r = ValidationReport(param=param)
            r.add("file_not_found", 0, f"{param} {file_id} does not exist (deleted?)")
            return r, []
        return load_dataset(blobs.read(row.sha256), tokenizer, max_len=max_len, param=param)

    report, train = read(job.training_file, "training_file")
    valid_report, valid = None, []
    if job.validation_file:
        valid_report, valid = read(job.validation_file, "validation_file")
    resolved = resolve_hyperparameters(job.hyperparameters, report.n_examples, report.n_tokens)
    return JobData(train, valid, report, valid_report, resolved)


def validate_job(store, blobs: BlobStore, job, tokenizer, max_len: int) -> None:
    """The API's validation phase: queue the job, or fail it with the data error (and an
    error-level event). A cancel that arrived meanwhile wins."""
    store.add_event(job.id, f"Validating training file: {job.training_file}"
                    + (f" and validation file: {job.validation_file}" if job.validation_file else ""))
    try:
        data = load_job_data(store, blobs, job, tokenizer, max_len)
    except Exception as e:  # an unreadable blob or a tokenizer failure: the job fails, not us
        data, err = None, {"code": "invalid_training_file", "message": f"{type(e).__name__}: {e}",
                           "param": "training_file"}
    else:
        err = data.error
    if err is not None:
        done = store.transition_job(job.id, ("validating_files",), status="failed", error=err,
                                    finished_at=time.time())
        if done is not None:
            store.add_event(job.id, err["message"], level="error")
        return
    r = data.report
    resolved = data.hyperparameters
    done = store.transition_job(job.id, ("validating_files",), status="queued", resolved=resolved)
    if done is not None:
        msg = (f"Files validated, moving job to queued state ({r.n_examples} examples, "
               f"{r.n_tokens} tokens, format {r.format}")
        msg += f"; {r.n_truncated} truncated to {max_len} tokens)" if r.n_truncated else ")"
        store.add_event(job.id, msg, data={"n_examples": r.n_examples, "n_tokens": r.n_tokens,
                                           "n_truncated": r.n_truncated,
                                           "n_dropped": r.n_dropped, "hyperparameters": resolved})
