"""BlockManager: accounting, prefix cache (per adapter, never the last token), revival of freed
blocks in LRU order, fork with copy-on-write. Pure Python: runs in milliseconds."""

from __future__ import annotations

import pytest

from shoal.engine.block_manager import BlockManager
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.sequence import Sequence


def make_seq(tokens, adapter=None, request_id="r") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(), adapter=adapter)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does after a step that computed every pending token."""
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_allocate_and_free_accounting():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(range(10))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3  # ceil(10 / 4)
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 7 and bm.num_used_blocks == 3
    assert bm.usage == pytest.approx(0.3)
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    assert seq.num_computed_tokens == seq.num_cached_tokens == 0
    b = seq.block_table
    assert [bm.slot(seq, p) for p in (0, 3, 4, 9)] == [b[0] * 4, b[0] * 4 + 3, b[1] * 4,
                                                      b[2] * 4 + 1]
    bm.free(seq)
    assert seq.block_table == []
    assert bm.num_free_blocks == 10 and bm.num_used_blocks == 0
    assert all(bm.ref_count(i) == 0 for i in range(10))


def test_can_allocate_refuses_when_too_few_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(make_seq(range(9)))  # needs 3
    assert bm.can_allocate(make_seq(range(8)))


def test_prefix_hit_shares_blocks_for_same_prompt():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(range(10))
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(range(10))
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert b.num_uncomputed == 2
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]  # the partial block is never shared
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    assert bm.num_used_blocks == 4


def test_commit_registers_only_computed_blocks_and_is_idempotent():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(range(12))
    bm.allocate(a)
    a.num_computed_tokens = 5  # one chunk: only block 0 is full and computed
    bm.commit(a)
    bm.commit(a)
    b = make_seq(range(12))
    bm.allocate(b)
    assert b.num_cached_tokens == 4
    a.num_computed_tokens = 12
    bm.commit(a)
    c = make_seq(range(12))
    bm.allocate(c)
    assert c.num_cached_tokens == 8  # the last block holds the last token: never a hit


def test_no_hit_across_adapters():
    bm = BlockManager(num_blocks=10, block_size=4)
    base = make_seq(range(10))
    bm.allocate(base)
    compute_all(bm, base)
    lora = make_seq(range(10), adapter="sql")
    bm.allocate(lora)
    assert lora.num_cached_tokens == 0
    assert not set(lora.block_table) & set(base.block_table)
    compute_all(bm, lora)
    lora2 = make_seq(range(10), adapter="sql")
    bm.allocate(lora2)
    assert lora2.num_cached_tokens == 8
    assert lora2.block_table[:2] == lora.block_table[:2]


def test_last_token_never_cached():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(range(8))  # exactly two full blocks
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(range(8))
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # block 1 holds token 7, the one whose logits we need
    assert b.num_uncomputed == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_different_prefix_same_block_tokens_no_hit():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])  # block 1 equal, parent differs
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_revival_of_freed_cached_blocks():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = make_seq(range(10))
    bm.allocate(a)
    compute_all(bm, a)
    kept = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 6
    b = make_seq(range(10))
    bm.allocate(b)
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == kept[:2]
    assert bm.ref_count(kept[0]) == bm.ref_count(kept[1]) == 1
    assert bm.num_free_blocks == 3  # two revived + one fresh


def test_can_allocate_counts_free_hits_as_consumed():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(range(10))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)  # free list now [3, 2, 1, 0]; blocks 0, 1 keep their cached content
    other = make_seq([100, 101, 102])
    bm.allocate(other)  # takes block 3
    assert bm.num_free_blocks == 3
    longer = make_seq(list(range(10)) + [50, 51, 52, 53])  # 2 hits (both free) + 2 fresh
    assert not bm.can_allocate(longer)
    same = make_seq(range(10))  # 2 hits (both free) + 1 fresh = 3
    assert bm.can_allocate(same)
    bm.allocate(same)
    assert same.num_cached_tokens == 8 and bm.num_free_blocks == 0


def test_free_list_is_lru_and_reuse_drops_cache_entry():
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = make_seq(range(5)), make_seq(range(100, 105))
    bm.allocate(a)
    bm.allocate(b)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    compute_all(bm, a)
    compute_all(bm, b)
    bm.free(a)  # free list: 4, then a's blocks last first: 1, 0
    bm.free(b)  # then 3, 2
    c = make_seq(range(200, 211))
    bm.allocate(c)
    assert c.block_table == [4, 1, 0]  # oldest freed first
    # b's cached block 2 was not handed out: b's prompt revives it.
    b2 = make_seq(range(100, 105))
    bm.allocate(b2)
    assert b2.num_cached_tokens == 4 and b2.block_table == [2, 3]
    # a's cached block 0 now holds c's tokens: a's prompt no longer hits.
    bm.free(c)
    a2 = make_seq(range(5))
    bm.allocate(a2)
    assert a2.num_cached_tokens == 0


def test_reused_block_is_hashed_for_its_new_content():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(range(9))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    c = make_seq(range(100, 109))
    bm.allocate(c)  # every block handed out again, two of them with a's cached content
    compute_all(bm, c)
    bm.free(c)
    a2, c2 = make_seq(range(9)), make_seq(range(100, 109))
    bm.allocate(c2)
    assert c2.num_cached_tokens == 8  # c's content was registered, a's forgotten
    bm.free(c2)
    bm.allocate(a2)
    assert a2.num_cached_tokens == 0


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make_seq(range(10))
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(range(10))
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert not set(a.block_table) & set(b.block_table)


def test_append_slot_adds_block_at_boundary():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq(range(8))
    bm.allocate(seq)
    compute_all(bm, seq)
    seq.append_token(99)  # token 8 starts block 2
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert len(seq.block_table) == 3 and bm.take_copies() == []
    compute_all(bm, seq)
    seq.append_token(98)  # token 9 fits in block 2: nothing to add
    bm.append_slot(seq)
    assert len(seq.block_table) == 3
    full = make_seq(range(4))
    assert not bm.can_allocate(full)
    for _ in range(2):
        compute_all(bm, seq)
        seq.append_token(97)
        bm.append_slot(seq)
    compute_all(bm, seq)
    seq.append_token(96)  # token 12 needs a fourth block: none left
    assert not bm.can_append(seq)


def test_fork_shares_blocks_and_copy_on_write_once_per_child():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent = make_seq(range(6))  # one full block + a partial one
    bm.allocate(parent)
    compute_all(bm, parent)
    parent.append_token(50)
    children = [parent.fork(i) for i in (1, 2)]
    for i, child in enumerate(children):
        child.token_ids[-1] = 60 + i
        bm.fork(parent, child)
    full, partial = parent.block_table
    assert bm.ref_count(full) == 3 and bm.ref_count(partial) == 3
    assert all(c.block_table == parent.block_table for c in children)
    assert children[0].block_table is not parent.block_table
    used = bm.num_used_blocks
    for seq in [parent, *children]:
        assert bm.can_append(seq)
        bm.append_slot(seq)
    copies = bm.take_copies()
    assert len(copies) == len(children)
    assert all(src == partial for src, _ in copies)
    assert bm.take_copies() == []
    last_blocks = {s.block_table[1] for s in [parent, *children]}
    assert len(last_blocks) == 3  # each sample writes its own last block
    assert {dst for _, dst in copies} | {partial} == last_blocks
    assert all(s.block_table[0] == full for s in [parent, *children])
    assert bm.ref_count(full) == 3  # full blocks stay shared
    assert all(bm.ref_count(b) == 1 for b in last_blocks)
    assert bm.num_used_blocks == used + len(children)
    for seq in [parent, *children]:
        bm.free(seq)
    assert bm.num_free_blocks == 10


def test_copy_on_write_refused_without_free_block():
    bm = BlockManager(num_blocks=2, block_size=4)
    parent = make_seq(range(6))
    bm.allocate(parent)
    compute_all(bm, parent)
    parent.append_token(1)
    child = parent.fork(1)
    bm.fork(parent, child)
    assert not bm.can_append(parent)  # would need a private copy of the shared partial block
