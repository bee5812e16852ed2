"""JSON mode (OpenAI's `response_format: {"type": "json_object"}`): each step, the tokens that keep
a sequence's output a prefix of one JSON object (RFC 8259) get through; the rest are masked.

Three parts:
- `step(state, byte)`: a byte-level pushdown automaton of the JSON grammar, the top-level value
  an object. A state is a hashable tuple `(mode, stack, sub, ws)`: `stack` the open containers
  ("{" / "[") as a string, `sub` the mode's detail (a string's key/value role, a number's part,
  a literal's remaining bytes), `ws` the whitespace bytes in a row (capped at `MAX_WS`, so a model
  cannot fill its budget with blank lines; in a string, what is left of a UTF-8 character).
  None: the byte cannot come next.
- `JsonVocab` (one per tokenizer and vocabulary width): every token's bytes in a trie, and the
  mask of tokens allowed in a state, cached by state. Inside a string almost every token keeps the
  state as it is: those ("plain": no quote, backslash or control byte) are one precomputed mask,
  so a string state walks only the few thousand other tokens; outside strings the walk stops at
  the first byte that cannot come next.
- `JsonGuide` (one per sequence): the automaton's state after the tokens generated so far,
  caught up from the sequence's ids when its mask is asked for (a draft row's: that state fed
  the row's drafts, so drafted tokens are checked against the masks they would have met).

Semantics of the mask in state s (V = the logits' width):
    allowed[t] = step(...step(s, b_1)..., b_k) is not None for t's bytes b_1..b_k (k >= 1),
                 for every t < V that is not a special token; when s is complete (the object
                 closed), allowed also holds the end-of-sequence ids
A sequence whose text is a whole object ends there (eos is all that is left); one stopped by
max_tokens or a stop string is a prefix, as with OpenAI. Strings hold valid UTF-8 (RFC 3629),
so the text has no replacement characters; outside strings only JSON's own bytes are allowed.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

MAX_WS = 16  # whitespace bytes in a row outside strings
MAX_DEPTH = 64  # open containers
CACHE = 512  # masks kept per vocabulary (by state)

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# a number's parts: whether it may end there
NUM_DONE = {"-": False, "0": True, "int": True, ".": False, "frac": True, "e": False, "esign": False,
            "exp": True}

# UTF-8 in strings (RFC 3629: no overlong forms, surrogates or code points past U+10FFFF): a
# lead byte -> (continuation bytes, the range of the next one)
_UTF8_LEAD = {b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}
_UTF8_LEAD.update({b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)})
_UTF8_LEAD.update({0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F), 0xF0: (3, 0x90, 0xBF), 0xF4: (3, 0x80, 0x8F)})
_UTF8_LEAD.update({b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)})

State = tuple  # (mode, stack, sub, ws)
START: State = ("start", "", None, 0)


def _closed(stack: str) -> State:
    """The state after a value completes with `stack` open: the object's end, or `after`."""
    return ("done", "", None, 0) if not stack else ("after", stack, None, 0)


def _value(stack: str, b: int) -> State | None:
    """The state after byte b starts a value (stack: the containers it is in)."""
    if b == 0x7B:  # {
        return ("key_or_close", stack + "{", None, 0) if len(stack) < MAX_DEPTH else None
    if b == 0x5B:  # [
        return ("value_or_close", stack + "[", None, 0) if len(stack) < MAX_DEPTH else None
    if b == 0x22:  # "
        return ("str", stack, "v", 0)
    if b == 0x2D:  # -
        return ("num", stack, "-", 0)
    if b == 0x30:
        return ("num", stack, "0", 0)
    if b in DIGITS:
        return ("num", stack, "int", 0)
    rest = LITERALS.get(b)
    return ("lit", stack, rest, 0) if rest is not None else None


