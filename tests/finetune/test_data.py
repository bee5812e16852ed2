"""Fine-tuning data: every error class with its line, the job error it becomes, and tokenized
examples whose target tokens decode to exactly the assistant messages (or the completion) and
their end-of-turn marker."""

from __future__ import annotations

import json
import time

import pytest

from shoal.finetune.data import ValidationReport, validate_jsonl
from shoal.finetune.dataset import load_dataset, reference_completions, tokenize_examples
from shoal.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def chat(i: int = 0) -> dict:
    return {"messages": [{"role": "system", "content": "Label the review."},
                         {"role": "user", "content": f"Review: great movie {i}"},
                         {"role": "assistant", "content": "Label: <POS>"}]}


def pc(i: int = 0) -> dict:
    return {"prompt": f"Translate English to German: cheese {i} =>", "completion": " Käse"}


def jsonl(*lines) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"


def with_bad_line(bad, n: int = 12, at: int = 3, make=chat) -> bytes:
    lines = [make(i) for i in range(n)]
    lines[at - 1] = bad
    return jsonl(*lines)


def targets(tok, ex) -> str:
    return tok.decode([t for t, w in zip(ex.tokens, ex.weights) if w])


# ---- validation -------------------------------------------------------------------------------

def test_valid_chat_file(tok):
    report, examples = load_dataset(jsonl(*[chat(i) for i in range(10)]), tok, max_len=128)
    assert report.ok and report.error() is None
    assert (report.n_lines, report.n_examples, report.format) == (10, 10, "chat")
    assert len(examples) == 10 and [e.line for e in examples] == list(range(1, 11))
    assert report.n_tokens == sum(len(e) for e in examples)
    assert report.n_target_tokens == sum(e.n_targets for e in examples) > 0
    assert all(e.weights[0] == 0 for e in examples)


def msgs(*ms):
    return {"messages": list(ms)}


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}

CHAT_ERRORS = [
    ("data_type", "[1, 2]"),
    ("data_type", '"a string"'),
    ("data_type", msgs(U, "not a message", A)),
    ("missing_messages_list", {"text": "hi"}),
    ("missing_messages_list", {"messages": []}),
    ("missing_messages_list", {"messages": "hi"}),
    ("message_missing_key", msgs({"content": "hi"}, A)),
    ("message_missing_key", msgs(U, {"role": "assistant"})),
    ("message_unrecognized_key", msgs(U, {**A, "tool_calls": []})),
    ("unrecognized_role", msgs({"role": "robot", "content": "hi"}, A)),
    ("unrecognized_role", msgs({"role": "tool", "content": "hi"}, A)),
    ("missing_content", msgs({"role": "user", "content": ""}, A)),
    ("missing_content", msgs(U, {"role": "assistant", "content": None})),
    ("missing_content", msgs(U, {"role": "assistant", "content": [{"type": "image_url"}]})),
    ("missing_content", msgs(U, {"role": "assistant", "content": []})),
    ("example_missing_assistant_message", msgs(U, {"role": "system", "content": "x"})),
    ("invalid_weight", msgs({**U, "weight": 1}, A)),
    ("invalid_weight", msgs(U, {**A, "weight": 2})),
    ("invalid_weight", msgs(U, {**A, "weight": True})),
    ("invalid_weight", msgs(U, {**A, "weight": "1"})),
    ("invalid_json", '{"messages": [}'),
    ("invalid_json", "role,content"),
    ("invalid_json", '{"messages": []} {"messages": []}'),
]


@pytest.mark.parametrize("key,bad", CHAT_ERRORS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CHAT_ERRORS)])
def test_chat_error_class_names_its_line(key, bad):
    report, records = validate_jsonl(with_bad_line(bad))
    assert key in report.errors, report.errors
    assert report.errors[key].first_line == 3 and report.errors[key].count == 1
    assert not report.ok and len(records) == 11
    err = report.error()
    assert err["code"] == "invalid_training_file" and err["param"] == "training_file"
    assert err["message"].startswith(f"Line 3: {key} (1 example, first at line 3): ")


PC_ERRORS = [
    ("prompt_completion_missing_key", {"prompt": "a"}),
    ("prompt_completion_not_string", {"prompt": 1, "completion": "b"}),
    ("missing_completion", {"prompt": "a", "completion": ""}),
    ("prompt_completion_missing_key", {"text": "a"}),  # neither format, in a prompt file
]


@pytest.mark.parametrize("key,bad", PC_ERRORS)
def test_prompt_completion_error_classes(key, bad):
    report, _ = validate_jsonl(with_bad_line(bad, make=pc))
    assert list(report.errors) == [key] and report.errors[key].first_line == 3
    assert report.format == "prompt_completion"


def test_count_and_first_line_over_several_lines():
    lines = [chat(i) for i in range(12)]
    lines[4] = lines[8] = msgs({"content": "hi"}, A)
    lines[6] = "[]"
    report, _ = validate_jsonl(jsonl(*lines))
    e = report.errors["message_missing_key"]
    assert (e.count, e.first_line) == (2, 5)
    assert e.message == "message 1 has no 'role'; each message needs 'role' and 'content'"
    msg = report.error()["message"]
    assert msg.startswith("Line 5: message_missing_key (2 examples, first at line 5): message 1 "
                          "has no 'role'; each message needs 'role' and 'content'")
    assert "Also: data_type (1 example, first at line 7)" in msg


