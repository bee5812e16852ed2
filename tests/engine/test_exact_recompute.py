"""A batch-invariant CPU engine recomputes and reuses KV only by the path that wrote it: prefill
and decode round differently, so a block a decode step wrote is never served to a prompt's
prefill (a chat's second turn gives the tokens and logprobs it gives alone), and a preempted
sequence's generated tokens run as decode rows again (it gives the tokens and logprobs it gives
with room to spare, in each model family, fp32 and bf16). Prompt logprobs are not recorded twice
after a preemption."""

from __future__ import annotations

import random

import pytest
import torch

from shoal.config import EngineConfig
from shoal.engine.block_manager import BlockManager
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.sampling_params import SamplingParams
from shoal.model.loader import load_dir
from tests.engine.test_block_manager import compute_all, make_seq
from tests.engine.test_llm_engine import make_llm, prompts
from tests.helpers import hf_tiny_config, save_tiny_hf_dir

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)


@pytest.mark.parametrize("path_keys", [False, True])
def test_blocks_a_decode_wrote_serve_only_the_same_path(path_keys):
    bm = BlockManager(num_blocks=16, block_size=4, path_keys=path_keys)
    a = make_seq(range(100, 110))  # prompt: 10 tokens (blocks 0, 1 full; block 2 from 8)
    bm.allocate(a)
    compute_all(bm, a)
    for t in range(200, 210):  # 10 decoded tokens (positions 10..19), each computed in turn
        a.append_token(t)
        bm.append_slot(a)
        compute_all(bm, a)
    # a second turn whose prompt is all of a's 20 tokens and more: its prefill would compute them
    b = make_seq(a.token_ids + [7, 8, 9], request_id="b")
    bm.allocate(b)
    assert b.num_cached_tokens == (8 if path_keys else 20)  # with path keys: the prompt's blocks only
    # a's own tokens again (a preempted sequence coming back): every full block hits
    bm.free(a)
    a.reset_for_recompute()
    bm.allocate(a)
    assert a.num_cached_tokens == 16  # (its last token is always left to compute)


class Recorder:
    """Wraps an engine's scheduler: each planned chunk as (computed before, prompt tokens, tokens
    scheduled, preempted before), and how many sequences were preempted."""

    def __init__(self, engine) -> None:
        self.chunks: list[tuple[int, int, int, int]] = []
        self.preempted = 0
        plan = engine.scheduler.schedule

        def recording():
            out = plan()
            self.preempted += len(out.preempted)
            self.chunks += [(s.num_computed_tokens, s.num_prompt_tokens, n, s.num_preemptions)
                            for s, n in out.scheduled]
            return out
        engine.scheduler.schedule = recording


def run(engine, reqs) -> dict:
    """request id -> [(token ids, token logprobs) per sample] of the finished requests."""
    outs = {}
    for rid, p, params in reqs:
        engine.add_request(rid, p, params)
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = [(c.token_ids, [lp for _, lp, _ in c.logprobs]) for c in o.outputs]
    return outs


def test_preempted_sequences_recompute_their_prompt_as_prefill_and_the_rest_as_decode_rows(tiny_llama):
    llm = make_llm(tiny_llama, num_kv_blocks=14, max_num_batched_tokens=64)
    eng = llm.engine
    assert eng.block_manager.path_keys and eng.runner.decode_chunks  # batch-invariant on CPU: the default
    rec = Recorder(eng)
    run(eng, [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts(8, seed=2, lo=30, hi=40))])
    again = [c for c in rec.chunks if c[3]]  # chunks of sequences preempted before
    # back from a preemption: the generated tokens in one chunk (decode rows), the prompt's
    # chunks stopping at its end
    assert rec.preempted and any(done >= prompt and n > 1 for done, prompt, n, _ in again)
    assert all(done + n <= prompt for done, prompt, n, _ in again if done < prompt)


