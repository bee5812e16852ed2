"""Speculative decoding by prompt lookup (`engine.speculative`): drafts come from the sequence's own
earlier n-grams, and an engine that checks them gives exactly the tokens, text, logprobs and
finish reasons of one that does not, in fewer steps; with preemption, prefix caching, aborts
and adapters too."""

from __future__ import annotations

import pytest

from shoal.config import EngineConfig
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.sequence import Sequence
from shoal.engine.speculative import (ROWS, PromptLookup, accepted, can_draft, draft_limit, drafted_rows,
                                      propose)
from shoal.model.generate import generate
from tests.engine.test_engine_lora import engine as lora_engine
from tests.engine.test_engine_lora import setup  # noqa: F401  (module fixture)
from tests.engine.test_llm_engine import make_llm, prompts, ref


def test_lookup_proposes_what_followed_the_latest_longest_match():
    look = PromptLookup(4)
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 2, 6, 7, 3, 4, 6, 7]
    # the last 3 tokens (4, 6, 7) never occurred before; (6, 7) did, latest at 5-6: then 3, 4, 6, 7
    assert look.draft(tokens, 3) == [3, 4, 6]
    assert look.draft(tokens, 8) == [3, 4, 6, 7]  # (its continuation ends at the sequence's end)
    tokens += [3]  # (7, 3) recurs at 6-7; (6, 7, 3) at 5-7: the longest wins, the same place
    assert look.draft(tokens, 2) == [4, 6]
    assert PromptLookup(4).draft([1, 2, 3, 4], 4) == []  # nothing recurs
    assert PromptLookup(4).draft([9, 9], 3) == [9]  # a unigram: 9 followed by 9


