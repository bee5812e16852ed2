"""Scheduler: FCFS admission, token budget with chunked prefill, max_num_seqs, preemption and
recompute, abort, fork, max_loras. A tiny fake engine drives it; no model, no torch."""

from __future__ import annotations

import itertools
import random

from shoal.config import EngineConfig
from shoal.engine.block_manager import BlockManager
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerOutput
from shoal.engine.sequence import Sequence, SequenceStatus

FAKE_TOKEN = 7
_requests = itertools.count()


def make_scheduler(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **cfg)
    return Scheduler(config, BlockManager(num_blocks, block_size))


def make_seq(prompt_len, max_tokens=4, request_id=None, adapter=None, t=None, start=0):
    return Sequence(request_id or f"r{next(_requests)}", list(range(start, start + prompt_len)),
                    SamplingParams(max_tokens=max_tokens), adapter=adapter, arrival_time=t)


def step(sched: Scheduler) -> SchedulerOutput:
    """The engine's side: run the plan, advance counters, commit, sample, finish."""
    out = sched.schedule()
    for seq, n in out.scheduled:
        assert seq.num_computed_tokens + n <= len(seq.block_table) * sched.block_manager.block_size
        seq.num_computed_tokens += n
        sched.block_manager.commit(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(FAKE_TOKEN)
            if seq.num_generated >= seq.params.max_tokens:
                sched.finish(seq)
    return out


def run_to_end(sched: Scheduler, max_steps=1000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished:
        outs.append(step(sched))
        assert len(outs) < max_steps, "no progress"
    return outs


def test_fcfs_admission_and_no_skipping_the_head():
    sched = make_scheduler(num_blocks=4, block_size=4)
    big, small = make_seq(20, t=0.0), make_seq(3, t=1.0)  # big needs 5 blocks > 4 free
    sched.add(big)
    sched.add(small)
    out = step(sched)
    assert out.scheduled == [] and sched.num_waiting == 2  # small does not jump the queue
    sched2 = make_scheduler()
    seqs = [make_seq(5, t=float(i)) for i in range(3)]
    for s in seqs:
        sched2.add(s)
    out = sched2.schedule()
    assert [s for s, _ in out.scheduled] == seqs
    assert all(s.status == SequenceStatus.RUNNING for s in seqs)


def test_chunked_prefill_under_token_budget_mixes_with_decodes():
    sched = make_scheduler(max_num_batched_tokens=32)
    b = make_seq(4, max_tokens=20, t=0.0)
    sched.add(b)
    step(sched)  # b's prefill; b now decodes
    a = make_seq(100, max_tokens=2, t=1.0, start=1000)
    sched.add(a)
    chunks = []
    while a.num_generated == 0:
        out = step(sched)
        assert out.num_tokens <= 32
        assert out.scheduled[0] == (b, 1)  # the older decode goes first, every step
        chunks += [n for s, n in out.scheduled if s is a]
    assert chunks == [31, 31, 31, 7]  # 4 steps
    assert a.num_computed_tokens == 100
    out = step(sched)
    assert (a, 1) in out.scheduled and (b, 1) in out.scheduled


def test_chunk_starts_where_the_last_one_ended():
    sched = make_scheduler(max_num_batched_tokens=32)
    a = make_seq(100, max_tokens=1)
    sched.add(a)
    starts = []
    while a.num_generated == 0:
        out = sched.schedule()
        (seq, n), = out.scheduled
        starts.append(seq.num_computed_tokens)
        seq.num_computed_tokens += n
        sched.block_manager.commit(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(FAKE_TOKEN)
    assert starts == [0, 32, 64, 96]


def test_running_served_oldest_first_by_arrival():
    sched = make_scheduler(max_num_batched_tokens=4)
    young = make_seq(3, max_tokens=10, t=5.0)
    sched.add(young)
    step(sched)
    old = make_seq(3, max_tokens=10, t=1.0, start=100)  # e.g. back from a skip or preemption
    sched.add(old)
    step(sched)
    assert [s for s, _ in sched.schedule().scheduled] == [old, young]


def test_max_num_seqs_cap():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(3, max_tokens=3, t=float(i)) for i in range(5)]
    for s in seqs:
        sched.add(s)
    for out in run_to_end(sched):
        assert len(out.scheduled) <= 2
        assert sched.num_running <= 2
    assert all(s.is_finished and s.num_generated == 3 for s in seqs)


def test_preemption_newest_goes_to_front_freed_and_recomputed():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=2)
    a = make_seq(4, max_tokens=8, t=0.0, request_id="a")
    b = make_seq(4, max_tokens=8, t=1.0, request_id="b", start=100)
    c = make_seq(4, max_tokens=2, t=2.0, request_id="c", start=200)
    for s in (a, b, c):
        sched.add(s)
    preempted_at = None
    for i in range(10):
        out = step(sched)
        if out.preempted:
            preempted_at = i
            break
    assert preempted_at is not None
    assert out.preempted == [b]  # the newest running sequence
    assert [s for s, _ in out.scheduled] == [a]
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.status == SequenceStatus.WAITING
    assert list(sched.waiting) == [b, c]  # at the front, ahead of c
    assert sched.block_manager.num_used_blocks == len(a.block_table)
    run_to_end(sched)
    assert a.is_finished and b.is_finished and c.is_finished
    assert b.num_generated == 8 and a.num_generated == 8
    assert sched.block_manager.num_free_blocks == 4


def test_preempted_sequence_recomputes_prompt_and_generated_tokens():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a = make_seq(4, max_tokens=8, t=0.0)
    b = make_seq(4, max_tokens=8, t=1.0, start=100)
    sched.add(a)
    sched.add(b)
    while not b.num_preemptions:
        step(sched)
    tokens_at_preemption = b.num_tokens
    while b.status != SequenceStatus.RUNNING:
        out = step(sched)
    (n,) = [n for s, n in out.scheduled if s is b]
    # all its tokens again, less what the prefix cache still held
    assert n == tokens_at_preemption - b.num_cached_tokens
    assert b.num_cached_tokens % 4 == 0 and n >= 1


def test_newest_sequence_preempts_itself():
    sched = make_scheduler(num_blocks=3, block_size=4)
    a = make_seq(6, t=0.0)  # 2 blocks; its next token stays in block 1
    b = make_seq(4, t=1.0, start=100)  # 1 block; its next token needs a new one
    sched.add(a)
    sched.add(b)
    step(sched)
    out = step(sched)
    assert out.preempted == [b]
    assert out.scheduled == [(a, 1)]
    assert list(sched.waiting) == [b]


def test_abort_frees_every_block():
    sched = make_scheduler(num_blocks=16, block_size=4)
    parent = make_seq(6, max_tokens=10, request_id="x", t=0.0)
    other = make_seq(5, max_tokens=10, request_id="y", t=1.0, start=100)
    late = make_seq(5, max_tokens=10, request_id="x", t=2.0, start=200)
    sched.add(parent)
    sched.add(other)
    step(sched)
    children = [parent.fork(i) for i in (1, 2)]
    sched.fork(parent, children)
    step(sched)
    sched.add(late)
    aborted = sched.abort("x")
    assert {s.seq_id for s in aborted} == {parent.seq_id, late.seq_id,
                                           *(c.seq_id for c in children)}
    assert all(s.is_finished and s.block_table == [] for s in aborted)
    assert sched.running == [other] and sched.num_waiting == 0
    assert sched.abort("x") == []
    sched.abort("y")
    assert not sched.has_unfinished
    assert sched.block_manager.num_free_blocks == 16
    assert all(sched.block_manager.ref_count(i) == 0 for i in range(16))


def test_fork_runs_children_after_parent_with_copy_on_write():
    sched = make_scheduler(num_blocks=16, block_size=4)
    parent = make_seq(6, max_tokens=3, t=0.0)
    later = make_seq(3, max_tokens=3, t=1.0, start=100)
    sched.add(parent)
    sched.add(later)
    step(sched)
    children = [parent.fork(i) for i in (1, 2)]
    sched.fork(parent, children)
    assert sched.running == [parent, *children, later]
    assert sched.block_manager.ref_count(parent.block_table[0]) == 3
    out = step(sched)
    assert [s for s, _ in out.scheduled] == [parent, *children, later]
    assert len(out.copies) == len(children)  # one private copy of the shared partial block each
    run_to_end(sched)
    assert sched.block_manager.num_free_blocks == 16


def test_max_loras_distinct_adapters_per_batch():
    sched = make_scheduler(enable_lora=True, max_loras=2)
    seqs = [make_seq(3, max_tokens=2, adapter=a, t=float(i), start=10 * i)
            for i, a in enumerate(["a", "b", "c", "a", None])]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.adapter for s, _ in out.scheduled] == ["a", "b", "a", None]  # c is skipped
    assert list(sched.waiting) == [seqs[2]]
    for o in [out] + run_to_end(sched):
        assert len({s.adapter for s, _ in o.scheduled} - {None}) <= 2
    assert seqs[2].is_finished


