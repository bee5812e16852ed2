"""A JSON Schema compiled to the nodes `json_schema.Grammar` runs over (the subset of OpenAI's
Structured Outputs that it enforces; `SchemaError` names what it cannot, and where).

Nodes (`SchemaNodes.nodes[i]`): ("any",) any JSON value; ("object", props) with props a tuple
of (key as JSON string bytes without the quotes, node, required); ("free",) an object of any
keys and values; ("array", items node, min, max or None); ("string",); ("number", integer);
("literal", its JSON texts as bytes, compact: enum / const / boolean / null); ("union", nodes)
(anyOf, a type list, a $ref's target).
"""

from __future__ import annotations

import json

MAX_NODES = 10_000  # subschemas of one schema
MAX_NESTING = 256  # path steps of one subschema (a guard for Python's recursion, not JSON's depth)
DESCRIPTIVE = {"title", "description", "$comment", "examples", "default", "$schema", "$id", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class SchemaError(ValueError):
    """A schema the automaton cannot enforce; the message names the keyword and its path."""


class SchemaNodes:
    """`schema` compiled: `nodes`, `root`, `_any` (the node of free values) and `key` (the schema's
    canonical text: equal schemas share their masks)."""

    def __init__(self, schema: dict) -> None:
        if not isinstance(schema, dict):
            raise SchemaError("schema: must be a JSON object")
        self.root_schema = schema
        self.nodes: list[tuple] = []
        self._refs: dict[str, int] = {}
        self._any = self._new(("any",))  # the values of free objects and arrays
        try:
            self.key = json.dumps(schema, sort_keys=True)
            root = self._compile(schema, "schema")
        except RecursionError:
            raise SchemaError("schema: nested too deeply") from None
        if len(self.nodes) > MAX_NODES:
            raise SchemaError(f"schema: more than {MAX_NODES} subschemas")
        kinds = {self.nodes[n][0] for n in self._alternatives(root, set())}
        if not kinds <= {"object", "free"}:
            raise SchemaError("schema: the root must be an object (type \"object\")")
        self.root = root

    def _new(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _alternatives(self, n: int, seen: set[int]) -> list[int]:
        node = self.nodes[n]
        if node[0] != "union":
            return [n]
        seen.add(n)
        return [m for a in node[1] if a not in seen for m in self._alternatives(a, seen)]

    def _compile(self, s, path: str) -> int:
        if path.count(".") > MAX_NESTING:
            raise RecursionError
        if s is True or s == {}:
            return self._new(("any",))
        if not isinstance(s, dict):
            raise SchemaError(f"{path}: must be a schema object")
        if "$ref" in s:
            return self._ref(s["$ref"], path)
        known = DESCRIPTIVE | {"type", "properties", "required", "additionalProperties", "items", "minItems",
                               "maxItems", "enum", "const", "anyOf", "$ref", "strict"}
        for key in s:
            if key not in known:
                raise SchemaError(f"{path}: keyword {key!r} is not supported (supported: type, properties, "
                                  "required, items, minItems, maxItems, enum, const, anyOf, $ref)")
        if "anyOf" in s:
            alts = s["anyOf"]
            if not isinstance(alts, list) or not alts:
                raise SchemaError(f"{path}.anyOf: must be a non-empty list of schemas")
            rest = {k: v for k, v in s.items() if k != "anyOf" and k not in DESCRIPTIVE}
            if rest:
                raise SchemaError(f"{path}: anyOf with other keywords ({', '.join(rest)}) is not supported")
            return self._new(("union", tuple(self._compile(a, f"{path}.anyOf[{i}]") for i, a in enumerate(alts))))
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{path}.enum: must be a non-empty list")
            texts = tuple(sorted({json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()
                                  for v in values}))
            return self._new(("literal", texts))
        kind = s.get("type")
        if isinstance(kind, list):
            if not kind or any(k not in TYPES for k in kind):
                raise SchemaError(f"{path}.type: must be a non-empty list of {', '.join(TYPES)}")
            if len(kind) > 1:
                return self._new(("union", tuple(self._compile({**s, "type": k}, path) for k in kind)))
            kind = kind[0]
        if kind is None:
            if set(s) - DESCRIPTIVE - {"strict"}:
                raise SchemaError(f"{path}: a schema with keywords needs a \"type\"")
            return self._new(("any",))
        if kind not in TYPES:
            raise SchemaError(f"{path}.type: {kind!r} is not one of {', '.join(TYPES)}")
        if kind == "object":
            return self._object(s, path)
        if kind == "array":
            n = self._new(("array",))  # (reserved first: items may refer back to it)
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                raise SchemaError(f"{path}: minItems / maxItems must be integers, 0 <= minItems <= maxItems")
            items = self._compile(s.get("items", {}), f"{path}.items")
            self.nodes[n] = ("array", items, lo, hi)
            return n
        if kind in ("number", "integer"):
            return self._new(("number", kind == "integer"))
        if kind == "boolean":
            return self._new(("literal", (b"false", b"true")))
        if kind == "null":
            return self._new(("literal", (b"null",)))
        return self._new(("string",))

    def _object(self, s: dict, path: str) -> int:
        extra = s.get("additionalProperties", False if "properties" in s else True)
        props = s.get("properties")
        if props is None:
            if extra not in (True, {}) or s.get("required"):
                raise SchemaError(f"{path}: an object without properties takes any keys (no "
                                  "additionalProperties schema or required list)")
            return self._new(("free",))
        if extra is not False:
            raise SchemaError(f"{path}.additionalProperties: only false (or absent) is supported with properties")
        if not isinstance(props, dict):
            raise SchemaError(f"{path}.properties: must be an object")
        required = s.get("required", [])
        if not isinstance(required, list) or any(r not in props for r in required):
            raise SchemaError(f"{path}.required: must list names of properties")
        n = self._new(("object", ()))
        out = []
        for key, sub in props.items():
            text = json.dumps(key, ensure_ascii=False)[1:-1].encode()
            if any(b in b'"\\' or b < 0x20 for b in text):
                raise SchemaError(f"{path}.properties: key {key!r} needs escapes: not supported")
            out.append((text, self._compile(sub, f"{path}.properties.{key}"), key in required))
        self.nodes[n] = ("object", tuple(out))
        return n

    def _ref(self, ref, path: str) -> int:
        if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
            raise SchemaError(f"{path}.$ref: only '#/$defs/NAME' and '#/definitions/NAME' are supported")
        if ref in self._refs:
            return self._refs[ref]
        where, name = ref[2:].split("/", 1)
        target = (self.root_schema.get(where) or {}).get(name)
        if target is None:
            raise SchemaError(f"{path}.$ref: {ref!r} is not defined")
        n = self._refs[ref] = self._new(("union", ()))  # (a placeholder: the definition may recurse)
        self.nodes[n] = ("union", (self._compile(target, ref[2:].replace("/", ".")),))
        return n
