"""JSON mode (`engine.json_guide`): the automaton against Python's json module, the token masks
against feeding each token's bytes, and the engine's outputs (tiny random model, and the real
default model) as JSON objects, seeded rows unchanged by their batch."""

from __future__ import annotations

import json
import random

import pytest
import torch

from shoal.config import EngineConfig
from shoal.engine.json_guide import MAX_WS, START, JsonVocab, complete, feed
from shoal.engine.llm import LLM
from shoal.engine.sampler import Sampler
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.sequence import Sequence
from tests.engine.test_llm_engine import make_llm, prompts

WORDS = ["a", "key", "naïve", "日本", "😀", 'q"uote', "back\\slash", "tab\t", "", "x" * 20]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([0, -1, 17, 3.25, -0.5e-7, 12345678901234, 1e300])
    if kind in (2, 3, 4):
        return rng.choice(WORDS)
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict:
    return {rng.choice(WORDS) + str(i): random_value(rng, depth) for i in range(rng.randrange(4))}


def dumps(rng: random.Random, obj) -> bytes:
    indent = rng.choice([None, 0, 1, 2])
    seps = rng.choice([(",", ":"), (", ", ": "), (" ,", " : ")]) if indent is None else None
    return json.dumps(obj, indent=indent, separators=seps, ensure_ascii=rng.random() < 0.5).encode()


def test_objects_are_complete_and_their_prefixes_open():
    rng = random.Random(0)
    for _ in range(300):
        doc = dumps(rng, random_object(rng))
        assert complete(feed(START, doc)), doc
        for cut in range(len(doc)):
            state = feed(START, doc[:cut])
            assert state and not complete(state), doc[:cut]


def mutate(rng: random.Random, doc: bytes, alphabet: bytes, edits: int) -> bytes:
    """doc with `edits` random bytes of `alphabet` changed, inserted or dropped."""
    out = bytearray(doc)
    for _ in range(edits):
        i = rng.randrange(len(out) + 1)
        op = rng.randrange(3)
        if op == 0 and i < len(out):
            out[i] = rng.choice(alphabet)
        elif op == 1:
            out.insert(i, rng.choice(alphabet))
        elif i < len(out):
            del out[i]
    return bytes(out)


def test_what_the_automaton_accepts_python_parses_as_an_object():
    """Soundness by mutation: a document with one byte changed, inserted or dropped is accepted
    as complete only if json.loads reads an object from it (it may also accept none of it)."""
    rng = random.Random(1)
    alphabet = b'{}[]:,"\\-+.0123456789eEtrufalsn \n\tx\x01\xc3\xa9\xff'
    accepted = 0
    for _ in range(3000):
        doc = mutate(rng, dumps(rng, random_object(rng)), alphabet, rng.randint(1, 2))
        if complete(feed(START, doc)):
            accepted += 1
            assert isinstance(json.loads(doc.decode("utf-8")), dict), doc
    assert accepted > 100  # (mutations inside strings keep many valid)


@pytest.mark.parametrize("doc", [b'[1, 2]', b'"text"', b'3', b'{"a": 01}', b'{"a": tru}', b'{"a" 1}',
                                 b'{,}', b'{"a": 1,}', b'{"a": "\x01"}', b'{"a": "\\x"}', b'{"a": 1}}',
                                 b'{"a": .5}', b'{"a": 1.}', b'{"a": NaN}', b'{"\xc3"}', b'{"\xed\xa0\x80": 1}',
                                 b'{"a": 1} ', b'{' + b' ' * (MAX_WS + 1) + b'}'])
def test_not_one_object_is_refused(doc):
    """Top-level arrays and scalars, JSON's own mistakes, invalid UTF-8 (a surrogate's bytes too),
    anything after the object, and more whitespace in a row than MAX_WS."""
    assert not complete(feed(START, doc))


def test_masks_are_the_tokens_whose_bytes_may_come():
    """Every token of a vocabulary (JSON's bytes, words, partial UTF-8 characters, a special
    token) in states inside and outside strings and characters: allowed exactly when feeding its
    bytes keeps the state valid; eos only once the object is closed."""
    rng = random.Random(2)
    pieces = [None, None]  # ids 0, 1: special (1 is eos here)
    atoms = [b"{", b"}", b"[", b"]", b'"', b":", b",", b" ", b"\n", b"\\", b"u", b"00e9", b"1", b"-", b".", b"e",
             b"true", b"nul", b"l", b"key", b"\xc3", b"\xa9", b"\xe6\x97", b"\xa5", b"\xf0\x9f\x98\x80", b"\x01"]
    for _ in range(600):
        pieces.append(b"".join(rng.choice(atoms) for _ in range(rng.randint(1, 3))))
    vocab = JsonVocab(pieces, len(pieces) + 5, eos_ids=[1])
    for text in [b"", b"{", b'{"k', b'{"k\xe6\x97', b'{"k\\', b'{"k\\u00', b'{"k":', b'{"k": [1, -',
                 b'{"k": [1.5e', b'{"k": tr', b'{"k": [] ', b'{"k": {"a": null}}', b'{"k": "v"']:
        state = feed(START, text)
        assert state, text
        mask = vocab.mask(state).tolist()
        want = [bool(p) and bool(feed(state, p)) for p in pieces] + [False] * 5
        want[1] = complete(state) or not any(want)  # (eos too where no token can continue)
        assert mask == want, text
    assert vocab.mask(frozenset()).nonzero().flatten().tolist() == [1]