def test_lora_limit_ignored_when_lora_disabled():
    sched = make_scheduler(enable_lora=False, max_loras=1)
    for i, a in enumerate(["a", "b", "c"]):
        sched.add(make_seq(3, adapter=a, t=float(i)))
    assert len(sched.schedule().scheduled) == 3


def test_can_fit():
    sched = make_scheduler(num_blocks=4, block_size=4)
    assert sched.can_fit(16) and not sched.can_fit(17)


def test_invariants_under_random_load():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=24, block_size=4, max_num_seqs=5,
                           max_num_batched_tokens=20, enable_lora=True, max_loras=2)
    seqs = []
    shared_prefix = list(range(500, 508))
    for i in range(30):
        prompt = shared_prefix + [rng.randrange(100) for _ in range(rng.randrange(1, 20))]
        seq = Sequence(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 12)),
                       adapter=rng.choice([None, "a", "b", "c"]), arrival_time=float(i))
        assert sched.can_fit(seq.num_tokens + seq.params.max_tokens)
        seqs.append(seq)
        sched.add(seq)
    bm = sched.block_manager
    preemptions = 0
    for out in iter(lambda: step(sched) if sched.has_unfinished else None, None):
        preemptions += len(out.preempted)
        assert 0 < out.num_tokens <= 20 and len(out.scheduled) <= 5
        assert all(n >= 1 for _, n in out.scheduled)
        assert len({id(s) for s, _ in out.scheduled}) == len(out.scheduled)
        assert len({s.adapter for s, _ in out.scheduled} - {None}) <= 2
        refs = sum(len(s.block_table) for s in sched.running)
        assert refs == sum(bm.ref_count(i) for i in range(bm.num_blocks))
        assert all(s.block_table == [] for s in sched.waiting)
    assert all(s.is_finished and s.num_generated == s.params.max_tokens for s in seqs)
    assert bm.num_free_blocks == 24
    assert any(s.num_cached_tokens for s in seqs)  # the shared prefix was served from cache
    assert preemptions > 0  # the load was heavy enough to exercise preemption
