"""The fused latent feedback step (Triton, interpreted on CPU; its CUDA twin on a GPU with the extension) against
its torch reference; the reference's position / slot / context advance against a plain loop."""
import pytest
import torch

from coconut_fast.kernels import latent_feedback, latent_feedback_cuda, latent_feedback_reference
from kernel_cases import DEVICE, DTYPES, assert_close, implementations, needs_triton, poisoned_like, randn

BLOCK_SIZE = 4
IMPLEMENTATIONS = implementations(latent_feedback, latent_feedback_cuda)


def step_inputs(rows, hidden, dtype, seed=0):
    """Random hidden / residual / norm parameters; rows 0 and 3 (when present) are padding (slot -1)."""
    x = randn(rows, hidden, dtype=dtype, seed=seed)
    residual = randn(rows, hidden, dtype=dtype, seed=seed + 1) * 3
    weight = (1 + 0.3 * randn(hidden, dtype=torch.float32, seed=seed + 2)).to(dtype)
    bias = randn(hidden, dtype=dtype, seed=seed + 3)
    gen = torch.Generator().manual_seed(seed + 4)
    positions = torch.randint(1, 4 * BLOCK_SIZE - 1, (rows,), generator=gen)
    tables = torch.randperm(rows * 5, generator=gen)[: rows * 4].view(rows, 4).to(torch.int32)
    slots = (tables.gather(1, (positions // BLOCK_SIZE)[:, None]).long()[:, 0] * BLOCK_SIZE + positions % BLOCK_SIZE)
    pad = [r for r in (0, 3) if r < rows]
    slots[pad] = -1
    meta = dict(positions=positions.to(DEVICE), context_lens=(positions + 1).to(torch.int32).to(DEVICE),
                slot_mapping=slots.to(DEVICE), block_tables=tables.to(DEVICE))
    return x, residual, weight, bias, meta


def run(fn, x, residual, weight, bias, rms, meta):
    meta = {k: v.clone() for k, v in meta.items()}
    thought, nxt = poisoned_like(x), poisoned_like(x)
    fn(x, residual, weight, bias, 1e-5, rms, thought, nxt, meta["positions"], meta["context_lens"],
       meta["slot_mapping"], meta["block_tables"], BLOCK_SIZE)
    return thought, nxt, meta


@pytest.mark.parametrize("fn", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["rms", "layer", "layer-no-bias"])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (5, 96), (8, 128)])
def test_latent_feedback_matches_reference(fn, rows, hidden, norm, dtype):
    x, residual, weight, bias, meta = step_inputs(rows, hidden, dtype)
    bias = bias if norm == "layer" else None
    rms = norm == "rms"
    thought, nxt, advanced = run(fn, x, residual, weight, bias, rms, meta)
    ref_thought, ref_next, ref_meta = run(latent_feedback_reference, x.float(), residual.float(), weight.float(),
                                          None if bias is None else bias.float(), rms, meta)
    assert thought.dtype == dtype
    assert_close(thought, ref_thought, dtype)
    assert torch.equal(thought, nxt)
    for name, value in ref_meta.items():
        assert torch.equal(advanced[name], value), name


@pytest.mark.parametrize("fn", IMPLEMENTATIONS)
def test_a_row_at_the_last_position_stays_inside_the_table(fn):
    """A live row at the last position (max_positions - 1) advances to max_positions, whose block index is the
    table's width: the kernels take the last column, as the reference does. The table is a view of a wider buffer
    whose extra column is poison, so a read past the width shows in the slot."""
    rows, width = 4, 4
    x, residual, weight, bias, meta = step_inputs(rows, 64, torch.float32)
    wide = torch.full((rows, width + 1), 1_000_000, dtype=torch.int32, device=DEVICE)
    wide[:, :width] = meta["block_tables"]
    meta["block_tables"] = wide[:, :width]
    meta["positions"] = torch.full((rows,), width * BLOCK_SIZE - 1, device=DEVICE)
    meta["context_lens"] = (meta["positions"] + 1).to(torch.int32)
    live = meta["slot_mapping"] >= 0
    meta["slot_mapping"] = torch.where(live, meta["block_tables"][:, -1].long() * BLOCK_SIZE + BLOCK_SIZE - 1, -1)
    _, _, advanced = run(fn, x, residual, weight, bias, False, meta)
    _, _, expected = run(latent_feedback_reference, x, residual, weight, bias, False, meta)
    last_column_slots = meta["block_tables"][:, -1].long() * BLOCK_SIZE  # position max_positions % BLOCK_SIZE == 0
    assert torch.equal(expected["slot_mapping"], torch.where(live, last_column_slots, -1))
    for name, value in expected.items():
        assert torch.equal(advanced[name], value), name


def test_reference_advances_live_rows_only():
    x, residual, weight, bias, meta = step_inputs(6, 32, torch.float32)
    _, _, advanced = run(latent_feedback_reference, x, residual, weight, bias, False, meta)
    for r in range(6):
        p, table = int(meta["positions"][r]), meta["block_tables"][r].tolist()
        if int(meta["slot_mapping"][r]) < 0:
            expected = (p, p + 1, -1)  # padding stays where it is
        else:
            expected = (p + 1, p + 2, table[(p + 1) // BLOCK_SIZE] * BLOCK_SIZE + (p + 1) % BLOCK_SIZE)
        got = (int(advanced["positions"][r]), int(advanced["context_lens"][r]), int(advanced["slot_mapping"][r]))
        assert got == expected, f"row {r}"


@needs_triton
def test_bad_arguments_are_named():
    x, residual, weight, bias, meta = step_inputs(3, 32, torch.float32)
    thought = torch.empty_like(x)
    args = [x, residual, weight, bias, 1e-5, False, thought, torch.empty_like(x), meta["positions"],
            meta["context_lens"], meta["slot_mapping"], meta["block_tables"], BLOCK_SIZE]
    bad = list(args)
    bad[9] = meta["context_lens"].long()
    with pytest.raises(ValueError, match="context_lens"):
        latent_feedback(*bad)
    bad = list(args)
    bad[7] = torch.empty(3, 16)
    with pytest.raises(ValueError, match="next_embeds"):
        latent_feedback(*bad)
    bad = list(args)
    bad[12] = 0
    with pytest.raises(ValueError, match="block_size"):
        latent_feedback(*bad)
