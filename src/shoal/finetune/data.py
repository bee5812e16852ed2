"""Fine-tuning data: validate a JSONL file line by line (tokenizing it is `dataset.py`).

Two formats: chat (`{"messages": [...]}`, rendered with the model's own chat template; targets
are the assistant messages and the end-of-turn token after each) and the GPT-3-era
`{"prompt", "completion"}` (targets: the completion and eos). Problems are counted per error
class (the OpenAI cookbook's keys) with their first line and become the job's `error`; nothing
here raises on bad data. Not here: hyperparameters, batching or packing, the trainer.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import asdict, dataclass, field
from typing import Any


MAX_LINE_BYTES = 1_000_000
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name", "weight")
CHAT, PROMPT_COMPLETION = "chat", "prompt_completion"
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


@dataclass(slots=True)
class ErrorClass:
    """One kind of problem: how many lines have it, the first (1-based), and what was wrong there."""

    count: int
    first_line: int
    message: str


@dataclass(frozen=True, slots=True)
class Record:
    """One valid line of the file: its 1-based line number and the parsed object."""

    line: int
    data: dict


@dataclass(slots=True)
class ValidationReport:
    """What validation and tokenization found; stored on the job (`to_dict`)."""

    n_lines: int = 0
    """Lines in the file, blank ones included."""
    n_examples: int = 0
    """Valid examples; after `load_dataset`, those that train (`n_dropped` fewer)."""
    format: str | None = None
    """"chat" or "prompt_completion"; None when no line shows either."""
    errors: dict[str, ErrorClass] = field(default_factory=dict)
    n_truncated: int = 0
    """Examples longer than max_len, cut to it (those then dropped included)."""
    n_dropped: int = 0
    """Examples without a target token (within max_len, or all assistant weights 0)."""
    n_tokens: int = 0
    """Tokens of the examples that train, after truncation."""
    n_target_tokens: int = 0
    param: str = "training_file"
    min_examples: int = 10

    def add(self, key: str, line: int, message: str) -> None:
        if key in self.errors:
            self.errors[key].count += 1
        else:
            self.errors[key] = ErrorClass(1, line, message)

    @property
    def ok(self) -> bool:
        return not self.errors and self.n_examples >= self.min_examples

    def error(self) -> dict | None:
        """The job's `error` object (`code`, `message`, `param`), or None when the data is fine.

        Format problems give `invalid_training_file` (for either file param) naming the error
        class of the earliest line, then any others; too few examples give `invalid_n_examples`.
        """
        if self.errors:
            ranked = sorted(self.errors.items(), key=lambda kv: kv[1].first_line)
            message = _describe(*ranked[0])
            if len(ranked) > 1:
                message += ". Also: " + "; ".join(f"{k} ({_count(e)}, first at line {e.first_line})"
                                                 for k, e in ranked[1:]) + "."
            return {"code": "invalid_training_file", "message": message, "param": self.param}
        if self.n_examples < self.min_examples:
            what = "Validation" if self.param == "validation_file" else "Training"
            message = (f"{what} file has {self.n_examples} example(s), but must have at least "
                       f"{self.min_examples} examples")
            if self.n_dropped:
                message += (f" ({self.n_dropped} dropped: no assistant or completion tokens left "
                            f"to train on within the context length)")
            return {"code": "invalid_n_examples", "message": message, "param": self.param}
        return None

    def to_dict(self) -> dict:
        """JSON-ready: the fields (errors as {class: {count, first_line, message}}), `ok`, `error`."""
        return asdict(self) | {"ok": self.ok, "error": self.error()}

    @classmethod
    def from_dict(cls, d: dict) -> "ValidationReport":
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "errors"}
        errors = {k: ErrorClass(**e) for k, e in d.get("errors", {}).items()}
        return cls(errors=errors, **fields)


def _count(e: ErrorClass) -> str:
    return f"{e.count} example{'s' if e.count != 1 else ''}"


def _describe(key: str, e: ErrorClass) -> str:
    if e.first_line <= 0:
        return f"{key}: {e.message}"
    return f"Line {e.first_line}: {key} ({_count(e)}, first at line {e.first_line}): {e.message}"


# ---- validation -------------------------------------------------------------------------------

def validate_jsonl(data: bytes, *, param: str = "training_file", min_examples: int = 10,
                   max_line_bytes: int = MAX_LINE_BYTES) -> tuple[ValidationReport, list[Record]]:
    """Parse and check a fine-tuning JSONL file without tokenizing it.

    Returns the report and the valid lines. Each problem is counted once per line under its
    class: `line_too_long`, `invalid_encoding`, `invalid_json`, `data_type`, `mixed_formats`,
    `empty_file`, the cookbook's chat classes (`missing_messages_list`, `message_missing_key`,
    `message_unrecognized_key`, `unrecognized_role`, `missing_content`,
    `example_missing_assistant_message`) plus `invalid_weight`, and for prompt/completion lines
    `prompt_completion_missing_key`, `prompt_completion_not_string`, `missing_completion`.
    Blank lines are skipped. The file's format is that of its first line that has
    `messages` (chat) or `prompt`/`completion`.

    Args:
        data: the file's bytes (UTF-8; a leading byte-order mark is ignored).
        param: the job field the file came from, for the error (`training_file`, `validation_file`).
        min_examples: fewer valid examples give `invalid_n_examples`.
        max_line_bytes: longer lines are refused unparsed (`line_too_long`).
    """
    report = ValidationReport(param=param, min_examples=min_examples)
    records: list[Record] = []
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    report.n_lines = len(lines)
    first_fmt_line = 0
    for n, raw in enumerate(lines, 1):
        if len(raw) > max_line_bytes:
            report.add("line_too_long", n, f"the line has {len(raw):,} bytes; the limit is "
                                           f"{max_line_bytes:,}")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.add("invalid_encoding", n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                              f"offset {e.start} of the line)")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "too deep"
            report.add("invalid_json", n, f"not valid JSON ({why}); each line must be one JSON "
                                          f"object (line starts with: {text.strip()[:20]!r})")
            continue
        if not isinstance(obj, dict):
            kind = _JSON_TYPES.get(type(obj), type(obj).__name__)
            report.add("data_type", n, f"the line is a JSON {kind}; each line must be a JSON object")
            continue
        fmt = CHAT if "messages" in obj else (
            PROMPT_COMPLETION if "prompt" in obj or "completion" in obj else None)
        if fmt and report.format is None:
            report.format, first_fmt_line = fmt, n
        elif fmt and fmt != report.format:
            report.add("mixed_formats", n, f"the line is in the {fmt} format but the file is in "
                                           f"the {report.format} format (line {first_fmt_line})")
            continue
        problems = (_check_prompt_completion(obj) if (fmt or report.format) == PROMPT_COMPLETION
                    else _check_chat(obj))
        for key, message in problems.items():
            report.add(key, n, message)
        if not problems:
            records.append(Record(n, obj))
    report.n_examples = len(records)
    if not records and not report.errors:
        report.add("empty_file", 0, "the file has no examples (it is empty or has only blank lines)")
    return report, records


def _text(content: Any) -> str:
    """Message content as one string: text parts are joined (as serving does)."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content)


