"""The FastAPI app: one engine (a base model and its adapters), the store, and the routers.

`create_app(engine, model_name, store, settings)` wires the services every route shares
(`deps.Services`): served models, authentication, rate limits, metering and metrics. Every
response carries `x-request-id`; streams send `: ping` comment lines while the engine is busy
elsewhere, and a client that goes away cancels its handler, which aborts its engine requests.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from ..engine.async_engine import AsyncEngine
from ..serving.chat import ChatService
from ..serving.completions import CompletionService
from ..serving.models import ServedModels
from ..serving.tokenize import TokenizeService
from ..settings import ServerSettings
from . import errors
from .auth import Authenticator
from .deps import Services
from .metering import Meter
from .metrics import Metrics
from .middleware import RequestMiddleware
from .ratelimit import RateLimiter
from .routes import curves, files, fine_tuning, inference, playground, usage


def _lifespan(app: FastAPI):
    @contextlib.asynccontextmanager
    async def lifespan(_):
        # jobs left in validation by a previous run are validated again
        s = app.state.shoal
        files.blobs_of(s)
        jobs, _more = s.store.list_jobs(None, limit=10000)
        for job in jobs:
            if job.status == "validating_files" and job.model == s.models.base_name:
                fine_tuning.spawn_validation(s, job)
        running, _more = s.store.list_curves(None, limit=100)
        for c in running:  # learning curves followed by a previous run
            if c.status == "running" and (c.request or {}).get("model") == s.models.base_name:
                curves.spawn_follow(s, c.id)
        yield
    return lifespan


def create_app(engine: AsyncEngine, model_name: str, store, settings: ServerSettings | None = None,
               model_source: str | None = None) -> FastAPI:
    """The app serving `engine` as `model_name`; adapters already in the engine are shared by all
    orgs; `store` is a `shoal.store.Store`. `model_source` (default the engine config's model:
    a registry name or a path) is how worker processes load the same base model."""
    settings = settings or ServerSettings.from_env()
    app = FastAPI(title="Shoal", version="0.1.0",
                  description="OpenAI-compatible API for self-hosted GPT-style models.")
    app.router.lifespan_context = _lifespan(app)
    errors.install(app)
    models = ServedModels(engine, model_name, store)
    if engine.engine.lora is not None:
        models.system_adapters.update(engine.engine.lora.list_adapters())
    metrics, limiter = Metrics(), RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
    app.state.shoal = Services(
        engine=engine, models=models, store=store, settings=settings,
        auth=Authenticator(store, loopback=settings.loopback), limiter=limiter, metrics=metrics,
        meter=Meter(store, limiter, metrics), completions=CompletionService(engine),
        chat=ChatService(engine), tokenizer=TokenizeService(engine))
    app.state.shoal.extra["model_source"] = model_source or engine.engine.config.model
    app.state.engine = engine
    for r in (inference.router, files.router, fine_tuning.router, curves.router, usage.router,
              playground.router):
        app.include_router(r)
    app.add_middleware(RequestMiddleware, metrics=metrics)
    return app