def test_a_prediction_drafts_first_from_where_the_output_is_in_it():
    #               0  1  2  3  4  5  6  7  8  9
    look = PromptLookup(4, [1, 2, 3, 7, 8, 1, 2, 3, 9, 4])
    # (1, 2, 3) occurs twice in the prediction: the first at or after the cursor (0) wins
    assert look.draft([5, 5, 1, 2, 3], 3) == [7, 8, 1] and look.from_prediction
    look.checked(3, 3, 4)
    assert look.predicted_accepted == 3
    # five tokens on (7, 8, 1 confirmed, then 2, 3): the second occurrence, past the cursor (3 + 3 + 1)
    assert look.draft([5, 5, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [9, 4]
    look.checked(2, 1, 4)
    assert look.predicted_accepted == 4
    # no n-gram of the prediction matches: the sequence's own context, as without one
    look = PromptLookup(4, [1, 2, 3, 7])
    assert look.draft([6, 6, 5, 6], 2) == [5, 6] and not look.from_prediction
    look.checked(2, 2, 4)
    assert look.predicted_accepted == 0  # (drafts from the context do not count)
    assert PromptLookup(4, [1]).draft([3, 1], 2) == []  # (a one-token prediction: no continuation)
    # a row with a prediction drafts up to 2k (at most 16, or k where k is larger)
    predicted, plain = SamplingParams(temperature=0.0, prediction=[1, 2]), SamplingParams(temperature=0.0)
    assert [draft_limit(_decoding(predicted), k) for k in (4, 8, 16)] == [8, 16, 16]
    assert [draft_limit(_decoding(plain), k) for k in (4, 8, 16)] == [4, 8, 16]
    seq = _decoding(SamplingParams(temperature=0.0, max_tokens=50, prediction=[0, 1, 2, 3, *range(10, 22)]),
                    prompt=(1, 2, 3, 1, 2), generated=(3,))
    seq.lookup = PromptLookup(16, seq.params.prediction)
    propose([seq], 8, 1000)
    assert seq.draft == list(range(10, 22))  # (past k = 8: the prediction's rest)


def _decoding(params: SamplingParams, prompt=(1, 2, 3, 1, 2), generated=(3,)) -> Sequence:
    seq = Sequence("r", list(prompt), params)
    seq.token_ids += list(generated)
    seq.num_computed_tokens = len(seq.token_ids) - 1
    return seq


def test_who_drafts_and_how_much():
    greedy = SamplingParams(temperature=0.0, max_tokens=50)
    assert can_draft(_decoding(greedy))
    assert can_draft(_decoding(SamplingParams(temperature=0.7, top_p=0.9)))  # sampled rows too
    parent = _decoding(SamplingParams(temperature=0.7, n=2))
    assert not can_draft(parent)  # not forked yet (its samples, once they are, draft alone)
    parent.forked = True
    assert can_draft(parent)
    for p in (SamplingParams(temperature=0.0, presence_penalty=0.5),
              SamplingParams(temperature=0.0, frequency_penalty=0.5),
              SamplingParams(temperature=0.0, min_tokens=3)):  # their draft rows see the drafts
        assert can_draft(_decoding(p)), p
    seq = _decoding(SamplingParams(temperature=0.0, min_tokens=3, frequency_penalty=0.5))
    seq.draft = [1, 2]
    rows = drafted_rows([seq, seq, seq])
    assert rows[0] is seq and [(r.num_generated, r.generated_ids) for r in rows[1:]] == [(2, [3, 1]), (3, [3, 1, 2])]
    assert rows[2].params is seq.params and rows[2].generator is seq.generator
    prefill = _decoding(greedy)
    prefill.num_computed_tokens = 2  # a prompt chunk is still to run
    assert not can_draft(prefill)
    # max_tokens: the run appended (drafts + 1) stays within it; 2 generated of 4 -> 1 draft
    seq = _decoding(SamplingParams(temperature=0.0, max_tokens=4), generated=(3, 1))
    propose([seq], 4, 100)
    assert seq.draft == [2]
    seq = _decoding(greedy)
    propose([seq], 4, len(seq.token_ids) + 2)  # max_model_len leaves room for 2 tokens: 1 draft
    assert seq.draft == [1]
    # a step's rows: running sequences plus drafts stay within ROWS
    many = [_decoding(greedy, prompt=(1, 2, 3, 1, 2, 3, 1, 2)) for _ in range(ROWS - 2)]
    propose(many, 4, 100)
    assert sum(len(s.draft) for s in many) == 2 and many[0].draft == [1, 2]
    propose([_decoding(greedy)] * ROWS, 4, 100)
    assert accepted([4, 5, 6], [4, 5, 9, 1]) == 2 and accepted([4], [3, 4]) == 0
    # a sequence's draft size: 1 fewer after a miss (not below 1), 2 more after a full run (up to k)
    seq = _decoding(greedy, prompt=(1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2))
    propose([seq], 8, 100)
    assert seq.draft == [4, 5, 6, 7, 8, 9, 1, 2]
    look = seq.lookup
    for drafted, confirmed, size in ((8, 2, 7), (7, 0, 6), (6, 6, 8), (8, 8, 8)):
        look.checked(drafted, confirmed, 8)
        assert look.size == size
    look.size = 1
    look.checked(1, 0, 8)
    assert look.size == 1
    propose([seq], 8, 100)
    assert seq.draft == [4]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_draft_row_samples_as_the_sequence_would_with_the_drafts_appended(temperature):
    """The sampler on a step's rows (`drafted_rows`) gives row j what a plain step gives the
    sequence once d_1..d_j are appended: penalties count the drafts, min_tokens' mask lifts after
    them, and sampled rows take the generator's numbers in order."""
    import torch

    from shoal.engine.sampler import Sampler, make_generator

    V, eos = 40, 0
    params = SamplingParams(temperature=temperature, seed=1, frequency_penalty=1.5, presence_penalty=0.7,
                            min_tokens=3, logprobs=2, max_tokens=50)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2)) * 0.5
    logits[:, eos] += 3.0  # eos is the argmax wherever min_tokens lets it be
    draft = [7, 7, 9]
    logits[1:, 7] += 3.4  # the drafted token is strong: how often it was generated decides
    seq = _decoding(params, prompt=(5, 6, 7, 9), generated=(7,))  # 1 generated: eos masked below 3
    seq.generator = make_generator(1, 0)
    seq.draft = list(draft)
    got = Sampler([eos]).sample(logits, drafted_rows([seq] * 4))
    g = make_generator(1, 0)
    for j in range(4):
        plain = _decoding(params, prompt=(5, 6, 7, 9), generated=(7, *draft[:j]))
        plain.generator = g  # (one generator through the plain steps)
        want = Sampler([eos]).sample(logits[j:j + 1], [plain])
        assert (got[0][j], got[1][j], got[2][j]) == (want[0][0], want[1][0], want[2][0]), j
    assert torch.equal(seq.generator.get_state(), g.get_state())  # the same numbers were drawn