def test_mixed_formats_names_the_first_line_that_differs():
    report, records = validate_jsonl(jsonl(*[chat(i) for i in range(5)], pc(), chat(), pc()))
    e = report.errors["mixed_formats"]
    assert (e.count, e.first_line, report.format) == (2, 6, "chat")
    assert "(line 1)" in e.message and len(records) == 6


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tok):
    lines = [chat(i) for i in range(10)]
    data = (jsonl(*lines[:3]) + b"\n   \n\r\n" + jsonl(*lines[3:]).replace(b"\n", b"\r\n"))
    report, examples = load_dataset(data, tok, max_len=128)
    assert report.ok and report.n_examples == 10 and report.n_lines == 13
    assert [e.line for e in examples] == [1, 2, 3] + list(range(7, 14))


def test_byte_order_mark_is_ignored():
    report, _ = validate_jsonl(b"\xef\xbb\xbf" + jsonl(*[chat(i) for i in range(10)]))
    assert report.ok


def test_invalid_utf8_names_the_line():
    data = jsonl(*[chat(i) for i in range(12)]).split(b"\n")
    data[3] = data[3].replace(b"great", b"gr\xe9at")  # Latin-1, not UTF-8
    report, records = validate_jsonl(b"\n".join(data))
    e = report.errors["invalid_encoding"]
    assert (e.count, e.first_line) == (1, 4) and "0xe9" in e.message
    assert len(records) == 11
    assert report.error()["message"].startswith("Line 4: invalid_encoding")


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_empty_file(data):
    report, records = validate_jsonl(data)
    assert list(report.errors) == ["empty_file"] and not records and not report.ok
    err = report.error()
    assert err["code"] == "invalid_training_file" and err["message"].startswith("empty_file: ")


def test_not_jsonl():
    """A pretty-printed JSON array (or a CSV) fails on its first line."""
    data = json.dumps([chat(i) for i in range(10)], indent=2).encode()
    report, _ = validate_jsonl(data)
    assert report.errors["invalid_json"].first_line == 1
    assert report.error()["message"].startswith("Line 1: invalid_json")
    report, _ = validate_jsonl(b"prompt,completion\nhello,world\n")
    assert report.errors["invalid_json"].count == 2


def test_megabyte_line_fails_fast_with_its_line():
    big = {"prompt": "a" * (1 << 20), "completion": " b"}
    data = jsonl(*[pc(i) for i in range(11)], big)
    t0 = time.perf_counter()
    report, records = validate_jsonl(data)
    assert time.perf_counter() - t0 < 1.0
    e = report.errors["line_too_long"]
    assert (e.count, e.first_line) == (1, 12) and len(records) == 11
    assert report.error()["message"].startswith("Line 12: line_too_long")
    report, _ = validate_jsonl(data, max_line_bytes=2 << 20)  # the limit is a parameter
    assert report.ok


@pytest.mark.parametrize("param,what", [("training_file", "Training"),
                                        ("validation_file", "Validation")])
def test_too_few_examples(tok, param, what):
    report, examples = load_dataset(jsonl(*[chat(i) for i in range(7)]), tok, max_len=128,
                                    param=param)
    assert not report.ok and not report.errors and len(examples) == 7
    assert report.error() == {
        "code": "invalid_n_examples", "param": param,
        "message": f"{what} file has 7 example(s), but must have at least 10 examples"}
    report, _ = load_dataset(jsonl(*[chat(i) for i in range(7)]), tok, max_len=128,
                             min_examples=1)
    assert report.ok


def test_load_dataset_never_raises(tok):
    for data in [b"\x00\xff" * 100, b"{" * 100_000, b"null\n" * 20, jsonl(*[{}] * 20)]:
        report, examples = load_dataset(data, tok, max_len=64)
        assert not report.ok and examples == [] and report.error()["code"]


def test_report_round_trips_through_json(tok):
    report, _ = validate_jsonl(with_bad_line("[1]"))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is False and d["error"] == report.error()
    assert d["errors"]["data_type"] == {"count": 1, "first_line": 3,
                                        "message": report.errors["data_type"].message}
    assert ValidationReport.from_dict(d) == report


# ---- tokenization -----------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Label the review."},
    {"role": "user", "content": "Review: boring plot"},
    {"role": "assistant", "content": "Label: <NEG>"},
    {"role": "user", "content": "Hello, world!"},
    {"role": "assistant", "content": [{"type": "text", "text": "How are"},
                                      {"type": "text", "text": " you today?"}]},
    {"role": "user", "content": "Der schnelle braune Fuchs springt."},
    {"role": "assistant", "content": "The quick brown fox jumps.", "weight": 0},
]


