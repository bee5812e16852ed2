"""Structured output: each step, the tokens that keep a sequence's output a prefix of one JSON
object (OpenAI's `response_format` {"type": "json_object"}, JSON mode) or of one instance of a
JSON Schema ({"type": "json_schema"}: `json_schema.Grammar`, the subset of OpenAI's strict mode)
get through; the rest are masked.

- `json_schema.Grammar`: the byte automaton of a schema (JSON mode: the schema {"type": "object"},
  `OBJECT`); states are frozensets of hashable tuples.
- `JsonVocab` (one per tokenizer and vocabulary width): every token's bytes in a trie, and the
  mask of tokens allowed in a state, cached by (schema, state). Inside a free string almost every
  token keeps the state as it is: those ("plain": no quote, backslash or control byte, whole
  UTF-8 characters) are one precomputed mask, so a string state walks only the few hundred other
  tokens; elsewhere the walk stops at the first byte that cannot come next.
- `JsonGuide` (one per sequence): the automaton's states after the tokens generated so far,
  caught up from the sequence's ids when its mask is asked for (a draft row's: those states fed
  the row's drafts, so drafted tokens are checked against the masks they would have met).

Semantics of the mask in states S (V = the logits' width):
    allowed[t] = feed(S, t's bytes) is not empty, for every t < V that is not a special token;
                 when S is complete (the instance closed), empty (an invalid token came in), or
                 no token can continue it, allowed also holds the end-of-sequence ids
A sequence whose text is a whole instance ends there (eos is all that is left); one stopped by
max_tokens or a stop string is a prefix, as with OpenAI. Strings hold valid UTF-8 (RFC 3629),
so the text has no replacement characters; outside strings only JSON's own bytes are allowed,
whitespace at most `MAX_WS` bytes in a row.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .json_schema import MAX_WS, Grammar, SchemaError, States, compiled  # noqa: F401  (re-exported too)

CACHE = 512  # masks kept per vocabulary, over all schemas (by schema and state)
BANNED_MAX = 4096  # a mask's left-out ids handed to the CPU's draw as a list, up to this many
OBJECT = Grammar({"type": "object"})  # JSON mode: one object, any keys and values
START = OBJECT.start


def feed(states: States, data: bytes, grammar: Grammar = OBJECT) -> States:
    """The states after `data` (empty: some byte cannot come)."""
    return grammar.feed(states, data)


def complete(states: States) -> bool:
    """Whether the output so far is one whole instance."""
    return Grammar.complete(states)


class _Node:
    """A trie node over tokens' bytes, built as first walked: `pending` holds the (bytes, id) of
    the tokens below it until `children` is first read (a walk from a state outside strings
    reaches only the few first bytes JSON allows there, so most of the vocabulary's trie is never
    built: on the default model the index and the masks of a first 43-token object took 0.31-0.33 s
    and 12 MB, against 0.85 s and 36 MB with the whole trie built up front)."""

    __slots__ = ("_children", "ids", "pending", "depth")

    def __init__(self, depth: int = 0) -> None:
        self._children: dict[int, _Node] | None = None
        self.ids: list[int] = []  # the tokens that end here
        self.pending: list[tuple[bytes, int]] = []  # the tokens below, not yet placed
        self.depth = depth  # bytes from the root

    def add(self, data: bytes, tid: int) -> None:
        if len(data) == self.depth:
            self.ids.append(tid)
        else:
            self.pending.append((data, tid))

    @property
    def children(self) -> dict[int, _Node]:
        if self._children is None:
            kids: dict[int, _Node] = {}
            d = self.depth
            for data, tid in self.pending:
                child = kids.get(data[d])
                if child is None:
                    child = kids[data[d]] = _Node(d + 1)
                child.add(data, tid)
            self._children, self.pending = kids, []
        return self._children


def _whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


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
    """A vocabulary's tokens for structured output: tries of their bytes and the masks of states."""

    def __init__(self, pieces: list[bytes | None], width: int, eos_ids: list[int]) -> None:
        self.width = width  # the logits' width (may exceed the tokenizer's ids)
        self.eos_ids = [t for t in eos_ids if t < width]
        self.trie = _Node()  # every token that can be allowed
        self.special = _Node()  # tokens a free string's state does not just pass over
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
        self._masks: OrderedDict[tuple[str, States], torch.Tensor] = OrderedDict()
        self._banned: OrderedDict[tuple[str, States], list[int] | None] = OrderedDict()

    def mask(self, states: States, grammar: Grammar = OBJECT) -> torch.Tensor:
        """(width,) bool: the tokens allowed in `states` (see the module's Semantics)."""
        key = (grammar.key, states)
        got = self._masks.get(key)
        if got is not None:
            self._masks.move_to_end(key)
            return got
        allowed = torch.zeros(self.width, dtype=torch.bool)
        ids: list[int] = []
        in_string = False
        if states:
            in_string = grammar.free_string(states)
            todo = [(self.special if in_string else self.trie, states)]
            while todo:  # depth first over the trie, each child only while its bytes may come
                node, s = todo.pop()
                for b, child in node.children.items():
                    ns = grammar.advance(s, b)
                    if ns:
                        ids += child.ids
                        if child.pending or child._children:
                            todo.append((child, ns))
            if ids:
                allowed[torch.tensor(ids)] = True
            if in_string:
                allowed |= self.plain
        if not states or grammar.complete(states) or not ids and not in_string:
            allowed[self.eos_ids] = True  # (no token can continue: e.g. past MAX_DEPTH; the output ends)
        self._masks[key] = allowed
        if len(self._masks) > CACHE:
            self._masks.popitem(last=False)
        return allowed

    def banned(self, states: States, grammar: Grammar = OBJECT) -> list[int] | None:
        """The ids `mask` leaves out, when at most `BANNED_MAX` (a free string's: the few tokens
        that would close or break it, and the special ones), else None. A sampled row's draw on
        the CPU skips such a list without copying its logits (`kernels.sample_rows`)."""
        key = (grammar.key, states)
        if key not in self._banned:
            out = (~self.mask(states, grammar)).nonzero().flatten()
            self._banned[key] = out.tolist() if out.numel() <= BANNED_MAX else None
            if len(self._banned) > CACHE:
                self._banned.popitem(last=False)
        return self._banned[key]


