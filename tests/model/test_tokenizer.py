"""Tokenizer: round trips on mixed-language text, the chat template, and incremental
detokenization that equals a full decode at every step (whole UTF-8 characters only)."""

from __future__ import annotations

import pytest

from shoal.model.registry import ModelRegistry
from shoal.model.tokenizer import REPLACEMENT, IncrementalDetokenizer, Tokenizer

MIXED = [
    "The quick brown fox jumps over the lazy dog.",
    "Übermäßig große Straßenbahnen fahren durch München.",
    "Sjösättningen av båten gick över förväntan, sa Åsa.",
    "東京は日本の首都です。今日はとても暑いですね。",
    "我们今天去公园散步，天气非常好。",
    "Emoji: 🐟🐠🐡 shoal of fish 🌊 and a family 👨‍👩‍👧‍👦!",
    "  leading spaces, tabs\tand\nnewlines\n\n",
]


@pytest.fixture(scope="module")
def real_tok(default_home):
    reg = ModelRegistry(default_home / "models")
    return Tokenizer.from_dir(reg.resolve("SmolLM2-135M-Instruct"))


@pytest.mark.real_model
@pytest.mark.parametrize("text", MIXED)
def test_round_trip_mixed_text(real_tok, text):
    ids = real_tok.encode(text, add_special_tokens=False)
    assert ids and all(isinstance(i, int) for i in ids)
    assert real_tok.decode(ids) == text


@pytest.mark.real_model
def test_other_languages_cost_more_tokens(real_tok):
    en = len(real_tok.encode("The weather is very nice today.", add_special_tokens=False))
    ja = len(real_tok.encode("今日はとても天気が良いです。", add_special_tokens=False))
    assert ja > en


def _expected_prefix(tok, ids):
    """The full decode minus a trailing incomplete character."""
    return tok.decode(ids).rstrip(REPLACEMENT)


def _check_incremental(tok, ids, prompt_ids=()):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    base = tok.decode(list(prompt_ids))
    for i, tid in enumerate(ids):
        delta = detok.push(tid)
        assert REPLACEMENT not in delta
        full = _expected_prefix(tok, list(prompt_ids) + ids[: i + 1])
        assert base + detok.text == full, f"step {i}"
    detok.flush()
    assert detok.text == tok.decode(ids) if not prompt_ids else base + detok.text == tok.decode(
        list(prompt_ids) + ids)


@pytest.mark.real_model
@pytest.mark.parametrize("text", MIXED)
def test_incremental_detokenization_equals_full_decode(real_tok, text):
    _check_incremental(real_tok, real_tok.encode(text, add_special_tokens=False))


@pytest.mark.real_model
def test_incremental_after_a_prompt(real_tok):
    prompt = real_tok.encode("Translate: ", add_special_tokens=False)
    _check_incremental(real_tok, real_tok.encode("東京 🐟 Straße", add_special_tokens=False), prompt)


@pytest.mark.real_model
def test_split_character_is_held_back(real_tok):
    """A 4-byte emoji spread over byte tokens appears only once all its bytes are in."""
    ids = real_tok.encode("🐡", add_special_tokens=False)
    assert len(ids) > 1  # byte-level pieces
    detok = IncrementalDetokenizer(real_tok)
    deltas = [detok.push(t) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🐡"


@pytest.mark.real_model
def test_special_tokens_skipped_on_request(real_tok):
    eos = real_tok.eos_token_id
    ids = real_tok.encode("Hi", add_special_tokens=False) + [eos]
    detok = IncrementalDetokenizer(real_tok, skip_special_tokens=True)
    for t in ids:
        detok.push(t)
    assert detok.text + detok.flush() == "Hi"
    assert eos in real_tok.stop_token_ids


def test_tiny_tokenizer_incremental(tiny_tokenizer_dir):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    for text in MIXED:
        _check_incremental(tok, tok.encode(text, add_special_tokens=False))


def test_chat_template_tiny(tiny_tokenizer_dir):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == text


def test_missing_tokenizer_dir(tmp_path):
    from shoal.model.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path))


