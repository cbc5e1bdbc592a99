"""The KV cache tensors and their sizing: per-layer K and V pools of fixed-size blocks.

Each pool is [num_blocks + 1, block_size, num_kv_heads, head_dim] (flash-attn's paged layout). The last
block, `scratch_block`, is never handed out: unused block-table entries point at it, so a padding row or a
loop step past a request's blocks reads and writes there, never in another request's block.
"""
from __future__ import annotations

import os

import torch

DEFAULT_MEMORY_FRACTION = {"cuda": 0.9, "cpu": 0.2}


class PagedKVCache:
    """Per-layer K and V pools of `num_blocks` blocks of `block_size` tokens, plus the scratch block."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def blocks_from_memory(fraction: float, bytes_per_block: int, device: torch.device) -> int:
        """Blocks that fit in `fraction` of the device's free memory (free RAM on CPU)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {fraction}")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        else:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return int(free * fraction) // bytes_per_block


def kv_shape(causal_lm) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of an HF causal LM's attention."""
    config = causal_lm.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def cache_block_bytes(causal_lm, block_size: int) -> int:
    """Bytes one block takes over all layers, K and V, in the model's dtype."""
    layers, kv_heads, head_dim = kv_shape(causal_lm)
    dtype = causal_lm.get_input_embeddings().weight.dtype
    return PagedKVCache.bytes_per_block(layers, block_size, kv_heads, head_dim, dtype)


def num_cache_blocks(causal_lm, block_size: int, memory_fraction: float | None, max_num_seqs: int,
                     max_positions: int) -> int:
    """Blocks in `memory_fraction` of the free device memory, at most what `max_num_seqs` full-context requests
    need; at least one, or a ValueError that names the option to change."""
    device = causal_lm.device
    fraction = memory_fraction or DEFAULT_MEMORY_FRACTION.get(device.type, 0.2)
    per_block = cache_block_bytes(causal_lm, block_size)
    fits = PagedKVCache.blocks_from_memory(fraction, per_block, device)
    num_blocks = min(fits, max_num_seqs * -(-max_positions // block_size))
    if num_blocks < 1:
        raise ValueError(f"memory_fraction {fraction} of the free {device.type} memory holds no cache block "
                         f"of {per_block} bytes; raise memory_fraction or pass num_blocks")
    return num_blocks