def _number(stack: str, part: str, b: int) -> State | None:
    """A number's next byte, or None when b does not continue it."""
    digit = b in DIGITS
    if part == "-":
        return ("num", stack, "0" if b == 0x30 else "int", 0) if digit else None
    if part in ("0", "int"):
        if digit and part == "int":
            return ("num", stack, "int", 0)
        if b == 0x2E:
            return ("num", stack, ".", 0)
        return ("num", stack, "e", 0) if b in (0x65, 0x45) else None
    if part in (".", "frac"):
        if digit:
            return ("num", stack, "frac", 0)
        return ("num", stack, "e", 0) if part == "frac" and b in (0x65, 0x45) else None
    if part == "e":
        if b in (0x2B, 0x2D):
            return ("num", stack, "esign", 0)
        return ("num", stack, "exp", 0) if digit else None
    return ("num", stack, "exp", 0) if digit else None  # esign, exp


def step(state: State, b: int) -> State | None:
    """The automaton's state after byte b (0-255), or None when b cannot come next."""
    mode, stack, sub, ws = state
    if mode == "str":  # (ws: the rest of a UTF-8 character, as (bytes left, lo, hi), or 0)
        if ws:
            left, lo, hi = ws
            if not lo <= b <= hi:
                return None
            return ("str", stack, sub, (left - 1, 0x80, 0xBF) if left > 1 else 0)
        if b == 0x22:
            return ("colon", stack, None, 0) if sub == "k" else _closed(stack)
        if b == 0x5C:
            return ("esc", stack, sub, 0)
        if b < 0x80:
            return state if b >= 0x20 else None
        lead = _UTF8_LEAD.get(b)
        return ("str", stack, sub, lead) if lead else None
    if mode == "esc":
        if b not in ESCAPES:
            return None
        return ("u", stack, (sub, 4), 0) if b == 0x75 else ("str", stack, sub, 0)
    if mode == "u":
        if b not in HEX:
            return None
        role, left = sub
        return ("str", stack, role, 0) if left == 1 else ("u", stack, (role, left - 1), 0)
    if mode == "num":
        nxt = _number(stack, sub, b)
        if nxt is not None or not NUM_DONE[sub]:
            return nxt
        return step(("after", stack, None, 0), b)  # the number ended: b is read after it
    if mode == "lit":
        if b != sub[0]:
            return None
        return ("lit", stack, sub[1:], 0) if len(sub) > 1 else _closed(stack)
    if b in WS:  # (none after the object: it ends there)
        return (mode, stack, sub, ws + 1) if ws < MAX_WS and mode != "done" else None
    if mode == "start":
        return _value(stack, b) if b == 0x7B else None
    if mode == "value":
        return _value(stack, b)
    if mode == "value_or_close":
        return _closed(stack[:-1]) if b == 0x5D else _value(stack, b)
    if mode in ("key_or_close", "key"):
        if b == 0x22:
            return ("str", stack, "k", 0)
        return _closed(stack[:-1]) if b == 0x7D and mode == "key_or_close" else None
    if mode == "colon":
        return ("value", stack, None, 0) if b == 0x3A else None
    if mode == "after":
        top = stack[-1]
        if b == 0x2C:
            return ("key" if top == "{" else "value", stack, None, 0)
        if b == (0x7D if top == "{" else 0x5D):
            return _closed(stack[:-1])
        return None
    return None  # done: whitespace only (above)


