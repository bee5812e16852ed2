"""Every non-2xx response in OpenAI's envelope: serving errors, validation failures (400 naming
the field, never FastAPI's 422 body), unknown routes, and unexpected exceptions (500)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..serving.errors import ServingError

log = logging.getLogger("shoal.api")


def envelope(status: int, message: str, type_: str = "invalid_request_error",
             param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def _serving(_: Request, e: ServingError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        # union types report every branch; the field is the common prefix of the location
        param = _param([p for p in err.get("loc", ()) if not str(p).startswith(("list[", "str", "int"))])
        msg = err.get("msg", "invalid value")
        return envelope(400, f"{param or 'body'}: {msg}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return envelope(404, f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")
        if e.status_code == 405:
            return envelope(405, f"Method {request.method} not allowed on {request.url.path}")
        return envelope(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("unhandled error")
        return envelope(500, f"The server had an error while processing your request "
                             f"({type(e).__name__})", type_="server_error")