def _run(llm, work):
    """Drive the engine: rid -> (final CompletionOutputs, each output's concatenated deltas)."""
    eng = llm.engine
    for rid, p, params in work:
        eng.add_request(rid, p, params)
    finals, deltas, steps = {}, {}, 0
    while eng.has_unfinished():
        steps += 1
        for out in eng.step():
            for c in out.outputs:
                deltas.setdefault((out.request_id, c.index), []).extend(c.token_ids_delta)
            if out.finished:
                finals[out.request_id] = out.outputs
    return finals, deltas, steps


def _same(a, b):
    for rid in a:
        for x, y in zip(a[rid], b[rid], strict=True):
            assert (x.token_ids, x.text, x.finish_reason, x.logprobs) == \
                (y.token_ids, y.text, y.finish_reason, y.logprobs), rid
            assert x.cumulative_logprob == y.cumulative_logprob, rid


def test_drafting_engine_gives_the_plain_engines_outputs_in_fewer_steps(tiny_llama):
    ps = prompts(8, seed=60, lo=10, hi=50)
    plain = make_llm(tiny_llama, speculative_tokens=0)
    # a stop string from the middle of a plain greedy answer (matched across tokens)
    text = plain.generate([ps[2]], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0].outputs[0].text
    work = [
        ("long", ps[0], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)),
        ("eos", ps[1], SamplingParams(temperature=0.0, max_tokens=60)),
        ("stop", ps[2], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[text[20:23]])),
        ("logprobs", ps[3], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)),
        ("bias", ps[4], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logit_bias={7: 3.0})),
        ("seeded", ps[5], SamplingParams(temperature=1.0, max_tokens=30, seed=3, ignore_eos=True)),
        ("penalty", ps[6], SamplingParams(temperature=0.0, max_tokens=30, presence_penalty=0.8)),
        ("min", ps[7], SamplingParams(temperature=0.0, max_tokens=30, min_tokens=10)),
        ("n2", ps[0], SamplingParams(temperature=0.9, n=2, seed=5, max_tokens=20)),
        ("freq", ps[4], SamplingParams(temperature=0.7, seed=9, max_tokens=40, frequency_penalty=0.4,
                                       presence_penalty=0.2, ignore_eos=True)),
        ("best", ps[3], SamplingParams(temperature=0.4, n=2, best_of=3, seed=6, max_tokens=30, ignore_eos=True)),
    ]
    want, _, plain_steps = _run(plain, work)
    fast = make_llm(tiny_llama)  # drafts by default on the CPU
    assert fast.engine.speculative_tokens == 8
    got, deltas, steps = _run(fast, work)
    _same(want, got)
    for (rid, i), d in deltas.items():  # a step may deliver several tokens; the deltas add up
        assert d == got[rid][i].token_ids
    assert got["stop"][0].finish_reason == "stop" and text[20:23] not in got["stop"][0].text
    assert fast.engine.accepted > 0 and fast.engine.drafted >= fast.engine.accepted
    assert steps < plain_steps
    assert fast.engine.block_manager.num_free_blocks == 512


def test_a_prediction_gives_the_same_tokens_in_fewer_steps(tiny_llama):
    """Predicted Outputs: the plain answer as the prediction is confirmed many tokens a step
    (counted in the output), a wrong one costs nothing but its rows; the tokens, text and
    logprobs are the plain engine's either way (greedy and seeded)."""
    ps = prompts(3, seed=63, lo=10, hi=40)
    plain = make_llm(tiny_llama, speculative_tokens=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=1)
    seeded = SamplingParams(temperature=0.8, seed=4, max_tokens=48, ignore_eos=True)
    want, _, plain_steps = _run(plain, [("g", ps[0], greedy), ("s", ps[1], seeded)])
    answer = want["g"][0].token_ids
    wrong = [(t * 7 + 3) % 200 + 3 for t in answer]

    def predicted(params, tokens):
        return SamplingParams(**{**{f: getattr(params, f) for f in params.__slots__}, "prediction": tokens})

    work = [("g", ps[0], predicted(greedy, answer)), ("s", ps[1], predicted(seeded, want["s"][0].token_ids))]
    got, _, steps = _run(make_llm(tiny_llama, speculative_tokens=8), work)
    _same(want, got)
    assert got["g"][0].accepted_prediction_tokens >= len(answer) // 2
    assert steps < plain_steps // 2
    got, _, _ = _run(make_llm(tiny_llama, speculative_tokens=8), [("g", ps[0], predicted(greedy, wrong))])
    _same({"g": want["g"]}, got)
    assert got["g"][0].accepted_prediction_tokens < len(answer) // 4
    off, _, _ = _run(plain, [("g", ps[0], predicted(greedy, answer))])  # (no drafts: nothing checked)
    _same({"g": want["g"]}, off)
    assert off["g"][0].accepted_prediction_tokens == 0
    with pytest.raises(ValueError, match="prediction"):
        SamplingParams(prediction=[1, -2])