def _check_content(where: str, content: Any) -> str | None:
    if isinstance(content, list) and content:
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                return (f"{where}: content parts must be {{'type': 'text', 'text': ...}} "
                        f"(got {p!r:.60})")
        content = _text(content)
    if not isinstance(content, str):
        return f"{where}: content must be a string or a list of text parts (got {content!r:.60})"
    return None if content else f"{where} has empty content"


def _check_chat(obj: dict) -> dict[str, str]:
    """The cookbook's per-line checks: {error class: message about its first occurrence}."""
    out: dict[str, str] = {}
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return {"missing_messages_list": "each line needs 'messages', a non-empty list"}
    has_assistant = False
    for j, m in enumerate(msgs, 1):
        where = f"message {j}"
        if not isinstance(m, dict):
            out.setdefault("data_type", f"{where} is not a JSON object")
            continue
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            out.setdefault("message_missing_key", f"{where} has no {missing[0]!r}; each message "
                                                  f"needs 'role' and 'content'")
        extra = [k for k in m if k not in MESSAGE_KEYS]
        if extra:
            out.setdefault("message_unrecognized_key", f"{where} has the key {extra[0]!r}; "
                           f"messages may have {', '.join(map(repr, MESSAGE_KEYS))}")
        role = m.get("role")
        if "role" in m and role not in ROLES:
            out.setdefault("unrecognized_role", f"{where} has the role {role!r:.40}; roles are "
                                                f"{', '.join(map(repr, ROLES))}")
        if "content" in m and (problem := _check_content(where, m["content"])):
            out.setdefault("missing_content", problem)
        if "weight" in m:
            w = m["weight"]
            if role != "assistant":
                out.setdefault("invalid_weight", f"{where}: 'weight' is only allowed on "
                                                 f"assistant messages")
            elif isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
                out.setdefault("invalid_weight", f"{where} has the weight {w!r:.20}; it must be 0 or 1")
        has_assistant |= role == "assistant"
    if not has_assistant:
        out["example_missing_assistant_message"] = "the example has no assistant message"
    return out


def _check_prompt_completion(obj: dict) -> dict[str, str]:
    missing = [k for k in ("prompt", "completion") if k not in obj]
    if missing:
        return {"prompt_completion_missing_key": f"the line has no {missing[0]!r}; each line "
                                                 f"needs 'prompt' and 'completion'"}
    if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
        return {"prompt_completion_not_string": "'prompt' and 'completion' must be strings"}
    if not obj["completion"]:
        return {"missing_completion": "'completion' is empty"}
    return {}
