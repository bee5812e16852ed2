"""The playground page: `GET /` (and `/playground`) and its files under `/playground/static/`.

No authentication: the page is public static code and calls the API with the user's own key.
Only plain files directly inside the static folder are served (no subfolders, no `..`, no dot
files), with explicit content types and a same-origin Content-Security-Policy, so the page can
load nothing from elsewhere.
"""

from __future__ import annotations

import re

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ...playground import STATIC_DIR
from ...serving.errors import ServingError

router = APIRouter(include_in_schema=False)
NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
         ".ico": "image/x-icon", ".json": "application/json"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer", "cache-control": "no-cache"}


def _file(name: str) -> FileResponse:
    path = STATIC_DIR / name
    kind = TYPES.get(path.suffix.lower())
    if not NAME.match(name) or ".." in name or kind is None or not path.is_file() \
            or path.resolve().parent != STATIC_DIR:
        raise ServingError(404, f"No such playground file: {name[:100]}", code="unknown_url")
    return FileResponse(path, media_type=kind, headers=HEADERS)


@router.get("/")
@router.get("/playground")
async def page():
    """The playground page."""
    return _file("index.html")


@router.get("/playground/static/{name}")
async def static_file(name: str):
    """One of the playground's static files."""
    return _file(name)
