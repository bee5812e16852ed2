"""Fine-tuning data: validate a JSONL file line by line, then tokenize it into `Example`s whose
weights mark the tokens the model learns to produce.

Two formats: chat (`{"messages": [...]}`, rendered with the model's own chat template; targets
are the assistant messages and the end-of-turn token after each) and the GPT-3-era
`{"prompt", "completion"}` (targets: the completion and eos). Problems are counted per error
class (the OpenAI cookbook's keys) with their first line and become the job's `error`; nothing
here raises on bad data. Not here: hyperparameters, batching or packing, the trainer.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .types import Example

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


# ---- tokenization -----------------------------------------------------------------------------

class _ExampleError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _records(records: Sequence[Record | dict]) -> list[Record]:
    return [r if isinstance(r, Record) else Record(i, r) for i, r in enumerate(records, 1)]


def _specials(tokenizer) -> tuple[set[str], set[int]]:
    """Special-token strings (refused inside data) and the ids that may end a turn."""
    hf = tokenizer.hf
    strings = set(hf.all_special_tokens) | {t.content for t in hf.added_tokens_decoder.values()
                                           if t.special}
    ids = set(tokenizer.stop_token_ids) | set(hf.all_special_ids)
    return {s for s in strings if s}, ids


def _check_tokens(texts: dict[str, str], specials: set[str]) -> None:
    for where, t in texts.items():
        for s in specials:
            if s in t:
                raise _ExampleError("invalid_token", f"{where} contains the special token {s!r}, "
                                                     f"which training data may not contain")


def _chat_example(tokenizer, msgs: list[dict], specials: set[str], end_ids: set[int]):
    """Render with the template; targets are the tokens that follow the generation prompt of
    each weight-1 assistant turn, through its first special token (the end-of-turn marker)."""
    plain = [{"role": m["role"], "content": _text(m["content"])} for m in msgs]
    _check_tokens({f"message {j}": m["content"] for j, m in enumerate(plain, 1)}, specials)

    def render(ms, gen):
        return tokenizer.apply_chat_template(ms, add_generation_prompt=gen)

    try:
        full = render(plain, False)
        enc = tokenizer.hf(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        weights = [0] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or m.get("weight", 1) == 0:
                continue
            upto = render(plain[: i + 1], False)
            if not full.startswith(upto):
                raise _ExampleError("template_error", f"message {i + 1}: the chat template renders "
                                    f"earlier turns differently later on; cannot locate the turn")
            start = -1
            if i > 0:
                before = render(plain[:i], True)
                start = len(before) if upto.startswith(before) else -1
            if start < 0:  # e.g. a template that adds a default system prompt to [assistant]
                content = plain[i]["content"]
                start = upto.rfind(content)
                start = start if start >= 0 else upto.rfind(content.strip())
            if start < 0:
                raise _ExampleError("template_error", f"message {i + 1}: the assistant content "
                                    f"is not in the rendered conversation")
            span = [k for k, (a, _) in enumerate(offsets) if start <= a < len(upto)]
            ends = [k for k in span if ids[k] in end_ids]
            if ends:
                span = [k for k in span if k <= ends[0]]
            else:  # no end-of-turn token: drop trailing whitespace scaffolding
                while span and not tokenizer.decode([ids[span[-1]]]).strip():
                    span.pop()
            for k in span:
                weights[k] = 1
    except _ExampleError:
        raise
    except Exception as e:  # a template that rejects the conversation (role order, no template)
        raise _ExampleError("template_error", f"the chat template rejected the conversation "
                                              f"({type(e).__name__}: {e})") from None
    return ids, weights


def _prompt_completion_example(tokenizer, obj: dict, specials: set[str]):
    _check_tokens({"prompt": obj["prompt"], "completion": obj["completion"]}, specials)
    p = tokenizer.encode(obj["prompt"])  # as serving encodes a completions prompt
    c = tokenizer.encode(obj["completion"], add_special_tokens=False)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return p + c + eos, [0] * len(p) + [1] * (len(c) + len(eos))


def _tokenize(records: Sequence[Record | dict], tokenizer, max_len: int, fmt: str | None,
              report: ValidationReport) -> list[Example]:
    """Tokenize into `report` (counts, and per-example errors as error classes)."""
    if max_len < 2:
        raise ValueError(f"max_len: must be at least 2 (got {max_len})")
    specials, end_ids = _specials(tokenizer)
    examples = []
    for rec in _records(records):
        obj = rec.data
        try:
            if (fmt or (CHAT if "messages" in obj else PROMPT_COMPLETION)) == CHAT:
                ids, weights = _chat_example(tokenizer, obj["messages"], specials, end_ids)
            else:
                ids, weights = _prompt_completion_example(tokenizer, obj, specials)
        except _ExampleError as e:
            report.add(e.key, rec.line, str(e))
            continue
        if weights:
            weights[0] = 0  # nothing predicts the first token
        if len(ids) > max_len:
            ids, weights = ids[:max_len], weights[:max_len]
            report.n_truncated += 1
        if not any(weights):
            report.n_dropped += 1
            continue
        examples.append(Example(tuple(ids), tuple(weights), rec.line))
        report.n_tokens += len(ids)
        report.n_target_tokens += sum(weights)
    return examples


def tokenize_examples(records: Sequence[Record | dict], tokenizer, *, max_len: int,
                      fmt: str | None = None) -> tuple[list[Example], int]:
    """Tokenize validated records; return the examples and how many were truncated.

    Chat: the conversation is rendered with the model's chat template and tokenized once; the
    targets of each assistant message whose weight is not 0 are found by rendering the
    conversation up to it with and without the generation prompt: the tokens after the prompt,
    through the template's end-of-turn token (e.g. `<|im_end|>`), so the model learns to stop.
    Role headers, system and user text are not targets. Prompt/completion: `encode(prompt) +
    encode(completion) + [eos]`, targets on the completion and eos. Examples longer than
    `max_len` keep their first `max_len` tokens; those left without a target are dropped (still
    counted as truncated). Raises ValueError on a record the template or tokenizer refuses.

    Args:
        records: `Record`s from `validate_jsonl`, or plain dicts (line = position).
        tokenizer: a `shoal.model.tokenizer.Tokenizer`.
        max_len: the training context length.
        fmt: "chat" or "prompt_completion"; None decides per record.
    """
    report = ValidationReport()
    examples = _tokenize(records, tokenizer, max_len, fmt, report)
    if report.errors:
        raise ValueError(_describe(*min(report.errors.items(), key=lambda kv: kv[1].first_line)))
    return examples, report.n_truncated


def load_dataset(data: bytes, tokenizer, *, max_len: int, param: str = "training_file",
                 min_examples: int = 10,
                 max_line_bytes: int = MAX_LINE_BYTES) -> tuple[ValidationReport, list[Example]]:
    """Validate, then tokenize. Never raises on bad data: the report says what is wrong
    (`ok`, `error()`) and the example list is then empty. After tokenizing, `n_examples` counts
    the examples that train; `min_examples` applies to them.

    Args:
        data: the JSONL file's bytes.
        tokenizer: the base model's `Tokenizer`.
        max_len: the training context length; longer examples are truncated.
        param: `training_file` or `validation_file` (for the error).
        min_examples: the fewest examples a file may have.
        max_line_bytes: the longest line accepted.
    """
    report, records = validate_jsonl(data, param=param, min_examples=min_examples,
                                     max_line_bytes=max_line_bytes)
    if report.errors:
        return report, []
    examples = _tokenize(records, tokenizer, max_len, report.format, report)
    report.n_examples = len(examples)
    return report, ([] if report.errors else examples)


def reference_completions(records: Sequence[Record | dict]) -> list[tuple[list[dict] | str, str]]:
    """(prompt, reference completion) of each record, for learning curves.

    Chat: the messages before the last assistant message (`{"role", "content"}` with string
    content) and that message's text. Prompt/completion: the two strings.
    """
    out: list[tuple[list[dict] | str, str]] = []
    for rec in _records(records):
        obj = rec.data
        if "messages" in obj:
            msgs = obj["messages"]
            last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
            prompt = [{"role": m["role"], "content": _text(m["content"])} for m in msgs[:last]]
            out.append((prompt, _text(msgs[last]["content"])))
        else:
            out.append((obj["prompt"], obj["completion"]))
    return out
