"""Structured Outputs' automaton (`engine.json_schema.Grammar`): instances of random schemas are
accepted and their prefixes kept open; what it accepts after random edits is valid against the
schema (checked by the small validator below); unsupported keywords are refused by name; the
token masks of schema states against feeding each token's bytes; the engine's answers."""

from __future__ import annotations

import json
import random

import pytest

from shoal.engine.json_guide import JsonVocab
from shoal.engine.json_schema import Grammar, SchemaError
from shoal.engine.sampling_params import SamplingParams
from tests.engine.test_json_guide import mutate
from tests.engine.test_llm_engine import make_llm, prompts


def resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        where, name = schema["$ref"][2:].split("/", 1)
        schema = root[where][name]
    return schema


def valid(x, schema: dict, root: dict) -> bool:
    """Whether x is an instance of `schema` (the subset the grammar takes; closed objects)."""
    schema = resolve(schema, root)
    if "anyOf" in schema:
        return any(valid(x, s, root) for s in schema["anyOf"])
    if "const" in schema:
        return x == schema["const"] and type(x) is type(schema["const"])
    if "enum" in schema:
        return any(x == v and type(x) is type(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return any(valid(x, {**schema, "type": k}, root) for k in kind)
    if kind is None:
        return True
    if kind == "object":
        if not isinstance(x, dict):
            return False
        props = schema.get("properties")
        if props is None:
            return True
        return (set(x) <= set(props) and set(schema.get("required", [])) <= set(x)
                and all(valid(v, props[k], root) for k, v in x.items()))
    if kind == "array":
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        return (isinstance(x, list) and len(x) >= lo and (hi is None or len(x) <= hi)
                and all(valid(v, schema.get("items", {}), root) for v in x))
    if kind == "integer":
        return isinstance(x, int) and not isinstance(x, bool)
    if kind == "number":
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    return {"string": str, "boolean": bool, "null": type(None)}[kind] is type(x)


LEAVES = [{"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
          {"enum": ["red", "green", "blue"]}, {"enum": [1, 10, "1"]}, {"const": "fixed"}, {"type": ["string", "null"]},
          {"description": "anything"}]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kind = rng.randrange(4 if depth < 3 else 1)
    if kind == 0:
        return dict(rng.choice(LEAVES))
    if kind == 1:
        s = {"type": "array", "items": random_schema(rng, depth + 1)}
        if rng.random() < 0.5:
            s["minItems"] = rng.randrange(2)
            s["maxItems"] = s["minItems"] + rng.randrange(3)
        return s
    if kind == 2:
        return {"anyOf": [random_schema(rng, depth + 1), {"type": "null"}]}
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict:
    if rng.random() < 0.15:
        return {"type": "object"}  # any keys and values
    props = {f"k{i}_" + rng.choice(["a", "é", "long_name"]): random_schema(rng, depth) for i in range(rng.randrange(4))}
    required = [k for k in props if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def instance(rng: random.Random, schema: dict, root: dict):
    schema = resolve(schema, root)
    if "anyOf" in schema:
        return instance(rng, rng.choice(schema["anyOf"]), root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind is None:
        return rng.choice([1, "x", None, [True], {"a": 2.5}])
    if kind == "object":
        props = schema.get("properties")
        if props is None:
            return {"free": [1, {"b": None}], "é": "ü"}
        return {k: instance(rng, s, root) for k, s in props.items()
                if k in schema.get("required", []) or rng.random() < 0.5}
    if kind == "array":
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        n = rng.randint(lo, hi if hi is not None else lo + 3)
        return [instance(rng, schema.get("items", {}), root) for _ in range(n)]
    return {"string": lambda: rng.choice(["", "plain", 'q"uote\\', "日本😀"]),
            "integer": lambda: rng.choice([0, -7, 123]),
            "number": lambda: rng.choice([0.5, -1e-3, 42, 6.02e23]), "boolean": lambda: rng.random() < 0.5,
            "null": lambda: None}[kind]()


def dumps(rng: random.Random, x) -> bytes:
    """(Keys and enum strings are matched as the schema's UTF-8, unescaped: ensure_ascii off.)"""
    indent = rng.choice([None, 2])
    return json.dumps(x, indent=indent, ensure_ascii=False,
                      separators=rng.choice([(",", ":"), (", ", ": ")]) if indent is None else None).encode()


TREE = {"type": "object", "properties": {"name": {"type": "string"},
                                         "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["name", "children"], "additionalProperties": False,
        "$defs": {"node": {"anyOf": [{"$ref": "#/$defs/leaf"}, {"type": "object", "properties": {
            "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["name", "children"], "additionalProperties": False}]},
            "leaf": {"type": "object", "properties": {"leaf": {"type": "integer"}}, "required": ["leaf"],
                     "additionalProperties": False}}}


def test_instances_are_accepted_and_their_prefixes_open():
    rng = random.Random(0)
    for _ in range(200):
        schema = random_object(rng)
        g = Grammar(schema)
        for _ in range(3):
            doc = dumps(rng, instance(rng, schema, schema))
            assert g.complete(g.feed(g.start, doc)), (schema, doc)
            for cut in range(len(doc)):
                states = g.feed(g.start, doc[:cut])
                assert states and not g.complete(states), (schema, doc[:cut])
    tree = {"name": "r", "children": [{"leaf": 1}, {"name": "c", "children": [{"leaf": -2}]}]}
    g = Grammar(TREE)
    assert g.complete(g.feed(g.start, json.dumps(tree).encode()))


def test_what_it_accepts_after_edits_is_an_instance():
    """Soundness: documents with random bytes changed, inserted or dropped are accepted as
    complete only when json.loads reads an instance of the schema from them."""
    rng = random.Random(1)
    alphabet = b'{}[]:,"\\-.0123456789eEtrufalsnk_ \n\x01\xc3\xa9'
    accepted = 0
    for _ in range(600):
        schema = random_object(rng)
        g = Grammar(schema)
        doc = mutate(rng, dumps(rng, instance(rng, schema, schema)), alphabet, rng.randint(1, 3))
        if g.complete(g.feed(g.start, doc)):
            accepted += 1
            assert valid(json.loads(doc.decode("utf-8")), schema, schema), (schema, doc)
    assert accepted > 40


@pytest.mark.parametrize("schema,doc", [
    ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, b'{"n": 1.5}'),
    ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, b'{"n": 1e3}'),
    ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, b'{}'),
    ({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, b'{"n": 1, "m": 2}'),
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a", "b"]},
     b'{"b": "x", "a": "y"}'),  # (the schema's order)
    ({"type": "object", "properties": {"c": {"enum": ["red", "blue"]}}, "required": ["c"]}, b'{"c": "green"}'),
    ({"type": "object", "properties": {"l": {"type": "array", "items": {"type": "null"}, "maxItems": 1}},
      "required": ["l"]}, b'{"l": [null, null]}'),
    ({"type": "object", "properties": {"l": {"type": "array", "minItems": 1}}, "required": ["l"]}, b'{"l": []}'),
    ({"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}, b'{"b": null}'),
    ({"type": "object"}, b'[1]'),
])
def test_not_an_instance_is_refused(schema, doc):
    g = Grammar(schema)
    assert not g.complete(g.feed(g.start, doc))


@pytest.mark.parametrize("schema,where", [
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
     "schema.properties.n: keyword 'minimum'"),
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "a+"}}},
     "schema.properties.s: keyword 'pattern'"),
    ({"type": "object", "properties": {}, "additionalProperties": True}, "schema.additionalProperties"),
    ({"type": "array", "items": {"type": "string"}}, "schema: the root must be an object"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}, "schema.properties.x.$ref"),
    ({"type": "object", "properties": {"x": {"type": "decimal"}}}, "schema.properties.x.type"),
    ({"type": "object", "properties": {"x": {"oneOf": [{"type": "string"}]}}}, "schema.properties.x: keyword 'oneOf'"),
])
def test_what_it_cannot_enforce_is_named(schema, where):
    with pytest.raises(SchemaError) as e:
        Grammar(schema)
    assert str(e.value).startswith(where)
    with pytest.raises(ValueError, match="^json_schema\\.schema"):
        SamplingParams(json_schema=schema)


def test_schema_masks_are_the_tokens_whose_bytes_may_come():
    rng = random.Random(3)
    atoms = [b"{", b"}", b"[", b"]", b'"', b":", b",", b" ", b"\\", b"1", b"-", b".", b"e", b"true", b"null",
             b"name", b"children", b"leaf", b"red", b"\xc3\xa9", b"\xc3"]
    pieces = [None, None] + [b"".join(rng.choice(atoms) for _ in range(rng.randint(1, 3))) for _ in range(500)]
    vocab = JsonVocab(pieces, len(pieces), eos_ids=[1])
    schema = {"type": "object", "properties": {"c": {"enum": ["red", "blue"]}, "n": {"type": "integer"},
                                               "t": TREE["properties"]["children"]},
              "required": ["c"], "additionalProperties": False, "$defs": TREE["$defs"]}
    g = Grammar(schema)
    for text in [b"", b"{", b'{"', b'{"c": "re', b'{"c": "red"', b'{"c": "red", "n": -1', b'{"c": "red", "t": [',
                 b'{"c": "red", "t": [{"na', b'{"c": "red", "t": [{"name": "\xc3', b'{"c": "blue"}']:
        states = g.feed(g.start, text)
        assert states, text
        want = [bool(p) and bool(g.feed(states, p)) for p in pieces]
        want[1] = g.complete(states) or not any(want)  # (eos too where no token can continue)
        assert vocab.mask(states, g).tolist() == want, text


def test_engine_answers_are_instances_of_the_schema(tiny_llama):
    """Tiny random model, sampled: every finished answer is an instance (a prefix of one when
    cut by max_tokens), with drafts on; a seeded answer as it is alone."""
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                                               "ok": {"type": "boolean"}},
              "required": ["color", "n", "ok"], "additionalProperties": False}
    llm = make_llm(tiny_llama, speculative_tokens=4)
    ps = prompts(8, seed=5, lo=5, hi=30)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=200, json_schema=schema) for i in range(8)]
    outs = llm.generate(ps, params)
    g = Grammar(schema)
    finished = 0
    for out in outs:
        c = out.outputs[0]
        assert g.feed(g.start, c.text.encode()), c.text
        if c.finish_reason == "stop":
            finished += 1
            assert valid(json.loads(c.text), schema, schema), c.text
            assert list(json.loads(c.text))[:2] == ["color", "n"]
    assert finished >= 6
    alone = make_llm(tiny_llama, speculative_tokens=0).generate([ps[0]], params[0])[0]
    assert alone.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_a_state_no_token_can_continue_ends_the_output_and_huge_schemas_are_refused():
    """Past MAX_DEPTH open containers a schema that needs one more can go nowhere: eos is all
    its mask allows (the answer ends as a prefix); a schema nested past what can be compiled,
    or of too many subschemas, is refused by name."""
    from shoal.engine.json_schema import MAX_DEPTH
    from shoal.engine.schema_nodes import MAX_NODES

    deep = {"type": "string"}
    for _ in range(MAX_DEPTH + 2):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    g = Grammar(deep)
    vocab = JsonVocab([None, None, b"{", b'"a"', b":", b"}", b"x"], 7, eos_ids=[1])
    states = g.feed(g.start, b'{"a":' * MAX_DEPTH)
    assert states and vocab.mask(states, g).tolist() == [False, True] + [False] * 5
    for _ in range(600):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(SchemaError, match="nested too deeply"):
        Grammar(deep)
    wide = {"type": "object", "properties": {f"k{i}": {"type": "array", "items": {"type": "string"}}
                                             for i in range(MAX_NODES // 2 + 1)}}
    with pytest.raises(SchemaError, match="subschemas"):
        Grammar(wide)


def test_preempted_and_chunked_structured_rows_give_what_they_give_alone(tiny_llama):
    """Structured rows (JSON mode, a schema; seeded, n=2) with plain ones under a KV budget so
    small that sequences are preempted and recomputed, prompts in 16-token chunks: every row's
    tokens as in a roomy engine (their guides follow the tokens, not the steps)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
              "required": ["n", "s"], "additionalProperties": False}
    ps = prompts(10, seed=12, lo=20, hi=60)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, **({"json_mode": True} if i % 2 else
                                                                         {"json_schema": schema}))
              for i in range(6)]
    params += [SamplingParams(temperature=0.8, seed=9, max_tokens=40, n=2, json_schema=schema)]
    params += [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)] * 3
    want = [[c.token_ids for c in o.outputs] for o in make_llm(tiny_llama).generate(ps, params)]
    eng = make_llm(tiny_llama, num_kv_blocks=16, max_num_batched_tokens=16).engine
    for i, (p, sp) in enumerate(zip(ps, params)):
        eng.add_request(f"r{i}", p, sp)
    got, preempted = {}, 0
    while eng.has_unfinished():
        preempted = max(preempted, sum(s.num_preemptions for r in eng.requests.values() for s in r.seqs))
        for out in eng.step():
            if out.finished:
                got[out.request_id] = [c.token_ids for c in out.outputs]
    assert preempted > 0
    assert [got[f"r{i}"] for i in range(len(ps))] == want