def test_sampled_rows_draft_and_keep_their_seeded_tokens(tiny_llama):
    """A sampled row's draft is confirmed when its own draw picks it; a rejected row's number is
    taken back, so a seeded request gives the plain engine's tokens, and later ones too."""
    ps = prompts(5, seed=63, lo=10, hi=40)
    work = [(f"s{i}", p, SamplingParams(temperature=t, top_p=tp, top_k=tk, seed=10 + i, max_tokens=50,
                                        ignore_eos=True, logprobs=1 if i == 0 else None))
            for i, (p, t, tp, tk) in enumerate(zip(ps, (0.3, 0.6, 1.0, 0.3, 0.8), (1.0, 0.9, 1.0, 0.5, 1.0),
                                                     (0, 0, 20, 0, 5)))]
    want, _, _ = _run(make_llm(tiny_llama, speculative_tokens=0), work)
    fast = make_llm(tiny_llama)
    got, _, _ = _run(fast, work)
    _same(want, got)
    eng = fast.engine
    assert eng.accepted > 0 and eng.drafted > eng.accepted  # confirmed drafts, and rewound rows
    assert sum(len(o[0].token_ids) for o in got.values()) == 5 * 50


def test_drafts_under_preemption_prefix_caching_and_a_small_model_len(tiny_llama):
    ps = prompts(6, seed=61, lo=20, hi=60)
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    want = [ref(tiny_llama.model, p, 40) for p in ps]
    small = make_llm(tiny_llama, num_kv_blocks=20, max_num_batched_tokens=64)  # preempts
    assert [o.outputs[0].token_ids for o in small.generate(ps, greedy)] == want
    assert small.engine.accepted > 0 and small.engine.block_manager.num_free_blocks == 20
    # a second turn over the first's answer hits the blocks a plain run registers (batch-invariant
    # mode: the prompt's; without it the answer's too)
    for invariant in (True, False):
        turns = []
        for k in (4, 0):
            llm = make_llm(tiny_llama, speculative_tokens=k, batch_invariant=invariant)
            first = llm.generate([ps[0]], greedy)[0].outputs[0].token_ids
            again = llm.generate([ps[0] + first + [5, 6]], SamplingParams(temperature=0.0, max_tokens=8))[0]
            turns.append((first, again.num_cached_tokens, again.outputs[0].token_ids))
        assert turns[0] == turns[1]
        assert turns[0][1] >= (48 if invariant else (len(ps[0]) + len(turns[0][0])) // 8 * 8)
    # max_model_len bounds the drafts: the answers end where the plain engine's do
    tight = make_llm(tiny_llama, max_model_len=70)
    plain = make_llm(tiny_llama, max_model_len=70, speculative_tokens=0)
    p = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None)  # up to max_model_len
    a, b = tight.generate(ps, p), plain.generate(ps, p)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    ends = [len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in a]
    assert ends == [70] * len(ps) and {o.outputs[0].finish_reason for o in a} == {"length"}


def test_adapter_rows_draft_with_their_adapters(setup):
    """Draft rows of requests on LoRA adapters run with their adapter's slot: the tokens are
    those of the plain engine (and of each adapter merged into the base)."""
    root, paths, merged = setup
    names = [None, "ad0", "ad1", "ad2", "ad3", "ad4"]
    ps = prompts(len(names), seed=64, lo=10, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    fast = lora_engine(root, paths)
    got = [o.outputs[0].token_ids for o in fast.generate(ps, params, adapter=names)]
    plain = lora_engine(root, paths, speculative_tokens=0).generate(ps, params, adapter=names)
    assert got == [o.outputs[0].token_ids for o in plain]
    assert got[1] == generate(merged["ad0"], ps[1], 40)
    assert fast.engine.accepted > 0


def test_abort_mid_draft_frees_every_block(tiny_llama):
    llm = make_llm(tiny_llama)
    eng = llm.engine
    eng.add_request("a", prompts(1, seed=62)[0], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    while eng.drafted == 0:
        eng.step()
    assert eng.abort("a") and not eng.has_unfinished()
    assert eng.block_manager.num_free_blocks == 512


def test_speculative_tokens_is_checked():
    with pytest.raises(ValueError, match="speculative_tokens"):
        EngineConfig(model="tiny", speculative_tokens=-1)