def test_chat_targets_decode_to_assistant_messages_and_end_markers(tok):
    (ex,), n_truncated = tokenize_examples([{"messages": CONVERSATION}], tok, max_len=512)
    assert n_truncated == 0
    assert targets(tok, ex) == "Label: <NEG><|im_end|>How are you today?<|im_end|>"
    # the rest is the template's rendering, token for token
    assert list(ex.tokens) == tok.encode_chat([{"role": m["role"], "content": m["content"]
                                                if isinstance(m["content"], str) else
                                                "".join(p["text"] for p in m["content"])}
                                               for m in CONVERSATION], add_generation_prompt=False)


def test_weight_zero_assistant_messages_are_not_targets(tok):
    m = [dict(CONVERSATION[1]), {**CONVERSATION[2], "weight": 0}, CONVERSATION[3],
         {"role": "assistant", "content": "Hello", "weight": 1}]
    (ex,), _ = tokenize_examples([{"messages": m}], tok, max_len=512)
    assert targets(tok, ex) == "Hello<|im_end|>"


def test_all_weight_zero_example_is_dropped(tok):
    data = jsonl(*[chat(i) for i in range(10)], msgs(U, {**A, "weight": 0}))
    report, examples = load_dataset(data, tok, max_len=512)
    assert report.ok and (report.n_examples, report.n_dropped, report.n_truncated) == (10, 1, 0)
    assert len(examples) == 10


def test_truncation_keeps_the_start_and_counts(tok):
    long = msgs({"role": "user", "content": "The quick brown fox. " * 3},
                {"role": "assistant", "content": "Hello, world! " * 20})
    only_prompt = msgs({"role": "user", "content": "The quick brown fox. " * 20}, A)
    data = jsonl(*[chat(i) for i in range(10)], long, only_prompt)
    full = tok.encode_chat([{"role": "user", "content": "The quick brown fox. " * 3},
                            {"role": "assistant", "content": "Hello, world! " * 20}],
                           add_generation_prompt=False)
    report, examples = load_dataset(data, tok, max_len=60)
    assert len(full) > 60
    assert (report.n_truncated, report.n_dropped, report.n_examples) == (2, 1, 11)
    cut = examples[-1]
    assert cut.line == 11 and cut.tokens == tuple(full[:60]) and 0 < cut.n_targets < 60
    assert report.n_tokens == sum(len(e) for e in examples)
    assert max(len(e) for e in examples) == 60


def test_dropped_examples_can_leave_too_few(tok):
    data = jsonl(*[chat(i) for i in range(9)],
                 msgs({"role": "user", "content": "Hello, world! " * 30}, A))
    report, _ = load_dataset(data, tok, max_len=60)
    assert report.error()["code"] == "invalid_n_examples" and "1 dropped" in report.error()["message"]


def test_prompt_completion_tokens_and_weights(tok):
    rec = pc()
    (ex,), _ = tokenize_examples([rec], tok, max_len=512, fmt="prompt_completion")
    p, c = tok.encode(rec["prompt"]), tok.encode(rec["completion"], add_special_tokens=False)
    assert list(ex.tokens) == p + c + [tok.eos_token_id]
    assert list(ex.weights) == [0] * len(p) + [1] * (len(c) + 1)
    assert targets(tok, ex) == " Käse<|im_end|>"
    report, examples = load_dataset(jsonl(*[pc(i) for i in range(10)]), tok, max_len=512)
    assert report.ok and report.format == "prompt_completion" and len(examples) == 10


def test_special_tokens_in_data_are_refused(tok):
    bad = msgs({"role": "user", "content": "hi<|im_end|>"}, A)
    report, examples = load_dataset(with_bad_line(bad), tok, max_len=512)
    assert examples == [] and report.errors["invalid_token"].first_line == 3
    assert "'<|im_end|>'" in report.error()["message"]
    with pytest.raises(ValueError, match="Line 1: invalid_token"):
        tokenize_examples([bad], tok, max_len=512)


def test_reference_completions():
    _, records = validate_jsonl(jsonl({"messages": CONVERSATION}, pc()))
    (p1, c1), = reference_completions(records[:1])
    assert c1 == "The quick brown fox jumps." and len(p1) == 6
    assert p1[4] == {"role": "assistant", "content": "How are you today?"}
    assert reference_completions([pc()]) == [(pc()["prompt"], " Käse")]


@pytest.mark.real_model
def test_chat_targets_with_the_real_tokenizer(default_home):
    tok = Tokenizer.from_dir(str(default_home / "models" / "SmolLM2-135M-Instruct"))
    convs = [CONVERSATION,
             [{"role": "user", "content": "東京は？"}, {"role": "assistant", "content": "日本の首都 🐟"}],
             [{"role": "assistant", "content": "I speak first."}, U, A]]  # default system prompt
    expected = ["Label: <NEG><|im_end|>How are you today?<|im_end|>",
                "日本の首都 🐟<|im_end|>", "I speak first.<|im_end|>hello<|im_end|>"]
    examples, _ = tokenize_examples([{"messages": c} for c in convs], tok, max_len=2048)
    assert [targets(tok, e) for e in examples] == expected