def check_json(outs) -> int:
    """Each output is one JSON object (a prefix of one when cut by max_tokens); returns how
    many were whole."""
    whole = 0
    for out in outs:
        for c in out.outputs:
            if c.finish_reason == "stop":
                assert isinstance(json.loads(c.text), dict), c.text
                whole += 1
            else:
                assert c.finish_reason == "length" and feed(START, c.text.encode()), c.text
    return whole


def test_engine_rows_in_json_mode_give_json_and_leave_other_rows_alone(tiny_llama):
    """A batch mixing JSON-mode rows (greedy, sampled, n=2 of best_of=3) with plain ones, chunked
    prompts and the CPU's drafting on: the JSON rows give objects, the plain rows the tokens they
    give alone, and a seeded JSON row the tokens it gives alone."""
    llm = make_llm(tiny_llama, max_num_batched_tokens=64, speculative_tokens=4)
    ps = prompts(12, seed=3, lo=5, hi=50)
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    params = [SamplingParams(temperature=1.0, max_tokens=80, seed=i, json_mode=True) for i in range(6)]
    params += [SamplingParams(temperature=0.0, max_tokens=80, json_mode=True),
               SamplingParams(temperature=0.9, max_tokens=80, n=2, best_of=3, seed=9, json_mode=True)]
    params += [plain] * 4
    outs = llm.generate(ps, params)
    assert check_json(outs[:8]) >= 4
    assert sum(len(c.token_ids) for o in outs[:8] for c in o.outputs) > 40  # (not all "{}")
    for p, out in zip(ps[8:], outs[8:]):
        assert out.outputs[0].token_ids == llm.generate([p], plain)[0].outputs[0].token_ids
    alone = make_llm(tiny_llama).generate([ps[0]], params[0])[0]
    assert alone.outputs[0].token_ids == outs[0].outputs[0].token_ids
    unconstrained = llm.generate(ps[:6], [SamplingParams(temperature=1.0, max_tokens=80, seed=i)
                                         for i in range(6)])
    assert not any(feed(START, o.outputs[0].text.encode()) for o in unconstrained)


def test_drafts_in_json_mode_change_nothing_but_the_steps(tiny_llama):
    """Drafts of a JSON row are checked against the masks they would meet as tokens: with drafts
    from a prediction of the answer (and from prompt lookup) the tokens are those without drafts,
    greedy and seeded, and most of the prediction is confirmed."""
    ps = prompts(3, seed=21, lo=8, hi=30)
    params = [SamplingParams(temperature=0.0, max_tokens=60, json_mode=True),
              SamplingParams(temperature=1.0, seed=4, max_tokens=60, json_mode=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=60, json_mode=True)]
    want = [o.outputs[0].token_ids for o in make_llm(tiny_llama, speculative_tokens=0).generate(ps, params)]
    llm = make_llm(tiny_llama, speculative_tokens=8)
    for p, sp, w in zip(ps, params, want):
        predicted = SamplingParams(**{**{f: getattr(sp, f) for f in ("temperature", "seed", "max_tokens")},
                                      "json_mode": True, "prediction": w[:-1] + [7, 7]})
        before = llm.engine.accepted
        assert llm.generate([p], predicted)[0].outputs[0].token_ids == w
        assert llm.engine.accepted - before >= len(w) // 2
    assert [o.outputs[0].token_ids for o in llm.generate(ps, params)] == want