class JsonGuide:
    """One sequence's automaton states, caught up from its generated ids when asked."""

    __slots__ = ("vocab", "pieces", "grammar", "states", "seen")

    def __init__(self, vocab: JsonVocab, pieces: list[bytes | None], grammar: Grammar = OBJECT) -> None:
        self.vocab, self.pieces, self.grammar = vocab, pieces, grammar
        self.states: States = grammar.start
        self.seen = 0  # generated ids fed so far

    def _feed(self, states: States, ids) -> States:
        for tid in ids:
            data = self.pieces[tid] if 0 <= tid < len(self.pieces) else None
            states = self.grammar.feed(states, data) if data else frozenset()
        return states

    def current(self, generated: list[int], drafts=()) -> States:
        """The states after `generated` (the sequence's generated ids) and then `drafts` (tokens
        proposed, not yet confirmed: not kept)."""
        self.states = self._feed(self.states, generated[self.seen:])
        self.seen = len(generated)
        return self._feed(self.states, drafts) if drafts else self.states

    def mask(self, generated: list[int], drafts=()) -> torch.Tensor:
        """The mask for the token after `generated` and then `drafts` (see `current`)."""
        return self.vocab.mask(self.current(generated, drafts), self.grammar)


class StructuredOutput:
    """The sampler's side of structured output: one `JsonVocab` per logits width (its token
    pieces read from the tokenizer once), and each sequence's `JsonGuide` (on `seq.guide`)."""

    def __init__(self, tokenizer, eos_ids: list[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, list(eos_ids)
        self._pieces: list[bytes | None] | None = None
        self._vocab: dict[int, JsonVocab] = {}  # by the logits' width

    def guide(self, s, V: int) -> tuple[JsonGuide, States]:
        """(s's guide, its states now): s a Sequence, or a `speculative.DraftRow` (its sequence
        with its first j drafts)."""
        vocab = self._vocab.get(V)
        if vocab is None:
            if self.tokenizer is None:
                raise ValueError("json_mode: this sampler has no tokenizer to read tokens' bytes from")
            if self._pieces is None:
                self._pieces = token_pieces(self.tokenizer)
            vocab = self._vocab[V] = JsonVocab(self._pieces, V, self.eos_ids)
        seq = getattr(s, "seq", s)
        if seq.guide is None or seq.guide.vocab is not vocab:
            schema = seq.params.json_schema
            seq.guide = JsonGuide(vocab, self._pieces, OBJECT if schema is None else compiled(schema))
        return seq.guide, seq.guide.current(seq.generated_ids, seq.draft[:s.j] if s is not seq else ())

    def mask(self, s, V: int) -> torch.Tensor:
        """(V,) bool: the tokens that keep s's output a prefix of one JSON object, or of one
        instance of its `json_schema`."""
        guide, states = self.guide(s, V)
        return guide.vocab.mask(states, guide.grammar)
