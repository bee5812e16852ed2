"""The fine-tuning jobs API (OpenAI's shapes): create, list, retrieve, cancel, pause, resume,
events and checkpoints. A job belongs to its org; another org gets 404 for it.

Creating a job checks the request (400 naming the field), stores it as `validating_files`, and
validates its files in the background with the served model's tokenizer; a worker process then
claims it from the store's queue.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from ...finetune.hyperparams import merge_hyperparameters
from ...finetune.jobs import (TRAIN_MAX_LEN, checkpoint_object, event_object, job_object,
                              validate_job)
from ...serving.errors import ServingError, from_value_error, model_not_found
from ..auth import Principal
from ..deps import caller, services
from .files import blobs

router = APIRouter()
log = logging.getLogger("shoal.api")
SUFFIX = re.compile(r"^[A-Za-z0-9._-]{0,64}$")


class FineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None


def _int_param(request: Request, name: str, default: int, hi: int = 10000) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= hi:
        raise ServingError(400, f"{name}: must be an integer in [1, {hi}]", param=name)
    return int(raw)


def not_found(job_id: str) -> ServingError:
    return ServingError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id",
                        code="fine_tuning_job_not_found")


def _check_file(store, org_id: str, file_id: str, param: str) -> None:
    row = store.get_file(org_id, file_id)
    if row is None:
        raise ServingError(400, f"{param}: invalid file {file_id} (no such file)", param=param,
                           code="invalid_file")
    if row.purpose != "fine-tune":
        raise ServingError(400, f"{param}: {file_id} has purpose {row.purpose!r}; upload it with "
                                f"purpose 'fine-tune'", param=param, code="invalid_file")


def check_lora(s, hp: dict) -> None:
    """LoRA settings the serving engine can take: rank within its max_lora_rank, target modules
    that are linear layers of the model (400 naming the field otherwise)."""
    from ...lora.layers import default_targets

    cfg = s.engine.engine.config
    r = hp.get("r")
    if isinstance(r, (int, float)) and r > cfg.max_lora_rank:
        raise ServingError(400, f"hyperparameters.r: {r} exceeds this server's max_lora_rank "
                                f"({cfg.max_lora_rank}); the model could not be served",
                           param="hyperparameters.r")
    tm = hp.get("target_modules")
    if isinstance(tm, list):
        paths = default_targets(s.engine.engine.model)
        known = set(paths) | {p.rsplit(".", 1)[-1] for p in paths}
        bad = [t for t in tm if t not in known]
        if bad:
            raise ServingError(400, f"hyperparameters.target_modules: {bad[0]!r} is not a linear "
                                    f"layer of {s.models.base_name} (e.g. "
                                    f"{', '.join(sorted({p.rsplit('.', 1)[-1] for p in paths}))})",
                               param="hyperparameters.target_modules")


async def start_validation(s, job) -> None:
    """Validate `job`'s files off the event loop; errors land on the job, never here."""
    tok = s.engine.tokenizer
    max_len = min(s.engine.engine.max_model_len, TRAIN_MAX_LEN)
    try:
        await asyncio.to_thread(validate_job, s.store, s.extra["blobs"], job, tok, max_len)
    except Exception:
        log.exception("validating %s failed", job.id)


def spawn_validation(s, job) -> None:
    tasks = s.extra.setdefault("validations", set())
    t = asyncio.get_running_loop().create_task(start_validation(s, job))
    tasks.add(t)
    t.add_done_callback(tasks.discard)


@router.post("/v1/fine_tuning/jobs")
async def create_job(body: FineTuningJobRequest, request: Request, who: Principal = Depends(caller)):
    """Create a fine-tuning job from uploaded JSONL files."""
    s = services(request)
    blobs(request)  # make sure the blob store exists for the validation task
    if body.model != s.models.base_name:
        raise model_not_found(body.model)
    if body.suffix and not SUFFIX.match(body.suffix):
        raise ServingError(400, "suffix: letters, digits, '.', '_' and '-' only (up to 64)",
                           param="suffix")
    try:
        hp = merge_hyperparameters(body.hyperparameters, body.method)
    except ValueError as e:
        raise from_value_error(e) from None
    check_lora(s, hp)
    await asyncio.to_thread(_check_file, s.store, who.org_id, body.training_file, "training_file")
    if body.validation_file:
        await asyncio.to_thread(_check_file, s.store, who.org_id, body.validation_file,
                                "validation_file")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    job = await asyncio.to_thread(
        s.store.create_job, who.org_id, body.model, body.training_file,
        validation_file=body.validation_file, suffix=body.suffix, seed=seed,
        metadata=body.metadata, hyperparameters=hp,
        extra={"model_source": s.extra.get("model_source"), "org_name": who.org_name})
    await asyncio.to_thread(s.store.add_event, job.id, f"Created fine-tuning job: {job.id}")
    spawn_validation(s, job)
    return job_object(job)


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, who: Principal = Depends(caller)):
    """Your organization's jobs, newest first (`after`, `limit`, `metadata[k]=v`)."""
    q = request.query_params
    meta = {k[9:-1]: v for k, v in q.items() if k.startswith("metadata[") and k.endswith("]")}
    jobs, more = await asyncio.to_thread(services(request).store.list_jobs, who.org_id,
                                         q.get("after"), _int_param(request, "limit", 20), meta or None)
    return {"object": "list", "data": [job_object(j) for j in jobs], "has_more": more}


async def _job(request: Request, who: Principal, job_id: str):
    job = await asyncio.to_thread(services(request).store.get_job, who.org_id, job_id)
    if job is None:
        raise not_found(job_id)
    return job


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, request: Request, who: Principal = Depends(caller)):
    """One job."""
    return job_object(await _job(request, who, job_id))


async def _act(request: Request, who: Principal, job_id: str, action: str) -> dict:
    s = services(request)
    fn = {"cancel": s.store.request_cancel, "pause": s.store.request_pause,
          "resume": s.store.resume_job}[action]
    job = await asyncio.to_thread(fn, who.org_id, job_id)
    if job is None:
        raise not_found(job_id)
    await asyncio.to_thread(s.store.add_event, job.id, f"{action.capitalize()} requested")
    return job_object(job)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, who: Principal = Depends(caller)):
    """Cancel a job (a running one stops within one training step)."""
    return await _act(request, who, job_id, "cancel")


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
async def pause_job(job_id: str, request: Request, who: Principal = Depends(caller)):
    """Pause a job: it checkpoints within one step and waits for resume."""
    return await _act(request, who, job_id, "pause")


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
async def resume_job(job_id: str, request: Request, who: Principal = Depends(caller)):
    """Resume a paused job from its checkpoint."""
    return await _act(request, who, job_id, "resume")


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, request: Request, who: Principal = Depends(caller)):
    """The job's events, newest first (`after`, `limit`)."""
    await _job(request, who, job_id)
    events, more = await asyncio.to_thread(services(request).store.list_events, job_id,
                                           request.query_params.get("after"),
                                           _int_param(request, "limit", 20))
    return {"object": "list", "data": [event_object(e) for e in events], "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request, who: Principal = Depends(caller)):
    """The job's checkpoints (one per epoch), newest first; each is a usable model."""
    await _job(request, who, job_id)
    cks, more = await asyncio.to_thread(services(request).store.list_checkpoints, job_id,
                                        request.query_params.get("after"),
                                        _int_param(request, "limit", 10))
    data = [checkpoint_object(c) for c in cks]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}
