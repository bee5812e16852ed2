"""The connection to a running server that every client command shares: `--base-url` and
`--api-key` (with their environment defaults), the `Server` handle (the official `openai` client
for OpenAI's endpoints, httpx for our extensions), and turning any API or connection failure
into one clear line. Not here: the commands themselves (`client.py`, `finetune.py`, `bench.py`).
"""

from __future__ import annotations

import argparse
import functools
import os

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
TIMEOUT_S = 600.0  # a long completion or an upload may take minutes; connecting may not
CONNECT_S = 5.0


def add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None,
                   help=f"the server's API URL (default $SHOAL_BASE_URL, $OPENAI_BASE_URL or "
                        f"{DEFAULT_BASE_URL})")
    p.add_argument("--api-key", default=None,
                   help="API key (default $SHOAL_API_KEY, $OPENAI_API_KEY, or EMPTY for a server "
                        "in open mode)")


def base_url(args: argparse.Namespace) -> str:
    url = (getattr(args, "base_url", None) or os.environ.get("SHOAL_BASE_URL")
           or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL)
    return url.rstrip("/")


def api_key(args: argparse.Namespace) -> str:
    return (getattr(args, "api_key", None) or os.environ.get("SHOAL_API_KEY")
            or os.environ.get("OPENAI_API_KEY") or "EMPTY")


def _line(message: str, param: str | None, status: int | None) -> str:
    msg = " ".join(str(message).split())  # one line, whatever the server sent
    if param and not msg.startswith(f"{param}:"):
        msg += f" (param {param})"
    if status == 401:
        msg += " (give a key with --api-key or $SHOAL_API_KEY)"
    return msg


def error_line(e: Exception, url: str) -> str:
    """One line for any failure talking to the server at `url`."""
    import openai

    if isinstance(e, (openai.APITimeoutError, httpx.TimeoutException)):
        return f"the server at {url} did not answer in time"
    if isinstance(e, (openai.APIConnectionError, httpx.TransportError)):
        return f"cannot reach the server at {url}: is `shoal serve` running?"
    if isinstance(e, openai.APIError):
        status = getattr(e, "status_code", None)
        body = e.body if isinstance(e.body, dict) else {}
        message = body.get("message")
        if not message:
            message = (f"HTTP {status} from {url}: {str(e.body)[:200]}" if status
                       else e.message)
        return _line(message, body.get("param"), status)
    if isinstance(e, ServerError):
        return str(e)
    return f"{type(e).__name__}: {e}"


class ServerError(ValueError):
    """An error response from one of our extension endpoints (httpx)."""


def talks_to_server(fn):
    """Run a command; any API or connection error becomes a ValueError with one clear line
    (printed by `main` as `shoal: error: ...`)."""
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        import openai

        try:
            return fn(args)
        except ServerError:
            raise
        except (openai.APIError, httpx.HTTPError) as e:
            if os.environ.get("SHOAL_DEBUG"):
                raise
            raise ValueError(error_line(e, base_url(args))) from None
    return run


class Server:
    """The server a command talks to: `.openai` (the official client) and `get`/`post`/`delete`
    for our extensions (JSON in and out; error responses raise ServerError)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import openai

        self.url, self.key = base_url(args), api_key(args)
        self.openai = openai.OpenAI(base_url=self.url, api_key=self.key, max_retries=0,
                                    timeout=openai.Timeout(TIMEOUT_S, connect=CONNECT_S))
        self.http = httpx.Client(headers={"authorization": f"Bearer {self.key}"},
                                 timeout=httpx.Timeout(TIMEOUT_S, connect=CONNECT_S))

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        r = self.http.request(method, self.url + path, **kw)
        if r.is_error:
            try:
                err = r.json().get("error") or {}
            except ValueError:
                err = {}
            if not isinstance(err, dict) or not err.get("message"):
                err = {"message": f"HTTP {r.status_code} from {self.url}{path}: {r.text[:200]}"}
            raise ServerError(_line(err["message"], err.get("param"), r.status_code))
        return r

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params).json()

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, json=body).json()

    def default_model(self) -> str:
        """The server's base model: the first model it lists."""
        models = self.openai.models.list().data
        base = [m.id for m in models if m.owned_by == "system"] or [m.id for m in models]
        if not base:
            raise ValueError(f"model: the server at {self.url} lists no models; give --model")
        return base[0]
