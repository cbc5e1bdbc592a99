"""The Coconut multi-pass forward over an HF backbone with one KV cache.

The columns before the first latent go in one pass; every column from the first to the last
latent is one single-position pass for the whole batch (a latent takes the hidden state its
predecessor column just produced); the rest goes in one final pass. Autograd flows through the
cache, so gradients reach every thought.

The attention mask of the whole sequence is built once and sliced per pass, so no pass reads a
value back from the device. Activation checkpointing is done here per decoder layer, in a way
that keeps the cache valid (HF's own checkpointing drops the cache in training mode).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer


def _cache_kwarg(backbone) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); accept both.
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Backbone:
    """The base model (without LM head) called one span of columns at a time against a cache."""

    def __init__(self, causal_lm):
        self.model = causal_lm.base_model
        self.config = causal_lm.config
        self.cache_kwarg = _cache_kwarg(self.model)
        self.sliding = any(getattr(layer, "is_sliding", False) for layer in self.new_cache().layers)

    def new_cache(self):
        return DynamicCache(config=self.config)

    def full_mask(self, embeds, attention_mask, position_ids):
        """The attention mask of all columns in the form the model's attention takes, to slice per pass.

        None where slicing does not apply (sliding-window layers, flash or flex attention): the
        passes then take the 2D padding mask and the model builds each pass's mask itself."""
        if self.sliding:
            return None
        # the cache goes fourth by position: transformers 5.24 names it `cache`, 5.17-5.23 `past_key_values`
        mask = create_causal_mask(self.config, embeds, attention_mask, None, position_ids=position_ids,
                                  allow_is_causal_skip=False)
        return mask if isinstance(mask, torch.Tensor) and mask.dim() == 4 else None

    def __call__(self, embeds, attention_mask, position_ids, cache) -> torch.Tensor:
        """Hidden states after the final norm for `embeds`, the columns after those in `cache`.

        `attention_mask` is the 2D padding mask of the cached and new columns, or a prepared 4D
        mask of the new rows. With `cache=None` nothing is cached (a single pass that needs no later one)."""
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **({self.cache_kwarg: cache} if cache is not None else {}),
        )
        return out.last_hidden_state


# ---------------------------------------------------------------- cache state and checkpointing
def cache_state(cache) -> list[dict] | None:
    """A snapshot of the cache (references to its tensors; `update` replaces them, never writes into them)."""
    return None if cache is None else [dict(vars(layer)) for layer in cache.layers]


def restore_cache(cache, state) -> None:
    if cache is not None:
        for layer, saved in zip(cache.layers, state):
            vars(layer).update(saved)


@contextlib.contextmanager
def hf_checkpointing_off(module: torch.nn.Module):
    """Switch HF's own gradient checkpointing off inside: in training mode it drops the KV cache."""
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def _checkpointed_forward(layer, forward, cache):
    """`forward` of a decoder layer under non-reentrant checkpointing, replayable against `cache`."""

    def call(*args, **kwargs):
        state = cache_state(cache)

        def run(*args, **kwargs):
            # The backward replay finds the cache as this layer first found it.
            restore_cache(cache, state)
            with hf_checkpointing_off(layer):
                return forward(*args, **kwargs)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return call


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def layers_to_checkpoint(model: torch.nn.Module, requested: bool | None, training: bool) -> list[torch.nn.Module]:
    """Decoder layers to checkpoint: all (True), none (False), or those HF's
    `activation_checkpointing_enable()` marked, in training mode (None). None without autograd."""
    if not torch.is_grad_enabled() or requested is False:
        return []
    layers = decoder_layers(model)
    if requested is None:
        return [m for m in layers if m.gradient_checkpointing] if training else []
    if not layers:
        raise ValueError(f"gradient_checkpointing: no decoder layers found in {type(model).__name__}")
    return layers


@contextlib.contextmanager
def checkpointed_layers(layers: list[torch.nn.Module], cache):
    """Inside: each of `layers` keeps only its inputs and recomputes itself in backward."""
    own = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = _checkpointed_forward(layer, layer.forward, cache)
    try:
        yield
    finally:
        for layer, previous in zip(layers, own):
            del layer.forward
            if previous is not None:
                layer.forward = previous


# ---------------------------------------------------------------- where the latents sit
@dataclass
class LatentLayout:
    """Where the latents of a batch sit once every sample's first latent is in the same column."""

    shift: torch.Tensor  # [B] right-shift of each sample
    width: int  # columns after the shift
    span: tuple[int, int] | None  # first and last column holding a latent, after the shift


