"""The learned switch from continuous thoughts to language (the Coconut paper's binary classifier).

In `question <bot> L_1 … L_k <eot> answer` the last-layer hidden state (after the final norm) at
`<bot>` and at each latent slot is a continuous thought. The head reads it and predicts whether the
next input is `<eot>` (switch to language, label 1) or another latent (continue, label 0): `<bot>`,
L_1 … L_{k-1} are labelled 0 and L_k is labelled 1 (with k = 0, `<bot>` is labelled 1).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .tokens import LatentIds

SWITCH_HEAD_KINDS = ("linear", "mlp")
SWITCH_HEAD_FILE = "switch_head.safetensors"


def check_kind(kind) -> str:
    """A head kind from a config value: "linear", "mlp", or True (linear)."""
    if kind is True:
        return "linear"
    if kind not in SWITCH_HEAD_KINDS:
        raise ValueError(f"switch head kind must be one of {SWITCH_HEAD_KINDS} (or True for linear), got {kind!r}")
    return kind


class SwitchHead(nn.Module):
    """hidden [..., H] -> switch logit [...]: one linear layer, or a 2-layer MLP (H -> H, GELU, H -> 1)."""

    def __init__(self, hidden_size: int, kind: str = "linear"):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
        self.kind = check_kind(kind)
        self.hidden_size = hidden_size
        if self.kind == "linear":
            self.net = nn.Linear(hidden_size, 1)
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.net.weight if self.kind == "linear" else self.net[0].weight
        return self.net(hidden.to(weight.dtype)).squeeze(-1)

    def switch_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """p(switch) in float32 for each row of `hidden` [N, H]."""
        return torch.sigmoid(self(hidden).float())

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "hidden_size": self.hidden_size}

    def save(self, directory: str | Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, Path(directory) / SWITCH_HEAD_FILE, metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str | Path, config: dict) -> "SwitchHead":
        head = cls(int(config["hidden_size"]), config["kind"])
        path = Path(directory) / SWITCH_HEAD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: its coconut config names a switch head, but {SWITCH_HEAD_FILE} "
                                    "is missing")
        head.load_state_dict(load_file(path))
        return head


def switch_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, ids: LatentIds):
    """(labelled [B, T] bool, target [B, T] float): positions holding `<bot>` or a latent whose next input is a
    latent (0) or `<eot>` (1), both real tokens; labels come from input_ids alone."""
    current, nxt = input_ids[:, :-1], input_ids[:, 1:]
    real = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    thought = (current == ids.start) | (current == ids.latent)
    stop, go_on = nxt == ids.end, nxt == ids.latent
    labelled = thought & (stop | go_on) & real
    edge = labelled.new_zeros(labelled.shape[0], 1)
    return torch.cat([labelled, edge], 1), torch.cat([stop.float(), edge.float()], 1)


def switch_loss(head: SwitchHead, hidden: torch.Tensor, input_ids, attention_mask, ids: LatentIds):
    """Mean BCE of the head over the labelled positions of a batch, or None when it has none."""
    labelled, target = switch_targets(input_ids, attention_mask, ids)
    if not bool(labelled.any()):
        return None
    logits = head(hidden[labelled]).float()
    return F.binary_cross_entropy_with_logits(logits, target[labelled])


def coconut_config_head(directory: str | Path, config_file: str) -> dict | None:
    """The switch-head entry of a saved model's coconut config, or None."""
    path = Path(directory) / config_file
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid Coconut config ({e}); save the model again or remove the file") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a valid Coconut config (expected a JSON object, got {type(config).__name__})")
    head = config.get("switch_head")
    if head is not None and not (isinstance(head, dict) and {"kind", "hidden_size"} <= head.keys()):
        raise ValueError(f"{path}: its switch_head entry must be an object with 'kind' and 'hidden_size', got {head!r}")
    return head
