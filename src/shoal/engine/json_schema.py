"""A JSON Schema as a byte automaton (OpenAI's `response_format: {"type": "json_schema"}`, the
subset its strict mode takes): which bytes may come next so the output stays a prefix of one
instance. `json_guide` turns it into token masks; plain JSON mode is the schema {"type": "object"}.

`Grammar(schema)` compiles the schema into nodes (`schema_nodes`) and raises `SchemaError`
(naming the keyword and where) for what it cannot enforce. Supported: `type` (one or a list), `properties` with
`required` (an instance's keys come in the schema's order, optional ones may be left out, no
others: `additionalProperties` absent or false), an object without `properties` (any keys and
values), `items` with `minItems` / `maxItems`, `enum`, `const`, `anyOf`, `$ref` to `#/$defs/...`
or `#/definitions/...` (recursion too), and the keywords that only describe (`title`,
`description`, ...). The root is an object. Keys and enum / const strings are written as the
schema has them, in UTF-8 with JSON's own escapes only (as `json.dumps(..., ensure_ascii=False)`).

States: a deterministic state is a tuple `(mode, stack, sub, ws)`: `stack` the open containers as
frames (`("o", node, next property)`, `("a", node, items so far)`), `sub` the mode's detail (the
node a value must match, a key's bytes so far, a number's part, the literals still possible),
`ws` the whitespace bytes in a row (at most `MAX_WS`; in a string, what is left of a UTF-8
character). `anyOf` makes the automaton nondeterministic: the states an output can be in are a
frozenset, and `advance(states, b)` the set after byte b (empty: b cannot come).
"""

from __future__ import annotations

import json
from collections import OrderedDict

from .schema_nodes import SchemaError, SchemaNodes  # noqa: F401  (SchemaError: raised by Grammar())

MAX_WS = 16  # whitespace bytes in a row outside strings
MAX_DEPTH = 64  # open containers

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
NUM_DONE = {"-": False, "0": True, "int": True, ".": False, "frac": True, "e": False, "esign": False,
            "exp": True}
# UTF-8 in strings (RFC 3629: no overlong forms, surrogates or code points past U+10FFFF): a
# lead byte -> (continuation bytes, the range of the next one)
UTF8_LEAD = {b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}
UTF8_LEAD.update({b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)})
UTF8_LEAD.update({0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F), 0xF0: (3, 0x90, 0xBF), 0xF4: (3, 0x80, 0x8F)})
UTF8_LEAD.update({b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)})

State = tuple
States = frozenset