def latent_layout(latent_mask: torch.Tensor, attention_mask: torch.Tensor) -> LatentLayout:
    """Per-sample shifts that align the first latents, and the latent span; one host sync.

    Samples without latents are not shifted. With the first latents aligned, k latents take k
    single-column passes whatever the prompt lengths."""
    B, T = latent_mask.shape
    has = latent_mask.any(1)
    first = latent_mask.int().argmax(1)
    last = T - 1 - latent_mask.flip(1).int().argmax(1)
    target = torch.where(has, first, 0).max()
    shift = torch.where(has, target - first, 0)
    orphan = latent_mask[:, :1] | (latent_mask[:, 1:] & (attention_mask[:, :-1] == 0))
    last_col = torch.where(has, last + shift, 0).max()
    stats = torch.stack([orphan.any().long(), has.any().long(), shift.max(), target, last_col])
    is_orphan, any_latent, max_shift, first_col, last_col = stats.tolist()
    if is_orphan:
        raise ValueError("a latent slot must follow a real token: one is in column 0 or after padding")
    return LatentLayout(shift, T + max_shift, (first_col, last_col) if any_latent else None)


def shift_columns(x: torch.Tensor, shift: torch.Tensor, width: int, fill) -> torch.Tensor:
    """Move row b of x right by shift[b] into a [B, width, ...] tensor filled with `fill`."""
    idx = torch.arange(x.shape[1], device=x.device)[None] + shift[:, None]
    out = x.new_full((x.shape[0], width, *x.shape[2:]), fill)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return out.scatter(1, idx, x)


def unshift_columns(x: torch.Tensor, shift: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of `shift_columns`: the `length` original columns of each row."""
    idx = torch.arange(length, device=x.device)[None] + shift[:, None]
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


# ---------------------------------------------------------------- the passes
def latent_span(latent_mask: torch.Tensor) -> tuple[int, int] | None:
    """(first, last) column holding a latent in any sample, or None; one host sync."""
    cols = latent_mask.any(0).nonzero().flatten()
    if cols.numel() == 0:
        return None
    first, last = cols[[0, -1]].tolist()
    if first == 0:
        raise ValueError("a latent slot in column 0 has no preceding hidden state")
    return first, last


class Passes:
    """Runs spans of columns of one batch against one cache, each with its slice of the full mask."""

    def __init__(self, backbone: Backbone, embeds, attention_mask, position_ids, checkpoint_layers=(), cached=True):
        self.backbone = backbone
        self.cache = backbone.new_cache() if cached else None
        self.attention_mask = attention_mask
        self.position_ids = position_ids
        self.mask = backbone.full_mask(embeds, attention_mask, position_ids)
        self.checkpoint_layers = checkpoint_layers

    def __call__(self, start: int, end: int, embeds) -> torch.Tensor:
        """Hidden states of columns [start, end) given their input embeddings; the cache holds [0, start)."""
        mask = self.attention_mask[:, :end] if self.mask is None else self.mask[:, :, start:end, :end]
        with checkpointed_layers(self.checkpoint_layers, self.cache):
            return self.backbone(embeds, mask, self.position_ids[:, start:end], self.cache)


def fill_latent(h_prev, token_embeds, latent_cols) -> torch.Tensor:
    """Inputs of columns [B, n, H]: the predecessor's hidden state where a latent sits (`latent_cols` [B, n]),
    else the token embedding."""
    return torch.where(latent_cols[..., None], h_prev.to(token_embeds.dtype), token_embeds)


def run_passes(
    backbone: Backbone, token_embeds, latent_mask, attention_mask, position_ids, keep_cache=True, span="find",
    checkpoint_layers=(),
):
    """Run the Coconut passes over a batch; returns (hidden [B,T,H], inputs_embeds [B,T,H], cache).

    `token_embeds` are the token embeddings of every column; latent columns are replaced on the
    way by the thoughts. `span` is `latent_span(latent_mask)` when the caller knows it already
    ("find": read it here). A batch without latents and `keep_cache=False` takes one uncached pass
    (and returns no cache).
    """
    T = token_embeds.shape[1]
    span = latent_span(latent_mask) if span == "find" else span
    if span is None and not keep_cache:
        run = Passes(backbone, token_embeds, attention_mask, position_ids, checkpoint_layers, cached=False)
        return run(0, T, token_embeds), token_embeds, None
    run = Passes(backbone, token_embeds, attention_mask, position_ids, checkpoint_layers)
    first, last = span if span is not None else (T, T - 1)
    hiddens, inputs = [], []

    def step(start, end, embeds):
        h = run(start, end, embeds)
        hiddens.append(h)
        inputs.append(embeds)
        return h

    h = step(0, first, token_embeds[:, :first])  # first > 0: latent_span rejects column 0
    for col in range(first, last + 1):
        h = step(col, col + 1, fill_latent(h[:, -1:], token_embeds[:, col : col + 1], latent_mask[:, col : col + 1]))
    if last + 1 < T:
        step(last + 1, T, token_embeds[:, last + 1 :])
    return torch.cat(hiddens, dim=1), torch.cat(inputs, dim=1), run.cache
