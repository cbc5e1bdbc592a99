"""Block allocator and scheduler bookkeeping, without a model."""
import pytest
import torch

from coconut_fast.engine import BlockAllocator, Phase, SamplingParams, Scheduler, Sequence
from coconut_fast.engine.kv_cache import PagedKVCache

LATENT, BOT, EOT = 99, 98, 97


def seq(seq_id, question, k=2, max_new_tokens=4):
    prompt = list(question) + [BOT] + [LATENT] * k + [EOT]
    return Sequence(seq_id, prompt, LATENT, SamplingParams(max_new_tokens=max_new_tokens), (0,))


def test_allocate_and_free_return_every_block():
    blocks = BlockAllocator(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a, b = seq(0, range(1, 8)), seq(1, range(20, 23))
    blocks.allocate(a, 8)
    blocks.allocate(b, 4)
    assert len(a.block_table) == 2 and len(b.block_table) == 1 and blocks.num_free_blocks == 7
    assert not set(a.block_table) & set(b.block_table)
    blocks.append(a, 9)  # one position into a third block
    assert len(a.block_table) == 3 and blocks.num_free_blocks == 6
    blocks.append(a, 12)  # still the third block
    assert len(a.block_table) == 3
    blocks.free(a)
    blocks.free(b)
    assert blocks.num_free_blocks == 10 and a.block_table == [] and a.num_computed == 0
    assert all(bl.ref_count == 0 for bl in blocks.blocks)


def test_identical_prompts_share_full_blocks_before_the_last_token_ahead_of_the_thoughts():
    blocks = BlockAllocator(num_blocks=20, block_size=4)
    question = list(range(1, 10))  # 9 tokens, <bot> at 9, first latent at 10: positions 0..8 are shareable
    a, b = seq(0, question), seq(1, question)
    blocks.allocate(a, 10)
    assert blocks.blocks_needed(b, 10) == 3 - 2  # two full blocks of a are in use and shared
    blocks.allocate(b, 10)
    assert a.block_table[:2] == b.block_table[:2] and a.block_table[2] != b.block_table[2]
    assert [blocks.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert (a.num_computed, b.num_computed, b.num_cached_tokens) == (0, 8, 8)
    assert blocks.num_free_blocks == 20 - 4

    # 7 tokens + <bot> fill two blocks, but the hidden state at <bot> starts the thoughts: one block is shared
    c, d = seq(2, range(1, 8)), seq(3, range(1, 8))
    blocks.allocate(c, 8)
    blocks.allocate(d, 8)
    assert c.block_table[0] == d.block_table[0] and c.block_table[1] != d.block_table[1]
    e = seq(4, [1, 2, 3, 5, 5, 6, 7, 8, 9])  # differs in the first block: nothing shared
    blocks.allocate(e, 10)
    assert not set(e.block_table) & set(a.block_table)
    for s in (a, b, c, d, e):
        blocks.free(s)
    assert blocks.num_free_blocks == 20


def test_freed_blocks_are_revived_until_reused_for_other_tokens():
    blocks = BlockAllocator(num_blocks=4, block_size=4)
    question = list(range(1, 10))
    a = seq(0, question)
    blocks.allocate(a, 10)
    shared = a.block_table[:2]
    blocks.free(a)
    b = seq(1, question)
    assert blocks.blocks_needed(b, 10) == 3  # the freed blocks are free, but their contents are still valid
    blocks.allocate(b, 10)
    assert b.block_table[:2] == shared and b.num_cached_tokens == 8
    blocks.free(b)
    # a different prompt takes every block, overwriting the shared ones
    c = Sequence(2, list(range(30, 45)) + [BOT, LATENT, EOT], LATENT, SamplingParams(max_new_tokens=1), (0,))
    blocks.allocate(c, 16)
    blocks.free(c)
    d = seq(3, question)
    blocks.allocate(d, 10)
    assert d.num_cached_tokens == 0  # no stale match
    blocks.free(d)


def test_prefix_sharing_never_reaches_into_the_thoughts():
    blocks = BlockAllocator(num_blocks=8, block_size=2)
    s = seq(0, [1, 2, 3])  # prompt 1 2 3 <bot> L L <eot>: shareable positions 0..2
    assert [t for _, t in blocks.shared_prefix(s)] == [(1, 2)]
    s.add_thought(torch.zeros(2))
    assert s.shareable_len == 3


def test_cache_pools_have_the_flash_attn_layout():
    cache = PagedKVCache(num_layers=3, num_blocks=5, block_size=16, num_kv_heads=2, head_dim=8,
                         dtype=torch.bfloat16, device=torch.device("cpu"))
    assert len(cache.k) == len(cache.v) == 3
    assert cache.k[0].shape == (6, 16, 2, 8) and cache.v[2].dtype == torch.bfloat16  # 5 blocks + the scratch block
    assert cache.scratch_block == 5
    assert PagedKVCache.bytes_per_block(3, 16, 2, 8, torch.bfloat16) == 2 * 3 * 16 * 2 * 8 * 2
    assert PagedKVCache.blocks_from_memory(0.5, 1 << 20, torch.device("cpu")) > 0
    with pytest.raises(ValueError, match="memory_fraction"):
        PagedKVCache.blocks_from_memory(1.5, 1, torch.device("cpu"))


# ------------------------------------------------------------------ scheduler
def run_fake_step(sched, scheduled):
    """Advance requests as the engine would, with made-up thoughts and tokens."""
    for s, end in scheduled:
        s.num_computed = end
        if s.wants_token(end):
            s.add_token(5)
            if s.finish_reason:
                sched.finish(s)
        else:
            s.add_thought(torch.zeros(2))


def test_admission_is_bounded_by_free_blocks_and_max_num_seqs():
    sched = Scheduler(BlockAllocator(num_blocks=6, block_size=4, enable_prefix_caching=False),
                      max_num_seqs=2, max_num_batched_tokens=1000)
    for i in range(3):
        sched.add(seq(i, range(10 * i + 1, 10 * i + 9)))  # 8 tokens + <bot>: 3 blocks for the first chunk
    first = sched.schedule().chunks
    assert [s.seq_id for s, _ in first] == [0, 1] and len(sched.waiting) == 1
    assert [end for _, end in first] == [9, 9]
    sched2 = Scheduler(BlockAllocator(num_blocks=5, block_size=4, enable_prefix_caching=False),
                       max_num_seqs=8, max_num_batched_tokens=1000)
    for i in range(3):
        sched2.add(seq(i, range(10 * i + 1, 10 * i + 9)))
    assert [s.seq_id for s, _ in sched2.schedule().chunks] == [0]  # a second one needs 3 more blocks, 2 are free


def test_preemption_takes_the_newest_and_puts_it_first_in_line():
    blocks = BlockAllocator(num_blocks=5, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=1000)
    a, b = seq(0, [1, 2, 3], k=3, max_new_tokens=2), seq(1, [4, 5], k=3, max_new_tokens=2)
    sched.add(a)
    sched.add(b)
    run_fake_step(sched, sched.schedule().chunks)  # a: 4 positions (2 blocks), b: 3 positions (2 blocks)
    assert a.phase is Phase.LATENT and b.phase is Phase.LATENT
    run_fake_step(sched, sched.schedule().chunks)  # a: position 4 (in a third block, the last free one), b: position 3
    scheduled = sched.schedule().chunks  # b needs a third block, none is free, and b is the newest: b is preempted
    assert [s.seq_id for s, _ in scheduled] == [0]
    assert sched.stats.num_preemptions == 1 and sched.stats.preempted_phases[Phase.LATENT] == 1
    assert list(sched.waiting) == [b] and b.block_table == [] and b.num_computed == 0 and len(b.thoughts) == 2
    assert b.phase is Phase.PREFILL and b.next_chunk_end() == b.latent_positions[2]  # recompute with its thoughts
    assert sched.stats.steps[-1].num_preempted == 1
    while sched.has_unfinished():
        run_fake_step(sched, sched.schedule().chunks)
    assert blocks.num_free_blocks == 5 and a.output_token_ids == b.output_token_ids == [5] * 2


def test_a_request_larger_than_the_pool_is_refused_up_front():
    sched = Scheduler(BlockAllocator(num_blocks=3, block_size=4), max_num_seqs=4, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="needs up to 4 blocks"):
        sched.add(seq(0, range(1, 8), max_new_tokens=4))  # 11 + 4 tokens
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(BlockAllocator(1, 1), max_num_seqs=0, max_num_batched_tokens=1)
