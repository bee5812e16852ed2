"""End to end with the official `openai` client against a live server (tiny model): models,
completions (n, best_of, logprobs, echo, stop, seed, token prompts, streaming with usage), chat
(streamed and not), tokenize, errors in OpenAI's envelope, and disconnects freeing KV blocks."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from shoal.engine.json_guide import START, feed
from shoal.serving.common import FINGERPRINT


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model" and m.owned_by == "system"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("ft:nope:x")
    assert e.value.code == "model_not_found"


def test_completion_basic_shape_and_usage(client):
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.system_fingerprint == FINGERPRINT
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_defaults_to_16_tokens(client):
    r = client.completions.create(model="tiny", prompt="The", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_n_and_multiple_prompts_index_order(client):
    r = client.completions.create(model="tiny", prompt=["a b", "c d"], n=2, max_tokens=4,
                                  temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]


def test_best_of_returns_n_and_counts_every_sample(client):
    """best_of=3, n=1: one choice; usage counts the three samples' tokens (OpenAI: best_of
    "can quickly consume your token quota"), here 3 x 4 (ignore_eos)."""
    r = client.completions.create(model="tiny", prompt="x", n=1, best_of=3, max_tokens=4, temperature=1,
                                  extra_body={"ignore_eos": True})
    assert len(r.choices) == 1
    assert r.usage.completion_tokens == 12


def test_seed_gives_same_text(client):
    kw = dict(model="tiny", prompt="Review: great", max_tokens=8, temperature=1.0, seed=42)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_logprobs_and_echo(client):
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=3, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert spell(lp.tokens) == r.choices[0].text
    e = client.completions.create(model="tiny", prompt="Hello world", max_tokens=2, temperature=0,
                                  logprobs=1, echo=True, extra_body={"ignore_eos": True})
    assert e.choices[0].text.startswith("Hello world")
    assert e.choices[0].logprobs.token_logprobs[0] is None
    assert e.choices[0].logprobs.text_offset[0] == 0


def spell(tokens: list[str]) -> str:
    """The text legacy completion logprob tokens spell: a token written "bytes:\\xNN..." (part of a
    character) stands for those bytes; an unfinished character reads as U+FFFD, as in the text."""
    out = b""
    for t in tokens:
        out += bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
    return out.decode("utf-8", errors="replace")


def test_token_array_prompt(client):
    r = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 4


def test_stop_sequence_excluded(client):
    free = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[2:4]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == free[: free.find(stop)] and r.choices[0].finish_reason == "stop"


def test_streaming_with_usage(client):
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streams_of_drafted_tokens_spell_the_plain_answer(client, server):
    """With prompt-lookup drafts (on by default on the CPU) a chunk may carry several tokens; the
    streamed text and logprobs add up to the non-streamed answer's, tokens holding part of a
    character included (their logprobs come with the next chunk that has text)."""
    engine = server[1].engine
    kw = dict(model="tiny", prompt="Hello Hello Hello", max_tokens=40, temperature=0, logprobs=1,
              extra_body={"ignore_eos": True})
    before = engine.accepted
    full = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    assert engine.accepted > before  # drafts were confirmed
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == full.logprobs.tokens
    assert sum((c.choices[0].logprobs.token_logprobs for c in chunks), []) == full.logprobs.token_logprobs
    assert any(len(c.choices[0].logprobs.tokens) > 1 for c in chunks)  # several tokens in one chunk
    msgs = [{"role": "user", "content": "Hello Hello Hello"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=40, temperature=0, logprobs=True, top_logprobs=1)
    full = client.chat.completions.create(**kw).choices[0]
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.message.content
    streamed = sum((c.choices[0].logprobs.content for c in chunks if c.choices[0].logprobs), [])
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in full.logprobs.content]


def test_chat_and_chat_stream(client):
    msgs = [{"role": "system", "content": "terse"}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert len(c.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    stream = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == c.message.content
    finish = [ch for ch in stream if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and stream[-1].usage.total_tokens > 0


def test_chat_with_a_predicted_output(client, server):
    """Predicted Outputs: the same answer, sooner where it matches the prediction; usage reports
    the prediction tokens confirmed and not; a prediction of another type is a 400 naming it."""
    engine = server[1].engine
    msgs = [{"role": "user", "content": "Rewrite: the cat sat on the mat"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kw)
    answer = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens is None  # (none asked)
    before = engine.accepted
    r = client.chat.completions.create(prediction={"type": "content", "content": answer}, **kw)
    assert r.choices[0].message.content == answer
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and engine.accepted - before >= details.accepted_prediction_tokens
    n_pred = len(server[1].tokenizer.encode(answer, add_special_tokens=False))
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == n_pred
    parts = [{"type": "text", "text": answer[:5]}, {"type": "text", "text": answer[5:]}]
    stream = list(client.chat.completions.create(prediction={"type": "content", "content": parts}, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == answer
    assert stream[-1].usage.completion_tokens_details.accepted_prediction_tokens == details.accepted_prediction_tokens
    for bad, param in (({"type": "text", "content": "x"}, "prediction.type"),
                       ({"type": "content", "content": [{"type": "image_url"}]}, "prediction.content")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(prediction=bad, **kw)
        assert e.value.param == param


def test_json_mode_and_what_is_refused_by_name(client):
    """`response_format` json_object constrains the answer to one JSON object, streamed or not,
    even from the tiny random model; as OpenAI, it needs the word "json" in a message. What the
    server does not do (function calling; a schema it cannot enforce) is a 400 naming the field,
    not plain text as if it had worked; their no-op forms are served."""
    msgs = [{"role": "user", "content": "Answer in JSON"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=60, temperature=1.0)
    for seed in range(4):
        r = client.chat.completions.create(**kw, seed=seed, response_format={"type": "json_object"})
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens: a prefix of one
            assert finish == "length" and feed(START, text.encode())
        streamed = client.chat.completions.create(**kw, seed=seed, response_format={"type": "json_object"},
                                                  stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text
    free = [client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in range(4)]
    assert not any(feed(START, t.encode()) for t in free)  # (unconstrained: not JSON)
    # legacy completions take it too (an extension, as vLLM's), n samples each constrained
    r = client.completions.create(model="tiny", prompt="JSON: ", max_tokens=40, n=3, seed=1,
                                  extra_body={"response_format": {"type": "json_object"}})
    for c in r.choices:
        assert feed(START, c.text.encode())
        assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", extra_body={"response_format": {"type": "json_object"}})
    assert e.value.param == "prompt"

    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    refused = [
        (dict(response_format={"type": "json_object"}), "messages", "invalid_value"),  # no "json"
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}}),
         "response_format.json_schema.schema", "invalid_value"),  # (the root must be an object)
        (dict(response_format={"type": "yaml"}), "response_format.type", "invalid_value"),
        (dict(tools=[tool]), "tools", "unsupported_parameter"),
        (dict(tools=[tool], tool_choice="required"), "tools", "unsupported_parameter"),
        (dict(tool_choice={"type": "function", "function": {"name": "get_weather"}}), "tool_choice",
         "unsupported_parameter"),
        (dict(functions=[tool["function"]]), "functions", "unsupported_parameter"),
        (dict(response_format={"type": "json_object"}, extra_body={"min_tokens": 2},
              messages=[{"role": "user", "content": "json"}]), "min_tokens", "invalid_value"),
    ]
    for extra, param, code in refused:
        for stream in (False, True):  # streamed: refused before the stream opens
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(**{**kw, **extra}, stream=stream)
            assert (e.value.param, e.value.code) == (param, code), extra
    plain = client.chat.completions.create(**kw).choices[0].message.content
    for extra in (dict(response_format={"type": "text"}), dict(tools=[tool], tool_choice="none"),
                  dict(tools=[]), dict(tool_choice="auto"), dict(functions=[tool["function"]], function_call="none")):
        assert client.chat.completions.create(**kw, **extra).choices[0].message.content == plain, extra


def test_structured_outputs_with_the_clients_parse(client):
    """`response_format` json_schema (what the official client's `parse` sends for a pydantic
    model: strict, required, no additional properties): the answer, even the tiny random
    model's, parses into the model when it finishes, streamed as not; a keyword the server cannot
    enforce is a 400 naming it and where, and so is a missing name."""
    from pydantic import BaseModel

    class Cat(BaseModel):
        name: str
        age: int
        indoor: bool

    msgs = [{"role": "user", "content": "A cat, please"}]
    finished = 0
    for seed in range(4):
        try:
            r = client.chat.completions.parse(model="tiny", messages=msgs, max_tokens=300, temperature=1.0,
                                              seed=seed, response_format=Cat)
        except openai.LengthFinishReasonError:  # (cut by max_tokens: the client does not parse it)
            continue
        c = r.choices[0]
        finished += 1
        assert isinstance(c.message.parsed, Cat) and c.finish_reason == "stop"
        assert list(json.loads(c.message.content)) == ["name", "age", "indoor"]
    assert finished >= 2
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"],
              "additionalProperties": False}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, response_format={
            "type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}})
    assert e.value.param == "response_format.json_schema.schema" and "'minimum'" in e.value.message
    assert "schema.properties.n" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, response_format={
            "type": "json_schema", "json_schema": {"schema": {"type": "object"}}})
    assert e.value.param == "response_format.json_schema.name"


def test_tokenize_and_detokenize(server, auth):
    url = server[0]
    r = httpx.post(f"{url}/v1/tokenize", json={"model": "tiny", "prompt": "Hello world"},
                   headers=auth).json()
    assert r["count"] == len(r["tokens"]) > 0 and "".join(r["token_strs"]) == "Hello world"
    d = httpx.post(f"{url}/v1/detokenize", json={"model": "tiny", "tokens": r["tokens"]},
                   headers=auth).json()
    assert d["prompt"] == "Hello world"


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=3.0), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=2, best_of=1), "best_of"),
    (dict(max_tokens=100000), "max_tokens"),
    (dict(logit_bias={"99999": 5}), "logit_bias"),
])
def test_bad_parameters_are_400_with_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", **{"max_tokens": 4, **kwargs})
    assert e.value.param == param
    assert e.value.status_code == 400


def test_unknown_model_and_route(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found"
    r = httpx.post(f"{server[0]}/v1/nothing", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    assert r.headers["x-request-id"]
    bad = httpx.post(f"{server[0]}/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()


def test_disconnected_stream_frees_kv_blocks(server, auth):
    url, engine = server[:2]
    total = engine.engine.block_manager.num_free_blocks
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30, headers=auth) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # the client hangs up mid-stream
    for _ in range(100):
        if engine.engine.block_manager.num_free_blocks == total and not engine.engine.has_unfinished():
            break
        time.sleep(0.05)
    assert not engine.engine.has_unfinished()
    assert engine.engine.block_manager.num_free_blocks == total


def test_64_concurrent_streams_complete_and_are_billed(server):
    import asyncio

    store, key = server[2], server[3]["gamma"]

    async def main():
        client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0)

        async def one(i):
            stream = await client.completions.create(
                model="tiny", prompt=f"Request {i}:", max_tokens=6, temperature=0.5, seed=i,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, usage = "", None
            async for ch in stream:
                if ch.choices:
                    text += ch.choices[0].text
                if ch.usage:
                    usage = ch.usage
            return text, usage

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(u is not None and u.completion_tokens == 6 for _, u in results)
    assert not server[1].engine.has_unfinished()
    # every request has its usage row, committed before its last byte
    org = store.lookup_key(key).org_id
    (row,) = store.usage_summary(org)
    assert (row["model"], row["num_requests"], row["completion_tokens"]) == ("tiny", 64, 64 * 6)
    assert row["prompt_tokens"] == sum(u.prompt_tokens for _, u in results)


def test_logprobs_of_a_token_holding_part_of_a_character(client, tiny_tokenizer_dir):
    """A byte-level token that is one byte of a UTF-8 character: chat gives its own bytes (not a
    replacement character's), legacy completions write it as "bytes:\\xNN" (as OpenAI does)."""
    from shoal.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    lead = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"\xc3")  # of é, ü, ...
    bias = {str(lead): 100}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       temperature=0, logprobs=True, top_logprobs=1, logit_bias=bias)
    t = r.choices[0].logprobs.content[0]
    top = t.top_logprobs[0]  # (from the distribution before the bias: another token)
    assert t.bytes == [0xC3] and t.token == "\ufffd"
    assert bytes(top.bytes).decode("utf-8", errors="replace") == top.token
    c = client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0, logprobs=0,
                                  logit_bias=bias, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert lp.tokens == ["bytes:\\xc3", "bytes:\\xc3"] and lp.text_offset == [0, 0]
