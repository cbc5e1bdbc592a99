"""`CoconutModel`: a Coconut wrapper over an HF causal LM (GPT-2, Llama, Qwen2, Qwen3, Mistral)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput

from . import generation
from . import tokens
from .families import FAMILIES
from .io import publish_files
from .losses import causal_lm_linear_loss, causal_lm_loss
from .parallel_latent import run_jacobi
from .passes import (Backbone, hf_checkpointing_off, latent_layout, layers_to_checkpoint, run_passes,
                     shift_columns, unshift_columns)
from .prompts import default_position_ids
from .switch_head import SwitchHead, check_kind, coconut_config_head, switch_loss
from .tokens import LATENT_TOKENS, latent_ids

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = FAMILIES
COCONUT_CONFIG = "coconut_config.json"
OFFICIAL_PREFIX = "base_causallm."
# Buffers older transformers saved in state dicts; they carry no weights.
IGNORED_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclass
class CoconutOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    switch_loss: torch.Tensor | None = None  # the switch head's BCE (mean over its labelled positions)


LATENT_MODES = ("sequential", "parallel")


class CoconutModel(nn.Module):
    """An HF causal LM that reasons in continuous thoughts between `<bot>` and `<eot>`."""

    def __init__(self, model: PreTrainedModel, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.latent_ids = latent_ids(tokenizer)
        vocab = model.get_input_embeddings().weight.shape[0]
        top = max(self.latent_ids.start, self.latent_ids.latent, self.latent_ids.end)
        if top >= vocab:
            raise ValueError(
                f"tokenizer's latent token id {top} is outside the model's embedding matrix ({vocab} rows); "
                "resize the model's token embeddings or load with add_latent_tokens=True"
            )
        family = getattr(model.config, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            logger.warning("model family %r is not among the tested families %s", family, SUPPORTED_FAMILIES)
        self.backbone = Backbone(model)
        self.switch_head: SwitchHead | None = None  # the learned switch to language (add_switch_head)
        self.paged_engine = None  # (engine, its options), built by generate(backend="paged"); not in state_dict

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path_or_model,
        tokenizer=None,
        add_latent_tokens: bool = True,
        official_checkpoint: str | os.PathLike | None = None,
        **model_kwargs,
    ) -> "CoconutModel":
        """Wrap an HF directory or an in-memory HF causal LM.

        `tokenizer` is a tokenizer or a directory; it defaults to the model directory's. The
        special tokens are added when missing (`add_latent_tokens=False` makes that an error).
        `official_checkpoint` loads a state dict saved by the official Coconut code on top.
        """
        if isinstance(path_or_model, (str, os.PathLike)):
            check_model_source(path_or_model, tokenizer)
            try:
                model = AutoModelForCausalLM.from_pretrained(path_or_model, **model_kwargs)
            except OSError as e:
                if Path(path_or_model).exists():
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise FileNotFoundError(f"{str(path_or_model)!r} is no local model directory, and as a hub id it "
                                        f"failed: {first}") from e
            tokenizer = path_or_model if tokenizer is None else tokenizer
        elif isinstance(path_or_model, PreTrainedModel):
            if model_kwargs:
                raise TypeError(f"model keyword arguments {sorted(model_kwargs)} need a path, not a model object")
            model = path_or_model
            if tokenizer is None:
                raise ValueError("tokenizer is required when path_or_model is an in-memory model")
        else:
            raise TypeError(
                f"path_or_model must be a directory or a transformers PreTrainedModel, got {type(path_or_model).__name__}"
            )
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if add_latent_tokens:
            tokens.add_latent_tokens(tokenizer, model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        coconut = cls(model, tokenizer)
        if isinstance(path_or_model, (str, os.PathLike)):
            head = coconut_config_head(path_or_model, COCONUT_CONFIG)
            if head is not None:
                coconut.switch_head = SwitchHead.load(path_or_model, head).to(model.device, model.dtype)
        if official_checkpoint is not None:
            coconut.load_official_checkpoint(official_checkpoint)
        return coconut

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write weights (safetensors), config, tokenizer and the Coconut config into `save_directory`, as HF's
        `save_pretrained` does: the directory is created if needed, its other files stay. Every file is written
        whole first and then renamed into place (fsynced), so a failure leaves the previous files as they were."""
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"save_directory {str(target)!r} is a file; give a directory to save into")
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".coconut-save-", dir=target))
        try:
            self.model.save_pretrained(staging, safe_serialization=True)
            self.write_coconut_files(staging)
            written = publish_files(staging, target)
            remove_stale_weight_files(target, {p.name for p in written})
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def write_coconut_files(self, directory: str | os.PathLike) -> None:
        """What a directory needs beside the HF weights and config to load as this model: the tokenizer, the
        Coconut config (latent token ids, the switch head's kind) and the switch head's weights."""
        directory = Path(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        config = {"latent_tokens": list(LATENT_TOKENS), **self.latent_ids.__dict__}
        if self.switch_head is not None:
            self.switch_head.save(directory)
            config["switch_head"] = self.switch_head.config
        (directory / COCONUT_CONFIG).write_text(json.dumps(config, indent=2))

    def add_switch_head(self, kind: str = "linear") -> SwitchHead:
        """A new switch head (`"linear"` or `"mlp"`) on the model's device and dtype; replaces any earlier one."""
        weight = self.model.get_input_embeddings().weight
        self.switch_head = SwitchHead(weight.shape[1], check_kind(kind)).to(weight.device, weight.dtype)
        return self.switch_head

    def load_official_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a `torch.save`d state dict of the official Coconut wrapper (`base_causallm.*`, `embedding.weight`)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not any(k.startswith(OFFICIAL_PREFIX) for k in state):
            raise ValueError(
                f"{path}: not an official Coconut checkpoint (no '{OFFICIAL_PREFIX}*' keys); "
                "a plain causal-LM state dict loads with model.model.load_state_dict"
            )
        own = self.model.state_dict()
        base = {k[len(OFFICIAL_PREFIX) :]: v for k, v in state.items() if k.startswith(OFFICIAL_PREFIX)}
        base = {k: v for k, v in base.items() if not k.endswith(IGNORED_BUFFER_SUFFIXES)}
        unexpected = sorted(k for k in state if not k.startswith(OFFICIAL_PREFIX) and k != "embedding.weight")
        unexpected += sorted(OFFICIAL_PREFIX + k for k in base if k not in own)
        present_ptrs = {own[k].data_ptr() for k in base if k in own}
        # a tied weight (GPT-2's lm_head) may be saved under one name only
        missing = sorted(k for k in own if k not in base and own[k].data_ptr() not in present_ptrs)
        if "embedding.weight" not in state:
            missing.append("embedding.weight")
        mismatched = [
            f"{OFFICIAL_PREFIX}{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in base.items()
            if k in own and v.shape != own[k].shape
        ]
        emb_ptr = self.model.get_input_embeddings().weight.data_ptr()
        emb_key = next(k for k, v in own.items() if v.data_ptr() == emb_ptr)
        if "embedding.weight" in state and emb_key in base and not torch.equal(state["embedding.weight"], base[emb_key]):
            mismatched.append(f"embedding.weight differs from {OFFICIAL_PREFIX}{emb_key}")
        problems = [
            f"{name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for name, keys in (("unexpected keys", unexpected), ("missing keys", missing), ("mismatched", mismatched))
            if keys
        ]
        if problems:
            raise ValueError(f"{path}: checkpoint does not fit this model: " + "; ".join(problems))
        self.model.load_state_dict(base, strict=False)

    # ---------------------------------------------------------------- training forward
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def config(self):
        """The wrapped HF model's config."""
        return self.model.config

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        position_ids=None,
        *,
        return_logits: bool = True,
        latent_mode: str = "sequential",
        jacobi_iterations: int | None = None,
        gradient_checkpointing: bool | None = None,
        switch_loss_weight: float | None = None,
    ) -> CoconutOutput:
        """Loss and logits of Coconut sequences, the KV cache reused across the latent passes.

        return_logits=False (needs `labels`): the loss comes from a chunked linear cross-entropy
        over the labelled positions only and `logits` is None; the [tokens x vocab] logits never
        exist at once. latent_mode="parallel" refines all thoughts together by
        `jacobi_iterations` Jacobi passes (`coconut_fast.parallel_latent`; exact when it is at
        least the number of latent columns). gradient_checkpointing=True recomputes every
        decoder layer in backward; None checkpoints the layers the HF model's
        `activation_checkpointing_enable()` marked, in training mode (always non-reentrant, cache-safe).

        With a switch head (`add_switch_head`) and `<bot>` tokens in the batch, `switch_loss` is the head's
        mean BCE over the `<bot>` and latent positions whose next input is a latent (0) or `<eot>` (1).
        `loss` stays the LM loss unless `switch_loss_weight` is given: then it is LM loss +
        switch_loss_weight * switch_loss.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length > 0, got shape {tuple(input_ids.shape)}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels), ("position_ids", position_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(input_ids.shape)} like input_ids")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False computes only the loss, so it needs labels")
        if latent_mode not in LATENT_MODES:
            raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")
        if latent_mode == "parallel" and (
            isinstance(jacobi_iterations, bool) or not isinstance(jacobi_iterations, int) or jacobi_iterations < 0
        ):
            raise ValueError(
                f"latent_mode='parallel' needs jacobi_iterations, an integer >= 0, got {jacobi_iterations!r}"
            )
        if latent_mode == "sequential" and jacobi_iterations is not None:
            raise ValueError("jacobi_iterations applies to latent_mode='parallel' only")
        if switch_loss_weight is not None:
            if isinstance(switch_loss_weight, bool) or not isinstance(switch_loss_weight, (int, float)) \
                    or switch_loss_weight < 0:
                raise ValueError(f"switch_loss_weight must be a number >= 0 or None, got {switch_loss_weight!r}")
            if labels is None:
                raise ValueError("switch_loss_weight adds the switch loss to the LM loss, so it needs labels")
            if self.switch_head is None:
                raise ValueError("switch_loss_weight needs a switch head: call add_switch_head() first")
        checkpoint_layers = layers_to_checkpoint(self.model, gradient_checkpointing, self.training)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        input_ids_in, mask_in = input_ids, attention_mask  # before the shift: the switch labels read these
        latent = input_ids == self.latent_ids.latent
        layout = latent_layout(latent, attention_mask)  # the forward's one host sync before the loss
        T = input_ids.shape[1]
        shift, width = layout.shift, layout.width
        if width != T:
            input_ids = shift_columns(input_ids, shift, width, 0)
            latent = shift_columns(latent, shift, width, False)
            attention_mask = shift_columns(attention_mask, shift, width, 0)
            position_ids = shift_columns(position_ids, shift, width, 0)
        token_embeds = self.model.get_input_embeddings()(input_ids)
        with hf_checkpointing_off(self.model):
            if latent_mode == "parallel" and layout.span is not None:
                hidden, embeds = run_jacobi(self.backbone, token_embeds, latent, attention_mask, position_ids,
                                            layout.span, jacobi_iterations, checkpoint_layers)
            else:
                hidden, embeds, _ = run_passes(self.backbone, token_embeds, latent, attention_mask, position_ids,
                                               keep_cache=False, span=layout.span, checkpoint_layers=checkpoint_layers)
        if width != T:
            hidden, embeds = unshift_columns(hidden, shift, T), unshift_columns(embeds, shift, T)
        lm_head = self.model.get_output_embeddings()
        switch = None
        if self.switch_head is not None:  # None when the batch has no <bot> (nothing labelled)
            switch = switch_loss(self.switch_head, hidden, input_ids_in, mask_in, self.latent_ids)
        if not return_logits:
            loss, logits = causal_lm_linear_loss(hidden, lm_head, labels), None
        else:
            logits = lm_head(hidden)
            loss = causal_lm_loss(logits, labels) if labels is not None else None
        if switch_loss_weight is not None and switch is not None:
            loss = loss + switch_loss_weight * switch
        return CoconutOutput(loss=loss, logits=logits, inputs_embeds=embeds, switch_loss=switch)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, num_thoughts=None, max_new_tokens: int = 128, **kwargs):
        """Batched Coconut generation (`backend="torch"` or `"paged"`); see `coconut_fast.generation.generate`."""
        return generation.generate(
            self, input_ids, attention_mask=attention_mask, num_thoughts=num_thoughts,
            max_new_tokens=max_new_tokens, **kwargs,
        )


WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def remove_stale_weight_files(directory: Path, written: set[str]) -> None:
    """Weight files of an earlier save in another layout (one file vs shards), as HF's save_pretrained removes
    them, so the directory never mixes two sets of weights. Nothing else is touched."""
    for path in directory.iterdir():
        if path.is_file() and WEIGHT_FILE.match(path.name) and path.name not in written:
            path.unlink()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_model_source(source, tokenizer) -> None:
    """A local model directory must exist, hold config.json, and hold tokenizer files unless a tokenizer is given.
    A name that is not a local path and reads as a hub id ("org/name") is left to transformers."""
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and HUB_ID.match(source) and not source.startswith("."):
            return
        raise FileNotFoundError(f"model directory {str(source)!r} does not exist (give a directory written by "
                                "save_pretrained, a checkpoint, or `coconut-fast fetch-model`)")
    if not path.is_dir():
        raise NotADirectoryError(f"model path {str(source)!r} is a file; give the directory that holds config.json")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(source)!r} is not a model directory: it has no config.json")
    if tokenizer is None and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"model directory {str(source)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "pass tokenizer= (a tokenizer or its directory)")