def feed(state: State | None, data: bytes) -> State | None:
    """The state after `data`, or None when some byte cannot come."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def complete(state: State | None) -> bool:
    """Whether the output so far is one whole JSON object (whitespace after it allowed)."""
    return state is not None and state[0] == "done"


def _whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class _Node:
    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.ids: list[int] = []

    def add(self, data: bytes, tid: int) -> None:
        node = self
        for b in data:
            node = node.children.get(b) or node.children.setdefault(b, _Node())
        node.ids.append(tid)


def token_pieces(tokenizer) -> list[bytes | None]:
    """Each id's bytes as they appear in generated text (None: a special token, never allowed).
    Byte-level vocabularies: `Tokenizer.token_bytes`; SentencePiece-style ones: the piece with
    its `▁` as a space and byte pieces as their byte (a lone token's decode drops that space)."""
    special = tokenizer.special_ids
    out: list[bytes | None] = []
    for tid in range(tokenizer.vocab_size):
        if tid in special:
            out.append(None)
        elif tokenizer.bytes_exact:
            out.append(tokenizer.token_bytes(tid))
        else:
            piece = tokenizer.convert_ids_to_tokens([tid])[0]
            if piece is None:
                out.append(None)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class JsonVocab:
    """A vocabulary's tokens for JSON mode: tries of their bytes and the masks of states."""

    def __init__(self, pieces: list[bytes | None], width: int, eos_ids: list[int]) -> None:
        self.width = width  # the logits' width (may exceed the tokenizer's ids)
        self.eos_ids = [t for t in eos_ids if t < width]
        self.trie = _Node()  # every allowed-able token
        self.special = _Node()  # tokens a string's state does not just pass over
        plain = torch.zeros(width, dtype=torch.bool)
        for tid, data in enumerate(pieces[:width]):
            if not data:
                continue
            self.trie.add(data, tid)
            if all(b >= 0x20 and b not in (0x22, 0x5C) for b in data) and _whole_utf8(data):
                plain[tid] = True
            else:
                self.special.add(data, tid)
        self.plain = plain
        self._masks: OrderedDict[State, torch.Tensor] = OrderedDict()
        self._steps: dict[tuple[State, int], State | None] = {}

    def _step(self, state: State, b: int) -> State | None:
        key = (state, b)
        try:
            return self._steps[key]
        except KeyError:
            if len(self._steps) > 1 << 20:
                self._steps.clear()
            got = self._steps[key] = step(state, b)
            return got

    def mask(self, state: State | None) -> torch.Tensor:
        """(width,) bool: the tokens allowed in `state` (see the module's Semantics); an invalid
        state (None) allows the eos ids only, so the sequence ends."""
        got = self._masks.get(state)
        if got is not None:
            self._masks.move_to_end(state)
            return got
        allowed = torch.zeros(self.width, dtype=torch.bool)
        if state is not None:
            in_string = state[0] == "str" and not state[3]  # (not inside a UTF-8 character)
            ids: list[int] = []
            todo = [(self.special if in_string else self.trie, state)]
            while todo:  # depth first over the trie, each child only while its bytes may come
                node, s = todo.pop()
                for b, child in node.children.items():
                    ns = self._step(s, b)
                    if ns is not None:
                        ids += child.ids
                        if child.children:
                            todo.append((child, ns))
            if ids:
                allowed[torch.tensor(ids)] = True
            if in_string:
                allowed |= self.plain
        if state is None or complete(state):
            allowed[self.eos_ids] = True
        self._masks[state] = allowed
        if len(self._masks) > CACHE:
            self._masks.popitem(last=False)
        return allowed


class JsonGuide:
    """One sequence's automaton state, caught up from its generated ids when asked."""

    __slots__ = ("vocab", "pieces", "state", "seen")

    def __init__(self, vocab: JsonVocab, pieces: list[bytes | None]) -> None:
        self.vocab, self.pieces = vocab, pieces
        self.state: State | None = START
        self.seen = 0  # generated ids fed so far

    def _feed(self, state: State | None, ids) -> State | None:
        for tid in ids:
            data = self.pieces[tid] if 0 <= tid < len(self.pieces) else None
            state = feed(state, data) if data else None
        return state

    def mask(self, generated: list[int], drafts=()) -> torch.Tensor:
        """The mask for the token after `generated` (the sequence's generated ids) and then
        `drafts` (tokens proposed, not yet confirmed: not kept in the state)."""
        self.state = self._feed(self.state, generated[self.seen:])
        self.seen = len(generated)
        return self.vocab.mask(self._feed(self.state, drafts) if drafts else self.state)
