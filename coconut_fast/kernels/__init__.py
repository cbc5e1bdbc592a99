"""Triton kernels of the paged engine, each beside the plain torch reference its tests and benchmarks share."""

import os

import torch

from ._common import HAS_TRITON
from .decode_attention import paged_decode_attention, paged_decode_attention_reference
from .kv_write import rope_write_kv, rope_write_kv_reference, write_kv, write_kv_reference
from .norms import add_layer_norm, add_layer_norm_reference, add_rms_norm, add_rms_norm_reference
from .prefill_attention import paged_prefill_attention, paged_prefill_attention_reference


def triton_enabled() -> bool:
    """True when the Triton kernels can run here: triton installed and a CUDA device or TRITON_INTERPRET=1."""
    return HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


__all__ = [
    "triton_enabled",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "write_kv",
    "write_kv_reference",
    "rope_write_kv",
    "rope_write_kv_reference",
    "add_rms_norm",
    "add_rms_norm_reference",
    "add_layer_norm",
    "add_layer_norm_reference",
]
