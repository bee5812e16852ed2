"""BlockManager: the KV cache as fixed-size blocks, ref-counted, with a prefix cache.

A sequence's `block_table` lists its blocks; token `pos` lives in slot
`block_table[pos // block_size] * block_size + pos % block_size`. Full, computed blocks are
hashed by (adapter, parent hash, tokens) so identical prefixes under the same adapter share KV.
Pure Python bookkeeping: the model runner owns the tensors and performs the recorded copies.

With `path_keys` (a batch-invariant engine on CPU) a block's key also says how many of its
positions a prompt chunk computed when a decode step computed the rest: the two paths round
differently (decode and prefill attention are different kernels), so a block a decode wrote holds
other bits than a prompt's prefill of the same tokens would. A chat's second turn, whose prompt
holds the first turn's answer, then reuses only what its own prefill would have computed, and
gives the tokens it gives alone (measured: reusing the answer's blocks changed 2 of 6 second
turns' tokens and every one's logprobs).
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    """One KV block: how many sequences hold it and, once full and computed, its content key."""

    __slots__ = ("block_id", "ref_count", "hash", "key")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.key: tuple | None = None  # (adapter, parent hash, tokens, path): guards against collisions


class BlockManager:
    """Hands out KV blocks to sequences; reuses cached prefixes; copy-on-write after forks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 path_keys: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got "
                             f"{num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.path_keys = path_keys  # keys tell prefill-computed positions from decoded ones
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # content hash -> block id (free or in use)
        self._copies: list[tuple[int, int]] = []

    # ---- accounting -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, seq: Sequence, pos: int) -> int:
        """Flat KV-cache slot of token `pos` of `seq`."""
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    # ---- prefix cache -----------------------------------------------------------------------

    def _key(self, seq: Sequence, i: int, parent: int | None) -> tuple:
        """Block i of seq: (adapter, parent hash, tokens, path). path: None when a prompt chunk
        computes all its positions, else (with `path_keys`) how many it computes before decode
        steps compute the rest (a sequence's positions past its prompt are always decoded)."""
        bs = self.block_size
        path = None
        if self.path_keys and (i + 1) * bs > seq.num_prompt_tokens:
            path = max(0, seq.num_prompt_tokens - i * bs)
        return (seq.adapter, parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]), path)

    def _cache_hits(self, seq: Sequence) -> list[int]:
        """Block ids caching the leading full blocks of token_ids[:-1] (the last token is always
        left to compute, so its logits exist). None for a sequence that asks for prompt logprobs:
        they need the logits of every prompt position (a hit returned only the uncached ones)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        bs, hits, parent = self.block_size, [], None
        for i in range((seq.num_tokens - 1) // bs):
            key = self._key(seq, i, parent)
            parent = hash(key)
            block_id = self._cached.get(parent)
            if block_id is None or self.blocks[block_id].key != key:
                break
            hits.append(block_id)
        return hits

    def _take_free(self) -> Block:
        """Oldest-freed block, its old cache entry dropped, held once."""
        block = self.blocks[self._free.popitem(last=False)[0]]
        if block.hash is not None:
            if self._cached.get(block.hash) == block.block_id:
                del self._cached[block.hash]
            block.hash = block.key = None
        block.ref_count = 1
        return block

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]  # revive a freed block that still holds cached KV
        block.ref_count += 1

    # ---- admission --------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cache_hits(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        fresh = self.num_blocks_for(seq.num_tokens) - len(hits)
        return fresh + revived <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Semantics:
            hits = leading full blocks of token_ids[:-1] found in the cache
            for b in hits: ref[b] += 1
            block_table = hits + [fresh() for _ in range(ceil(num_tokens / bs) - len(hits))]
            num_computed_tokens = num_cached_tokens = len(hits) * bs
        """
        assert not seq.block_table, f"{seq} already has blocks"
        hits = self._cache_hits(seq)
        for block_id in hits:
            self._hold(block_id)
        fresh = self.num_blocks_for(seq.num_tokens) - len(hits)
        assert fresh <= len(self._free), "allocate without can_allocate"
        seq.block_table = hits + [self._take_free().block_id for _ in range(fresh)]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size

    # ---- decode -----------------------------------------------------------------------------

    def _to_write(self, seq: Sequence, extra: int = 0) -> range:
        """Indices of existing table entries that will receive KV for uncomputed tokens (and
        `extra` positions after them: a step's drafts, `engine.speculative`)."""
        end = min(len(seq.block_table), self.num_blocks_for(seq.num_tokens + extra))
        return range(seq.num_computed_tokens // self.block_size, end)

    def append_cost(self, seq: Sequence, extra: int = 0) -> int:
        """Free blocks `append_slot(seq)` would take: copies of shared blocks it writes, new ones."""
        shared = sum(1 for i in self._to_write(seq, extra)
                     if self.blocks[seq.block_table[i]].ref_count > 1)
        return shared + max(0, self.num_blocks_for(seq.num_tokens + extra) - len(seq.block_table))

    def can_append(self, seq: Sequence, extra: int = 0) -> bool:
        return self.append_cost(seq, extra) <= len(self._free)

    def try_append(self, seq: Sequence, extra: int = 0) -> bool:
        """`append_slot(seq)` if `can_append(seq)`; whether it did. A decode row whose new token
        falls in its last block, held by it alone, returns at once (the scheduler's common case:
        each running row, every step)."""
        table, n = seq.block_table, len(seq.token_ids) + extra
        last = len(table) - 1
        if (last >= 0 and seq.num_computed_tokens // self.block_size == last
                and n <= (last + 1) * self.block_size and self.blocks[table[last]].ref_count == 1):
            return True  # nothing to write outside the last block, nothing to copy
        if not self.can_append(seq, extra):
            return False
        self.append_slot(seq, extra)
        return True

    def append_slot(self, seq: Sequence, extra: int = 0) -> None:
        """Make the table cover all of seq's tokens, copying shared blocks it will write into.

        Semantics:
            for each block i that will receive new KV:
                if ref[table[i]] > 1: new = fresh(); copies += (table[i], new);
                                      ref[table[i]] -= 1; table[i] = new
            while len(table) * bs < num_tokens: table.append(fresh())
        """
        table = seq.block_table
        for i in self._to_write(seq, extra):
            old = self.blocks[table[i]]
            if old.ref_count > 1:
                new = self._take_free()
                old.ref_count -= 1
                self._copies.append((old.block_id, new.block_id))
                table[i] = new.block_id
        while len(table) * self.block_size < seq.num_tokens + extra:
            table.append(self._take_free().block_id)

    def take_copies(self) -> list[tuple[int, int]]:
        """Pending (src_block, dst_block) copies for the model runner, cleared."""
        copies, self._copies = self._copies, []
        return copies

    def commit(self, seq: Sequence) -> None:
        """Register the blocks of seq that are now full and computed in the prefix cache.

        Idempotent: blocks already hashed are skipped.
        """
        if not self.enable_prefix_caching:
            return
        bs, table = self.block_size, seq.block_table
        num_full = min(seq.num_computed_tokens, len(seq.token_ids), len(table) * bs) // bs
        if num_full == 0 or self.blocks[table[num_full - 1]].hash is not None:
            return  # no block filled since the last call (a decode row's common case)
        start = num_full
        while start > 0 and self.blocks[table[start - 1]].hash is None:
            start -= 1
        parent = self.blocks[table[start - 1]].hash if start > 0 else None
        for i in range(start, num_full):
            block = self.blocks[table[i]]
            block.key = self._key(seq, i, parent)
            block.hash = parent = hash(block.key)
            self._cached[parent] = block.block_id

    # ---- sharing and release ----------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (copy-on-write happens in append_slot)."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks, last first; unreferenced ones keep their cached content until
        handed out again (oldest-freed first)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