class Grammar(SchemaNodes):
    """A compiled schema (`schema_nodes`) as a byte automaton: `start` (the states before any
    byte), `advance`, `feed`, `complete`, `free_string`."""

    def __init__(self, schema: dict) -> None:
        super().__init__(schema)
        self.start: States = frozenset([("start", (), self.root, 0)])
        self._steps: dict[tuple[State, int], tuple[State, ...]] = {}

    # ---- bytes -----------------------------------------------------------------------------------

    def advance(self, states: States, b: int) -> States:
        """The states after byte b from any of `states` (empty: b cannot come)."""
        out: set[State] = set()
        for s in states:
            key = (s, b)
            got = self._steps.get(key)
            if got is None:
                if len(self._steps) > 1 << 20:
                    self._steps.clear()
                got = self._steps[key] = tuple(self._step(s, b))
            out.update(got)
        return frozenset(out)

    def feed(self, states: States, data: bytes) -> States:
        for b in data:
            if not states:
                break
            states = self.advance(states, b)
        return states

    @staticmethod
    def complete(states: States) -> bool:
        """Whether the output so far is one whole instance (nothing may follow it)."""
        return any(s[0] == "done" for s in states)

    @staticmethod
    def free_string(states: States) -> bool:
        """Whether every byte of a plain token (no quote, backslash or control byte; whole UTF-8)
        leaves `states` as they are: one state, inside a free string, between characters."""
        if len(states) != 1:
            return False
        (s,) = states
        return s[0] == "str" and not s[3]

    def _closed(self, stack: tuple) -> State:
        """The state after a value completes inside `stack`."""
        if not stack:
            return ("done", (), None, 0)
        top = stack[-1]
        if top[0] == "a":
            stack = stack[:-1] + (("a", top[1], top[2] + 1),)
        return ("after", stack, None, 0)

    def _value(self, n: int, stack: tuple, b: int, seen: frozenset = frozenset()):
        """The states after byte b starts a value of node n."""
        node = self.nodes[n]
        kind = node[0]
        if kind == "union":
            for m in node[1]:
                if m not in seen:  # (a $ref cycle with no container in between adds nothing)
                    yield from self._value(m, stack, b, seen | {n})
            return
        deep = len(stack) < MAX_DEPTH
        if b == 0x7B and kind in ("any", "free", "object") and deep:  # {
            frame = ("o", n, 0) if kind == "object" else ("o", -1, 0)
            yield ("key_or_close", stack + (frame,), None, 0)
        elif b == 0x5B and kind in ("any", "array") and deep:  # [
            yield ("item_or_close", stack + (("a", n if kind == "array" else -1, 0),), None, 0)
        elif b == 0x22 and kind in ("any", "string"):
            yield ("str", stack, "v", 0)
        elif kind in ("any", "number") and (b == 0x2D or b in DIGITS):
            integer = kind == "number" and node[1]
            yield ("num", stack, ("-" if b == 0x2D else "0" if b == 0x30 else "int", integer), 0)
        elif kind == "any" and b in b"tfn":
            rest = {0x74: b"rue", 0x66: b"alse", 0x6E: b"ull"}[b]
            yield ("lit", stack, (rest,), 0)
        elif kind == "literal":
            rest = tuple(t[1:] for t in node[1] if t[0] == b)
            if rest:
                yield ("lit", stack, rest, 0)

    def _props(self, stack: tuple) -> tuple:
        """The top object frame's properties (() for a free object)."""
        n = stack[-1][1]
        return self.nodes[n][1] if n >= 0 else ()

    def _keys(self, stack: tuple) -> list[tuple[int, bytes]]:
        """(index, key) of the properties that may come next in the top (closed) object: from
        its next one up to and including the first required one."""
        props, i = self._props(stack), stack[-1][2]
        out = []
        for j in range(i, len(props)):
            out.append((j, props[j][0]))
            if props[j][2]:
                break
        return out

    def _may_close(self, stack: tuple) -> bool:
        top = stack[-1]
        if top[0] == "a":
            return top[2] >= (self.nodes[top[1]][2] if top[1] >= 0 else 0)
        return top[1] < 0 or not any(p[2] for p in self._props(stack)[top[2]:])

    def _step(self, state: State, b: int):
        mode, stack, sub, ws = state
        if mode == "str":  # (ws: the rest of a UTF-8 character, as (bytes left, lo, hi), or 0)
            if ws:
                left, lo, hi = ws
                if lo <= b <= hi:
                    yield ("str", stack, sub, (left - 1, 0x80, 0xBF) if left > 1 else 0)
                return
            if b == 0x22:
                yield ("colon", stack, self._any, 0) if sub == "k" else self._closed(stack)
            elif b == 0x5C:
                yield ("esc", stack, sub, 0)
            elif b < 0x80:
                if b >= 0x20:
                    yield state
            elif b in UTF8_LEAD:
                yield ("str", stack, sub, UTF8_LEAD[b])
            return
        if mode == "esc":
            if b in ESCAPES:
                yield ("u", stack, (sub, 4), 0) if b == 0x75 else ("str", stack, sub, 0)
            return
        if mode == "u":
            if b in HEX:
                role, left = sub
                yield ("str", stack, role, 0) if left == 1 else ("u", stack, (role, left - 1), 0)
            return
        if mode == "num":
            part, integer = sub
            nxt = _number(part, integer, b)
            if nxt is not None:
                yield ("num", stack, (nxt, integer), 0)
            elif NUM_DONE[part]:
                yield from self._step(self._closed(stack), b)  # the number ended: b is read after it
            return
        if mode == "lit":
            rest = tuple(t[1:] for t in sub if t and t[0] == b)
            if rest:
                yield ("lit", stack, rest, 0)
            elif b"" in sub:
                yield from self._step(self._closed(stack), b)
            return
        if mode == "key":  # a closed object's key: sub the bytes so far
            keys = self._keys(stack)
            if b == 0x22:
                for j, key in keys:
                    if key == sub:
                        top = stack[-1]
                        yield ("colon", stack[:-1] + (("o", top[1], j + 1),), self._props(stack)[j][1], 0)
            else:
                typed = sub + bytes([b])
                if any(key.startswith(typed) for _, key in keys):
                    yield ("key", stack, typed, 0)
            return
        if b in WS:
            if ws < MAX_WS and mode != "done":
                yield (mode, stack, sub, ws + 1)
            return
        if mode == "start":
            if b == 0x7B:
                yield from self._value(sub, stack, b)
        elif mode == "value":
            yield from self._value(sub, stack, b)
        elif mode == "item_or_close":
            if b == 0x5D and self._may_close(stack):
                yield self._closed(stack[:-1])
            elif stack[-1][1] < 0 or self.nodes[stack[-1][1]][3] != 0:
                yield from self._value(self._item(stack), stack, b)
        elif mode in ("key_or_close", "key_next"):
            if b == 0x22:
                if stack[-1][1] < 0:
                    yield ("str", stack, "k", 0)
                elif self._keys(stack):
                    yield ("key", stack, b"", 0)
            elif b == 0x7D and mode == "key_or_close" and self._may_close(stack):
                yield self._closed(stack[:-1])
        elif mode == "colon":
            if b == 0x3A:
                yield ("value", stack, sub, 0)
        elif mode == "after":
            top = stack[-1]
            if top[0] == "o":
                if b == 0x2C and (top[1] < 0 or self._keys(stack)):
                    yield ("key_next", stack, None, 0)
                elif b == 0x7D and self._may_close(stack):
                    yield self._closed(stack[:-1])
            else:
                hi = self.nodes[top[1]][3] if top[1] >= 0 else None
                if b == 0x2C and (hi is None or top[2] < hi):
                    yield ("value", stack, self._item(stack), 0)
                elif b == 0x5D and self._may_close(stack):
                    yield self._closed(stack[:-1])

    def _item(self, stack: tuple) -> int:
        """The node of the top array's items."""
        n = stack[-1][1]
        return self.nodes[n][1] if n >= 0 else self._any