@pytest.mark.real_model
def test_decode_equals_transformers_decode(real_tok, tiny_tokenizer_dir):
    """`decode` calls the Rust tokenizer directly; it must give what transformers' decode (clean
    up off) gives, special tokens kept or skipped, on random ids and split characters."""
    import random

    for tok in (real_tok, Tokenizer.from_dir(tiny_tokenizer_dir)):
        rng = random.Random(0)
        n = tok.vocab_size
        specials = [t for t in (tok.eos_token_id, tok.bos_token_id) if t is not None]
        for _ in range(200):
            ids = [rng.randrange(n) for _ in range(rng.randint(0, 12))] + rng.sample(specials, len(specials))
            rng.shuffle(ids)
            for skip in (False, True):
                want = tok.hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
                assert tok.decode(ids, skip_special_tokens=skip) == want


@pytest.mark.real_model
@pytest.mark.parametrize("text", MIXED)
def test_token_bytes_spell_the_decoded_text(real_tok, text):
    """Each token's own bytes (a character split across tokens: its parts) join to the decoded
    text's UTF-8, special tokens included."""
    ids = real_tok.encode(text) + real_tok.stop_token_ids[:1]
    assert b"".join(real_tok.token_bytes(i) for i in ids) == real_tok.decode(ids).encode("utf-8")


def test_tiny_token_bytes_cover_every_byte(tiny_tokenizer_dir):
    """A byte-level vocabulary has a token for each of the 256 bytes, and `token_bytes` says which."""
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    singles = {tok.token_bytes(i) for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1}
    assert singles == {bytes([b]) for b in range(256)}


def _windowed(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer with the byte fast path off (the windowed decode path)."""
    slow = Tokenizer(tok.hf)
    slow.bytes_exact = False
    return slow


@pytest.mark.real_model
@pytest.mark.parametrize("skip", [False, True])
def test_byte_fast_path_equals_windowed_decode(real_tok, skip):
    """Random ids (split and invalid UTF-8, special tokens): the fast path's text equals the
    full decode after every id (up to a trailing incomplete char, and an invalid byte it emits
    as U+FFFD as soon as it is known invalid), and after flush exactly."""
    import random

    assert real_tok.bytes_exact and real_tok.eos_token_id in real_tok.special_ids
    slow_tok = _windowed(real_tok)
    rng = random.Random(7)
    vocab = real_tok.vocab_size
    for _ in range(300):
        ids = [rng.randrange(vocab) if rng.random() < 0.9 else rng.randrange(17) for _ in range(rng.randint(1, 20))]
        fast, slow = IncrementalDetokenizer(real_tok, skip), IncrementalDetokenizer(slow_tok, skip)
        assert fast._utf8 is not None and slow._utf8 is None
        for i, t in enumerate(ids):
            fast.push(t)
            slow.push(t)
            want = real_tok.decode(ids[:i + 1], skip_special_tokens=skip)
            assert want.startswith(fast.text) and not want[len(fast.text):].strip(REPLACEMENT)  # held: one open char
        fast.flush()
        slow.flush()
        assert fast.text == slow.text == real_tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.real_model
def test_token_text_is_whole_characters_only(real_tok):
    """`token_text`: a token's text when its bytes are whole UTF-8 characters, None when they
    hold part of one (the detokenizer then runs its UTF-8 decoder)."""
    word = real_tok.encode(" hello", add_special_tokens=False)
    assert len(word) == 1 and real_tok.token_text(word[0]) == " hello"
    split = [t for t in real_tok.encode("日本語のテキスト", add_special_tokens=False)
             if real_tok.token_bytes(t).decode("utf-8", "replace") != real_tok.token_bytes(t).decode("utf-8", "ignore")]
    assert split, "the text should split a character across tokens"
    assert all(real_tok.token_text(t) is None for t in split)
    # a split character pushed after whole ones, then whole ones again: the same text as decode
    ids = word + real_tok.encode("日本語のテキスト hello", add_special_tokens=False)
    detok = IncrementalDetokenizer(real_tok)
    assert "".join(detok.push(t) for t in ids) + detok.flush() == real_tok.decode(ids) == detok.text
