"""Learning curves (our extension): `POST /v1/fine_tuning/learning_curves`, list, retrieve,
cancel, and `GET .../{id}/plot` (SVG). A curve's points are ordinary fine-tuning jobs of the org
(in the jobs list, billed the same); a task in this process follows them, then evaluates every
point on the hold-out through the engine and fits the curve.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ...curves import service
from ...curves.plot import render_svg
from ...finetune.hyperparams import merge_hyperparameters
from ...serving.errors import ServingError, from_value_error, model_not_found
from ..auth import Principal
from ..deps import caller, services
from .files import blobs_of
from .fine_tuning import check_lora, spawn_validation

router = APIRouter()
log = logging.getLogger("shoal.api")
POLL_S = 0.5
PREFIX = "/v1/fine_tuning/learning_curves"


class LearningCurveRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    sizes: list[int] | None = None
    fractions: list[float] | None = None
    hyperparameters: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metric: str = "exact_match"
    target_error: float | None = None


def curve_object(c) -> dict:
    req, res = c.request or {}, c.result or {}
    return {"object": "fine_tuning.learning_curve", "id": c.id, "created_at": int(c.created_at),
            "status": c.status, "model": req.get("model"), "training_file": req.get("training_file"),
            "validation_file": req.get("validation_file"), "metric": req.get("metric"),
            "sizes": req.get("sizes"), "seed": req.get("seed"),
            "target_error": req.get("target_error"), "hyperparameters": req.get("hyperparameters"),
            "jobs": req.get("jobs", []), "points": res.get("points", []), "fit": res.get("fit"),
            "prediction": res.get("prediction"), "error": c.error,
            "finished_at": int(c.finished_at) if c.finished_at else None}


def _read_file(s, org_id: str, file_id: str, param: str) -> bytes:
    row = s.store.get_file(org_id, file_id)
    if row is None:
        raise ServingError(400, f"{param}: invalid file {file_id} (no such file)", param=param,
                           code="invalid_file")
    return blobs_of(s).read(row.sha256)


def _create(s, who: Principal, body: LearningCurveRequest) -> object:
    """Validate, plan, write the subset files and point jobs (runs in a thread)."""
    if body.metric not in service.METRICS:
        raise ServingError(400, f"metric: must be one of {', '.join(service.METRICS)}", param="metric")
    if body.target_error is not None and not 0 < body.target_error < 1:
        raise ServingError(400, "target_error: must be in (0, 1)", param="target_error")
    try:
        hp = merge_hyperparameters(body.hyperparameters, None)
    except ValueError as e:
        raise from_value_error(e) from None
    check_lora(s, hp)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    train = _read_file(s, who.org_id, body.training_file, "training_file")
    valid = (_read_file(s, who.org_id, body.validation_file, "validation_file")
             if body.validation_file else None)
    try:
        plan = service.plan_curve(train, valid, sizes=body.sizes, fractions=body.fractions, seed=seed)
    except ValueError as e:
        raise from_value_error(e) from None
    request = {"model": body.model, "training_file": body.training_file,
               "validation_file": body.validation_file, "metric": body.metric, "seed": seed,
               "sizes": plan.sizes, "target_error": body.target_error, "hyperparameters": hp,
               "n_holdout": plan.n_holdout}
    curve = s.store.create_curve(who.org_id, request, status="running")

    def put(data: bytes, name: str) -> str:
        sha, size = blobs_of(s).put_bytes(data)
        return s.store.add_file(who.org_id, name, "fine-tune", size, sha).id

    holdout = body.validation_file or put(plan.holdout, f"{curve.id}-holdout.jsonl")
    jobs = []
    for n, data in zip(plan.sizes, plan.subsets):
        job = s.store.create_job(
            who.org_id, body.model, put(data, f"{curve.id}-n{n}.jsonl"), validation_file=holdout,
            suffix=f"curve-n{n}", seed=seed, metadata={"learning_curve": curve.id, "n": str(n)},
            hyperparameters=hp, curve_id=curve.id,
            extra={"model_source": s.extra.get("model_source"), "org_name": who.org_name})
        s.store.add_event(job.id, f"Created fine-tuning job {job.id} for learning curve {curve.id} "
                                  f"({n} examples)")
        jobs.append(job)
    request.update(jobs=[j.id for j in jobs], holdout_file=holdout)
    return s.store.update_curve(curve.id, request=request), jobs


async def follow(s, curve_id: str) -> None:
    """Track a curve's point jobs to the end, then evaluate and fit (idempotent on restart)."""
    try:
        await _follow(s, curve_id)
    except Exception as e:
        log.exception("learning curve %s failed", curve_id)
        await asyncio.to_thread(s.store.update_curve, curve_id, status="failed", finished_at=time.time(),
                                error={"code": "server_error", "message": f"{type(e).__name__}: {e}"})