def _number(part: str, integer: bool, b: int) -> str | None:
    """A number's part after byte b, or None when b does not continue it."""
    digit = b in DIGITS
    if part == "-":
        return ("0" if b == 0x30 else "int") if digit else None
    if part in ("0", "int"):
        if digit and part == "int":
            return "int"
        if integer:
            return None
        return "." if b == 0x2E else "e" if b in (0x65, 0x45) else None
    if part in (".", "frac"):
        if digit:
            return "frac"
        return "e" if part == "frac" and b in (0x65, 0x45) else None
    if part == "e":
        return "esign" if b in (0x2B, 0x2D) else "exp" if digit else None
    return "exp" if digit else None  # esign, exp


_COMPILED: OrderedDict[str, Grammar] = OrderedDict()  # by the schema's canonical text, least recent first


def compiled(schema: dict) -> Grammar:
    """`Grammar(schema)`, compiled once for the requests that send the same schema (the API's
    check, `SamplingParams` and the sampler all ask for it); the 64 most recent are kept."""
    key = json.dumps(schema, sort_keys=True) if isinstance(schema, dict) else None
    got = _COMPILED.pop(key, None) if key is not None else None
    if got is None:
        got = Grammar(schema)
    _COMPILED[got.key] = got
    if len(_COMPILED) > 64:
        _COMPILED.popitem(last=False)
    return got
