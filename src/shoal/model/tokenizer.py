"""Tokenizer: the checkpoint's fast tokenizer, its chat template, and streaming detokenization.

Wraps a transformers `PreTrainedTokenizerFast` loaded from a model directory or rebuilt from a
GGUF file's metadata. `IncrementalDetokenizer` turns a growing list of ids into text deltas that
only ever contain whole UTF-8 characters: a character split across byte-level tokens is held back
until its last byte arrives. Not here: prompt truncation or token accounting (serving does that).
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's `bytes_to_unicode`), reversed: character -> byte. The
    printable bytes stand for themselves; the other 68 take the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    out, extra = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_OF = _byte_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(ValueError):
    """Tokenizer files missing or unreadable; names the path."""


class Tokenizer:
    """Encode, decode and render chat prompts with the checkpoint's own rules."""

    def __init__(self, hf_tokenizer) -> None:
        if not getattr(hf_tokenizer, "is_fast", False):
            raise TokenizerError("Shoal needs a fast tokenizer (tokenizer.json)")
        self.hf = hf_tokenizer
        # the Rust tokenizer itself: `hf.decode` with clean-up off is this call behind ~4 us of
        # Python argument handling, paid twice per generated token (`IncrementalDetokenizer`)
        self._rust = getattr(hf_tokenizer, "backend_tokenizer", None)
        decoder = getattr(self._rust, "decoder", None)
        self._byte_level = "ByteLevel" in repr(decoder)  # (a Sequence of decoders may hold it)
        self._bytes: dict[int, bytes] = {}  # `token_bytes`, as asked
        self._text: dict[int, str | None] = {}  # `token_text`, as asked
        # decode(ids) is the ids' `token_bytes` joined and read as UTF-8 (invalid bytes replaced)
        # when the decoder is ByteLevel alone: the streaming detokenizer's fast path
        self.bytes_exact = self._rust is not None and type(decoder).__name__ == "ByteLevel"
        added = self._rust.get_added_tokens_decoder() if self._rust is not None else {}
        self.special_ids = frozenset(i for i, tok in added.items() if tok.special)  # skipped by skip_special_tokens

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """Load from a model directory holding tokenizer.json (and tokenizer_config.json)."""
        from transformers import PreTrainedTokenizerFast

        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise TokenizerError(f"{path}: no tokenizer.json (Shoal needs a fast tokenizer)")
        try:  # the concrete class loads in a quarter of AutoTokenizer's time
            return cls(PreTrainedTokenizerFast.from_pretrained(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        """Rebuild the tokenizer stored in a GGUF file's metadata (slow: ~10 s for 49k tokens;
        the model cache saves the result as tokenizer.json)."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                gguf_file=os.path.basename(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot read the tokenizer from GGUF metadata "
                                 f"({type(e).__name__}: {e})") from None
        return cls(tok)

    def save(self, path: str) -> None:
        self.hf.save_pretrained(path)

    # ---- ids <-> text ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generation: eos, plus the chat template's end-of-turn if different."""
        ids = [self.hf.eos_token_id] if self.hf.eos_token_id is not None else []
        for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"):
            tid = self.hf.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.hf.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ids, as `hf.decode(ids, clean_up_tokenization_spaces=False)`."""
        if self._rust is not None:
            return self._rust.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` adds to decoded text: for a byte-level BPE vocabulary (GPT-2's,
        SmolLM2's, Llama 3's) its piece mapped back through the byte alphabet, so a token holding
        part of a UTF-8 character gives those bytes, not a replacement character (OpenAI's logprob
        `bytes`: clients join a character's tokens by them); a byte-fallback piece (`<0xE2>`) its
        byte; anything else its decoded text in UTF-8."""
        got = self._bytes.get(token_id)
        if got is None:
            got = self._bytes[token_id] = self._token_bytes(token_id)
        return got

    def token_text(self, token_id: int) -> str | None:
        """`token_bytes(token_id)` as text when they are whole, valid UTF-8 (most tokens), else
        None (part of a character, or invalid bytes): what a byte-level detokenizer with nothing
        held back adds for the token, without running a UTF-8 decoder (`IncrementalDetokenizer`)."""
        try:
            return self._text[token_id]
        except KeyError:
            try:
                text = self.token_bytes(token_id).decode("utf-8")
            except UnicodeDecodeError:
                text = None
            self._text[token_id] = text
            return text

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.hf.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._byte_level and all(c in _BYTE_OF for c in piece):
                return bytes(_BYTE_OF[c] for c in piece)
            m = _BYTE_FALLBACK.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
        return self.decode([token_id]).encode("utf-8")

    # ---- chat -----------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render messages with the checkpoint's template (text, not ids)."""
        if not self.hf.chat_template:
            raise TokenizerError("this model has no chat template; use a plain completion prompt")
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a chat: the rendered template, tokenized without extra specials (the
        template already places them)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_special_tokens=False)


class IncrementalDetokenizer:
    """Text deltas for a growing id list, whole UTF-8 characters only.

    Semantics: after `push(t1) + push(t2) + ... + flush()`, the concatenated deltas equal
    `decode([t1, t2, ...])`; after each push they equal that decode minus any trailing
    incomplete character.

    It decodes a short window of recent ids (`prefix_offset:`) and compares it with the same
    window without the new ids (`prefix_offset:read_offset`), so the cost per token is constant
    and tokenizers whose decode of a token depends on its left neighbour stay correct.
    A byte-level tokenizer whose decoder is ByteLevel alone (`Tokenizer.bytes_exact`: GPT-2's,
    SmolLM2's, Llama 3's, Qwen2's) takes a fast path instead: each id's bytes through an
    incremental UTF-8 decoder, no tokenizer call (measured, SmolLM2's tokenizer, English and
    Japanese text: 1.68 -> 1.10 us a token, paid for every row of every step), and a token of whole
    characters with none open adds its cached text without the decoder (`Tokenizer.token_text`).
    The text is the same; an invalid byte comes out as U+FFFD when it is known invalid, not at the
    next whole char.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False,
                 prompt_ids: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if tokenizer.bytes_exact else None
        self._parts: list[str] = []  # the deltas so far (`text` joins them when read)
        if self._utf8 is not None:  # (no window: a token's bytes do not depend on its neighbours)
            self._skipped = tokenizer.special_ids if skip_special_tokens else frozenset()
            self._open = False  # the decoder holds bytes of an unfinished character
            return
        self.ids: list[int] = list(prompt_ids)
        # start the window a few tokens back in the prompt so the first delta has context
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.partial = 0  # chars past the window's prefix already emitted while a char was open

    @property
    def text(self) -> str:
        """All the text pushed so far (the deltas joined: `+=` on an attribute copies the whole
        string every token, quadratic in a long output)."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        if self._utf8 is not None:
            if token_id in self._skipped:
                return ""
            delta = None if self._open else self.tok.token_text(token_id)  # (whole characters: as decoded)
            if delta is None:  # part of a character, or one open: the UTF-8 decoder
                delta = self._utf8.decode(self.tok.token_bytes(token_id))
                self._open = bool(self._utf8.getstate()[0])
            self._parts.append(delta)
            return delta
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        # an incomplete character decodes to U+FFFD at the end: emit only what precedes it
        stable = full.rstrip(REPLACEMENT)
        delta = stable[len(prefix) + self.partial:]
        if len(stable) < len(full):
            self.partial += len(delta)
        else:
            self.prefix_offset, self.read_offset, self.partial = self.read_offset, len(self.ids), 0
        self._parts.append(delta)
        return delta

    def flush(self) -> str:
        """At the end of generation: emit whatever is held back (even an incomplete char)."""
        if self._utf8 is not None:
            delta = self._utf8.decode(b"", final=True)
            self._open = False
            self._parts.append(delta)
            return delta
        full = self._decode(self.ids[self.prefix_offset:])
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        delta = full[len(prefix) + self.partial:]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.partial = 0
        self._parts.append(delta)
        return delta