async def _follow(s, curve_id: str) -> None:
    store = s.store
    while True:
        curve = await asyncio.to_thread(store.get_curve, None, curve_id)
        if curve is None or curve.status != "running":
            return
        req = curve.request
        jobs = [await asyncio.to_thread(store.get_job, None, j) for j in req["jobs"]]
        points = []
        for n, job in zip(req["sizes"], jobs):
            m = service.final_metrics(await asyncio.to_thread(store.all_events, job.id))
            err = {"valid_loss": m.get("full_valid_loss"),
                   "token_error": (1 - m["full_valid_mean_token_accuracy"])
                   if m.get("full_valid_mean_token_accuracy") is not None else None}.get(req["metric"])
            points.append({"n_examples": n, "error": err if job.status == "succeeded" else None,
                           "valid_loss": m.get("full_valid_loss"), "job_id": job.id,
                           "model": job.fine_tuned_model, "status": job.status})
        bad = [j for j in jobs if j.status in ("failed", "cancelled")]
        if bad:
            err = {"code": "point_failed", "message": f"point job {bad[0].id} {bad[0].status}: "
                                                      f"{(bad[0].error or {}).get('message', '')}"}
            await asyncio.to_thread(store.update_curve, curve_id, status="failed", error=err,
                                    result={"points": points}, finished_at=time.time())
            return
        if all(j.status == "succeeded" for j in jobs):
            if req["metric"] == "exact_match":
                holdout = await asyncio.to_thread(_read_file, s, curve.org_id, req["holdout_file"],
                                                  "validation_file")
                adapters = [(await s.models.resolve(p["model"], curve.org_id)).adapter
                            for p in points]  # registers each point's adapter with the engine
                errors = await service.exact_match_errors(s.engine, holdout, adapters)
                for p, e in zip(points, errors):
                    p["error"] = e
            result = {"points": points, **service.summarize(points, req.get("target_error"))}
            await asyncio.to_thread(store.update_curve, curve_id, status="succeeded", result=result,
                                    finished_at=time.time())
            return
        await asyncio.to_thread(store.update_curve, curve_id, result={"points": points})
        await asyncio.sleep(POLL_S)


def spawn_follow(s, curve_id: str) -> None:
    tasks = s.extra.setdefault("curves", set())
    t = asyncio.get_running_loop().create_task(follow(s, curve_id))
    tasks.add(t)
    t.add_done_callback(tasks.discard)


@router.post(PREFIX)
async def create_curve(body: LearningCurveRequest, request: Request, who: Principal = Depends(caller)):
    """Fine-tune on nested doubling subsets and predict the examples needed for a target error."""
    s = services(request)
    if body.model != s.models.base_name:
        raise model_not_found(body.model)
    curve, jobs = await asyncio.to_thread(_create, s, who, body)
    for job in jobs:
        spawn_validation(s, job)
    spawn_follow(s, curve.id)
    return curve_object(curve)


@router.get(PREFIX)
async def list_curves(request: Request, who: Principal = Depends(caller)):
    """Your organization's learning curves, newest first (`after`, `limit`)."""
    q = request.query_params
    limit = int(q["limit"]) if q.get("limit", "").isdigit() and 1 <= int(q["limit"]) <= 100 else 20
    rows, more = await asyncio.to_thread(services(request).store.list_curves, who.org_id,
                                         q.get("after"), limit)
    return {"object": "list", "data": [curve_object(c) for c in rows], "has_more": more}


async def _curve(request: Request, who: Principal, curve_id: str):
    c = await asyncio.to_thread(services(request).store.get_curve, who.org_id, curve_id)
    if c is None:
        raise ServingError(404, f"No such learning curve: {curve_id}", param="id",
                           code="learning_curve_not_found")
    return c


@router.get(PREFIX + "/{curve_id}")
async def retrieve_curve(curve_id: str, request: Request, who: Principal = Depends(caller)):
    """One learning curve with its points, fit and prediction so far."""
    return curve_object(await _curve(request, who, curve_id))


@router.post(PREFIX + "/{curve_id}/cancel")
async def cancel_curve(curve_id: str, request: Request, who: Principal = Depends(caller)):
    """Cancel the curve and its remaining point jobs."""
    s = services(request)
    c = await _curve(request, who, curve_id)
    if c.status == "running":
        for job_id in (c.request or {}).get("jobs", []):
            await asyncio.to_thread(s.store.request_cancel, who.org_id, job_id)
        c = await asyncio.to_thread(s.store.update_curve, curve_id, status="cancelled",
                                    finished_at=time.time(), cancel_requested=True)
    return curve_object(c)


@router.get(PREFIX + "/{curve_id}/plot")
async def plot_curve(curve_id: str, request: Request, who: Principal = Depends(caller)):
    """The curve and its fit as SVG (`format=svg`)."""
    fmt = request.query_params.get("format", "svg")
    if fmt != "svg":
        raise ServingError(400, "format: only svg is supported", param="format")
    c = await _curve(request, who, curve_id)
    obj = curve_object(c)
    pts = [(p["n_examples"], p["error"]) for p in obj["points"] if p.get("error") is not None]
    if len(pts) < 1:
        raise ServingError(409, "the curve has no measured points yet", code="not_ready")
    from ...curves.fit import fit_points, predict_examples

    fit = fit_points(pts) if len(pts) >= 2 else None
    pred = (predict_examples(fit, obj["target_error"], pts)
            if fit is not None and obj["target_error"] is not None else None)
    svg = render_svg(pts, fit, pred, title=f"{obj['model']}: learning curve {c.id}",
                     metric=obj["metric"])
    return Response(svg, media_type="image/svg+xml")