def test_the_short_cuts_draw_what_the_copy_draws(tiny_llama, monkeypatch):
    """A sampled structured row's CPU draw skipping its left-out ids (no copy of its logits)
    gives the tokens of the copy with the mask applied; the same for greedy rows keeping an
    allowed raw argmax (JSON mode and a schema, temperatures 0, 0.7 and 1, top_p)."""
    schema = {"type": "object", "properties": {"t": {"type": "string"}, "n": {"type": "number"}},
              "required": ["t", "n"], "additionalProperties": False}
    ps = prompts(6, seed=33, lo=5, hi=30)
    params = [SamplingParams(temperature=t, top_p=tp, seed=i, max_tokens=50,
                             **({"json_schema": schema} if i % 2 else {"json_mode": True}))
              for i, (t, tp) in enumerate([(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (0.0, 1.0), (1.0, 1.0), (0.0, 1.0)])]
    used = []
    real_banned = JsonVocab.banned
    monkeypatch.setattr(JsonVocab, "banned", lambda *a: used.append(1) or real_banned(*a))
    fast = [o.outputs[0].token_ids for o in make_llm(tiny_llama).generate(ps, params)]
    assert used  # (the short cut ran)
    # every structured row through the copy: as if it had penalties
    monkeypatch.setattr(Sampler, "_shifts", staticmethod(lambda s, V: True))
    copied = [o.outputs[0].token_ids for o in make_llm(tiny_llama).generate(ps, params)]
    assert fast == copied


@pytest.mark.parametrize("kwargs,field", [(dict(ignore_eos=True), "ignore_eos"), (dict(min_tokens=2), "min_tokens")])
def test_json_mode_refuses_what_would_keep_it_from_ending(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(json_mode=True, **kwargs)


@pytest.mark.real_model
def test_real_model_answers_with_the_object_asked_for(default_home, monkeypatch):
    """The default model asked for JSON: unconstrained, it wraps the object in a Markdown fence
    and talks on; in JSON mode the answer is the object, greedy and sampled; with a schema, an
    instance of it."""
    monkeypatch.setenv("SHOAL_HOME", str(default_home))
    llm = LLM(EngineConfig(kv_cache_memory=32 * 2**20))
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Describe a cat as a JSON object with "
                                                                 "the keys name, age and color."}])
    free = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=60))[0].outputs[0].text
    assert free.lstrip().startswith("```")
    greedy = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=60, json_mode=True))[0]
    obj = json.loads(greedy.outputs[0].text)
    assert set(obj) == {"name", "age", "color"} and greedy.outputs[0].finish_reason == "stop"
    sampled = llm.generate(ids, SamplingParams(temperature=1.0, max_tokens=100, n=4, seed=5, json_mode=True))
    assert check_json(sampled) >= 3
    # with a schema: its keys, in its order, of its types (the model alone gave "color": "black")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "color": {"enum": ["white", "ginger", "tabby"]}},
              "required": ["name", "age", "color"], "additionalProperties": False}
    shaped = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=60, json_schema=schema))[0].outputs[0]
    obj = json.loads(shaped.text)
    assert list(obj) == ["name", "age", "color"] and isinstance(obj["age"], int) and obj["color"] in schema[
        "properties"]["color"]["enum"]


def test_a_sampler_without_a_tokenizer_says_so():
    seq = Sequence("r", [5, 6], SamplingParams(json_mode=True))
    with pytest.raises(ValueError, match="^json_mode: "):
        Sampler([1]).process_logits(torch.zeros(1, 8), [seq])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("flights", [True, False])
def test_json_mode_on_a_gpu(tiny_tokenizer_dir, tmp_path, flights):
    """On a GPU (tiny model, CUDA graphs; steps in flight or not): JSON rows beside plain ones
    give objects or prefixes of one, and the plain rows the tokens they give alone."""
    from shoal.model.loader import load_dir
    from tests.helpers import hf_tiny_config, save_tiny_hf_dir

    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config("llama", max_position_embeddings=512), tmp_path / "m", tiny_tokenizer_dir)
    loaded = load_dir(str(tmp_path / "m"), dtype="float32", device="cuda")
    llm = make_llm(loaded, device="cuda", async_scheduling=flights)
    ps = prompts(8, seed=31, lo=5, hi=40)
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, json_mode=True) for i in range(4)] + [plain] * 4
    outs = llm.generate(ps, params)
    check_json(outs[:4])
    for p, out in zip(ps[4:], outs[4:]):
        assert out.outputs[0].token_ids == llm.generate([p], plain)[0].outputs[0].token_ids


def test_token_pieces_of_a_sentencepiece_vocabulary():
    """A vocabulary whose decoder is not byte-level alone (Llama 2's, Mistral's): each piece's
    `▁` is a space and a byte piece its byte, as the tokens appear inside generated text; the
    special tokens are never allowed."""
    from shoal.engine.json_guide import token_pieces

    class SentencePieceLike:  # (the three things `token_pieces` reads of a Tokenizer)
        vocab_size, special_ids, bytes_exact = 5, frozenset({0}), False
        pieces = ["<s>", "▁{", "<0x0A>", "▁\"name\":", "日本"]

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

    assert token_pieces(SentencePieceLike()) == [None, b" {", b"\n", b' "name":', "日本".encode()]
