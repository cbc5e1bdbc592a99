"""Triton kernels of the paged engine, each beside the plain torch reference its tests and benchmarks share;
`cuda_ops` holds their CUDA twins from the optional compiled extension."""

import os

import torch

from ._common import HAS_TRITON
from .decode_attention import paged_decode_attention, paged_decode_attention_reference
from .fused_linear import linear_act, linear_act_reference, linear_add_norm, linear_add_norm_reference
from .cuda_ops import (cuda_kernels_available, latent_feedback_cuda, paged_decode_attention_cuda,
                       rope_write_kv_cuda, write_kv_cuda)
from .kv_write import rope_write_kv, rope_write_kv_reference, write_kv, write_kv_reference
from .latent_feedback import latent_feedback, latent_feedback_reference
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
    "latent_feedback",
    "latent_feedback_reference",
    "linear_act",
    "linear_act_reference",
    "linear_add_norm",
    "linear_add_norm_reference",
    "cuda_kernels_available",
    "paged_decode_attention_cuda",
    "write_kv_cuda",
    "rope_write_kv_cuda",
    "latent_feedback_cuda",
]
