"""Tokenizing validated fine-tuning data into `Example`s whose weights mark the tokens the model
learns to produce (chat: each weight-1 assistant turn through its end-of-turn token; prompt /
completion: the completion and eos), plus the (prompt, reference) pairs learning curves score.
Validation itself is `data.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .data import (CHAT, MAX_LINE_BYTES, PROMPT_COMPLETION, Record, ValidationReport, _describe,
                   _text, validate_jsonl)
from .types import Example

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
