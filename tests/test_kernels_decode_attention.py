"""Paged decode attention (Triton, interpreted on CPU; its CUDA twin on a GPU with the extension) against its
float32 torch reference: plain, with the step's k/v appended in the same launch (and RoPE), strided q/k/v views,
and the split merge done inside the launch with a reusable counter buffer."""
import math

import pytest
import torch
import torch.nn.functional as F

from coconut_fast.kernels import (cuda_ops, decode_attention, paged_decode_attention, paged_decode_attention_cuda,
                                  paged_decode_attention_reference)
from coconut_fast.kernels.decode_attention import decode_buffers, default_num_splits, split_counters
from kernel_cases import (DEVICE, DTYPES, TOLERANCES, assert_close, implementations, needs_triton, paged_context,
                          poisoned_like, randn)

IMPLEMENTATIONS = implementations(paged_decode_attention, paged_decode_attention_cuda)

CONTEXTS = [1, 70]  # a ragged batch: a one-token context and a length that is not a multiple of the block size


def run_case(context_lens, block_size, head_dim, gqa, dtype, num_splits, seed=0, attend=paged_decode_attention):
    num_kv_heads = 2 if gqa == 4 else 1  # one case with several kv heads: each must read its own
    k_cache, v_cache, tables, lens = paged_context(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    q = randn(len(context_lens), num_kv_heads * gqa, head_dim, dtype=dtype, seed=seed + 1)
    scale = 1 / math.sqrt(head_dim)
    out = poisoned_like(q)
    result = attend(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits, out=out)
    assert result is out
    expected = paged_decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference(block_size, head_dim, gqa, num_splits, dtype, attend):
    run_case(CONTEXTS, block_size, head_dim, gqa, dtype, num_splits, attend=attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_splits", [2, 4, 7, 16])
def test_split_merge_inside_the_launch(num_splits, attend):
    """Every split count merges to the reference (the last split to finish merges), empty splits included."""
    run_case([300, 129, 1], 16, 64, 4, torch.float32, num_splits, seed=num_splits, attend=attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
def test_default_splits_on_a_long_table(attend):
    """With num_splits=None a 600-token context is split (the heuristic sees the table's capacity, 624 tokens
    here) and the merged result still matches."""
    assert default_num_splits(2, 2, 624, torch.device("cpu")) > 1
    run_case([600, 45], 16, 64, 4, torch.float32, None, attend=attend)


def test_default_splits_follow_max_context():
    """The caller's max_context, not the table's capacity, sets the default split count (a host computation)."""
    k_cache, _, tables, _ = paged_context([4000, 3], 16, 1, 64, torch.float32, seed=0)
    q = randn(2, 1, 64, dtype=torch.float32, seed=1)
    assert decode_buffers(q, k_cache, tables, None, None)[0] > 1  # capacity: over 4000 tokens
    assert decode_buffers(q, k_cache, tables, None, None, max_context=100)[0] == 1
    assert decode_buffers(q, k_cache, tables, None, None, max_context=4000)[0] == default_num_splits(
        2, 1, 4000, q.device) > 1


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
def test_more_splits_than_tiles_leaves_empty_splits_harmless(attend):
    run_case([1, 20], 16, 64, 4, torch.float32, 8, attend=attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_empty_context_gives_zeros(num_splits, attend):
    """A padding row with no context yields zeros, as the reference does, and never NaN."""
    run_case([0, 17], 16, 64, 4, torch.float32, num_splits, attend=attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_head_dims_and_long_contexts(dtype, attend):
    """head_dim 16 and 32 (the engine's tiny models) and 256 (16-bit: the CUDA kernel reads a row with one warp),
    with contexts over many blocks of 16."""
    for head_dim, gqa in ((16, 2), (32, 8), (256, 4)):
        if head_dim == 256 and dtype == torch.float32:
            continue
        run_case([1000, 3, 257], 16, head_dim, gqa, dtype, None, seed=head_dim, attend=attend)


@needs_triton
def test_small_and_odd_head_dims():
    """The engine's tiny models use head_dim 16; odd sizes are padded inside the kernel."""
    run_case([9, 33], 16, 16, 2, torch.float32, 1)
    run_case([9, 33], 32, 48, 3, torch.float32, 2)


# ---------------------------------------------------------------- the step's k/v appended in the same launch
PADDING_ROW = 2  # its slot is -1: it writes nothing and attends to what the cache already holds


def rope_tables(head_dim, positions=128, seed=5):
    angles = torch.rand(positions, head_dim // 2, generator=torch.Generator().manual_seed(seed)) * 40
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def append_case(context_lens, block_size, head_dim, gqa, dtype, seed=0, fused_qkv=False):
    """Caches holding each context but its last position, which is NaN (the new token goes there), except on the
    padding row; q and the new k/v (random, or strided views of one fused projection output); their slots."""
    num_kv_heads = 2 if gqa == 4 else 1
    k_cache, v_cache, tables, lens = paged_context(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    B, Hq = len(context_lens), num_kv_heads * gqa
    slots = torch.full((B,), -1, dtype=torch.int64)
    for b, n in enumerate(context_lens):
        if n > 0 and b != PADDING_ROW:
            last = n - 1
            slots[b] = int(tables[b, last // block_size]) * block_size + last % block_size
    slots = slots.to(DEVICE)
    kept = slots[slots >= 0]
    for cache in (k_cache, v_cache):
        cache[kept // block_size, kept % block_size] = float("nan")
    if fused_qkv:  # [B, (Hq + 2 Hkv) * D] as a fused projection gives, read in place through strided views
        qkv = randn(B, (Hq + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=seed + 1)
        q, k, v = qkv.split([Hq * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
        q, k, v = (t.view(B, -1, head_dim) for t in (q, k, v))
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    else:
        q = randn(B, Hq, head_dim, dtype=dtype, seed=seed + 1)
        k = randn(B, num_kv_heads, head_dim, dtype=dtype, seed=seed + 2)
        v = randn(B, num_kv_heads, head_dim, dtype=dtype, seed=seed + 3)
    return q, k, v, slots, k_cache, v_cache, tables, lens


def check_append(case, dtype, num_splits, rope, attend, out=None, max_context=None):
    """The kernel against the reference (write, or rotate and write, then attend): the output, and the caches
    after the call (an exact copy; the rotated k within the dtype's tolerance)."""
    q, k, v, slots, k_cache, v_cache, tables, lens = case
    scale = 1 / math.sqrt(q.shape[2])
    rope_args = None
    if rope:
        cos, sin = rope_tables(q.shape[2])
        positions = torch.randperm(cos.shape[0], generator=torch.Generator().manual_seed(7))[:q.shape[0]]
        rope_args = (positions.to(DEVICE), cos, sin)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = paged_decode_attention_reference(q, expected_k, expected_v, tables, lens, scale,
                                                out=torch.empty(q.shape, dtype=torch.float32, device=DEVICE),
                                                new_kv=(k, v, slots), rope=rope_args)
    out = poisoned_like(q) if out is None else out
    result = attend(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits, out=out, new_kv=(k, v, slots),
                    rope=rope_args, max_context=max_context)
    assert result is out
    assert_close(out, expected, dtype)
    atol, rtol = TOLERANCES[dtype] if rope else (0, 0)
    torch.testing.assert_close(k_cache, expected_k, equal_nan=True, atol=atol, rtol=rtol)
    torch.testing.assert_close(v_cache, expected_v, equal_nan=True, atol=0, rtol=0)
    written = slots[slots >= 0]
    block_size = k_cache.shape[1]
    assert not k_cache[written // block_size, written % block_size].isnan().any()


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("rope", [False, True], ids=["kv", "rope"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_append_matches_reference(block_size, head_dim, gqa, num_splits, dtype, rope, attend):
    """Rows: the new token alone, a context over several blocks, a padding row (slot -1), an empty padding row."""
    case = append_case([1, 70, 9, 0], block_size, head_dim, gqa, dtype, seed=head_dim + gqa)
    check_append(case, dtype, num_splits, rope, attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
@pytest.mark.parametrize("rope", [False, True], ids=["kv", "rope"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_append_reads_strided_views_of_a_fused_projection(num_splits, rope, attend):
    """q, k, v as views of one [B, (Hq + 2 Hkv) * D] projection output (row stride != heads * D), out a view of
    a wider buffer: strides are passed, nothing is copied."""
    dtype = torch.float16
    case = append_case([40, 1, 5, 130], 16, 64, 4, dtype, seed=11, fused_qkv=True)
    q = case[0]
    wide = poisoned_like(torch.empty(q.shape[0], q.shape[1] + 3, q.shape[2], dtype=dtype, device=DEVICE))
    check_append(case, dtype, num_splits, rope, attend, out=wide[:, 2:2 + q.shape[1]], max_context=130)
    assert wide[:, :2].isnan().all() and wide[:, 2 + q.shape[1]:].isnan().all()  # nothing outside the view


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
def test_append_on_an_empty_context_still_writes_its_slot(attend):
    """A row with context_len 0 and a slot writes it (as write_kv would) and attends to nothing."""
    case = list(append_case([0, 20], 16, 64, 1, torch.float32, seed=3))
    tables = case[6]
    spare = min(set(range(1, 5)) - set(tables[1, :2].tolist()))  # a block no context uses
    case[3] = torch.tensor([spare * 16 + 3, int(case[3][1])], dtype=torch.int64, device=DEVICE)
    for cache in case[4:6]:
        cache[spare, 3] = float("nan")
    for num_splits in (1, 2):
        check_append([t.clone() for t in case], torch.float32, num_splits, False, attend)


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
def test_split_counters_are_back_to_zero_and_reused(attend):
    """The caller's counter buffer (and the module's own) hold zeros after a split launch, and a second launch
    on the same buffer merges again."""
    k_cache, v_cache, tables, lens = paged_context([200, 90, 7], 16, 2, 64, torch.float32, seed=4)
    counters = torch.zeros(6 + 5, dtype=torch.int32, device=DEVICE)
    for seed in (1, 2):
        q = randn(3, 8, 64, dtype=torch.float32, seed=seed)
        out = poisoned_like(q)
        attend(q, k_cache, v_cache, tables, lens, 0.125, num_splits=4, out=out, counters=counters)
        assert_close(out, paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.125), torch.float32)
        assert not counters.any()
        out = poisoned_like(q)
        attend(q, k_cache, v_cache, tables, lens, 0.125, num_splits=3, out=out)  # the module's buffer
        assert_close(out, paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.125), torch.float32)
        assert not split_counters(q.device, 6).any()


def test_reference_matches_sdpa():
    """The reference itself against torch SDPA on the gathered, contiguous context."""
    k_cache, v_cache, tables, lens = paged_context([5, 21], 16, 2, 64, torch.float32, seed=3)
    q = randn(2, 8, 64, dtype=torch.float32, seed=4)
    out = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.1)
    for b, n in enumerate(lens.tolist()):
        k = k_cache[tables[b, :2].long()].flatten(0, 1)[:n].transpose(0, 1)  # [Hkv, n, D]
        v = v_cache[tables[b, :2].long()].flatten(0, 1)[:n].transpose(0, 1)
        sdpa = F.scaled_dot_product_attention(q[b][:, None], k.repeat_interleave(4, 0), v.repeat_interleave(4, 0),
                                              scale=0.1)
        torch.testing.assert_close(out[b], sdpa[:, 0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- argument checks
def bad_args(**override):
    k_cache, v_cache, tables, lens = paged_context([3, 5], 16, 2, 64, torch.float32, seed=0)
    args = dict(q=randn(2, 4, 64, dtype=torch.float32, seed=1), k_cache=k_cache, v_cache=v_cache,
                block_tables=tables, context_lens=lens, scale=0.1)
    args.update(override)
    return args


def new_kv(rows=2, heads=2, head_dim=64, dtype=torch.float32, slots=None):
    k = torch.zeros(rows, heads, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.tensor([2, 20], device=DEVICE) if slots is None else slots
    return (k, k.clone(), slots)


@pytest.mark.parametrize("name, value", [
    ("q", torch.zeros(2, 4, 32, device=DEVICE)),  # head_dim differs from the cache
    ("q", torch.zeros(2, 3, 64, device=DEVICE)),  # 3 heads over 2 kv heads
    ("q", torch.zeros(2, 4, 64, dtype=torch.float16, device=DEVICE)),  # dtype differs from the cache
    ("block_tables", torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)),
    ("block_tables", torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)),
    ("context_lens", torch.ones(3, dtype=torch.int32, device=DEVICE)),
    ("context_lens", torch.ones(2, dtype=torch.float32, device=DEVICE)),
    ("v_cache", torch.zeros(8, 16, 2, 64, dtype=torch.int32, device=DEVICE)),
    ("num_splits", 0),
    ("out", torch.zeros(2, 4, 64, dtype=torch.float16, device=DEVICE)),
    ("max_context", -1),
    ("counters", torch.zeros(3, dtype=torch.int32, device=DEVICE)),  # fewer than batch x kv heads
    ("counters", torch.zeros(4, dtype=torch.int64, device=DEVICE)),
    ("new_kv", (torch.zeros(2, 2, 64, device=DEVICE),)),
    ("new_kv", new_kv(rows=3, slots=torch.arange(3, device=DEVICE))),  # a batch other than q's
    ("k", new_kv(head_dim=32)),  # the cache's checks, as write_kv names them
    ("slot_mapping", new_kv(slots=torch.tensor([2, 20], dtype=torch.int32, device=DEVICE))),
    ("rope", (torch.arange(2, device=DEVICE),)),
])
def test_bad_arguments_are_named(name, value):
    key = {"k": "new_kv", "slot_mapping": "new_kv"}.get(name, name)
    args = bad_args(**{key: value})
    if name == "rope":
        args["new_kv"] = new_kv()
    with pytest.raises(ValueError, match=name):
        paged_decode_attention(**args)


@pytest.mark.parametrize("name, rope", [
    ("positions", (torch.zeros(2, dtype=torch.int32, device=DEVICE), torch.zeros(8, 32, device=DEVICE),
                   torch.zeros(8, 32, device=DEVICE))),
    ("cos", (torch.zeros(2, dtype=torch.int64, device=DEVICE), torch.zeros(8, 64, device=DEVICE),
             torch.zeros(8, 32, device=DEVICE))),
    ("rope", (torch.zeros(2, dtype=torch.int64, device=DEVICE), torch.zeros(8, 32, device=DEVICE),
              torch.zeros(8, 32, device=DEVICE), None)),
])
def test_bad_rope_arguments_are_named(name, rope):
    with pytest.raises(ValueError, match=name):
        paged_decode_attention(**bad_args(new_kv=new_kv(), rope=rope))
    with pytest.raises(ValueError, match="rope"):  # rope rotates the new k: it needs new_kv
        paged_decode_attention(**bad_args(rope=rope))


def test_error_texts_are_exact():
    """The messages are built only on failure, with the same text as always."""
    with pytest.raises(ValueError) as error:
        paged_decode_attention(**bad_args(q=torch.zeros(2, 4, 32, device=DEVICE)))
    assert str(error.value) == "k_cache: expected head_dim 32 (from q) in dimension 3, got (5, 16, 2, 64)"
    with pytest.raises(ValueError) as error:
        paged_decode_attention(**bad_args(block_tables=torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)))
    assert str(error.value) == "block_tables: expected dtype in ['torch.int32'], got torch.int64"
    with pytest.raises(ValueError) as error:
        paged_decode_attention(**bad_args(context_lens=torch.ones(3, dtype=torch.int32, device=DEVICE)))
    assert str(error.value) == "context_lens: expected 2 entries (the batch of q), got (3,)"


def test_messages_are_built_only_on_failure():
    from coconut_fast.kernels._common import expect

    def never():
        raise AssertionError("a passing check built its message")

    expect(True, "x", never, never)
    with pytest.raises(ValueError, match=r"^x: expected an int, got 'a'$"):
        expect(False, "x", lambda: "an int", lambda: repr("a"))


@pytest.mark.parametrize("attend", IMPLEMENTATIONS)
def test_check_false_skips_the_argument_checks(monkeypatch, attend):
    def refuse(*args, **kwargs):
        raise AssertionError("checked")

    monkeypatch.setattr(decode_attention, "check_decode_args", refuse)
    monkeypatch.setattr(cuda_ops, "check_decode_args", refuse)
    with pytest.raises(AssertionError, match="checked"):
        attend(**bad_args())
    args = bad_args()
    out = attend(**args, check=False)
    assert_close(out, paged_decode_attention_reference(**args), torch.float32)
