"""Schema fuzzing: Schemathesis sends generated requests to every operation in the app's own
`/openapi.json` (examples, coverage and fuzzing phases, valid and invalid data). Each response
must not be a 5xx, nor carry a `server_error` event inside a 200 stream. It must match its
declared schema, and every 4xx must be OpenAI's error envelope. A router added later gets fuzzed
with no change here. Not covered: stateful sequences (create a file, then fetch it), and whether
invalid data is rejected, since unknown fields are accepted and ignored, as OpenAI does.
"""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from shoal.api.app import create_app
from shoal.settings import ServerSettings
from shoal.store import Store

MODEL = "tiny"
MAX_EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", 25))
"""Fuzzing-phase cases per operation (examples and coverage cases come on top); raise to dig."""
SEED = int(os.environ.get("SHOAL_FUZZ_SEED", 1234))
CAPS = {"max_tokens": 8, "max_completion_tokens": 8, "min_tokens": 8, "n": 2, "best_of": 2}
"""Generation stays cheap: larger values in generated bodies are lowered to these."""


def _name_the_served_model(schema: dict) -> None:
    """Valid data names the served model in `model` (a body field or a path parameter), so cases
    reach generation instead of stopping at 404 `model_not_found`; invalid data still sends
    other names."""
    served = {"type": "string", "const": MODEL}
    for comp in schema.get("components", {}).get("schemas", {}).values():
        prop = comp.get("properties", {}).get("model")
        if prop is not None and prop.get("type") == "string":
            comp["properties"]["model"] = {**served, "title": prop.get("title", "Model")}
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            for p in op.get("parameters", []):
                if p.get("name") == "model" and p.get("schema", {}).get("type") == "string":
                    p["schema"] = dict(served)


@pytest.fixture(scope="module")
def fuzz_app(server, tmp_path_factory):
    """(app, key): an app over the session engine with its own store, no rate limit, and one
    admin key, so fuzzed deletes and usage never touch the shared server's data."""
    home = tmp_path_factory.mktemp("fuzz_home")
    store = Store.open(f"sqlite:///{home}/shoal.db")
    key, _ = store.create_key("fuzz", admin=True)
    app = create_app(server[1], MODEL, store, ServerSettings.from_env(home=home))
    _name_the_served_model(app.openapi())  # edits the cached schema that /openapi.json serves
    return app, key


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app):
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "request-timeout": 5,  # a few tokens take well under a second; a hang fails in 5 s
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    })
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app[0], config=config)


@pytest.fixture(scope="module")
def fuzz_auth(fuzz_app):
    return {"Authorization": f"Bearer {fuzz_app[1]}"}


@pytest.fixture(autouse=True)
def _lazy_schema_on_pytest_9_2(request):
    """Schemathesis 4.32's lazy loader reads `Node._nodeid`, which pytest 9.2 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def openai_error_envelope(ctx, response, case) -> None:
    """A 4xx body is `{"error": {"message": str, "type", "param", "code"}}` (never FastAPI's 422
    `detail`); a 200 event stream carries no `server_error` event (a failure after the headers)."""
    if 400 <= response.status_code < 500:
        try:
            body = json.loads(response.content)
        except ValueError:
            raise AssertionError(f"{response.status_code} body is not JSON: {response.content[:200]!r}")
        err = body.get("error") if isinstance(body, dict) else None
        assert isinstance(err, dict) and isinstance(err.get("message"), str), \
            f"{response.status_code} body is not OpenAI's error envelope: {body!r}"[:500]
        assert {"type", "param", "code"} <= err.keys(), f"error lacks type/param/code: {err!r}"
    elif "text/event-stream" in response.headers.get("content-type", [""])[0]:
        for line in response.content.decode("utf-8", "replace").splitlines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert (event.get("error") or {}).get("type") != "server_error", \
                    f"server error inside a 200 stream: {event['error']!r}"


def _cheap(case) -> None:
    """Lower generation limits in a generated body to `CAPS` and give a chat without one a limit
    (it would run to the context length). In valid data, also turn `logprobs` on where
    `top_logprobs` needs it (a rule the schema cannot state), so those cases reach generation."""
    body = case.body
    if not isinstance(body, dict):
        return
    for name, cap in CAPS.items():
        v = body.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > cap:
            body[name] = cap
    if case.operation.path == "/v1/chat/completions":
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = CAPS["max_tokens"]
        if (case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE
                and body.get("top_logprobs") is not None):
            body["logprobs"] = True


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
def test_api_schema(case, fuzz_auth):
    _cheap(case)
    case.call_and_validate(headers=fuzz_auth, checks=[not_a_server_error, response_schema_conformance,
                                                      openai_error_envelope])
