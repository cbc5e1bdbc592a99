"""Requests that share prompt blocks inside one step: identical prompts in a batch (n samples of one prompt) and
prompts that differ only in their last tokens, at prompt lengths around block boundaries.

A request admitted in the same step as another with its prefix reuses the blocks that step's prefill writes; its
first row can then be a single-position row that reads those blocks. Every batch must give the torch backend's
tokens exactly and its thoughts within 1e-5, over block sizes, thought counts, both families, both kernel sets and
the static-buffer (graph) path.
"""
import warnings

import pytest
import torch

from coconut_fast.generation import engine_for
from coconut_fast.kernels import triton_enabled
from coconut_fast.prompts import left_pad
from engine_helpers import THOUGHT_RTOL, engine_model

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 5
TRITON = pytest.mark.skipif(not triton_enabled(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
# the whole grid with the torch kernels; the interpreted Triton kernels (a second or more per launch) see every
# block size, thought count, family and graph mode, at the lengths around the first two block boundaries
GRID = [(bs, k, fam, "torch", g) for bs in (4, 8, 16) for k in (0, 1, 3) for fam in ("gpt2", "llama")
        for g in (False, True)]
GRID += [pytest.param(bs, k, fam, "triton", g, marks=TRITON)
         for i, (bs, k) in enumerate(((4, 3), (8, 0), (16, 1))) for fam, g in (("gpt2", i % 2 == 0),
                                                                             ("llama", i % 2 == 1))]
FULL_LENGTHS = lambda bs: (bs - 1, bs, bs + 1, 2 * bs, 3 * bs)  # noqa: E731
SHORT_LENGTHS = lambda bs: (bs - 1, bs, 2 * bs)  # noqa: E731


def shared_prefix_batch(block_size: int, lengths) -> list[list[int]]:
    """Per length: one prompt three times, another prompt, and the first prompt with a different last token."""
    gen = torch.Generator().manual_seed(block_size)
    prompts = []
    for length in lengths:
        prompt = torch.randint(0, 60, (length,), generator=gen).tolist()
        other = torch.randint(0, 60, (length,), generator=gen).tolist()
        changed = prompt[:-1] + [(prompt[-1] + 1) % 60]
        prompts += [prompt, prompt, prompt, other, changed]
    return prompts


_torch_results = {}


def torch_backend(family, prompts, thoughts):
    """The torch backend's answer to the batch (cached: it does not depend on the paged options)."""
    key = (family, str(prompts), thoughts)
    if key not in _torch_results:
        cm = engine_model(family)
        ids, mask = left_pad(prompts, cm.tokenizer.pad_token_id)
        _torch_results[key] = cm.generate(ids, mask, num_thoughts=thoughts, max_new_tokens=NEW_TOKENS,
                                          output_thoughts=True, backend="torch")
    return _torch_results[key]


@pytest.mark.parametrize("block_size, thoughts, family, kernels, graphs", GRID)
def test_shared_prefixes_in_one_step_match_torch_backend(block_size, thoughts, family, kernels, graphs):
    lengths = FULL_LENGTHS(block_size) if kernels == "torch" else SHORT_LENGTHS(block_size)
    prompts = shared_prefix_batch(block_size, lengths)
    expected = torch_backend(family, prompts, thoughts)
    cm = engine_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU notice of the static-buffer path
        llm = engine_for(cm, block_size=block_size, num_blocks=256, kernels=kernels, cuda_graphs=graphs)
        ids, mask = left_pad(prompts, cm.tokenizer.pad_token_id)
        got = cm.generate(ids, mask, num_thoughts=thoughts, max_new_tokens=NEW_TOKENS, output_thoughts=True,
                          backend="paged")
    # the first step admits every prompt: the copies of the 2bs prompt reuse blocks that very step writes
    assert llm.stats.steps[0].num_cached_tokens >= 2 * 2 * block_size
    assert torch.equal(got.sequences, expected.sequences)
    if thoughts:
        err = (got.thoughts - expected.thoughts).abs().max() / expected.thoughts.abs().max()
        assert err <= THOUGHT_RTOL, f"thoughts differ by {err:.2e} (relative)"
