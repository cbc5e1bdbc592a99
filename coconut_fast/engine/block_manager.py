"""The bookkeeping of the paged KV cache: which cache blocks are free, who holds them, what they hold.
(The K/V tensors themselves are in `kv_cache.py`.)

Blocks are reference counted so requests with an identical prompt prefix share them: a full
block of prompt tokens is keyed by a hash chained over every token before it, and a request
whose prompt starts the same way reuses the block instead of computing it again. A freed block
keeps its key until it is handed out for something else, so a later identical prompt (or the
recomputation of a preempted request) can still find it.

A key only says what a block holds once the step that writes the block has run: blocks admitted in
the step being scheduled are shareable within that step (its forward writes them before any row
reads them) and are published by `commit_pending` after it; a step that fails drops their keys
(`discard_pending`), so no later request can hit a block that was never computed.
"""
from __future__ import annotations

import hashlib
import math
from collections import deque

from .sequence import Sequence


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """Key of a full block: the hash of its tokens chained to the key of the block before it."""
    return hashlib.sha256(parent + b"".join(t.to_bytes(8, "little", signed=True) for t in tokens)).digest()


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.key: bytes | None = None
        self.tokens: tuple[int, ...] | None = None


class BlockAllocator:
    """Free list + reference counts + prefix sharing over `num_blocks` blocks of `block_size` slots."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # taken from the left, returned on the right
        self.key_to_block: dict[bytes, int] = {}  # blocks whose K/V a finished step wrote
        self.pending: dict[bytes, int] = {}  # blocks the step being scheduled will write

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ------------------------------------------------------------ prefix sharing
    def shared_prefix(self, seq: Sequence) -> list[tuple[int, bytes, tuple[int, ...]]]:
        """(key, block tokens) of each full block of the shareable prompt prefix, in order."""
        if not self.enable_prefix_caching:
            return []
        out, parent = [], b""
        for i in range(max(seq.shareable_len, 0) // self.block_size):
            tokens = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = block_key(parent, tokens)
            out.append((parent, tuple(tokens)))
        return out

    def cached_blocks(self, seq: Sequence) -> list[int]:
        """Leading blocks of `seq`'s prompt already in the cache (the longest matching chain)."""
        hits = []
        for key, tokens in self.shared_prefix(seq):
            block_id = self.key_to_block.get(key, self.pending.get(key))
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            hits.append(block_id)
        return hits

    # ------------------------------------------------------------ allocation
    def blocks_needed(self, seq: Sequence, end: int) -> int:
        """Free blocks that admitting `seq` with its positions [0, end) would take."""
        hits = self.cached_blocks(seq)
        in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return self.blocks_for(end) - in_use

    def can_allocate(self, seq: Sequence, end: int) -> bool:
        return self.blocks_needed(seq, end) <= self.num_free_blocks

    def allocate(self, seq: Sequence, end: int) -> None:
        """Give a waiting `seq` blocks for positions [0, end), reusing shared prefix blocks."""
        assert not seq.block_table, f"request {seq.seq_id} already holds blocks"
        if not self.can_allocate(seq, end):
            raise RuntimeError(f"request {seq.seq_id}: not enough free blocks (check can_allocate first)")
        hits = self.cached_blocks(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_ids.remove(block_id)  # revive a freed block whose contents are still valid
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_cached_tokens = seq.num_computed = len(hits) * self.block_size
        # the remaining shareable blocks are computed in this step: published once it has run
        for key, tokens in self.shared_prefix(seq)[len(hits) :]:
            block = self.blocks[self.take_free_block()]
            block.key, block.tokens = key, tokens
            self.pending[key] = block.block_id
            seq.block_table.append(block.block_id)
        self.append(seq, end)

    def commit_pending(self) -> None:
        """The step has written its blocks: their keys serve later requests."""
        self.key_to_block.update(self.pending)
        self.pending.clear()

    def discard_pending(self) -> None:
        """The step failed: the blocks it was to write hold nothing a key may promise."""
        for block_id in self.pending.values():
            self.blocks[block_id].key = self.blocks[block_id].tokens = None
        self.pending.clear()

    def reset_prefix_cache(self) -> None:
        """Forget every key (the K/V were computed under other weights, say); blocks in use stay in use."""
        self.discard_pending()
        for block in self.blocks:
            block.key = block.tokens = None
        self.key_to_block.clear()

    def can_append(self, seq: Sequence, end: int) -> bool:
        return self.blocks_for(end) - len(seq.block_table) <= self.num_free_blocks

    def append(self, seq: Sequence, end: int) -> None:
        """Grow `seq`'s block table to cover positions [0, end)."""
        while len(seq.block_table) < self.blocks_for(end):
            seq.block_table.append(self.take_free_block())

    def take_free_block(self) -> int:
        if not self.free_ids:
            raise RuntimeError("the KV cache has no free block")
        block = self.blocks[self.free_ids.popleft()]
        if block.key is not None and self.key_to_block.get(block.key) == block.block_id:
            del self.key_to_block[block.key]  # its contents are about to be overwritten
        block.key = block.tokens = None
        block.ref_count = 1
        return block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody references go back to the free list."""
        for block_id in reversed(seq.block_table):  # the tail goes first, so shared heads live longer
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_ids.append(block_id)
        seq.reset_cache_state()
