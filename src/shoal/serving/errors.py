"""ServingError: an OpenAI-style error (status, message, type, param, code) raised by serving/
and rendered by the API as `{"error": {...}}`. Engine ValueErrors name their field first
(`"max_tokens: ..."`), which becomes `param`."""

from __future__ import annotations

import re


class ServingError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def from_value_error(e: ValueError, param_map: dict[str, str] | None = None) -> ServingError:
    """400 naming the field the engine named (mapped to the request's own field name)."""
    msg = str(e)
    m = _FIELD.match(msg)
    param = m.group(1) if m else None
    if param and param_map:
        param = param_map.get(param, param)
    code = "context_length_exceeded" if "max_model_len" in msg else "invalid_value"
    return ServingError(400, msg, param=param, code=code)


def model_not_found(model: str) -> ServingError:
    return ServingError(404, f"The model `{model}` does not exist or you do not have access to it.",
                        param="model", code="model_not_found")