@pytest.mark.real_model
def test_second_turns_and_preemption_give_what_they_give_alone(default_home, monkeypatch):
    monkeypatch.setenv("SHOAL_HOME", str(default_home))
    engine = LLMEngine(EngineConfig())  # the default model (bf16 where the CPU has the kernels)
    fresh = LLMEngine(EngineConfig())  # a second engine: nothing cached
    rng = random.Random(0)
    turns = []
    for t in range(4):  # second turns after their first turn on one engine, alone on another
        p = [rng.randrange(100, 40000) for _ in range(rng.randint(20, 70))]
        first = run(engine, [(f"a{t}", p, GREEDY)])[f"a{t}"][0][0]
        b = (f"b{t}", p + first + [rng.randrange(100, 40000) for _ in range(5)], GREEDY)
        turns.append(b)
        assert run(engine, [b]) == run(fresh, [b])
    # a cache so small that sequences are preempted and recomputed, against each alone
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True, logprobs=0)
    reqs = turns + [(f"c{i}", [rng.randrange(100, 40000) for _ in range(rng.randint(20, 120))],
                     seeded if i % 3 == 0 else GREEDY) for i in range(8)]
    small = LLMEngine(EngineConfig(num_kv_blocks=24, max_num_batched_tokens=128))
    rec = Recorder(small)
    got = run(small, reqs)
    assert rec.preempted > 0
    assert got == {rid: run(fresh, [(rid, p, params)])[rid] for rid, p, params in reqs}


def test_prompt_logprobs_are_recorded_once_through_a_preemption(tiny_llama):
    ps = prompts(8, seed=4, lo=30, hi=60)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=1)
    want = make_llm(tiny_llama).generate(ps, params)
    llm = make_llm(tiny_llama, num_kv_blocks=14, max_num_batched_tokens=64)
    got = llm.generate(ps, params)
    for p, g, w in zip(ps, got, want):
        assert len(g.prompt_logprobs) == len(p)
        assert g.prompt_logprobs == w.prompt_logprobs and g.outputs[0].token_ids == w.outputs[0].token_ids


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_preempted_requests_equal_themselves_with_room(family, request):
    """Greedy and seeded (n=2) requests through preemptions give the tokens and logprobs they give
    in a cache with room to spare, bit for bit (fp32: GPT-2's output layer, tied to its embedding,
    runs on a packed copy; a plain fp32 GEMM gave rows other bits at other row counts)."""
    loaded = request.getfixturevalue(family)
    seeded = SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=16, ignore_eos=True, logprobs=0)
    reqs = [(f"r{i}", p, seeded if i % 2 else GREEDY) for i, p in enumerate(prompts(10, seed=6, lo=20, hi=50))]
    small = make_llm(loaded, num_kv_blocks=16, max_num_batched_tokens=64).engine
    rec = Recorder(small)
    got = run(small, reqs)
    assert rec.preempted > 0 and any(done >= prompt and n > 1 for done, prompt, n, _ in rec.chunks)
    assert got == run(make_llm(loaded).engine, reqs)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral"])  # (mistral: a sliding window of 8)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # (bf16: the kernels' prefill and decode)
def test_preemption_is_exact_across_families(family, dtype, tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(0)
    cfg = hf_tiny_config(family) if family == "mistral" else hf_tiny_config(family, max_position_embeddings=512)
    save_tiny_hf_dir(cfg, tmp_path, tiny_tokenizer_dir)
    seeded = SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=16, ignore_eos=True, logprobs=0)
    reqs = [(f"r{i}", p, seeded if i % 2 else GREEDY) for i, p in enumerate(prompts(10, seed=6, lo=20, hi=50))]
    small = make_llm(load_dir(str(tmp_path), dtype=dtype), num_kv_blocks=16, max_num_batched_tokens=64).engine
    rec = Recorder(small)
    got = run(small, reqs)
    assert rec.preempted > 0
    roomy = make_llm(load_dir(str(tmp_path), dtype=dtype)).engine
    assert got == {rid: run(roomy, [(rid, p, params)])[rid] for rid, p, params in reqs}  # each alone


def test_prompt_logprobs_are_whole_after_a_prefix_cache_hit(tiny_llama):
    """A request asking for prompt logprobs (echo with logprobs: scoring a prompt) after another
    with the same prefix gets every position's, not only the uncached ones."""
    llm = make_llm(tiny_llama)
    p = prompts(1, seed=3, lo=40, hi=40)[0]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    llm.generate([p], SamplingParams(temperature=0, max_tokens=2))  # caches the prompt's blocks
    after = llm.generate([p], params)[0]
    alone = make_llm(tiny_llama).generate([p], params)[0]
    assert len(after.prompt_logprobs) == len(p) and after.prompt_logprobs == alone.prompt_logprobs
    assert llm.generate([p], SamplingParams(temperature=0, max_tokens=2))[0].num_cached_tokens == 32  # still cached

